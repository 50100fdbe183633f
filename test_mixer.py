"""Test suite: python -m pytest -q  (CPU, no network; real text from ../shared/data when present)."""
import argparse
import os
from pathlib import Path

import pytest
import torch

from mixer import ARCHS, Config, MaskedMixing, Model

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "shared"
SAMPLE_TEXT = SHARED / "data" / "tinystories" / "TinyStories-sample-a.txt"
if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
needs_sample = pytest.mark.skipif(not SAMPLE_TEXT.exists(), reason=f"real text not found at {SAMPLE_TEXT}")

# Every token-mixing variant: the flat mixer, the multi-head mixer, the transformer, the hybrid.
VARIANTS = {
    "mixer": dict(arch="mixer"),
    "mixer-2head": dict(arch="mixer", mixer_heads=2),
    "transformer": dict(arch="transformer"),
    "hybrid": dict(arch="hybrid", mixer_heads=2),
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


@pytest.fixture(scope="module")
def gpt2():
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.get_encoding("gpt2")


# ---------------------------------------------------------------------------------------- mixer.py

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("t", [0, 5, 15])
def test_causal_both_directions(variant, t):
    model = tiny_model(variant)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % 256
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    assert torch.allclose(before[:, :t], after[:, :t], atol=1e-6), "a later token changed an earlier output"
    per_position_change = (before[:, t:] - after[:, t:]).abs().amax(dim=(0, 2))
    assert (per_position_change > 1e-4).all(), f"token {t} did not reach positions {per_position_change}"


@pytest.mark.parametrize("variant", ["mixer", "mixer-2head", "hybrid"])
def test_masked_weights_get_exactly_zero_gradient(variant):
    model = tiny_model(variant).train()
    idx = torch.randint(0, 256, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    mixings = [m for m in model.modules() if isinstance(m, MaskedMixing)]
    assert mixings
    for m in mixings:
        above = torch.triu(torch.ones(16, 16, dtype=torch.bool), diagonal=1)
        assert torch.count_nonzero(m.weight.grad[:, above]) == 0
        assert torch.count_nonzero(m.weight.grad[:, ~above]) > 0.9 * (~above).sum() * m.weight.size(0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_short_input_equals_prefix_of_long_input(variant):
    model = tiny_model(variant)
    idx = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        full, _ = model(idx)
        short, _ = model(idx[:, :7])
    assert short.shape == (3, 7, 256)
    assert torch.allclose(short, full[:, :7], atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_logits_equal_full_forward(variant):
    model = tiny_model(variant)
    idx = torch.randint(0, 256, (2, 16))
    cache = {}
    with torch.no_grad():
        full, _ = model(idx)
        steps = [model(idx[:, :5], cache=cache)[0]]  # prefill 5, then one token at a time
        steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 16)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generation_matches_recomputation_past_block_size(variant):
    model = tiny_model(variant)
    prompt = torch.randint(0, 256, (2, 3))
    cached = model.generate(prompt, max_new_tokens=30, temperature=0)  # 33 > block_size 16: crops
    recomputed = model.generate(prompt, max_new_tokens=30, temperature=0, use_cache=False)
    assert cached.shape == (2, 33)
    assert torch.equal(cached, recomputed)


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny_model("mixer")
    prompt = torch.zeros(1, 1, dtype=torch.long)
    torch.manual_seed(3)
    a = model.generate(prompt, 10, temperature=1.0, top_k=1)
    greedy = model.generate(prompt, 10, temperature=0)
    assert torch.equal(a, greedy)  # top_k=1 leaves only the argmax
    torch.manual_seed(4)
    b = model.generate(prompt, 10, temperature=2.0)
    torch.manual_seed(4)
    assert torch.equal(b, model.generate(prompt, 10, temperature=2.0))


def test_too_long_input_names_both_lengths():
    model = tiny_model("mixer")
    with pytest.raises(ValueError, match=r"17.*block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown arch 'rnn'.*mixer, transformer, hybrid"):
        Config(arch="rnn")


@pytest.mark.parametrize("variant", VARIANTS)
def test_embed_ignores_right_padding(variant):
    model = tiny_model(variant)
    a, b = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 5))
    padded = torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], dim=1)])
    with torch.no_grad():
        batched = model.embed(padded, lengths=torch.tensor([9, 5]))
        one_by_one = torch.cat([model.embed(a), model.embed(b)])
    assert batched.shape == (2, 32)
    assert torch.allclose(batched, one_by_one, atol=1e-5)


