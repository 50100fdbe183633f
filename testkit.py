"""The tests' shared helpers: the fixture text, tiny models and runs, the entry points as
functions, and the one-clear-line check of bad inputs. (Not a test file; conftest.py holds the
shared fixtures.)"""
import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import data_prep
import mixer
import retrieve
import train
from mixer import Config, Model

HERE = Path(__file__).resolve().parent
SAMPLE_TEXT = HERE / "testdata" / "tinystories-fixture.txt"  # 363 real stories: see testdata/README.md
# Offline (this project's CI), tiktoken reads its GPT-2 files from a local copy; online it fetches them.
if (HERE.parent / "shared" / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(HERE.parent / "shared" / "tiktoken_cache"))
HAS_C_COMPILER = any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))  # torch.compile on the CPU needs one


# Every token-mixing variant: the flat mixer, the multi-head mixer, the transformer, the hybrid.
VARIANTS = {
    "mixer": dict(arch="mixer"),
    "mixer-2head": dict(arch="mixer", mixer_heads=2),
    "transformer": dict(arch="transformer"),
    "transformer-eager": dict(arch="transformer", attn_impl="eager"),
    "hybrid": dict(arch="hybrid", mixer_heads=2),
    "toeplitz": dict(arch="mixer", mixing="toeplitz"),
    "toeplitz-2head": dict(arch="mixer", mixing="toeplitz", mixer_heads=2),
    "hybrid-toeplitz": dict(arch="hybrid", mixing="toeplitz", mixer_heads=2),
}


def tiny_model(variant, seed=0, perturb=True, **overrides):
    """A small model. perturb adds noise to every weight, the masked entries above the mixing
    diagonal too: the identity init of the mixing would hide missing context flow, and causality
    must come from the mask alone."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=256, block_size=16, n_layer=2, n_embd=32, n_head=4) | VARIANTS[variant] | overrides
    model = Model(Config(**kw)).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def count_fft_calls(monkeypatch):
    """A list that grows by one for each call of the FFT convolution."""
    calls, fft = [], mixer.ToeplitzFFT.apply
    monkeypatch.setattr(mixer.ToeplitzFFT, "apply", lambda *args: calls.append(1) or fft(*args))
    return calls


STORIES = ["Once upon a time there was a cat.\nIt liked milk.", "Tom had a red ball. He lost it!",
           "Sue saw a big, big tree.", "The dog ran home fast."]


SUMMARIES = ["A cat likes milk.", "Tom loses his ball.", "Sue sees a tree.", "A dog runs home."]


def official_txt(stories):
    return "".join(f"{s}\n<|endoftext|>\n" for s in stories)


def instruct_txt(stories, summaries):
    return "".join(f"Features: Dialogue\nWords: cat, ball\nSummary: {m}\nRandom sentence: Hi.\nStory: \n{s}\n"
                   "<|endoftext|>\n" for s, m in zip(stories, summaries))


def prep(*argv):
    data_prep.main([str(a) for a in argv])


def cli_error(capsys, run, *argv):
    """Run a command-line entry point that must fail: exit code 2 and one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        run(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


TINY_RUN = ["--compile", "false", "--n_layer", 2, "--n_embd", 64, "--block_size", 64, "--batch_size", 16,
            "--warmup_iters", 20, "--lr", 3e-3, "--eval_iters", 5, "--log_interval", 10]


# experiments.curves at a tiny size: 64 tokens a step, budgets of 25 and 50 steps, two seeds
TINY_CURVES = ["--archs", "mixer", "transformer", "--lr", "mixer=1e-2", "transformer=3e-3", "--block_size", "16",
               "--batch_size", "4", "--n_embd", "16", "--n_layer", "1", "--n_head", "2", "--budgets", "0.0016,0.0032",
               "--warmup_iters", "5", "--eval_iters", "2", "--compile", "false", "--log_interval", "1000"]


def run_train(*argv):
    train.main([str(a) for a in argv])


def read_log(out_dir):
    with open(out_dir / "log.csv") as f:
        return list(csv.DictReader(f))


ANIMALS = "cat dog frog bird fish bear duck lion mouse horse cow pig owl fox bee ant".split()


def synthetic_pairs(n, seed):
    """A story is a line of animal words; its summary names the same animals in another order."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        words = list(rng.choice(ANIMALS, size=5, replace=False))
        pairs.append({"story": "The " + " and the ".join(words) + " played.",
                      "summary": "About " + ", ".join(sorted(words)) + "."})
    return pairs


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_retrieve(*argv):
    retrieve.main([str(a) for a in argv])


def run_main(module):
    return lambda *argv: module.main([str(a) for a in argv])


CKPT = "{ws}/run/ckpt.pt"


def snapshot(folder):
    """Every file under folder with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_clear_line(main, argv, words, workspace, capsys):
    """main(*argv) ({ws}: the workspace) exits 2 with one error line holding words, and changes no file."""
    before = snapshot(workspace)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(*[a.format(ws=workspace) for a in argv])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "error: " in last and words in last, err
    assert snapshot(workspace) == before, "a failed command changed or left files"
