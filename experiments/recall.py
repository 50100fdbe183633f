"""
What a mixer cannot do: multi-query associative recall (MQAR), the probe of Arora et al., "Zoology:
Measuring and Improving Recall in Efficient Language Models" (2023). A token mixer whose weights do
not depend on the input cannot look a value up by its key; attention can. experiments.represent shows what the
mixer keeps of its input; this shows what it cannot route.

    python -m experiments.recall                       # the CPU default: 3 archs, 4 and 8 pairs, width 64 (~20 min, 2 cores)
    python -m experiments.recall --widths 32 64        # the README's run: two widths
    python -m experiments.recall --archs mixer transformer --settings 64:4 128:8 --widths 64 128 --lrs 1e-3 3e-3 1e-2
    python -m experiments.recall --settings 64:4 128:8 256:16 --widths 64 128 256 512 --vocab_size 8192 \
        --lrs 1e-4 3e-4 1e-3 3e-3 1e-2 --n_train 100000 --n_test 3000 --steps 20000   # Zoology's scale (GPU)

The task: a sequence of seq_len tokens starts with `pairs` key-value pairs k1 v1 ... kn vn (keys from
the lower half of the vocabulary, values from the upper half, none repeated within a sequence); later
every key is asked once, followed by its value, at gaps drawn from Zoology's power law (power_a: most
queries come soon after the pairs, a few far away); every other position holds a random token. Only
the value after each query key is scored, in the loss and in the accuracy.

Every arch is trained from scratch (mixer.py's models, train.py's optimizer, schedule and step) for
--steps steps at each (setting, width, lr), the same number of layers for all (--n_layer: only the
token mixing differs; Zoology gave attention 2 layers and the others 4). Each arch's learning rate
is chosen per (setting, width) on a validation set, and its accuracy is reported on a separate test
set, so no arch is judged at a learning rate where it happens to fail, nor flattered by its luck.
Attention's recall tends to appear suddenly after enough steps: the table says when a curve was still
rising at the end (a verdict then needs more --steps).

--out_dir (default out-recall) keeps results.jsonl, one line per finished run (a re-run skips
them: an interrupted sweep continues), results.md with the table, recall.png (accuracy against
width, one panel per setting, as Zoology's figure 2) and recall_curves.png (validation accuracy
during training), both with matplotlib.
"""
import argparse
import dataclasses
import itertools
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cli import (HelpFormatter, UserError, add_dtype_flag, add_model_flags, check_folder,
                 config_from_flags, mixed_precision, pick_device, positive_float, positive_int, run,
                 write_text)
from experiments.common import COLOURS, ResultStore, best_of, machine, pyplot, save_figure
from mixer import ARCHS, Config, Model
from train import Schedule, train_step

PLATEAU = 0.02  # a curve has flattened when its last quarter gained less than this accuracy


# ---------------------------------------------------------------------------------------- the task

def check_setting(seq_len, pairs, vocab_size):
    """A UserError for a setting that cannot be generated."""
    if pairs < 1 or 4 * pairs > seq_len:
        raise UserError(f"{pairs} pairs do not fit a sequence of {seq_len}: the pairs take 2 x pairs tokens and "
                        f"their queries 2 x pairs more (at most {seq_len // 4} pairs at length {seq_len})")
    if vocab_size // 2 < pairs:
        raise UserError(f"--vocab_size {vocab_size} is too small for {pairs} pairs: keys and values are drawn "
                        f"without repetition from halves of {vocab_size // 2} tokens")


