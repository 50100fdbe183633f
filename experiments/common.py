"""
What the experiments share (the core never imports it): the variants they name on their command
lines and their colours, one resumable store of finished runs, one rule for each arch's best point
and one for what the seeds allow us to say about the archs' order, the seed-spread statistic of
every table, the machine a result was measured on, one timed training step, and the optional
matplotlib.
"""
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cli import (WITHOUT_EFFECT, AtomicFile, UserError, add_model_flags, config_from_flags,
                 load_checkpoint, mixed_precision, model_from_checkpoint)
from mixer import ARCHS, Model
from train import load_data, train_step

# The models the experiments name on their command lines: each arch of mixer.py, and the masked
# mixer with Toeplitz mixing (Config fields; "toeplitz" is train.py --arch mixer --mixing toeplitz)
VARIANTS = {"mixer": {"arch": "mixer"}, "toeplitz": {"arch": "mixer", "mixing": "toeplitz"},
            "transformer": {"arch": "transformer"}, "hybrid": {"arch": "hybrid"}}
COLOURS = {"mixer": "tab:blue", "toeplitz": "tab:purple", "transformer": "tab:orange",
           "hybrid": "tab:green"}


def variant_flags(name):
    """train.py flags of a VARIANTS name: toeplitz -> --arch mixer --mixing toeplitz."""
    return [arg for field, value in VARIANTS[name].items() for arg in (f"--{field}", value)]


def refuse_flags_for_no_variant(flags, variants):
    """A model flag (of the flags given) that means nothing to every one of the variants compared is
    a mistake: refused in one line. (One that applies to some of them goes to those only.)"""
    for name in flags:
        if all(name in WITHOUT_EFFECT[VARIANTS[v]["arch"]] for v in variants):
            raise UserError(f"--{name} has no effect on any of {', '.join(variants)}: drop it")


class ResultStore:
    """results.jsonl in a folder: every finished run, one line each, keyed by all that sets its result.
    A run found there is read back, not run again, so an interrupted experiment continues where it stopped.
    Each line is written whole and synced to disk; a line cut off by a kill while it was written is
    reported, left where it is, and its run done again."""

    def __init__(self, folder, say_cut_off=True):
        self.path = Path(folder) / "results.jsonl"
        self.done, cut_off = [], 0
        for line in self.path.read_text().splitlines() if self.path.exists() else []:
            try:
                self.done.append(json.loads(line))
            except json.JSONDecodeError:
                cut_off += 1
        if cut_off and say_cut_off:
            print(f"{self.path}: {cut_off} line(s) cut off by an interrupted write (left as they are): "
                  "their runs are done again", flush=True)

    def find(self, key):
        """The stored run of key, or None."""
        return next((r for r in self.done if all(r.get(k) == v for k, v in key.items())), None)

    def has(self, key):
        return self.find(key) is not None

    def get(self, key, compute):
        """(the run of key, whether it was read back): compute() makes it and it is stored when missing."""
        found = self.find(key)
        if found is not None:
            return found, True
        found = {**key, **compute()}
        self.append(found)
        return found, False

    def append(self, row):
        """One line, whole: a single write in append mode (after a newline if a cut-off line ends the
        file), then synced, so a kill leaves every earlier row intact."""
        line = json.dumps(row) + "\n"
        with open(self.path, "ab+") as f:  # writes go to the end whatever the position
            end = f.seek(0, os.SEEK_END)
            if end and f.seek(end - 1) is not None and f.read(1) != b"\n":
                line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        self.done.append(row)


def best_of(results, group, score, higher_is_better=False):
    """{group(r): the result r with the best score(r)} (the lowest, unless higher_is_better): each arch's
    best point, chosen on selection or validation runs only."""
    best = {}
    for r in results:
        key = group(r)
        if key not in best or (score(r) > score(best[key]) if higher_is_better else score(r) < score(best[key])):
            best[key] = r
    return best


def ranking(by_arch, higher_is_better=False, fmt=".3f", unit=""):
    """What the seeds allow us to say about the archs' order ({arch: [value per seed]}, a loss unless
    higher_is_better), one sentence per neighbouring pair: a ranking only where every seed of one arch
    ends beyond every seed of the other."""
    if len(by_arch) < 2:
        return ["One arch only: nothing to rank."]
    if all(len(v) == 1 for v in by_arch.values()):
        return ["One seed per arch: no spread was measured, so no ranking is claimed (use --seeds 2 or more)."]
    single = [a for a, v in by_arch.items() if len(v) == 1]
    if single:  # (a run still going, say): its spread is unknown
        return [f"One seed of {', '.join(single)}: no spread was measured, so no ranking is claimed."]
    order = sorted(by_arch, key=lambda a: statistics.mean(by_arch[a]), reverse=higher_is_better)
    sign, side = (">", "above") if higher_is_better else ("<", "below")
    lines = []
    for better, worse in zip(order, order[1:]):
        gap = format(abs(statistics.mean(by_arch[worse]) - statistics.mean(by_arch[better])), fmt) + unit
        apart = min(by_arch[better]) > max(by_arch[worse]) if higher_is_better else max(by_arch[better]) < min(by_arch[worse])
        if apart:
            lines.append(f"{better} {sign} {worse} by {gap}: every seed of {better} ends {side} every seed of {worse}.")
        else:
            lines.append(f"{better} vs {worse}: {gap} apart, within the spread between seeds: no ranking.")
    return lines


