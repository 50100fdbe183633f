"""
The paper's language-model comparison in one command: mixer, transformer and hybrid trained one after
another on the same data, model size, seeds and wall-clock budget; then a table and the loss curves.

    python -m experiments.compare --minutes 10                                   # the three archs, one seed each
    python -m experiments.compare --minutes 5 --seeds 2 --n_embd 128 --n_layer 4 --block_size 128 --lr 1e-3
    python -m experiments.compare --minutes 5 --archs mixer transformer --layout stories --block_size 32

Every flag compare.py does not know goes to train.py unchanged (data, model size, lr, --layout, ...), but a
model flag that means nothing to an arch (--n_head for the mixers, --mixer_heads for the transformer) skips it.
--out_dir (default out-compare) holds one folder per run, ARCH-seedS, and:
    results.md   the table (mean and spread over seeds), with the command and the machine
    curves.csv   every eval of every run
    curves.png   val loss against training time and against tokens seen (needs matplotlib)
--sweep FLAG=V1,V2,... [FLAG=...] gives each arch its own best settings (the paper's protocol): every
point of the grid (any train.py flags, e.g. lr=1e-3,3e-3,1e-2 n_embd=128,256) is trained for every arch
on one seed (--seed); each arch's best point (lowest final val loss) is then retrained on --seeds fresh
seeds (--seed + 1, ...), and only those confirmation runs enter the verdict: picking the best of many
runs and reporting those same runs would flatter every arch by its own luck.

    python -m experiments.compare --sweep lr=1e-3,3e-3,1e-2,3e-2 --seeds 2 --minutes 3 --archs mixer transformer ...

With --sweep, results.md holds the grid (arch x point -> final val loss, steps, tokens/s; a best point
at the edge of the grid is marked), then each arch's best point confirmed, and the verdict; curves.png
shows the confirmation runs' val loss against time, and final val loss against the swept value.
Run the same command again after an interruption: finished runs are kept and the others continue
from their checkpoints. A larger --minutes extends every run from where it stopped (its lr schedule
is then stretched over the new budget, which is not quite the same as training that long from scratch).
"""
import argparse
import csv
import dataclasses
import itertools
import json
import re
import shlex
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import train
from cli import (MODEL_CHOICES, WITHOUT_EFFECT, AtomicFile, HelpFormatter, UserError, check_folder,
                 load_checkpoint,
                 pick_device, positive_float, positive_int, run, write_text)
from experiments.common import (COLOURS, VARIANTS, best_of, machine, mean_and_range, per_second,
                                pyplot, ranking, refuse_flags_for_no_variant, save_figure,
                                variant_flags)
from mixer import Config

CURVE_FIELDS = ["arch", "point", "seed", "step", "tokens", "elapsed_s", "train_loss", "val_loss"]
OWN_FLAGS = ("--max_minutes", "--resume")  # compare.py sets these itself for every run
SET_PER_RUN = ("arch", "seed", "out_dir", "max_minutes", "resume", "max_iters")  # cannot be swept


class Run(NamedTuple):
    """One training run; point is {flag: value text} of its sweep point ({} without --sweep)."""
    arch: str
    seed: int
    out_dir: Path
    point: dict = {}


def run_dirs(args):
    """Every run without --sweep, in the order they are trained: all archs for a seed, then the next seed."""
    return [Run(arch, seed, Path(args.out_dir) / f"{arch}-seed{seed}")
            for seed in range(args.seed, args.seed + args.seeds) for arch in args.archs]


# ---------------------------------------------------------------------------------------- the sweep