def mqar(n, seq_len, pairs, vocab_size, power_a, seed):
    """n sequences: inputs and targets [n, seq_len] (int64), targets -1 except after each query key."""
    check_setting(seq_len, pairs, vocab_size)
    rng = np.random.default_rng(seed)
    half, context = vocab_size // 2, 2 * pairs
    keys = np.stack([rng.choice(half, pairs, replace=False) for _ in range(n)])  # [n, pairs]
    values = np.stack([rng.choice(half, pairs, replace=False) for _ in range(n)]) + half
    # query slots of two tokens (key, value) after the pairs; slot g is chosen with p ~ g^(power_a - 1)
    slots = (seq_len - context) // 2
    p = np.arange(1, slots + 1) ** (power_a - 1.0)
    gaps = np.stack([rng.choice(slots, pairs, replace=False, p=p / p.sum()) for _ in range(n)])  # [n, pairs]
    inputs = rng.integers(0, vocab_size, size=(n, seq_len))  # filler everywhere else
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    rows, where = np.arange(n)[:, None], context + 2 * gaps  # [n, pairs] positions of the query keys
    inputs[rows, where], inputs[rows, where + 1] = keys, values
    targets = np.full((n, seq_len), -1)
    targets[rows, where] = values  # the next token after a query key is its value
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def recalled(logits, targets):
    """[scored positions] True where the argmax of logits [n, T, V] is the target (targets != -1 only)."""
    scored = targets != -1
    return logits.argmax(-1)[scored] == targets[scored]


def recall_accuracy(logits, targets):
    """Share of the scored positions (targets != -1) whose argmax is the target."""
    return recalled(logits, targets).float().mean().item()


# ---------------------------------------------------------------------------------------- training

@torch.no_grad()
def accuracy(model, inputs, targets, ctx, batch_size=256):
    """Recall accuracy on all of inputs, batch_size sequences at a time."""
    model.eval()
    hits = []
    for first in range(0, len(inputs), batch_size):
        with ctx:
            logits, _ = model(inputs[first : first + batch_size])
        hits.append(recalled(logits, targets[first : first + batch_size]))
    model.train()
    return torch.cat(hits).float().mean().item()


def model_config(arch, width, seq_len, args):
    return config_from_flags(args, f"width {width}", arch=arch, vocab_size=args.vocab_size, block_size=seq_len,
                             n_embd=width)


def train_one(arch, width, lr, data, args, device):
    """Train one model on data["train"] with train.py's optimizer, schedule and step; returns its
    validation curve, final val and test accuracy."""
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
        (x.to(device), y.to(device)) for x, y in (data["train"], data["val"], data["test"]))
    torch.manual_seed(args.seed)
    model = Model(model_config(arch, width, train_x.size(1), args)).to(device)
    optimizer = model.make_optimizer(lr, args.weight_decay, device)
    schedule = Schedule(lr, args.warmup_iters)
    ctx, scaler, _ = mixed_precision(device, args.dtype)
    g = torch.Generator().manual_seed(args.seed)

    def next_loss():
        rows = torch.randint(0, len(train_x), (args.batch_size,), generator=g).to(device)
        return model(train_x[rows], train_y[rows])[1]

    curve, start = [], time.time()
    for step in range(args.steps + 1):
        if step % args.eval_interval == 0 or step == args.steps:
            curve.append((step, accuracy(model, val_x, val_y, ctx)))
        if step == args.steps:
            break
        train_step(optimizer, scaler, next_loss, schedule.lr_at(step / args.steps, step, args.warmup_iters / args.steps), ctx)
    return {"curve": curve, "val": curve[-1][1], "test": accuracy(model, test_x, test_y, ctx),
            "seconds": time.time() - start, "params": model.num_params(non_embedding=True)}


def flattened(curve):
    """True when the last quarter of the curve gained less than PLATEAU accuracy."""
    accuracies = [acc for _, acc in curve]
    quarter = max(1, len(accuracies) // 4)
    return len(accuracies) > 1 and accuracies[-1] - accuracies[-1 - quarter] < PLATEAU


# ---------------------------------------------------------------------------------------- the sweep

def parse_setting(text):
    try:
        seq_len, pairs = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not SEQ_LEN:PAIRS (e.g. 64:4)") from None
    if seq_len < 2 or pairs < 1:
        raise argparse.ArgumentTypeError(f"{text}: the length must be at least 2 and the pairs at least 1")
    return seq_len, pairs


def run_key(arch, setting, width, lr, args):
    """What identifies a finished run in results.jsonl: every setting that changes its result."""
    model = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name, None) is not None}
    return {"arch": arch, "seq_len": setting[0], "pairs": setting[1], "width": width, "lr": lr, **model,
            "steps": args.steps, "vocab_size": args.vocab_size, "seed": args.seed,
            "batch_size": args.batch_size, "n_train": args.n_train, "power_a": args.power_a}


