"""
What two or more of the scripts (train, data_prep, sample, retrieve and the experiments) share,
besides the model and the training step:

- errors: UserError, and run(), which turns one into a single line on stderr and exit code 2
  (argparse reports a bad flag the same way);
- flags: checked number types, flag() and add_config_flags() for config dataclasses, the model's
  flags (add_model_flags, config_from_flags, WITHOUT_EFFECT) and --dtype; the help formatter;
- the machine: pick_device, and the precision rule (resolve_dtype, autocast, mixed_precision);
- files: check_folder, AtomicFile and atomic_save (every file the project writes is whole or not
  there), and the one checkpoint reader (load_checkpoint, load_model);
- Progress, the progress line of long work.
"""
import argparse
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from mixer import ARCHS, ATTN_IMPLS, MIXING_BIASES, MIXINGS, Config, Model


class UserError(Exception):
    """Bad input or a failed run that the user can fix: reported as one line and exit code 2."""


def run(prog, main, args):
    """Call main(args); a UserError becomes 'prog: error: ...' on stderr and exit code 2."""
    try:
        return main(args)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------------------- flag types

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
unit_interval = _checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")


def boolean(text):
    """true/false (also yes/no, 1/0), and nothing else: a typo must not silently mean false."""
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    value = words.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return value


def flag(default, kind, help, choices=None):
    """A config dataclass field that is also a command-line flag: its default, how its text is read
    (kind: a flag type here; None: a switch), its help and choices (add_config_flags)."""
    metadata = {"kind": kind, "help": help, "choices": choices}
    return dataclasses.field(default=default, metadata=metadata)


def add_config_flags(parser, cls, title, set_defaults=False):
    """A flag per field of the dataclass cls made by flag() (the others are not flags), its default
    shown in the help. set_defaults: the parsed flags hold the defaults; else what the parser's
    argument_default says."""
    group = parser.add_argument_group(title)
    for field in dataclasses.fields(cls):
        if "help" not in field.metadata:
            continue
        kind, help = field.metadata["kind"], field.metadata["help"]
        kw = {"default": field.default} if set_defaults else {}
        shown = help
        if field.default is not None and not set_defaults:
            shown += f" (default: {field.default})"
        if kind is None:
            group.add_argument(f"--{field.name}", action="store_true", help=help)
        elif kind is boolean:
            group.add_argument(f"--{field.name}", type=boolean, nargs="?", const=True, help=shown,
                               **kw)
        else:
            group.add_argument(f"--{field.name}", type=kind, choices=field.metadata["choices"],
                               help=shown, **kw)


# The model flags whose values are names, and the flags that mean nothing to an arch: given with it,
# they are a mistake the user should hear about, not a silent no-op.
MODEL_CHOICES = {"arch": ARCHS, "mixing": MIXINGS, "mixing_bias": MIXING_BIASES,
                 "attn_impl": ATTN_IMPLS}
WITHOUT_EFFECT = {"mixer": ("n_head", "attn_impl"),
                  "transformer": ("mixer_heads", "mixing", "mixing_bias"),
                  "hybrid": ()}


def add_model_flags(parser, defaults=None, skip=("arch", "vocab_size", "causal"),
                    title="model (mixer.Config)"):
    """One flag per mixer.Config field but those in skip, typed as the field (Config checks the
    values), with its choices where it names one. defaults: {field: value} where a script's default
    differs from Config's; a flag without one takes the parser's default (None, or SUPPRESS)."""
    group = parser.add_argument_group(title)
    defaults = defaults or {}
    for field in dataclasses.fields(Config):
        if field.name not in skip:
            kw = {"default": defaults[field.name]} if field.name in defaults else {}
            kind = boolean if field.type is bool else field.type
            help = None if field.name in defaults else f"default {field.default}"
            group.add_argument(f"--{field.name}", type=kind, choices=MODEL_CHOICES.get(field.name),
                               help=help, **kw)
    return group


