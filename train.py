"""
Train a masked mixer, transformer or hybrid on tokens from data_prep.py, nanoGPT style.

    python train.py --arch mixer                                 # one GPU, or the CPU
    python train.py --arch transformer --max_minutes 60          # equal wall-clock comparisons
    python train.py --arch mixer --resume                        # continue out-mixer/ckpt.pt exactly
    torchrun --standalone --nproc_per_node 8 train.py --arch mixer   # DDP on several GPUs

Each eval prints and appends to out_dir/log.csv: step, tokens seen, train/val loss, tokens/s, MFU,
peak memory. out_dir/ckpt.pt (model, optimizer, step, RNG states, data meta) is written atomically
when val loss improves, at the end, and on Ctrl-C; --keep_every N also keeps ckpt_stepN.pt snapshots.

--layout packed (nanoGPT) trains on windows that start anywhere in the token stream; --layout stories
(the paper) starts every row at a story's first token and pads after the story's end, no loss there.
--compile (on by default) compiles the model where a compiler is available; --compile false is eager.

The optimizer (make_optimizer), the learning-rate schedule (Schedule) and the step (train_step) are
the ones every script here trains with: recall.py, retrieve.py and bench.py import them.
"""
import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cli import (AtomicFile, HelpFormatter, Progress, UserError, add_model_flags, boolean, config_from_flags,
                 nonneg_float, nonneg_int, positive_float, positive_int, run, unit_interval)
from mixer import ARCHS, Config, Model

LOG_FIELDS = ["step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_s", "mfu", "peak_mem_mb", "elapsed_s"]
# Dense bf16 tensor-core peaks (FLOP/s) for MFU; unknown devices report no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "RTX 3060": 51e12}
# Each arch's best lr at the README's CPU settings (RESULTS.md section 1, packed rows: the mixers' at
# T = 32 and 512; at T = 128 their best, 3e-2, was 0.02 ahead on one seed)
CPU_LR = {"mixer": 1e-2, "transformer": 3e-3, "hybrid": 3e-3}


class TrainError(UserError):
    """Bad training input, an unreadable checkpoint, or a run that diverged."""


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def now():
    """The clock of every training-time measurement (a test replaces it with a fake one)."""
    return time.perf_counter()


# ---------------------------------------------------------------------------------------- device and precision

def pick_device(requested):
    if requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise TrainError(f"--device {requested!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainError(f"--device {requested}: this machine has no CUDA GPU (use --device cpu or auto)")
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


def cannot_compile(device):
    """Why torch.compile cannot work on this device, or None: it needs CUDA, or a C++ compiler on the CPU."""
    if device.type == "mps":
        return "not supported on mps"
    if device.type == "cpu" and c_compiler() is None:
        return "no C++ compiler found (g++ or clang++) for this CPU"
    return None


# ---------------------------------------------------------------------------------------- data

@dataclasses.dataclass
class Split:
    """One split's tokens and, for --layout stories, where each story starts (None: packed)."""
    tokens: np.ndarray
    eot: int
    starts: np.ndarray = None


def story_starts(tokens, eot):
    """Index of every story's first token: 0 and each position after an <|endoftext|>."""
    after_eot = np.flatnonzero(tokens == eot) + 1
    return np.concatenate([[0], after_eot[after_eot < len(tokens)]])


def load_data(data_dir, layout="packed"):
    data_dir = Path(data_dir)
    if not (data_dir / "meta.json").exists():
        raise TrainError(f"no prepared data in {data_dir} (meta.json missing): run python data_prep.py "
                         f"[--out_dir {data_dir}] first")
    meta = json.loads((data_dir / "meta.json").read_text())
    splits = {}
    for split in ("train", "val"):
        path = data_dir / f"{split}.bin"
        expected = meta["tokens"][split] * 2
        if not path.exists() or path.stat().st_size != expected:
            raise TrainError(f"{path} is missing or not {expected} bytes as meta.json says: "
                             "re-run data_prep.py with --force")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        splits[split] = Split(tokens, meta["eot_token"], story_starts(tokens, meta["eot_token"]) if layout == "stories" else None)
    return splits, meta


def get_batch(split, block_size, batch_size, rng, device):
    """Inputs and next-token targets [B, T] from rows of block_size + 1 tokens.

    packed: each row is a random window anywhere in the token stream (nanoGPT).
    stories: each row starts at a random story's first token, so position t always means "t tokens
    into a story", which is what the mixer's position-specific weights assume (the paper's layout).
    After the story's <|endoftext|> the row is padding: the end token itself is a target (the model
    learns to end stories), everything after it has target -1 (no loss) and <|endoftext|> as input.
    """
    if split.starts is None:
        if len(split.tokens) <= block_size:
            raise TrainError(f"a split has only {len(split.tokens)} tokens, fewer than block_size + 1 = {block_size + 1}")
        starts = rng.integers(0, len(split.tokens) - block_size, size=batch_size)
    else:
        starts = split.starts[rng.integers(0, len(split.starts), size=batch_size)]
    rows = np.full((batch_size, block_size + 1), split.eot, dtype=np.int64)
    for row, start in zip(rows, starts):
        window = split.tokens[start : start + block_size + 1]  # shorter at the end of the file
        row[: len(window)] = window
    x, y = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:].copy())
    if split.starts is not None:
        is_end = x == split.eot  # [B, T]; the first one is the story's end
        end = torch.where(is_end.any(1), is_end.int().argmax(1), block_size).unsqueeze(1)  # [B, 1]
        position = torch.arange(block_size)  # [T]
        x[position > end] = split.eot
        y[position >= end] = -1
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def padding_fraction(split, block_size, rng, rows=1024):
    """Share of target positions that are padding (no loss) under this split's layout."""
    _, y = get_batch(split, block_size, rows, rng, torch.device("cpu"))
    return (y == -1).float().mean().item()



