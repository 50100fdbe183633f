"""
Measured speed and memory of the architectures: training throughput, MFU, generation, and the memory
a training step needs. --arch names mixer.py's archs and "toeplitz", the mixer with Toeplitz mixing.

    python -m experiments.bench --arch all                          # training step table + generation table
    python -m experiments.bench --arch mixer --compile              # one arch, torch.compile'd
    python -m experiments.bench --arch all --sweep_block_size 128,256,512,1024,2048   # context-length sweep
    python -m experiments.bench --memory --arch all --sweep_block_size 512,1024,2048,4096   # memory, the paper's B1 setting
    python -m experiments.bench --modes float32,bfloat16,float32+compile,bfloat16+compile --repeats 5   # dtype x compile
    python -m experiments.bench --toeplitz --sweep_block_size 128,256,512,1024,2048,4096   # Toeplitz mixing: dense vs FFT
    python -m experiments.bench --stream --gen_lengths 128,256 --repeats 3   # generation past block_size

Speed defaults: a paper-scale model on CUDA (d1024, 8 layers, T512, bf16), a small one on the CPU.
Each timing is the median of --steps steps after --warmup untimed ones. Prints markdown tables.

--memory counts bytes instead of timing (defaults: d1024, 8 layers, batch 1, as in the paper): the
activations autograd saves for backward (saved_tensors_hooks; each storage once; parameters and
buffers excluded), parameters, their gradients and AdamW's two moments. These are exact and the
same on any device for the same dtype; on CUDA the allocator's peak over a full step is shown too.
Attention archs are measured with both attention kernels: sdpa (fused, what you get) and eager (a
materialised [T, T] softmax, what the paper's transformer used).

--toeplitz times the Toeplitz mixing alone, forward + backward, built as a dense [T, T] matrix
(mixer.ToeplitzMatmul) and as an FFT convolution (mixer.ToeplitzFFT), in interleaved rounds:
mixer.FFT_FROM, the context length from which the model takes the FFT, comes from this table.

--stream times generation past the context: 4 x block_size new tokens (block_size from --gen_lengths),
Model.generate with its cache (the Toeplitz mixer streams, O(block_size) a token; the others crop to
the last block_size tokens and fill the cache again, a window's forward a token) against
use_cache=False (nanoGPT's crop and recompute), in --repeats interleaved rounds.
"""
import argparse
import dataclasses
import itertools
import json
import time

import torch

import mixer
from cli import (HelpFormatter, UserError, add_dtype_flag, add_model_flags, autocast, config_from_flags,
                 pick_device, positive_int, run)
from experiments.common import VARIANTS, machine, make_train_step, mean_and_range, median_seconds, sync
from mixer import Model
from train import peak_flops

GPU_DEFAULTS = dict(n_embd=1024, n_layer=8, block_size=512, batch_size=16)
CPU_DEFAULTS = dict(n_embd=256, n_layer=4, block_size=256, batch_size=8)
MEMORY_DEFAULTS = dict(n_embd=1024, n_layer=8, block_size=512, batch_size=1)
MB = 2**20


def variant(base, name, **changes):
    """The Config of a VARIANTS name from base's settings; a setting that this arch cannot take
    (n_embd not divisible by its heads, say) is a UserError."""
    try:
        return dataclasses.replace(base, **VARIANTS[name], **changes)
    except ValueError as e:
        raise UserError(f"{name}: invalid model settings: {e}") from None


def name_of(config):
    return "toeplitz" if config.arch == "mixer" and config.mixing == "toeplitz" else config.arch


