"""Tests of the experiments (python -m pytest -q from the repository root runs them with the core's).
They share the core suite's fixtures and helpers (test_mixer.py): its prepared data, tiny checkpoints
and the workspace of bad inputs."""
import argparse
import csv
import dataclasses
import gc
import json
import re
import shutil
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cli
import train
from experiments import bench, common, compare, curves, length, mixing, recall, represent, retrieval
import mixer
from mixer import Config, Model
from testkit import (CKPT, HERE, TINY_CURVES, TINY_RUN, assert_one_clear_line, count_fft_calls, read_log,
                     run_main, run_train, synthetic_pairs, tiny_model, write_jsonl)


# ---------------------------------------------------------------------------------------- bench.py



def test_bench_smoke(capsys):
    bench.main(["--arch", "all", "--steps", "1", "--warmup", "1", "--n_embd", "32", "--n_layer", "1",
                "--block_size", "16", "--batch_size", "2", "--vocab_size", "256", "--gen_lengths", "16",
                "--sweep_block_size", "8,16"])
    out = capsys.readouterr().out
    train_rows = re.findall(r"^\| (mixer|toeplitz|transformer|hybrid) \| \d+ \| 1 \| (\d+) \| [\d.]+M \([\d.]+M\) \| "
                            r"[\d,]+ \|", out, re.M)
    assert len(train_rows) == 4 + 4 + 8  # equal size, equal params, sweep of two lengths
    gen_rows = re.findall(r"^\| (\w+) \| 16 \| [\d,]+ \| [\d,]+ \| [\d.]+x \| (True|False) \|$", out, re.M)
    assert [same for _, same in gen_rows] == ["True"] * 4


def test_bench_modes_interleave_and_report_speed_ups(capsys):
    bench.main(["--arch", "all", "--modes", "float32,bfloat16", "--repeats", "2", "--steps", "1", "--warmup", "1",
                "--n_embd", "32", "--n_layer", "1", "--block_size", "16", "--batch_size", "2", "--vocab_size", "256"])
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\w+) \| (float32|bfloat16) \| [\d,]+ \([\d,]+-[\d,]+\) \| ([\d.]+) \(([\d.]+)-([\d.]+)\)x \| [\d.]+ \|$",
                      out, re.M)
    assert [(arch, mode) for arch, mode, *_ in rows] == [(a, m) for a in bench.VARIANTS for m in ("float32", "bfloat16")]
    assert all(r[2:] == ("1.00", "1.00", "1.00") for r in rows if r[1] == "float32")  # the reference mode
    assert out.count("round ") == 2


def test_memory_json_rows_and_what_they_count(capsys):
    bench.main(["--memory", "--arch", "all", "--n_embd", "32", "--n_layer", "1", "--vocab_size", "256",
                "--sweep_block_size", "32,128", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["arch"], r["attn_impl"], r["block_size"]) for r in rows] == [
        (arch, impl, T) for T in (32, 128) for arch, impl in
        [("mixer", None), ("toeplitz", None), ("transformer", "sdpa"), ("transformer", "eager"), ("hybrid", "sdpa"),
         ("hybrid", "eager")]]
    for r in rows:
        model = Model(Config(**bench.VARIANTS[r["arch"]], vocab_size=256, block_size=r["block_size"], n_layer=1,
                             n_embd=32))
        assert r["param_mb"] == pytest.approx(model.num_params() * 4 / 2**20)
        assert r["grad_mb"] == r["param_mb"] and r["optimizer_mb"] == 2 * r["param_mb"]
        assert r["activation_mb"] > 0 and r["cuda_peak_mb"] is None


def test_bench_stream_times_generation_past_the_block_for_every_arch(capsys):
    bench.main(["--stream", "--gen_lengths", "8", "--n_embd", "16", "--n_layer", "1", "--vocab_size", "64",
                "--repeats", "2"])
    rows = re.findall(r"^\| (\w+) \| 8 \| 32 \| (streams|crops) \| [\d,]+ \([\d,]+-[\d,]+\) \| [\d,]+ \([\d,]+-[\d,]+\) \| "
                      r"[\d.]+ \([\d.]+-[\d.]+\)x \|$", capsys.readouterr().out, re.M)
    assert rows == [("mixer", "crops"), ("toeplitz", "streams"), ("transformer", "crops"), ("hybrid", "crops")]


def test_bench_toeplitz_times_dense_and_fft_in_rounds(capsys):
    bench.main(["--toeplitz", "--sweep_block_size", "16,32", "--n_embd", "8", "--batch_size", "2", "--repeats", "2",
                "--steps", "1", "--warmup", "1"])
    rows = re.findall(r"^\| (\d+) \| [\d.]+ \([\d.]+-[\d.]+\) \| [\d.]+ \([\d.]+-[\d.]+\) \| [\d.]+ \([\d.]+-[\d.]+\)x \|$",
                      capsys.readouterr().out, re.M)
    assert rows == ["16", "32"]


def activation_mb(arch, T, **kw):
    config = Config(arch=arch, vocab_size=256, block_size=T, n_layer=2, n_embd=32, **kw)
    args = argparse.Namespace(batch_size=1, dtype="float32")
    return bench.training_memory(config, args, torch.device("cpu"))["activation_mb"]


def test_memory_measurement_frees_the_model_and_its_graph():
    weights = []  # a leaked graph keeps the parameters alive (and every activation with them)
    original = bench.Model
    bench.Model = lambda config: weights.append(weakref.ref((m := original(config)).lm_head.weight)) or m  # noqa: E731
    try:
        activation_mb("transformer", 64, attn_impl="eager")
    finally:
        bench.Model = original
    gc.collect()
    assert len(weights) == 1 and weights[0]() is None, "the measured model's weights are still alive: a leak"


def test_the_toeplitz_fft_saves_no_more_than_the_dense_mixer(monkeypatch):
    """Its backward recomputes the spectra: it keeps the kernel and the input, as the dense product does."""
    calls = count_fft_calls(monkeypatch)
    monkeypatch.setattr(mixer, "FFT_FROM", {"float32": 64})
    for T in (64, 256):
        assert activation_mb("mixer", T, mixing="toeplitz") <= activation_mb("mixer", T)
    assert len(calls) == 4  # 2 layers at each T: the FFT was measured


def test_mixer_activations_grow_linearly_with_context():
    """The masked mixing must not keep [T, T]-sized copies for backward: 4x the context, at most about
    4x the activations. The eager transformer keeps its [T, T] attention and grows faster."""
    assert activation_mb("mixer", 512) < 4.2 * activation_mb("mixer", 128)
    assert activation_mb("mixer", 512, mixing="toeplitz") < 4.2 * activation_mb("mixer", 128, mixing="toeplitz")
    assert activation_mb("mixer", 512, mixing="toeplitz") <= activation_mb("mixer", 512)
    assert activation_mb("transformer", 512, attn_impl="eager") > 6 * activation_mb("transformer", 128, attn_impl="eager")


# ---------------------------------------------------------------------------------------- retrieval.py

def run_retrieval(*argv):
    retrieval.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def four_language_models(prepared, tmp_path_factory):
    """Two archs, two seeds each: what retrieve.py compare takes from a language-model comparison."""
    out = tmp_path_factory.mktemp("lms")
    for arch in ("mixer", "transformer"):
        for seed in (1338, 1339):
            run_train("--data_dir", prepared, "--out_dir", out / f"{arch}-seed{seed}", *TINY_RUN, "--arch", arch,
                      "--seed", seed, "--max_iters", 30, "--eval_interval", 30)
    return sorted(out.glob("*/ckpt.pt"))