# ---------------------------------------------------------------------------------------- optimizer, schedule, step

def make_optimizer(model, lr, weight_decay, device):
    """AdamW; weight decay on matrices only (the [T, T] mixing weights included), not on norms/biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


@dataclasses.dataclass
class Schedule:
    """Linear warmup over warmup_iters steps, then decay from the peak lr to lr * min_lr_ratio over the
    rest of the budget ("cosine" or "linear"; "constant" stays at the peak)."""
    lr: float
    warmup_iters: int = 0
    min_lr_ratio: float = 0.1
    kind: str = "cosine"

    def lr_at(self, used, step, warmup_end):
        """The lr of step `step`. used is the fraction of the budget used (steps or minutes), warmup_end
        the fraction used when warmup ended: the decay runs from there to 1, so it starts exactly at the
        peak even when warmup took a sizeable share of a time budget, and ends at the minimum with it."""
        if step < self.warmup_iters:
            return self.lr * (step + 1) / self.warmup_iters
        min_lr = self.lr * self.min_lr_ratio
        decay = min(max((used - warmup_end) / (1 - warmup_end), 0.0), 1.0) if warmup_end < 1 else 1.0
        if self.kind == "cosine":
            return min_lr + 0.5 * (self.lr - min_lr) * (1 + math.cos(math.pi * decay))
        if self.kind == "linear":
            return self.lr - (self.lr - min_lr) * decay
        return self.lr


def train_step(optimizer, scaler, next_loss, lr, ctx, grad_clip=1.0, grad_accum=1, no_sync=None):
    """One optimizer step at learning rate lr over grad_accum micro-batches; next_loss() computes the
    next micro-batch's loss (under ctx, the autocast). The fp16 loss scaler, gradient clipping and
    AdamW as every script here trains. no_sync: DDP's model.no_sync, so that gradients are all-reduced
    once, after the last micro-batch. Returns the last micro-batch's loss (a tensor: no host sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    for micro in range(grad_accum):
        with no_sync() if no_sync and micro < grad_accum - 1 else contextlib.nullcontext():
            with ctx:
                loss = next_loss()
            scaler.scale(loss / grad_accum).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


# ---------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, splits, args, device, ctx, stop=None, status=None):
    """Mean loss on the same eval_iters batches of each split every time (a fixed seed, the training
    layout): evals are comparable across steps, runs and resumes. None when Ctrl-C came during it."""
    model.eval()
    losses, started, batches = {}, time.time(), len(splits) * args.eval_iters
    for n_split, (name, split) in enumerate(splits.items()):
        rng = np.random.default_rng(args.seed + 1)
        total = 0.0
        for i in range(args.eval_iters):
            if stop is not None and stop.set:
                model.train()
                return None
            x, y = get_batch(split, model.config.block_size, args.batch_size, rng, device)
            with ctx:
                total += model(x, y)[1].item()
            if status is not None:
                status.update(f"eval: batch {n_split * args.eval_iters + i + 1}/{batches} ({time.time() - started:.0f}s)")
        losses[name] = total / args.eval_iters
    model.train()
    return losses