def parse_grid(specs, train_argv):
    """[(flag, [value text, ...]), ...] from FLAG=V1,V2,... specs. Each value is checked now as train.py
    reads that flag, so a typo fails before hours of training, not after."""
    given = {arg.lstrip("-").split("=")[0] for arg in train_argv if arg.startswith("--")}
    grid = []
    for spec in specs:
        flag, eq, values = spec.partition("=")
        flag = flag.strip().lstrip("-")
        if not eq or not flag:
            raise UserError(f"--sweep {spec!r}: write FLAG=V1,V2,... (e.g. lr=1e-3,3e-3,1e-2)")
        if flag not in TAKES_A_VALUE:
            raise UserError(f"--sweep {flag}: not a train.py flag that takes a value (see python train.py --help)")
        if flag in SET_PER_RUN:
            raise UserError(f"--sweep {flag}: compare.py sets --{flag} itself for every run (use --archs, --seed, "
                            "--out_dir or --minutes)")
        if flag in given or flag in (f for f, _ in grid):
            raise UserError(f"--sweep {flag}: --{flag} is given twice (once swept): give it once")
        texts = [v.strip() for v in values.split(",")]
        if not all(texts):
            raise UserError(f"--sweep {flag}={values}: an empty value (write V1,V2,... with no empty entries)")
        if len(set(texts)) < len(texts):
            raise UserError(f"--sweep {flag}={values}: a value is listed twice")
        for text in texts:
            check_value(flag, text)
        grid.append((flag, texts))
    return grid


# The train.py flags a sweep can vary: every TrainConfig field but the switch --resume, every model field
TAKES_A_VALUE = {name for name, f in train.TRAIN_FIELDS.items() if f.metadata["kind"]} | \
    {f.name for f in dataclasses.fields(Config)} - {"vocab_size", "causal"}


def check_value(flag, text):
    """A UserError unless train.py reads text as a value of --flag."""
    choices = {**{name: f.metadata["choices"] for name, f in train.TRAIN_FIELDS.items()}, **MODEL_CHOICES}
    if choices.get(flag) and text not in choices[flag]:
        raise UserError(f"--sweep {flag}={text}: choose from {', '.join(choices[flag])}")
    try:
        train.parse_flags([f"--{flag}", text], exit_on_error=False)
    except argparse.ArgumentError as e:
        raise UserError(f"--sweep {flag}={text}: {e.message}") from None


def flags_for(arch, argv):
    """argv without the model flags that mean nothing to arch (cli.WITHOUT_EFFECT): every arch of a
    comparison gets the same command line, and each takes the flags that apply to it."""
    kept, i = [], 0
    while i < len(argv):
        if argv[i].startswith("--") and argv[i][2:].partition("=")[0] in WITHOUT_EFFECT[arch]:
            i += 1 if "=" in argv[i] else 2  # the flag and its value
            continue
        kept.append(argv[i])
        i += 1
    return kept


def grid_points(grid):
    """Every combination of the swept values, as {flag: value text}."""
    flags = [flag for flag, _ in grid]
    return [dict(zip(flags, values)) for values in itertools.product(*(texts for _, texts in grid))]


def point_name(point):
    return " ".join(f"{flag}={value}" for flag, value in point.items())


def point_slug(point):
    """A folder-name-safe form of a point: lr=3e-3 n_embd=128 -> lr3e-3_n_embd128."""
    return "_".join(flag + re.sub(r"[^A-Za-z0-9.+-]", "-", value) for flag, value in point.items())


def selection_runs(args, grid):
    """The grid on the selection seed (--seed), archs interleaved at each point."""
    return [Run(arch, args.seed, Path(args.out_dir) / f"{arch}-{point_slug(point)}-seed{args.seed}", point)
            for point in grid_points(grid) for arch in args.archs]


def confirmation_runs(args, best):
    """Each arch's best point on --seeds fresh seeds (--seed + 1, ...)."""
    return [Run(arch, seed, Path(args.out_dir) / f"{arch}-{point_slug(best[arch])}-seed{seed}", best[arch])
            for seed in range(args.seed + 1, args.seed + 1 + args.seeds) for arch in args.archs]


def best_points(results):
    """{arch: the point whose run ends with the lowest val loss} over the given (selection) results."""
    return {arch: r["point"] for arch, r in best_of(results, lambda r: r["arch"], final_val_loss).items()}