def test_retrieval_compare_chooses_on_validation_and_reports_held_out(four_language_models, tmp_path, monkeypatch,
                                                                      capsys):
    """A fake of each trained retrieval model: lr 1e-3 wins on validation and loses on the held-out
    pairs; the comparison must pick 1e-3 and report the confirmation runs (fine-tuning seed 1)."""
    def fake_run(method, path, lr, seed, data, args, device):
        mixer = "mixer" in str(path)
        held = {None: 0.1, 1e-3: 0.5, 1e-2: 0.9}[lr] + (0.05 if mixer else 0.0) + 0.01 * ("1339" in str(path))
        val = {None: 0.1, 1e-3: 0.8, 1e-2: 0.4}[lr]
        counts = [32] if method == "mixer" else [32, 64]
        return {split: {str(n): {"top1": value, "top5": 1.0, "mrr": value} for n in counts}
                for split, value in (("val", val), ("held_out", held))}

    monkeypatch.setattr(retrieval, "retrieval_run", fake_run)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(120, seed=0))
    held_out = write_jsonl(tmp_path / "held.jsonl", synthetic_pairs(64, seed=1))
    argv = ["--ckpt", *four_language_models, "--pairs", pairs, "--held_out", held_out, "--val_pairs", 40,
            "--lrs", 1e-3, 1e-2, "--v1_lrs", 1e-3, 1e-2, "--out_dir", tmp_path / "out"]
    run_retrieval(*argv)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| mixer | 80.0 | 40.0 | 0.001 (edge) |" in table  # the grid: validation top-1, best by it
    assert "| mixer | 0.001 | 55.5 (55.0-56.0) | 55.5 (55.0-56.0) |" in table  # held-out, both LM seeds
    assert "| transformer | 0.001 | 50.5 (50.0-51.0) | 50.5 (50.0-51.0) |" in table
    assert "mixer > transformer by 5.0 points: every seed of mixer ends above every seed of transformer." in table
    runs = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    confirmed = [r for r in runs if r["method"] == "infonce" and r["seed"] == 1]
    assert sorted((r["variant"], r["lm_seed"], r["lr"]) for r in confirmed) == [
        ("mixer", 1338, 1e-3), ("mixer", 1339, 1e-3), ("transformer", 1338, 1e-3), ("transformer", 1339, 1e-3)]
    assert {r["lm_seed"] for r in runs if r["seed"] == 0} == {1338}  # the grid on each arch's first LM only
    assert len(runs) == 4 + 2 * (4 + 4) and (tmp_path / "out" / "results.png").exists()  # raw; grid + confirmed, twice
    capsys.readouterr()
    run_retrieval(*argv)  # everything is read back
    assert ": training" not in capsys.readouterr().out


def test_retrieval_compare_never_trains_on_its_validation_pairs(four_language_models, tmp_path, monkeypatch):
    """The pairs that choose the learning rate are never trained on, by InfoNCE or by the v1 mixer."""
    seen, trained, v1_rows = {}, set(), []
    carve, tune, fit_v1 = retrieval.retrieval_data, retrieval.fine_tune, retrieval.train_retrieval_mixer

    def spy_data(*a, **kw):
        seen.update(carve(*a, **kw))
        return seen

    def spy_tune(model, summaries, stories, *a, **kw):
        trained.update((tuple(q), tuple(s)) for q, s in zip(summaries, stories))
        return tune(model, summaries, stories, *a, **kw)

    def spy_v1(summaries, stories, recipe, v1):
        v1_rows.append(len(summaries))
        return fit_v1(summaries, stories, recipe, v1)

    monkeypatch.setattr(retrieval, "retrieval_data", spy_data)
    monkeypatch.setattr(retrieval, "fine_tune", spy_tune)
    monkeypatch.setattr(retrieval, "train_retrieval_mixer", spy_v1)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(120, seed=0))
    held_out = write_jsonl(tmp_path / "held.jsonl", synthetic_pairs(64, seed=1))
    run_retrieval("--ckpt", *four_language_models[:2], "--pairs", pairs, "--held_out", held_out,
                 "--val_pairs", 40, "--lrs", 1e-3, "--steps", 2, "--group", 8, "--v1_lrs", 1e-3, "--v1_steps", 2,
                 "--candidates", 8, "--out_dir", tmp_path / "out")
    as_pairs = lambda texts: {(tuple(q), tuple(s)) for q, s in zip(*texts)}  # noqa: E731
    fit, val = as_pairs(seen["fit"]), as_pairs(seen["val"])
    assert len(fit) + len(val) == 120 and not fit & val
    assert trained == fit  # InfoNCE fine-tuned on every fitting pair and on nothing else
    assert v1_rows and all(n == len(fit) for n in v1_rows)  # the v1 mixer: the fitting pairs' embeddings