def test_flops_count_the_mixing_matmuls():
    shared = dict(vocab_size=256, block_size=64, n_layer=2, n_embd=32)
    flops = {arch: Model(Config(arch=arch, mixer_heads=1, **shared)).flops_per_token() for arch in ARCHS}
    per_seq_matmul = 3 * 2 * 2 * 64 * 32  # fwd+bwd x 2 FLOPs x n_layer x T x d
    dense_attn = 3 * 2 * 2 * 4 * 32 * 32  # qkv + out projections
    assert flops["transformer"] - flops["mixer"] == dense_attn + per_seq_matmul
    assert flops["hybrid"] - flops["transformer"] == per_seq_matmul


@needs_sample
@pytest.mark.parametrize("variant", VARIANTS)
def test_overfits_one_batch_of_real_text(variant, gpt2):
    text = SAMPLE_TEXT.read_text(encoding="utf-8")[:20000]
    tokens = torch.tensor(gpt2.encode(text, allowed_special={"<|endoftext|>"})[: 4 * 33]).view(4, 33)
    model = tiny_model(variant, perturb=False, vocab_size=50304, block_size=32, n_embd=64).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5, f"{variant} did not memorise 128 tokens: loss {loss.item():.3f} (starts near 10.8)"


# ------------------------------------------------------------------------------------- data_prep.py

import gzip  # noqa: E402  (kept beside the tests that use them)
import json  # noqa: E402
import lzma  # noqa: E402
import re  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, HTTPServer  # noqa: E402

import numpy as np  # noqa: E402

import data_prep  # noqa: E402

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


def decoded_stories(out_dir, split, enc):
    ids = np.fromfile(out_dir / f"{split}.bin", dtype=np.uint16).tolist()
    assert ids and ids[-1] == enc.eot_token
    return enc.decode(ids).split("<|endoftext|>")[:-1]


@pytest.fixture(scope="module")
def sample_stories():
    if not SAMPLE_TEXT.exists():
        pytest.skip(f"real text not found at {SAMPLE_TEXT}")
    return [s.strip() for s in SAMPLE_TEXT.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]


def test_round_trip_and_split_sizes_on_real_text(tmp_path, sample_stories, gpt2):
    prep("--input", SAMPLE_TEXT, "--out_dir", tmp_path, "--val_fraction", 0.1)
    train, val = decoded_stories(tmp_path, "train", gpt2), decoded_stories(tmp_path, "val", gpt2)
    assert sorted(train + val) == sorted(sample_stories)
    assert not set(train) & set(val)
    assert 0.07 < len(val) / len(sample_stories) < 0.13
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["stories"] == {"train": len(train), "val": len(val)}
    assert meta["tokens"]["train"] == (tmp_path / "train.bin").stat().st_size // 2
    assert meta["sources"][0]["sha256"].startswith("466e0c32b972a2a3")


def test_rerun_is_a_no_op_unless_forced(tmp_path, capsys):
    (tmp_path / "in.txt").write_text(official_txt(STORIES * 20))
    args = ("--input", tmp_path / "in.txt", "--out_dir", tmp_path / "out", "--val_fraction", 0.3)
    prep(*args)
    mtime = (tmp_path / "out" / "train.bin").stat().st_mtime_ns
    capsys.readouterr()
    prep(*args)
    assert "already holds" in capsys.readouterr().out
    assert (tmp_path / "out" / "train.bin").stat().st_mtime_ns == mtime
    prep(*args, "--vocab_size", 1024)  # other settings: redone
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["vocab_size"] == 1024
    prep(*args, "--vocab_size", 1024, "--force")
    assert "already holds" not in capsys.readouterr().out