def edge_notes(grid, point):
    """Where a best point sits at the edge of a numeric swept range: the optimum may lie outside."""
    notes = []
    for flag, texts in grid:
        try:
            values = sorted(float(t) for t in texts)
        except ValueError:
            continue
        if len(values) > 1 and float(point[flag]) in (values[0], values[-1]):
            notes.append(f"{flag} at the grid's {'lower' if float(point[flag]) == values[0] else 'upper'} edge")
    return notes


def is_finished(ckpt_path, minutes):
    """True when the run's checkpoint already covers the time budget (or its step budget)."""
    if not ckpt_path.exists():
        return False
    ckpt = load_checkpoint(ckpt_path, needs=("elapsed", "step", "train_args"))
    return ckpt["elapsed"] >= minutes * 60 or ckpt["step"] >= ckpt["train_args"]["max_iters"]


def train_all(args, train_argv, runs, stage=""):
    for n, job in enumerate(runs, 1):
        ckpt_path = job.out_dir / "ckpt.pt"
        what = f"[{stage}{n}/{len(runs)}] {job.arch}" + (f" {point_name(job.point)}" if job.point else "") + f" seed {job.seed}"
        if is_finished(ckpt_path, args.minutes):
            print(f"{what}: done already ({job.out_dir})")
            continue
        resume = ckpt_path.exists()
        print(f"{what}: {'continuing' if resume else 'training'} for {args.minutes:g} minutes into {job.out_dir}",
              flush=True)
        swept = [arg for flag, value in job.point.items() for arg in (f"--{flag}", value)]
        # a time budget: --max_iters must not end the run first, unless the user asked for it
        argv = ["--max_iters", str(10**9), *train_argv, *swept, *variant_flags(job.arch), "--seed", str(job.seed),
                "--out_dir", str(job.out_dir), "--max_minutes", str(args.minutes)] + (["--resume"] if resume else [])
        summary = train_run(flags_for(VARIANTS[job.arch]["arch"], argv))
        if summary["interrupted"]:
            raise UserError("interrupted: run the same command again to continue where it stopped")


def train_run(argv):
    """One train.py run, in this process, of a train.py command line (a test replaces it)."""
    return train.train(*train.parse_args(argv))


# ---------------------------------------------------------------------------------------- results

def read_run(run):
    """One finished run: its eval rows (log.csv) and its parameter count (checkpoint)."""
    with open(run.out_dir / "log.csv") as f:
        rows = [{"arch": run.arch, "point": point_name(run.point), "seed": run.seed, **r} for r in csv.DictReader(f)]
    ckpt = load_checkpoint(run.out_dir / "ckpt.pt")
    return {"arch": run.arch, "seed": run.seed, "point": run.point, "rows": rows,
            "params": sum(t.numel() for t in ckpt["model"].values()), "layout": ckpt["train_args"]["layout"],
            "config": ckpt["config"]}


def final_val_loss(result):
    return float(result["rows"][-1]["val_loss"])


def setting_line(result, device_name, swept=()):
    """The model and data setting of a run, without the swept flags (they differ between runs)."""
    config = result["config"]
    parts = [f"d{config['n_embd']}" if "n_embd" not in swept else None,
             f"{config['n_layer']} layers" if "n_layer" not in swept else None,
             f"T{config['block_size']}" if "block_size" not in swept else None, f"vocab {config['vocab_size']}"]
    return (f"Model: {', '.join(p for p in parts if p)}; layout {result['layout']}. "
            f"Machine: {device_name}, torch {torch.__version__}.")


