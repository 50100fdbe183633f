"""
What a trained mixer learned: its mixing matrices as pictures and numbers, beside the transformer's
attention. A masked mixer's whole token mixing is one learned [T, T] matrix per layer (and head), the
same for every input, so it can be looked at directly.

    python -m experiments.mixing --ckpt out-compare/mixer-seed1337/ckpt.pt --out mixing.png
    python -m experiments.mixing --ckpt out-compare/{mixer,transformer,hybrid}-seed1337/ckpt.pt --data_dir data/tinystories
    python -m experiments.mixing --init mixer --block_size 32 --n_layer 2          # untrained: W = I

For each mixing layer and head (mixer and hybrid) it shows tril(W), the matrix the forward pass
applies (upper triangle blank), and W - I, what training added to the identity init. A Toeplitz mixer
(train.py --mixing toeplitz) is shown the same way: its W is built from its kernel, so its profile is
the kernel itself and its Toeplitz score is 1 by construction. For each
attention layer and head (transformer and hybrid), the attention probabilities averaged over --n
story openings from --data_dir's val.bin: an attention map depends on its input, so this is an
average over inputs, not a fixed matrix. Both get the same numbers, printed as a table (--json too):

    diagonal mass  sum_i |W_ii| / sum_{j<=i} |W_ij|        1: each position keeps only itself
    look-back      the |W|-weighted mean of i - j in a row, averaged over rows (0: only itself)
    Toeplitz       the share of the variance of the entries below the diagonal explained by the
                   mean of their diagonal (offset i - j): 1 = a causal convolution (also when they
                   are all equal, as in the identity); about 2/T for unstructured entries
    eff. rank      singular values above RANK_TOL x the largest

Pictures (matplotlib): OUT with the heatmaps of every mixing matrix; OUT_profile.png with the mean
of W[i, i - k] over rows against the offset k (the kernel a layer applies on average), one line per
layer, attention maps included; OUT_attention.png with the averaged attention maps.
"""
import argparse
import json
from pathlib import Path

import torch

from cli import HelpFormatter, UserError, positive_int, run
from experiments.common import add_models_to_test_flags, models_to_test, pyplot, save_figure, story_inputs
from mixer import Attention, MaskedMixing, attention_probs

RANK_TOL = 1e-2  # relative to the largest singular value


# ---------------------------------------------------------------------------------------- statistics

def diagonal_mass(w):
    """sum_i |W_ii| / sum_{j<=i} |W_ij| of a [T, T] matrix (only its lower triangle counts)."""
    live = w.tril().abs()
    return (live.diagonal().sum() / live.sum()).item()


def look_back(w):
    """The |W|-weighted mean distance i - j of each row, averaged over the rows that have any mass."""
    T = w.size(0)
    live = w.tril().abs()
    distance = (torch.arange(T).unsqueeze(1) - torch.arange(T).unsqueeze(0)).clamp(min=0).to(w.dtype)  # [T, T]
    mass = live.sum(1)
    rows = mass > 0
    return ((live * distance).sum(1)[rows] / mass[rows]).mean().item()


def toeplitz_score(w):
    """R^2 of the entries below the diagonal (j < i) grouped by their offset i - j: 1 when every
    diagonal is constant (W depends on i - j alone: a causal convolution), ~2/T for random entries."""
    T = w.size(0)
    i, j = torch.tril_indices(T, T, offset=-1)
    values, offset = w[i, j], i - j
    total = ((values - values.mean()) ** 2).sum()
    if total == 0:
        return 1.0  # all entries below the diagonal equal: constant diagonals
    diagonal_means = torch.zeros(T, dtype=w.dtype).index_add(0, offset, values) / torch.bincount(offset, minlength=T).clamp(min=1)
    within = ((values - diagonal_means[offset]) ** 2).sum()
    return (1 - within / total).item()


def effective_rank(w):
    s = torch.linalg.svdvals(w.tril())
    return int((s > RANK_TOL * s[0]).sum())


def kernel_profile(w):
    """[T] mean of W[i, i - k] over the rows i >= k, for k = 0 .. T - 1."""
    return torch.stack([w.diagonal(-k).mean() for k in range(w.size(0))])


def statistics(w):
    w = w.double()
    return {"diagonal_mass": diagonal_mass(w), "look_back": look_back(w), "toeplitz": toeplitz_score(w),
            "effective_rank": effective_rank(w)}


# ---------------------------------------------------------------------------------------- the matrices

