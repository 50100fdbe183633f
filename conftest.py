"""The fixtures the test files share (pytest finds them here): the GPT-2 encoding, the fixture
text tokenized, a tiny trained checkpoint, the workspace of the bad-input tables, a clock made of
steps, and a spy on the loss scaler."""
import numpy as np
import pytest
import torch

import train
from experiments import curves
from testkit import (SAMPLE_TEXT, STORIES, TINY_CURVES, TINY_RUN, official_txt, prep, run_retrieve,
                     run_train, synthetic_pairs, write_jsonl)


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: runs torch.compile, tens of seconds per graph on a cold cache "
                                       "(the quick loop leaves these out: -m 'not compile')")


@pytest.fixture(scope="session")
def gpt2():
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="session")
def sample_stories():
    return [s.strip() for s in SAMPLE_TEXT.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """The shared slice tokenized with a 4096-token vocabulary (small embeddings: fast CPU tests)."""
    out = tmp_path_factory.mktemp("data")
    prep("--input", SAMPLE_TEXT, "--out_dir", out, "--vocab_size", 4096, "--val_fraction", 0.1)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    run_train("--data_dir", prepared, "--out_dir", out, *TINY_RUN, "--max_iters", 150, "--eval_interval", 150)
    return out / "ckpt.pt"


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """Everything the bad-input rows point at: data, checkpoints, embeddings, an index, and broken
    copies of each. Rows must leave every file here as it was."""
    ws = tmp_path_factory.mktemp("ws")
    (ws / "ok.txt").write_text(official_txt(STORIES))
    (ws / "empty.txt").write_text("")
    (ws / "none.txt").write_text("<|endoftext|>\n\n<|endoftext|>\n")
    (ws / "bad_utf8.txt").write_bytes(b"A fine story.\n<|endoftext|>\nBad \xff byte\n")
    (ws / "bad.jsonl").write_text('{"title": "no story"}\n')
    (ws / "afile").write_text("not a folder")
    prep("--input", SAMPLE_TEXT, "--out_dir", ws / "data", "--vocab_size", 4096, "--max_stories", 400)
    prep("--input", SAMPLE_TEXT, "--out_dir", ws / "data1024", "--vocab_size", 1024, "--max_stories", 100)
    prep("--input", SAMPLE_TEXT, "--out_dir", ws / "no_val", "--vocab_size", 4096, "--max_stories", 100)
    (ws / "no_val" / "val.bin").unlink()
    run_train("--data_dir", ws / "data", "--out_dir", ws / "run", "--compile", "false", "--n_layer", 1, "--n_embd", 32,
              "--block_size", 32, "--max_iters", 2, "--eval_interval", 2, "--eval_iters", 1, "--batch_size", 2)
    ckpt = ws / "run" / "ckpt.pt"
    (ws / "broken").mkdir()
    (ws / "broken" / "ckpt.pt").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a truncated copy
    torch.save({"weights": torch.zeros(2)}, ws / "not_a_ckpt.pt")
    pairs = write_jsonl(ws / "pairs.jsonl", synthetic_pairs(40, seed=0))
    write_jsonl(ws / "bad_pairs.jsonl", [{"summary": "x", "text": "y"}])
    (ws / "empty.jsonl").write_text("")
    run_retrieve("embed", "--ckpt", ckpt, "--pairs", pairs, "--out", ws / "emb.npz")
    run_retrieve("index", "--ckpt", ckpt, "--stories", pairs, "--out", ws / "index.npz")
    (ws / "index_broken.npz").write_bytes((ws / "index.npz").read_bytes()[:500])
    run_retrieve("train", "--method", "infonce", "--ckpt", ckpt, "--pairs", pairs, "--out", ws / "tuned.pt",
                 "--steps", 1, "--group", 8)
    np.savez(ws / "e16.npz", summary=np.zeros((50, 16), np.float32), story=np.ones((50, 16), np.float32))
    run_retrieve("train", "--method", "mixer", "--emb", ws / "e16.npz", "--out", ws / "r16.pt", "--steps", 1,
                 "--candidates", 8)
    write_jsonl(ws / "few_pairs.jsonl", synthetic_pairs(5, seed=1))
    (ws / "cut_summary").mkdir()
    (ws / "cut_summary" / "summary.json").write_text('{"block_size": 128, "archs": {"mix')  # killed mid-write
    curves.main([*TINY_CURVES, "--data_dir", str(ws / "data"), "--out_dir", str(ws / "curves")])
    return ws


@pytest.fixture
def fake_clock(monkeypatch):
    """train.py's clock made of steps: every training step takes exactly 1 s, anything else none, so
    time budgets give exact step counts on any machine, however busy."""
    clock = {"t": 0.0}
    monkeypatch.setattr(train, "now", lambda: clock["t"])
    real_step = train.train_step

    def one_second_step(*args, **kwargs):
        clock["t"] += 1.0
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", one_second_step)
    return clock


@pytest.fixture
def scaler_updates(monkeypatch):
    """Whether the loss scaler was on, at every optimizer step of every script (train.train_step)."""
    seen = []
    real_update = torch.amp.GradScaler.update

    def update(self, *args, **kwargs):
        seen.append(self.is_enabled())
        return real_update(self, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "update", update)
    return seen
