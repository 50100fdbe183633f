"""
The retrieval comparison: each arch's language models (several seeds) fine-tuned for retrieval at its
own best learning rate, chosen on validation pairs carved out of --pairs (never trained on), then
reported on --held_out pairs only. InfoNCE (the paper's v2+) and, unless --v1_lrs is empty, the v1
retrieval mixer on frozen embeddings; raw embeddings and BM25 beside them.

    python -m experiments.retrieval --ckpt out-sweep/T512/{mixer,toeplitz,transformer}-*-seed133[89]/ckpt.pt \
        --pairs data/tinystories/pairs_train.jsonl --held_out data/tinystories/pairs_val.jsonl --out_dir out-retrieval

--out_dir holds results.jsonl (every finished run: run the same command again to continue), results.md
and results.png.
"""
import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cli import (HelpFormatter, autocast, check_folder, load_checkpoint, load_model, pick_device,
                 positive_float, positive_int, run, write_text)
from data_prep import load_encoding
from experiments.common import (COLOURS, ResultStore, best_of, machine, mean_and_range, pyplot,
                                ranking, save_figure)
from retrieve import (DEFAULT_STEPS, InfoNCE, Recipe, RetrievalError, V1Mixer, bm25_scores,
                      candidate_counts, check_pairs, common_flags, cosine_scores, embed_texts, fine_tune,
                      metrics_by_n, mixer_scores, read_pairs, recipe_flags, sentences_of, settings_of,
                      texts_of, train_retrieval_mixer)


def variant_of(config):
    """The cli.VARIANTS name of a model config: its arch, or "toeplitz"."""
    return "toeplitz" if config["arch"] == "mixer" and config.get("mixing") == "toeplitz" else config["arch"]


def language_models(paths):
    """({variant: [(LM seed, checkpoint path), ...] in seed order}, the data meta they share). The
    first checkpoint of each variant is its selection model: the learning rates are chosen on it."""
    found, metas = {}, set()
    for path in paths:
        ckpt = load_checkpoint(path, needs=("config", "data_meta", "train_args"))
        found.setdefault(variant_of(ckpt["config"]), []).append((ckpt["train_args"]["seed"], str(path)))
        metas.add(json.dumps(ckpt["data_meta"], sort_keys=True))
    if len(metas) > 1:
        raise RetrievalError("the checkpoints were trained on different data (their data meta differ): compare "
                             "the models of one language-model comparison")
    return {variant: sorted(runs) for variant, runs in found.items()}, json.loads(metas.pop())


def retrieval_data(args, enc):
    """Token ids (summaries, stories) of three splits: fit and val from --pairs (val: --val_pairs of
    them, drawn with a fixed seed; it chooses the learning rates) and --held_out (reported only)."""
    pairs, held_out = read_pairs(args.pairs), read_pairs(args.held_out)
    if len(pairs) < 2 * args.val_pairs:
        raise RetrievalError(f"{args.pairs} has {len(pairs)} pairs: too few to hold out --val_pairs "
                             f"{args.val_pairs}")
    # every count checked now, before hours of training: InfoNCE draws groups from the fitting pairs,
    # the v1 mixer candidate sets from each split
    fit = len(pairs) - args.val_pairs
    check_pairs(fit, args.group, "fitting pairs", "--group", args.group)
    if args.v1_lrs:
        check_pairs(fit, args.candidates + 1, "fitting pairs", "--candidates", args.candidates)
        check_pairs(args.val_pairs, args.candidates, "validation pairs", "--candidates", args.candidates)
        check_pairs(len(held_out), args.candidates, "held-out pairs", "--candidates", args.candidates)
    order = np.random.default_rng(0).permutation(len(pairs))
    fit_pairs = [pairs[i] for i in order[args.val_pairs:]]
    return {"fit": texts_of(fit_pairs, enc), "fit_sentences": sentences_of(fit_pairs, enc) if args.crop else None,
            "val": texts_of([pairs[i] for i in order[: args.val_pairs]], enc), "held_out": texts_of(held_out, enc),
            "untrained": {}}


