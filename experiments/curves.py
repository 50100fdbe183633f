"""
How each architecture learns as training goes on: val loss against tokens seen, and the loss that a
run of each budget B reaches, for several budgets from one run per arch and seed.

    python -m experiments.curves --archs mixer toeplitz transformer --block_size 128 --batch_size 16 \
        --lr mixer=3e-2 toeplitz=3e-2 transformer=3e-3 --seeds 2 --n_embd 128 --n_layer 4 \
        --n_head 4 --data_dir data/sample8192 --out_dir out-curves/T128
    python -m experiments.curves --predict out-curves/T128 out-curves/T512    # for this machine
    python -m experiments.curves --predict out-curves/T128 --tokens_per_s mixer=3500 transformer=3200
    python -m experiments.curves --summary out-curves/T128 out-curves/T512 --out_dir out-curves

Each budget B (--budgets, millions of tokens) is its own run of B tokens with train.py's schedule
(--schedule cosine, the default: a linear warmup, then cosine to 0.1 x lr by B): what a user who
trains for B tokens gets. A cosine run's early points are not what a shorter run reaches (it has not
decayed yet), hence one run per budget.

--schedule wsd is the cheaper way (Hagele et al. 2024, "Scaling Laws and Compute-Optimal Training
Beyond Fixed Training Durations"): one run at a constant lr after the warmup (the stable run), and at
each budget a cooldown branching off it at (1 - --cooldown) x B that takes the lr linearly to 0 by B,
for about 60% of the tokens of the cosine runs. --cosine_check B trains cosine runs of B tokens for
the first arch beside it. Measured here (RESULTS.md section 12) it does not stand in for cosine runs
for every arch: at 1M tokens and T = 128 the cosine runs were 0.07 below the branches for the mixer
at lr 3e-2 and 0.02 above them for the transformer, so the comparisons use the cosine runs.

Each arch trains at the lr --lr gives it. An arch given several (--lr mixer=1e-2,3e-3) is selected on
--seed by val loss at the largest budget, and the best lr is confirmed on --seeds fresh seeds (--seed
+ 1, ...); an arch given one lr (chosen elsewhere: RESULTS.md section 1) trains on the fresh seeds only.
Every eval uses the same fixed windows of the train and val splits, for every arch, seed and budget.

--out_dir holds one folder per run (run.pt: a cosine run under way, to resume; stable.pt: the stable
run of --schedule wsd), settings.json (what makes
its results comparable: a rerun with other settings is refused), results.jsonl (every eval, one line
each) and table.md. Run the same command again after an interruption: it continues where it stopped.
Two commands with different --archs may share an --out_dir at once (one per core).

--predict turns curves into equal-time verdicts for a machine: a machine sets only tokens per second,
and the budget table gives the loss at any token count, so each arch's loss after M minutes there is
its curve at M x 60 x tokens/s. Without --tokens_per_s it measures this machine's (about a minute).
--summary writes the picture (one panel per context length) and the crossovers across --out_dirs.
"""
import argparse
import dataclasses
import json
import math
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import train
from cli import (WITHOUT_EFFECT, HelpFormatter, boolean, UserError, add_dtype_flag, add_model_flags,
                 atomic_save, check_folder, config_from_flags, load_checkpoint, mixed_precision,
                 pick_device, positive_int, run, write_text)
from experiments.common import (COLOURS, VARIANTS, ResultStore, machine, make_train_step,
                                mean_and_range, median_seconds, pyplot, ranking,
                                refuse_flags_for_no_variant, save_figure)
from train import can_compile, compile_by_default, wrap
from mixer import Model

EVAL_SEED = 0            # the eval windows: one fixed draw, the same for every arch, seed and budget
FIRST_EVAL = 2**15       # tokens at the stable run's first eval; then EVALS_PER_DOUBLING evals per doubling
EVALS_PER_DOUBLING = 2
MINUTES = (3, 10, 30, 60)  # --predict's equal-time budgets
BUDGET_KIND = {"cosine": "cosine", "wsd": "budget"}  # the rows of the loss a run of each budget reaches
WSD_COOLDOWN = 0.2       # --schedule wsd: each budget's cooldown, a fraction of it


class Job(NamedTuple):
    """One training run: a cosine run of `budget` tokens (schedule "cosine"), or the stable run of
    an arch at an lr and seed with its cooldown branches (schedule "wsd")."""
    arch: str
    lr: float
    seed: int
    schedule: str = "wsd"
    budget: int = None

    def folder(self, out_dir):
        cosine = f"-cosine{self.budget / 1e6:g}M" if self.schedule == "cosine" else ""
        return Path(out_dir) / f"{self.arch}-lr{self.lr:g}-seed{self.seed}{cosine}"

    def key(self):
        return {"arch": self.arch, "lr": self.lr, "seed": self.seed}


# ---------------------------------------------------------------------------------------- the schedule

def stable_lr(lr, step, warmup_iters):
    """Warmup-stable: linear warmup over warmup_iters steps, then constant."""
    return lr * min(1.0, (step + 1) / warmup_iters) if warmup_iters else lr


def cooldown_lr(lr_from, i, steps):
    """Step i of a cooldown of `steps` steps: linear from lr_from (the stable lr where it branches) to 0."""
    return lr_from * (steps - i) / steps


