"""
What the scripts share besides the model and the training step: one error type, checked flag types
and the model flags, progress lines, atomic file writes, the machine a result was measured on, the
seed-spread statistic every table uses, and the optional matplotlib.

Every script turns a UserError into one line on stderr and exit code 2 (see run); argparse reports a
bad flag the same way.
"""
import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mixer import Config


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


def boolean(text):
    """true/false (also yes/no, 1/0), and nothing else: a typo must not silently mean false."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return value


# The models that compare.py and bench.py name on their command lines: each arch of mixer.py, and the
# masked mixer with Toeplitz mixing (Config fields; "toeplitz" is train.py --arch mixer --mixing toeplitz)
VARIANTS = {"mixer": {"arch": "mixer"}, "toeplitz": {"arch": "mixer", "mixing": "toeplitz"},
            "transformer": {"arch": "transformer"}, "hybrid": {"arch": "hybrid"}}
COLOURS = {"mixer": "tab:blue", "toeplitz": "tab:purple", "transformer": "tab:orange", "hybrid": "tab:green"}


def variant_flags(name):
    """train.py flags of a VARIANTS name: toeplitz -> --arch mixer --mixing toeplitz."""
    return [arg for field, value in VARIANTS[name].items() for arg in (f"--{field}", value)]


def add_model_flags(parser, defaults=None, skip=("arch", "vocab_size", "causal"), title="model (mixer.Config)"):
    """One flag per mixer.Config field but those in skip, typed as the field (Config checks the values).
    defaults: {field: value} where a script's default differs from Config's; a flag without one is None
    (Config's default, or the checkpoint's on train.py --resume)."""
    group = parser.add_argument_group(title)
    defaults = defaults or {}
    for field in dataclasses.fields(Config):
        if field.name not in skip:
            default = defaults.get(field.name)
            group.add_argument(f"--{field.name}", type=boolean if field.type is bool else field.type, default=default,
                               help=None if default is not None else f"default {field.default}")
    return group


def config_from_flags(args, what="invalid model settings", **fixed):
    """The Config of the model flags that were given, plus fixed fields; a bad value is a UserError
    'what: reason'."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name, None) is not None}
    try:
        return Config(**{**flags, **fixed})
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None


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


# ---------------------------------------------------------------------------------------- files

class AtomicFile:
    """A file written as path.tmp and renamed over path by commit(), after flushing it to disk: path
    holds the old file or the whole new one, never a part (a crash, SIGKILL or Ctrl-C at any moment).
    As a context manager it commits on success and discards the temp file on an error."""

    def __init__(self, path, mode="wb"):
        self.path, self.tmp = Path(path), Path(str(path) + ".tmp")
        self.file = open(self.tmp, mode)

    def commit(self):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self):
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self.file

    def __exit__(self, error, *_):
        self.discard() if error else self.commit()


# ---------------------------------------------------------------------------------------- reporting results

def machine(device=None):
    """What a measurement ran on, for every results table: the GPU's name, or the CPU's model (from
    /proc/cpuinfo where there is one), its bf16 hardware and torch's thread count."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple GPU (mps), {platform.machine()}"
    features = [name for name, check in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
                if getattr(torch.cpu, check, lambda: False)()]
    return (f"CPU {cpu_model()}" + (f" ({', '.join(features)})" if features else " (no bf16 hardware)")
            + f", {torch.get_num_threads()} thread(s)")


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mean_and_range(values, fmt):
    """'mean' of one value, 'mean (min-max)' of several: how every table here shows a spread over
    seeds or repeats."""
    mean = format(statistics.mean(values), fmt)
    return mean if len(values) == 1 else f"{mean} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def pyplot(picture, instead):
    """matplotlib.pyplot (non-interactive), or None after one line: matplotlib is an optional extra,
    so without it a script still writes its tables and says where the numbers are instead."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no {picture}: matplotlib is not installed (pip install matplotlib); {instead}")
        return None
    return plt