def frozen_embeddings(model, texts, args, device):
    """Embeddings [n, d] (float32) of (summary ids, story ids) by a model that is not trained further."""
    with autocast(device, args.dtype)[0]:
        return tuple(torch.from_numpy(embed_texts(model, ids, args.long, args.batch_size, device, pool=args.pool))
                     for ids in texts)


def untrained_embeddings(path, model, data, split, args, device):
    """frozen_embeddings of a language model as it was saved: the same every time, so made once per
    comparison (kept in its data)."""
    key = (path, split)
    if key not in data["untrained"]:
        data["untrained"][key] = frozen_embeddings(model, data[split], args, device)
    return data["untrained"][key]


def retrieval_run(method, path, lr, seed, data, args, device):
    """Train one retrieval model from the LM at path and score it on the val and held-out pairs:
    {"val": {N: metrics}, "held_out": {N: metrics}}. infonce fine-tunes the LM and scores by cosine at
    every N; the v1 mixer scores its own number of candidates. raw: the LM as it is, by cosine."""
    model, _ = load_model(path, device)
    steps = args.steps if method == "infonce" else args.v1_steps
    recipe = settings_of(Recipe, args, lr=lr, seed=seed, steps=steps)
    v1 = settings_of(V1Mixer, args)
    if method == "infonce":
        fine_tune(model, *data["fit"], recipe, settings_of(InfoNCE, args), device, data["fit_sentences"])
    elif method == "mixer":
        fit_embeddings = untrained_embeddings(path, model, data, "fit", args, device)
        retrieval_mixer = train_retrieval_mixer(*fit_embeddings, recipe, v1).eval()
    results = {}
    for split in ("val", "held_out"):
        queries, stories = (frozen_embeddings(model, data[split], args, device) if method == "infonce"
                            else untrained_embeddings(path, model, data, split, args, device))
        if method == "mixer":
            counts, score = [v1.candidates], lambda c: mixer_scores(retrieval_mixer, queries, stories, c)  # noqa: B023
        else:
            counts, score = candidate_counts(len(queries)), lambda c: cosine_scores(queries, stories, c)  # noqa: B023
        results[split] = metrics_by_n(score, len(queries), counts, args.seed)
    return results


class Runs:
    """Every retrieval run of the comparison, keyed by all that sets its result, in the ResultStore of
    --out_dir: a run found there is read back, not trained again (an interrupted comparison continues)."""

    def __init__(self, args, data, device):
        self.args, self.data, self.device = args, data, device
        self.store = ResultStore(args.out_dir)

    def get(self, method, variant, lm_seed, path, lr, seed, stage):
        args = self.args
        key = {"method": method, "variant": variant, "lm_seed": lm_seed, "ckpt": path, "lr": lr, "seed": seed,
               "steps": {"infonce": args.steps, "mixer": args.v1_steps}.get(method), "pairs_file": args.pairs,
               "held_out_file": args.held_out, "val_pairs": args.val_pairs, "long": args.long, "pool": args.pool,
               "crop": args.crop,
               **{f: getattr(args, f) for f in ("warmup_iters", "weight_decay", "group", "temperature", "batch_size",
                                                "candidates", "width", "n_layer")}}
        what = f"[{stage}] {method} {variant} (LM seed {lm_seed})" + (f" lr {lr:g}" if lr else "")

        def train_it():
            print(f"{what}: training", flush=True)
            started = time.time()
            return {**retrieval_run(method, path, lr, seed, self.data, args, self.device),
                    "seconds": time.time() - started}

        found, _ = self.store.get(key, train_it)
        print(f"{what}: val top-1 {top1_at_first(found['val']):.1%}, held-out {top1_at_first(found['held_out']):.1%}",
              flush=True)
        return found


def top1_at_first(metrics):
    """top-1 at the smallest N scored (N = 32: the comparison's headline)."""
    return metrics[min(metrics, key=int)]["top1"]