def test_retrieval_compare_end_to_end(four_language_models, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(120, seed=0))
    held_out = write_jsonl(tmp_path / "held.jsonl", synthetic_pairs(64, seed=1))
    run_retrieval("--ckpt", *four_language_models, "--pairs", pairs, "--held_out", held_out, "--val_pairs", 40,
                 "--lrs", 1e-3, 3e-3, "--steps", 5, "--group", 8, "--v1_lrs", 1e-3, "--v1_steps", 5, "--candidates", 8,
                 "--out_dir", tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert re.search(r"^\| BM25 \(no model\) \| [\d.]+ \| [\d.]+ \|$", table, re.M)  # N = 32, 64
    for arch in ("mixer", "transformer"):
        assert re.search(rf"^\| {arch}, raw \| [\d.]+ \([\d.]+-[\d.]+\) \| ", table, re.M)
        assert re.search(rf"^\| {arch} \| 0.00[13] \| [\d.]+ \([\d.]+-[\d.]+\) \| [\d.]+ \([\d.]+-[\d.]+\) \|$",
                         table, re.M)
    assert "Verdict at N = 32:" in table and "Verdict at N = 8:" in table  # InfoNCE; v1 among its 8 candidates



# -------------------------------------------------------------------------------------- represent.py



def test_hamming_by_hand():
    tokens = torch.tensor([[0, 1, 2]])
    logits = torch.zeros(1, 3, 8)
    logits[0, 0, 0] = 9.0  # position 0: the true token ranks first
    logits[0, 1] = torch.tensor([7.0, 1.0, 6.0, 5.0, 4.0, 3.0, 2.0, 8.0])  # position 1: token 1 ranks 7th
    logits[0, 2] = torch.tensor([5.0, 6.0, 4.0, 7.0, 8.0, 1.0, 0.0, 0.5])  # position 2: token 2 ranks 5th
    assert represent.hamming(logits, tokens) == pytest.approx(1 / 3)
    assert represent.hamming(logits, tokens, k=1) == pytest.approx(2 / 3)


def test_decoding_uses_the_pseudo_inverse_of_the_embedding():
    """A non-orthogonal embedding where the two decodings differ: token 0 is e1, tokens 1..7 are 2 e1
    plus a little of their own direction. Exact embeddings decode exactly through pinv(W) (W has full
    row rank), while the nearest embedding by dot product would rank token 0 last for its own vector."""
    embedding = torch.zeros(8, 10)
    embedding[:, 0] = torch.tensor([1.0] + [2.0] * 7)
    embedding[1:, 1:8] = 0.3 * torch.eye(7)
    tokens = torch.arange(8).repeat(3).view(3, 8)
    exact = embedding[tokens]  # [3, 8, 10]
    assert represent.hamming(represent.decode(exact, embedding), tokens, k=1) == 0.0
    assert represent.hamming(exact @ embedding.T, tokens) > 0.1  # the transpose misses token 0 even in the top 5


class Constant(torch.nn.Module):
    """A block whose output ignores its input."""

    def forward(self, x):
        return torch.ones_like(x) + 0.0 * x


@pytest.mark.parametrize("blocks, expect", [("identity", "exact"), ("untrained", "exact"), ("constant", "nothing")])
def test_recovery_of_the_input(blocks, expect):
    model = tiny_model("mixer", perturb=False, vocab_size=256, block_size=16, n_embd=32)
    if blocks == "identity":
        model.blocks = torch.nn.ModuleList([torch.nn.Identity()])
    if blocks == "constant":
        model.blocks = torch.nn.ModuleList([Constant()])
    model.requires_grad_(False)
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    unit = model.wte.weight.std().item()
    a, final, reference = represent.recover(model, tokens, layer=len(model.blocks), steps=300, seed=0, unit=unit)
    metric = represent.hamming(represent.decode(a, model.wte.weight), tokens)
    if expect == "exact":
        assert metric == 0.0 and final < reference, f"{blocks}: Hamming {metric}, L1 {final} vs nudge {reference}"
    else:  # nothing to follow: a stays noise, and 5 of 256 tokens are a chance hit
        assert metric > 0.9


def test_represent_command_line(capsys):
    represent.main(["--init", "mixer", "transformer", "--n_layer", "2", "--n_embd", "32", "--block_size", "8",
                    "--vocab_size", "256", "--n", "2", "--steps", "20", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["model"], r["arch"], r["steps"]) for r in rows] == [("untrained mixer", "mixer", 20),
                                                                 ("untrained transformer", "transformer", 20)]
    # the command reports what the method computes: the same models, inputs and descent, by hand
    for r in rows:
        torch.manual_seed(0)
        model = Model(Config(arch=r["arch"], vocab_size=256, block_size=8, n_layer=2, n_embd=32)).eval()
        model.requires_grad_(False)
        tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
        a, final, _ = represent.recover(model, tokens, 2, 20, 0, unit=model.wte.weight.std().item())
        assert r["hamming"] == represent.hamming(represent.decode(a, model.wte.weight), tokens)
        assert r["l1"] == pytest.approx(final)
    assert rows[0]["hamming"] == 0.0  # an untrained mixer (W = I) gives its input back exactly


# ---------------------------------------------------------------------------------------- mixing.py



def test_mixing_statistics_by_hand():
    T = 8
    identity = torch.eye(T, dtype=torch.double)
    assert mixing.statistics(identity) == {"diagonal_mass": 1.0, "look_back": 0.0, "toeplitz": 1.0, "effective_rank": T}
    uniform = torch.ones(T, T, dtype=torch.double).tril()  # row i averages positions 0..i: look-back i / 2
    stats = mixing.statistics(uniform)
    assert stats["diagonal_mass"] == pytest.approx(T / (T * (T + 1) / 2))
    assert stats["look_back"] == pytest.approx(sum(i / 2 for i in range(T)) / T)
    assert stats["toeplitz"] == 1.0
    kernel = torch.tensor([1.0, -0.5, 0.3, 0.8, -0.2, 0.1, 0.05, 0.4], dtype=torch.double)
    toeplitz = kernel[(torch.arange(T).unsqueeze(1) - torch.arange(T)).clamp(min=0)].tril()  # W[i, j] = kernel[i - j]
    assert mixing.toeplitz_score(toeplitz) == pytest.approx(1.0)
    assert mixing.kernel_profile(toeplitz).tolist() == pytest.approx(kernel.tolist())
    random = torch.randn(T, T, dtype=torch.double, generator=torch.Generator().manual_seed(0))
    assert mixing.toeplitz_score(random) < 0.5
    low_rank = torch.zeros(T, T, dtype=torch.double)
    low_rank[:, 0] = 1.0  # every position copies position 0: rank 1
    assert mixing.effective_rank(low_rank) == 1 and mixing.look_back(low_rank) == pytest.approx(sum(range(T)) / T)


def test_shown_mixing_matrix_is_the_one_the_forward_pass_applies():
    model = tiny_model("mixer", n_layer=1)
    block = model.blocks[0]
    x = torch.randn(2, 16, 32)
    (_, _, shown), = mixing.mixing_matrices(model)
    with torch.no_grad():
        applied = block.mix(x) - block.mix.bias[0]  # the flat mixer: y = tril(W) x + b
        assert torch.allclose(applied, shown @ x, atol=1e-5)
        block.mix.weight[0, 2, 9] += 5.0  # above the diagonal: masked
    assert torch.equal(mixing.mixing_matrices(model)[0][2], shown)
    with torch.no_grad():
        block.mix.weight[0, 9, 2] += 5.0  # below: applied, and shown
    assert mixing.mixing_matrices(model)[0][2][9, 2] == shown[9, 2] + 5.0


def test_a_toeplitz_mixers_matrix_is_its_kernel_at_every_offset():
    model = tiny_model("toeplitz", n_layer=1)
    (_, _, shown), = mixing.mixing_matrices(model)
    kernel = model.blocks[0].mix.kernel[0].detach()
    assert mixing.toeplitz_score(shown.double()) == pytest.approx(1.0)  # by construction
    assert mixing.kernel_profile(shown).tolist() == pytest.approx(kernel.tolist())
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        assert torch.allclose(model.blocks[0].mix(x) - model.blocks[0].mix.bias[0], shown @ x, atol=1e-5)


@pytest.mark.parametrize("arch", ["transformer", "hybrid"])
def test_averaged_attention_rows_sum_to_one_and_are_causal(arch):
    model = tiny_model(arch)
    maps = mixing.averaged_attention(model, torch.randint(0, 256, (3, 16)))
    assert [(layer, head) for layer, head, _ in maps] == [(l, h) for l in (1, 2) for h in range(4)]
    for _, _, probs in maps:
        assert torch.allclose(probs.sum(-1), torch.ones(16), atol=1e-5)
        assert torch.count_nonzero(probs.triu(1)) == 0
        assert not torch.allclose(probs, probs.tril().bool().float() / probs.tril().bool().sum(-1, keepdim=True))


def test_mixing_command_line(prepared, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    mixing.main(["--init", "mixer", "hybrid", "--n_layer", "2", "--n_embd", "32", "--block_size", "16",
                 "--data_dir", str(prepared), "--n", "4", "--json", "--out", str(tmp_path / "m.png")])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["model"], r["kind"], r["layer"]) for r in rows if r["head"] == 0] == [
        ("untrained mixer", "mixing", 1), ("untrained mixer", "mixing", 2), ("untrained hybrid", "mixing", 1),
        ("untrained hybrid", "mixing", 2), ("untrained hybrid", "attention", 1), ("untrained hybrid", "attention", 2)]
    for r in rows:
        if r["kind"] == "mixing":  # the identity init
            assert (r["diagonal_mass"], r["look_back"], r["effective_rank"]) == (1.0, 0.0, 16)
    for name in ("m.png", "m_profile.png", "m_attention.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------- recall.py



def test_mqar_pairs_queries_and_targets():
    inputs, targets = recall.mqar(200, 32, 4, 64, power_a=0.01, seed=0)
    assert inputs.shape == targets.shape == (200, 32) and 0 <= inputs.min() and inputs.max() < 64
    for x, y in zip(inputs.tolist(), targets.tolist()):
        keys, values = x[0:8:2], x[1:8:2]
        assert len(set(keys)) == 4 and len(set(values)) == 4
        assert max(keys) < 32 <= min(values)  # disjoint halves of the vocabulary
        asked = [t for t, target in enumerate(y) if target != -1]
        assert len(asked) == 4 and all(t >= 8 for t in asked)  # every key asked once, after the pairs
        for t in asked:  # the query key's value: the next input token and the only scored target
            assert y[t] == values[keys.index(x[t])] == x[t + 1]
    again, _ = recall.mqar(200, 32, 4, 64, power_a=0.01, seed=0)
    other, _ = recall.mqar(200, 32, 4, 64, power_a=0.01, seed=1)
    assert torch.equal(again, inputs) and not torch.equal(other, inputs)


def test_recall_chooses_each_lr_on_validation_and_reports_test(tmp_path):
    run = dict(arch="mixer", seq_len=64, pairs=4, width=64, curve=[(0, 0.0), (10, 0.5)], seconds=1.0, params=1000)
    runs = [{**run, "lr": 1e-3, "val": 0.9, "test": 0.5}, {**run, "lr": 3e-3, "val": 0.6, "test": 0.95}]
    best = recall.best_of_lrs(runs)
    assert best[("mixer", 64, 4, 64)]["lr"] == 1e-3  # the validation winner, not the test winner
    args = argparse.Namespace(steps=10, lrs=[1e-3, 3e-3], vocab_size=128, n_layer=2, batch_size=64, n_train=100,
                              n_test=50, power_a=0.01, device="cpu", out_dir=str(tmp_path))
    recall.write_table(best, args, "python -m experiments.recall")
    assert "| mixer | 64 | 4 | 64 | 0.001 (edge) | **0.500** | 0.900 |" in (tmp_path / "results.md").read_text()


def test_recall_accuracy_by_hand():
    targets = torch.tensor([[-1, 5, -1, 7], [-1, -1, 6, -1]])
    logits = torch.zeros(2, 4, 8)
    logits[0, 1, 5] = logits[0, 3, 2] = logits[1, 2, 6] = 1.0  # right, wrong, right
    logits[0, 0, 3] = logits[1, 0, 4] = 9.0  # unscored positions: whatever they predict does not count
    assert recall.recall_accuracy(logits, targets) == pytest.approx(2 / 3)


def test_a_transformer_learns_a_tiny_recall_task(tmp_path, capsys):
    argv = ["--archs", "transformer", "--settings", "16:2", "--widths", "64", "--lrs", "3e-3", "--steps", "300",
            "--vocab_size", "64", "--n_train", "4000", "--n_test", "300", "--eval_interval", "100",
            "--out_dir", str(tmp_path)]
    recall.main(argv)
    (result,) = common.ResultStore(tmp_path).done  # results.jsonl
    assert result["test"] > 0.9 and [step for step, _ in result["curve"]] == [0, 100, 200, 300]
    assert result["curve"][0][1] < 0.2  # it learned it: chance is 1/32
    # the table's row names the arch, setting, width and lr, and shows the test accuracy (bf16 rounds
    # differently on AMX and AVX512-BF16 CPUs: the property, not one machine's digits)
    (row,) = re.findall(r"^\| transformer \| 16 \| 2 \| 64 \| 0.003 \| \*\*([\d.]+)\*\* \|", (tmp_path / "results.md").read_text(), re.M)
    assert float(row) == pytest.approx(result["test"], abs=5e-4) and float(row) > 0.9
    capsys.readouterr()
    recall.main(argv)  # again: the finished run is read back, not retrained
    assert "lr 0.003: done already: val" in capsys.readouterr().out


# ------------------------------------------------------------------ every experiment: bad inputs

EXPERIMENTS = {name: run_main(module) for name, module in
               {"represent": represent, "compare": compare, "bench": bench, "mixing": mixing, "recall": recall,
                "retrieval": retrieval, "length": length, "curves": curves}.items()}
CURVES_WS = [*TINY_CURVES, "--data_dir", "{ws}/data", "--out_dir", "{ws}/curves"]
# (experiment, command line, words the error must contain). {ws} is the workspace folder.
BAD_EXPERIMENT_INPUTS = [
    ("retrieval", ["--ckpt", CKPT, "--pairs", "{ws}/pairs.jsonl", "--held_out", "{ws}/pairs.jsonl",
                  "--val_pairs", "30", "--out_dir", "{ws}/rc"], "too few to hold out --val_pairs 30"),
    ("retrieval", ["--ckpt", CKPT, "{ws}/r16.pt", "--pairs", "{ws}/pairs.jsonl", "--held_out",
                  "{ws}/pairs.jsonl", "--out_dir", "{ws}/rc"], "not a checkpoint of the expected kind"),
    ("represent", [], "nothing to measure"),
    ("represent", ["--ckpt", "{ws}/missing.pt"], "checkpoint not found"),
    ("represent", ["--ckpt", "{ws}/broken/ckpt.pt"], "not a readable checkpoint"),
    ("represent", ["--ckpt", CKPT, "--layer", "5"], "--layer 5 is out of range"),
    ("represent", ["--ckpt", CKPT, "--length", "1000"], "exceeds"),
    ("represent", ["--init", "transformer", "--n_embd", "30", "--n_head", "4"], "not divisible by n_head=4"),
    ("represent", ["--ckpt", CKPT, "--data_dir", "{ws}/nothing"], "run python data_prep.py"),
    ("bench", ["--n_layer", "0"], "n_layer must be at least 1"),
    ("bench", ["--memory", "--n_embd", "30", "--n_head", "4"], "not divisible"),
    ("bench", ["--memory", "--sweep_block_size", "512,x"], "comma-separated integers"),
    ("bench", ["--device", "cuda"], "no CUDA GPU"),
    ("compare", ["--resume"], "set by compare.py"),
    ("compare", ["--minutes", "0"], "not a number > 0"),
    ("compare", ["--lr", "-1"], "not a number > 0"),
    ("compare", ["--out_dir", "{ws}/afile"], "is a file, not a folder"),
    ("compare", ["--data_dir", "{ws}/nothing", "--out_dir", "{ws}/cmp"], "run python data_prep.py"),
    ("compare", ["--sweep", "bogus=1,2", "--out_dir", "{ws}/cmp"], "bogus: not a train.py flag"),
    ("compare", ["--sweep", "resume=1,2", "--out_dir", "{ws}/cmp"], "resume: not a train.py flag that takes a value"),
    ("compare", ["--sweep", "lr=1e-3,,1e-2", "--out_dir", "{ws}/cmp"], "an empty value"),
    ("compare", ["--sweep", "lr", "--out_dir", "{ws}/cmp"], "write FLAG=V1,V2"),
    ("compare", ["--sweep", "lr=abc", "--out_dir", "{ws}/cmp"], "lr=abc: 'abc' is not a number"),
    ("compare", ["--sweep", "n_layer=2,x", "--out_dir", "{ws}/cmp"], "n_layer=x"),
    ("compare", ["--sweep", "layout=rows", "--out_dir", "{ws}/cmp"], "choose from packed, stories"),
    ("compare", ["--sweep", "seed=1,2", "--out_dir", "{ws}/cmp"], "sets --seed itself"),
    ("compare", ["--sweep", "lr=1e-3,3e-3", "--lr", "1e-3", "--out_dir", "{ws}/cmp"], "given twice"),
    ("compare", ["--sweep", "lr=1e-3,1e-3", "--out_dir", "{ws}/cmp"], "listed twice"),
    ("compare", ["--summary", "{ws}/data", "--out_dir", "{ws}/cmp"], "summary.json not found"),
    ("recall", ["--settings", "16:5", "--out_dir", "{ws}/rc"], "5 pairs do not fit a sequence of 16"),
    ("recall", ["--settings", "64:4", "--vocab_size", "6", "--out_dir", "{ws}/rc"], "too small for 4 pairs"),
    ("recall", ["--settings", "64", "--out_dir", "{ws}/rc"], "not SEQ_LEN:PAIRS"),
    ("recall", ["--widths", "33", "--out_dir", "{ws}/rc"], "width 33: n_embd=33 is not divisible by n_head=2"),
    ("recall", ["--widths", "30", "--out_dir", "{ws}/rc"], "it must be even"),
    ("recall", ["--steps", "0", "--out_dir", "{ws}/rc"], "not a positive integer"),
    ("mixing", [], "nothing to show"),
    ("mixing", ["--ckpt", "{ws}/missing.pt"], "checkpoint not found"),
    ("mixing", ["--ckpt", CKPT, "--show", "attention"], "no attention to show"),
    ("mixing", ["--init", "transformer", "--show", "mixing"], "no mixing to show"),
    ("mixing", ["--init", "hybrid"], "give --data_dir"),
    ("mixing", ["--init", "transformer", "--vocab_size", "300", "--data_dir", "{ws}/data", "--n", "2", "--length", "8"],
     "knows 300"),
    # every check before the work: pair counts against the candidates, vocabularies, folders, flags
    ("retrieval", ["--ckpt", CKPT, "--pairs", "{ws}/pairs.jsonl", "--held_out", "{ws}/few_pairs.jsonl", "--val_pairs",
                   "10", "--group", "8", "--candidates", "8", "--out_dir", "{ws}/rc"],
     "5 held-out pairs: need at least --candidates 8"),
    ("retrieval", ["--ckpt", CKPT, "--pairs", "{ws}/pairs.jsonl", "--held_out", "{ws}/pairs.jsonl", "--val_pairs",
                   "6", "--group", "8", "--candidates", "8", "--out_dir", "{ws}/rc"],
     "6 validation pairs: need at least --candidates 8"),
    ("retrieval", ["--ckpt", CKPT, "--pairs", "{ws}/pairs.jsonl", "--held_out", "{ws}/pairs.jsonl", "--val_pairs",
                   "10", "--out_dir", "{ws}/rc"], "30 fitting pairs: need at least --group 32"),
    ("retrieval", ["--ckpt", CKPT, "--pairs", "{ws}/pairs.jsonl", "--held_out", "{ws}/pairs.jsonl", "--val_pairs",
                   "10", "--group", "8", "--candidates", "8", "--out_dir", "{ws}/afile"], "is a file, not a folder"),
    ("length", ["--ckpt", CKPT, "--data_dir", "{ws}/data1024", "--out_dir", "{ws}/ln"], "4096-token vocabulary"),
    ("length", ["--ckpt", CKPT, "--out_dir", "{ws}/afile"], "is a file, not a folder"),
    ("recall", ["--out_dir", "{ws}/afile"], "is a file, not a folder"),
    ("compare", ["--archs", "mixer", "toeplitz", "--n_head", "2", "--out_dir", "{ws}/cmp"],
     "--n_head has no effect on any of mixer, toeplitz"),
    ("compare", ["--archs", "transformer", "--sweep", "mixing_bias=head,none", "--out_dir", "{ws}/cmp"],
     "--mixing_bias has no effect on any of transformer"),
    ("compare", ["--summary", "{ws}/cut_summary", "--out_dir", "{ws}/cmp"], "cut off or not JSON"),
    ("curves", [*CURVES_WS, "--budgets", "0.0032,0.0016"], "budgets must be positive and increasing"),
    ("curves", [*CURVES_WS, "--cooldown", "1.5"], "longer than the budget it cannot be"),
    ("curves", [*CURVES_WS, "--cooldown", "0.3"], "--cooldown has no effect with --schedule cosine"),
    ("curves", [*CURVES_WS, "--cosine_check", "0.0032"], "--cosine_check has no effect with --schedule cosine"),
    ("curves", [*CURVES_WS, "--schedule", "wsd"], "holds curves of other settings (schedule: cosine there, wsd here)"),
    ("curves", [*CURVES_WS, "--block_size", "8"], "holds curves of other settings (block_size: 16 there, 8 here)"),
    ("curves", [*CURVES_WS, "--out_dir", "{ws}/afile"], "is a file, not a folder"),
    ("curves", [*CURVES_WS, "--archs", "mixer", "--lr", "mixer=1e-2", "--n_head", "2"],
     "--n_head has no effect on any of mixer"),
    ("curves", [*CURVES_WS, "--lr", "mixer=1e-2"], "no lr for transformer"),
    ("curves", ["--predict", "{ws}/curves", "--tokens_per_s", "mixer=1000", "transformer=0"], "must be positive"),
    ("curves", ["--predict", "{ws}/curves", "--tokens_per_s", "mixer=1000"], "none for transformer"),
    ("curves", ["--predict", "{ws}/data"], "not a curves folder"),
]


@pytest.mark.parametrize("entry, argv, words", BAD_EXPERIMENT_INPUTS,
                         ids=[f"{e}:{' '.join(a)[:60]}" for e, a, _ in BAD_EXPERIMENT_INPUTS])
def test_bad_input_gets_one_clear_line_and_changes_nothing(entry, argv, words, workspace, capsys):
    assert_one_clear_line(EXPERIMENTS[entry], argv, words, workspace, capsys)


# ---------------------------------------------------------------------------------------- compare.py

def test_compare_trains_each_arch_then_writes_the_table_and_curves(prepared, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as without the optional extra
    tiny = ["--data_dir", prepared, "--compile", "false", "--n_layer", 1, "--n_embd", 32, "--block_size", 32, "--batch_size", 4,
            "--eval_interval", 5, "--eval_iters", 2, "--warmup_iters", 2, "--out_dir", tmp_path]
    # one run already partly done (as if interrupted): compare must continue it, not start over. Its
    # 0.1 s budget ends after the step that passes it, and a process's first step can take a second:
    # compare's budget (1.8 s) leaves room for that
    run_train(*tiny[:-2], "--arch", "transformer", "--seed", 1338, "--out_dir", tmp_path / "transformer-seed1338",
              "--max_iters", 10**9, "--max_minutes", 0.002)
    half_done = cli.load_checkpoint(tmp_path / "transformer-seed1338" / "ckpt.pt")["step"]
    capsys.readouterr()
    compare.main([str(a) for a in [*tiny, "--archs", "mixer", "transformer", "--seeds", 2, "--minutes", 0.03]])
    out = capsys.readouterr().out
    assert re.findall(r"^\[\d/4\] (\w+) seed (\d+): (\w+)", out, re.M) == [
        ("mixer", "1337", "training"), ("transformer", "1337", "training"),
        ("mixer", "1338", "training"), ("transformer", "1338", "continuing")]
    assert "pip install matplotlib" in out and not (tmp_path / "curves.png").exists()
    table = (tmp_path / "results.md").read_text()
    rows = re.findall(r"^\| (mixer|transformer) \| [\d.]+M \| [\d,]+ \([\d,]+-[\d,]+\) \|.* \| ([\d.]+) \(([\d.]+)-([\d.]+)\) \|$",
                      table, re.M)
    assert [r[0] for r in rows] == ["mixer", "transformer"]
    for arch, mean, low, high in rows:
        finals = [float(read_log(tmp_path / f"{arch}-seed{s}")[-1]["val_loss"]) for s in (1337, 1338)]
        assert float(mean) == pytest.approx(np.mean(finals), abs=1e-3)
        assert (low, high) == (f"{min(finals):.3f}", f"{max(finals):.3f}")
    assert re.search(r"(by [\d.]+: every seed of|within the spread between seeds: no ranking)", table)
    for arch, seed in [("mixer", 1337), ("transformer", 1337), ("mixer", 1338), ("transformer", 1338)]:
        state = cli.load_checkpoint(tmp_path / f"{arch}-seed{seed}" / "ckpt.pt")
        assert state["elapsed"] >= 0.03 * 60 and state["train_args"]["seed"] == seed
    assert cli.load_checkpoint(tmp_path / "transformer-seed1338" / "ckpt.pt")["step"] > half_done
    with open(tmp_path / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    assert {(r["arch"], r["seed"]) for r in curves} == {(a, str(s)) for a in ("mixer", "transformer") for s in (1337, 1338)}
    # the same command again: nothing is retrained
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/ckpt.pt")}
    compare.main([str(a) for a in [*tiny, "--archs", "mixer", "transformer", "--seeds", 2, "--minutes", 0.03]])
    assert "done already" in capsys.readouterr().out
    assert mtimes == {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/ckpt.pt")}


def fake_training(final_val, trained, tokens=None):
    """A stand-in for compare.train_run that writes what compare.py reads: log.csv and a checkpoint whose
    final val loss is final_val[(arch, lr, seed)], after tokens[arch] tokens (default 1000)."""
    def fake(argv):
        given, model = train.parse_flags(argv)
        args = argparse.Namespace(**{**train.TRAIN_DEFAULTS, **dataclasses.asdict(Config()), **given, **model})
        trained.append((args.arch, args.lr, args.seed))
        out = Path(args.out_dir)
        out.mkdir(parents=True)
        val, seen = final_val[args.arch, args.lr, args.seed], (tokens or {}).get(args.arch, 1000)
        (out / "log.csv").write_text("step,tokens,train_loss,val_loss,elapsed_s\n0,0,9.0,9.0,0.0\n"
                                     f"10,{seen},{val - 0.1},{val},{args.max_minutes * 60}\n")
        torch.save({"model": {"w": torch.zeros(3)}, "config": {"n_embd": 8, "n_layer": 1, "block_size": args.block_size,
                    "vocab_size": 64}, "data_meta": {}, "train_args": {"layout": "packed", "max_iters": args.max_iters},
                    "elapsed": args.max_minutes * 60, "step": 10}, out / "ckpt.pt")
        return {"interrupted": False}
    return fake


def test_sweep_selects_on_the_selection_seed_and_judges_on_fresh_seeds(tmp_path, monkeypatch, capsys):
    # seed 1337 (selection) favours lr 1e-3 for the mixer; its confirmation seeds would have favoured 1e-2
    final_val = {("mixer", 1e-3, 1337): 3.0, ("mixer", 1e-2, 1337): 3.5, ("mixer", 1e-3, 1338): 3.3,
                 ("mixer", 1e-3, 1339): 3.4, ("mixer", 1e-2, 1338): 2.0, ("mixer", 1e-2, 1339): 2.0,
                 ("transformer", 1e-3, 1337): 3.2, ("transformer", 1e-2, 1337): 3.1,
                 ("transformer", 1e-2, 1338): 2.9, ("transformer", 1e-2, 1339): 3.0,
                 ("transformer", 1e-3, 1338): 1.0, ("transformer", 1e-3, 1339): 1.0}
    trained = []
    monkeypatch.setattr(compare, "train_run", fake_training(final_val, trained))
    argv = ["--sweep", "lr=1e-3,1e-2", "--archs", "mixer", "transformer", "--seeds", "2", "--minutes", "1",
            "--out_dir", str(tmp_path)]
    compare.main(argv)
    assert trained == [("mixer", 1e-3, 1337), ("transformer", 1e-3, 1337), ("mixer", 1e-2, 1337),
                       ("transformer", 1e-2, 1337), ("mixer", 1e-3, 1338), ("transformer", 1e-2, 1338),
                       ("mixer", 1e-3, 1339), ("transformer", 1e-2, 1339)]
    table = (tmp_path / "results.md").read_text()
    assert "| mixer | lr=1e-3 (best) | 0.00M | 10 | 17 | 3.000 |" in table
    assert "| transformer | lr=1e-2 (best) |" in table and "| transformer | lr=1e-3 | 0.00M | 10 | 17 | 3.200 |" in table
    assert "- mixer: lr=1e-3 (lr at the grid's lower edge: the optimum may lie outside the grid)" in table
    # the verdict: confirmation seeds only (mixer 3.3 and 3.4 against transformer 2.9 and 3.0)
    assert re.search(r"^\| mixer \| .* \| 3\.350 \(3\.300-3\.400\) \|$", table, re.M)
    assert "transformer < mixer by 0.400: every seed of transformer ends below every seed of mixer." in table
    capsys.readouterr()
    trained.clear()
    compare.main(argv)  # unchanged: nothing is trained again
    assert trained == [] and capsys.readouterr().out.count("done already") == 8


def test_each_arch_of_a_comparison_gets_only_the_model_flags_that_apply_to_it():
    argv = ["--n_head", "4", "--lr", "1e-3", "--attn_impl=eager", "--mixer_heads", "2", "--n_layer", "2"]
    assert compare.flags_for("mixer", argv) == ["--lr", "1e-3", "--mixer_heads", "2", "--n_layer", "2"]
    assert compare.flags_for("transformer", argv) == ["--n_head", "4", "--lr", "1e-3", "--attn_impl=eager",
                                                      "--n_layer", "2"]
    assert compare.flags_for("hybrid", argv) == argv


def test_the_ranking_rule_speaks_only_where_the_seeds_allow():
    assert common.ranking({"mixer": [2.0, 2.1], "transformer": [2.3, 2.2]}) == [
        "mixer < transformer by 0.200: every seed of mixer ends below every seed of transformer."]
    assert common.ranking({"mixer": [2.0, 2.3], "transformer": [2.2, 2.25]}) == [
        "mixer vs transformer: 0.075 apart, within the spread between seeds: no ranking."]
    assert "no ranking is claimed" in common.ranking({"mixer": [2.0], "transformer": [2.5]})[0]
    assert common.ranking({"mixer": [2.0], "transformer": [2.5, 2.6]}) == [
        "One seed of mixer: no spread was measured, so no ranking is claimed."]
    assert common.ranking({"mixer": [2.0, 2.1]}) == ["One arch only: nothing to rank."]


def test_the_equal_tokens_view_and_the_summary_across_sweeps(tmp_path, monkeypatch, capsys):
    """Fake runs at two context lengths: the mixer sees 1000 tokens in its time, the transformer 500.
    At equal time the mixer ends lower; at equal tokens (500) the transformer does."""
    final_val = {(arch, lr, seed): value for arch, base in (("mixer", 3.0), ("transformer", 3.5))
                 for lr, extra in ((1e-3, 0.0), (1e-2, 0.5)) for seed, value in ((1337, base + extra), (1338, base + extra),
                                                                                  (1339, base + extra + 0.2))}
    monkeypatch.setattr(compare, "train_run", fake_training(final_val, [], tokens={"transformer": 500}))
    for T in (8, 16):
        compare.main(["--sweep", "lr=1e-3,1e-2", "--archs", "mixer", "transformer", "--seeds", "2", "--minutes", "1",
                      "--block_size", str(T), "--out_dir", str(tmp_path / f"T{T}")])
    table = (tmp_path / "T8" / "results.md").read_text()
    assert "mixer < transformer by 0.500: every seed of mixer ends below every seed of transformer." in table
    # at 500 tokens the mixer's curve is halfway from 9.0 to its final loss: 6.0 and 6.1
    assert "| mixer | 6.050 (6.000-6.100) |" in table and "| transformer | 3.600 (3.500-3.700) |" in table
    assert "transformer < mixer by 2.450: every seed of transformer ends below every seed of mixer." in table
    capsys.readouterr()
    compare.main(["--summary", str(tmp_path / "T16"), str(tmp_path / "T8"), "--out_dir", str(tmp_path)])
    summary = (tmp_path / "summary.md").read_text()
    assert re.findall(r"^\| (\d+) \| 3\.100 \(3\.000-3\.200\), lr=1e-3 \(edge\), 0\.00M \| 3\.600", summary, re.M) == ["8", "16"]
    assert summary.count("| mixer < transformer by 0.500") == 2 and summary.count("transformer < mixer by 2.450") == 2
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
    # a sweep from before the per-token view (or one without token counts) is summarised at equal time only
    older = json.loads((tmp_path / "T8" / "summary.json").read_text())
    for result in older["archs"].values():
        del result["val_at_equal_tokens"], result["tokens"]
    (tmp_path / "T8" / "summary.json").write_text(json.dumps(older))
    compare.main(["--summary", str(tmp_path / "T16"), str(tmp_path / "T8"), "--out_dir", str(tmp_path)])
    summary = (tmp_path / "summary.md").read_text()
    assert "| 8 | 3.100 (3.000-3.200), lr=1e-3 (edge) | 3.600" in summary and "| 8 | - | - | not measured |" in summary
    assert summary.count("transformer < mixer by 2.450") == 1


def test_a_tiny_sweep_trains_writes_the_grid_and_resumes(prepared, tmp_path, capsys):
    argv = [str(a) for a in ["--data_dir", prepared, "--compile", "false", "--n_layer", 1, "--n_embd", 32,
                             "--block_size", 32, "--batch_size", 4, "--eval_interval", 5, "--eval_iters", 2,
                             "--warmup_iters", 2, "--sweep", "lr=1e-3,1e-2", "--archs", "mixer", "transformer", "--minutes", 0.01,
                             "--out_dir", tmp_path]]
    compare.main(argv)
    selection = {(arch, lr): float(read_log(tmp_path / f"{arch}-lr{lr}-seed1337")[-1]["val_loss"])
                 for arch in ("mixer", "transformer") for lr in ("1e-3", "1e-2")}
    table = (tmp_path / "results.md").read_text()
    for arch in ("mixer", "transformer"):
        best = min(("1e-3", "1e-2"), key=lambda lr: selection[arch, lr])
        assert f"| {arch} | lr={best} (best) |" in table
        assert (tmp_path / f"{arch}-lr{best}-seed1338" / "ckpt.pt").exists()
        for lr in ("1e-3", "1e-2"):
            assert f"{selection[arch, lr]:.3f} |" in table
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/ckpt.pt")}
    assert len(mtimes) == 6
    capsys.readouterr()
    compare.main(argv)
    assert capsys.readouterr().out.count("done already") == 6
    assert mtimes == {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/ckpt.pt")}


def test_compare_draws_the_curves_with_matplotlib(prepared, tmp_path):
    pytest.importorskip("matplotlib")
    compare.main([str(a) for a in ["--data_dir", prepared, "--compile", "false", "--n_layer", 1, "--n_embd", 32,
                                   "--block_size", 32, "--eval_interval", 5, "--eval_iters", 1, "--archs", "mixer", "--minutes", 0.005,
                                   "--out_dir", tmp_path]])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



@pytest.mark.parametrize("script", ["recall", "bench"])
def test_float16_trains_with_the_loss_scaler_in_every_experiment(script, scaler_updates, tmp_path):
    if script == "recall":
        recall.main(["--archs", "mixer", "--settings", "16:2", "--widths", "32", "--lrs", "1e-3", "--steps", "3",
                     "--vocab_size", "64", "--n_train", "100", "--n_test", "20", "--dtype", "float16",
                     "--out_dir", str(tmp_path)])
    else:
        bench.main(["--arch", "mixer", "--modes", "float16", "--repeats", "1", "--steps", "1", "--warmup", "1",
                    "--n_embd", "32", "--n_layer", "1", "--block_size", "16", "--batch_size", "2"])
    assert len(scaler_updates) >= 3 and all(scaler_updates)


# ---------------------------------------------------------------------------------------- length.py

def test_loss_against_position_past_the_trained_context(prepared, tmp_path, capsys):
    """Windows of 3 x T: the Toeplitz mixer and the transformer have a whole curve past T, the full mixer
    stops at T; cropped positions are each a forward of the last T tokens; before T the two ways agree."""
    paths = []
    for arch, extra in (("toeplitz", ["--arch", "mixer", "--mixing", "toeplitz"]), ("mixer", ["--arch", "mixer"]),
                        ("transformer", ["--arch", "transformer"])):
        out = tmp_path / f"{arch}-seed1"
        run_train("--data_dir", prepared, "--out_dir", out, *TINY_RUN, "--max_iters", 2, *extra)
        paths.append(out / "ckpt.pt")
    out = tmp_path / "length"
    length.main(["--ckpt", *map(str, paths), "--factor", "3", "--windows", "4", "--bin", "4", "--out_dir", str(out)])
    rows = list(csv.DictReader(open(out / "losses.csv")))
    T = int(rows[0]["block_size"])
    curves = {label: [(float(r["whole_loss"]), float(r["crop_loss"])) for r in rows if r["label"] == label]
              for label in ("toeplitz", "mixer", "transformer")}
    for label, curve in curves.items():
        assert len(curve) == 3 * T and all(w == c for w, c in curve[: T - 1])
        assert all(np.isfinite(c) for _, c in curve)
        past = [w for w, _ in curve[T:]]
        assert all(np.isnan(past)) if label == "mixer" else all(np.isfinite(past))
    # by hand, for every model on the same 4 windows (seed 0): the crop of a position is the T tokens
    # that end there, and the whole loss is one forward of the window
    windows = length.draw_windows(train.load_data(prepared)[0]["val"].tokens, 3 * T, 4, 0)
    for path, label in zip(paths, ("toeplitz", "mixer", "transformer")):
        model = cli.load_model(path)[0]
        with torch.no_grad():
            for p in (T + T // 2, 3 * T - 1):
                crop = [F.cross_entropy(model(w[None, p - T + 1 : p + 1])[0][0, -1], w[p + 1]) for w in windows]
                assert curves[label][p][1] == pytest.approx(torch.stack(crop).mean().item(), abs=1e-4)
            if label != "mixer":
                whole = [F.cross_entropy(model(w[None, :-1])[0][0, 2 * T], w[2 * T + 1]) for w in windows]
                assert curves[label][2 * T][0] == pytest.approx(torch.stack(whole).mean().item(), abs=1e-4)
    table = (out / "table.md").read_text()
    assert re.search(r"^\| mixer \| \d+ \| whole \| [\d.]+ \| - \| - \|$", table, re.M)
    assert re.search(r"^\| toeplitz \| \d+ \| crop \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", table, re.M)


# ---------------------------------------------------------------------------------------- curves.py

def curve_rows(folder):
    """{(arch, lr, seed, kind, step or budget): (train, val)} of a curves folder: what its runs measured."""
    return {(r["arch"], r["lr"], r["seed"], r["kind"], r.get("budget", r["step"])): (r["train"], r["val"])
            for r in common.ResultStore(folder).done}


KILL_WHILE_WRITING = """import os, signal, sys
from experiments import common, curves
real, calls = common.ResultStore.append, []
def append(self, row):
    calls.append(row)
    if len(calls) == 5:  # half of the fifth row, then SIGKILL: a kill while it writes
        with open(self.path, "a") as f:
            f.write('{"arch": "mix')
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, row)
common.ResultStore.append = append
curves.main(sys.argv[1:])
"""


def test_curves_killed_while_writing_resume_to_the_results_of_a_run_never_interrupted(prepared, tmp_path, capsys):
    """SIGKILL in the middle of a results line: the rerun says so in one line, keeps the cut-off line,
    trains what was lost again, and ends with every number of an uninterrupted run."""
    argv = [*TINY_CURVES, "--data_dir", str(prepared)]
    curves.main([*argv, "--out_dir", str(tmp_path / "straight")])
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_WRITING, *argv, "--out_dir", str(tmp_path / "cut")],
                            cwd=HERE, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "cut" / "results.jsonl").read_text().endswith('{"arch": "mix')
    capsys.readouterr()
    curves.main([*argv, "--out_dir", str(tmp_path / "cut")])
    out = capsys.readouterr().out
    assert out.count("1 line(s) cut off by an interrupted write") == 1
    assert curve_rows(tmp_path / "cut") == curve_rows(tmp_path / "straight")
    lines = (tmp_path / "cut" / "results.jsonl").read_text().splitlines()
    assert '{"arch": "mix' in lines  # nothing deleted: the cut-off line stays, on its own line
    assert (tmp_path / "cut" / "table.md").read_text() == (tmp_path / "straight" / "table.md").read_text().replace(
        str(tmp_path / "straight"), str(tmp_path / "cut"))


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_a_finished_curves_run_is_not_trained_again_when_its_checkpoint_is_gone(schedule, workspace, tmp_path,
                                                                               monkeypatch):
    """A new session holds the committed results.jsonl but not the runs' checkpoints: its finished runs
    stay done."""
    folder = tmp_path / "curves"
    argv = [*TINY_CURVES, "--schedule", schedule, "--data_dir", str(workspace / "data"), "--out_dir", str(folder)]
    if schedule == "cosine":  # the workspace's folder
        shutil.copytree(workspace / "curves", folder)
    else:
        curves.main(argv)
    for ckpt in folder.rglob("*.pt"):
        ckpt.unlink()
    before = (folder / "results.jsonl").read_text()
    monkeypatch.setattr(curves, "Trainer", lambda *a: pytest.fail("a finished run was trained again"))
    curves.main(argv)
    assert (folder / "results.jsonl").read_text() == before


class Killed(Exception):
    """Stands in for a kill in the middle of training."""


def test_a_cosine_run_killed_in_the_middle_continues_from_its_checkpoint(prepared, tmp_path, capsys, monkeypatch):
    """Killed at step 33 of its 50-step run (checkpoints every 10 steps), the rerun trains on from
    step 30 and ends with every number of a run never interrupted; no checkpoint is left behind."""
    argv = [*TINY_CURVES, "--log_interval", "10", "--data_dir", str(prepared)]
    curves.main([*argv, "--out_dir", str(tmp_path / "straight")])
    real_step = curves.Trainer.train_step

    def dies_at_33(self, lr):
        if self.job.budget == 3200 and self.step == 33:
            raise Killed
        return real_step(self, lr)
    monkeypatch.setattr(curves.Trainer, "train_step", dies_at_33)
    with pytest.raises(Killed):
        curves.main([*argv, "--out_dir", str(tmp_path / "cut")])
    trained = []

    def counted(self, lr):
        trained.append(self.step)
        return real_step(self, lr)
    monkeypatch.setattr(curves.Trainer, "train_step", counted)
    capsys.readouterr()
    curves.main([*argv, "--out_dir", str(tmp_path / "cut")])
    assert "continuing from step 30" in capsys.readouterr().out
    assert trained[:20] == list(range(30, 50))  # the rest of the killed run, not all of it again
    assert curve_rows(tmp_path / "cut") == curve_rows(tmp_path / "straight")
    assert not list((tmp_path / "cut").rglob("*.pt"))


def test_a_cooldown_branch_leaves_the_stable_run_as_it_was(prepared, tmp_path):
    """Budgets 0.0016 and 0.0032 against 0.0032 alone: the stable run and the last budget's branch give the
    same numbers whether or not a branch was taken off the stable run before (each branch restores it)."""
    at = TINY_CURVES.index("--budgets")
    base = TINY_CURVES[:at] + TINY_CURVES[at + 2:]
    both = tmp_path / "both"
    base += ["--schedule", "wsd"]
    curves.main([*base, "--budgets", "0.0016,0.0032", "--data_dir", str(prepared), "--out_dir", str(both)])
    one = tmp_path / "one"
    curves.main([*base, "--budgets", "0.0032", "--data_dir", str(prepared), "--out_dir", str(one)])
    with_branch, without = curve_rows(both), curve_rows(one)
    shared = [k for k in without if k[3] == "stable" or k[4] == 3200]
    assert len(shared) >= 8 and all(with_branch[k] == without[k] for k in shared)
    assert len([k for k in with_branch if k[3] == "budget"]) == 8  # 2 archs x 2 seeds x 2 budgets


def test_the_wsd_schedule_warms_up_holds_and_cools_down_to_zero():
    assert [curves.stable_lr(1.0, step, 4) for step in (0, 3, 4, 100)] == [0.25, 1.0, 1.0, 1.0]
    start, steps = curves.budget_steps(1000, 0.2, 10)  # 100 steps in all, the last 20 cool down
    assert (start, steps) == (80, 20)
    lrs = [curves.cooldown_lr(0.5, i, steps) for i in range(steps)]
    assert lrs[0] == 0.5 and lrs[-1] == pytest.approx(0.025) and lrs == sorted(lrs, reverse=True)


def test_curves_select_an_lr_on_one_seed_and_confirm_it_on_fresh_ones(prepared, tmp_path, capsys):
    curves.main(["--archs", "mixer", "--lr", "mixer=1e-2,1e-5", "--block_size", "16", "--batch_size", "4",
                 "--n_embd", "16", "--n_layer", "1", "--budgets", "0.0016,0.0032", "--warmup_iters", "5",
                 "--eval_iters", "2", "--compile", "false", "--data_dir", str(prepared), "--out_dir", str(tmp_path)])
    runs = {(r["lr"], r["seed"]) for r in common.ResultStore(tmp_path).done}
    assert runs == {(1e-2, 1337), (1e-5, 1337), (1e-2, 1338), (1e-2, 1339)}  # 1e-5 barely moves in 50 steps
    assert "mixer: lr 0.01 is best of 0.01, 1e-05 on seed 1337" in capsys.readouterr().out
    table = (tmp_path / "table.md").read_text()
    assert "| mixer | 0.01 (chosen) |" in table and "| mixer | 1e-05 |" in table
    assert re.search(r"^\| 0\.0032 \| 0\.0\d \| [\d.]+ \([\d.]+-[\d.]+\) \|$", table, re.M)  # 2 seeds


def test_crossovers_and_predictions_by_hand():
    rows = [{"arch": a, "lr": 1.0, "seed": s, "kind": "budget", "budget": b, "val": v, "train": v}
            for a, vals in (("mixer", {100: (3.0, 3.1), 200: (2.8, 2.9), 400: (2.7, 2.75)}),
                            ("transformer", {100: (3.3, 3.4), 200: (2.85, 2.95), 400: (2.5, 2.55)}))
            for b, pair in vals.items() for s, v in zip((1, 2), pair)]
    line = curves.crossover(rows, [100, 200, 400], "mixer", "transformer")
    assert line == ("mixer vs transformer: **transformer ahead from 0.0004M on** up to 0.0004M (by budget: "
                    "0.0001M: mixer, 0.0002M: overlap, 0.0004M: transformer)")
    one_seed = [r for r in rows if r["arch"] == "transformer" or r["seed"] == 1]  # no spread: no ranking
    assert curves.crossover(one_seed, [100, 200, 400], "mixer", "transformer") == \
        "mixer vs transformer: not ranked yet (no budget with two seeds of each)"
    assert curves.predicted_loss(rows, "mixer", [100, 200, 400], 200) == [2.8, 2.9]
    halfway = curves.predicted_loss(rows, "mixer", [100, 200, 400], 100 * 2 ** 0.5)  # linear in log tokens
    assert halfway == pytest.approx([2.9, 3.0])
    assert curves.predicted_loss(rows, "mixer", [100, 200, 400], 800) is None  # past the curves
    going = [r for r in rows if not (r["arch"] == "mixer" and r["seed"] == 2 and r["budget"] == 400)]
    assert curves.predicted_loss(going, "mixer", [100, 200, 400], 300) == [pytest.approx(2.7 + 0.1 * (1 - np.log2(1.5)))]


def test_predict_ranks_the_archs_at_each_budget_of_minutes_and_summary_draws_them(workspace, tmp_path, capsys):
    folder = workspace / "curves"
    # the budgets are 1,600 and 3,200 tokens: at 1 minute both archs lie between them, at 0.5 before, at 2 past
    curves.main(["--predict", str(folder), "--tokens_per_s", "mixer=40", "transformer=30", "--minutes", "0.5,1,2"])
    out = capsys.readouterr().out
    assert "tokens/s (as given): mixer 40, transformer 30" in out
    rows = re.findall(r"^\| ([\d.]+) \| (.*) \| (.*) \| (.*) \|$", out, re.M)
    assert [r[0] for r in rows] == ["0.5", "1", "2"]
    assert rows[0][1] == "not measured (0.00M tokens)" and "no verdict: the curves cover" in rows[0][3]
    assert re.fullmatch(r"[\d.]+ \([\d.]+-[\d.]+\) at 0\.00M", rows[1][1]) and "no verdict" not in rows[1][3]
    assert re.search(r"(mixer|transformer) (<|vs) (mixer|transformer)", rows[1][3])
    assert "no verdict" in rows[2][3]
    curves.main(["--summary", str(folder), "--out_dir", str(tmp_path)])
    assert (tmp_path / "curves.md").is_file() and (tmp_path / "curves.png").stat().st_size > 10_000
    assert "### Crossovers" in (tmp_path / "curves.md").read_text()


def test_curves_not_yet_confirmed_say_so_in_the_table_and_the_prediction(workspace, tmp_path, capsys):
    """A folder whose confirmation runs have not reached a budget (only the selection seed has)."""
    folder = tmp_path / "started"
    folder.mkdir()
    shutil.copy(workspace / "curves" / "settings.json", folder)
    rows = [json.loads(line) for line in (workspace / "curves" / "results.jsonl").read_text().splitlines()]
    (folder / "results.jsonl").write_text("".join(json.dumps({**r, "seed": 1337}) + "\n" for r in rows if r["seed"] == 1338))
    curves.main(["--predict", str(folder), "--tokens_per_s", "mixer=40", "transformer=30"])
    assert "no confirmation run has reached a budget yet" in capsys.readouterr().out
    curves.write_table(folder, None)
    assert "No confirmation run has reached a budget yet." in (folder / "table.md").read_text()


# ---------------------------------------------------------------------------------------- nothing lost

def test_a_cut_off_results_line_is_reported_redone_and_kept(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text('{"k": 1, "v": 10}\n{"k": 2, "v"')
    store = common.ResultStore(tmp_path)
    assert "1 line(s) cut off by an interrupted write" in capsys.readouterr().out
    assert store.get({"k": 1}, lambda: {"v": 0}) == ({"k": 1, "v": 10}, True)
    assert store.get({"k": 2}, lambda: {"v": 20}) == ({"k": 2, "v": 20}, False)  # done again
    assert (tmp_path / "results.jsonl").read_text() == '{"k": 1, "v": 10}\n{"k": 2, "v"\n{"k": 2, "v": 20}\n'
    assert [r["v"] for r in common.ResultStore(tmp_path).done] == [10, 20]


def test_a_run_too_short_to_time_has_no_tokens_per_second():
    assert compare.speed_cells([{"tokens": "100", "elapsed_s": "0.0"}]) == "-"
    assert compare.speed_cells([{"tokens": "100", "elapsed_s": "2.0"}, {"tokens": "300", "elapsed_s": "2.0"}]) == \
        "100 (50-150)"


def test_a_comparison_with_the_toeplitz_mixer_gives_each_variant_its_own_flags(tmp_path, monkeypatch):
    """The README's sweep: toeplitz is the mixer with --mixing toeplitz; --n_head goes to attention only,
    --mixing_bias to the mixers only."""
    commands = {}

    def fake(argv):
        out = Path(argv[argv.index("--out_dir") + 1])
        commands[out.name] = argv
        out.mkdir(parents=True)
        (out / "log.csv").write_text(f"step,tokens,train_loss,val_loss,elapsed_s\n10,1000,3.0,{3 + len(out.name) / 100},60\n")
        torch.save({"model": {"w": torch.zeros(3)}, "config": {"n_embd": 8, "n_layer": 1, "block_size": 64,
                    "vocab_size": 64}, "data_meta": {}, "train_args": {"layout": "packed", "max_iters": 10**9},
                    "elapsed": 60, "step": 10}, out / "ckpt.pt")
        return {"interrupted": False}

    monkeypatch.setattr(compare, "train_run", fake)
    compare.main(["--sweep", "lr=1e-3,3e-3", "--archs", "mixer", "toeplitz", "transformer", "--seeds", "1",
                  "--minutes", "1", "--n_head", "4", "--mixing_bias", "head", "--out_dir", str(tmp_path)])
    flags = {name: " ".join(argv) for name, argv in commands.items()}
    toeplitz = [f for name, f in flags.items() if name.startswith("toeplitz-")]
    transformer = [f for name, f in flags.items() if name.startswith("transformer-")]
    assert len(toeplitz) == 3 and all("--arch mixer --mixing toeplitz" in f and "--mixing_bias head" in f
                                      and "--n_head" not in f for f in toeplitz)
    assert len(transformer) == 3 and all("--n_head 4" in f and "--mixing_bias" not in f for f in transformer)
    assert "| toeplitz |" in (tmp_path / "results.md").read_text()


def test_bench_stream_times_the_cache_against_crop_and_recompute(monkeypatch, capsys):
    calls, real = [], mixer.Model.generate

    def spy(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        calls.append(use_cache)
        return real(self, idx, max_new_tokens, temperature, top_k, use_cache)

    monkeypatch.setattr(mixer.Model, "generate", spy)
    config = Config(arch="mixer", mixing="toeplitz", vocab_size=64, block_size=8, n_layer=1, n_embd=16)
    cached, recomputed = bench.bench_stream(config, argparse.Namespace(repeats=2), torch.device("cpu"))
    assert calls == [True, False, True, False] and len(cached) == len(recomputed) == 2
