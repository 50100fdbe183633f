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
"""
import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cli import HelpFormatter, Progress, UserError, nonneg_float, nonneg_int, positive_float, positive_int, run, unit_interval
from mixer import ARCHS, Config, Model

LOG_FIELDS = ["step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_s", "mfu", "peak_mem_mb", "elapsed_s"]
# Dense bf16 tensor-core peaks (FLOP/s) for MFU; unknown devices report no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "RTX 3060": 51e12}
# The best lr of each arch at the README's CPU settings (compare.py --sweep, T = 128, packed rows;
# the hybrid was not swept and gets the transformer's)
CPU_LR = {"mixer": 3e-2, "transformer": 3e-3, "hybrid": 3e-3}


class TrainError(UserError):
    """Bad training input, an unreadable checkpoint, or a run that diverged."""


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


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


# ---------------------------------------------------------------------------------------- training

def lr_at(progress, step, warmup_end, args):
    """Linear warmup over warmup_iters steps, then decay from the peak to min_lr over the rest of the budget.

    progress is the fraction of the budget used (steps or minutes, see train()); warmup_end is the
    progress when warmup ended. The decay runs from warmup_end to 1, so it starts exactly at the peak
    even when warmup took a sizeable share of a time budget, and ends at min_lr when the budget does.
    """
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    min_lr = args.lr * args.min_lr_ratio
    decay = min(max((progress - warmup_end) / (1 - warmup_end), 0.0), 1.0) if warmup_end < 1 else 1.0
    if args.lr_schedule == "cosine":
        return min_lr + 0.5 * (args.lr - min_lr) * (1 + math.cos(math.pi * decay))
    if args.lr_schedule == "linear":
        return args.lr - (args.lr - min_lr) * decay
    return args.lr


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


# ---------------------------------------------------------------------------------------- cost and ETA

def duration(seconds):
    """12s, 8m32s, 21h06m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def time_left(args, step, trained_s, step_s):
    """(seconds of training left, evals left): the step or time budget, whichever ends first."""
    train_s = (args.max_iters - step) * step_s
    if args.max_minutes:
        train_s = min(train_s, max(args.max_minutes * 60 - trained_s, 0.0))
    evals = int(train_s / step_s) // args.eval_interval + 1  # the periodic ones and the final one
    return train_s, evals


def cost_lines(args, step, trained_s, step_s, eval_s, tokens_per_step, device, arch):
    """What the whole run will cost at the measured pace, and on a CPU-only machine where that is
    more than an hour, a command of the README's CPU settings that finishes in minutes."""
    train_s, evals = time_left(args, step, trained_s, step_s)
    budget = f"--max_minutes {args.max_minutes:g}" if args.max_minutes and train_s < (args.max_iters - step) * step_s \
        else f"{args.max_iters:,} steps"
    steps = int(train_s / step_s)
    lines = [f"cost: {step_s * 1000:,.0f} ms/step, so {budget} = {steps:,} more steps ({steps * tokens_per_step / 1e6:,.1f}M "
             f"tokens) in {duration(train_s)}, plus {evals} evals of {duration(eval_s)}: about "
             f"{duration(train_s + evals * eval_s)} in all"]
    cpu_only = device.type == "cpu" and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    if cpu_only and train_s + evals * eval_s > 3600:
        lr = CPU_LR[arch]
        lines.append("no GPU here: for a run of minutes on this CPU use the README's CPU settings, e.g. "
                     "python data_prep.py --vocab_size 8192 --out_dir data/tinystories8192 && python train.py "
                     f"--arch {arch} --data_dir data/tinystories8192 --n_layer 4 --n_embd 128 --block_size 128 "
                     f"--batch_size 16 --lr {lr:g} --warmup_iters 100 --max_minutes 10 --compile")
    return lines


