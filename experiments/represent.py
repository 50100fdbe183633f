"""
Input representation accuracy: how well does a model's output still determine its input? The paper's
explanation of why masked mixers and transformers differ (attention selects a few inputs and discards
the rest; a mixer mixes every earlier token, so its input stays recoverable).

    python -m experiments.represent --ckpt out-mixer/ckpt.pt out-transformer/ckpt.pt --data_dir data/tinystories
    python -m experiments.represent --ckpt out-compare/mixer-seed1337/ckpt_step*.pt --data_dir ...   # over training
    python -m experiments.represent --init mixer transformer hybrid --n_layer 8 --n_embd 256 --block_size 64 --vocab_size 4096

The method (as in the author's code):
1. Inputs x: --n texts, each the first --length tokens of a story in --data_dir's val.bin (stories at
   least that long, in file order); without --data_dir, random tokens drawn with --seed.
2. Target: f(E(x)), the output of block --layer (default: the last), before the final norm and
   lm_head, for the true token embeddings E(x).
3. Recovery: from a ~ N(0, 1) of E(x)'s shape, plain gradient descent on a (no momentum) for --steps
   steps on the L1 distance sum |f(a) - f(E(x))|, the step size falling linearly from 0.02 to 0.002.
4. Decoding: logits = a @ pinv(W_emb), W_emb the [vocab, d] embedding; a position is recovered when
   its true token is among the top 5.
5. Metric (the paper's modified Hamming distance): the fraction of positions NOT recovered.
   0 = the output determines the input exactly, 1 = nothing recovered.
The final L1 distance is printed next to the L1 distance that a 0.05 N(0, 1) nudge of E(x) causes,
as a scale: a recovery that gets below it is as close as the model can tell apart.

Units (--scale): the author's constants (start N(0, 1), steps 0.02..0.002, nudge 0.05) fit his
mixer's embeddings, which were N(0, 1) (PyTorch's default). Ours start at std 0.02 (GPT-2 init, for
every arch), as did his Llama baseline's. --scale embedding (the default) measures start, steps and
nudge in units of the embedding matrix's std s, which is exactly his method when s = 1;
--scale absolute uses his numbers as they are, whatever the embedding's scale.

Precision: float32 on every machine, not train.py's bf16 autocast, since the recovery tells apart
outputs that differ by a 0.05 nudge, finer than bf16's three significant digits.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from cli import HelpFormatter, Progress, UserError, positive_int, run
from experiments.common import add_models_to_test_flags, models_to_test, pyplot, save_figure, story_inputs

TOP_K = 5
LR_START, LR_END = 0.02, 0.002
NUDGE = 0.05  # the reference perturbation of the true embeddings


def block_output(model, emb, layer):
    """f: the residual stream after the first `layer` blocks, for input embeddings emb [n, T, d]."""
    x = emb
    for block in model.blocks[:layer]:
        x = block(x)
    return x  # [n, T, d]


def recover(model, tokens, layer, steps, seed, unit=1.0):
    """Gradient descent from noise to an input whose output matches the true one; start, step sizes
    and nudge are multiples of `unit`. Returns the recovered embeddings a [n, T, d], the final L1
    distance and the reference L1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = model.wte(tokens)  # [n, T, d], E(x)
        target = block_output(model, emb, layer)
        nudged = block_output(model, emb + NUDGE * unit * torch.randn(emb.shape, generator=g), layer)
        reference = (nudged - target).abs().sum().item()
    a = (unit * torch.randn(emb.shape, generator=g)).requires_grad_()
    progress, start = Progress(log_every=30), time.time()
    for step in range(steps):
        lr = unit * (LR_START + (LR_END - LR_START) * step / max(steps - 1, 1))
        distance = (block_output(model, a, layer) - target).abs().sum()
        (grad,) = torch.autograd.grad(distance, a)
        with torch.no_grad():
            a -= lr * grad
        progress.update(f"  step {step + 1}/{steps}: L1 distance {distance.item():,.1f} ({time.time() - start:.0f}s)")
    with torch.no_grad():
        final = (block_output(model, a, layer) - target).abs().sum().item()
    progress.done(f"  {steps} steps: L1 distance {final:,.1f} (a {NUDGE} nudge of E(x) gives {reference:,.1f})")
    return a.detach(), final, reference


def decode(a, embedding):
    """Token logits [n, T, V] of embeddings a [n, T, d] under the [V, d] embedding: a @ pinv(W)."""
    return a @ torch.linalg.pinv(embedding)