@pytest.mark.parametrize("vocab_size", [4096, 8192])
def test_truncated_vocab_is_a_valid_encoding(vocab_size, sample_stories, gpt2):
    enc = data_prep.load_encoding({"encoding": "gpt2", "vocab_size": vocab_size})
    assert enc.n_vocab == vocab_size and enc.eot_token == vocab_size - 1
    for story in sample_stories[:300]:
        ids = enc.encode_ordinary(story)
        assert max(ids) < vocab_size - 1
        assert enc.decode(ids) == story
        assert len(ids) >= len(gpt2.encode_ordinary(story))  # fewer merges, never shorter


def test_each_input_format_gives_the_same_stories(tmp_path, gpt2):
    records = [{"story": s, "summary": m} for s, m in zip(STORIES, SUMMARIES)]
    files = {
        "official.txt": official_txt(STORIES).encode(),
        "instruct.txt": instruct_txt(STORIES, SUMMARIES).encode(),
        "stories.jsonl": "".join(json.dumps(r) + "\n" for r in records).encode(),
        "text.jsonl": "".join(json.dumps({"text": s}) + "\n" for s in STORIES).encode(),
        "stories.json": json.dumps(records).encode(),
        "official.txt.gz": gzip.compress(official_txt(STORIES).encode()),
        "stories.jsonl.xz": lzma.compress("".join(json.dumps(r) + "\n" for r in records).encode()),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        out = tmp_path / f"out_{name}"
        prep("--input", tmp_path / name, "--val_input", tmp_path / "official.txt", "--out_dir", out)
        assert decoded_stories(out, "train", gpt2) == STORIES, name
        has_summaries = name.startswith(("instruct", "stories"))
        assert (out / "pairs_train.jsonl").exists() == has_summaries, name
        if has_summaries:
            pairs = [json.loads(line) for line in (out / "pairs_train.jsonl").read_text().splitlines()]
            assert pairs == [{"summary": m, "story": s} for s, m in zip(STORIES, SUMMARIES)], name


def test_pairs_split_keeps_each_story_on_one_side(tmp_path):
    stories = [f"Story number {i} is about a frog." for i in range(300)]
    summaries = [f"Frog {i}." for i in range(300)]
    # each story appears twice, with two summaries
    (tmp_path / "in.txt").write_text(instruct_txt(stories * 2, summaries + [s + " Again." for s in summaries]))
    prep("--input", tmp_path / "in.txt", "--out_dir", tmp_path, "--val_fraction", 0.2)
    read = lambda split: [json.loads(x) for x in (tmp_path / f"pairs_{split}.jsonl").read_text().splitlines()]  # noqa: E731
    train, val = read("train"), read("val")
    assert len(train) + len(val) == 600 and len(val) > 50
    assert not {p["story"] for p in train} & {p["story"] for p in val}


def test_bad_inputs_give_one_clear_line(tmp_path, capsys, monkeypatch):
    out = ("--out_dir", tmp_path / "out")
    assert "not found: " in cli_error(capsys, prep, "--input", tmp_path / "missing.txt", *out)
    (tmp_path / "empty.txt").write_text("")
    assert "empty" in cli_error(capsys, prep, "--input", tmp_path / "empty.txt", *out)
    (tmp_path / "none.txt").write_text("<|endoftext|>\n\n<|endoftext|>\n")
    assert "no stories found" in cli_error(capsys, prep, "--input", tmp_path / "none.txt", *out)
    good = b"A fine story.\n<|endoftext|>\nBad "
    (tmp_path / "bad.txt").write_bytes(good + b"\xff byte\n")
    assert f"byte offset {len(good)}" in cli_error(capsys, prep, "--input", tmp_path / "bad.txt", *out)
    (tmp_path / "bad.jsonl").write_text('{"title": "no story"}\n')
    assert "line 1 has no \"story\"" in cli_error(capsys, prep, "--input", tmp_path / "bad.jsonl", *out)
    (tmp_path / "ok.txt").write_text(official_txt(STORIES))
    assert "uint16" in cli_error(capsys, prep, "--input", tmp_path / "ok.txt", "--vocab_size", 70000, *out)
    # a failure after tokenizing has started leaves nothing that looks like output
    assert "none.txt: no stories" in cli_error(capsys, prep, "--input", tmp_path / "ok.txt", tmp_path / "none.txt", *out)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
    monkeypatch.setattr(data_prep, "HF_URL", "http://127.0.0.1:9/")  # nothing listens: as if offline
    assert "--input" in cli_error(capsys, prep, "--download_dir", tmp_path / "dl", *out)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_download_resumes_a_partial_file(tmp_path):
    payload = bytes(range(256)) * 40
    ranges = []

    class RangeServer(BaseHTTPRequestHandler):
        def do_GET(self):
            ranges.append(self.headers.get("Range"))
            start = int(re.match(r"bytes=(\d+)-", self.headers.get("Range") or "bytes=0-").group(1))
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(payload) - start))
            self.end_headers()
            self.wfile.write(payload[start:])

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), RangeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "f.txt.part").write_bytes(payload[:1000])
        path = data_prep.download(f"http://127.0.0.1:{server.server_port}/f.txt", tmp_path / "f.txt")
    finally:
        server.shutdown()
    assert ranges == ["bytes=1000-"]
    assert path.read_bytes() == payload and not (tmp_path / "f.txt.part").exists()


