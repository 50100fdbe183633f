"""
Train a masked mixer, transformer or hybrid on tokens from data_prep.py, nanoGPT style.

    python train.py --arch mixer                                 # one GPU, or the CPU
    python train.py --arch transformer --max_minutes 60          # equal wall-clock comparisons
    python train.py --arch mixer --resume                        # continue out-mixer/ckpt.pt exactly
    torchrun --standalone --nproc_per_node 8 train.py --arch mixer   # DDP on several GPUs

Each eval prints and appends to out_dir/log.csv (losses, tokens/s, MFU, memory). out_dir/ckpt.pt is
written atomically when val loss improves, at the end, and on Ctrl-C (a second Ctrl-C exits at once).

Part 1 reads top-down: the config, data, schedule, step, eval and the loop. Part 2, after the separator,
is the machinery a learner may skip: clock, budget, the cost line, log.csv, checkpoints, DDP, flags.
"""
import argparse
import contextlib
import csv
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cli import (DTYPES, HelpFormatter, Progress, StopFlag, UserError, add_config_flags, add_model_flags, agree, atomic_save,
                 boolean, can_compile, compile_by_default, config_from_flags, duration, flag, load_checkpoint,
                 mixed_precision, nonneg_float, nonneg_int, peak_flops, pick_device, positive_float, positive_int,
                 refuse_flags_without_effect, run, setup_distributed, unit_interval, wrap)
from mixer import Config, Model


# ---------------------------------------------------------------------------------------- the config

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every training setting, one flag each (the model's are mixer.Config's); built once by parse_args."""
    # data and output
    data_dir: str = flag("data/tinystories", str, "a folder written by data_prep.py")
    out_dir: str = flag(None, str, "where ckpt.pt and log.csv go (default: out-ARCH)")
    layout: str = flag("packed", str, "packed: rows anywhere in the text (nanoGPT); stories: each row a story", ("packed", "stories"))
    # optimisation
    batch_size: int = flag(16, positive_int, "sequences per micro-batch (per GPU)")
    grad_accum: int = flag(1, positive_int, "micro-batches per optimizer step")
    lr: float = flag(5e-4, positive_float, "peak learning rate (the paper's mixer value, for every arch)")
    min_lr_ratio: float = flag(0.1, unit_interval, "final lr as a fraction of --lr")
    lr_schedule: str = flag("cosine", str, "the decay after warmup", ("cosine", "linear", "constant"))
    warmup_iters: int = flag(200, nonneg_int, "steps of linear warmup")
    weight_decay: float = flag(0.1, nonneg_float, "AdamW's, on matrices only (Model.make_optimizer)")
    grad_clip: float = flag(1.0, nonneg_float, "max gradient norm; 0 disables")
    # budget: whichever ends first; the lr schedule runs over it
    max_iters: int = flag(5000, positive_int, "step budget")
    max_minutes: float = flag(None, positive_float, "time budget (training time: evals and saves excluded)")
    clock: str = flag("wall", str, "what --max_minutes counts: wall-clock, or this process's CPU time", ("wall", "cpu"))
    # evals, logs and checkpoints
    eval_interval: int = flag(250, positive_int, "steps between evals (and checkpoints)")
    eval_iters: int = flag(None, positive_int, "batches per split in each eval (default: those that hold --eval_tokens)")
    eval_tokens: int = flag(None, positive_int, "tokens per split and eval if no --eval_iters: 409,600 (GPU), 32,768 (CPU)")
    log_interval: int = flag(10, positive_int, "steps between loss lines")
    keep_every: int = flag(None, positive_int, "also keep ckpt_stepN.pt every N steps (step 0 included)")
    # the machine
    device: str = flag("auto", str, "auto (cuda, then mps, then cpu), or e.g. cuda:1")
    dtype: str = flag("auto", str, "auto: bf16 where the GPU or CPU has it (cli.resolve_dtype)", DTYPES)
    compile: bool = flag(None, boolean, "torch.compile the model (default: where it pays, cli.compile_by_default)")
    seed: int = flag(1337, int, "seeds the weights, the training windows and dropout (each DDP rank its own)")
    resume: bool = flag(False, None, "continue out_dir/ckpt.pt; flags not given take the run's own values")


# A resumed run keeps these: the model's Config and what decides every position's meaning and the time.
FIXED_ON_RESUME = ("layout", "clock", *(f.name for f in dataclasses.fields(Config)))


# ---------------------------------------------------------------------------------------- data

@dataclasses.dataclass
class Split:
    """One split's tokens and, for --layout stories, where each story starts (None: packed)."""
    tokens: np.ndarray
    eot: int
    starts: np.ndarray = None


