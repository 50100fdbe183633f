"""
The paper's language-model comparison in one command: mixer, transformer and hybrid trained one after
another on the same data, model size, seeds and wall-clock budget; then a table and the loss curves.

    python compare.py --minutes 10                                   # the three archs, one seed each
    python compare.py --minutes 5 --seeds 2 --n_embd 128 --n_layer 4 --block_size 128 --lr 1e-3
    python compare.py --minutes 5 --archs mixer transformer --layout stories --block_size 32

Every flag compare.py does not know goes to train.py unchanged (data, model size, lr, --layout, ...).
--out_dir (default out-compare) holds one folder per run, ARCH-seedS, and:
    results.md   the table (mean and spread over seeds), with the command and the machine
    curves.csv   every eval of every run
    curves.png   val loss against training time and against tokens seen (needs matplotlib)
Run the same command again after an interruption: finished runs are kept and the others continue
from their checkpoints. A larger --minutes extends every run from where it stopped (its lr schedule
is then stretched over the new budget, which is not quite the same as training that long from scratch).
"""
import argparse
import csv
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch

import train
from cli import HelpFormatter, UserError, positive_float, positive_int, run
from mixer import ARCHS

CURVE_FIELDS = ["arch", "seed", "step", "tokens", "elapsed_s", "train_loss", "val_loss"]
OWN_FLAGS = ("--max_minutes", "--resume")  # compare.py sets these itself for every run


def run_dirs(args):
    """(arch, seed, folder) of every run, in the order they are trained: all archs for a seed, then the next seed."""
    return [(arch, seed, Path(args.out_dir) / f"{arch}-seed{seed}")
            for seed in range(args.seed, args.seed + args.seeds) for arch in args.archs]


def is_finished(ckpt_path, minutes):
    """True when the run's checkpoint already covers the time budget (or its step budget)."""
    if not ckpt_path.exists():
        return False
    ckpt = train.load_checkpoint(ckpt_path, needs=("elapsed", "step", "train_args"))
    return ckpt["elapsed"] >= minutes * 60 or ckpt["step"] >= ckpt["train_args"]["max_iters"]


def train_all(args, train_argv):
    runs = run_dirs(args)
    for n, (arch, seed, out_dir) in enumerate(runs, 1):
        ckpt_path = out_dir / "ckpt.pt"
        if is_finished(ckpt_path, args.minutes):
            print(f"[{n}/{len(runs)}] {arch} seed {seed}: done already ({out_dir})")
            continue
        resume = ckpt_path.exists()
        print(f"[{n}/{len(runs)}] {arch} seed {seed}: {'continuing' if resume else 'training'} for "
              f"{args.minutes:g} minutes into {out_dir}", flush=True)
        # a time budget: --max_iters must not end the run first, unless the user asked for it
        argv = ["--max_iters", str(10**9), *train_argv, "--arch", arch, "--seed", str(seed), "--out_dir", str(out_dir),
                "--max_minutes", str(args.minutes)] + (["--resume"] if resume else [])
        summary = train.train(train.parse_args(argv))
        if summary["interrupted"]:
            raise UserError("interrupted: run the same command again to continue where it stopped")


# ---------------------------------------------------------------------------------------- results

def read_run(arch, seed, out_dir):
    """One finished run: its eval rows (log.csv) and its parameter count (checkpoint)."""
    with open(out_dir / "log.csv") as f:
        rows = [{"arch": arch, "seed": seed, **r} for r in csv.DictReader(f)]
    ckpt = train.load_checkpoint(out_dir / "ckpt.pt")
    return {"arch": arch, "seed": seed, "rows": rows, "params": sum(t.numel() for t in ckpt["model"].values()),
            "layout": ckpt["train_args"]["layout"], "config": ckpt["config"]}


def spread(values, fmt):
    """'mean' for one value, 'mean (min-max)' for several."""
    mean = format(statistics.mean(values), fmt)
    return mean if len(values) == 1 else f"{mean} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def ranking(final_val):
    """What the seeds allow us to say about the archs' order, one sentence per neighbouring pair."""
    if all(len(v) == 1 for v in final_val.values()):
        return ["One seed per arch: no spread was measured, so no ranking is claimed (use --seeds 2 or more)."]
    order = sorted(final_val, key=lambda a: statistics.mean(final_val[a]))
    lines = []
    for better, worse in zip(order, order[1:]):
        gap = statistics.mean(final_val[worse]) - statistics.mean(final_val[better])
        if max(final_val[better]) < min(final_val[worse]):
            lines.append(f"{better} < {worse} by {gap:.3f}: every seed of {better} ends below every seed of {worse}.")
        else:
            lines.append(f"{better} vs {worse}: {gap:.3f} apart, within the spread between seeds: no ranking.")
    return lines


