"""
Train a masked mixer, transformer or hybrid on tokens from data_prep.py, nanoGPT style.

    python train.py --arch mixer                                 # one GPU, or the CPU
    python train.py --arch transformer --max_minutes 60          # equal wall-clock comparisons
    python train.py --arch mixer --resume                        # continue out-mixer/ckpt.pt
    torchrun --standalone --nproc_per_node 8 train.py --arch mixer   # DDP on several GPUs

Each eval prints and appends to out_dir/log.csv (losses, tokens/s, MFU, memory). out_dir/ckpt.pt
is written atomically when val loss improves, at the end, and on Ctrl-C (a second Ctrl-C exits at
once).

Part 1 reads top-down: the config, data, schedule, step, eval and the loop. Part 2, after the
separator, is the machinery a learner may skip: the first compiled step, clock, budget, the cost
line, log.csv, checkpoints, DDP, Ctrl-C, compile and the flags.
"""
import argparse
import contextlib
import csv
import dataclasses
import functools
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

from cli import (DTYPES, WITHOUT_EFFECT, AtomicFile, HelpFormatter, Progress, UserError,
                 add_config_flags, add_model_flags, atomic_save, boolean, check_folder,
                 config_from_flags, flag, load_checkpoint, mixed_precision, nonneg_float,
                 nonneg_int, pick_device, positive_float, positive_int, resolve_dtype, run,
                 unit_interval)
from mixer import ARCHS, Config, Model


# --------------------------------------------------------------------------------------- the config

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every training setting, one flag each (the model's are mixer.Config's); built once by
    parse_args, then only read."""
    # data and output
    data_dir: str = flag("data/tinystories", str, "a folder written by data_prep.py")
    out_dir: str = flag(None, str, "where ckpt.pt and log.csv go (default: out-ARCH)")
    layout: str = flag("packed", str, "packed: rows anywhere in the text (nanoGPT); stories: each "
                       "row a story (the paper)", ("packed", "stories"))
    # optimisation
    batch_size: int = flag(16, positive_int, "sequences per micro-batch (per GPU)")
    grad_accum: int = flag(1, positive_int, "micro-batches per optimizer step")
    lr: float = flag(5e-4, positive_float, "peak learning rate (the paper's mixer value)")
    min_lr_ratio: float = flag(0.1, unit_interval, "final lr as a fraction of --lr")
    lr_schedule: str = flag("cosine", str, "the decay after warmup",
                            ("cosine", "linear", "constant"))
    warmup_iters: int = flag(200, nonneg_int, "steps of linear warmup")
    weight_decay: float = flag(0.1, nonneg_float, "AdamW's, on matrices only "
                               "(Model.make_optimizer)")
    grad_clip: float = flag(1.0, nonneg_float, "max gradient norm; 0 disables")
    # budget: whichever ends first; the lr schedule runs over it
    max_iters: int = flag(5000, positive_int, "step budget")
    max_minutes: float = flag(None, positive_float, "time budget (training time: evals and saves "
                              "excluded)")
    clock: str = flag("wall", str, "what --max_minutes counts: wall-clock, or this process's CPU "
                      "time", ("wall", "cpu"))
    # evals, logs and checkpoints
    eval_interval: int = flag(250, positive_int, "steps between evals (and checkpoints)")
    eval_iters: int = flag(None, positive_int, "batches per split in each eval (default: those "
                           "that hold --eval_tokens)")
    eval_tokens: int = flag(None, positive_int, "tokens per split and eval if no --eval_iters: "
                            "409,600 (GPU), 32,768 (CPU)")
    log_interval: int = flag(10, positive_int, "steps between loss lines")
    keep_every: int = flag(None, positive_int, "also keep ckpt_stepN.pt every N steps (step 0 "
                           "included)")
    # the machine
    device: str = flag("auto", str, "auto (cuda, then mps, then cpu), or e.g. cuda:1")
    dtype: str = flag("auto", str, "auto: bf16 where the GPU or CPU has it (cli.resolve_dtype)",
                      DTYPES)
    compile: bool = flag(None, boolean, "torch.compile the model (default: where it pays, "
                         "compile_by_default)")
    seed: int = flag(1337, int, "seeds the weights, the training windows and dropout (each DDP "
                     "rank its own)")
    resume: bool = flag(False, None, "continue out_dir/ckpt.pt; flags not given take the run's "
                        "own values")


# A resumed run keeps these: the model's Config, and what decides every position's meaning and the
# time.
FIXED_ON_RESUME = ("layout", "clock", *(f.name for f in dataclasses.fields(Config)))


# --------------------------------------------------------------------------------------------- data

@dataclasses.dataclass
class Split:
    """One split's tokens and, for --layout stories, where each story starts (None: packed)."""
    tokens: np.ndarray
    eot: int
    starts: np.ndarray = None