# ------------------------------------------------------------------------------ train.py, sample.py

import csv  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import sample  # noqa: E402
import train  # noqa: E402

TINY_RUN = ["--n_layer", 2, "--n_embd", 64, "--n_head", 4, "--block_size", 64, "--batch_size", 16,
            "--warmup_iters", 20, "--lr", 3e-3, "--eval_iters", 5, "--log_interval", 10]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The shared slice tokenized with a 4096-token vocabulary (small embeddings: fast CPU tests)."""
    if not SAMPLE_TEXT.exists():
        pytest.skip(f"real text not found at {SAMPLE_TEXT}")
    out = tmp_path_factory.mktemp("data")
    prep("--input", SAMPLE_TEXT, "--out_dir", out, "--vocab_size", 4096, "--val_fraction", 0.1)
    return out


def run_train(*argv):
    train.main([str(a) for a in argv])


def read_log(out_dir):
    with open(out_dir / "log.csv") as f:
        return list(csv.DictReader(f))


def unigram_val_loss(data_dir):
    train_ids = np.fromfile(data_dir / "train.bin", dtype=np.uint16)
    val_ids = np.fromfile(data_dir / "val.bin", dtype=np.uint16)
    counts = np.bincount(train_ids, minlength=4096) + 1.0
    return float(-np.log(counts[val_ids] / counts.sum()).mean())


@pytest.mark.parametrize("arch", ARCHS)
def test_short_run_beats_unigram_on_real_text(arch, prepared, tmp_path):
    run_train("--arch", arch, "--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN,
              "--max_iters", 150, "--eval_interval", 50)
    log = read_log(tmp_path)
    unigram = unigram_val_loss(prepared)  # about 5.9 nats
    assert [int(r["step"]) for r in log] == [0, 50, 100, 150]
    assert float(log[0]["val_loss"]) > unigram + 1.5  # starts near ln(4096) = 8.3
    assert float(log[-1]["val_loss"]) < unigram - 1.0, f"{arch}: {log[-1]['val_loss']} vs unigram {unigram:.2f}"
    model, meta = train.load_model(tmp_path / "ckpt.pt")
    assert model.config.arch == arch and meta["vocab_size"] == 4096


def test_resume_after_ctrl_c_reproduces_the_uninterrupted_run(prepared, tmp_path):
    args = ["--data_dir", prepared, *TINY_RUN, "--max_iters", 80, "--eval_interval", 10, "--dropout", 0.1]
    args = [str(a) for a in args]
    run_train(*args, "--out_dir", tmp_path / "straight")
    # the same run in a subprocess, Ctrl-C'd once it has logged step 20, then resumed
    interrupted = subprocess.Popen([sys.executable, "train.py", *args, "--out_dir", str(tmp_path / "cut")],
                                   cwd=HERE, stdout=subprocess.PIPE, text=True)
    for line in interrupted.stdout:
        if line.startswith("step 20:"):
            interrupted.send_signal(signal.SIGINT)
            break
    rest = interrupted.communicate(timeout=120)[0]
    assert interrupted.returncode == 0 and "interrupted at step" in rest
    stopped_at = int(re.search(r"interrupted at step (\d+)", rest).group(1))
    assert stopped_at < 80
    run_train(*args, "--out_dir", tmp_path / "cut", "--resume")
    losses = lambda log: [(r["step"], r["train_loss"], r["val_loss"]) for r in log]  # noqa: E731
    assert losses(read_log(tmp_path / "cut")) == losses(read_log(tmp_path / "straight"))


def test_story_layout_rows_start_at_stories_and_pad_after_their_end(tmp_path):
    # some shorter, some longer than T; each opens with its own word
    stories = [f"{animal} " + " ".join(["word"] * n) + "." for animal, n in zip(ANIMALS, (3, 40, 7, 12, 90, 5))]
    prep("--input", write_text(tmp_path / "in.txt", official_txt(stories)), "--val_input", tmp_path / "in.txt",
         "--out_dir", tmp_path / "data", "--vocab_size", 512)
    splits, meta = train.load_data(tmp_path / "data", layout="stories")
    eot, T, tokens = meta["eot_token"], 16, np.asarray(splits["train"].tokens)
    story_starts = [0] + [i + 1 for i in np.flatnonzero(tokens == eot)[:-1]]
    assert splits["train"].starts.tolist() == story_starts

    def expected_row(start):  # the story's tokens, its <|endoftext|> as the last target, then padding
        end = int(np.argmax(tokens[start:] == eot))  # where the story's <|endoftext|> falls in the row
        x = tokens[start : start + min(end + 1, T)].tolist() + [eot] * (T - end - 1)
        y = tokens[start + 1 : start + 1 + min(end, T)].tolist() + [-1] * (T - end)
        return x, y

    x, y = train.get_batch(splits["train"], T, 64, np.random.default_rng(0), torch.device("cpu"))
    rows = list(zip(x.tolist(), y.tolist()))
    assert all(row in [expected_row(s) for s in story_starts] for row in rows)
    assert len(set(map(str, rows))) == len(stories)  # 64 draws cover every story
    assert (y == -1).any() and not (y == -1).all(dim=1).any()


def write_text(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_starts_at_the_peak_when_warmup_ends_and_ends_at_the_minimum(schedule):
    args = argparse.Namespace(lr=1e-3, min_lr_ratio=0.1, warmup_iters=100, lr_schedule=schedule)
    # warmup took 30% of a time budget: the decay must start at the peak there, not jump down
    assert train.lr_at(0.3, 99, None, args) == pytest.approx(1e-3)
    assert train.lr_at(0.3, 100, 0.3, args) == pytest.approx(1e-3)
    assert train.lr_at(0.31, 110, 0.3, args) > 0.98e-3  # the bug this guards against gave 0.69e-3
    assert train.lr_at(1.0, 5000, 0.3, args) == pytest.approx(1e-4)
    lrs = [train.lr_at(p, 100 + i, 0.3, args) for i, p in enumerate(np.linspace(0.3, 1.2, 50))]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(1e-4)


def test_keep_every_snapshots_and_the_layout_stays_on_resume(prepared, tmp_path, capsys):
    run_train("--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN, "--layout", "stories", "--max_iters", 20,
              "--eval_interval", 10, "--keep_every", 10, "--warmup_iters", 10, "--lr_schedule", "linear")
    assert sorted(p.name for p in tmp_path.glob("ckpt_step*.pt")) == ["ckpt_step0.pt", "ckpt_step10.pt", "ckpt_step20.pt"]
    snapshot = train.load_checkpoint(tmp_path / "ckpt_step10.pt")
    assert snapshot["step"] == 10 and snapshot["train_args"]["layout"] == "stories"
    lr = {int(r["step"]): float(r["lr"]) for r in read_log(tmp_path)}
    assert lr[10] == pytest.approx(3e-3) and lr[20] == pytest.approx(3e-4)  # peak when warmup ends, min at the end
    assert "--layout stories" in cli_error(capsys, run_train, "--data_dir", prepared, "--out_dir", tmp_path, "--resume",
                                              "--layout", "packed", "--max_iters", 30)


def test_max_minutes_stops_on_time(prepared, tmp_path):
    run_train("--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN, "--max_iters", 10**6,
              "--max_minutes", 0.05, "--eval_interval", 20)
    last = read_log(tmp_path)[-1]
    assert int(last["step"]) < 10**6
    assert 3.0 <= float(last["elapsed_s"]) < 6.0  # 0.05 minutes of training, stopped within a step or so


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(prepared, tmp_path, capsys):
    err = cli_error(capsys, run_train, "--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN, "--lr", 1e6,
                      "--warmup_iters", 1, "--grad_clip", 0, "--max_iters", 100, "--eval_interval", 50,
                      "--log_interval", 1)
    assert re.search(r"(loss|val loss) is (nan|inf)", err) and "keeps the last good state" in err
    model, _ = train.load_model(tmp_path / "ckpt.pt")  # step 0's, still finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_training_bad_inputs(prepared, tmp_path, capsys):
    assert "run python data_prep.py" in cli_error(capsys, run_train, "--data_dir", tmp_path / "nothing")
    out = ["--out_dir", tmp_path / "run"]
    run_train("--data_dir", prepared, *out, *TINY_RUN, "--max_iters", 2, "--eval_interval", 2)
    assert "pass --resume" in cli_error(capsys, run_train, "--data_dir", prepared, *out)
    assert "block_size=64 but --block_size 32" in cli_error(capsys, run_train, "--data_dir", prepared, *out, "--resume",
                                                               "--block_size", 32)
    assert "arch=mixer but --arch hybrid" in cli_error(capsys, run_train, "--data_dir", prepared, *out, "--resume",
                                                          "--arch", "hybrid")
    other = tmp_path / "other_vocab"
    prep("--input", SAMPLE_TEXT, "--out_dir", other, "--vocab_size", 1024, "--max_stories", 300)
    assert "4096-token vocabulary" in cli_error(capsys, run_train, "--data_dir", other, *out, "--resume")
    (prepared / "val.bin").rename(tmp_path / "val.bin")
    try:
        assert "re-run data_prep.py" in cli_error(capsys, run_train, "--data_dir", prepared, "--out_dir", tmp_path / "x")
    finally:
        (tmp_path / "val.bin").rename(prepared / "val.bin")


def test_ddp_under_torchrun_on_cpu(prepared, tmp_path, capsys):
    """Two gloo processes: gradients all-reduced, rank 0 logs and saves; a resume needs both again."""
    args = [str(a) for a in ["--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN, "--max_iters", 40,
                             "--eval_interval", 20]]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train.py", *args], cwd=HERE, capture_output=True, text=True, timeout=300,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    log = read_log(tmp_path)
    assert [int(r["step"]) for r in log] == [0, 20, 40]
    assert int(log[-1]["tokens"]) == 40 * 2 * 16 * 64  # both ranks' batches count
    assert float(log[-1]["val_loss"]) < float(log[0]["val_loss"]) - 1.0
    assert "written by 2 processes" in cli_error(capsys, run_train, *args, "--resume")


def test_sample_generates_from_a_checkpoint(prepared, tmp_path, capsys):
    run_train("--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN, "--max_iters", 100, "--eval_interval", 100)
    capsys.readouterr()
    sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--prompt", "Once upon a time", "--max_new_tokens", "20",
                 "--num_samples", "2", "--temperature", "0"])
    stories = capsys.readouterr().out.split("-" * 40 + "\n")[:2]
    assert len(stories) == 2 and stories[0] == stories[1]  # greedy
    assert stories[0].startswith("Once upon a time") and len(stories[0]) > len("Once upon a time") + 20


# ---------------------------------------------------------------------------------------- bench.py

import bench  # noqa: E402


def test_bench_smoke(capsys):
    bench.main(["--arch", "all", "--steps", "1", "--warmup", "1", "--n_embd", "32", "--n_layer", "1",
                "--block_size", "16", "--batch_size", "2", "--vocab_size", "256", "--gen_lengths", "16",
                "--sweep_block_size", "8,16"])
    out = capsys.readouterr().out
    train_rows = re.findall(r"^\| (mixer|transformer|hybrid) \| \d+ \| 1 \| (\d+) \| [\d.]+M \([\d.]+M\) \| [\d,]+ \|",
                            out, re.M)
    assert len(train_rows) == 3 + 3 + 6  # equal size, equal params, sweep of two lengths
    gen_rows = re.findall(r"^\| (\w+) \| 16 \| [\d,]+ \| [\d,]+ \| [\d.]+x \| (True|False) \|$", out, re.M)
    assert [same for _, same in gen_rows] == ["True"] * 3


# -------------------------------------------------------------------------------------- retrieve.py

import retrieve  # noqa: E402


def run_retrieve(*argv):
    retrieve.main([str(a) for a in argv])


def test_rank_metrics_by_hand():
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0], [5.0, 5.0, 0.0]])
    m = retrieve.rank_metrics(scores, torch.tensor([0, 0, 1]))  # ranks 0, 2, and a tie counted as 1
    assert m["top1"] == pytest.approx(1 / 3) and m["top5"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)


def test_eval_on_known_embeddings(tmp_path, capsys):
    stories = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    summaries = torch.cat([stories[:32], -stories[32:]])  # half exact (rank 0), half opposite (rank last)
    np.savez(tmp_path / "emb.npz", summary=summaries.numpy(), story=stories.numpy(), fingerprint="x")
    run_retrieve("eval", "--emb", tmp_path / "emb.npz")
    rows = dict(re.findall(r"^\| (\d+) \| (.*) \|$", capsys.readouterr().out, re.M))
    assert rows == {"32": f"50.0% | 50.0% | {0.5 + 0.5 / 32:.3f}", "64": f"50.0% | 50.0% | {0.5 + 0.5 / 64:.3f}"}


def test_candidate_sets_hold_the_true_story_once():
    cands, true_col = retrieve.candidate_sets(300, 32, seed=0)
    assert torch.equal(cands[torch.arange(300), true_col], torch.arange(300))
    assert all(len(set(row)) == 32 for row in cands.tolist())
    assert torch.equal(cands, retrieve.candidate_sets(300, 32, seed=0)[0])  # fixed seed


def test_retrieval_mixer_learns_a_synthetic_task():
    g = torch.Generator().manual_seed(0)
    stories = torch.randn(1200, 32, generator=g)
    summaries = stories @ torch.linalg.qr(torch.randn(32, 32, generator=g))[0] + 0.3 * torch.randn(1200, 32, generator=g)
    args = argparse.Namespace(candidates=8, width=64, n_layer=2, lr=1e-3, steps=600, batch_size=64, seed=0,
                              log_interval=1000)
    model = retrieve.train_retrieval_mixer(summaries[:1000], stories[:1000], args).eval()
    cands, true_col = retrieve.candidate_sets(200, 8, seed=1)
    top1 = retrieve.rank_metrics(retrieve.mixer_scores(model, summaries[1000:], stories[1000:], cands), true_col)["top1"]
    assert top1 > 0.8, f"held-out top-1 {top1:.2f}, chance 0.125"


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


@pytest.fixture(scope="module")
def tiny_ckpt(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    run_train("--data_dir", prepared, "--out_dir", out, *TINY_RUN, "--max_iters", 30, "--eval_interval", 30)
    return out / "ckpt.pt"


def test_infonce_fine_tuning_learns_a_synthetic_task(tiny_ckpt, tmp_path, capsys):
    train_pairs = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(400, seed=0))
    val_pairs = write_jsonl(tmp_path / "val.jsonl", synthetic_pairs(64, seed=1))

    def top1(ckpt):
        run_retrieve("embed", "--ckpt", ckpt, "--pairs", val_pairs, "--out", tmp_path / "emb.npz")
        summaries, stories = retrieve.load_embeddings(tmp_path / "emb.npz")
        cands, true_col = retrieve.candidate_sets(64, 16, seed=0)
        return retrieve.rank_metrics(retrieve.cosine_scores(summaries, stories, cands), true_col)["top1"]

    before = top1(tiny_ckpt)
    run_retrieve("train", "--method", "infonce", "--ckpt", tiny_ckpt, "--pairs", train_pairs, "--out",
                 tmp_path / "tuned.pt", "--steps", 60, "--group", 16, "--lr", 1e-3)
    after = top1(tmp_path / "tuned.pt")
    assert after > 0.5 and after > before + 0.2, f"top-1 among 16 (chance 0.06): {before:.2f} -> {after:.2f}"


def test_embed_index_search_end_to_end(tiny_ckpt, sample_stories, tmp_path, capsys):
    pairs = [{"summary": s.split(".")[0] + ".", "story": s} for s in sample_stories[:40]]
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    run_retrieve("embed", "--ckpt", tiny_ckpt, "--pairs", pairs_file, "--out", tmp_path / "emb.npz", "--batch_size", 8)
    summaries, stories = retrieve.load_embeddings(tmp_path / "emb.npz")
    assert summaries.shape == stories.shape == (40, 64)
    run_retrieve("eval", "--emb", tmp_path / "emb.npz")
    assert re.search(r"^\| 32 \| [\d.]+% \| [\d.]+% \| [\d.]+ \|$", capsys.readouterr().out, re.M)
    run_retrieve("index", "--ckpt", tiny_ckpt, "--stories", pairs_file, "--out", tmp_path / "index.npz")
    capsys.readouterr()
    search = ("search", "--ckpt", tiny_ckpt, "--index", tmp_path / "index.npz", "--query", pairs[7]["story"], "-k", 3)
    run_retrieve(*search)
    lines = capsys.readouterr().out.splitlines()
    hits = [re.fullmatch(r" *(\d+)\. ([-\d.]+)  #(\d+)  (.*)", line).groups() for line in lines]
    assert [rank for rank, *_ in hits] == ["1", "2", "3"]
    rank, score, story_id, shown = hits[0]  # the story itself comes first, as one line of its start
    assert float(score) == pytest.approx(1.0, abs=1e-3) and story_id == "7"
    assert shown == " ".join(pairs[7]["story"].split())[:100]
    run_retrieve(*search, "--full")
    assert pairs[7]["story"] in capsys.readouterr().out


def test_retrieval_bad_inputs(tiny_ckpt, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"summary": "x", "text": "y"}])
    assert "line 1 needs string fields" in cli_error(capsys, run_retrieve, "embed", "--ckpt", tiny_ckpt, "--pairs", bad,
                                                          "--out", tmp_path / "e.npz")
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty file" in cli_error(capsys, run_retrieve, "embed", "--ckpt", tiny_ckpt, "--pairs", tmp_path / "empty.jsonl",
                                          "--out", tmp_path / "e.npz")
    assert "checkpoint not found" in cli_error(capsys, run_retrieve, "embed", "--ckpt", tmp_path / "no.pt", "--pairs", bad,
                                                    "--out", tmp_path / "e.npz")
    # an index built with one checkpoint, searched with another
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(40, seed=0))
    run_retrieve("index", "--ckpt", tiny_ckpt, "--stories", pairs, "--out", tmp_path / "index.npz")
    run_retrieve("train", "--method", "infonce", "--ckpt", tiny_ckpt, "--pairs", pairs, "--out", tmp_path / "t.pt",
                 "--steps", 1, "--group", 8)
    assert "checkpoint mismatch" in cli_error(capsys, run_retrieve, "search", "--ckpt", tmp_path / "t.pt", "--index",
                                                   tmp_path / "index.npz", "--query", "a cat")
    # a retrieval mixer trained on other-sized embeddings
    np.savez(tmp_path / "e16.npz", summary=np.zeros((50, 16), np.float32), story=np.ones((50, 16), np.float32))
    run_retrieve("train", "--method", "mixer", "--emb", tmp_path / "e16.npz", "--out", tmp_path / "r.pt", "--steps", 1,
                 "--candidates", 8)
    np.savez(tmp_path / "e64.npz", summary=np.zeros((50, 64), np.float32), story=np.ones((50, 64), np.float32))
    assert "checkpoint mismatch" in cli_error(capsys, run_retrieve, "eval", "--emb", tmp_path / "e64.npz", "--model",
                                                   tmp_path / "r.pt")