def compare_method(runs, method, lrs, models):
    """Each variant's grid on its selection LM (fine-tuning seed 0), the best lr by validation top-1
    at N = 32, then that lr on every LM of the variant with a fresh fine-tuning seed (1):
    {variant: {"grid": [runs], "best": lr, "confirmed": [runs]}}."""
    out = {}
    for variant, lms in models.items():
        grid = [runs.get(method, variant, *lms[0], lr, 0, "grid") for lr in lrs]
        best = best_of(grid, lambda r: variant, lambda r: top1_at_first(r["val"]), higher_is_better=True)[variant]["lr"]
        out[variant] = {"grid": grid, "best": best,
                        "confirmed": [runs.get(method, variant, *lm, best, 1, "confirm") for lm in lms]}
    return out


def compare(args):
    check_folder(args.out_dir)
    device = pick_device(args.device)
    models, meta = language_models(args.ckpt)
    data = retrieval_data(args, load_encoding(meta))
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    runs = Runs(args, data, device)
    raw = {variant: [runs.get("raw", variant, *lm, None, None, "raw") for lm in lms] for variant, lms in models.items()}
    infonce = compare_method(runs, "infonce", args.lrs, models)
    v1 = compare_method(runs, "mixer", args.v1_lrs, models) if args.v1_lrs else None
    query_ids, story_ids = ([np.asarray(t) for t in texts] for texts in data["held_out"])
    n_held = len(query_ids)
    bm25 = metrics_by_n(lambda c: bm25_scores(query_ids, story_ids, c), n_held, candidate_counts(n_held), args.seed)
    write_retrieval_results(args, models, raw, infonce, v1, bm25, data)
    plot_retrieval(args, infonce, bm25)


def held_out_cell(runs, n):
    values = [r["held_out"][str(n)]["top1"] * 100 for r in runs if str(n) in r["held_out"]]
    return mean_and_range(values, ".1f") if values else "-"


def method_lines(title, result, lrs):
    """The grid (validation top-1 at the smallest N per lr), the confirmed held-out table and the verdict."""
    first = next(iter(result.values()))["confirmed"][0]["held_out"]
    counts, n = sorted(map(int, first)), min(map(int, first))  # N = 32 ...; the v1 mixer: its own candidates
    edge = lambda lr: " (edge)" if lr in (min(lrs), max(lrs)) else ""  # noqa: E731
    lines = [f"## {title}", "", f"Grid: validation top-1 (%) at N = {n} on each arch's selection LM (fine-tuning "
             "seed 0):", "", "| arch | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |",
             "|---|" + "---|" * (len(lrs) + 1)]
    for variant, r in result.items():
        cells = [f"{100 * top1_at_first(g['val']):.1f}" for g in r["grid"]]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {r['best']:g}{edge(r['best'])} |")
    lines += ["", "Held-out top-1 (%) at each arch's best lr, every LM seed fine-tuned again (seed 1), mean (min-max):", "",
              "| arch | best lr | " + " | ".join(f"N = {c}" for c in counts) + " |", "|---|---|" + "---|" * len(counts)]
    for variant, r in result.items():
        lines.append(f"| {variant} | {r['best']:g} | " + " | ".join(held_out_cell(r["confirmed"], c) for c in counts) + " |")
    verdict = {v: [top1_at_first(c["held_out"]) * 100 for c in r["confirmed"]] for v, r in result.items()}
    return lines + ["", f"Verdict at N = {n}: " + " ".join(ranking(verdict, higher_is_better=True, fmt=".1f",
                                                                  unit=" points")), ""]