def read_meta(data_dir):
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"no prepared data in {data_dir} (meta.json missing): run python "
                        f"data_prep.py [--out_dir {data_dir}] first")
    return json.loads(path.read_text())


def load_data(data_dir, layout="packed"):
    """({"train": Split, "val": Split}, meta) of a folder written by data_prep.py."""
    meta = read_meta(data_dir)
    splits = {}
    for split in ("train", "val"):
        path = Path(data_dir) / f"{split}.bin"
        expected = meta["tokens"][split] * 2
        if not path.exists() or path.stat().st_size != expected:
            raise UserError(f"{path} is missing or not {expected} bytes as meta.json says: re-run "
                            "data_prep.py with --force")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        starts = story_starts(tokens, meta["eot_token"]) if layout == "stories" else None
        splits[split] = Split(tokens, meta["eot_token"], starts)
    return splits, meta


def story_starts(tokens, eot):
    """Index of every story's first token: 0 and each position after an <|endoftext|>."""
    after_eot = np.flatnonzero(tokens == eot) + 1
    return np.concatenate([[0], after_eot[after_eot < len(tokens)]])


def get_batch(split, block_size, batch_size, rng, device):
    """Inputs and next-token targets [B, T] from rows of block_size + 1 tokens.

    packed: each row is a random window anywhere in the token stream (nanoGPT).
    stories: each row starts at a random story's first token, so position t always means "t tokens
    into a story", which is what the mixer's position-specific weights assume (W[i, j] is learnt
    for output position i and input position j; the paper's layout). After the story's
    <|endoftext|> the row is padding: the end token itself is a target (the model learns to end
    stories), everything after it has target -1 (no loss) and <|endoftext|> as input.
    """
    if split.starts is None:
        if len(split.tokens) <= block_size:
            raise UserError(f"a split has only {len(split.tokens)} tokens, fewer than block_size "
                            f"+ 1 = {block_size + 1}")
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
    if device.type == "cuda":  # pinned: the copy to the GPU overlaps the work queued before it
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------- schedule

@dataclasses.dataclass
class Schedule:
    """Linear warmup over warmup_iters steps, then decay from the peak lr to lr * min_lr_ratio over
    the rest of the budget ("cosine" or "linear"; "constant" stays at the peak)."""
    lr: float
    warmup_iters: int = 0
    min_lr_ratio: float = 0.1
    kind: str = "cosine"

    def lr_at(self, used, step, warmup_end):
        """The lr of step `step`, at `used` of the budget (steps or minutes). The decay runs from
        warmup_end (where warmup ended) to 1: it starts at the peak however long warmup took, and
        ends at the minimum."""
        if step < self.warmup_iters:
            return self.lr * (step + 1) / self.warmup_iters
        min_lr = self.lr * self.min_lr_ratio
        decay = 1.0  # warmup took the whole budget
        if warmup_end < 1:
            decay = min(max((used - warmup_end) / (1 - warmup_end), 0.0), 1.0)
        if self.kind == "cosine":
            return min_lr + 0.5 * (self.lr - min_lr) * (1 + math.cos(math.pi * decay))
        if self.kind == "linear":
            return self.lr - (self.lr - min_lr) * decay
        return self.lr


# ----------------------------------------------------------------------------------------- the step

