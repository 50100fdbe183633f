"""
Val loss against position, past the context a model was trained at (the picture of ALiBi, Press et al.
2022, figure 1): does a model use a longer context than it trained on, or break on it?

    python -m experiments.length --ckpt out-compare/*/ckpt.pt                    # 4 x each model's block_size
    python -m experiments.length --ckpt a/ckpt.pt b/ckpt.pt --factor 2 --windows 64 --out_dir out-length

Each model reads --windows windows of factor x T + 1 val tokens (T: its block_size; the same windows
for every model of one T, packed text as train.py's packed layout), two ways:
  whole   the window in one forward, where the arch defines it: the Toeplitz mixer as a convolution
          (offsets past its kernel add nothing; past T each position takes the bias of position T - 1),
          attention by RoPE at positions it never trained at. The full mixer's W (and the hybrid's with
          it) ends at T: its whole curve stops there.
  crop    position p >= T with the last T tokens as its context, as Model.generate crops past T
          (nanoGPT): what every arch can do. Before T nothing is cropped: the same as whole.
Loss at position p is the mean cross-entropy of predicting token p + 1 from tokens 0..p.
Runs in folders NAME-seedS (experiments.compare's) are averaged over their seeds, with the spread.
--out_dir gets losses.csv (every checkpoint, every position), table.md (mean loss per band of T
positions) and length.png (needs matplotlib).
"""
import argparse
import csv
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cli import (AtomicFile, HelpFormatter, Progress, UserError, check_folder, load_checkpoint,
                 model_from_checkpoint, positive_int, run, write_text)
from experiments.common import mean_and_range, pyplot, save_figure
from train import load_data


def labels_of(paths):
    """{path: its run's folder without the seed}, with as many parent folders as it takes to tell the runs
    apart: the seeds of one run share a label (a/T128/toeplitz-seed1338/ckpt.pt, b/T512/toeplitz-seed1338/ckpt.pt
    -> T128/toeplitz, T512/toeplitz)."""
    names = [Path(p).absolute().parent for p in paths]
    names = [name.parent / re.sub(r"-seed\d+$", "", name.name) for name in names]
    for depth in range(1, max(len(name.parts) for name in names) + 1):
        labels = ["/".join(name.parts[-depth:]) for name in names]
        if len(set(labels)) == len(set(names)):
            return dict(zip(paths, labels))


def by_label(results, labels):
    """[(label, [its checkpoints' results])] in the order the checkpoints were given."""
    groups = {}
    for path, result in results.items():
        groups.setdefault(labels[path], []).append(result)
    return list(groups.items())