def atomic_save(obj, path):
    """torch.save to path.tmp, flush it to disk, then rename it over path. A crash or kill at any
    moment leaves either the old file or the new one at path, never a partial one."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name, None) is not None}
    vocab_size = 64 * math.ceil(meta["vocab_size"] / 64)  # padded: faster matmuls, ids beyond are never used
    if ckpt is None:
        try:
            return Config(**{**flags, "vocab_size": vocab_size})
        except ValueError as e:
            raise TrainError(f"invalid model settings: {e}") from None
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
    elif ckpt_path.exists():
        raise TrainError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out_dir")
    # The layout decides what every position means to the model: a resume keeps the checkpoint's.
    saved_layout = (ckpt["train_args"].get("layout") or "packed") if ckpt else None
    if args.layout and saved_layout and args.layout != saved_layout:
        raise TrainError(f"{ckpt_path} was trained with --layout {saved_layout}: drop the flag to resume, "
                         "or train into a new --out_dir")
    return out_dir, ckpt, args.layout or saved_layout or "packed"


def restore(ckpt, model, optimizer, rng, rank, world, device):
    """Load a checkpoint's weights, optimizer and this rank's RNG states, so training replays exactly."""
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


def train(args):
    """Train until the step or time budget runs out (or Ctrl-C). Returns a summary dict."""
    rank, world, device = setup_distributed(args)
    master = rank == 0
    out_dir, ckpt, layout = open_run(args)
    ckpt_path, log_path = out_dir / "ckpt.pt", out_dir / "log.csv"
    splits, meta = load_data(args.data_dir, layout)
    config = resolve_config(args, meta, ckpt)
    if ckpt is not None and not args.eval_iters:
        args.eval_iters = ckpt["train_args"].get("eval_iters")  # the run's own eval batches
    args.eval_iters = default_eval_iters(args, device, config.block_size)

    # Per-rank seeds: each DDP rank draws its own windows and dropout masks (DDP copies rank 0's
    # initial weights to the others, so the init still agrees).
    torch.manual_seed(args.seed + rank)
    model = Model(config).to(device)
    optimizer = make_optimizer(model, args, device)
    rng = np.random.default_rng(args.seed + rank)  # training windows
    step, best_val, elapsed, warmup_end = 0, float("inf"), 0.0, None
    if ckpt is not None:
        restore(ckpt, model, optimizer, rng, rank, world, device)
        step, best_val, elapsed, warmup_end = ckpt["step"], ckpt["best_val"], ckpt["elapsed"], ckpt.get("warmup_end")
    ctx, dtype = autocast(device, args.dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    tokens_per_step = args.batch_size * args.grad_accum * config.block_size * world
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"{config.arch}: {raw_model.num_params() / 1e6:.2f}M parameters, {tokens_per_step:,} tokens/step, "
              f"device {device}, {dtype}, layout {layout}, evals of {args.eval_iters} batches per split"
              + (f", resuming at step {step}" if ckpt else ""))
        if layout == "stories":
            pad = padding_fraction(splits["train"], config.block_size, np.random.default_rng(0))
            print(f"stories layout: {len(splits['train'].starts):,} train stories; {pad:.0%} of the positions "
                  f"are padding after a story's end at block_size {config.block_size}")
        start_log(log_path, keep_before=step if ckpt else 0)

    def state():  # what a checkpoint needs besides model and optimizer: every rank's RNG states
        rng_state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(),  # windows, dropout
                     "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        rng_states = [rng_state]
        if world > 1:
            rng_states = [None] * world
            dist.all_gather_object(rng_states, rng_state)
        return {"step": step, "best_val": best_val, "elapsed": elapsed, "warmup_end": warmup_end,
                "data_meta": meta, "train_args": {**vars(args), "layout": layout}, "rng": rng_states}

    def progress():  # fraction of the budget (steps or minutes, whichever runs out first) used
        minutes = (elapsed + time.time() - window_start) / 60
        return max(step / args.max_iters, minutes / args.max_minutes if args.max_minutes else 0.0)

    def next_batch():
        return get_batch(splits["train"], config.block_size, args.batch_size, rng, device)

    def of_budget():  # "/5000", or " (1.2/5 min)" when the time budget ends first
        trained_s = elapsed + time.time() - window_start
        if args.max_minutes and (args.max_minutes * 60 - trained_s) / step_s < args.max_iters - step:
            return f" ({trained_s / 60:.1f}/{args.max_minutes:g} min)"
        return f"/{args.max_iters}"

    peak, window_start, window_steps = peak_flops(device), time.time(), 0
    compile_pending, costed = args.compile, False
    status = Progress(log_every=30, quiet_first=True)  # step and eval progress between the loss lines
    step_s, eval_s, last_line, last_line_step = None, 0.0, time.time(), step
    with StopFlag() as stop:
        while True:
            if warmup_end is None and step >= args.warmup_iters:
                warmup_end = progress()
            finished, interrupted = progress() >= 1.0, stop.set
            if world > 1:  # every rank must agree to stop, or the others would wait forever
                flags = torch.tensor([float(finished), float(interrupted)], device=device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                finished, interrupted = bool(flags[0].item()), bool(flags[1].item())
            if interrupted:
                break
            if args.keep_every and step % args.keep_every == 0:
                paused = time.time()
                st = state()
                if master:
                    save_checkpoint(out_dir / f"ckpt_step{step}.pt", raw_model, optimizer, st)
                window_start += time.time() - paused  # saving is not training time
            if step % args.eval_interval == 0 or finished:
                if device.type == "cuda":
                    torch.cuda.synchronize()  # the window's steps are done: time them
                window_time = time.time() - window_start
                elapsed += window_time
                tokens_per_s = window_steps * tokens_per_step / window_time if window_steps else None
                eval_start = time.time()
                # Ctrl-C cuts an eval short in a single process; DDP ranks finish theirs, to stop together
                losses = evaluate(raw_model, splits, args, device, ctx, stop if world == 1 else None,
                                  status if master else None)
                window_start, window_steps = time.time(), 0
                if losses is None:  # Ctrl-C during the eval: stop without it
                    continue
                eval_s = time.time() - eval_start
                if not math.isfinite(losses["val"]):
                    raise diverged(f"val loss is {losses['val']}", step, ckpt_path)
                improved, best_val = losses["val"] < best_val, min(best_val, losses["val"])
                st = state()
                if master:
                    status.clear()
                    log_eval(log_path, step, step * tokens_per_step, losses, lr_at(progress(), step, warmup_end, args),
                             tokens_per_s, raw_model, peak, device, elapsed)
                    if improved or finished:
                        save_checkpoint(ckpt_path, raw_model, optimizer, st)
                window_start = time.time()
                last_line, last_line_step = time.time(), step  # the eval is not step time
            if finished:
                break
            lr = lr_at(progress(), step, warmup_end, args)
            started = time.time()
            loss = train_step(model, optimizer, scaler, next_batch, lr, args, ctx, world)
            step += 1
            if compile_pending:  # this process's first compiled step traced and compiled the model
                if device.type == "cuda":
                    torch.cuda.synchronize()
                compile_pending, compile_s = False, time.time() - started
                window_start += compile_s  # not training time: budgets stay equal between archs
                last_line, last_line_step = time.time(), step
                if master:
                    status.clear()
                    print(f"compile: the first step took {compile_s:.1f}s (graph capture and compilation), "
                          "not counted in the time budget or tokens/s")
                continue
            window_steps += 1
            step_s = (time.time() - last_line) / max(step - last_line_step, 1)  # this window's pace
            trained_s = elapsed + time.time() - window_start
            if not costed and (window_steps >= 3 or time.time() - last_line >= 20):
                costed = True  # the first few timed steps: say what the whole run will cost
                if master:
                    status.clear()
                    print("\n".join(cost_lines(args, step, trained_s, step_s, eval_s, tokens_per_step, device,
                                               config.arch)), flush=True)
            train_left, evals_left = time_left(args, step, trained_s, step_s)
            eta = f"{duration(train_left + evals_left * eval_s)} left"
            if step % args.log_interval == 0 or time.time() - last_line >= 30:
                loss_value = loss.item()  # a sync: only every log_interval steps (or 30 s)
                if not math.isfinite(loss_value):
                    raise diverged(f"loss is {loss_value}", step, ckpt_path)
                if master:
                    status.done(f"step {step}{of_budget()}: loss {loss_value:.4f}, lr {lr:.2e}, "
                                f"{step_s * 1000:.0f} ms/step, {eta}")
                last_line, last_line_step = time.time(), step
            elif master:
                status.update(f"step {step}{of_budget()}: {step_s * 1000:.0f} ms/step, {eta}")
        if interrupted:  # Ctrl-C (on any rank): keep the last completed step, without an eval on the way out
            elapsed += time.time() - window_start
            st = state()
            if master:  # still inside StopFlag: a second Ctrl-C during this save exits at once
                status.clear()
                save_checkpoint(ckpt_path, raw_model, optimizer, st)
                print(f"interrupted at step {step}: saved {ckpt_path} (continue with --resume); "
                      f"best val loss {best_val:.4f}")
    if not interrupted and master:
        print(f"done at step {step}: best val loss {best_val:.4f}; saved {ckpt_path}")
    if world > 1:
        dist.destroy_process_group()
    return {"out_dir": out_dir, "step": step, "best_val": best_val, "interrupted": interrupted}


def train_step(model, optimizer, scaler, next_batch, lr, args, ctx, world):
    """One optimizer step over grad_accum micro-batches; returns the last micro-batch's loss tensor."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    for micro in range(args.grad_accum):
        x, y = next_batch()
        # DDP: all-reduce gradients only once, after the last micro-batch
        sync = contextlib.nullcontext() if world == 1 or micro == args.grad_accum - 1 else model.no_sync()
        with sync:
            with ctx:
                _, loss = model(x, y)
            scaler.scale(loss / args.grad_accum).backward()
    if args.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


def make_optimizer(model, args, device):
    """AdamW; weight decay on matrices only (the [T, T] mixing weights included), not on norms/biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


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
    model = p.add_argument_group("model (mixer.Config checks the values; taken from the checkpoint on --resume)")
    for field in dataclasses.fields(Config):
        if field.name not in ("arch", "vocab_size", "causal"):  # --arch is above; the vocab comes from the data
            kind = (lambda s: s.lower() in ("1", "true", "yes")) if field.type is bool else field.type
            model.add_argument(f"--{field.name}", type=kind, help=f"default {field.default}")
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
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--resume", action="store_true", help="continue out_dir/ckpt.pt")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None):
    return run("train.py", train, parse_args(argv))


if __name__ == "__main__":
    main()