def train_step(optimizer, scaler, next_loss, lr, ctx, grad_clip=1.0, grad_accum=1, no_sync=None):
    """One optimizer step at lr over grad_accum micro-batches, next_loss() computing each one's loss
    under ctx (the autocast); the fp16 loss scaler and clipping. no_sync: DDP's, so that gradients
    are all-reduced once, after the last micro-batch. Returns the last micro-batch's loss (a
    tensor: no host sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    for micro in range(grad_accum):
        with no_sync() if no_sync and micro < grad_accum - 1 else contextlib.nullcontext():
            with ctx:
                loss = next_loss()
            scaler.scale(loss / grad_accum).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


# --------------------------------------------------------------------------------------------- eval

@torch.no_grad()
def estimate_loss(model, splits, cfg, device, ctx, stop=None, status=None):
    """Mean loss on the same eval_iters batches of each split every time (a fixed seed, the training
    layout): evals are comparable across steps, runs and resumes. Under DDP every rank evaluates
    the same batches and they agree on the mean. None when Ctrl-C came during it."""
    model.eval()
    losses, started, batches = {}, time.time(), len(splits) * cfg.eval_iters
    for n_split, (name, split) in enumerate(splits.items()):
        rng = np.random.default_rng(cfg.seed + 1)
        total = 0.0
        for i in range(cfg.eval_iters):
            if stop is not None and stop.set:
                model.train()
                return None
            x, y = get_batch(split, model.config.block_size, cfg.batch_size, rng, device)
            with ctx:
                total += model(x, y)[1].item()
            if status is not None:
                done = n_split * cfg.eval_iters + i + 1
                status.update(f"eval: batch {done}/{batches} ({time.time() - started:.0f}s)")
        losses[name] = total / cfg.eval_iters
    model.train()
    return same_on_every_rank(losses, device)


# ----------------------------------------------------------------------------------------- the loop

def train(cfg, model_config, ckpt=None):
    """Train a model of model_config as cfg says, from scratch or from ckpt, until the budget ends
    or Ctrl-C."""
    # the processes (one per GPU under torchrun) and the data
    rank, world, device = setup_distributed(cfg.device)
    master, out_dir, ckpt_path = rank == 0, Path(cfg.out_dir), Path(cfg.out_dir) / "ckpt.pt"
    splits, meta = load_data(cfg.data_dir, cfg.layout)
    # model and optimizer; per-rank seeds: each DDP rank draws its own windows and dropout masks
    # (DDP copies rank 0's initial weights to the others, so the init still agrees)
    torch.manual_seed(cfg.seed + rank)
    raw_model = Model(model_config).to(device)
    optimizer = raw_model.make_optimizer(cfg.lr, cfg.weight_decay, device)
    schedule = Schedule(cfg.lr, cfg.warmup_iters, cfg.min_lr_ratio, cfg.lr_schedule)
    budget = Budget(cfg.max_iters, cfg.max_minutes)
    rng = np.random.default_rng(cfg.seed + rank)  # training windows
    state = State() if ckpt is None else restore(ckpt, raw_model, optimizer, rng, rank, world,
                                                  device)
    ctx, scaler, dtype = mixed_precision(device, cfg.dtype)  # autocast, and fp16's loss scaler
    report = Reporter(master, out_dir / "log.csv", cfg, budget, world, device, raw_model)
    report.open(splits, dtype, state.step if ckpt else None)  # log.csv, and what this run is
    compiled = cfg.compile and can_compile(device, report.print)
    model = wrap(raw_model, compiled, world, device)  # compiled and/or DDP
    cpu_clock = time.process_time if cfg.clock == "cpu" else None
    cuda_sync = torch.cuda.synchronize if device.type == "cuda" else None
    clock = Clock(state.elapsed, cuda_sync, cpu_clock)  # training seconds

    def one_step(model, lr):  # one optimizer step on the next training batch(es)
        def next_loss():
            x, y = get_batch(splits["train"], model_config.block_size, cfg.batch_size, rng, device)
            return model(x, y)[1]
        return train_step(optimizer, scaler, next_loss, lr, ctx, cfg.grad_clip, cfg.grad_accum,
                          model.no_sync if world > 1 else None)

    def evaluate():  # under DDP every rank finishes the eval (they agree on Ctrl-C in the loop)
        return estimate_loss(raw_model, splits, cfg, device, ctx, stop if world == 1 else None,
                             report.status if master else None)

    def save(path):  # outside the clock; every rank takes part (RNG states are gathered)
        with clock.paused():
            state.elapsed = clock.seconds()
            save_checkpoint(path, raw_model, optimizer, state, rng, cfg, meta, world, device,
                            write=master)

    step = functools.partial(one_step, model)  # step(lr)
    if compiled:  # its first step is not training time, and falls back to eager if compiling fails
        eager = functools.partial(wrap, raw_model, False, world, device)
        step = FirstStepOutsideTheClock(one_step, model, eager, optimizer, clock, report)
    report.start(state.step, clock.seconds())
    seconds, interrupted = agree(clock, False, world, device)
    with StopFlag() as stop:  # Ctrl-C: stop between steps and save
        while True:
            # the budget and the lr, once per step; under DDP the ranks agree on the clock and on
            # Ctrl-C at log lines and evals only (an all-reduce is a host sync)
            if world == 1 or 0 in (state.step % cfg.log_interval, state.step % cfg.eval_interval):
                seconds, interrupted = agree(clock, stop.set, world, device)
            if interrupted:
                break
            used = budget.used(state.step, seconds)  # 1: the budget is spent
            if state.warmup_end is None and state.step >= cfg.warmup_iters:
                state.warmup_end = used  # the decay runs from here to the end of the budget
            lr = schedule.lr_at(used, state.step, state.warmup_end)
            # evaluate (outside the clock) and checkpoint: when val improves, and at the end
            if state.step % cfg.eval_interval == 0 or used >= 1:
                with clock.paused():
                    started, losses = now(), evaluate()
                interrupted = losses is None  # Ctrl-C during the eval
                if interrupted:
                    break
                if not math.isfinite(losses["val"]):
                    raise diverged(f"val loss is {losses['val']}", state.step, ckpt_path)
                report.eval(state.step, losses, lr, seconds, now() - started)
                if losses["val"] < state.best_val or used >= 1:
                    state.best_val = min(state.best_val, losses["val"])
                    save(ckpt_path)
            if cfg.keep_every and state.step % cfg.keep_every == 0:
                save(out_dir / f"ckpt_step{state.step}.pt")
            if used >= 1:
                break
            # one optimizer step
            loss = step(lr)
            state.step += 1
            # the loss line: .item() waits for the step to finish (a host sync), so only at times
            if report.line_due(state.step):
                loss = loss.item()
                if not math.isfinite(loss):
                    raise diverged(f"loss is {loss}", state.step, ckpt_path)
                report.loss(state.step, loss, lr, clock.seconds())
            else:
                report.status_line(state.step, clock.seconds())
        if interrupted:  # Ctrl-C (on any rank): save the last completed step, without an eval
            save(ckpt_path)  # still inside StopFlag: a second Ctrl-C during this save exits at once
            report.print(f"interrupted at step {state.step}: saved {ckpt_path} (continue with "
                         f"--resume); best val loss {state.best_val:.4f}")
    if not interrupted:
        report.print(f"done at step {state.step}: best val loss {state.best_val:.4f}; saved "
                     f"{ckpt_path}")
    if world > 1:
        dist.barrier()  # no rank tears its connections down while another still uses them
        dist.destroy_process_group()
    return {"out_dir": out_dir, "step": state.step, "best_val": state.best_val,
            "interrupted": interrupted}


# ------------- Part 2, which a learner may skip: the first compiled step, clock, budget, reports,
# ------------- checkpoints, DDP, Ctrl-C, compile and the command line

now = time.perf_counter  # the clock of every training-time measurement (a test replaces it)


class FirstStepOutsideTheClock:
    """The loop's step(lr) with a compiled model. Its first call runs outside the clock, since graph
    capture and compilation (10-40 s) are not training; if compiling fails, the run says so in one
    line and trains eager (eager() builds that model) from then on."""

    def __init__(self, one_step, model, eager, optimizer, clock, report):
        self.one_step, self.model, self.eager, self.first = one_step, model, eager, True
        self.optimizer, self.clock, self.report = optimizer, clock, report

    def __call__(self, lr):
        if not self.first:
            return self.one_step(self.model, lr)
        self.first = False
        with self.clock.paused():
            started = now()
            try:
                loss = self.one_step(self.model, lr)
            except torch._dynamo.exc.TorchDynamoException as e:
                reason = str(e).splitlines()[0][:100]
                self.report.print(f"compile: failed ({reason}); training eager")
                self.optimizer.zero_grad(set_to_none=True)
                self.model = self.eager()
                return self.one_step(self.model, lr)
        self.report.print(f"compile: the first step took {now() - started:.1f}s (graph capture and "
                          "compilation), not counted in the time budget or tokens/s")
        return loss


class Clock:
    """Training seconds: time outside paused() blocks (evals, saves, the first compiled step), so
    an equal --max_minutes is equal training for every arch. sync (CUDA) waits for queued work at
    each pause, so that work counts where it ran. source: now, or time.process_time (--clock
    cpu)."""

    def __init__(self, trained_s=0.0, sync=None, source=None):
        self.source, self.sync = source or (lambda: now()), sync or (lambda: None)
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
        """The fraction of the budget used: the lr schedule's clock; 1 = finished."""
        by_time = seconds / 60 / self.max_minutes if self.max_minutes else 0.0
        return max(step / self.max_iters, by_time)

    def time_ends_first(self, step, seconds, step_s):
        steps_in_time = (self.max_minutes * 60 - seconds) / step_s if self.max_minutes else math.inf
        return steps_in_time < self.max_iters - step

    def left(self, step, seconds, step_s, eval_interval):
        """(seconds of training left, evals left counting the final one), at step_s seconds a
        step."""
        train_s = (self.max_iters - step) * step_s
        if self.max_minutes:
            train_s = min(train_s, max(self.max_minutes * 60 - seconds, 0.0))
        return train_s, int(train_s / step_s) // eval_interval + 1