# ---------------------------------------------------------------------------------------- timing

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


def make_train_step(config, batch_size, device, dtype, compile):
    """(model, step): step() is one training step as train.py takes it (train_step: forward,
    backward, clipping, AdamW) on fixed random tokens."""
    torch.manual_seed(0)
    model = Model(config).to(device)
    optimizer = model.make_optimizer(1e-4, 0.1, device)
    step_model = torch.compile(model) if compile else model
    ctx, scaler, _ = mixed_precision(device, dtype)
    x = torch.randint(0, config.vocab_size, (batch_size, config.block_size + 1), device=device)

    def step():
        train_step(optimizer, scaler, lambda: step_model(x[:, :-1], x[:, 1:])[1], 1e-4, ctx)

    return model, step


# ---------------------------------------------------------------------------------------- the models an analysis reads

def add_models_to_test_flags(parser, n_layer, n_embd):
    """--ckpt and --init with the settings of untrained models: the models models_to_test yields."""
    parser.add_argument("--ckpt", nargs="+", help="checkpoints from train.py (shell globs welcome)")
    parser.add_argument("--init", nargs="+", choices=ARCHS,
                        help="untrained models of these archs (the flags below)")
    defaults = {"vocab_size": 4096, "block_size": 64, "n_layer": n_layer, "n_embd": n_embd}
    add_model_flags(parser, defaults=defaults, skip=("arch", "causal"), title="--init models (mixer.Config)")


def models_to_test(args):
    """(name, model, real vocab size, training step or None) for every --ckpt or --init arch."""
    if args.ckpt:
        for path in args.ckpt:
            ckpt = load_checkpoint(path)
            model = model_from_checkpoint(ckpt, path).eval()
            yield path, model, ckpt["data_meta"]["vocab_size"], ckpt.get("step")
    for arch in args.init or ():
        torch.manual_seed(args.seed)
        config = config_from_flags(args, "invalid --init model", arch=arch)
        yield f"untrained {arch}", Model(config).eval(), args.vocab_size, 0


def story_inputs(data_dir, n, length):
    """[n, length] tokens: the start of the first n stories of val.bin with at least length tokens."""
    val = load_data(data_dir, layout="stories")[0]["val"]
    rows = []
    for start, end in zip(val.starts, list(val.starts[1:]) + [len(val.tokens)]):
        if end - start - 1 >= length:  # the story, without its <|endoftext|>
            rows.append(np.asarray(val.tokens[start : start + length], dtype=np.int64))
            if len(rows) == n:
                return torch.from_numpy(np.stack(rows))
    raise UserError(f"{data_dir}/val.bin has only {len(rows)} stories of at least {length} tokens: "
                    f"lower --n or --length")


# ---------------------------------------------------------------------------------------- reporting

def mean_and_range(values, fmt):
    """'mean' of one value, 'mean (min-max)' of several: how every table here shows a spread over
    seeds or repeats."""
    mean = format(statistics.mean(values), fmt)
    return mean if len(values) == 1 else f"{mean} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def per_second(count, seconds):
    """count / seconds, or None where no time was measured (a duration that rounds to 0)."""
    return count / seconds if seconds > 0 else None


def machine(device=None):
    """What a measurement ran on, for every results table: the GPU's name, or the CPU's model
    (from /proc/cpuinfo where there is one), its bf16 hardware and torch's thread count."""
    cuda = torch.cuda.is_available()
    device = torch.device(device) if device is not None else torch.device("cuda" if cuda else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple GPU (mps), {platform.machine()}"
    checks = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    features = [name for name, check in checks if getattr(torch.cpu, check, lambda: False)()]
    return (f"CPU {cpu_model()}" + (f" ({', '.join(features)})" if features else " (no bf16 hardware)")
            + f", {torch.get_num_threads()} thread(s)")


def cpu_model():
    """The CPU's model name and, from /proc/cpuinfo, its family and model numbers: a VM's name alone
    ("AMD EPYC") does not tell the generations apart (family 25: Zen 3 or Zen 4, by model; 26: Zen 5)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
        return f"{info['model name']} (family {info['cpu family']}, model {info['model']})"
    except (OSError, KeyError, ValueError):
        return platform.processor() or platform.machine()


def pyplot(picture, instead):
    """matplotlib.pyplot (non-interactive), or None after one line: matplotlib is an optional extra,
    so without it a script still writes its tables and says where the numbers are instead."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no {picture}: matplotlib is not installed (pip install matplotlib); {instead}")
        return None
    return plt


def save_figure(fig, path, dpi=110):
    """A matplotlib figure as a PNG, atomically (cli.AtomicFile), and a line that says so."""
    with AtomicFile(path) as f:
        fig.savefig(f, format="png", dpi=dpi)
    print(f"wrote {path}")