def arch_table(results, archs):
    """The per-arch table (mean and spread over seeds) and {arch: [final val loss per seed]}."""
    by_arch = {arch: [r for r in results if r["arch"] == arch] for arch in archs}
    final_val = {arch: [final_val_loss(r) for r in rs] for arch, rs in by_arch.items()}
    lines = ["| arch | params | steps | tokens seen (M) | tokens/s | train loss | val loss |",
             "|---|---|---|---|---|---|---|"]
    for arch, rs in by_arch.items():
        last = [r["rows"][-1] for r in rs]
        tokens = [int(row["tokens"]) for row in last]
        lines.append(f"| {arch} | {rs[0]['params'] / 1e6:.2f}M | {mean_and_range([int(row['step']) for row in last], ',.0f')} | "
                     f"{mean_and_range([t / 1e6 for t in tokens], '.2f')} | {speed_cells(last)} | "
                     f"{mean_and_range([float(row['train_loss']) for row in last], '.3f')} | {mean_and_range(final_val[arch], '.3f')} |")
    return lines, final_val


def speed_cells(last_rows):
    """Tokens/s of runs (their last log rows), mean (min-max); '-' where a run's training time
    rounds to 0 s (a very short run)."""
    speed = [per_second(int(row["tokens"]), float(row["elapsed_s"])) for row in last_rows]
    return "-" if None in speed else mean_and_range(speed, ",.0f")


def val_at_tokens(result, tokens):
    """A run's val loss when it had seen `tokens` tokens (linear between its evals)."""
    rows = result["rows"]
    return float(np.interp(tokens, [int(r["tokens"]) for r in rows], [float(r["val_loss"]) for r in rows]))


def equal_tokens(results, archs):
    """The per-token view: (lines, tokens, {arch: [val loss per seed]}) at the token count that every
    run reached (where the slowest one ended), so a reader sees how much of an equal-time win is speed."""
    tokens = min(int(r["rows"][-1]["tokens"]) for r in results)
    at = {arch: [val_at_tokens(r, tokens) for r in results if r["arch"] == arch] for arch in archs}
    lines = [f"At equal tokens: val loss when every run had seen {tokens / 1e6:.2f}M tokens (where the slowest one "
             "ended; linear between evals), mean (min-max) over seeds:", "", "| arch | val loss at equal tokens |",
             "|---|---|", *(f"| {arch} | {mean_and_range(v, '.3f')} |" for arch, v in at.items()), "", *ranking(at)]
    return lines, tokens, at


def write_results(args, results, command):
    table, final_val = arch_table(results, args.archs)
    lines = [f"# Equal-time comparison: {args.minutes:g} minutes per run, {args.seeds} seed(s)", "",
             f"`{command}`", "", setting_line(results[0], args.machine), "", *table, "",
             "Losses are the last eval of each run; with several seeds, mean (min-max).", "", *ranking(final_val), "",
             *equal_tokens(results, args.archs)[0]]
    finish_results(args, lines, results)


def write_sweep_results(args, grid, selection, confirmation, best, command):
    lines = [f"# Each arch at its best point: a {len(grid_points(grid))}-point grid, {args.minutes:g} minutes per run",
             "", f"`{command}`", "", setting_line(selection[0], args.machine, [flag for flag, _ in grid]), "",
             f"## Grid (selection seed {args.seed})", "",
             "| arch | point | params | steps | tokens/s | val loss |", "|---|---|---|---|---|---|"]
    for r in sorted(selection, key=lambda r: args.archs.index(r["arch"])):
        last = r["rows"][-1]
        marker = " (best)" if r["point"] == best[r["arch"]] else ""
        lines.append(f"| {r['arch']} | {point_name(r['point'])}{marker} | {r['params'] / 1e6:.2f}M | "
                     f"{int(last['step']):,} | {speed_cells([last])} | "
                     f"{final_val_loss(r):.3f} |")
    lines += ["", f"## Best points, confirmed on {args.seeds} fresh seed(s) "
                  f"({', '.join(str(s) for s in range(args.seed + 1, args.seed + 1 + args.seeds))})", ""]
    for arch in args.archs:
        notes = edge_notes(grid, best[arch])
        lines.append(f"- {arch}: {point_name(best[arch])}" +
                     (f" ({'; '.join(notes)}: the optimum may lie outside the grid)" if notes else " (inside the grid)"))
    table, final_val = arch_table(confirmation, args.archs)
    at_tokens, tokens, at = equal_tokens(confirmation, args.archs)
    lines += ["", *table, "", "Confirmation runs only (the selection run is not counted); last eval of each run, "
              "mean (min-max) over seeds.", "", "## Verdict", "", *ranking(final_val), "", *at_tokens]
    finish_results(args, lines, selection + confirmation)
    summary = {"block_size": confirmation[0]["config"]["block_size"], "layout": confirmation[0]["layout"],
               "minutes": args.minutes, "machine": args.machine, "command": command, "equal_tokens": tokens,
               "archs": {arch: {"point": best[arch], "edge": edge_notes(grid, best[arch]), "val": final_val[arch],
                                "tokens": [int(r["rows"][-1]["tokens"]) for r in confirmation if r["arch"] == arch],
                                "val_at_equal_tokens": at[arch]} for arch in args.archs}}
    write_text(Path(args.out_dir) / "summary.json", json.dumps(summary, indent=1) + "\n")