def hamming(logits, tokens, k=TOP_K):
    """The paper's modified Hamming distance: the fraction of positions whose true token is not
    among the top k of logits [n, T, V] (tokens [n, T])."""
    top = logits.topk(k, dim=-1).indices  # [n, T, k]
    recovered = (top == tokens.unsqueeze(-1)).any(-1)  # [n, T]
    return 1.0 - recovered.float().mean().item()


# ---------------------------------------------------------------------------------------- inputs and models

def check(name, model, args):
    """(layer, length) to measure, or a UserError before any work starts."""
    config = model.config
    layer, length = args.layer or config.n_layer, args.length or config.block_size
    if not 1 <= layer <= config.n_layer:
        raise UserError(f"--layer {layer} is out of range: {name} has blocks 1..{config.n_layer}")
    if length > config.block_size:
        raise UserError(f"--length {length} exceeds {name}'s block_size {config.block_size}")
    return layer, length


def measure(name, model, vocab, train_step, args):
    config = model.config
    layer, length = check(name, model, args)
    if args.data_dir:
        tokens = story_inputs(args.data_dir, args.n, length)
        if tokens.max() >= vocab:
            raise UserError(f"{args.data_dir} has token ids up to {tokens.max()} but {name} knows {vocab}: "
                            "use the data it was trained on")
    else:
        tokens = torch.randint(0, vocab, (args.n, length), generator=torch.Generator().manual_seed(args.seed))
    model.requires_grad_(False)
    print(f"{name}: {config.arch}, d{config.n_embd}, {config.n_layer} layers, output of block {layer}, "
          f"{args.n} x {length} tokens", flush=True)
    start = time.time()
    unit = model.wte.weight[:vocab].std().item() if args.scale == "embedding" else 1.0
    a, final, reference = recover(model, tokens, layer, args.steps, args.seed, unit)
    metric = hamming(decode(a, model.wte.weight[:vocab]), tokens)
    return {"model": name, "arch": config.arch, "hamming": metric, "steps": args.steps, "train_step": train_step,
            "layer": layer, "length": length, "scale": args.scale, "unit": unit, "l1": final, "l1_reference": reference,
            "seconds": time.time() - start}


def print_table(rows):
    print("\n| model | arch | trained steps | block | tokens | unit | Hamming (0 = exact) | final L1 | L1 of a 0.05 nudge | time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['arch']} | {'' if r['train_step'] is None else r['train_step']} | {r['layer']} | "
              f"{r['length']} | {r['unit']:.3g} | {r['hamming']:.3f} | {r['l1']:,.1f} | {r['l1_reference']:,.1f} | "
              f"{r['seconds']:.0f}s |")


def plot(rows, path):
    """Hamming distance against training step, one line per run folder."""
    plt = pyplot(path, "the numbers are in the table above")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    runs = {}
    for r in rows:
        runs.setdefault(str(Path(r["model"]).parent), []).append((r["train_step"] or 0, r["hamming"]))
    for run_name, points in runs.items():
        steps, values = zip(*sorted(points))
        ax.plot(steps, values, marker="o", label=run_name)
    ax.set(xlabel="training step", ylabel="Hamming distance (0 = input recovered)", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def represent(args):
    if not (args.ckpt or args.init):
        raise UserError("nothing to measure: give --ckpt FILE [FILE ...] or --init ARCH [ARCH ...]")
    models = list(models_to_test(args))  # every checkpoint read, and every setting checked, before the work
    for name, model, *_ in models:
        check(name, model, args)
    rows = [measure(*m, args) for m in models]
    rows.sort(key=lambda r: (str(Path(r["model"]).parent), r["train_step"] or 0))  # ckpt_step*.pt in step order
    print_table(rows)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    if args.plot:
        plot(rows, args.plot)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_models_to_test_flags(p, n_layer=8, n_embd=256)
    p.add_argument("--data_dir", help="inputs from the start of val.bin's stories (default: random tokens)")
    p.add_argument("--n", type=positive_int, default=10, help="how many texts")
    p.add_argument("--length", type=positive_int, help="tokens per text (default: the model's block_size)")
    p.add_argument("--layer", type=positive_int, help="measure the output of this block, 1..n_layer (default: the last)")
    p.add_argument("--steps", type=positive_int, default=500, help="gradient descent steps")
    p.add_argument("--seed", type=int, default=0, help="for the start point, the nudge, random inputs and --init weights")
    p.add_argument("--scale", choices=["embedding", "absolute"], default="embedding",
                   help="units of start, step sizes and nudge: the embedding's std, or the author's numbers as is")
    p.add_argument("--json", action="store_true", help="also one JSON object per model after the table")
    p.add_argument("--plot", help="a PNG of Hamming distance against training step (needs matplotlib)")
    args = p.parse_args(argv)
    run("experiments.represent", represent, args)


if __name__ == "__main__":
    main()