def budget_steps(budget, cooldown, tokens_per_step):
    """(the step where the cooldown of a budget branches off, its cooldown steps): B tokens in all."""
    total = max(1, round(budget / tokens_per_step))
    steps = max(1, round(cooldown * total))
    return total - steps, steps


def stable_eval_steps(last_step, tokens_per_step):
    """The stable run's evals: log-spaced in tokens from FIRST_EVAL, and its last step."""
    steps, k = set(), 0
    while (step := round(FIRST_EVAL * 2 ** (k / EVALS_PER_DOUBLING) / tokens_per_step)) < last_step:
        steps.add(max(step, 1))
        k += 1
    return steps | {last_step}


# ---------------------------------------------------------------------------------------- a run

@dataclasses.dataclass
class Setup:
    """What every run of one command shares: settings, data, fixed eval windows, the machine."""
    args: argparse.Namespace
    configs: dict            # {arch: mixer.Config}
    splits: dict
    eval_batches: dict       # {split: [(x, y), ...]}
    device: torch.device
    dtype: str
    compile: bool
    machine: str

    @property
    def tokens_per_step(self):
        return self.args.batch_size * self.args.block_size


@torch.no_grad()
def evaluate(model, setup, ctx):
    """{"train": loss, "val": loss} on the fixed eval windows."""
    model.eval()
    losses = {}
    for split, batches in setup.eval_batches.items():
        total = 0.0
        for x, y in batches:
            with ctx:
                total += model(x, y)[1].item()
        losses[split] = total / len(batches)
    model.train()
    return losses


def fixed_eval_batches(splits, block_size, batch_size, eval_iters, device):
    rng = np.random.default_rng(EVAL_SEED)
    return {name: [train.get_batch(split, block_size, batch_size, rng, device) for _ in range(eval_iters)]
            for name, split in splits.items()}