def default_eval_iters(args, device, block_size):
    """--eval_iters when given, else the batches that hold --eval_tokens (by default 409,600 tokens
    per split on a GPU, 32,768 on a CPU, where a forward pass is ~100x slower). Fixed for a run and
    kept on --resume, so its evals stay comparable."""
    if args.eval_iters:
        return args.eval_iters
    tokens = args.eval_tokens or (32_768 if device.type == "cpu" else 409_600)
    return max(1, round(tokens / (args.batch_size * block_size)))


# ---------------------------------------------------------------------------------------- budget, clock, reporter

class Clock:
    """Training seconds: time outside paused() blocks (evals, checkpoint writes, the first compiled
    step), so that an equal --max_minutes is equal training time for every arch. sync (CUDA) waits
    for queued work at each pause, so that work is counted where it ran. source: the clock read
    (now: wall-clock; time.process_time: this process's CPU time, --clock cpu)."""

    def __init__(self, trained_s=0.0, sync=lambda: None, source=None):
        self.source, self.sync = source or (lambda: now()), sync
        self.origin, self.paused_at = self.source() - trained_s, None

    def seconds(self):
        return (self.source() if self.paused_at is None else self.paused_at) - self.origin

    @contextlib.contextmanager
    def paused(self):
        if self.paused_at is not None:  # within a pause already (a save inside an eval)
            yield
            return
        self.sync()
        self.paused_at = self.source()
        try:
            yield
        finally:
            self.sync()
            self.origin += self.source() - self.paused_at
            self.paused_at = None


@dataclasses.dataclass
class Budget:
    """--max_iters and --max_minutes: a run ends with whichever runs out first."""
    max_iters: int
    max_minutes: float = None

    def used(self, step, seconds):
        """The fraction of the budget used (the lr schedule's clock; 1 = finished)."""
        return max(step / self.max_iters, seconds / 60 / self.max_minutes if self.max_minutes else 0.0)

    def time_ends_first(self, step, seconds, step_s):
        return bool(self.max_minutes) and (self.max_minutes * 60 - seconds) / step_s < self.max_iters - step

    def left(self, step, seconds, step_s, eval_interval):
        """(seconds of training left, evals left, counting the final one) at step_s seconds a step."""
        train_s = (self.max_iters - step) * step_s
        if self.max_minutes:
            train_s = min(train_s, max(self.max_minutes * 60 - seconds, 0.0))
        return train_s, int(train_s / step_s) // eval_interval + 1


def duration(seconds):
    """12s, 8m32s, 21h06m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def cost_lines(budget, eval_interval, step, seconds, step_s, eval_s, tokens_per_step, device, arch):
    """What the whole run will cost at the measured pace, and on a CPU-only machine where that is
    more than an hour, a command of the README's CPU settings that finishes in minutes."""
    train_s, evals = budget.left(step, seconds, step_s, eval_interval)
    what = f"--max_minutes {budget.max_minutes:g}" if budget.time_ends_first(step, seconds, step_s) \
        else f"{budget.max_iters:,} steps"
    steps = int(train_s / step_s)
    lines = [f"cost: {step_s * 1000:,.0f} ms/step, so {what} = {steps:,} more steps ({steps * tokens_per_step / 1e6:,.1f}M "
             f"tokens) in {duration(train_s)}, plus {evals} evals of {duration(eval_s)}: about "
             f"{duration(train_s + evals * eval_s)} in all"]
    cpu_only = device.type == "cpu" and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    if cpu_only and train_s + evals * eval_s > 3600:
        lines.append("no GPU here: for a run of minutes on this CPU use the README's CPU settings, e.g. "
                     "python data_prep.py --vocab_size 8192 --out_dir data/tinystories8192 && python train.py "
                     f"--arch {arch} --data_dir data/tinystories8192 --n_layer 4 --n_embd 128 --block_size 128 "
                     f"--batch_size 16 --lr {CPU_LR[arch]:g} --warmup_iters 100 --max_minutes 10")
    return lines


