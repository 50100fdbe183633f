"""
What the scripts share besides the model and the training step: one error type, checked flag types
and the model flags, progress lines, atomic file writes, the machine a result was measured on, the
seed-spread statistic every table uses, and the optional matplotlib.

Every script turns a UserError into one line on stderr and exit code 2 (see run); argparse reports a
bad flag the same way.
"""
import argparse
import contextlib
import dataclasses
import os
import platform
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

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


def flag(default, kind, help, choices=None):
    """A config dataclass field that is also a command-line flag: its default, how its text is read
    (kind: a flag type here; None: a switch), its help and choices (add_config_flags)."""
    return dataclasses.field(default=default, metadata={"kind": kind, "help": help, "choices": choices})


def add_config_flags(parser, cls, title, set_defaults=False):
    """A flag per field of the dataclass cls made by flag() (the others are not flags), its default shown in
    the help. set_defaults: the parsed flags hold the defaults; else what the parser's argument_default says."""
    group = parser.add_argument_group(title)
    for field in dataclasses.fields(cls):
        if "help" not in field.metadata:
            continue
        kind, help = field.metadata["kind"], field.metadata["help"]
        kw = {"default": field.default} if set_defaults else {}
        shown = help + ("" if field.default is None or set_defaults else f" (default: {field.default})")
        if kind is None:
            group.add_argument(f"--{field.name}", action="store_true", help=help)
        elif kind is boolean:
            group.add_argument(f"--{field.name}", type=boolean, nargs="?", const=True, help=shown, **kw)
        else:
            group.add_argument(f"--{field.name}", type=kind, choices=field.metadata["choices"], help=shown, **kw)


# The model flags whose values are names, and the flags that mean nothing to an arch: given with it,
# they are a mistake the user should hear about, not a silent no-op.
MODEL_CHOICES = {"arch": ARCHS, "mixing": MIXINGS, "mixing_bias": MIXING_BIASES, "attn_impl": ATTN_IMPLS}
WITHOUT_EFFECT = {"mixer": ("n_head", "attn_impl"), "transformer": ("mixer_heads", "mixing", "mixing_bias"),
                  "hybrid": ()}


def add_model_flags(parser, defaults=None, skip=("arch", "vocab_size", "causal"), title="model (mixer.Config)"):
    """One flag per mixer.Config field but those in skip, typed as the field (Config checks the values),
    with its choices where it names one. defaults: {field: value} where a script's default differs
    from Config's; a flag without one takes the parser's default (None, or argparse.SUPPRESS)."""
    group = parser.add_argument_group(title)
    defaults = defaults or {}
    for field in dataclasses.fields(Config):
        if field.name not in skip:
            kw = {"default": defaults[field.name]} if field.name in defaults else {}
            group.add_argument(f"--{field.name}", type=boolean if field.type is bool else field.type,
                               choices=MODEL_CHOICES.get(field.name), **kw,
                               help=None if field.name in defaults else f"default {field.default}")
    return group