def finish_results(args, lines, results):
    """Write results.md and curves.csv (every eval of every run), and print the results."""
    write_text(Path(args.out_dir) / "results.md", "\n".join(lines) + "\n")
    with AtomicFile(Path(args.out_dir) / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, CURVE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(row for r in results for row in r["rows"])
    print("\n".join(lines))


def curves_pyplot(out_dir):
    return pyplot("curves.png", f"the curves are in {Path(out_dir) / 'curves.csv'}")


def draw_val_curves(results, first_seed, ax_time, ax_tokens=None):
    """Val loss against training minutes (and against tokens seen), one colour per arch."""
    axes = [ax for ax in (ax_time, ax_tokens) if ax is not None]
    for r in results:
        minutes = [float(row["elapsed_s"]) / 60 for row in r["rows"]]
        tokens = [int(row["tokens"]) / 1e6 for row in r["rows"]]
        val = [float(row["val_loss"]) for row in r["rows"]]
        label = r["arch"] if r["seed"] == first_seed else None  # one legend entry per arch
        for ax, x in zip(axes, (minutes, tokens)):
            ax.plot(x, val, color=COLOURS[r["arch"]], label=label, alpha=0.9 if label else 0.5)
    ax_time.set(xlabel="training time (minutes)", ylabel="val loss")
    if ax_tokens is not None:
        ax_tokens.set(xlabel="tokens seen (millions)")
    for ax in axes:
        ax.grid(alpha=0.3)
        # the first evals are near ln(vocab); start the axis where the archs differ
        ax.set_ylim(top=min(float(r["rows"][min(1, len(r["rows"]) - 1)]["val_loss"]) for r in results) + 0.5)
    ax_time.legend()


def save(fig, out_dir):
    fig.tight_layout()
    save_figure(fig, Path(out_dir) / "curves.png")


def plot_curves(args, results):
    """curves.png: val loss against training minutes and against tokens seen, one colour per arch."""
    plt = curves_pyplot(args.out_dir)
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    draw_val_curves(results, args.seed, *axes)
    fig.suptitle(f"Equal wall-clock comparison, {args.minutes:g} min per run, {args.seeds} seed(s), "
                 f"layout {results[0]['layout']}")
    save(fig, args.out_dir)


def plot_sweep(args, grid, selection, confirmation, best):
    """curves.png: the confirmation runs' val loss against time, and final val loss against the first
    swept flag (one line per arch and per value of the other swept flags), best points circled."""
    plt = curves_pyplot(args.out_dir)
    if plt is None:
        return
    fig, (curves, sweep) = plt.subplots(1, 2, figsize=(11, 4))
    draw_val_curves(confirmation, args.seed + 1, curves)
    curves.set_title(f"best point of each arch, {args.seeds} fresh seed(s)", fontsize=10)
    flag, texts = grid[0]
    numeric = all(re.fullmatch(r"[-+0-9.eE]+", t) for t in texts)
    x_of = (lambda t: float(t)) if numeric else texts.index
    styles = itertools.cycle(["-", "--", ":", "-."])
    for arch in args.archs:
        for rest in grid_points(grid[1:]) or [{}]:
            rs = sorted((r for r in selection if r["arch"] == arch and all(r["point"][k] == v for k, v in rest.items())),
                        key=lambda r: x_of(r["point"][flag]))
            xs, ys = [x_of(r["point"][flag]) for r in rs], [final_val_loss(r) for r in rs]
            sweep.plot(xs, ys, marker="o", color=COLOURS[arch], linestyle=next(styles) if rest else "-",
                       label=" ".join([arch, point_name(rest)]).strip())
        sweep.plot([x_of(best[arch][flag])], [min(final_val_loss(r) for r in selection if r["arch"] == arch)],
                   "o", markersize=14, markerfacecolor="none", color=COLOURS[arch])
    if numeric and min(map(float, texts)) > 0 and max(map(float, texts)) / min(map(float, texts)) >= 10:
        sweep.set_xscale("log")
    if not numeric:
        sweep.set_xticks(range(len(texts)), texts)
    sweep.set(xlabel=flag, ylabel=f"final val loss (seed {args.seed})")
    sweep.set_title("the grid (circled: each arch's best)", fontsize=10)
    sweep.grid(alpha=0.3)
    sweep.legend(fontsize=8)
    fig.suptitle(f"Each arch at its best point, {args.minutes:g} min per run, layout {selection[0]['layout']}")
    save(fig, args.out_dir)


# ---------------------------------------------------------------------------------------- --summary

def summarize(args):
    """summary.md and summary.png over several sweeps (one per context length, say): each arch's
    confirmed val loss against the setting, at equal time and at equal tokens, with the verdicts."""
    check_folder(args.out_dir)
    sweeps = []
    for folder in args.summary:
        path = Path(folder) / "summary.json"
        if not path.is_file():
            raise UserError(f"{path} not found: run python -m experiments.compare --sweep ... --out_dir {folder} to the end first")
        try:
            sweeps.append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            raise UserError(f"{path} is cut off or not JSON: run that sweep's command again (it "
                            "reads its finished runs back and writes summary.json anew)") from None
    sweeps.sort(key=lambda s: s["block_size"])
    archs = [arch for arch in VARIANTS if any(arch in s["archs"] for s in sweeps)]
    lines = ["# Each arch at its best learning rate, by context length", "",
             f"`{shlex.join(['python', '-m', 'experiments.compare', '--summary', *args.summary])}`", "",
             "Commands: the results.md beside each summary.json.", "",
             *(f"- T = {s['block_size']}: {s['minutes']:g} minutes per run on {s['machine']}" for s in sweeps), ""]
    for title, key in (("Equal time: val loss at the end of each run", "val"),
                       ("Equal tokens: val loss where the slowest run of the setting ended", "val_at_equal_tokens")):
        lines += [f"## {title}", "", "| T | " + " | ".join(archs) + " | verdict |", "|---|" + "---|" * (len(archs) + 1)]
        for s in sweeps:
            measured = {a: r for a, r in s["archs"].items() if key in r}  # a sweep may predate the per-token view
            cells = [summary_cell(measured[a], key) if a in measured else "-" for a in archs]
            verdict = " ".join(ranking({a: r[key] for a, r in measured.items()})) if measured else "not measured"
            lines.append(f"| {s['block_size']} | " + " | ".join(cells) + f" | {verdict} |")
        lines.append("")
    lines.append("Cells: mean (min-max) over the confirmation seeds, each arch's best point and its tokens seen (M); "
                 "'edge': that best point lies at the edge of its grid.")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    write_text(Path(args.out_dir) / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_summary(args, sweeps, archs)


def summary_cell(result, key):
    edge = " (edge)" if result["edge"] else ""
    tokens = f", {statistics.mean(result['tokens']) / 1e6:.2f}M" if result.get("tokens") else ""
    return f"{mean_and_range(result[key], '.3f')}, {point_name(result['point'])}{edge}{tokens}"


def plot_summary(args, sweeps, archs):
    plt = pyplot("summary.png", f"the numbers are in {Path(args.out_dir) / 'summary.md'}")
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in zip(axes, ("val", "val_at_equal_tokens"), ("equal time", "equal tokens")):
        for arch in archs:
            points = [(s["block_size"], s["archs"][arch][key]) for s in sweeps if key in s["archs"].get(arch, {})]
            if not points:
                continue
            T = [t for t, _ in points]
            mean = np.array([statistics.mean(v) for _, v in points])
            spread = [mean - [min(v) for _, v in points], [max(v) for _, v in points] - mean]
            ax.errorbar(T, mean, yerr=spread, marker="o", capsize=4, color=COLOURS[arch], label=arch)
        ax.set(xscale="log", xlabel="context length T", title=f"{title} (each arch at its best lr; bars: seed range)")
        ax.set_xticks([s["block_size"] for s in sweeps], [str(s["block_size"]) for s in sweeps])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val loss (confirmation seeds)")
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, Path(args.out_dir) / "summary.png")


def compare(args, train_argv, command):
    bad = [flag for flag in train_argv if flag.split("=")[0] in OWN_FLAGS]
    if bad:
        raise UserError(f"{bad[0]} is set by compare.py (use --minutes; a second run of the same command resumes)")
    check_folder(args.out_dir)
    given, model_given = train.parse_flags(train_argv)  # a bad train.py flag fails now, not hours later
    args.machine = machine(pick_device(given.get("device", "auto")))
    grid = parse_grid(args.sweep, train_argv) if args.sweep else None
    refuse_flags_for_no_variant([*model_given, *(flag for flag, _ in grid or [])], args.archs)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    if grid is None:
        train_all(args, train_argv, run_dirs(args))
        results = [read_run(r) for r in run_dirs(args)]
        write_results(args, results, command)
        plot_curves(args, results)
        return
    runs = selection_runs(args, grid)
    train_all(args, train_argv, runs, stage="grid ")
    selection = [read_run(r) for r in runs]
    best = best_points(selection)
    print("best points: " + "; ".join(f"{arch} {point_name(point)}" for arch, point in best.items()), flush=True)
    runs = confirmation_runs(args, best)
    train_all(args, train_argv, runs, stage="confirm ")
    confirmation = [read_run(r) for r in runs]
    write_sweep_results(args, grid, selection, confirmation, best, command)
    plot_sweep(args, grid, selection, confirmation, best)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--archs", nargs="+", choices=VARIANTS, default=["mixer", "transformer", "hybrid"],
                   help="which archs, in this order (toeplitz: the mixer with --mixing toeplitz)")
    p.add_argument("--minutes", type=positive_float, default=10.0, help="training time per run")
    p.add_argument("--seeds", type=positive_int, default=1, help="runs per arch, with seeds --seed, --seed + 1, ...; "
                                                                 "with --sweep, confirmation seeds --seed + 1, ...")
    p.add_argument("--seed", type=int, default=1337, help="the first seed")
    p.add_argument("--out_dir", default="out-compare", help="one folder per run, plus results.md and the curves")
    p.add_argument("--sweep", nargs="+", metavar="FLAG=V1,V2", help="a grid over train.py flags: each arch's best "
                                                                      "point is chosen on --seed, confirmed on --seeds fresh seeds")
    p.add_argument("--summary", nargs="+", metavar="DIR", help="no training: summary.md and summary.png across the "
                                                                "--out_dir folders of finished sweeps")
    args, train_argv = p.parse_known_args(argv)
    if args.summary:
        return run("experiments.compare", summarize, args)
    run("experiments.compare", lambda a: compare(a, train_argv, shlex.join(["python", "-m", "experiments.compare", *argv])), args)


if __name__ == "__main__":
    main()