class Reporter:
    """Every line a run prints and every row of log.csv, on rank 0 only (on other ranks it only
    checks the loss). Step lines come every log_interval steps (or 30 s) with the loss, and the
    pace and time left in between on a status line; paces are in training seconds (Clock)."""

    def __init__(self, master, log_path, args, tokens_per_step, device, model):
        self.master, self.log_path, self.args, self.device, self.model = master, log_path, args, device, model
        self.tokens_per_step, self.peak = tokens_per_step, peak_flops(device)
        self.budget = Budget(args.max_iters, args.max_minutes)
        self.status = Progress(log_every=30, quiet_first=True)
        self.pace_mark = self.eval_mark = None  # (step, training seconds) where the pace / eval window starts
        self.line_time, self.eval_s, self.timed_steps = now(), 0.0, 0

    def print(self, *lines):
        if self.master:
            self.status.clear()
            print(*lines, sep="\n", flush=True)

    def start(self, step, seconds):
        """Measure the pace and tokens/s from here: where training starts."""
        self.pace_mark, self.eval_mark, self.line_time = (step, seconds), (step, seconds), now()

    def untimed_step(self, step, seconds, compile_s):
        """The step just done was the first compiled one: left out of the pace and of tokens/s."""
        self.print(f"compile: the first step took {compile_s:.1f}s (graph capture and compilation), "
                   "not counted in the time budget or tokens/s")
        self.pace_mark, self.eval_mark, self.line_time = (step, seconds), (self.eval_mark[0] + 1, seconds), now()

    def step(self, step, loss, lr, seconds):
        """After a training step: the loss line (checks the loss is finite), the cost line after the
        first timed steps, or the status line."""
        if step == self.pace_mark[0]:  # the first compiled step (untimed_step): no pace to show yet
            return
        self.timed_steps += 1
        step_s = max(seconds - self.pace_mark[1], 1e-9) / (step - self.pace_mark[0])
        if self.timed_steps == 3 or (self.timed_steps < 3 and now() - self.line_time >= 20):
            self.timed_steps = 3  # the first few timed steps: say what the whole run will cost
            self.print(*cost_lines(self.budget, self.args.eval_interval, step, seconds, step_s, self.eval_s,
                                   self.tokens_per_step, self.device, self.model.config.arch))
        train_left, evals_left = self.budget.left(step, seconds, step_s, self.args.eval_interval)
        where = f"step {step}" + (f" ({seconds / 60:.1f}/{self.budget.max_minutes:g} min)"
                                  if self.budget.time_ends_first(step, seconds, step_s) else f"/{self.budget.max_iters}")
        eta = f"{step_s * 1000:.0f} ms/step, {duration(train_left + evals_left * self.eval_s)} left"
        if step % self.args.log_interval == 0 or now() - self.line_time >= 30:
            loss = loss.item()  # a host sync: only on these lines
            if not math.isfinite(loss):
                raise diverged(f"loss is {loss}", step, self.log_path.parent / "ckpt.pt")
            if self.master:
                self.status.done(f"{where}: loss {loss:.4f}, lr {lr:.2e}, {eta}")
            self.pace_mark, self.line_time = (step, seconds), now()
        elif self.master:
            self.status.update(f"{where}: {eta}")

    def eval(self, step, losses, lr, seconds, eval_s):
        """One eval: its line and its log.csv row (tokens/s over the training time since the last eval)."""
        self.eval_s = eval_s
        steps, trained = step - self.eval_mark[0], seconds - self.eval_mark[1]
        self.eval_mark = (step, seconds)
        tokens_per_s = steps * self.tokens_per_step / trained if steps and trained > 0 else None
        if not self.master:
            return
        self.status.clear()
        log_eval(self.log_path, step, step * self.tokens_per_step, losses, lr, tokens_per_s, self.model, self.peak,
                 self.device, seconds)
        self.line_time = now()


# ---------------------------------------------------------------------------------------- checkpoints

def atomic_save(obj, path):
    """torch.save, atomically (cli.AtomicFile): a crash or kill at any moment leaves the old file or
    the new one at path, never a partial one."""
    with AtomicFile(path) as f:
        torch.save(obj, f)


def diverged(what, step, ckpt_path):
    """The error for a run that blew up: it is not saved, so ckpt_path keeps the last good state."""
    return TrainError(f"{what} at step {step}: not saving; {ckpt_path} keeps the last good state "
                      "(lower --lr or raise --warmup_iters)")


def save_checkpoint(path, model, optimizer, state):
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise diverged("weights are not finite", state["step"], path)
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "config": dataclasses.asdict(model.config), **state}, path)