def config_from_flags(args, what="invalid model settings", **fixed):
    """The Config of the model flags that were given (a namespace), plus fixed fields; a bad value is a
    UserError 'what: reason'."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name, None) is not None}
    try:
        return Config(**{**flags, **fixed})
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None


def refuse_flags_without_effect(given):
    """given: {model field: value} of the flags on a command line that trains one arch."""
    arch = given.get("arch", Config.arch)
    for name in WITHOUT_EFFECT[arch]:
        if name in given:
            raise UserError(f"--{name} has no effect on --arch {arch}: drop it (it applies to "
                            f"{' and '.join(a for a in ARCHS if name not in WITHOUT_EFFECT[a])})")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows every flag's default (None means 'see the help')."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in help:
            help += " (default: %(default)s)"
        return help


# ---------------------------------------------------------------------------------------- device, precision, compile

def pick_device(requested):
    if requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise UserError(f"--device {requested!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {requested}: this machine has no CUDA GPU (use --device cpu or auto)")
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
    return any(getattr(torch.cpu, check, lambda: False)() for check in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


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


def c_compiler():
    """The C++ compiler torch.compile would use on the CPU (None: there is none)."""
    return next(filter(None, (shutil.which(cc) for cc in (os.environ.get("CXX", ""), "g++", "clang++", "c++"))), None)


def compile_by_default(device, dtype):
    """Whether --compile is on when not given: where it pays. On a GPU, and on a CPU that trains in bf16
    (AMX, AVX512-BF16: compile fuses autocast's casts, 1.45-1.88x, RESULTS.md section 9). Not where a CPU
    trains in float32 (no bf16 hardware, or --dtype float32): there it gained 0-7% and its first step
    costs about 33 s, repaid only after 8-19 minutes of training (RESULTS.md section 10)."""
    return device.type == "cuda" or (device.type == "cpu" and resolve_dtype(device, dtype) != "float32")


# Dense bf16 tensor-core peaks (FLOP/s) for MFU; unknown devices report no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "RTX 3060": 51e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def can_compile(device, say):
    """Whether torch.compile can work on device (it needs CUDA, or a C++ compiler on the CPU); where it
    cannot, say(why) once: the run trains eager."""
    problem = None
    if device.type == "mps":
        problem = "not supported on mps"
    elif device.type == "cpu" and c_compiler() is None:
        problem = "no C++ compiler found (g++ or clang++) for this CPU"
    if problem:
        say(f"compile: {problem}; training eager (--compile false hides this line)")
    return problem is None


def setup_distributed(device):
    """(rank, world_size, device). Under torchrun: DDP, one process per GPU; else a single process."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device)
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def wrap(model, compile, world, device):
    """The model as trained: torch.compile'd and/or wrapped for DDP."""
    model = torch.compile(model) if compile else model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def agree(clock, interrupted, world, device):
    """(training seconds, interrupted) as every rank sees them: under DDP the slowest rank's clock and
    anyone's Ctrl-C, so that all ranks stop at the same step with the same lr."""
    if world == 1:
        return clock.seconds(), interrupted
    both = torch.tensor([clock.seconds(), float(interrupted)], dtype=torch.float64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return both[0].item(), bool(both[1].item())


DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_dtype_flag(parser):
    """--dtype, the same flag and rule (resolve_dtype) in every script that trains or embeds."""
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="auto: bf16 autocast on GPUs that support it and on CPUs with native bf16 matmuls "
                             "(AMX, AVX512-BF16), else float32")


# ---------------------------------------------------------------------------------------- checkpoints

def atomic_save(obj, path):
    """torch.save, atomically (cli.AtomicFile): a crash or kill at any moment leaves the old file or
    the new one at path, never a partial one."""
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
        raise UserError(f"{path} is not a readable checkpoint ({reason}). It is truncated or corrupt; train.py "
                         "never leaves a half-written one (it writes a temp file and renames it), so it was damaged "
                         "later: use another copy or a ckpt_stepN.pt snapshot, or retrain") from None
    missing = [key for key in needs if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise UserError(f"{path} is not a checkpoint of the expected kind (no {', '.join(missing)}): "
                         "give a file written by the script that makes it")
    return ckpt


def model_from_checkpoint(ckpt, path):
    """The Model a checkpoint dict describes, with its weights."""
    try:
        model = Model(Config(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not match this version of mixer.py ({str(e).splitlines()[0][:120]}): "
                         "use the code it was trained with, or retrain") from None
    return model


def load_model(ckpt_path, device="cpu"):
    """A trained Model from a checkpoint (eval mode), with the data meta it was trained on."""
    ckpt = load_checkpoint(ckpt_path)
    return model_from_checkpoint(ckpt, ckpt_path).to(device).eval(), ckpt["data_meta"]


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


def duration(seconds):
    """12s, 8m32s, 21h06m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StopFlag:
    """Set by Ctrl-C (SIGINT/SIGTERM) while active; the loop stops between steps (or between eval
    batches), so the saved state is consistent. A second Ctrl-C exits at once: ckpt.pt is then the
    last one written, whole (writes are atomic). The previous handlers come back on exit."""

    def __enter__(self):
        self.set = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.set:
            os.write(2, b"\nsecond Ctrl-C: exiting now; the last checkpoint written stays as it is\n")
            os._exit(130)
        self.set = True  # os.write, not print: a handler that prints while the loop prints can raise
        os.write(2, b"\nCtrl-C: saving the last completed step, then exiting (Ctrl-C again to exit at once)\n")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


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
    """The CPU's model name and, from /proc/cpuinfo, its family and model numbers: a VM's name alone
    ("AMD EPYC") does not tell the generations apart (family 25: Zen 3 or Zen 4, by model; 26: Zen 5)."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        return f"{info['model name']} (family {info['cpu family']}, model {info['model']})"
    except (OSError, KeyError, ValueError):
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
