"""
Command-line plumbing shared by the scripts: one error type, checked flag types, progress lines.

Every script turns a UserError into one line on stderr and exit code 2 (see run); argparse reports a
bad flag the same way. Nothing here knows about models or data.
"""
import argparse
import sys
import time


class UserError(Exception):
    """Bad input or a failed run that the user can fix: reported as one line and exit code 2."""


def run(prog, main, args):
    """Call main(args); a UserError becomes 'prog: error: ...' on stderr and exit code 2."""
    try:
        return main(args)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------- flag types

def _checked(kind, ok, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: v > 0, "a number > 0")
nonneg_float = _checked(float, lambda v: v >= 0, "a number >= 0")
fraction = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)")
unit_interval = _checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows every flag's default (None means 'see the help')."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in help:
            help += " (default: %(default)s)"
        return help


# ---------------------------------------------------------------------------------------- progress

class Progress:
    """A progress line for long work. On a terminal it is rewritten in place (carriage return) every
    half second; in a log or a pipe it is a plain line every `log_every` seconds, so logs stay readable."""

    def __init__(self, log_every=10.0, stream=None, quiet_first=False):
        """quiet_first: the first line waits a whole interval, so short work prints nothing."""
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every = 0.5 if self.tty else log_every
        self.last, self.width = time.time() if quiet_first else 0.0, 0

    def update(self, text):
        if time.time() - self.last >= self.every:
            self.last = time.time()
            self._write(text, end="" if self.tty else "\n")

    def done(self, text):
        """A line that stays; in a log, the next update line waits a whole interval after it."""
        self._write(text, end="\n")
        self.width, self.last = 0, time.time()

    def clear(self):
        """Before other output: wipe a line rewritten in place (terminal); the next update line waits a
        whole interval after that output, as after done()."""
        if self.tty and self.width:
            print("\r" + " " * self.width + "\r", end="", file=self.stream, flush=True)
        self.width, self.last = 0, time.time()

    def _write(self, text, end):
        if self.tty:  # overwrite the previous line, padding over its longer tail
            text, self.width = "\r" + text.ljust(self.width), len(text)
        print(text, end=end, file=self.stream, flush=True)