def read_meta(data_dir):
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"no prepared data in {data_dir} (meta.json missing): run python data_prep.py "
                        f"[--out_dir {data_dir}] first")
    return json.loads(path.read_text())


def load_data(data_dir, layout="packed"):
    """({"train": Split, "val": Split}, meta) of a folder written by data_prep.py."""
    meta = read_meta(data_dir)
    splits = {}
    for split in ("train", "val"):
        path = Path(data_dir) / f"{split}.bin"
        expected = meta["tokens"][split] * 2
        if not path.exists() or path.stat().st_size != expected:
            raise UserError(f"{path} is missing or not {expected} bytes as meta.json says: re-run data_prep.py with --force")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        splits[split] = Split(tokens, meta["eot_token"], story_starts(tokens, meta["eot_token"]) if layout == "stories" else None)
    return splits, meta


def story_starts(tokens, eot):
    """Index of every story's first token: 0 and each position after an <|endoftext|>."""
    after_eot = np.flatnonzero(tokens == eot) + 1
    return np.concatenate([[0], after_eot[after_eot < len(tokens)]])


def get_batch(split, block_size, batch_size, rng, device):
    """Inputs and next-token targets [B, T] from rows of block_size + 1 tokens. packed: each row is a
    random window anywhere in the token stream (nanoGPT). stories: each row starts at a random story's
    first token, so position t always means "t tokens into a story" (the paper's layout); after the
    story's <|endoftext|> (itself a target) the row is padding: input <|endoftext|>, target -1 (no loss)."""
    if split.starts is None:
        if len(split.tokens) <= block_size:
            raise UserError(f"a split has only {len(split.tokens)} tokens, fewer than block_size + 1 = {block_size + 1}")
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


# ---------------------------------------------------------------------------------------- schedule

@dataclasses.dataclass
class Schedule:
    """Linear warmup over warmup_iters steps, then decay from the peak lr to lr * min_lr_ratio over the
    rest of the budget ("cosine" or "linear"; "constant" stays at the peak)."""
    lr: float
    warmup_iters: int = 0
    min_lr_ratio: float = 0.1
    kind: str = "cosine"

    def lr_at(self, used, step, warmup_end):
        """The lr of step `step`, at `used` of the budget (steps or minutes). The decay runs from warmup_end
        (where warmup ended) to 1: it starts at the peak however long warmup took, and ends at the minimum."""
        if step < self.warmup_iters:
            return self.lr * (step + 1) / self.warmup_iters
        min_lr = self.lr * self.min_lr_ratio
        decay = min(max((used - warmup_end) / (1 - warmup_end), 0.0), 1.0) if warmup_end < 1 else 1.0
        if self.kind == "cosine":
            return min_lr + 0.5 * (self.lr - min_lr) * (1 + math.cos(math.pi * decay))
        if self.kind == "linear":
            return self.lr - (self.lr - min_lr) * decay
        return self.lr


# ---------------------------------------------------------------------------------------- the step