def write_retrieval_results(args, models, raw, infonce, v1, bm25, data):
    counts = [int(n) for n in bm25]
    lms = "; ".join(f"{v}: " + ", ".join(path for _, path in lm) for v, lm in models.items())
    lines = ["# Retrieval, each arch at its best fine-tuning learning rate", "",
             f"`{shlex.join(['python', '-m', 'experiments.retrieval', *args.argv])}`", "",
             f"Machine: {machine(pick_device(args.device))}, torch {torch.__version__}. Language models: {lms}. "
             f"Pairs: {len(data['fit'][0]):,} to fit and {len(data['val'][0]):,} to choose the lr (both from "
             f"{args.pairs}), {len(data['held_out'][0]):,} held out ({args.held_out}), reported here only. InfoNCE "
             f"{args.steps} steps, group {args.group}, temperature {args.temperature:g}, --long {args.long}, "
             f"--pool {args.pool}, --crop {args.crop:g}; "
             f"warmup {args.warmup_iters}, weight decay {args.weight_decay:g}.", "",
             "Held-out top-1 (%) without training (raw embeddings, cosine) and by word overlap:", "",
             "| scorer | " + " | ".join(f"N = {n}" for n in counts) + " |", "|---|" + "---|" * len(counts),
             "| BM25 (no model) | " + " | ".join(f"{100 * bm25[str(n)]['top1']:.1f}" for n in counts) + " |"]
    lines += [f"| {v}, raw | " + " | ".join(held_out_cell(r, n) for n in counts) + " |" for v, r in raw.items()]
    lines += ["", *method_lines("InfoNCE fine-tuning (the paper's v2+)", infonce, args.lrs)]
    if v1:
        lines += method_lines(f"v1: a retrieval mixer on frozen embeddings ({args.v1_steps} steps, "
                              f"{args.candidates} candidates)", v1, args.v1_lrs)
    write_text(Path(args.out_dir) / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def plot_retrieval(args, infonce, bm25):
    """results.png: held-out top-1 against N (each arch at its best lr; BM25 dashed), and the
    validation top-1 at N = 32 against the fine-tuning lr."""
    plt = pyplot("results.png", f"the numbers are in {Path(args.out_dir) / 'results.md'}")
    if plt is None:
        return
    fig, (by_n, by_lr) = plt.subplots(1, 2, figsize=(11, 4))
    counts = [int(n) for n in bm25]
    for variant, r in infonce.items():
        top1 = np.array([[c["held_out"][str(n)]["top1"] for n in counts] for c in r["confirmed"]]) * 100
        mean = top1.mean(0)
        by_n.errorbar(counts, mean, yerr=[mean - top1.min(0), top1.max(0) - mean], marker="o", capsize=3,
                      color=COLOURS[variant], label=f"{variant} (lr {r['best']:g})")
        by_lr.plot(args.lrs, [100 * top1_at_first(g["val"]) for g in r["grid"]], marker="o", color=COLOURS[variant],
                   label=variant)
    by_n.plot(counts, [100 * bm25[str(n)]["top1"] for n in counts], "k--", label="BM25")
    by_n.set(xscale="log", xlabel="candidates N", ylabel="held-out top-1 (%)", title="InfoNCE, each at its best lr")
    by_n.set_xticks(counts, [str(n) for n in counts])
    by_lr.set(xscale="log", xlabel="fine-tuning lr", ylabel="validation top-1 at N = 32 (%)", title="the grid")
    for ax in (by_n, by_lr):
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, Path(args.out_dir) / "results.png")




def parse_args(argv=None):
    c = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    common_flags(c)
    c.add_argument("--ckpt", nargs="+", required=True, help="LM checkpoints, several seeds per arch (the lowest seed "
                                                            "of each arch chooses its lr)")
    c.add_argument("--pairs", required=True, help="training pairs; --val_pairs of them choose the learning rates")
    c.add_argument("--held_out", required=True, help="held-out pairs: the reported result, never used to choose")
    c.add_argument("--val_pairs", type=positive_int, default=500, help="validation pairs taken from --pairs")
    c.add_argument("--lrs", nargs="+", type=positive_float, default=[3e-4, 1e-3, 3e-3, 1e-2],
                   help="InfoNCE learning rates (the grid)")
    c.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS["infonce"], help="InfoNCE steps, every arch")
    c.add_argument("--v1_lrs", nargs="*", type=positive_float, default=[3e-4, 1e-3, 3e-3, 1e-2],
                   help="the v1 retrieval mixer's learning rates (none: skip v1)")
    c.add_argument("--v1_steps", type=positive_int, default=DEFAULT_STEPS["mixer"], help="v1 retrieval mixer steps")
    c.add_argument("--out_dir", default="out-retrieval", help="results.jsonl (resumable), results.md, results.png")
    recipe_flags(c)
    args = c.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv=None):
    run("experiments.retrieval", compare, parse_args(argv))


if __name__ == "__main__":
    main()