@dataclasses.dataclass
class State:
    """Where a run is: what its checkpoints hold besides weights, optimizer and RNG states."""
    step: int = 0
    best_val: float = math.inf
    elapsed: float = 0.0      # training seconds (Clock) at the last save
    warmup_end: float = None  # the fraction of the budget used when warmup ended


# ------------------------------------------------------------------------------------------ reports

def duration(seconds):
    """12s, 8m32s, 21h06m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def cost_lines(budget, eval_interval, step, seconds, step_s, eval_s, tokens_per_step, device):
    """What the run will cost at the measured pace; on a CPU-only machine, over an hour, where to
    find faster settings."""
    train_s, evals = budget.left(step, seconds, step_s, eval_interval)
    if budget.time_ends_first(step, seconds, step_s):
        what = f"--max_minutes {budget.max_minutes:g}"
    else:
        what = f"{budget.max_iters:,} steps"
    steps = int(train_s / step_s)
    lines = [f"cost: {step_s * 1000:,.0f} ms/step, so {what} = {steps:,} more steps "
             f"({steps * tokens_per_step / 1e6:,.1f}M tokens) in {duration(train_s)}, plus {evals} "
             f"evals of {duration(eval_s)}: about {duration(train_s + evals * eval_s)} in all"]
    cpu_only = device.type == "cpu" and not torch.cuda.is_available() \
        and not torch.backends.mps.is_available()
    if cpu_only and train_s + evals * eval_s > 3600:
        lines.append("no GPU here: for a run of minutes on this CPU, use the CPU settings of the "
                     "README's Quick start")
    return lines


LOG_FIELDS = ["step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_s", "mfu",
              "peak_mem_mb", "elapsed_s"]
WARM_STEPS = 2  # the pace skips a process's first steps (allocator, caches), as nanoGPT's MFU does


class Reporter:
    """Every line a run prints and every row of log.csv, on rank 0 only: a loss line every
    log_interval steps (or 30 s), pace and time left on a status line between; paces in training
    seconds, measured from this process's WARM_STEPS-th step on."""

    def __init__(self, master, log_path, cfg, budget, world, device, model):
        self.master, self.log_path, self.cfg, self.budget = master, log_path, cfg, budget
        self.device, self.model, self.peak = device, model, peak_flops(device)
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * model.config.block_size * world
        self.status = Progress(log_every=30, quiet_first=True)
        self.eval_s, self.steps_seen, self.cost_said = 0.0, 0, False

    def open(self, splits, dtype, resumed_at):
        """Start log.csv (on resume: its rows before the resume step; the others are redone) and say
        what this run is."""
        if not self.master:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resumed_at and self.log_path.exists():
            with open(self.log_path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < resumed_at]
        with AtomicFile(self.log_path, "w", newline="") as f:
            writer = csv.DictWriter(f, LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        config, cfg = self.model.config, self.cfg
        self.print(f"{config.arch}: {self.model.num_params() / 1e6:.2f}M parameters, "
                   f"{self.tokens_per_step:,} tokens/step, device {self.device}, {dtype}, layout "
                   f"{cfg.layout}, evals of {cfg.eval_iters} batches per split"
                   + (f", resuming at step {resumed_at}" if resumed_at is not None else ""))
        if cfg.layout == "stories":
            _, y = get_batch(splits["train"], config.block_size, 1024, np.random.default_rng(0),
                             torch.device("cpu"))
            padding = (y == -1).float().mean().item()
            self.print(f"stories layout: {len(splits['train'].starts):,} train stories; "
                       f"{padding:.0%} of the positions are padding after a story's end at "
                       f"block_size {config.block_size}")

    def print(self, *lines):
        if self.master:
            self.status.clear()
            print(*lines, sep="\n", flush=True)

    def start(self, step, seconds):
        """Where this process starts: the pace and tokens/s count from its WARM_STEPS-th step."""
        self.since = self.pace_mark = (step, seconds)
        self.line_time = now()

    def line_due(self, step):
        return step % self.cfg.log_interval == 0 or now() - self.line_time >= 30

    def step_s(self, step, seconds):
        """Seconds a step since the pace mark (None during the first WARM_STEPS steps)."""
        self.steps_seen += 1
        if self.steps_seen == WARM_STEPS:
            self.pace_mark = (step, seconds)
            self.since = max(self.since, self.pace_mark)  # tokens/s too, unless an eval came later
        if self.steps_seen <= WARM_STEPS:
            return None
        step_s = max(seconds - self.pace_mark[1], 1e-9) / (step - self.pace_mark[0])
        timed = self.steps_seen - WARM_STEPS
        if not self.cost_said and (timed == 3 or now() - self.line_time >= 20):
            self.cost_said = True  # the first timed steps: say what the whole run will cost
            self.print(*cost_lines(self.budget, self.cfg.eval_interval, step, seconds, step_s,
                                   self.eval_s, self.tokens_per_step, self.device))
        return step_s

    def where(self, step, seconds, step_s):
        """'step 120/5000: 85 ms/step, 7m02s left' (or the minutes, where time ends first)."""
        if step_s is None:
            return f"step {step}/{self.budget.max_iters}"
        train_left, evals_left = self.budget.left(step, seconds, step_s, self.cfg.eval_interval)
        eta = f"{step_s * 1000:.0f} ms/step, {duration(train_left + evals_left * self.eval_s)} left"
        if self.budget.time_ends_first(step, seconds, step_s):
            return f"step {step} ({seconds / 60:.1f}/{self.budget.max_minutes:g} min): {eta}"
        return f"step {step}/{self.budget.max_iters}: {eta}"

    def status_line(self, step, seconds):
        """After a step without a loss line: the status line (rewritten in place on a terminal)."""
        text = self.where(step, seconds, self.step_s(step, seconds))
        if self.master:
            self.status.update(text)

    def loss(self, step, loss, lr, seconds):
        where, _, eta = self.where(step, seconds, self.step_s(step, seconds)).partition(": ")
        if self.master:
            self.status.done(f"{where}: loss {loss:.4f}, lr {lr:.2e}" + (f", {eta}" if eta else ""))
        self.line_time = now()

    def eval(self, step, losses, lr, seconds, eval_s):
        """One eval: its line and its log.csv row (tokens/s over the training time since the last
        eval, or since the pace mark)."""
        steps, trained = step - self.since[0], seconds - self.since[1]
        self.eval_s, self.since, self.line_time = eval_s, (step, seconds), now()
        tokens_per_s = steps * self.tokens_per_step / trained if steps and trained > 0 else None
        flops = self.model.flops_per_token()
        mfu = tokens_per_s * flops / self.peak if tokens_per_s and self.peak else None
        peak_mem = torch.cuda.max_memory_allocated(self.device) / 2**20 \
            if self.device.type == "cuda" else None
        row = {"step": step, "tokens": step * self.tokens_per_step,
               "train_loss": f"{losses['train']:.4f}", "val_loss": f"{losses['val']:.4f}",
               "lr": f"{lr:.3e}", "tokens_per_s": f"{tokens_per_s:.0f}" if tokens_per_s else "",
               "mfu": f"{mfu:.3f}" if mfu else "",
               "peak_mem_mb": f"{peak_mem:.0f}" if peak_mem else "", "elapsed_s": f"{seconds:.3f}"}
        self.print(f"eval step {step}: train {row['train_loss']}, val {row['val_loss']}, "
                   f"{row['tokens']:,} tokens"
                   + (f", {row['tokens_per_s']} tokens/s" if tokens_per_s else "")
                   + (f", MFU {mfu:.1%}" if mfu else "")
                   + (f", peak mem {row['peak_mem_mb']} MB" if peak_mem else ""))
        if self.master:  # a whole row at a time, synced: an interrupted run keeps every one
            with open(self.log_path, "a", newline="") as f:
                csv.DictWriter(f, LOG_FIELDS).writerow(row)
                f.flush()
                os.fsync(f.fileno())


# -------------------------------------------------------------------------------------- checkpoints

def diverged(what, step, ckpt_path):
    """The error for a run that blew up: it is not saved, so ckpt_path keeps the last good state."""
    return UserError(f"{what} at step {step}: not saving; {ckpt_path} keeps the last good state "
                     "(lower --lr or raise --warmup_iters)")


def save_checkpoint(path, model, optimizer, state, rng, cfg, meta, world, device, write):
    """A checkpoint of this moment, written atomically where write (rank 0). Every rank calls it:
    the RNG states of all ranks are gathered, so that a resume replays every rank's batches."""
    rng_state = {"numpy": rng.bit_generator.state,  # the training windows
                 "torch": torch.get_rng_state(),  # dropout
                 "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    rng_states = [rng_state]
    if world > 1:
        rng_states = [None] * world
        dist.all_gather_object(rng_states, rng_state)
    if not write:
        return
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise diverged("weights are not finite", state.step, path)
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "config": dataclasses.asdict(model.config), **dataclasses.asdict(state),
                 "data_meta": meta, "train_args": dataclasses.asdict(cfg), "rng": rng_states}, path)