def train_step(optimizer, scaler, next_loss, lr, ctx, grad_clip=1.0, grad_accum=1, no_sync=None):
    """One optimizer step at lr over grad_accum micro-batches, next_loss() computing each one's loss under
    ctx (the autocast); the fp16 loss scaler and clipping. no_sync: DDP's, so that gradients are all-reduced
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


# ---------------------------------------------------------------------------------------- eval

@torch.no_grad()
def estimate_loss(model, splits, cfg, device, ctx, stop=None, status=None):
    """Mean loss on the same eval_iters batches of each split every time (a fixed seed, the training
    layout): evals are comparable across steps, runs and resumes. None when Ctrl-C came during it."""
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
                status.update(f"eval: batch {n_split * cfg.eval_iters + i + 1}/{batches} ({time.time() - started:.0f}s)")
        losses[name] = total / cfg.eval_iters
    model.train()
    return losses


# ---------------------------------------------------------------------------------------- the loop

def train(cfg, config, ckpt=None):
    """Train a model of `config` as cfg says, from scratch or from ckpt, until the budget ends or Ctrl-C."""
    # the processes (one per GPU under torchrun) and the data
    rank, world, device = setup_distributed(cfg.device)
    master, out_dir, ckpt_path = rank == 0, Path(cfg.out_dir), Path(cfg.out_dir) / "ckpt.pt"
    splits, meta = load_data(cfg.data_dir, cfg.layout)
    # model and optimizer; per-rank seeds: each DDP rank draws its own windows and dropout masks (DDP
    # copies rank 0's initial weights to the others, so the init still agrees)
    torch.manual_seed(cfg.seed + rank)
    raw_model = Model(config).to(device)
    optimizer = raw_model.make_optimizer(cfg.lr, cfg.weight_decay, device)
    schedule = Schedule(cfg.lr, cfg.warmup_iters, cfg.min_lr_ratio, cfg.lr_schedule)
    budget = Budget(cfg.max_iters, cfg.max_minutes)
    rng = np.random.default_rng(cfg.seed + rank)  # training windows
    state = State() if ckpt is None else restore(ckpt, raw_model, optimizer, rng, rank, world, device)
    ctx, scaler, dtype = mixed_precision(device, cfg.dtype)  # autocast, and fp16's loss scaler
    tokens_per_step = cfg.batch_size * cfg.grad_accum * config.block_size * world
    report = Reporter(master, out_dir / "log.csv", cfg, budget, tokens_per_step, device, raw_model)
    report.open(splits, dtype, state.step if ckpt else None)  # log.csv, and what this run is
    compile_pending = cfg.compile and can_compile(device, report.print)
    model = wrap(raw_model, compile_pending, world, device)  # compiled and/or DDP
    clock = Clock(state.elapsed, torch.cuda.synchronize if device.type == "cuda" else lambda: None,
                  time.process_time if cfg.clock == "cpu" else None)

    def save(path, write=True):  # every rank takes part (their RNG states are gathered); rank 0 writes
        with clock.paused():
            state.elapsed = clock.seconds()
            save_checkpoint(path, raw_model, optimizer, state, rng, cfg, meta, world, device, write=master and write)

    def one_step(model, lr):  # on the next training batch
        def next_loss():
            return model(*get_batch(splits["train"], config.block_size, cfg.batch_size, rng, device))[1]
        return train_step(optimizer, scaler, next_loss, lr, ctx, cfg.grad_clip, cfg.grad_accum,
                          model.no_sync if world > 1 else None)

    report.start(state.step, clock.seconds())
    seconds, interrupted = agree(clock, False, world, device)
    with StopFlag() as stop:  # Ctrl-C: stop between steps and save (cli.StopFlag)
        while True:
            # under DDP the ranks agree on the clock and on Ctrl-C at log lines and evals, not at every
            # step (an all-reduce is a host sync): all of them stop at the same step, with the same lr
            if world == 1 or state.step % cfg.log_interval == 0 or state.step % cfg.eval_interval == 0:
                seconds, interrupted = agree(clock, stop.set, world, device)
            if interrupted:
                break
            # where the budget stands, and when warmup ended (the decay runs from there)
            used = budget.used(state.step, seconds)
            if state.warmup_end is None and state.step >= cfg.warmup_iters:
                state.warmup_end = used
            finished = used >= 1
            # evaluate (outside the clock), log, and save when val improved or at the end
            if state.step % cfg.eval_interval == 0 or finished:
                with clock.paused():
                    started = now()
                    losses = estimate_loss(raw_model, splits, cfg, device, ctx, stop if world == 1 else None,
                                           report.status if master else None)
                    if losses is None:  # Ctrl-C during the eval (one process cuts it short; DDP ranks finish it)
                        interrupted = True
                        break
                    if not math.isfinite(losses["val"]):
                        raise diverged(f"val loss is {losses['val']}", state.step, ckpt_path)
                    improved = losses["val"] < state.best_val
                    state.best_val = min(state.best_val, losses["val"])
                    seconds = clock.seconds()
                    lr = schedule.lr_at(budget.used(state.step, seconds), state.step, state.warmup_end)
                    report.eval(state.step, losses, lr, seconds, now() - started)
                    save(ckpt_path, write=improved or finished)
            if cfg.keep_every and state.step % cfg.keep_every == 0:
                save(out_dir / f"ckpt_step{state.step}.pt")
            if finished:
                break
            # one optimizer step; the first compiled one outside the clock, and eager if compiling fails
            lr = schedule.lr_at(used, state.step, state.warmup_end)
            if not compile_pending:
                loss = one_step(model, lr)
            else:
                with clock.paused():
                    started = now()
                    try:
                        loss = one_step(model, lr)
                    except torch._dynamo.exc.TorchDynamoException as e:
                        report.print(f"compile: failed ({str(e).splitlines()[0][:100]}); training eager")
                        optimizer.zero_grad(set_to_none=True)
                        model = wrap(raw_model, False, world, device)
                        loss = one_step(model, lr)
                compile_pending = False
                report.start(state.step + 1, clock.seconds(), compile_s=now() - started)
            state.step += 1
            # the loss line (a host sync, so only every log_interval steps), pace and time left
            report.step(state.step, loss, lr, clock.seconds())
        if interrupted:  # Ctrl-C (on any rank): keep the last completed step, without an eval on the way out
            save(ckpt_path)  # still inside StopFlag: a second Ctrl-C during this save exits at once
            report.print(f"interrupted at step {state.step}: saved {ckpt_path} (continue with --resume); "
                         f"best val loss {state.best_val:.4f}")
    if not interrupted:
        report.print(f"done at step {state.step}: best val loss {state.best_val:.4f}; saved {ckpt_path}")
    if world > 1:
        dist.barrier()  # no rank tears its connections down while another still writes or talks to it
        dist.destroy_process_group()
    return {"out_dir": out_dir, "step": state.step, "best_val": state.best_val, "interrupted": interrupted}


# ---------------------------------------- Part 2, which a learner may skip: clock, budget, reports, checkpoints, DDP

now = time.perf_counter  # the clock of every training-time measurement (a test replaces it with a fake one)


class Clock:
    """Training seconds: time outside paused() blocks (evals, saves, the first compiled step): an equal --max_minutes
    is equal training for every arch. sync (CUDA) waits for queued work at each pause, so that work counts where it
    ran. source: now, or time.process_time (--clock cpu)."""

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

    def used(self, step, seconds):  # the fraction of the budget used: the lr schedule's clock; 1 = finished
        return max(step / self.max_iters, seconds / 60 / self.max_minutes if self.max_minutes else 0.0)

    def time_ends_first(self, step, seconds, step_s):
        return bool(self.max_minutes) and (self.max_minutes * 60 - seconds) / step_s < self.max_iters - step

    def left(self, step, seconds, step_s, eval_interval):
        """(seconds of training left, evals left, counting the final one) at step_s seconds a step."""
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


def cost_lines(budget, eval_interval, step, seconds, step_s, eval_s, tokens_per_step, device):
    """What the run will cost at the measured pace; on a CPU-only machine, over an hour, where to find faster settings."""
    train_s, evals = budget.left(step, seconds, step_s, eval_interval)
    what = f"--max_minutes {budget.max_minutes:g}" if budget.time_ends_first(step, seconds, step_s) \
        else f"{budget.max_iters:,} steps"
    steps = int(train_s / step_s)
    lines = [f"cost: {step_s * 1000:,.0f} ms/step, so {what} = {steps:,} more steps ({steps * tokens_per_step / 1e6:,.1f}M "
             f"tokens) in {duration(train_s)}, plus {evals} evals of {duration(eval_s)}: about "
             f"{duration(train_s + evals * eval_s)} in all"]
    cpu_only = device.type == "cpu" and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    if cpu_only and train_s + evals * eval_s > 3600:
        lines.append("no GPU here: for a run of minutes on this CPU, use the CPU settings of the README's Quick start")
    return lines


LOG_FIELDS = ["step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_s", "mfu", "peak_mem_mb", "elapsed_s"]


class Reporter:
    """Every line a run prints and every row of log.csv, on rank 0 only (other ranks only check the loss): a loss line
    every log_interval steps (or 30 s), pace and time left on a status line between; paces in training seconds."""

    def __init__(self, master, log_path, cfg, budget, tokens_per_step, device, model):
        self.master, self.log_path, self.cfg, self.budget, self.device, self.model = master, log_path, cfg, budget, device, model
        self.tokens_per_step, self.peak = tokens_per_step, peak_flops(device)
        self.status = Progress(log_every=30, quiet_first=True)
        self.eval_s, self.timed_steps, self.eval_mark = 0.0, 0, None

    def open(self, splits, dtype, resumed_at):
        """Start log.csv (on resume: its rows before the resume step; the others are redone) and say what
        this run is."""
        if not self.master:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resumed_at and self.log_path.exists():
            with open(self.log_path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < resumed_at]
        with open(self.log_path, "w", newline="") as f:
            writer = csv.DictWriter(f, LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        config, cfg = self.model.config, self.cfg
        self.print(f"{config.arch}: {self.model.num_params() / 1e6:.2f}M parameters, {self.tokens_per_step:,} tokens/step, "
                   f"device {self.device}, {dtype}, layout {cfg.layout}, evals of {cfg.eval_iters} batches per split"
                   + (f", resuming at step {resumed_at}" if resumed_at is not None else ""))
        if cfg.layout == "stories":
            _, y = get_batch(splits["train"], config.block_size, 1024, np.random.default_rng(0), torch.device("cpu"))
            self.print(f"stories layout: {len(splits['train'].starts):,} train stories; {(y == -1).float().mean().item():.0%} "
                       f"of the positions are padding after a story's end at block_size {config.block_size}")

    def print(self, *lines):
        if self.master:
            self.status.clear()
            print(*lines, sep="\n", flush=True)

    def start(self, step, seconds, compile_s=None):
        """Measure the pace and tokens/s from here: where training starts, and again after the first
        compiled step, which took compile_s and is left out of both."""
        if compile_s is not None:
            self.print(f"compile: the first step took {compile_s:.1f}s (graph capture and compilation), "
                       "not counted in the time budget or tokens/s")
        self.eval_mark = (step if compile_s is None else self.eval_mark[0] + 1, seconds)
        self.pace_mark, self.line_time = (step, seconds), now()

    def step(self, step, loss, lr, seconds):
        """After a training step: the loss line (checks the loss is finite), the cost line after the
        first timed steps, or the status line."""
        if step == self.pace_mark[0]:  # the first compiled step: no pace to show yet
            return
        self.timed_steps += 1
        step_s = max(seconds - self.pace_mark[1], 1e-9) / (step - self.pace_mark[0])
        if self.timed_steps == 3 or (self.timed_steps < 3 and now() - self.line_time >= 20):
            self.timed_steps = 3  # the first few timed steps: say what the whole run will cost
            self.print(*cost_lines(self.budget, self.cfg.eval_interval, step, seconds, step_s, self.eval_s,
                                   self.tokens_per_step, self.device))
        train_left, evals_left = self.budget.left(step, seconds, step_s, self.cfg.eval_interval)
        where = f"step {step}" + (f" ({seconds / 60:.1f}/{self.budget.max_minutes:g} min)"
                                  if self.budget.time_ends_first(step, seconds, step_s) else f"/{self.budget.max_iters}")
        eta = f"{step_s * 1000:.0f} ms/step, {duration(train_left + evals_left * self.eval_s)} left"
        if step % self.cfg.log_interval == 0 or now() - self.line_time >= 30:
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
        steps, trained = step - self.eval_mark[0], seconds - self.eval_mark[1]
        self.eval_s, self.eval_mark, self.line_time = eval_s, (step, seconds), now()
        tokens_per_s = steps * self.tokens_per_step / trained if steps and trained > 0 else None
        mfu = tokens_per_s * self.model.flops_per_token() / self.peak if tokens_per_s and self.peak else None
        peak_mem = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        row = {"step": step, "tokens": step * self.tokens_per_step, "train_loss": f"{losses['train']:.4f}",
               "val_loss": f"{losses['val']:.4f}", "lr": f"{lr:.3e}", "tokens_per_s": f"{tokens_per_s:.0f}" if tokens_per_s else "",
               "mfu": f"{mfu:.3f}" if mfu else "", "peak_mem_mb": f"{peak_mem:.0f}" if peak_mem else "",
               "elapsed_s": f"{seconds:.1f}"}
        self.print(f"eval step {step}: train {row['train_loss']}, val {row['val_loss']}, {row['tokens']:,} tokens"
                   + (f", {row['tokens_per_s']} tokens/s" if tokens_per_s else "") + (f", MFU {mfu:.1%}" if mfu else "")
                   + (f", peak mem {row['peak_mem_mb']} MB" if peak_mem else ""))
        if self.master:
            with open(self.log_path, "a", newline="") as f:
                csv.DictWriter(f, LOG_FIELDS).writerow(row)


# ---------------------------------------------------------------------------------------- checkpoints

def diverged(what, step, ckpt_path):
    """The error for a run that blew up: it is not saved, so ckpt_path keeps the last good state."""
    return UserError(f"{what} at step {step}: not saving; {ckpt_path} keeps the last good state "
                     "(lower --lr or raise --warmup_iters)")


def save_checkpoint(path, model, optimizer, state, rng, cfg, meta, world, device, write):
    """A checkpoint of this moment, written atomically if write. Every rank calls it (RNG states are gathered)."""
    rng_state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(),  # windows, dropout
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
                 "config": dataclasses.asdict(model.config), **dataclasses.asdict(state), "data_meta": meta,
                 "train_args": dataclasses.asdict(cfg), "rng": rng_states}, path)


def restore(ckpt, model, optimizer, rng, rank, world, device):
    """Load a checkpoint's weights, optimizer and this rank's RNG states (training replays exactly): its State."""
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


# ---------------------------------------------------------------------------------------- the command line

def parse_args(argv=None):
    """(TrainConfig, mixer.Config, checkpoint to resume or None): the defaults, the run's own values, the flags given."""
    given, model_given = parse_flags(argv)
    out_dir = Path(given.get("out_dir") or f"out-{model_given.get('arch', 'mixer')}")
    ckpt = open_run(out_dir, given.get("resume", False))
    saved = {}  # the run's own values (an older checkpoint's train_args hold more: kept where they are fields)
    if ckpt is not None:
        saved = {name: value for name, value in ckpt["train_args"].items()
                 if name in TRAIN_FIELDS and name not in ("out_dir", "device", "resume") and value is not None}
        config = Config(**ckpt["config"])  # the model cannot change on resume
        trained_with = {**TRAIN_DEFAULTS, **saved, **dataclasses.asdict(config)}
        for name, value in {**given, **model_given}.items():
            if name in FIXED_ON_RESUME and value != trained_with[name]:
                raise UserError(f"{out_dir / 'ckpt.pt'} was trained with --{name} {trained_with[name]}, not --{name} "
                                f"{value}: drop the flag to resume it, or train into a new --out_dir")
    settings = {**TRAIN_DEFAULTS, **saved, **given, "out_dir": str(out_dir)}
    vocab_size = read_meta(settings["data_dir"])["vocab_size"]
    if ckpt is None:  # the vocabulary padded to a multiple of 64: faster matmuls
        refuse_flags_without_effect(model_given)
        config = config_from_flags(argparse.Namespace(**model_given), vocab_size=64 * math.ceil(vocab_size / 64))
    elif ckpt["data_meta"]["vocab_size"] != vocab_size:
        raise UserError(f"checkpoint was trained on a {ckpt['data_meta']['vocab_size']}-token vocabulary but "
                        f"--data_dir has {vocab_size}: use data prepared with the same --vocab_size")
    # the values decided for this run, kept on --resume: its eval batches (so evals stay comparable) and compile
    device = pick_device(settings["device"])
    eval_tokens = settings["eval_tokens"] or (32_768 if device.type == "cpu" else 409_600)
    if settings["eval_iters"] is None:
        settings["eval_iters"] = max(1, round(eval_tokens / (settings["batch_size"] * config.block_size)))
    if settings["compile"] is None:
        settings["compile"] = compile_by_default(device, settings["dtype"])
    return TrainConfig(**settings), config, ckpt


