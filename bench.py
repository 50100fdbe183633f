"""
Measured speed of the three architectures: training throughput, MFU, peak memory, generation.

    python bench.py --arch all                          # training step table + generation table
    python bench.py --arch mixer --compile              # one arch, torch.compile'd
    python bench.py --arch all --sweep_block_size 128,256,512,1024,2048   # context-length sweep

Defaults: a paper-scale model on CUDA (d1024, 8 layers, T512, bf16), a small one on the CPU.
Each timing is the median of --steps steps after --warmup untimed ones. Prints markdown tables.
"""
import argparse
import dataclasses
import statistics
import time

import torch

from mixer import ARCHS, Config, Model
from train import autocast, peak_flops, pick_device

GPU_DEFAULTS = dict(n_embd=1024, n_layer=8, block_size=512, batch_size=16)
CPU_DEFAULTS = dict(n_embd=256, n_layer=4, block_size=256, batch_size=8)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, steps, warmup, device):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_train(config, args, device):
    """Forward + backward + AdamW step on random tokens: tokens/s, MFU, peak memory."""
    torch.manual_seed(0)
    model = Model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if args.compile else model
    ctx, _ = autocast(device, args.dtype)
    x = torch.randint(0, config.vocab_size, (args.batch_size, config.block_size + 1), device=device)

    def step():
        with ctx:
            _, loss = step_model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(step, args.steps, args.warmup, device)
    tokens_per_s = args.batch_size * config.block_size / seconds
    peak = peak_flops(device)
    return {"params": model.num_params(), "non_embedding": model.num_params(non_embedding=True),
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * model.flops_per_token() / peak if peak else None,
            "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def bench_generate(config, context, args, device):
    """Greedy generation from a prompt of half the context up to the full context, cached vs
    recomputing the context for every token: (cached tokens/s, recomputed tokens/s, same tokens)."""
    torch.manual_seed(0)
    model = Model(config).to(device).eval()
    prompt = torch.randint(0, config.vocab_size, (1, context // 2), device=device)
    new = context - prompt.size(1)
    tokens, speed = {}, {}
    for use_cache in (True, False):
        def run(use_cache=use_cache):
            tokens[use_cache] = model.generate(prompt, new, temperature=0, use_cache=use_cache)
        speed[use_cache] = new / median_seconds(run, max(1, args.steps // 3), 1, device)
    return speed[True], speed[False], torch.equal(tokens[True], tokens[False])


def matched_width(config, target_params):
    """The n_embd (a multiple of 64 that all heads divide) whose model has the non-embedding
    parameter count closest to target_params."""
    widths = [w for w in range(64, 8 * config.n_embd + 1, 64)
              if w % config.n_head == 0 and w % config.mixer_heads == 0]
    count = lambda w: Model(dataclasses.replace(config, n_embd=w)).num_params(non_embedding=True)  # noqa: E731
    return min(widths, key=lambda w: abs(count(w) - target_params))


def fmt(value, spec, missing="n/a"):
    return missing if value is None else format(value, spec)


def print_train_table(rows):
    print("| arch | n_embd | n_layer | T | params (non-embedding) | tokens/s | MFU | peak mem (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for config, r in rows:
        print(f"| {config.arch} | {config.n_embd} | {config.n_layer} | {config.block_size} | "
              f"{r['params'] / 1e6:.1f}M ({r['non_embedding'] / 1e6:.2f}M) | {r['tokens_per_s']:,.0f} | {fmt(r['mfu'], '.1%')} | "
              f"{fmt(r['peak_mem_mb'], ',.0f')} |")
    print()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=[*ARCHS, "all"], default="all")
    p.add_argument("--n_embd", type=int)
    p.add_argument("--n_layer", type=int)
    p.add_argument("--block_size", type=int)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--mixer_heads", type=int, default=1)
    p.add_argument("--vocab_size", type=int, default=8192)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator, threads)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--gen_lengths", default="128,512", help="context lengths for the generation benchmark ('' skips)")
    p.add_argument("--sweep_block_size", help="comma-separated block sizes: training tokens/s and memory per arch")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    sizes = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    archs = ARCHS if args.arch == "all" else (args.arch,)
    base = Config(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                  n_embd=args.n_embd, n_head=args.n_head, mixer_heads=args.mixer_heads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, dtype {autocast(device, args.dtype)[1]}, compile {args.compile}, "
          f"batch {args.batch_size}, median of {args.steps} steps after {args.warmup} warm-up\n")

    print("Training step, equal width and depth:")
    rows = [(c, bench_train(c, args, device)) for c in (dataclasses.replace(base, arch=a) for a in archs)]
    print_train_table(rows)
    if args.arch == "all":
        target = rows[0][1]["non_embedding"]
        print(f"Training step, equal non-embedding parameters (widths matched to the mixer's {target / 1e6:.2f}M):")
        matched = [dataclasses.replace(base, arch=a, n_embd=matched_width(dataclasses.replace(base, arch=a), target))
                   for a in archs]
        print_train_table([(c, bench_train(c, args, device)) for c in matched])
    if args.sweep_block_size:
        print("Context-length sweep:")
        sweep = [dataclasses.replace(base, arch=a, block_size=int(t)) for t in args.sweep_block_size.split(",")
                 for a in archs]
        print_train_table([(c, bench_train(c, args, device)) for c in sweep])
    if args.gen_lengths:
        print("Generation (greedy, batch 1, from a prompt of half the context):")
        print("| arch | context | cached tokens/s | recomputed tokens/s | speed-up | same tokens |")
        print("|---|---|---|---|---|---|")
        for arch in archs:
            for length in map(int, args.gen_lengths.split(",")):
                config = dataclasses.replace(base, arch=arch, block_size=max(length, base.block_size))
                cached, full, same = bench_generate(config, length, args, device)
                print(f"| {arch} | {length} | {cached:,.0f} | {full:,.0f} | {cached / full:.1f}x | {same} |")


if __name__ == "__main__":
    main()