def datasets(setting, args):
    """Train, validation and test sequences of one (seq_len, pairs) setting, each from its own seed."""
    sizes = {"train": args.n_train, "val": args.n_test, "test": args.n_test}
    return {split: mqar(size, *setting, args.vocab_size, args.power_a, args.seed + i)
            for i, (split, size) in enumerate(sizes.items())}


def sweep(args, device):
    """Every (setting, width, lr, arch) run, each appended to results.jsonl when it ends."""
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    store = ResultStore(args.out_dir)
    keys = [dict(zip(("setting", "width", "lr", "arch"), c))
            for c in itertools.product(args.settings, args.widths, args.lrs, args.archs)]
    results, start, data = [], time.time(), {}
    for n, k in enumerate(keys, 1):
        key = run_key(k["arch"], k["setting"], k["width"], k["lr"], args)

        def train_it(k=k):
            if k["setting"] not in data:  # settings come in order: keep one setting's data at a time
                data.clear()
                data[k["setting"]] = datasets(k["setting"], args)
            return train_one(k["arch"], k["width"], k["lr"], data[k["setting"]], args, device)

        found, read_back = store.get(key, train_it)
        results.append(found)
        print(f"[{n}/{len(keys)}] {k['arch']} T{key['seq_len']} pairs {key['pairs']} d{k['width']} lr {k['lr']:g}: "
              f"{'done already' if read_back else 'trained'}: val {found['val']:.3f}, test {found['test']:.3f} "
              f"({found['seconds']:.0f}s; {time.time() - start:.0f}s so far)", flush=True)
    return results


def best_of_lrs(results):
    """{(arch, seq_len, pairs, width): the run with the highest validation accuracy over the lrs}."""
    return best_of(results, lambda r: (r["arch"], r["seq_len"], r["pairs"], r["width"]), lambda r: r["val"],
                   higher_is_better=True)