def open_run(out_dir, resume):
    """The checkpoint to resume (None for a new run), with every check that can fail before work starts."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file, not a folder: choose another --out_dir")
    ckpt_path = out_dir / "ckpt.pt"
    if resume and not ckpt_path.exists():
        raise UserError(f"--resume: no checkpoint at {ckpt_path}")
    if not resume and ckpt_path.exists():
        raise UserError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out_dir")
    return load_checkpoint(ckpt_path, needs=("model", "config", "data_meta", "optimizer", "step", "rng")) if resume else None


TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TRAIN_DEFAULTS = {name: f.default for name, f in TRAIN_FIELDS.items()}


def parse_flags(argv, exit_on_error=True):
    """({TrainConfig field: value}, {mixer.Config field: value}) of the flags given, and nothing else."""
    given = vars(build_parser(exit_on_error).parse_args(argv))  # every default is argparse.SUPPRESS
    return given, {f.name: given.pop(f.name) for f in dataclasses.fields(Config) if f.name in given}


def build_parser(exit_on_error=True):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, argument_default=argparse.SUPPRESS,
                                exit_on_error=exit_on_error)
    add_model_flags(p, skip=("vocab_size", "causal"))
    add_config_flags(p, TrainConfig, "training (TrainConfig)")
    return p


def main(argv=None):
    return run("train.py", lambda argv: train(*parse_args(argv)), argv)


if __name__ == "__main__":
    main()