def load_checkpoint(path, needs=("model", "config", "data_meta"), device="cpu"):
    """The dict saved in a checkpoint file. The one reader of every .pt this project writes: any
    failure to read one becomes a TrainError that names the file and says what to do."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"checkpoint not found: {path} (train one with python train.py)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise TrainError(f"{path} is not a readable checkpoint ({reason}). It is truncated or corrupt; train.py "
                         "never leaves a half-written one (it writes a temp file and renames it), so it was damaged "
                         "later: use another copy or a ckpt_stepN.pt snapshot, or retrain") from None
    missing = [key for key in needs if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise TrainError(f"{path} is not a checkpoint of the expected kind (no {', '.join(missing)}): "
                         "give a file written by the script that makes it")
    return ckpt


def model_from_checkpoint(ckpt, path):
    """The Model a checkpoint dict describes, with its weights."""
    try:
        model = Model(Config(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise TrainError(f"{path} does not match this version of mixer.py ({str(e).splitlines()[0][:120]}): "
                         "use the code it was trained with, or retrain") from None
    return model


def load_model(ckpt_path, device="cpu"):
    """A trained Model from a checkpoint (eval mode), with the data meta it was trained on."""
    ckpt = load_checkpoint(ckpt_path)
    return model_from_checkpoint(ckpt, ckpt_path).to(device).eval(), ckpt["data_meta"]


def resolve_config(args, meta, ckpt):
    """The model Config: from the checkpoint on resume (flags must agree), else from flags + data."""
    if ckpt is None:  # the vocabulary padded to a multiple of 64: faster matmuls, ids beyond are never used
        return config_from_flags(args, vocab_size=64 * math.ceil(meta["vocab_size"] / 64))
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name, None) is not None}
    if ckpt["data_meta"]["vocab_size"] != meta["vocab_size"]:
        raise TrainError(f"checkpoint was trained on a {ckpt['data_meta']['vocab_size']}-token vocabulary but "
                         f"--data_dir has {meta['vocab_size']}: use data prepared with the same --vocab_size")
    for name, value in flags.items():
        if ckpt["config"][name] != value:
            raise TrainError(f"checkpoint has {name}={ckpt['config'][name]} but --{name} {value} was given: "
                             "drop the flag to resume, or train into a new --out_dir")
    return Config(**ckpt["config"])


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


def setup_distributed(args):
    """(rank, world_size, device). Under torchrun: DDP, one process per GPU; else a single process."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(args.device)
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def open_run(args):
    """(out_dir, checkpoint dict or None, layout) for a new run or a --resume, with every check that
    can fail before any work starts."""
    out_dir = Path(args.out_dir or f"out-{args.arch or 'mixer'}")
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"--out_dir {out_dir} is a file, not a folder: choose another --out_dir")
    ckpt_path = out_dir / "ckpt.pt"
    ckpt = None
    if args.resume:
        if not ckpt_path.exists():
            raise TrainError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = load_checkpoint(ckpt_path, needs=("model", "config", "data_meta", "optimizer", "step", "rng"))
        restore_flags(args, ckpt["train_args"])
    elif ckpt_path.exists():
        raise TrainError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out_dir")
    # The layout decides what every position means to the model: a resume cannot change it.
    saved_layout = (ckpt["train_args"].get("layout") or "packed") if ckpt else None
    if args.layout and saved_layout and args.layout != saved_layout:
        raise TrainError(f"{ckpt_path} was trained with --layout {saved_layout}: drop the flag to resume, "
                         "or train into a new --out_dir")
    return out_dir, ckpt, args.layout or "packed"  # restore_flags gave a resume its run's layout


def restore_flags(args, saved):
    """On --resume, every flag the command line did not give takes the run's own value (lr, budget,
    data, ...), so that a bare --resume continues the run it names; the model's come from its Config."""
    keep = {"resume", "device", "out_dir"} | {f.name for f in dataclasses.fields(Config)}
    for name, value in saved.items():
        if name not in keep and name not in args.given and hasattr(args, name):
            setattr(args, name, value)