def mixing_matrices(model):
    """[(layer, head, tril(W) [T, T])]: each mixing matrix as the forward pass applies it."""
    mixings = [m for m in model.modules() if isinstance(m, MaskedMixing)]
    return [(layer, head, matrix.detach().float())
            for layer, m in enumerate(mixings, 1) for head, matrix in enumerate(m.matrix())]


@torch.no_grad()
def averaged_attention(model, tokens):
    """[(layer, head, mean attention probabilities [T, T] over the rows of tokens [n, T])]."""
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda module, args: inputs.__setitem__(module, args[0]))
             for m in model.modules() if isinstance(m, Attention)]
    try:
        model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    maps = []
    for layer, (module, x) in enumerate(inputs.items(), 1):  # in forward order
        q, k, _ = module.queries_keys_values(x)
        probs = attention_probs(q, k, causal=True).mean(0)  # [h, T, T]
        maps += [(layer, head, probs[head].float()) for head in range(probs.size(0))]
    return maps


def matrices_to_show(name, model, vocab, args):
    """[(kind, layer, head, [T, T])] for one model, kind "mixing" or "attention", per --show."""
    arch = model.config.arch
    want_mixing = args.show in ("mixing", "both") and arch != "transformer"
    want_attention = args.show in ("attention", "both") and arch != "mixer"
    if not (want_mixing or want_attention):
        has = "mixing matrices" if arch == "mixer" else "attention"
        raise UserError(f"{name} is a {arch}: it has no {args.show} to show, only {has} (use --show both)")
    shown = [("mixing", *m) for m in mixing_matrices(model)] if want_mixing else []
    if want_attention:
        if not args.data_dir:
            raise UserError(f"{name} has attention, which depends on its input: give --data_dir with prepared "
                            "text (or --show mixing for the hybrid's mixing matrices alone)")
        tokens = story_inputs(args.data_dir, args.n, args.length or model.config.block_size)
        if tokens.max() >= vocab:
            raise UserError(f"{args.data_dir} has token ids up to {tokens.max()} but {name} knows {vocab}: "
                            "use the data it was trained on (or --vocab_size for --init)")
        shown += [("attention", *m) for m in averaged_attention(model, tokens)]
    return shown


# ---------------------------------------------------------------------------------------- output

def print_table(rows, args):
    print("\n| model | kind | layer | head | diagonal mass | look-back (positions) | Toeplitz | eff. rank |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        kind = r["kind"] if r["kind"] == "mixing" else f"attention (mean of {args.n} stories)"
        print(f"| {short_name(r['model'])} | {kind} | {r['layer']} | {r['head']} | {r['diagonal_mass']:.3f} | "
              f"{r['look_back']:.2f} | {r['toeplitz']:.3f} | {r['effective_rank']}/{r['T']} |")
    print(f"\n(eff. rank: singular values above {RANK_TOL:g} x the largest; T = {rows[0]['T']})")


def short_name(name):
    """A checkpoint's run folder (out-compare/mixer-seed1337/ckpt.pt -> mixer-seed1337), or the name."""
    return Path(name).parent.name if name.endswith(".pt") and Path(name).parent.name else name


def heatmap(ax, matrix, title, **style):
    """The lower triangle of a [T, T] matrix; the upper triangle (masked, never applied) left blank."""
    T = matrix.size(0)
    shown = matrix.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("nan"))
    image = ax.imshow(shown.numpy(), interpolation="nearest", **style)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([]), ax.set_yticks([])
    return image


def plot_mixing(models, path, plt):
    """Two rows of heatmaps per model, tril(W) and W - I, one column per layer and head, on one
    symmetric diverging colour scale clipped at the 99th percentile of all |entries| shown."""
    models = [(name, ms) for name, ms in models if ms]
    if not models:
        return
    columns = max(len(ms) for _, ms in models)
    fig, axes = plt.subplots(2 * len(models), columns, figsize=(2.2 * columns + 1.5, 5.2 * len(models)), squeeze=False)
    pairs = [(name, layer, head, w) for name, ms in models for layer, head, w in ms]
    entries = torch.cat([torch.cat([w[torch.ones_like(w, dtype=torch.bool).tril()],
                                    (w - torch.eye(w.size(0)))[torch.ones_like(w, dtype=torch.bool).tril()]])
                         for *_, w in pairs]).abs()
    limit = entries.quantile(0.99).item() if entries.numel() <= 2**24 else entries.max().item()
    # coolwarm's zero is light grey, so the blank (masked) upper triangle stays apart from zero entries
    style = dict(cmap="coolwarm", vmin=-limit, vmax=limit)
    for row, (name, ms) in enumerate(models):
        for col in range(columns):
            for ax in axes[2 * row : 2 * row + 2, col]:
                ax.axis("off")
        for col, (layer, head, w) in enumerate(ms):
            top, bottom = axes[2 * row, col], axes[2 * row + 1, col]
            image = heatmap(top, w, f"{short_name(name)}\nlayer {layer} head {head}: tril(W)", **style)
            heatmap(bottom, w - torch.eye(w.size(0)), f"layer {layer} head {head}: W - I", **style)
            top.axis("on"), bottom.axis("on")
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, extend="both")
    bar.set_label(f"one symmetric scale for every panel, clipped at +-{limit:.3g} (99th percentile of |entries|);\n"
                  "blank: the masked upper triangle, never applied", fontsize=8)
    save_figure(fig, path)