def write_table(best, args, command):
    lines = [f"# Multi-query associative recall: {args.steps:,} steps per run, best of {len(args.lrs)} lrs", "",
             f"`{command}`", "",
             f"vocab {args.vocab_size}, {args.n_layer} layers for every arch, batch {args.batch_size}, "
             f"{args.n_train:,} training sequences, {args.n_test:,} validation (lr choice) and {args.n_test:,} test "
             f"sequences, power_a {args.power_a}. Machine: {machine(pick_device(args.device))}.", "",
             "| arch | seq_len | pairs | width | best lr | test accuracy | val accuracy | curve at the end | "
             "non-embedding params | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (arch, seq_len, pairs, width), r in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][3],
                                                                                  ARCHS.index(kv[0][0]))):
        edge = " (edge)" if len(args.lrs) > 1 and r["lr"] in (min(args.lrs), max(args.lrs)) else ""
        lines.append(f"| {arch} | {seq_len} | {pairs} | {width} | {r['lr']:g}{edge} | **{r['test']:.3f}** | "
                     f"{r['val']:.3f} | {'flat' if flattened(r['curve']) else 'still rising'} | "
                     f"{r['params'] / 1e6:.2f}M | {r['seconds']:.0f} |")
    lines += ["", f"Chance is about 1/{args.vocab_size // 2} (a value among the upper half of the vocabulary). "
              f"'still rising': the last quarter of the validation curve gained {PLATEAU} or more; "
              "'(edge)': the best lr is at the edge of --lrs."]
    write_text(Path(args.out_dir) / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(best, args):
    plt = pyplot("recall.png", f"the table is in {Path(args.out_dir) / 'results.md'}")
    if plt is None:
        return
    settings = sorted({(k[1], k[2]) for k in best})
    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.6), squeeze=False, sharey=True)
    for ax, (seq_len, pairs) in zip(axes[0], settings):
        for arch in args.archs:
            points = sorted((k[3], r["test"]) for k, r in best.items() if k[:3] == (arch, seq_len, pairs))
            if points:
                ax.plot(*zip(*points), marker="o", color=COLOURS[arch], label=arch)
        ax.set(title=f"seq_len {seq_len}, {pairs} pairs", xlabel="model width", xscale="log", ylim=(-0.03, 1.03))
        ax.set_xticks(sorted(args.widths), [str(w) for w in sorted(args.widths)])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test accuracy (best lr)")
    axes[0, 0].legend()
    fig.tight_layout()
    save_figure(fig, Path(args.out_dir) / "recall.png")
    curves, ax = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.6), squeeze=False, sharey=True)
    for ax, (seq_len, pairs) in zip(ax[0], settings):
        for (arch, s, p, width), r in best.items():
            if (s, p) == (seq_len, pairs):
                steps, accuracy = zip(*r["curve"])
                ax.plot(steps, accuracy, color=COLOURS[arch], alpha=0.4 + 0.6 * width / max(args.widths),
                        label=f"{arch} d{width}")
        ax.set(title=f"seq_len {seq_len}, {pairs} pairs (best lr each)", xlabel="step", ylim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    curves.axes[0].set_ylabel("validation accuracy")
    curves.tight_layout()
    save_figure(curves, Path(args.out_dir) / "recall_curves.png")


def recall(args, command):
    check_folder(args.out_dir)
    for seq_len, pairs in args.settings:
        check_setting(seq_len, pairs, args.vocab_size)
    for arch, width, (seq_len, _) in itertools.product(args.archs, args.widths, args.settings):
        model_config(arch, width, seq_len, args)  # a UserError now, not after hours of other runs
    if args.eval_interval > args.steps:
        args.eval_interval = args.steps
    device = pick_device(args.device)
    print(f"{len(args.settings) * len(args.widths) * len(args.lrs) * len(args.archs)} runs of {args.steps:,} steps, "
          f"device {device}, {mixed_precision(device, args.dtype)[2]}", flush=True)
    best = best_of_lrs(sweep(args, device))
    write_table(best, args, command)
    plot(best, args)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    p.add_argument("--settings", nargs="+", type=parse_setting, default=[(64, 4), (64, 8)], metavar="SEQ_LEN:PAIRS",
                   help="difficulties: sequence length and key-value pairs")
    p.add_argument("--widths", nargs="+", type=positive_int, default=[64], help="model widths (n_embd)")
    p.add_argument("--lrs", nargs="+", type=positive_float, default=[1e-3, 3e-3],
                   help="each arch gets the best of these per setting and width (chosen on validation data)")
    p.add_argument("--steps", type=positive_int, default=2000, help="training steps per run")
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--vocab_size", type=positive_int, default=128, help="keys: the lower half, values: the upper")
    p.add_argument("--n_train", type=positive_int, default=20000, help="training sequences")
    p.add_argument("--n_test", type=positive_int, default=500, help="validation and test sequences, each")
    p.add_argument("--power_a", type=positive_float, default=0.01, help="Zoology's power law of query gaps")
    p.add_argument("--warmup_iters", type=int, default=50)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--eval_interval", type=positive_int, default=200, help="steps between validation evals")
    p.add_argument("--seed", type=int, default=0, help="data (train seed, val seed + 1, test seed + 2) and init")
    p.add_argument("--device", default="auto")
    add_dtype_flag(p)
    p.add_argument("--out_dir", default="out-recall")
    add_model_flags(p, defaults={"n_layer": 2, "n_head": 2}, skip=("arch", "vocab_size", "causal", "n_embd", "block_size"),
                    title="model (mixer.Config; the same for every arch; n_embd is --widths, block_size the setting's length)")
    args = p.parse_args(argv)
    run("experiments.recall", lambda a: recall(a, shlex.join(["python", "-m", "experiments.recall", *argv])), args)


if __name__ == "__main__":
    main()