def restore(ckpt, model, optimizer, rng, rank, world, device):
    """Load a checkpoint's weights, optimizer and this rank's RNG states, so training replays exactly;
    returns its State."""
    if len(ckpt["rng"]) != world:
        raise TrainError(f"the checkpoint was written by {len(ckpt['rng'])} processes: resume with "
                         "the same number (torchrun --nproc_per_node) to replay the same batches")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    saved = ckpt["rng"][rank]
    rng.bit_generator.state = saved["numpy"]
    torch.set_rng_state(saved["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(saved["cuda"], device)
    return State(ckpt["step"], ckpt["best_val"], ckpt["elapsed"], ckpt.get("warmup_end"))


# ---------------------------------------------------------------------------------------- the run

@dataclasses.dataclass
class State:
    """Where a run is: what its checkpoints hold besides weights, optimizer and RNG states."""
    step: int = 0
    best_val: float = math.inf
    elapsed: float = 0.0      # training seconds (Clock) at the last save
    warmup_end: float = None  # the fraction of the budget used when warmup ended


class Run:
    """What a training run works with: data, model (raw and as trained: compiled, DDP), optimizer,
    precision, RNG, state, clock and reporter; built for a new run or restored for --resume."""

    def __init__(self, args, rank, world, device):
        self.args, self.rank, self.world, self.device, self.master = args, rank, world, device, rank == 0
        self.out_dir, ckpt, self.layout = open_run(args)
        self.ckpt_path = self.out_dir / "ckpt.pt"
        self.splits, self.meta = load_data(args.data_dir, self.layout)
        config = resolve_config(args, self.meta, ckpt)
        if args.compile is None:  # compile by default
            args.compile = True
        saved_clock = ckpt["train_args"].get("clock", "wall") if ckpt is not None else None
        if args.clock and saved_clock and args.clock != saved_clock:
            raise TrainError(f"{self.ckpt_path} counted its training time with --clock {saved_clock}: drop the flag "
                             "to resume it, or train into a new --out_dir")
        args.clock = args.clock or "wall"
        args.eval_iters = default_eval_iters(args, device, config.block_size)
        # Per-rank seeds: each DDP rank draws its own windows and dropout masks (DDP copies rank 0's
        # initial weights to the others, so the init still agrees).
        torch.manual_seed(args.seed + rank)
        self.raw_model = Model(config).to(device)
        self.optimizer = make_optimizer(self.raw_model, args.lr, args.weight_decay, device)
        self.schedule = Schedule(args.lr, args.warmup_iters, args.min_lr_ratio, args.lr_schedule)
        self.budget = Budget(args.max_iters, args.max_minutes)
        self.rng = np.random.default_rng(args.seed + rank)  # training windows
        self.state = State() if ckpt is None else restore(ckpt, self.raw_model, self.optimizer, self.rng, rank, world, device)
        self.ctx, self.scaler, self.dtype = mixed_precision(device, args.dtype)
        self.tokens_per_step = args.batch_size * args.grad_accum * config.block_size * world
        self.report = Reporter(self.master, self.out_dir / "log.csv", args, self.tokens_per_step, device, self.raw_model)
        if self.master:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            start_log(self.out_dir / "log.csv", keep_before=self.state.step if ckpt else 0)
            self.report.print(*self.opening_lines(resumed=ckpt is not None))
        problem = args.compile and cannot_compile(device)
        if problem:
            self.report.print(f"compile: {problem}; training eager (--compile false hides this line)")
        self.model, self.compile_pending = self.wrap(args.compile and not problem), args.compile and not problem
        self.clock = Clock(self.state.elapsed, torch.cuda.synchronize if device.type == "cuda" else lambda: None,
                           time.process_time if args.clock == "cpu" else None)

    def wrap(self, compile):
        """The model as trained: torch.compile'd and/or wrapped for DDP."""
        model = torch.compile(self.raw_model) if compile else self.raw_model
        if self.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return model

    def opening_lines(self, resumed):
        config, args = self.raw_model.config, self.args
        lines = [f"{config.arch}: {self.raw_model.num_params() / 1e6:.2f}M parameters, {self.tokens_per_step:,} "
                 f"tokens/step, device {self.device}, {self.dtype}, layout {self.layout}, evals of {args.eval_iters} "
                 f"batches per split" + (f", resuming at step {self.state.step}" if resumed else "")]
        if self.layout == "stories":
            pad = padding_fraction(self.splits["train"], config.block_size, np.random.default_rng(0))
            lines.append(f"stories layout: {len(self.splits['train'].starts):,} train stories; {pad:.0%} of the "
                         f"positions are padding after a story's end at block_size {config.block_size}")
        return lines

    def agree(self, interrupted):
        """(training seconds, interrupted) as every rank sees them: under DDP the slowest rank's clock
        and anyone's Ctrl-C, so that all ranks stop at the same step with the same lr."""
        if self.world == 1:
            return self.clock.seconds(), interrupted
        both = torch.tensor([self.clock.seconds(), float(interrupted)], dtype=torch.float64, device=self.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return both[0].item(), bool(both[1].item())

    def step(self, lr):
        """One optimizer step; the first compiled one outside the clock (and eager if compiling fails)."""
        def next_loss():
            return self.model(*get_batch(self.splits["train"], self.raw_model.config.block_size,
                                         self.args.batch_size, self.rng, self.device))[1]

        def one_step():
            no_sync = self.model.no_sync if self.world > 1 else None
            return train_step(self.optimizer, self.scaler, next_loss, lr, self.ctx, self.args.grad_clip,
                              self.args.grad_accum, no_sync)

        if not self.compile_pending:
            return one_step()
        with self.clock.paused():
            started = now()
            try:
                loss = one_step()
            except torch._dynamo.exc.TorchDynamoException as e:
                self.report.print(f"compile: failed ({str(e).splitlines()[0][:100]}); training eager")
                self.optimizer.zero_grad(set_to_none=True)
                self.model = self.wrap(False)
                loss = one_step()
            self.compile_pending = False
        self.report.untimed_step(self.state.step + 1, self.clock.seconds(), now() - started)
        return loss

    def evaluate(self, stop, final):
        """Eval (outside the clock), log it, and save ckpt.pt when val improved or at the end (final).
        False: Ctrl-C came during it (a single process cuts it short; DDP ranks finish theirs, to stop
        together)."""
        with self.clock.paused():
            started = now()
            losses = evaluate(self.raw_model, self.splits, self.args, self.device, self.ctx,
                              stop if self.world == 1 else None, self.report.status if self.master else None)
            if losses is None:
                return False
            if not math.isfinite(losses["val"]):
                raise diverged(f"val loss is {losses['val']}", self.state.step, self.ckpt_path)
            improved = losses["val"] < self.state.best_val
            self.state.best_val = min(self.state.best_val, losses["val"])
            seconds = self.clock.seconds()
            lr = self.schedule.lr_at(self.budget.used(self.state.step, seconds), self.state.step, self.state.warmup_end)
            self.report.eval(self.state.step, losses, lr, seconds, now() - started)
            self.save(self.ckpt_path, write=improved or final)
        return True

    def save(self, path, write=True):
        """A checkpoint of this moment, written by rank 0 if write (every rank takes part: the RNG
        states are gathered, so that the ranks stay in step whatever rank 0 decides)."""
        with self.clock.paused():
            self.state.elapsed = self.clock.seconds()
            rng_state = {"numpy": self.rng.bit_generator.state, "torch": torch.get_rng_state(),  # windows, dropout
                         "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
            rng_states = [rng_state]
            if self.world > 1:
                rng_states = [None] * self.world
                dist.all_gather_object(rng_states, rng_state)
            if self.master and write:
                flags = {name: value for name, value in vars(self.args).items() if name != "given"}
                save_checkpoint(path, self.raw_model, self.optimizer,
                                {**dataclasses.asdict(self.state), "data_meta": self.meta,
                                 "train_args": {**flags, "layout": self.layout}, "rng": rng_states})


def train(args):
    """Train until the step or time budget runs out (or Ctrl-C). Returns a summary dict."""
    rank, world, device = setup_distributed(args)
    run = Run(args, rank, world, device)
    state, clock, report, budget = run.state, run.clock, run.report, run.budget
    report.start(state.step, clock.seconds())
    seconds, interrupted = run.agree(False)
    with StopFlag() as stop:
        while True:
            # under DDP the ranks agree on the clock and on Ctrl-C at log lines and evals, not at every
            # step (an all-reduce is a host sync): all of them stop at the same step, with the same lr
            if world == 1 or state.step % args.log_interval == 0 or state.step % args.eval_interval == 0:
                seconds, interrupted = run.agree(stop.set)
            if interrupted:
                break
            used = budget.used(state.step, seconds)
            if state.warmup_end is None and state.step >= args.warmup_iters:
                state.warmup_end = used
            finished = used >= 1
            if (state.step % args.eval_interval == 0 or finished) and not run.evaluate(stop, finished):
                interrupted = True
                break
            if args.keep_every and state.step % args.keep_every == 0:
                run.save(run.out_dir / f"ckpt_step{state.step}.pt")
            if finished:
                break
            lr = run.schedule.lr_at(used, state.step, state.warmup_end)
            loss = run.step(lr)
            state.step += 1
            report.step(state.step, loss, lr, clock.seconds())
        if interrupted:  # Ctrl-C (on any rank): keep the last completed step, without an eval on the way out
            run.save(run.ckpt_path)  # still inside StopFlag: a second Ctrl-C during this save exits at once
            report.print(f"interrupted at step {state.step}: saved {run.ckpt_path} (continue with --resume); "
                         f"best val loss {state.best_val:.4f}")
    if not interrupted:
        report.print(f"done at step {state.step}: best val loss {state.best_val:.4f}; saved {run.ckpt_path}")
    if world > 1:
        dist.barrier()  # no rank tears its connections down while another still writes or talks to it
        dist.destroy_process_group()
    return {"out_dir": run.out_dir, "step": state.step, "best_val": state.best_val, "interrupted": interrupted}


def start_log(path, keep_before):
    """Open log.csv; on resume drop rows at or after the resume step (they are about to be redone)."""
    rows = []
    if keep_before and path.exists():
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) < keep_before]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def log_eval(path, step, tokens, losses, lr, tokens_per_s, model, peak, device, elapsed):
    mfu = tokens_per_s * model.flops_per_token() / peak if tokens_per_s and peak else None
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    row = {"step": step, "tokens": tokens, "train_loss": f"{losses['train']:.4f}", "val_loss": f"{losses['val']:.4f}",
           "lr": f"{lr:.3e}", "tokens_per_s": f"{tokens_per_s:.0f}" if tokens_per_s else "",
           "mfu": f"{mfu:.3f}" if mfu else "", "peak_mem_mb": f"{peak_mem:.0f}" if peak_mem else "",
           "elapsed_s": f"{elapsed:.1f}"}
    print(f"eval step {step}: train {row['train_loss']}, val {row['val_loss']}, {tokens:,} tokens"
          + (f", {row['tokens_per_s']} tokens/s" if tokens_per_s else "") + (f", MFU {mfu:.1%}" if mfu else "")
          + (f", peak mem {row['peak_mem_mb']} MB" if peak_mem else ""))
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, LOG_FIELDS).writerow(row)


def add_dtype_flag(parser):
    """--dtype, the same flag and rule (resolve_dtype) in every script that trains or embeds."""
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="auto: bf16 autocast on GPUs that support it and on CPUs with native bf16 matmuls "
                             "(AMX, AVX512-BF16), else float32")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--arch", choices=ARCHS, help="default mixer")
    p.add_argument("--data_dir", default="data/tinystories", help="a folder written by data_prep.py")
    p.add_argument("--out_dir", help="default: out-ARCH")
    p.add_argument("--layout", choices=["packed", "stories"],
                   help="packed: windows anywhere in the token stream (nanoGPT; the default); stories: each row "
                        "starts at a story's first token, padded after its end (the paper). Kept on --resume")
    add_model_flags(p)  # every mixer.Config field but the vocabulary (from the data); on --resume, the checkpoint's
    t = p.add_argument_group("training")
    t.add_argument("--batch_size", type=positive_int, default=16, help="sequences per micro-batch (per GPU)")
    t.add_argument("--grad_accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=positive_float, default=5e-4, help="peak learning rate (the paper's mixer value, for every arch)")
    t.add_argument("--min_lr_ratio", type=unit_interval, default=0.1, help="final lr as a fraction of --lr")
    t.add_argument("--lr_schedule", choices=["cosine", "linear", "constant"], default="cosine")
    t.add_argument("--warmup_iters", type=nonneg_int, default=200, help="steps of linear warmup")
    t.add_argument("--max_iters", type=positive_int, default=5000, help="step budget")
    t.add_argument("--max_minutes", type=positive_float, help="time budget (training time, evals excluded); the lr "
                                                               "schedule runs over whichever budget ends first")
    t.add_argument("--clock", choices=["wall", "cpu"],
                   help="what --max_minutes counts: wall (the default), or this process's CPU time (all its threads), "
                        "which other work on a shared machine does not eat into: with one thread per run, equal "
                        "compute. Kept on --resume")
    t.add_argument("--weight_decay", type=nonneg_float, default=0.1)
    t.add_argument("--grad_clip", type=nonneg_float, default=1.0, help="max gradient norm; 0 disables")
    t.add_argument("--eval_interval", type=positive_int, default=250, help="steps between evals (and checkpoints)")
    t.add_argument("--eval_iters", type=positive_int, help="batches per split in each eval (default: the batches that "
                                                            "hold --eval_tokens; kept on --resume)")
    t.add_argument("--eval_tokens", type=positive_int, help="tokens per split in each eval when --eval_iters is not "
                                                             "given: default 409,600 on a GPU (50 batches of 16 x 512), "
                                                             "32,768 on a CPU, so that an eval takes seconds, not minutes")
    t.add_argument("--log_interval", type=positive_int, default=10, help="steps between loss lines")
    t.add_argument("--keep_every", type=positive_int, help="also keep ckpt_stepN.pt every N steps (step 0 included)")
    t.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or e.g. cuda:1")
    add_dtype_flag(t)
    t.add_argument("--compile", type=boolean, nargs="?", const=True,
                   help="torch.compile the model where a compiler is available (CUDA, or g++/clang++ on a CPU): "
                        "the default; --compile false trains eager")
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--resume", action="store_true", help="continue out_dir/ckpt.pt; flags not given take the run's "
                                                          "own values")
    return p


def parse_args(argv=None):
    """The flags, and in .given the names of those the command line gave (--resume takes the others
    from the checkpoint)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    unset = object()  # argparse leaves a name alone that the namespace already holds: only given flags replace it
    probe = parser.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in parser._actions}))
    args.given = {name for name, value in vars(probe).items() if value is not unset}
    return args


def main(argv=None):
    return run("train.py", train, parse_args(argv))


if __name__ == "__main__":
    main()