def plot_attention(models, path, plt):
    """Averaged attention maps, one row per model, one column per layer and head."""
    models = [(name, ms) for name, ms in models if ms]
    if not models:
        return
    columns = max(len(ms) for _, ms in models)
    fig, axes = plt.subplots(len(models), columns, figsize=(2.2 * columns + 1, 2.6 * len(models)), squeeze=False)
    for row, (name, ms) in enumerate(models):
        for ax in axes[row]:
            ax.axis("off")
        for col, (layer, head, probs) in enumerate(ms):
            image = heatmap(axes[row, col], probs, f"{short_name(name)}\nlayer {layer} head {head}",
                            cmap="viridis", vmin=0, vmax=1)
            axes[row, col].axis("on")
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6)
    bar.set_label("attention probability, averaged over the input stories\n(input-dependent: an average, "
                  "not a fixed matrix)", fontsize=8)
    save_figure(fig, path)


def plot_profiles(shown, path, plt):
    """Mean of M[i, i - k] over rows against k, one line per layer (heads averaged), per model and kind."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, kind, by_layer in shown:
        for layer, matrices in by_layer.items():
            profile = torch.stack([kernel_profile(m) for m in matrices]).mean(0)
            ax.plot(profile.numpy(), marker=".", linestyle="-" if kind == "mixing" else "--",
                    label=f"{short_name(name)} {kind} layer {layer}")
    ax.set(xlabel="offset k = i - j (tokens back)", ylabel="mean of M[i, i - k] over rows i",
           title="the kernel each layer applies on average (attention: averaged over inputs)")
    ax.set_xscale("symlog", linthresh=4)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def draw(per_model, out):
    plt = pyplot(out, "the numbers are in the table above")
    if plt is None:
        return
    stem = Path(out).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    plot_mixing([(name, [(l, h, w) for kind, l, h, w in ms if kind == "mixing"]) for name, ms in per_model], out, plt)
    plot_attention([(name, [(l, h, w) for kind, l, h, w in ms if kind == "attention"]) for name, ms in per_model],
                   f"{stem}_attention.png", plt)
    profiles = []
    for name, ms in per_model:
        for kind in ("mixing", "attention"):
            by_layer = {}
            for k, layer, _, w in ms:
                if k == kind:
                    by_layer.setdefault(layer, []).append(w)
            if by_layer:
                profiles.append((name, kind, by_layer))
    plot_profiles(profiles, f"{stem}_profile.png", plt)


def show(args):
    if not (args.ckpt or args.init):
        raise UserError("nothing to show: give --ckpt FILE [FILE ...] or --init ARCH [ARCH ...]")
    per_model, rows = [], []
    for name, model, vocab, step in models_to_test(args):
        shown = matrices_to_show(name, model, vocab, args)
        per_model.append((name, shown))
        rows += [{"model": name, "arch": model.config.arch, "train_step": step, "kind": kind, "layer": layer,
                  "head": head, "T": w.size(0), **statistics(w)} for kind, layer, head, w in shown]
    print_table(rows, args)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    if args.out:
        draw(per_model, args.out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_models_to_test_flags(p, n_layer=4, n_embd=128)
    p.add_argument("--show", choices=["mixing", "attention", "both"], default="both",
                   help="mixing matrices, averaged attention maps, or whichever each model has")
    p.add_argument("--data_dir", help="prepared text for the attention maps (the start of val.bin's stories)")
    p.add_argument("--n", type=positive_int, default=64, help="stories the attention maps are averaged over")
    p.add_argument("--length", type=positive_int, help="tokens per story for attention (default: block_size)")
    p.add_argument("--out", help="PNG of the heatmaps (and OUT_profile.png, OUT_attention.png); needs matplotlib")
    p.add_argument("--json", action="store_true", help="also one JSON object per layer and head after the table")
    p.add_argument("--seed", type=int, default=0, help="for --init weights")
    run("experiments.mixing", show, p.parse_args(argv))


if __name__ == "__main__":
    main()