def draw_windows(tokens, length, count, seed):
    """[count, length + 1] windows of the val tokens at random places (the same for the same seed)."""
    starts = np.random.default_rng(seed).integers(0, len(tokens) - length, size=count)
    return torch.from_numpy(np.stack([tokens[s : s + length + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def whole_losses(model, windows, batch_size):
    """[length]: mean loss at each position, each window in one forward."""
    total = torch.zeros(windows.size(1) - 1)
    for batch in windows.split(batch_size):
        logits, _ = model(batch[:, :-1])
        total += F.cross_entropy(logits.transpose(1, 2).float(), batch[:, 1:], reduction="none").sum(0)
    return total / len(windows)


@torch.no_grad()
def crop_losses(model, windows, batch_size):
    """[length - T + 1]: mean loss at positions T - 1 .. length - 1, each from its last T tokens only."""
    T = model.config.block_size
    total = 0.0
    for window in windows:
        contexts = window[:-1].unfold(0, T, 1)  # [length - T + 1, T]: the T tokens ending at each position
        last = torch.cat([model.hidden_states(rows)[:, -1] for rows in contexts.split(batch_size)])  # [P, d]
        total = total + F.cross_entropy(model.lm_head(last).float(), window[T:], reduction="none")
    return total / len(windows)


def checked_inputs(paths, args):
    """{path: (model, val tokens)}: every checkpoint and its data read, and checked against each
    other (the vocabulary, the window length), before any measurement."""
    inputs = {}
    for path in paths:
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, path).eval()
        data_dir = args.data_dir or ckpt.get("train_args", {}).get("data_dir")
        if data_dir is None:
            raise UserError(f"{path} does not say which data it was trained on: give --data_dir")
        splits, meta = load_data(data_dir)
        if meta["vocab_size"] != ckpt["data_meta"]["vocab_size"]:
            raise UserError(f"{path} was trained on a {ckpt['data_meta']['vocab_size']}-token vocabulary, "
                            f"{data_dir} has {meta['vocab_size']}: give the --data_dir it was trained on")
        length = args.factor * model.config.block_size
        if len(splits["val"].tokens) <= length:
            raise UserError(f"the val split of {data_dir} has {len(splits['val'].tokens)} tokens, fewer "
                            f"than a window of {length + 1}: lower --factor")
        inputs[path] = (model, splits["val"].tokens)
    return inputs


def measure(inputs, args):
    """{path: (block_size, whole [factor x T] with NaN past T where undefined, crop [factor x T])}."""
    results, progress = {}, Progress(log_every=30)
    for n, (path, (model, tokens)) in enumerate(inputs.items()):
        T = model.config.block_size
        windows = draw_windows(tokens, args.factor * T, args.windows, args.seed)
        progress.update(f"[{n + 1}/{len(inputs)}] {path}: whole windows")
        whole = whole_losses(model, windows if model.runs_past_block_size() else windows[:, : T + 1], args.batch_size)
        whole = torch.cat([whole, torch.full((args.factor * T - len(whole),), math.nan)])
        progress.update(f"[{n + 1}/{len(inputs)}] {path}: cropped contexts")
        crop = torch.cat([whole[: T - 1], crop_losses(model, windows, args.batch_size)])
        results[path] = (T, whole, crop)
    progress.done(f"measured {len(inputs)} checkpoints")
    return results


def band_table(results, labels, factor):
    """Markdown: per label, the mean loss over each band of T positions, whole and cropped (mean (min-max) over seeds)."""
    head = [f"{b}T-{b + 1}T" for b in range(factor)]
    lines = ["| model | T | way | " + " | ".join(head) + " |", "|---|---|---|" + "---|" * factor]
    for label, runs in by_label(results, labels):
        T = runs[0][0]
        for way, index in (("whole", 1), ("crop", 2)):
            cells = []
            for b in range(factor):
                means = [r[index][b * T : (b + 1) * T].nanmean().item() for r in runs]
                cells.append("-" if any(math.isnan(m) for m in means) else mean_and_range(means, ".3f"))
            lines.append(f"| {label} | {T} | {way} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(results, labels, path):
    with AtomicFile(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "label", "block_size", "position", "whole_loss", "crop_loss"])
        for ckpt, (T, whole, crop) in results.items():
            for p, (w, c) in enumerate(zip(whole.tolist(), crop.tolist())):
                writer.writerow([ckpt, labels[ckpt], T, p, f"{w:.5f}", f"{c:.5f}"])


def binned(curve, bin_size):
    """(bin centres, the mean of each bin of bin_size positions); NaN where a bin holds an undefined position."""
    n = len(curve) // bin_size * bin_size
    return torch.arange(n // bin_size) * bin_size + (bin_size - 1) / 2, curve[:n].view(-1, bin_size).mean(1)


def plot(results, labels, path, bin_size):
    """Top: loss against position, whole (solid) and cropped (dotted). Bottom: whole minus cropped, what
    the context past T changes; the same windows for every model, so the text's ups and downs cancel."""
    plt = pyplot(path, "the numbers are in losses.csv and table.md")
    if plt is None:
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True, height_ratios=(3, 2))
    for i, (label, runs) in enumerate(by_label(results, labels)):
        whole, crop = (torch.stack([r[index] for r in runs]).mean(0) for index in (1, 2))  # mean over seeds
        top.plot(*binned(whole, bin_size), "-", color=f"C{i}", label=f"{label} ({len(runs)} seeds)")
        top.plot(*binned(crop, bin_size), ":", color=f"C{i}")
        if not whole.isnan().all():
            bottom.plot(*binned(whole - crop, bin_size), "-", color=f"C{i}")
    for T in {r[0] for r in results.values()}:
        for ax in (top, bottom):
            ax.axvline(T, color="grey", lw=0.8)
    bottom.axhline(0, color="black", lw=0.5)
    top.set_ylabel("val loss (solid: whole window, dotted: cropped to T)")
    bottom.set_ylabel("whole - cropped")
    bottom.set_xlabel(f"position (mean of bins of {bin_size}); grey: the trained context T")
    top.set_title("Val loss against position, past the trained context")
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def length(args):
    paths = [str(p) for p in args.ckpt]
    out = Path(args.out_dir)
    check_folder(out)
    results, labels = measure(checked_inputs(paths, args), args), labels_of(paths)
    table = band_table(results, labels, args.factor)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "table.md", f"{table}\n")
    write_csv(results, labels, out / "losses.csv")
    plot(results, labels, out / "length.png", args.bin)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", nargs="+", required=True, help="checkpoints written by train.py")
    p.add_argument("--factor", type=positive_int, default=4, help="windows of factor x each model's block_size")
    p.add_argument("--windows", type=positive_int, default=128, help="val windows per model")
    p.add_argument("--data_dir", help="default: the one each checkpoint was trained on")
    p.add_argument("--batch_size", type=positive_int, default=32)
    p.add_argument("--bin", type=positive_int, default=8, help="positions per point of the picture")
    p.add_argument("--seed", type=int, default=0, help="where the windows are drawn")
    p.add_argument("--out_dir", default="out-length")
    run("experiments.length", length, p.parse_args(argv))


if __name__ == "__main__":
    main()