def config_from_flags(args, what="invalid model settings", **fixed):
    """The Config of the model flags that were given (a namespace), plus fixed fields; a bad value
    is a UserError 'what: reason'."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
             if getattr(args, f.name, None) is not None}
    try:
        return Config(**{**flags, **fixed})
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None


DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_dtype_flag(parser):
    """--dtype, the same flag and rule (resolve_dtype) in every script that trains or embeds."""
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="auto: bf16 autocast on GPUs that support it and on CPUs with native "
                             "bf16 matmuls (AMX, AVX512-BF16), else float32")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows every flag's default (None means 'see the
    help')."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in help:
            help += " (default: %(default)s)"
        return help


# ----------------------------------------------------------------------------- device and precision

def pick_device(requested):
    if requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise UserError(f"--device {requested!r} is not a device: use auto, cpu, cuda, cuda:N "
                            "or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {requested}: this machine has no CUDA GPU (use --device cpu "
                            "or auto)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_native_bf16():
    """True when this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16). Elsewhere torch
    emulates bf16 matmuls, which is slower than float32, so bf16 pays only here. (Private torch
    helpers: a torch without them answers False, i.e. float32.)"""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def resolve_dtype(device, dtype):
    """--dtype auto: bf16 autocast on a CUDA GPU that supports it and on a CPU with native bf16
    matmuls, float32 everywhere else. The one rule of every script that trains or embeds."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device.type == "cpu" and cpu_has_native_bf16() else "float32"


def autocast(device, dtype):
    """(context manager, dtype name): autocast to the resolved dtype, or nothing for float32."""
    dtype = resolve_dtype(device, dtype)
    if dtype == "float32":
        return contextlib.nullcontext(), dtype
    return torch.autocast(device.type, dtype=getattr(torch, dtype)), dtype


def mixed_precision(device, dtype):
    """(autocast context, loss scaler, dtype name) for training. float16 needs its loss scaler
    (small gradients underflow to zero without it); bf16 and float32 do not (the scaler is off)."""
    ctx, dtype = autocast(device, dtype)
    return ctx, torch.amp.GradScaler(device.type, enabled=dtype == "float16"), dtype


# -------------------------------------------------------------------------------------------- files

def check_folder(path, flag="--out_dir"):
    """A folder a script will write into: fine if it is missing (the script makes it when it
    writes), an error before any work if it is a file."""
    if Path(path).exists() and not Path(path).is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder: choose another {flag}")


class AtomicFile:
    """A file written as path.tmp and renamed over path by commit(), after flushing it to disk: path
    holds the old file or the whole new one, never a part (a crash, SIGKILL or Ctrl-C at any
    moment). As a context manager it commits on success and discards the temp file on an error.
    The rule of every file this project writes."""

    def __init__(self, path, mode="wb", **open_kwargs):
        self.path, self.tmp = Path(path), Path(str(path) + ".tmp")
        self.file = open(self.tmp, mode, **open_kwargs)

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


def write_text(path, text):
    """path's new text, atomically (AtomicFile)."""
    with AtomicFile(path, "w") as f:
        f.write(text)


def atomic_save(obj, path):
    """torch.save, atomically (AtomicFile)."""
    with AtomicFile(path) as f:
        torch.save(obj, f)


def load_checkpoint(path, needs=("model", "config", "data_meta"), device="cpu"):
    """The dict saved in a checkpoint file. The one reader of every .pt this project writes: any
    failure to read one becomes a UserError that names the file and says what to do."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (train one with python train.py)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"{path} is not a readable checkpoint ({reason}). It is truncated or "
                        "corrupt; train.py never leaves a half-written one (it writes a temp file "
                        "and renames it), so it was damaged later: use another copy or a "
                        "ckpt_stepN.pt snapshot, or retrain") from None
    missing = [key for key in needs if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise UserError(f"{path} is not a checkpoint of the expected kind (no "
                        f"{', '.join(missing)}): give a file written by the script that makes it")
    return ckpt


def model_from_checkpoint(ckpt, path):
    """The Model a checkpoint dict describes, with its weights."""
    try:
        model = Model(Config(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not match this version of mixer.py "
                        f"({str(e).splitlines()[0][:120]}): use the code it was trained with, or "
                        "retrain") from None
    return model


def load_model(ckpt_path, device="cpu"):
    """A trained Model from a checkpoint (eval mode), with the data meta it was trained on."""
    ckpt = load_checkpoint(ckpt_path)
    return model_from_checkpoint(ckpt, ckpt_path).to(device).eval(), ckpt["data_meta"]


# ----------------------------------------------------------------------------------------- progress

class Progress:
    """A progress line for long work. On a terminal it is rewritten in place (carriage return) every
    half second; in a log or a pipe it is a plain line every `log_every` seconds, so logs stay
    readable."""

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
        """Before other output: wipe a line rewritten in place (terminal); the next update line
        waits a whole interval after that output, as after done()."""
        if self.tty and self.width:
            print("\r" + " " * self.width + "\r", end="", file=self.stream, flush=True)
        self.width, self.last = 0, time.time()

    def _write(self, text, end):
        if self.tty:  # overwrite the previous line, padding over its longer tail
            text, self.width = "\r" + text.ljust(self.width), len(text)
        print(text, end=end, file=self.stream, flush=True)