def write_results(args, runs, command):
    by_arch = {arch: [r for r in runs if r["arch"] == arch] for arch in args.archs}
    final_val = {arch: [float(r["rows"][-1]["val_loss"]) for r in rs] for arch, rs in by_arch.items()}
    config = runs[0]["config"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines = [f"# Equal wall-clock comparison: {args.minutes:g} minutes per run, {args.seeds} seed(s)", "",
             f"`{command}`", "",
             f"Model: d{config['n_embd']}, {config['n_layer']} layers, T{config['block_size']}, "
             f"vocab {config['vocab_size']}; layout {runs[0]['layout']}. Machine: {device}, torch {torch.__version__}.", "",
             "| arch | params | steps | tokens seen (M) | tokens/s | train loss | val loss |",
             "|---|---|---|---|---|---|---|"]
    for arch, rs in by_arch.items():
        last = [r["rows"][-1] for r in rs]
        tokens = [int(row["tokens"]) for row in last]
        speed = [int(row["tokens"]) / float(row["elapsed_s"]) for row in last]
        lines.append(f"| {arch} | {rs[0]['params'] / 1e6:.2f}M | {spread([int(row['step']) for row in last], ',.0f')} | "
                     f"{spread([t / 1e6 for t in tokens], '.2f')} | {spread(speed, ',.0f')} | "
                     f"{spread([float(row['train_loss']) for row in last], '.3f')} | {spread(final_val[arch], '.3f')} |")
    lines += ["", "Losses are the last eval of each run; with several seeds, mean (min-max).", ""]
    lines += ranking(final_val)
    (Path(args.out_dir) / "results.md").write_text("\n".join(lines) + "\n")
    with open(Path(args.out_dir) / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, CURVE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(row for r in runs for row in r["rows"])
    print("\n".join(lines))


def plot_curves(args, runs):
    """curves.png: val loss against training minutes and against tokens seen, one colour per arch."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no curves.png: matplotlib is not installed (pip install matplotlib); "
              f"the curves are in {Path(args.out_dir) / 'curves.csv'}")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = dict(zip(ARCHS, ("tab:blue", "tab:orange", "tab:green")))
    for r in runs:
        minutes = [float(row["elapsed_s"]) / 60 for row in r["rows"]]
        tokens = [int(row["tokens"]) / 1e6 for row in r["rows"]]
        val = [float(row["val_loss"]) for row in r["rows"]]
        label = r["arch"] if r["seed"] == args.seed else None  # one legend entry per arch
        for ax, x in zip(axes, (minutes, tokens)):
            ax.plot(x, val, color=colours[r["arch"]], label=label, alpha=0.9 if label else 0.5)
    axes[0].set(xlabel="training time (minutes)", ylabel="val loss")
    axes[1].set(xlabel="tokens seen (millions)")
    for ax in axes:
        ax.grid(alpha=0.3)
        # the first evals are near ln(vocab); start the axis where the archs differ
        ax.set_ylim(top=min(float(r["rows"][min(1, len(r["rows"]) - 1)]["val_loss"]) for r in runs) + 0.5)
    axes[0].legend()
    fig.suptitle(f"Equal wall-clock comparison, {args.minutes:g} min per run, {args.seeds} seed(s), "
                 f"layout {runs[0]['layout']}")
    fig.tight_layout()
    fig.savefig(Path(args.out_dir) / "curves.png", dpi=110)
    print(f"wrote {Path(args.out_dir) / 'curves.png'}")


def compare(args, train_argv, command):
    bad = [flag for flag in train_argv if flag.split("=")[0] in OWN_FLAGS]
    if bad:
        raise UserError(f"{bad[0]} is set by compare.py (use --minutes; a second run of the same command resumes)")
    train.parse_args(["--max_iters", "1", *train_argv])  # a bad train.py flag fails now, not hours later
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    train_all(args, train_argv)
    runs = [read_run(*r) for r in run_dirs(args)]
    write_results(args, runs, command)
    plot_curves(args, runs)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS), help="which archs, in this order")
    p.add_argument("--minutes", type=positive_float, default=10.0, help="training time per run")
    p.add_argument("--seeds", type=positive_int, default=1, help="runs per arch, with seeds --seed, --seed + 1, ...")
    p.add_argument("--seed", type=int, default=1337, help="the first seed")
    p.add_argument("--out_dir", default="out-compare", help="one folder per run, plus results.md and the curves")
    args, train_argv = p.parse_known_args(argv)
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        p.error(f"--out_dir {args.out_dir} is a file, not a folder")
    run("compare.py", lambda a: compare(a, train_argv, shlex.join(["python", "compare.py", *argv])), args)


if __name__ == "__main__":
    main()