def bench_train(config, args, device):
    """Training tokens/s, MFU, peak memory at --dtype and --compile."""
    model, step = make_train_step(config, args.batch_size, device, args.dtype, args.compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(step, args.steps, args.warmup, device)
    tokens_per_s = args.batch_size * config.block_size / seconds
    peak = peak_flops(device)
    return {"params": model.num_params(), "non_embedding": model.num_params(non_embedding=True),
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * model.flops_per_token() / peak if peak else None,
            "peak_mem_mb": torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else None}


def bench_modes(base, archs, args, device):
    """Training tokens/s of every (arch, mode), interleaved: each of --repeats rounds times every
    pair once (median of --steps steps), so the machine's drift hits all pairs alike, and speed-ups
    are ratios within a round. Returns {(arch, mode): {"tokens_per_s": [...], "first_step_s": s}}."""
    steps, results = {}, {}
    for arch, mode in itertools.product(archs, args.modes):
        dtype, compile = mode
        _, step = make_train_step(variant(base, arch), args.batch_size, device, dtype, compile)
        sync(device)
        t0 = time.perf_counter()
        step()  # the first step traces and compiles under --compile
        sync(device)
        steps[arch, mode] = step
        results[arch, mode] = {"first_step_s": time.perf_counter() - t0, "tokens_per_s": []}
        for _ in range(args.warmup):
            step()
    tokens = args.batch_size * base.block_size
    for round_ in range(args.repeats):
        for key, step in steps.items():
            results[key]["tokens_per_s"].append(tokens / median_seconds(step, args.steps, 0, device))
        print(f"  round {round_ + 1}/{args.repeats} timed", flush=True)
    return results


def mode_name(mode):
    dtype, compile = mode
    return dtype + (" + compile" if compile else "")


def print_modes_table(results, archs, args):
    base_mode = args.modes[0]
    print(f"| arch | mode | tokens/s, mean (min-max) | speed-up over {mode_name(base_mode)}, mean (min-max) | "
          "first step (s) |")
    print("|---|---|---|---|---|")
    for arch in archs:
        reference = results[arch, base_mode]["tokens_per_s"]
        for mode in args.modes:
            r = results[arch, mode]
            ratios = [a / b for a, b in zip(r["tokens_per_s"], reference)]
            print(f"| {arch} | {mode_name(mode)} | {mean_and_range(r['tokens_per_s'], ',.0f')} | "
                  f"{mean_and_range(ratios, '.2f')}x | "
                  f"{r['first_step_s']:.1f} |")
    print(f"\n(first step: includes tracing and compilation under compile; {args.repeats} interleaved rounds)\n")


def bench_toeplitz(args, device):
    """Seconds of one forward + backward of the flat Toeplitz mixing ([batch, 1, T, n_embd] inputs in
    the autocast dtype), dense and FFT, median of --steps per round, --repeats interleaved rounds at
    each context length: {T: {"dense": [...], "fft": [...]}}."""
    ctx, dtype = autocast(device, args.dtype)
    results = {}
    for T in args.sweep or [args.block_size]:
        g = torch.Generator().manual_seed(0)
        kernel = (torch.randn(1, T, generator=g) / T).to(device).requires_grad_()
        v = torch.randn(args.batch_size, 1, T, args.n_embd, generator=g).to(device, getattr(torch, dtype))
        v.requires_grad_()

        def dense():
            with ctx:
                y = mixer.ToeplitzMatmul.apply(kernel, v, 0, T)
            y.backward(torch.ones_like(y))

        def fft():
            with ctx:
                y = mixer.ToeplitzFFT.apply(kernel, v)
            y.backward(torch.ones_like(y))

        results[T] = {"dense": [], "fft": []}
        for _ in range(args.repeats):
            for name, fn in (("dense", dense), ("fft", fft)):
                results[T][name].append(median_seconds(fn, args.steps, args.warmup, device))
        print(f"  T = {T} timed", flush=True)
    return results


def print_toeplitz_table(results):
    print("| T | dense (ms) | FFT (ms) | FFT speed-up (dense / FFT), mean (min-max) |\n|---|---|---|---|")
    for T, r in results.items():
        ratios = [d / f for d, f in zip(r["dense"], r["fft"])]
        print(f"| {T} | {mean_and_range([t * 1e3 for t in r['dense']], ',.2f')} | "
              f"{mean_and_range([t * 1e3 for t in r['fft']], ',.2f')} | {mean_and_range(ratios, '.2f')}x |")
    print(f"\n(forward + backward; mixer.FFT_FROM = {mixer.FFT_FROM}: the model takes the FFT from there)\n")


def bench_generate(config, context, args, device):
    """Greedy generation from a prompt of half the context up to the full context, cached vs
    recomputing the context for every token: (cached tokens/s, recomputed tokens/s, same tokens)."""
    torch.manual_seed(0)
    model = Model(config).to(device).eval()
    prompt = torch.randint(0, config.vocab_size, (1, context // 2), device=device)
    new = context - prompt.size(1)
    tokens, speed = {}, {}
    for use_cache in (True, False):
        def generate(use_cache=use_cache):
            tokens[use_cache] = model.generate(prompt, new, temperature=0, use_cache=use_cache)
        speed[use_cache] = new / median_seconds(generate, max(1, args.steps // 3), 1, device)
    return speed[True], speed[False], torch.equal(tokens[True], tokens[False])


def bench_stream(config, args, device):
    """Tokens/s of greedy generation of 4 x block_size tokens from one token, generate() with its cache
    against crop-and-recompute (use_cache=False): ([cached per round], [recomputed per round])."""
    torch.manual_seed(0)
    model = Model(config).to(device).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    new = 4 * config.block_size
    speeds = {True: [], False: []}
    for _ in range(args.repeats):
        for use_cache in (True, False):
            seconds = median_seconds(lambda: model.generate(prompt, new, temperature=0, use_cache=use_cache), 1, 0, device)
            speeds[use_cache].append(new / seconds)
    return speeds[True], speeds[False]


def print_stream_table(archs, base, args, device):
    print("| arch | block_size | new tokens | generate() | tokens/s | crop-and-recompute tokens/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for T in args.gen:
        for arch in archs:
            config = variant(base, arch, block_size=T)
            cached, recomputed = bench_stream(config, args, device)
            how = "streams" if name_of(config) == "toeplitz" else "crops"
            ratios = [c / r for c, r in zip(cached, recomputed)]
            print(f"| {arch} | {T} | {4 * T} | {how} | {mean_and_range(cached, ',.0f')} | "
                  f"{mean_and_range(recomputed, ',.0f')} | {mean_and_range(ratios, '.1f')}x |", flush=True)


def training_memory(config, args, device):
    """MB a training step holds, by kind. Activations are counted while the forward runs: every
    tensor autograd saves for backward, each storage once, except parameters and buffers (those are
    held anyway and counted on their own)."""
    torch.manual_seed(0)
    model = Model(config).to(device)
    held = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    saved = {}  # storage address -> bytes

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        # detached: the same storage, without the graph; returning the tensor itself would let an
        # output saved by its own node keep that node alive (a cycle Python's gc cannot see: a leak)
        return tensor.detach()

    x = torch.randint(0, config.vocab_size, (args.batch_size, config.block_size + 1), device=device)
    ctx, _ = autocast(device, args.dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), ctx:
        _, loss = model(x[:, :-1], x[:, 1:])
    cuda_peak = None
    if device.type == "cuda":  # the allocator's view of a whole step: forward, backward, AdamW
        loss.backward()
        torch.optim.AdamW(model.parameters(), fused=True).step()
        cuda_peak = torch.cuda.max_memory_allocated(device) / MB
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / MB
    mb = {"param_mb": params, "grad_mb": params, "optimizer_mb": 2 * params,  # AdamW: exp_avg, exp_avg_sq
          "buffer_mb": sum(b.numel() * b.element_size() for b in model.buffers()) / MB,
          "activation_mb": sum(saved.values()) / MB}
    return {**mb, "total_mb": sum(mb.values()), "cuda_peak_mb": cuda_peak}


def memory_rows(base, archs, block_sizes, args, device):
    """(config, MB) for every arch at every block size; attention archs with both kernels."""
    configs = [variant(base, arch, block_size=T, attn_impl=impl) for T in block_sizes for arch in archs
               for impl in (("sdpa", "eager") if arch in ("transformer", "hybrid") else ("sdpa",))]
    for config in configs:
        yield config, training_memory(config, args, device)


def print_memory_table(rows, as_json):
    print("| arch | attention | T | params | grads + AdamW | activations | buffers | total | CUDA peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for config, m in rows:
        attention = "-" if config.arch == "mixer" else config.attn_impl
        print(f"| {name_of(config)} | {attention} | {config.block_size} | {m['param_mb']:,.1f} | "
              f"{m['grad_mb'] + m['optimizer_mb']:,.1f} | {m['activation_mb']:,.1f} | {m['buffer_mb']:,.1f} | "
              f"{m['total_mb']:,.1f} | {fmt(m['cuda_peak_mb'], ',.0f')} |", flush=True)
        results.append({"arch": name_of(config), "attn_impl": None if config.arch == "mixer" else config.attn_impl,
                        "block_size": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer, **m})
    print("(MB; grads + AdamW = 3 x params: one gradient and two AdamW moments per parameter)\n")
    print_memory_ratios(results)
    if as_json:
        for r in results:
            print(json.dumps(r))


def print_memory_ratios(results):
    """How many times each mixer's memory each transformer needs, per context length."""
    mixers = {(r["arch"], r["block_size"]): r for r in results if r["arch"] in ("mixer", "toeplitz")}
    pairs = [(m, r) for r in results if r["arch"] == "transformer"
             for (kind, T), m in mixers.items() if T == r["block_size"]]
    if not pairs:
        return
    print("| T | transformer kernel | against | activations / mixer's | total / mixer's |\n|---|---|---|---|---|")
    for m, r in pairs:
        print(f"| {r['block_size']} | {r['attn_impl']} | {m['arch']} | {r['activation_mb'] / m['activation_mb']:.2f}x | "
              f"{r['total_mb'] / m['total_mb']:.2f}x |")
    print()


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
        print(f"| {name_of(config)} | {config.n_embd} | {config.n_layer} | {config.block_size} | "
              f"{r['params'] / 1e6:.1f}M ({r['non_embedding'] / 1e6:.2f}M) | {r['tokens_per_s']:,.0f} | {fmt(r['mfu'], '.1%')} | "
              f"{fmt(r['peak_mem_mb'], ',.0f')} |")
    print()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--arch", nargs="+", choices=[*VARIANTS, "all"], default=["all"],
                   help="all: mixer, toeplitz, transformer, hybrid")
    p.add_argument("--memory", action="store_true", help="count training memory instead of timing")
    p.add_argument("--toeplitz", action="store_true", help="time the Toeplitz mixing op, dense against FFT, at each "
                                                           "--sweep_block_size (batch, n_embd and dtype as given)")
    p.add_argument("--stream", action="store_true", help="time generation of 4 x block_size tokens past the context, "
                                                         "at each --gen_lengths block size (see above)")
    p.add_argument("--json", action="store_true", help="--memory: also one JSON object per row")
    add_model_flags(p, defaults={"vocab_size": 8192}, skip=("arch", "causal", "attn_impl", "mixing"),
                    title="model (mixer.Config; n_embd, n_layer, block_size default by device and mode, see above)")
    p.add_argument("--batch_size", type=positive_int, help="default: by device and mode, see above")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=positive_int, default=5, help="untimed steps first (compilation, allocator, threads)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--modes", help="comma-separated DTYPE or DTYPE+compile, e.g. float32,bfloat16,bfloat16+compile: "
                                   "one interleaved training-speed table of every arch in every mode (replaces the "
                                   "other tables)")
    p.add_argument("--repeats", type=positive_int, default=3, help="--modes, --toeplitz, --stream: interleaved rounds "
                                                                   "(speed-up spread)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add_dtype_flag(p)
    p.add_argument("--gen_lengths", default="128,512", help="context lengths for the generation benchmark ('' skips)")
    p.add_argument("--sweep_block_size", help="comma-separated block sizes: training tokens/s (or memory) per arch")
    args = p.parse_args(argv)
    try:
        args.sweep = [int(t) for t in args.sweep_block_size.split(",")] if args.sweep_block_size else []
        args.gen = [int(t) for t in args.gen_lengths.split(",")] if args.gen_lengths else []
    except ValueError:
        p.error("--sweep_block_size and --gen_lengths take comma-separated integers, e.g. 512,1024")
    args.modes = [parse_mode(m, p) for m in args.modes.split(",")] if args.modes else []
    if any(t < 1 for t in args.sweep + args.gen):
        p.error("block sizes and generation lengths must be positive")
    return args


def parse_mode(text, parser):
    dtype, _, extra = text.strip().partition("+")
    if dtype not in ("auto", "float32", "bfloat16", "float16") or extra not in ("", "compile"):
        parser.error(f"--modes: {text!r} is not DTYPE or DTYPE+compile (DTYPE: auto, float32, bfloat16, float16)")
    return dtype, extra == "compile"


def bench(args):
    device = pick_device(args.device)
    sizes = MEMORY_DEFAULTS if args.memory else GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    archs = list(VARIANTS) if "all" in args.arch else args.arch
    base = config_from_flags(args, arch="mixer")  # each row sets its own arch
    for arch in archs:
        variant(base, arch)  # every arch's settings checked before any measurement
    name = machine(device)
    if args.memory:
        print(f"device: {name}, dtype {autocast(device, args.dtype)[1]}, d{args.n_embd}, {args.n_layer} layers, "
              f"batch {args.batch_size}, vocab {args.vocab_size}\n")
        print_memory_table(memory_rows(base, archs, args.sweep or [args.block_size], args, device), args.json)
        return
    if args.toeplitz:
        print(f"device: {name}, dtype {autocast(device, args.dtype)[1]}, batch {args.batch_size}, n_embd "
              f"{args.n_embd}; median of {args.steps} steps per round, {args.repeats} interleaved rounds\n")
        print_toeplitz_table(bench_toeplitz(args, device))
        return
    if args.stream:
        print(f"device: {name}, float32 (generate runs without autocast), d{args.n_embd}, "
              f"{args.n_layer} layers, batch 1; {args.repeats} interleaved rounds, mean (min-max)\n")
        print_stream_table(archs, base, args, device)
        return
    if args.modes:
        print(f"device: {name}, batch {args.batch_size}, d{args.n_embd}, {args.n_layer} layers, T{args.block_size}, "
              f"vocab {args.vocab_size}; median of {args.steps} steps per round\n")
        print_modes_table(bench_modes(base, archs, args, device), archs, args)
        return
    print(f"device: {name}, dtype {autocast(device, args.dtype)[1]}, compile {args.compile}, "
          f"batch {args.batch_size}, median of {args.steps} steps after {args.warmup} warm-up\n")

    print("Training step, equal width and depth:")
    rows = [(c, bench_train(c, args, device)) for c in (variant(base, a) for a in archs)]
    print_train_table(rows)
    if len(archs) > 1:
        target = rows[0][1]["non_embedding"]
        print(f"Training step, equal non-embedding parameters (widths matched to the {archs[0]}'s {target / 1e6:.2f}M):")
        matched = [variant(base, a, n_embd=matched_width(variant(base, a), target)) for a in archs]
        print_train_table([(c, bench_train(c, args, device)) for c in matched])
    if args.sweep:
        print("Context-length sweep:")
        sweep = [variant(base, a, block_size=t) for t in args.sweep for a in archs]
        print_train_table([(c, bench_train(c, args, device)) for c in sweep])
    if args.gen:
        print("Generation (greedy, batch 1, from a prompt of half the context):")
        print("| arch | context | cached tokens/s | recomputed tokens/s | speed-up | same tokens |")
        print("|---|---|---|---|---|---|")
        for arch in archs:
            for length in args.gen:
                config = variant(base, arch, block_size=max(length, base.block_size))
                cached, full, same = bench_generate(config, length, args, device)
                print(f"| {arch} | {length} | {cached:,.0f} | {full:,.0f} | {cached / full:.1f}x | {same} |")


def main(argv=None):
    run("experiments.bench", bench, parse_args(argv))


if __name__ == "__main__":
    main()