def restore(ckpt, model, optimizer, rng, rank, world, device):
    """Load a checkpoint's weights, optimizer and this rank's RNG states (training replays
    exactly): its State."""
    if len(ckpt["rng"]) != world:
        raise UserError(f"the checkpoint was written by {len(ckpt['rng'])} processes: resume with "
                        "the same number (torchrun --nproc_per_node) to replay the same batches")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    saved = ckpt["rng"][rank]
    rng.bit_generator.state = saved["numpy"]
    torch.set_rng_state(saved["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(saved["cuda"], device)
    return State(ckpt["step"], ckpt["best_val"], ckpt["elapsed"], ckpt.get("warmup_end"))


# -------------------------------------------------------------------------------------- DDP, Ctrl-C

def setup_distributed(device):
    """(rank, world_size, device). Under torchrun: DDP, one process per GPU; else one process."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device)
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def wrap(model, compile, world, device):
    """The model as trained: torch.compile'd and/or wrapped for DDP."""
    model = torch.compile(model) if compile else model
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def agree(clock, interrupted, world, device):
    """(training seconds, interrupted) as every rank sees them: under DDP the slowest rank's clock
    and anyone's Ctrl-C, so that all ranks stop at the same step with the same lr."""
    if world == 1:
        return clock.seconds(), interrupted
    both = torch.tensor([clock.seconds(), float(interrupted)], dtype=torch.float64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return both[0].item(), bool(both[1].item())


def same_on_every_rank(losses, device):
    """{split: loss} averaged over the DDP ranks (each computed it on the same batches), so that
    every rank takes the same decisions from it (improved, save); as it is in one process."""
    if not dist.is_initialized():
        return losses
    values = torch.tensor(list(losses.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(losses, (values / dist.get_world_size()).tolist()))


class StopFlag:
    """Set by Ctrl-C (SIGINT/SIGTERM) while active; the loop stops between steps (or between eval
    batches), so the saved state is consistent. A second Ctrl-C exits at once: ckpt.pt is then the
    last one written, whole (writes are atomic). The previous handlers come back on exit."""

    def __enter__(self):
        self.set = False
        self.previous = {sig: signal.signal(sig, self.handle)
                         for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.set:
            os.write(2, b"\nsecond Ctrl-C: exiting now; the last checkpoint written stays as it "
                        b"is\n")
            os._exit(130)
        self.set = True  # os.write, not print: a handler that prints while the loop prints raises
        os.write(2, b"\nCtrl-C: saving the last completed step, then exiting (Ctrl-C again to exit "
                    b"at once)\n")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------- compile, MFU

def c_compiler():
    """The C++ compiler torch.compile would use on the CPU (None: there is none)."""
    compilers = (os.environ.get("CXX", ""), "g++", "clang++", "c++")
    return next(filter(None, (shutil.which(cc) for cc in compilers)), None)


def compile_by_default(device, dtype):
    """Whether --compile is on when not given: where it pays. On a GPU, and on a CPU that trains in
    bf16 (AMX, AVX512-BF16: compile fuses autocast's casts, 1.45-1.88x, RESULTS.md section 9). Not
    where a CPU trains in float32 (no bf16 hardware, or --dtype float32): there it gained 0-7% and
    its first step costs about 33 s, repaid only after 8-19 minutes of training (RESULTS.md section
    10)."""
    bf16_cpu = device.type == "cpu" and resolve_dtype(device, dtype) != "float32"
    return device.type == "cuda" or bf16_cpu


def can_compile(device, say):
    """Whether torch.compile can work on device (it needs CUDA, or a C++ compiler on the CPU);
    where it cannot, say(why) once: the run trains eager."""
    problem = None
    if device.type == "mps":
        problem = "not supported on mps"
    elif device.type == "cpu" and c_compiler() is None:
        problem = "no C++ compiler found (g++ or clang++) for this CPU"
    if problem:
        say(f"compile: {problem}; training eager (--compile false hides this line)")
    return problem is None


# Dense bf16 tensor-core peaks (FLOP/s) for MFU; unknown devices report no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
              "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "RTX 3060": 51e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


# --------------------------------------------------------------------------------- the command line

def parse_args(argv=None):
    """(TrainConfig, mixer.Config, checkpoint to resume or None) of the defaults, the run's own
    values and the flags given, in that order."""
    given, model_given = parse_flags(argv)
    out_dir = Path(given.get("out_dir") or f"out-{model_given.get('arch', 'mixer')}")
    ckpt = open_run(out_dir, given.get("resume", False))
    saved = {}  # the run's own values (an older checkpoint's train_args may hold more)
    if ckpt is not None:
        saved = {name: value for name, value in ckpt["train_args"].items() if name in TRAIN_FIELDS
                 and name not in ("out_dir", "device", "resume") and value is not None}
        model_config = Config(**ckpt["config"])  # the model cannot change on resume
        check_resume(out_dir / "ckpt.pt", given, model_given, saved, model_config)
    settings = {**TRAIN_DEFAULTS, **saved, **given, "out_dir": str(out_dir)}
    vocab_size = read_meta(settings["data_dir"])["vocab_size"]
    if ckpt is None:  # the vocabulary padded to a multiple of 64: faster matmuls
        refuse_flags_without_effect(model_given)
        model_config = config_from_flags(argparse.Namespace(**model_given),
                                         vocab_size=64 * math.ceil(vocab_size / 64))
    elif ckpt["data_meta"]["vocab_size"] != vocab_size:
        raise UserError(f"checkpoint was trained on a {ckpt['data_meta']['vocab_size']}-token "
                        f"vocabulary but --data_dir has {vocab_size}: use data prepared with the "
                        "same --vocab_size")
    # the values decided for this run, kept on --resume: its eval batches (so that evals stay
    # comparable) and compile
    device = pick_device(settings["device"])
    eval_tokens = settings["eval_tokens"] or (32_768 if device.type == "cpu" else 409_600)
    if settings["eval_iters"] is None:
        rows = settings["batch_size"] * model_config.block_size
        settings["eval_iters"] = max(1, round(eval_tokens / rows))
    if settings["compile"] is None:
        settings["compile"] = compile_by_default(device, settings["dtype"])
    return TrainConfig(**settings), model_config, ckpt


def open_run(out_dir, resume):
    """The checkpoint to resume (None for a new run), with every check that can fail before work
    starts."""
    check_folder(out_dir, "--out_dir")
    ckpt_path = out_dir / "ckpt.pt"
    if resume and not ckpt_path.exists():
        raise UserError(f"--resume: no checkpoint at {ckpt_path}")
    if not resume and ckpt_path.exists():
        raise UserError(f"{ckpt_path} exists: pass --resume to continue it, or choose another "
                        "--out_dir")
    if not resume:
        return None
    needs = ("model", "config", "data_meta", "optimizer", "step", "rng")
    return load_checkpoint(ckpt_path, needs=needs)


def check_resume(ckpt_path, given, model_given, saved, model_config):
    """A resume keeps the model and FIXED_ON_RESUME: a flag given with another value, or one without
    effect on the checkpoint's arch, is refused."""
    if model_given.get("arch", model_config.arch) == model_config.arch:  # (another --arch: below)
        refuse_flags_without_effect(model_given, model_config.arch, ckpt_path)
    trained_with = {**TRAIN_DEFAULTS, **saved, **dataclasses.asdict(model_config)}
    for name, value in {**given, **model_given}.items():
        if name in FIXED_ON_RESUME and value != trained_with[name]:
            raise UserError(f"{ckpt_path} was trained with --{name} {trained_with[name]}, not "
                            f"--{name} {value}: drop the flag to resume it, or train into a new "
                            "--out_dir")


def refuse_flags_without_effect(given, arch=None, checkpoint=None):
    """given: {model field: value} of the flags given. A flag that means nothing to the arch
    trained (its --arch, or that of the checkpoint resumed, named in the message) is a mistake the
    user should hear about, not a silent no-op."""
    arch = arch or given.get("arch", Config.arch)
    for name in WITHOUT_EFFECT[arch]:
        if name in given:
            whose = f" (the arch of {checkpoint})" if checkpoint else ""
            applies = " and ".join(a for a in ARCHS if name not in WITHOUT_EFFECT[a])
            raise UserError(f"--{name} has no effect on --arch {arch}{whose}: drop it (it applies "
                            f"to {applies})")


TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TRAIN_DEFAULTS = {name: f.default for name, f in TRAIN_FIELDS.items()}


def parse_flags(argv, exit_on_error=True):
    """({TrainConfig field: value}, {mixer.Config field: value}) of the flags given, nothing
    else."""
    given = vars(build_parser(exit_on_error).parse_args(argv))  # every default is argparse.SUPPRESS
    return given, {f.name: given.pop(f.name) for f in dataclasses.fields(Config) if f.name in given}


def build_parser(exit_on_error=True):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                argument_default=argparse.SUPPRESS, exit_on_error=exit_on_error)
    add_model_flags(p, skip=("vocab_size", "causal"))
    add_config_flags(p, TrainConfig, "training (TrainConfig)")
    return p


def main(argv=None):
    return run("train.py", lambda argv: train(*parse_args(argv)), argv)


if __name__ == "__main__":
    main()