class Trainer:
    """A model, its optimizer and its training windows' RNG, stepped at a given lr."""

    def __init__(self, job, setup):
        self.setup, self.job = setup, job
        torch.manual_seed(job.seed)
        self.model = Model(setup.configs[job.arch]).to(setup.device)
        self.optimizer = self.model.make_optimizer(job.lr, setup.args.weight_decay, setup.device)
        self.rng = np.random.default_rng(job.seed)
        self.ctx, self.scaler, _ = mixed_precision(setup.device, setup.dtype)
        self.compiled = wrap(self.model, setup.compile, 1, setup.device)
        self.step, self.train_s = 0, 0.0  # training seconds: evals and saves excluded

    def train_step(self, lr):
        setup = self.setup

        def next_loss():
            x, y = train.get_batch(setup.splits["train"], setup.args.block_size, setup.args.batch_size,
                                   self.rng, setup.device)
            return self.compiled(x, y)[1]
        started = time.perf_counter()
        try:
            loss = train.train_step(self.optimizer, self.scaler, next_loss, lr, self.ctx, setup.args.grad_clip)
        except torch._dynamo.exc.TorchDynamoException as e:  # compile failed: this run trains eager
            print(f"compile: failed ({str(e).splitlines()[0][:100]}); training eager", flush=True)
            self.optimizer.zero_grad(set_to_none=True)
            self.compiled = self.model
            loss = train.train_step(self.optimizer, self.scaler, next_loss, lr, self.ctx, setup.args.grad_clip)
        if self.step > 0:  # the first step compiles: not training time
            self.train_s += time.perf_counter() - started
        self.step += 1
        return loss

    def eval_row(self, lr, **fields):
        losses = evaluate(self.model, self.setup, self.ctx)
        if not all(math.isfinite(v) for v in losses.values()):
            raise UserError(f"{self.job.arch} lr {self.job.lr:g} seed {self.job.seed}: loss {losses} at step "
                            f"{self.step}: the lr is too high for this arch")
        return {"step": self.step, "tokens": self.step * self.setup.tokens_per_step, "train": losses["train"],
                "val": losses["val"], "lr_now": lr, "train_s": round(self.train_s, 3),
                "params": self.model.num_params(), "machine": self.setup.machine, "dtype": self.setup.dtype,
                **fields}

    def save(self, path):
        atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                     "step": self.step, "train_s": self.train_s}, path)

    def load(self, path):
        ckpt = load_checkpoint(path, needs=("model", "optimizer", "rng", "step"))
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.rng.bit_generator.state = ckpt["rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        self.step, self.train_s = ckpt["step"], ckpt["train_s"]


def train_wsd(job, setup, store):
    """The stable run of job, evaluated at log-spaced token counts, with a cooldown branch off it at
    each budget; every eval goes into the store as it is made. Resumes from the folder's stable.pt,
    which is saved at every eval and before every branch."""
    args = setup.args
    folder = job.folder(args.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    branches = {}  # {step where it branches off: [(budget, cooldown steps), ...]}
    for budget in args.budgets:
        start, steps = budget_steps(budget, args.cooldown, setup.tokens_per_step)
        branches.setdefault(start, []).append((budget, steps))
    last_step = max(branches)
    evals = stable_eval_steps(last_step, setup.tokens_per_step)
    keys = ([{**job.key(), "kind": "stable", "step": s} for s in evals] +
            [{**job.key(), "kind": "budget", "budget": b} for b in args.budgets])
    if all(store.has(key) for key in keys):
        return  # finished (perhaps in another session, whose stable.pt is gone): nothing to retrain
    trainer = Trainer(job, setup)
    ckpt = folder / "stable.pt"
    if ckpt.exists():
        trainer.load(ckpt)
        print(f"  continuing from step {trainer.step} ({ckpt})", flush=True)
    while True:
        step, lr = trainer.step, stable_lr(job.lr, trainer.step, args.warmup_iters)
        if step in evals or step in branches:
            trainer.save(ckpt)
        if step in evals:
            row, done = store.get({**job.key(), "kind": "stable", "step": step}, lambda: trainer.eval_row(lr))
            if not done:
                say(job, row, "stable")
        for budget, steps in branches.get(step, []):
            row, done = store.get({**job.key(), "kind": "budget", "budget": budget},
                                  lambda: cool_down(trainer, lr, steps, budget))
            if not done:
                say(job, row, f"budget {budget / 1e6:g}M")
                trainer.load(ckpt)  # back to the stable run where the branch left it
        if step >= last_step:
            return
        trainer.train_step(lr)
        if trainer.step % args.log_interval == 0:
            progress(job, trainer, lr)


def cool_down(trainer, lr_from, steps, budget):
    """The cooldown branch to `budget` tokens from where the trainer is; its eval row."""
    for i in range(steps):
        trainer.train_step(cooldown_lr(lr_from, i, steps))
        if trainer.step % trainer.setup.args.log_interval == 0:
            progress(trainer.job, trainer, cooldown_lr(lr_from, i, steps), f" (cooldown to {budget / 1e6:g}M)")
    return trainer.eval_row(0.0, budget_tokens=budget)


def train_cosine(job, setup, store):
    """A run of job.budget tokens with train.py's schedule (warmup, then cosine to 0.1 x lr), evaluated
    at its end. Resumes from the folder's run.pt, saved at every log line and removed when it ends."""
    args = setup.args
    total = max(1, round(job.budget / setup.tokens_per_step))
    schedule = train.Schedule(job.lr, args.warmup_iters, 0.1, "cosine")
    warmup_end = min(args.warmup_iters / total, 1.0)
    ckpt = job.folder(args.out_dir) / "run.pt"

    def run_it():
        trainer = Trainer(job, setup)
        if ckpt.exists():
            trainer.load(ckpt)
            print(f"  continuing from step {trainer.step} ({ckpt})", flush=True)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        while trainer.step < total:
            lr = schedule.lr_at(trainer.step / total, trainer.step, warmup_end)
            trainer.train_step(lr)
            if trainer.step % args.log_interval == 0:
                progress(job, trainer, lr, " (cosine)")
                trainer.save(ckpt)
        return trainer.eval_row(schedule.lr_at(1.0, total, warmup_end), budget_tokens=job.budget)

    row, done = store.get({**job.key(), "kind": "cosine", "budget": job.budget}, run_it)
    ckpt.unlink(missing_ok=True)  # the row holds what the run measured
    if not done:
        say(job, row, f"cosine {job.budget / 1e6:g}M")


def say(job, row, what):
    print(f"  {job.arch} lr {job.lr:g} seed {job.seed}, {what}: {row['tokens'] / 1e6:.3f}M tokens, "
          f"train {row['train']:.4f}, val {row['val']:.4f}", flush=True)


def progress(job, trainer, lr, what=""):
    speed = trainer.step * trainer.setup.tokens_per_step / trainer.train_s if trainer.train_s else 0
    print(f"  {job.arch} lr {job.lr:g} seed {job.seed}{what}: step {trainer.step}, "
          f"{trainer.step * trainer.setup.tokens_per_step / 1e6:.2f}M tokens, lr {lr:.2e}, "
          f"{speed:,.0f} tokens/s", flush=True)


# ---------------------------------------------------------------------------------------- the experiment

def jobs_and_selection(args, store):
    """Train every run: for each arch given several lrs, the selection runs on --seed first and the
    best lr (val loss at the largest budget) then; each arch's lr on the confirmation seeds."""
    seeds = range(args.seed + 1, args.seed + 1 + args.seeds)
    largest = max(args.budgets)
    chosen = {}
    for arch in args.archs:
        lrs = args.lr[arch]
        if len(lrs) > 1:
            for lr in lrs:  # cosine: the largest budget's run only, where the lr is chosen
                yield from runs_of(args.schedule, arch, lr, args.seed, [largest])
            chosen[arch] = best_lr(store_rows(args.out_dir), BUDGET_KIND[args.schedule], arch, lrs, args.seed,
                                   largest)
            print(f"{arch}: lr {chosen[arch]:g} is best of {', '.join(f'{lr:g}' for lr in lrs)} on seed "
                  f"{args.seed} at {largest / 1e6:g}M tokens", flush=True)
        else:
            chosen[arch] = lrs[0]
    for seed in seeds:
        for arch in args.archs:
            yield from runs_of(args.schedule, arch, chosen[arch], seed, args.budgets)
    if args.cosine_check:
        for seed in seeds:
            yield Job(args.archs[0], chosen[args.archs[0]], seed, "cosine", args.cosine_check)


def runs_of(schedule, arch, lr, seed, budgets):
    """The jobs that measure budgets: a cosine run each, or one stable run whose branches reach them all."""
    if schedule == "cosine":
        return [Job(arch, lr, seed, "cosine", budget) for budget in budgets]
    return [Job(arch, lr, seed)]


def best_lr(rows, kind, arch, lrs, seed, budget):
    val = {r["lr"]: r["val"] for r in rows
           if r["arch"] == arch and r["seed"] == seed and r["kind"] == kind and r["budget"] == budget}
    return min(lrs, key=lambda lr: val[lr])


def store_rows(out_dir):
    """Every row of out_dir's results.jsonl, read now (another command may share the folder); a cut-off
    line is said when the command opens its store."""
    return ResultStore(out_dir, say_cut_off=False).done


def curves(args, command):
    setup = make_setup(args)
    store = ResultStore(args.out_dir)
    print(f"{setup.machine}, {setup.dtype}" + (", compiled" if setup.compile else "") +
          f"; {setup.tokens_per_step:,} tokens/step; budgets " +
          ", ".join(f"{b / 1e6:g}M" for b in args.budgets) +
          (" (a cosine run each)" if args.schedule == "cosine" else f" (cooldown {args.cooldown:.0%} of each)"),
          flush=True)
    for n, job in enumerate(jobs_and_selection(args, store), 1):
        print(f"[{n}] {job.arch} lr {job.lr:g} seed {job.seed}" +
              (f", cosine to {job.budget / 1e6:g}M" if job.schedule == "cosine" else "") +
              f" -> {job.folder(args.out_dir)}", flush=True)
        (train_cosine if job.schedule == "cosine" else train_wsd)(job, setup, store)
    write_table(args.out_dir, command)


# ---------------------------------------------------------------------------------------- settings

def make_setup(args):
    """Check everything before any training: settings against the folder's, the data, the models."""
    out_dir = Path(args.out_dir)
    check_folder(out_dir)
    splits, meta = train.load_data(args.data_dir, "packed")
    vocab_size = 64 * math.ceil(meta["vocab_size"] / 64)
    model_flags = {name: getattr(args, name) for name in MODEL_FIELDS if getattr(args, name) is not None}
    refuse_flags_for_no_variant(model_flags, args.archs)
    configs = {}
    for arch in args.archs:
        applies = {k: v for k, v in model_flags.items() if k not in WITHOUT_EFFECT[VARIANTS[arch]["arch"]]}
        configs[arch] = config_from_flags(argparse.Namespace(**applies), f"{arch}: invalid model settings",
                                          **VARIANTS[arch], vocab_size=vocab_size, block_size=args.block_size)
    model = {name: model_flags.get(name, train.Config.__dataclass_fields__[name].default) for name in MODEL_FIELDS}
    settings = {"block_size": args.block_size, "batch_size": args.batch_size, "model": model,
                "vocab_size": vocab_size, "train_tokens": meta["tokens"]["train"],
                "val_tokens": meta["tokens"]["val"], "budgets": args.budgets, "schedule": args.schedule,
                "cooldown": args.cooldown,
                "warmup_iters": args.warmup_iters, "weight_decay": args.weight_decay,
                "grad_clip": args.grad_clip, "eval_iters": args.eval_iters, "seed": args.seed}
    check_settings(out_dir, settings)
    device = pick_device(args.device)
    dtype = mixed_precision(device, args.dtype)[2]
    compile = compile_by_default(device, args.dtype) if args.compile is None else args.compile
    compile = compile and can_compile(device, print)
    eval_batches = fixed_eval_batches(splits, args.block_size, args.batch_size, args.eval_iters, device)
    return Setup(args, configs, splits, eval_batches, device, dtype, compile, machine(device))


def check_settings(out_dir, settings):
    """settings.json of out_dir: written on the first run, and every later run must match it."""
    path = out_dir / "settings.json"
    if path.exists():
        saved = read_settings(path)
        differ = [k for k in settings if saved.get(k) != settings[k]]
        if differ:
            raise UserError(f"{out_dir} holds curves of other settings ({differ[0]}: {saved.get(differ[0])} there, "
                            f"{settings[differ[0]]} here): use another --out_dir, or the same settings")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(settings, indent=1) + "\n")


MODEL_FIELDS = [f.name for f in dataclasses.fields(train.Config)
                if f.name not in ("arch", "vocab_size", "causal", "block_size", "mixing")]


def parse_lrs(specs, archs):
    """{arch: [lr, ...]} from ARCH=LR[,LR...] specs, one per arch of --archs."""
    lrs = {}
    for spec in specs:
        arch, eq, values = spec.partition("=")
        if not eq or arch not in archs:
            raise UserError(f"--lr {spec!r}: write ARCH=LR[,LR...] for an arch of --archs ({' '.join(archs)})")
        try:
            lrs[arch] = [float(v) for v in values.split(",")]
        except ValueError:
            raise UserError(f"--lr {spec!r}: {values!r} is not a list of numbers") from None
        if not all(lr > 0 for lr in lrs[arch]) or len(set(lrs[arch])) < len(lrs[arch]):
            raise UserError(f"--lr {spec!r}: each lr must be positive and given once")
    missing = [arch for arch in archs if arch not in lrs]
    if missing:
        raise UserError(f"--lr: no lr for {missing[0]} (give ARCH=LR for each of --archs)")
    return lrs


def check_schedule_flags(args):
    """--cooldown and --cosine_check shape the wsd schedule: refused beside cosine runs."""
    if args.schedule == "cosine":
        given = [flag for flag in ("cooldown", "cosine_check") if getattr(args, flag) is not None]
        if given:
            raise UserError(f"--{given[0]} has no effect with --schedule cosine (each budget is a cosine run of "
                            "its own): drop it, or give --schedule wsd")
    elif args.cooldown is None:
        args.cooldown = WSD_COOLDOWN


def parse_budgets(text):
    """Budgets in millions of tokens, increasing: 0.25,0.5,1 -> [250000, 500000, 1000000]."""
    try:
        budgets = [round(float(v) * 1e6) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers (millions of tokens)") from None
    if not budgets or min(budgets) <= 0 or any(b >= c for b, c in zip(budgets, budgets[1:])):
        raise argparse.ArgumentTypeError(f"{text}: budgets must be positive and increasing")
    return budgets


def cooldown_fraction(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a cooldown is a fraction of its budget, in (0, 1]; "
                                         "longer than the budget it cannot be")
    return value


# ---------------------------------------------------------------------------------------- the table

def read_curves(out_dir):
    """(settings, rows) of a curves folder."""
    path = Path(out_dir) / "settings.json"
    if not Path(out_dir).is_dir() or not path.is_file():
        raise UserError(f"{path} not found: {out_dir} is not a curves folder (run python -m experiments.curves "
                        f"... --out_dir {out_dir} first)")
    return read_settings(path), store_rows(out_dir)


def read_settings(path):
    settings = json.loads(path.read_text())
    settings.setdefault("schedule", "wsd")  # a folder written before --schedule: wsd was the only one
    return settings


def confirmed(settings, rows):
    """The rows of the runs that count: the runs of the folder's schedule on the confirmation seeds
    (the selection seed's runs only chose an lr; in a wsd folder, the cosine runs are the check)."""
    kinds = {BUDGET_KIND[settings["schedule"]]} | ({"stable"} if settings["schedule"] == "wsd" else set())
    return [r for r in rows if r["seed"] != settings["seed"] and r["kind"] in kinds]


def archs_of(rows):
    return [a for a in VARIANTS if any(r["arch"] == a for r in rows)]


def budget_losses(runs, arch, budget, key="val"):
    """[loss per seed] of arch's runs of budget (cosine runs or cooldown branches), in seed order."""
    rows = sorted((r for r in runs if r["arch"] == arch and r["kind"] != "stable" and r["budget"] == budget),
                  key=lambda r: r["seed"])
    return [r[key] for r in rows]


def cpu_and_precision(row):
    """What a run's numbers depend on: the machine without its thread count, and the precision."""
    cpu = re.sub(r", \d+ thread\(s\)$", "", row["machine"])
    return f"{cpu}, {row['dtype']}"


def moved_runs(rows):
    """{(arch, lr, seed)} of the runs whose rows come from more than one machine or precision."""
    seen = {}
    for r in rows:
        seen.setdefault((r["arch"], r["lr"], r["seed"]), set()).add(cpu_and_precision(r))
    return {run for run, kinds in seen.items() if len(kinds) > 1}


def ahead_at(runs, a, b, budget):
    """a or b where every seed of it is below every seed of the other at budget, else None (two seeds
    or more of each: one seed has no spread, and gives no ranking)."""
    va, vb = budget_losses(runs, a, budget), budget_losses(runs, b, budget)
    return a if max(va) < min(vb) else b if max(vb) < min(va) else None


def crossover(runs, budgets, a, b):
    """One sentence: the budget from which every seed of one arch stays ahead of every seed of the
    other up to the largest budget, and who was ahead before (each budget where a seed order holds)."""
    measured = [B for B in budgets if min(len(budget_losses(runs, a, B)), len(budget_losses(runs, b, B))) >= 2]
    if not measured:
        return f"{a} vs {b}: not ranked yet (no budget with two seeds of each)"
    leaders = [ahead_at(runs, a, b, B) for B in measured]
    end = f"{measured[-1] / 1e6:g}M"
    trail = len(leaders)
    while trail > 0 and leaders[trail - 1] is not None and leaders[trail - 1] == leaders[-1]:
        trail -= 1
    path = ", ".join(f"{B / 1e6:g}M: {w or 'overlap'}" for B, w in zip(measured, leaders))
    if leaders[-1] is None:
        return f"{a} vs {b}: none up to {end} (at the largest budget the seeds overlap; by budget: {path})"
    since = "at every budget" if trail == 0 else f"from {measured[trail] / 1e6:g}M on"
    return f"{a} vs {b}: **{leaders[-1]} ahead {since}** up to {end} (by budget: {path})"


def crossover_lines(runs, budgets, archs):
    return [f"- {crossover(runs, budgets, a, b)}" for i, a in enumerate(archs) for b in archs[i + 1:]]


def write_table(out_dir, command):
    settings, rows = read_curves(out_dir)
    lines = table_lines(settings, rows, command)
    write_text(Path(out_dir) / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def table_lines(settings, rows, command):
    """table.md: the budget table (val loss, the train/val gap), the crossovers, the lr selection and
    the cosine check, for one context length."""
    runs = confirmed(settings, rows)
    archs, epoch, budgets = archs_of(runs), settings["train_tokens"], settings["budgets"]
    if not archs:
        return [f"# Loss curves at T = {settings['block_size']}", "", f"`{command}`" if command else "",
                "", "No confirmation run has reached a budget yet.", *selection_lines(settings, rows)]
    moved = moved_runs(rows)
    lr_of = {a: sorted({r["lr"] for r in runs if r["arch"] == a}) for a in archs}
    header = "| budget (M tokens) | epochs | " + " | ".join(f"{a} (lr {', '.join(f'{x:g}' for x in lr_of[a])})"
                                                           for a in archs) + " |"
    lines = [f"# Loss curves at T = {settings['block_size']}", "", f"`{command}`" if command else "(command: see RESULTS.md)",
             "", f"Model: d{settings['model']['n_embd']}, {settings['model']['n_layer']} layers, vocab "
             f"{settings['vocab_size']}; {settings['block_size'] * settings['batch_size']:,} tokens per step; "
             f"warmup {settings['warmup_iters']} steps, {schedule_words(settings)}. One epoch = "
             f"{epoch / 1e6:.2f}M tokens (the train split).",
             "", "Machines: " + "; ".join(sorted({cpu_and_precision(r) for r in rows})) + ".", ""]
    lines += ["## Val loss a run of each budget reaches", "",
              "Each cell: the run of that budget, mean (min-max) over the confirmation seeds"
              + (" (* a run that continued on another machine or precision)" if moved else "") + ".", "",
              header, "|---|---|" + "---|" * len(archs)]
    for budget in budgets:
        cells = []
        for arch in archs:
            vals = budget_losses(runs, arch, budget)
            star = "*" if any((arch, r["lr"], r["seed"]) in moved for r in runs if r["arch"] == arch) else ""
            cells.append(mean_and_range(vals, ".3f") + star if vals else "-")
        lines.append(f"| {budget / 1e6:g} | {budget / epoch:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "## Train/val gap (val minus train loss on the fixed windows, at the end of each budget's run)", "",
              "| budget (M tokens) | epochs | " + " | ".join(archs) + " |", "|---|---|" + "---|" * len(archs)]
    for budget in budgets:
        cells = []
        for arch in archs:
            gaps = [v - t for v, t in zip(budget_losses(runs, arch, budget), budget_losses(runs, arch, budget, "train"))]
            cells.append(mean_and_range(gaps, "+.3f") if gaps else "-")
        lines.append(f"| {budget / 1e6:g} | {budget / epoch:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "## Crossovers", "", "An arch is ahead at a budget when every seed of it is below every seed of "
              "the other.", "", *crossover_lines(runs, budgets, archs)]
    lines += selection_lines(settings, rows) + cosine_lines(settings, rows)
    return lines


def schedule_words(settings):
    if settings["schedule"] == "cosine":
        return "then cosine to 0.1 x lr, one run per budget (train.py's schedule)"
    return (f"a constant lr, and a linear cooldown to 0 over the last {settings['cooldown']:.0%} of each budget, "
            "branching off the constant-lr run")


def selection_lines(settings, rows):
    """The lr selection on the selection seed, for the archs given several lrs."""
    chosen = {(r["arch"], r["lr"]) for r in confirmed(settings, rows)}
    picked = [r for r in rows if r["seed"] == settings["seed"] and r["kind"] == BUDGET_KIND[settings["schedule"]]]
    if not picked:
        return []
    lines = ["", f"## lr selection (seed {settings['seed']}; val loss at each budget)", "",
             "| arch | lr | " + " | ".join(f"{b / 1e6:g}M" for b in settings["budgets"]) + " |",
             "|---|---|" + "---|" * len(settings["budgets"])]
    for arch in archs_of(picked):
        for lr in sorted({r["lr"] for r in picked if r["arch"] == arch}, reverse=True):
            val = {r["budget"]: r["val"] for r in picked if r["arch"] == arch and r["lr"] == lr}
            mark = " (chosen)" if (arch, lr) in chosen else ""
            lines.append(f"| {arch} | {lr:g}{mark} | " + " | ".join(f"{val[b]:.3f}" if b in val else "-"
                                                                   for b in settings["budgets"]) + " |")
    return lines


def cosine_lines(settings, rows):
    """The cooldown branch against a cosine run of the same budget, seed by seed."""
    cosine = [r for r in rows if r["kind"] == "cosine"]
    if not cosine or settings["schedule"] == "cosine":
        return []
    lines = ["", "## Cooldown branch against a cosine run of the same length", "",
             "| arch | lr | budget (M tokens) | seed | cooldown branch | cosine run | cosine minus branch |",
             "|---|---|---|---|---|---|---|"]
    for c in sorted(cosine, key=lambda r: (r["arch"], r["budget"], r["seed"])):
        branch = next((r for r in rows if r["kind"] == "budget" and r["budget"] == c["budget"]
                       and (r["arch"], r["lr"], r["seed"]) == (c["arch"], c["lr"], c["seed"])), None)
        if branch is not None:
            lines.append(f"| {c['arch']} | {c['lr']:g} | {c['budget'] / 1e6:g} | {c['seed']} | {branch['val']:.3f} "
                         f"| {c['val']:.3f} | {c['val'] - branch['val']:+.3f} |")
    return lines


# ---------------------------------------------------------------------------------------- --predict

def predicted_loss(runs, arch, budgets, tokens):
    """[val loss per seed] of a run of `tokens` tokens: each seed's budget losses, linear in log tokens
    between its budgets, for the seeds whose budgets reach that far (a run still going covers less);
    None where no seed does."""
    losses = []
    for seed in sorted({r["seed"] for r in runs if r["arch"] == arch}):
        val = {r["budget"]: r["val"] for r in runs
               if r["arch"] == arch and r["seed"] == seed and r["kind"] != "stable"}
        measured = [B for B in budgets if B in val]
        if measured and measured[0] <= tokens <= measured[-1]:
            losses.append(float(np.interp(math.log(tokens), np.log(measured), [val[B] for B in measured])))
    return losses or None


def predict(args):
    """The equal-time verdicts at each of --minutes, for each curves folder, from tokens/s (given, or
    measured on this machine)."""
    for folder in args.predict:
        settings, rows = read_curves(folder)
        runs = confirmed(settings, rows)
        archs, budgets = archs_of(runs), settings["budgets"]
        if not archs:
            print(f"\n# T = {settings['block_size']} ({folder}): no confirmation run has reached a budget yet")
            continue
        speeds = args.tokens_per_s or measure_speeds(settings, archs, args)
        missing = [a for a in archs if a not in speeds]
        if missing:
            raise UserError(f"--tokens_per_s: none for {missing[0]} (give ARCH=N for each of {' '.join(archs)})")
        source = "as given" if args.tokens_per_s else f"measured on {machine(pick_device(args.device))}"
        print(f"\n# T = {settings['block_size']}: predicted val loss after M minutes of training ({folder})\n")
        print("tokens/s (" + source + "): " + ", ".join(f"{a} {speeds[a]:,.0f}" for a in archs) + "\n")
        print("| minutes | " + " | ".join(archs) + " | predicted verdict |")
        print("|---|" + "---|" * (len(archs) + 1))
        for minutes in args.minutes:
            loss = {a: predicted_loss(runs, a, budgets, speeds[a] * 60 * minutes) for a in archs}
            cells = [f"{mean_and_range(v, '.3f')} at {speeds[a] * 60 * minutes / 1e6:.2f}M" if v else
                     f"not measured ({speeds[a] * 60 * minutes / 1e6:.2f}M tokens)" for a, v in loss.items()]
            known = {a: v for a, v in loss.items() if v}
            verdict = " ".join(ranking(known)) if len(known) == len(archs) else \
                f"no verdict: the curves cover {budgets[0] / 1e6:g}M to {budgets[-1] / 1e6:g}M tokens"
            print(f"| {minutes:g} | " + " | ".join(cells) + f" | {verdict} |")


def measure_speeds(settings, archs, args):
    """{arch: training tokens/s on this machine} at the curves' settings, as train.py trains by default
    here (dtype and compile): interleaved rounds, the median of each."""
    device = pick_device(args.device)
    vocab, T, batch = settings["vocab_size"], settings["block_size"], settings["batch_size"]
    compile = compile_by_default(device, args.dtype) and can_compile(device, print)
    steps = {}
    for arch in archs:
        model_flags = {k: v for k, v in settings["model"].items() if k not in WITHOUT_EFFECT[VARIANTS[arch]["arch"]]}
        config = train.Config(**{**model_flags, **VARIANTS[arch], "vocab_size": vocab, "block_size": T})
        print(f"timing {arch} at T = {T}" + (" (compiling first)" if compile else ""), flush=True)
        steps[arch] = make_train_step(config, batch, device, args.dtype, compile)[1]
        for _ in range(3):
            steps[arch]()
    times = {arch: [] for arch in archs}
    for _ in range(3):
        for arch, step in steps.items():
            times[arch].append(median_seconds(step, 5, 0, device))
    return {arch: batch * T / statistics.median(t) for arch, t in times.items()}


def parse_speeds(specs):
    """{arch: tokens/s} from ARCH=N specs."""
    speeds = {}
    for spec in specs:
        arch, _, value = spec.partition("=")
        if arch not in VARIANTS:
            raise UserError(f"--tokens_per_s {spec!r}: write ARCH=N with ARCH one of {', '.join(VARIANTS)}")
        try:
            speeds[arch] = float(value)
        except ValueError:
            raise UserError(f"--tokens_per_s {spec!r}: {value!r} is not a number") from None
        if not speeds[arch] > 0:
            raise UserError(f"--tokens_per_s {spec!r}: tokens per second must be positive")
    return speeds


# ---------------------------------------------------------------------------------------- --summary

def summarize(args):
    """curves.md (every folder's table) and curves.png: val loss against tokens, one panel per context
    length, a band per arch across its seeds, the budget points and the start of each epoch marked."""
    check_folder(args.out_dir)
    folders = [(read_curves(f), f) for f in args.summary]
    folders.sort(key=lambda x: x[0][0]["block_size"])
    lines = ["# Loss curves", "", f"`{shlex.join(['python', '-m', 'experiments.curves', '--summary', *args.summary])}`"]
    for (settings, rows), folder in folders:
        lines += ["", *(f"#{line}" if line.startswith("#") else line for line in table_lines(settings, rows, None))]
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    write_text(Path(args.out_dir) / "curves.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    plt = pyplot("curves.png", f"the numbers are in {Path(args.out_dir) / 'curves.md'}")
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(folders), figsize=(5.5 * len(folders), 4.2), sharey=True, squeeze=False)
    for ax, ((settings, rows), _) in zip(axes[0], folders):
        draw_curves(ax, settings, confirmed(settings, rows))
    at_budgets = [r["val"] for (settings, rows), _ in folders for r in confirmed(settings, rows) if r["kind"] != "stable"]
    if at_budgets:  # the first evals are near ln(vocab): show where the archs differ
        axes[0][0].set_ylim(min(at_budgets) - 0.1, max(at_budgets) + 0.4)
    axes[0][0].set_ylabel("val loss")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, Path(args.out_dir) / "curves.png")


def draw_curves(ax, settings, runs):
    """One panel: per arch, the loss at each budget (mean, and a band min-max over seeds), under
    --schedule wsd the stable runs' band too (light); dotted lines where each epoch ends."""
    for arch in archs_of(runs):
        stable = [r for r in runs if r["arch"] == arch and r["kind"] == "stable"]
        steps = sorted({r["tokens"] for r in stable})
        by_seed = {}
        for r in stable:
            by_seed.setdefault(r["seed"], {})[r["tokens"]] = r["val"]
        full = [t for t in steps if all(t in v for v in by_seed.values())]
        if full:
            vals = np.array([[by_seed[s][t] for t in full] for s in by_seed])
            ax.fill_between(np.array(full) / 1e6, vals.min(0), vals.max(0), color=COLOURS[arch], alpha=0.18, lw=0)
        budgets = [B for B in settings["budgets"] if budget_losses(runs, arch, B)]
        if budgets:
            vals = [budget_losses(runs, arch, B) for B in budgets]
            x = np.array(budgets) / 1e6
            ax.plot(x, [statistics.mean(v) for v in vals], marker="o", ms=4, color=COLOURS[arch], label=arch)
            ax.fill_between(x, [min(v) for v in vals], [max(v) for v in vals], color=COLOURS[arch], alpha=0.3, lw=0)
    epoch = settings["train_tokens"] / 1e6
    top = settings["budgets"][-1] / 1e6
    for n in range(1, int(top / epoch) + 1):
        ax.axvline(n * epoch, color="grey", ls=":", lw=1)
        ax.text(n * epoch, 1.0, f" epoch {n + 1}", transform=ax.get_xaxis_transform(), fontsize=7, va="top", color="grey")
    ax.set(xscale="log", xlabel="tokens seen (millions; log scale)", title=f"T = {settings['block_size']}",
           xlim=(settings["budgets"][0] / 1.3e6, top * 1.3))
    ax.set_xticks([B / 1e6 for B in settings["budgets"]], [f"{B / 1e6:g}" for B in settings["budgets"]])
    ax.minorticks_off()
    ax.grid(alpha=0.3)


# ---------------------------------------------------------------------------------------- command line

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--archs", nargs="+", choices=VARIANTS, default=["mixer", "toeplitz", "transformer"])
    p.add_argument("--lr", nargs="+", metavar="ARCH=LR[,LR]", default=[],
                   help="each arch's lr; several: selected on --seed, at the largest budget")
    p.add_argument("--seeds", type=positive_int, default=2, help="confirmation seeds: --seed + 1, ...")
    p.add_argument("--seed", type=int, default=1337, help="the selection seed (archs given several lrs)")
    p.add_argument("--budgets", type=parse_budgets, default=parse_budgets("0.25,0.5,1,2,4"),
                   help="millions of tokens, increasing (default 0.25,0.5,1,2,4)")
    p.add_argument("--schedule", choices=BUDGET_KIND, default="cosine",
                   help="cosine: a run per budget; wsd: cooldown branches off one constant-lr run")
    p.add_argument("--cooldown", type=cooldown_fraction,
                   help=f"wsd: each budget's cooldown, a fraction of it (default {WSD_COOLDOWN:g})")
    p.add_argument("--cosine_check", type=lambda t: parse_budgets(t)[0], metavar="B",
                   help="wsd: also cosine runs of B million tokens for the first arch, on the confirmation seeds")
    p.add_argument("--block_size", type=positive_int, default=128)
    p.add_argument("--batch_size", type=positive_int, default=16)
    p.add_argument("--warmup_iters", type=int, default=100)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--eval_iters", type=positive_int, default=32, help="fixed batches per split and eval")
    p.add_argument("--log_interval", type=positive_int, default=200)
    p.add_argument("--data_dir", default="data/tinystories")
    p.add_argument("--device", default="auto")
    add_dtype_flag(p)
    p.add_argument("--compile", type=boolean, help="torch.compile (default: where it pays, as train.py)")
    p.add_argument("--out_dir", default="out-curves")
    add_model_flags(p, skip=("arch", "vocab_size", "causal", "block_size", "mixing"))
    p.add_argument("--predict", nargs="+", metavar="DIR", help="no training: equal-time verdicts from these curves")
    p.add_argument("--tokens_per_s", nargs="+", metavar="ARCH=N", help="--predict: each arch's training tokens/s "
                                                                        "(default: measure this machine's)")
    p.add_argument("--minutes", type=parse_minutes, default=list(MINUTES), help="--predict: training minutes, "
                                                                                 "comma-separated (default 3,10,30,60)")
    p.add_argument("--summary", nargs="+", metavar="DIR", help="no training: curves.md and curves.png across "
                                                                "these curves folders, into --out_dir")
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "experiments.curves", *argv])

    def start(args):
        if args.predict:
            args.tokens_per_s = parse_speeds(args.tokens_per_s or [])
            return predict(args)
        if args.summary:
            return summarize(args)
        args.lr = parse_lrs(args.lr, args.archs)
        check_schedule_flags(args)
        return curves(args, command)
    run("experiments.curves", start, args)


def parse_minutes(text):
    try:
        minutes = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers") from None
    if not all(m > 0 for m in minutes):
        raise argparse.ArgumentTypeError(f"{text}: minutes must be positive")
    return minutes


if __name__ == "__main__":
    main()
