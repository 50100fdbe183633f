"""The tests of the scripts: data_prep.py, train.py, sample.py and retrieve.py, and every entry point's
bad inputs. (CPU, no network; real text from testdata/, a TinyStories fixture.)"""
import gzip
import hashlib
import io
import itertools
import json
import lzma
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cli
import data_prep
import retrieve
import sample
import train
from mixer import ARCHS, MaskedMixing
from testkit import (ANIMALS, CKPT, HERE, SAMPLE_TEXT, STORIES, SUMMARIES, TINY_RUN,
                     assert_one_clear_line, cli_error, instruct_txt, official_txt, prep, read_log,
                     run_main, run_retrieve, run_train, snapshot, synthetic_pairs, tiny_model,
                     write_jsonl)


# ------------------------------------------------------------------------------------- data_prep.py


def decoded_stories(out_dir, split, enc):
    ids = np.fromfile(out_dir / f"{split}.bin", dtype=np.uint16).tolist()
    assert ids and ids[-1] == enc.eot_token
    return enc.decode(ids).split("<|endoftext|>")[:-1]


def test_round_trip_and_split_sizes_on_real_text(tmp_path, sample_stories, gpt2):
    prep("--input", SAMPLE_TEXT, "--out_dir", tmp_path, "--val_fraction", 0.1)
    train, val = decoded_stories(tmp_path, "train", gpt2), decoded_stories(tmp_path, "val", gpt2)
    assert sorted(train + val) == sorted(sample_stories)
    assert not set(train) & set(val)
    assert 0.07 < len(val) / len(sample_stories) < 0.13
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["stories"] == {"train": len(train), "val": len(val)}
    assert meta["tokens"]["train"] == (tmp_path / "train.bin").stat().st_size // 2
    assert meta["sources"][0]["sha256"] == hashlib.sha256(SAMPLE_TEXT.read_bytes()).hexdigest()


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


def test_the_split_is_the_same_in_every_process(tmp_path, gpt2):
    """A story's side depends on its text alone: two processes with different hash salts (Python's
    hash() is salted per process) write byte-identical files, whose split agrees with this process's."""
    stories = [f"Story {i}: the {['cat', 'dog', 'fox'][i % 3]} ran home." for i in range(300)]
    summaries = [f"A short summary {i}." for i in range(300)]
    write_text(tmp_path / "in.txt", instruct_txt(stories, summaries))
    outputs = []
    for salt in ("1", "2"):
        out = tmp_path / f"out{salt}"
        subprocess.run([sys.executable, "data_prep.py", "--input", str(tmp_path / "in.txt"), "--out_dir", str(out),
                        "--val_fraction", "0.3"], cwd=HERE, check=True, capture_output=True,
                       env={**os.environ, "PYTHONHASHSEED": salt})
        outputs.append({f.name: f.read_bytes() for f in sorted(out.iterdir())})
    assert outputs[0] == outputs[1] and {"train.bin", "val.bin", "pairs_train.jsonl", "pairs_val.jsonl"} <= set(outputs[0])
    val = decoded_stories(tmp_path / "out1", "val", gpt2)
    assert [v.strip() for v in val] == [s for s in stories if data_prep.is_val(s, 0.3)]
    assert 50 < len(val) < 130


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


def test_offline_download_says_to_pass_local_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data_prep, "HF_URL", "http://127.0.0.1:9/")  # nothing listens: as if offline
    assert "--input" in cli_error(capsys, prep, "--download_dir", tmp_path / "dl", "--out_dir", tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()


def all_data_record(story, summary):
    """A record in the layout of TinyStories_all_data.tar.gz's data*.json (summary None: no such key)."""
    record = {"story": story, "instruction": {"prompt:": "Write a short story (3-5 paragraphs) which only uses very "
              "simple words...", "words": ["cat", "ball", "happy"], "features": ["Dialogue"]},
              "source": "GPT-4"}
    if summary is not None:
        record["summary"] = summary
    return record


def all_data_tarball(records_per_member):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for n, records in enumerate(records_per_member):
            payload = json.dumps(records, indent=2).encode()
            info = tarfile.TarInfo(f"data{n:02d}.json")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def serve(files):
    """A loopback HTTP server for {name: bytes}; returns (base URL, list of requested paths, stop)."""
    requested = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            payload = files[self.path.lstrip("/")]
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/", requested, server.shutdown


def test_default_download_gives_tokens_and_disjoint_pairs(tmp_path, monkeypatch, gpt2):
    stories = [f"Story {i}: the {ANIMALS[i % 16]} found a ball. It was happy. Then it went home." for i in range(400)]
    records = [all_data_record(story, None if i % 5 == 0 else f"A {ANIMALS[i % 16]} finds ball {i}.")
               for i, story in enumerate(stories)]  # every fifth record has no summary
    url, requested, stop = serve({"TinyStories_all_data.tar.gz": all_data_tarball([records[:250], records[250:]])})
    monkeypatch.setattr(data_prep, "HF_URL", url)
    try:
        prep("--out_dir", tmp_path / "out", "--download_dir", tmp_path / "dl", "--val_fraction", 0.25,
             "--max_pairs", 200, "--max_val_pairs", 40)
    finally:
        stop()
    assert requested == ["/TinyStories_all_data.tar.gz"]  # one download for tokens and pairs
    out = tmp_path / "out"
    train_text, val_text = decoded_stories(out, "train", gpt2), decoded_stories(out, "val", gpt2)
    assert sorted(train_text + val_text) == sorted(stories)
    pairs = {split: [json.loads(line) for line in (out / f"pairs_{split}.jsonl").read_text().splitlines()]
             for split in ("train", "val")}
    assert len(pairs["train"]) == 200 and len(pairs["val"]) == 40  # the caps
    summary_of = {r["story"]: r.get("summary") for r in records}
    for split, text in (("train", train_text), ("val", val_text)):
        assert all(p["story"] in set(text) and p["summary"] == summary_of[p["story"]] for p in pairs[split])
    assert not {p["story"] for p in pairs["train"]} & set(val_text)  # no LM-val story in pairs_train
    assert json.loads((out / "meta.json").read_text())["pairs"] == {"train": 200, "val": 40}


def test_ctrl_c_while_tokenizing_leaves_the_prepared_folder_as_it_was(tmp_path, monkeypatch):
    prep("--input", SAMPLE_TEXT, "--out_dir", tmp_path / "data", "--vocab_size", 1024, "--max_stories", 50)
    before = snapshot(tmp_path)
    real = data_prep.write_splits

    def interrupted(stories, splits, enc, num_proc):
        real(itertools.islice(stories, 20), splits, enc, num_proc)  # some of the new shards written, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(data_prep, "write_splits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep("--input", SAMPLE_TEXT, "--out_dir", tmp_path / "data", "--vocab_size", 4096, "--force")
    assert snapshot(tmp_path) == before  # no new shard, no meta.json removed, no partial folder left
    monkeypatch.undo()
    prep("--input", SAMPLE_TEXT, "--out_dir", tmp_path / "data", "--vocab_size", 4096, "--max_stories", 50)
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["vocab_size"] == 4096  # then swapped in
    assert not list(tmp_path.glob(".*partial"))


def test_proxy_pairs_use_the_middle_sentence(tmp_path):
    stories = ["A cat sat. It saw a dog! They played.\nThe end.", "Two sentences. Only two."]
    (tmp_path / "in.txt").write_text(official_txt(stories))
    prep("--input", tmp_path / "in.txt", "--val_input", tmp_path / "in.txt", "--out_dir", tmp_path, "--proxy_pairs")
    pairs = [json.loads(line) for line in (tmp_path / "pairs_train.jsonl").read_text().splitlines()]
    assert pairs == [{"summary": "They played.", "story": stories[0]}]  # fewer than 3 sentences: no pair
    assert "middle sentence" in json.loads((tmp_path / "meta.json").read_text())["pairs_query"]


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
    model, meta = cli.load_model(tmp_path / "ckpt.pt")
    assert model.config.arch == arch and meta["vocab_size"] == 4096


def test_resume_after_ctrl_c_reproduces_the_uninterrupted_run(prepared, tmp_path):
    args = ["--data_dir", prepared, *TINY_RUN, "--max_iters", 50, "--eval_interval", 10, "--dropout", 0.1]
    args = [str(a) for a in args]
    run_train(*args, "--out_dir", tmp_path / "straight")
    # the same run in a subprocess, Ctrl-C'd once it has logged step 20, then resumed
    interrupted = subprocess.Popen([sys.executable, "train.py", *args, "--out_dir", str(tmp_path / "cut")],
                                   cwd=HERE, stdout=subprocess.PIPE, text=True)
    for line in interrupted.stdout:
        if line.startswith("step 20/"):
            interrupted.send_signal(signal.SIGINT)
            break
    rest = interrupted.communicate(timeout=120)[0]
    assert interrupted.returncode == 0 and "interrupted at step" in rest
    stopped_at = int(re.search(r"interrupted at step (\d+)", rest).group(1))
    assert stopped_at < 50
    run_train("--out_dir", tmp_path / "cut", "--resume")  # a bare --resume: the run's own lr, budget, data
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
    lr_at = train.Schedule(lr=1e-3, warmup_iters=100, min_lr_ratio=0.1, kind=schedule).lr_at
    # warmup took 30% of a time budget: the decay must start at the peak there, not jump down
    assert lr_at(0.3, 99, None) == pytest.approx(1e-3)
    assert lr_at(0.3, 100, 0.3) == pytest.approx(1e-3)
    assert lr_at(0.31, 110, 0.3) > 0.98e-3  # the bug this guards against gave 0.69e-3
    assert lr_at(1.0, 5000, 0.3) == pytest.approx(1e-4)
    lrs = [lr_at(p, 100 + i, 0.3) for i, p in enumerate(np.linspace(0.3, 1.2, 50))]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(1e-4)


def printed_lrs(out):
    return [float(lr) for lr in re.findall(r"^step \d+(?:/\d+| \([\d./]+ min\)): loss [\d.]+, lr ([\d.e+-]+)", out, re.M)]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_every_step_follows_warmup_then_the_schedule(schedule, prepared, tmp_path, capsys, fake_clock):
    """The lr of every training step, as train.py prints it: a linear ramp from lr/warmup_iters over
    the first warmup_iters steps, then the schedule down to min_lr at the end of the budget."""
    lr, low, warmup = 1e-3, 1e-4, 4
    flags = ["--data_dir", prepared, *TINY_RUN, "--lr", lr, "--min_lr_ratio", 0.1, "--warmup_iters", warmup,
             "--lr_schedule", schedule, "--log_interval", 1, "--eval_interval", 1000]
    run_train(*flags, "--max_iters", 12, "--out_dir", tmp_path / "steps")
    by_steps = printed_lrs(capsys.readouterr().out)
    decay = [(s / 12 - warmup / 12) / (1 - warmup / 12) for s in range(warmup, 12)]  # progress past warmup
    after = {"cosine": [low + 0.5 * (lr - low) * (1 + math.cos(math.pi * d)) for d in decay],
             "linear": [lr - (lr - low) * d for d in decay], "constant": [lr] * len(decay)}[schedule]
    assert by_steps == pytest.approx([lr * k / warmup for k in range(1, warmup + 1)] + after, rel=6e-3)
    # a time budget of 12 s at 1 s a step (the fake clock): the same lrs, the schedule now driven by time
    run_train(*flags, "--max_iters", 10**6, "--max_minutes", 0.2, "--out_dir", tmp_path / "minutes")
    assert printed_lrs(capsys.readouterr().out) == pytest.approx(by_steps, rel=1e-6)


def test_keep_every_snapshots_and_the_layout_stays_on_resume(prepared, tmp_path, capsys):
    run_train("--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN, "--layout", "stories", "--max_iters", 20,
              "--eval_interval", 10, "--keep_every", 10, "--warmup_iters", 10, "--lr_schedule", "linear")
    assert sorted(p.name for p in tmp_path.glob("ckpt_step*.pt")) == ["ckpt_step0.pt", "ckpt_step10.pt", "ckpt_step20.pt"]
    snapshot = cli.load_checkpoint(tmp_path / "ckpt_step10.pt")
    assert snapshot["step"] == 10 and snapshot["train_args"]["layout"] == "stories"
    lr = {int(r["step"]): float(r["lr"]) for r in read_log(tmp_path)}
    assert lr[10] == pytest.approx(3e-3) and lr[20] == pytest.approx(3e-4)  # peak when warmup ends, min at the end
    assert "--layout stories" in cli_error(capsys, run_train, "--data_dir", prepared, "--out_dir", tmp_path, "--resume",
                                              "--layout", "packed", "--max_iters", 30)


def test_max_minutes_stops_on_time(prepared, tmp_path, fake_clock):
    run_train("--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN, "--max_iters", 10**6,
              "--max_minutes", 0.5, "--eval_interval", 20)
    log = read_log(tmp_path)
    assert [(int(r["step"]), float(r["elapsed_s"])) for r in log] == [(0, 0.0), (20, 20.0), (30, 30.0)]


class SlowFirstCall(torch.nn.Module):
    """Stands in for torch.compile's module: its first call "compiles" for 100 s of the fake clock."""

    def __init__(self, model, clock):
        super().__init__()
        self.model, self.clock, self.calls = model, clock, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            self.clock["t"] += 100.0
        return self.model(*args, **kwargs)


def test_clock_cpu_counts_this_process_cpu_time_not_other_work(prepared, tmp_path, monkeypatch):
    cpu = {"t": 0.0}  # a fake CPU clock: 1 s per step, while the wall clock races on (other work)
    monkeypatch.setattr(train.time, "process_time", lambda: cpu["t"])
    monkeypatch.setattr(train, "now", lambda: cpu["t"] * 5)
    real_step = train.train_step

    def step(*args, **kwargs):
        cpu["t"] += 1.0
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", step)
    run_train("--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN, "--max_iters", 10**6, "--max_minutes", 0.25,
              "--eval_interval", 5, "--clock", "cpu")
    assert [(int(r["step"]), float(r["elapsed_s"])) for r in read_log(tmp_path)][-1] == (15, 15.0)
    assert cli.load_checkpoint(tmp_path / "ckpt.pt")["train_args"]["clock"] == "cpu"


def test_compile_is_the_default_and_its_first_step_is_not_training_time(prepared, tmp_path, fake_clock, monkeypatch,
                                                                        capsys):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(SlowFirstCall(model, fake_clock)) or compiled[-1])
    monkeypatch.setattr(train, "c_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(train, "compile_by_default", lambda device, dtype: True)  # a machine where compile pays
    eager = [a for a in TINY_RUN if a not in ("--compile", "false")]
    run_train("--data_dir", prepared, "--out_dir", tmp_path, *eager, "--max_iters", 10**6, "--max_minutes", 0.5,
              "--eval_interval", 10)
    assert len(compiled) == 1  # no --compile flag: compiled
    assert "compile: the first step took 101.0s" in capsys.readouterr().out
    last = read_log(tmp_path)[-1]  # 30 s of training after the compiled step, which took 101 s
    assert (int(last["step"]), float(last["elapsed_s"])) == (31, 30.0)


def test_a_failed_compile_falls_back_to_eager_in_one_line(prepared, tmp_path, monkeypatch, capsys):
    class Broken(torch.nn.Module):
        def __init__(self, model):
            super().__init__()

        def forward(self, *args, **kwargs):
            raise torch._dynamo.exc.TorchDynamoException("no compiler today")

    monkeypatch.setattr(torch, "compile", Broken)
    monkeypatch.setattr(train, "c_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(train, "compile_by_default", lambda device, dtype: True)  # a machine where compile pays
    eager = [a for a in TINY_RUN if a not in ("--compile", "false")]
    run_train("--data_dir", prepared, "--out_dir", tmp_path / "broken", *eager, "--max_iters", 20, "--eval_interval", 20)
    out = capsys.readouterr().out
    assert out.count("compile: failed (no compiler today); training eager") == 1 and "done at step 20" in out
    monkeypatch.setattr(train, "c_compiler", lambda: None)  # no compiler at all: said before training
    run_train("--data_dir", prepared, "--out_dir", tmp_path / "none", *eager, "--max_iters", 5, "--eval_interval", 5)
    out = capsys.readouterr().out
    assert out.count("compile: no C++ compiler found") == 1 and "done at step 5" in out


def test_a_snapshot_holds_the_time_and_best_val_of_its_own_step(prepared, tmp_path, fake_clock):
    run_train("--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN, "--max_iters", 20, "--eval_interval", 10,
              "--keep_every", 10)
    val = {int(r["step"]): float(r["val_loss"]) for r in read_log(tmp_path)}
    for step in (0, 10, 20):
        snapshot = cli.load_checkpoint(tmp_path / f"ckpt_step{step}.pt")
        assert snapshot["step"] == step and snapshot["elapsed"] == step  # 1 s a step
        assert snapshot["best_val"] == pytest.approx(min(v for s, v in val.items() if s <= step), abs=1e-4)


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, True, "bfloat16"), (False, True, "bfloat16"),
                                                         (True, False, "bfloat16"), (False, False, "float32")],
                         ids=["intel-amx", "amd-avx512-bf16", "amx-only", "no-bf16-hardware"])
def test_dtype_auto_picks_bf16_on_every_cpu_that_multiplies_it_natively(amx, avx512_bf16, expected, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert cli.resolve_dtype(torch.device("cpu"), "auto") == expected
    assert cli.resolve_dtype(torch.device("cpu"), "float32") == "float32"  # an explicit choice stands


@pytest.mark.parametrize("amx, avx512_bf16, compiled", [(True, True, True), (False, True, True), (False, False, False)],
                         ids=["intel-amx", "amd-avx512-bf16", "amd-avx2-only"])
def test_compile_is_on_by_default_where_the_cpu_trains_in_bf16(amx, avx512_bf16, compiled, monkeypatch):
    """The measured rule (RESULTS.md sections 9, 10): compile pays with bf16 hardware, not in float32."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    cpu = torch.device("cpu")
    assert train.compile_by_default(cpu, "auto") is compiled
    assert train.compile_by_default(cpu, "float32") is False  # float32 on any CPU: no gain worth the compile
    assert train.compile_by_default(torch.device("cuda"), "auto") is True


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(prepared, tmp_path, capsys):
    err = cli_error(capsys, run_train, "--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN, "--lr", 1e6,
                      "--warmup_iters", 1, "--grad_clip", 0, "--max_iters", 100, "--eval_interval", 50,
                      "--log_interval", 1)
    assert re.search(r"(loss|val loss) is (nan|inf)", err) and "keeps the last good state" in err
    model, _ = cli.load_model(tmp_path / "ckpt.pt")  # step 0's, still finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ddp_under_torchrun_on_cpu(prepared, tmp_path, capsys):
    """Two gloo processes: gradients all-reduced, rank 0 logs and saves; a resume needs both again."""
    args = [str(a) for a in ["--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN, "--max_iters", 40,
                             "--eval_interval", 20]]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train.py", *args], cwd=HERE, capture_output=True, text=True, timeout=300,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    # a failed rank's own message comes long before torchrun's summary of it: show both
    errors = [line for line in run.stderr.splitlines() if re.search(r"Error|terminate|what\(\)|Abort", line)]
    assert run.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + run.stderr[-1500:]
    log = read_log(tmp_path)
    assert [int(r["step"]) for r in log] == [0, 20, 40]
    assert int(log[-1]["tokens"]) == 40 * 2 * 16 * 64  # both ranks' batches count
    assert float(log[-1]["val_loss"]) < float(log[0]["val_loss"]) - 1.0
    assert "written by 2 processes" in cli_error(capsys, run_train, *args, "--resume")
    # every rank draws its own training windows: N ranks on one stream would train on the same batches N times
    rng = cli.load_checkpoint(tmp_path / "ckpt.pt")["rng"]
    assert len(rng) == 2 and rng[0]["numpy"] != rng[1]["numpy"]


def test_the_toeplitz_mixer_trains_resumes_exactly_and_samples(prepared, tmp_path, capsys):
    flags = ["--data_dir", prepared, *TINY_RUN, "--mixing", "toeplitz", "--lr_schedule", "constant", "--eval_interval", 10]
    run_train(*flags, "--max_iters", 40, "--out_dir", tmp_path / "straight")
    run_train(*flags, "--max_iters", 20, "--out_dir", tmp_path / "resumed")
    run_train(*flags, "--max_iters", 40, "--out_dir", tmp_path / "resumed", "--resume")
    losses = lambda log: [(r["step"], r["train_loss"], r["val_loss"]) for r in log]  # noqa: E731
    assert losses(read_log(tmp_path / "resumed")) == losses(read_log(tmp_path / "straight"))
    log = read_log(tmp_path / "straight")
    assert float(log[-1]["val_loss"]) < float(log[0]["val_loss"]) - 1.0
    model, _ = cli.load_model(tmp_path / "straight" / "ckpt.pt")
    mixing = [p for m in model.modules() if isinstance(m, MaskedMixing) for p in m.parameters()]
    assert model.config.mixing == "toeplitz" and max(p.numel() for p in mixing) == 64  # T weights, not T^2
    capsys.readouterr()
    sample.main(["--ckpt", str(tmp_path / "straight" / "ckpt.pt"), "--max_new_tokens", "20", "--prompt", "Once"])
    assert capsys.readouterr().out.startswith("Once")


def test_sample_generates_from_a_checkpoint(prepared, tmp_path, capsys):
    run_train("--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN, "--max_iters", 100, "--eval_interval", 100)
    capsys.readouterr()
    sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--prompt", "Once upon a time", "--max_new_tokens", "20",
                 "--num_samples", "2", "--temperature", "0"])
    stories = capsys.readouterr().out.split("-" * 40 + "\n")[:2]
    assert len(stories) == 2 and stories[0] == stories[1]  # greedy
    assert stories[0].startswith("Once upon a time") and len(stories[0]) > len("Once upon a time") + 20


# -------------------------------------------------------------------------------------- retrieve.py


def test_rank_metrics_by_hand():
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0], [5.0, 5.0, 0.0]])
    m = retrieve.rank_metrics(scores, torch.tensor([0, 0, 1]))  # ranks 0, 2, and a tie counted as 1
    assert m["top1"] == pytest.approx(1 / 3) and m["top5"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)


def test_eval_on_known_embeddings(tmp_path, capsys):
    stories = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    summaries = torch.cat([stories[:32], -stories[32:]])  # half exact (rank 0), half opposite (rank last)
    np.savez(tmp_path / "emb.npz", summary=summaries.numpy(), story=stories.numpy(), fingerprint="x")
    run_retrieve("eval", "--emb", tmp_path / "emb.npz", "--json")
    out = capsys.readouterr().out
    assert re.search(r"^\| scorer \| N = 32 \| N = 64 \|$", out, re.M)
    assert re.search(r"^\| cosine, .*emb.npz \| 50.0% \(50.0%\) \| 50.0% \(50.0%\) \|$", out, re.M)
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["mrr"] for r in results] == pytest.approx([0.5 + 0.5 / 32, 0.5 + 0.5 / 64])


def test_bm25_by_hand():
    # three stories over tokens 0..3; the query shares the rare token 3 with story 2 only
    stories = [np.array([0, 1, 1]), np.array([0, 2]), np.array([0, 3, 1])]
    query = [np.array([3, 0])]
    scores = retrieve.bm25_scores(query, stories, torch.tensor([[0, 1, 2]]), k1=1.2, b=0.75)
    idf = lambda df: np.log((3 - df + 0.5) / (df + 0.5) + 1)  # noqa: E731
    avg = 8 / 3
    term = lambda tf, length, df: idf(df) * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / avg))  # noqa: E731
    expected = [term(1, 3, 3), term(1, 2, 3), term(1, 3, 3) + term(1, 3, 1)]  # token 0 is in every story
    assert scores[0].tolist() == pytest.approx(expected, rel=1e-5)
    assert scores[0].argmax() == 2


def test_windows_of_a_long_text():
    ids = list(range(10))
    assert retrieve.windows(ids, 4, "first") == [[0, 1, 2, 3]]
    assert retrieve.windows(ids, 4, "last") == [[6, 7, 8, 9]]
    assert retrieve.windows(ids, 4, "mean") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert retrieve.windows(ids[:4], 4, "mean") == [[0, 1, 2, 3]]


def test_mean_pooling_is_the_mean_of_unit_window_embeddings():
    model = tiny_model("mixer")
    long_text, short_text = list(range(40)), list(range(50, 60))
    pooled = retrieve.embed_texts(model, [long_text, short_text], "mean", 8, torch.device("cpu"), "test")
    with torch.no_grad():
        windows = F.normalize(model.embed(torch.tensor([long_text[:16], long_text[16:32]])), dim=-1)
        last = F.normalize(model.embed(torch.tensor([long_text[32:]])), dim=-1)
        short = F.normalize(model.embed(torch.tensor([short_text])), dim=-1)
    assert np.allclose(pooled[0], ((windows.sum(0) + last[0]) / 3).numpy(), atol=1e-5)
    assert np.allclose(pooled[1], short[0].numpy(), atol=1e-5)


def test_candidate_sets_hold_the_true_story_once():
    cands, true_col = retrieve.candidate_sets(300, 32, seed=0)
    assert torch.equal(cands[torch.arange(300), true_col], torch.arange(300))
    assert all(len(set(row)) == 32 for row in cands.tolist())
    assert torch.equal(cands, retrieve.candidate_sets(300, 32, seed=0)[0])  # fixed seed


def retrieval_mixer_args(steps, batch_size):
    """retrieve.py train --method mixer's settings (its defaults, but for these): (Recipe, V1Mixer)."""
    args = retrieve.parse_args([str(a) for a in [
        "train", "--method", "mixer", "--emb", "unused", "--out", "unused", "--candidates", 8, "--width", 64,
        "--lr", 1e-3, "--steps", steps, "--batch_size", batch_size, "--seed", 0, "--log_interval", 1000]])
    return retrieve.settings_of(retrieve.Recipe, args), retrieve.settings_of(retrieve.V1Mixer, args)


def test_retrieval_mixer_learns_a_synthetic_task():
    g = torch.Generator().manual_seed(0)
    stories = torch.randn(1200, 32, generator=g)
    summaries = stories @ torch.linalg.qr(torch.randn(32, 32, generator=g))[0] + 0.3 * torch.randn(1200, 32, generator=g)
    args = retrieval_mixer_args(steps=600, batch_size=64)
    model = retrieve.train_retrieval_mixer(summaries[:1000], stories[:1000], *args).eval()
    cands, true_col = retrieve.candidate_sets(200, 8, seed=1)
    top1 = retrieve.rank_metrics(retrieve.mixer_scores(model, summaries[1000:], stories[1000:], cands), true_col)["top1"]
    assert top1 > 0.8, f"held-out top-1 {top1:.2f}, chance 0.125"


def test_retrieval_mixer_fits_real_text_embeddings(tiny_ckpt, sample_stories, tmp_path):
    """On embeddings of real text the v1 model must at least fit its training pairs: loss well below
    chance, ln(N). (It sat at chance before its query init.) The queries are story openings cut
    mid-sentence: a briefly trained model gives every full sentence, ending in ".", nearly the same
    last-token state (mean pairwise cosine 0.97), which leaves nothing to fit."""
    pairs = [{"summary": " ".join(s.split()[:12]), "story": s} for s in sample_stories[:300]]
    run_retrieve("embed", "--ckpt", tiny_ckpt, "--pairs", write_jsonl(tmp_path / "p.jsonl", pairs),
                 "--out", tmp_path / "emb.npz", "--long", "first")
    summaries, stories = retrieve.load_embeddings(tmp_path / "emb.npz")
    args = retrieval_mixer_args(steps=400, batch_size=32)
    model = retrieve.train_retrieval_mixer(summaries, stories, *args).eval()
    cands, true_col = retrieve.candidate_sets(len(pairs), 8, seed=1)
    loss = F.cross_entropy(retrieve.mixer_scores(model, summaries, stories, cands), true_col).item()
    assert loss < 0.5 * np.log(8), f"training loss {loss:.3f}, chance {np.log(8):.3f}"


def test_infonce_divides_the_cosine_scores_by_the_temperature():
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # unit: e1, e2
    stories = torch.tensor([[3.0, 0.0], [1.0, 1.0]])  # unit: e1, (e1 + e2) / sqrt 2
    c = 1 / math.sqrt(2)  # cosines [[1, c], [0, c]], divided by the temperature 0.1
    rows = (-10 + math.log(math.exp(10) + math.exp(10 * c))) + (-10 * c + math.log(1 + math.exp(10 * c)))
    columns = (-10 + math.log(math.exp(10) + 1)) + math.log(2)
    assert retrieve.infonce_loss(queries, stories, 0.1).item() == pytest.approx((rows + columns) / 4, rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the scores stay in float32 under autocast
        assert retrieve.infonce_loss(queries, stories, 0.1).item() == pytest.approx((rows + columns) / 4, rel=1e-5)


@pytest.mark.parametrize("crop", [0.0, 1.0])
def test_cropped_queries_are_sentences_of_their_own_story(crop, monkeypatch):
    summaries = [[1, 2], [3, 4], [5, 6], [7, 8]]
    sentences = [[[10 + i, 11], [12 + i, 13, 14]] for i in range(4)]
    stories = [a + b for a, b in sentences]
    seen = []
    real = retrieve.embed_batch
    monkeypatch.setattr(retrieve, "embed_batch", lambda model, texts, *a: seen.append(texts) or real(model, texts, *a))
    recipe = retrieve.Recipe(lr=1e-3, steps=2, warmup_iters=0, weight_decay=0.0, seed=0, dtype="float32")
    infonce = retrieve.InfoNCE(group=4, crop=crop)
    retrieve.fine_tune(tiny_model("mixer"), summaries, stories, recipe, infonce, torch.device("cpu"), sentences)
    queries, story_texts = seen[0], seen[1]  # one group: the queries, then their stories
    owner = [stories.index(s) for s in story_texts]
    expected = [sentences[i] if crop else [summaries[i]] for i in owner]
    assert all(q in options for q, options in zip(queries, expected))


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
    run_retrieve("eval", "--emb", tmp_path / "emb.npz", "--bm25")
    out = capsys.readouterr().out
    assert re.search(r"^\| cosine, .* \| [\d.]+% \([\d.]+%\) \|$", out, re.M)
    bm25 = re.search(r"^\| BM25 .* \| ([\d.]+)% \([\d.]+%\) \|$", out, re.M)
    assert float(bm25.group(1)) > 50  # a summary that is the story's first sentence shares its words
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


# ------------------------------------------------------------------ every entry point: bad inputs


ENTRY_POINTS = {name: run_main(module) for name, module in
                {"data_prep": data_prep, "train": train, "sample": sample, "retrieve": retrieve}.items()}
PREP = ("--out_dir", "{ws}/prep_out")
TRAIN = ("--data_dir", "{ws}/data", "--out_dir", "{ws}/new_run")
# (entry point, command line, words the error must contain). {ws} is the workspace folder.
BAD_INPUTS = [
    ("data_prep", ["--input", "{ws}/missing.txt", *PREP], "input file not found"),
    ("data_prep", ["--input", "{ws}/empty.txt", *PREP], "input file is empty"),
    ("data_prep", ["--input", "{ws}/none.txt", *PREP], "no stories found"),
    ("data_prep", ["--input", "{ws}/bad_utf8.txt", *PREP], "not UTF-8 at byte offset 32"),
    ("data_prep", ["--input", "{ws}/bad.jsonl", *PREP], 'line 1 has no "story"'),
    ("data_prep", ["--input", "{ws}/ok.txt", "{ws}/none.txt", "--out_dir", "{ws}/half"], "none.txt: no stories found"),
    ("data_prep", ["--input", "{ws}/ok.txt", "--out_dir", "{ws}/afile"], "is a file, not a folder"),
    ("data_prep", ["--input", "{ws}/ok.txt", "--vocab_size", "70000", *PREP], "does not fit uint16"),
    ("data_prep", ["--input", "{ws}/ok.txt", "--vocab_size", "100", *PREP], "between 257"),
    ("data_prep", ["--val_fraction", "1.5"], "in [0, 1)"),
    ("data_prep", ["--max_stories", "0"], "not a positive integer"),
    ("data_prep", ["--val_input", "{ws}/ok.txt"], "--val_input needs --input"),
    # over a folder of prepared data: it must stay as it was, byte for byte (the table checks every file)
    ("data_prep", ["--input", "{ws}/bad_utf8.txt", "--out_dir", "{ws}/data", "--force"], "not UTF-8"),
    ("data_prep", ["--input", "{ws}/ok.txt", "{ws}/bad.jsonl", "--out_dir", "{ws}/data"], 'line 1 has no "story"'),
    ("data_prep", ["--input", "{ws}/typo.txt", "--out_dir", "{ws}/data"], "input file not found"),
    ("train", [*TRAIN, "--batch_size", "0"], "not a positive integer"),
    ("train", [*TRAIN, "--lr", "-1"], "not a number > 0"),
    ("train", [*TRAIN, "--lr", "fast"], "not a number"),
    ("train", [*TRAIN, "--n_layer", "0"], "n_layer must be at least 1"),
    ("train", [*TRAIN, "--block_size", "-5"], "block_size must be at least 1"),
    ("train", [*TRAIN, "--arch", "transformer", "--n_embd", "30", "--n_head", "4"], "not divisible by n_head"),
    ("train", [*TRAIN, "--arch", "transformer", "--mixing", "toeplitz"], "--mixing has no effect on --arch transformer"),
    ("train", [*TRAIN, "--arch", "transformer", "--mixer_heads", "2"], "--mixer_heads has no effect on --arch transformer"),
    ("train", [*TRAIN, "--n_head", "2"], "--n_head has no effect on --arch mixer"),
    ("train", [*TRAIN, "--arch", "transformer", "--mixing_bias", "none"],
     "--mixing_bias has no effect on --arch transformer"),
    ("train", ["--data_dir", "{ws}/data", "--out_dir", "{ws}/run", "--resume", "--n_head", "2"],
     "--n_head has no effect on --arch mixer (the arch of"),
    ("train", ["--data_dir", "{ws}/data", "--out_dir", "{ws}/run", "--resume", "--attn_impl", "sdpa"],
     "--attn_impl has no effect on --arch mixer (the arch of"),
    ("train", [*TRAIN, "--dropout", "1.5"], "dropout must be in [0, 1)"),
    ("train", [*TRAIN, "--mixing", "circulant"], "invalid choice: 'circulant' (choose from 'full', 'toeplitz')"),
    ("train", [*TRAIN, "--compile", "maybe"], "'maybe' is not true or false"),
    ("train", ["--data_dir", "{ws}/data", "--out_dir", "{ws}/run", "--resume", "--clock", "cpu"],
     "trained with --clock wall, not --clock cpu"),
    ("train", [*TRAIN, "--max_iters", "0"], "not a positive integer"),
    ("train", [*TRAIN, "--eval_iters", "0"], "not a positive integer"),
    ("train", [*TRAIN, "--grad_accum", "0"], "not a positive integer"),
    ("train", [*TRAIN, "--warmup_iters", "-1"], "not an integer >= 0"),
    ("train", [*TRAIN, "--max_minutes", "0"], "not a number > 0"),
    ("train", [*TRAIN, "--min_lr_ratio", "2"], "not in [0, 1]"),
    ("train", [*TRAIN, "--arch", "rnn"], "invalid choice: 'rnn'"),
    ("train", [*TRAIN, "--device", "cuda"], "no CUDA GPU"),
    ("train", [*TRAIN, "--device", "potato"], "is not a device"),
    ("train", ["--data_dir", "{ws}/nothing"], "run python data_prep.py"),
    ("train", ["--data_dir", "{ws}/no_val", "--out_dir", "{ws}/new_run"], "re-run data_prep.py"),
    ("train", ["--data_dir", "{ws}/data", "--out_dir", "{ws}/afile"], "is a file, not a folder"),
    ("train", ["--data_dir", "{ws}/data", "--out_dir", "{ws}/run"], "pass --resume"),
    ("train", ["--data_dir", "{ws}/data", "--out_dir", "{ws}/new_run", "--resume"], "no checkpoint at"),
    ("train", ["--data_dir", "{ws}/data", "--out_dir", "{ws}/broken", "--resume"], "not a readable checkpoint"),
    ("train", ["--data_dir", "{ws}/data", "--out_dir", "{ws}/run", "--resume", "--block_size", "64"],
     "trained with --block_size 32, not --block_size 64"),
    ("train", ["--data_dir", "{ws}/data", "--out_dir", "{ws}/run", "--resume", "--arch", "hybrid"],
     "trained with --arch mixer, not --arch hybrid"),
    ("train", ["--data_dir", "{ws}/data1024", "--out_dir", "{ws}/run", "--resume"], "4096-token vocabulary"),
    ("train", ["--data_dir", "{ws}/data", "--out_dir", "{ws}/run", "--resume", "--layout", "stories"],
     "trained with --layout packed"),
    ("sample", ["--ckpt", "{ws}/missing.pt"], "checkpoint not found"),
    ("sample", ["--ckpt", "{ws}/broken/ckpt.pt"], "not a readable checkpoint"),
    ("sample", ["--ckpt", "{ws}/not_a_ckpt.pt"], "not a checkpoint of the expected kind"),
    ("sample", ["--ckpt", CKPT, "--max_new_tokens", "0"], "not a positive integer"),
    ("sample", ["--ckpt", CKPT, "--temperature", "-1"], "not a number >= 0"),
    ("retrieve", ["embed", "--ckpt", CKPT, "--pairs", "{ws}/bad_pairs.jsonl", "--out", "{ws}/e.npz"],
     "line 1 needs string fields"),
    ("retrieve", ["embed", "--ckpt", CKPT, "--pairs", "{ws}/empty.jsonl", "--out", "{ws}/e.npz"], "empty file"),
    ("retrieve", ["embed", "--ckpt", "{ws}/missing.pt", "--pairs", "{ws}/pairs.jsonl", "--out", "{ws}/e.npz"],
     "checkpoint not found"),
    ("retrieve", ["eval", "--emb", "{ws}/missing.npz"], "not found"),
    ("retrieve", ["eval", "--emb", "{ws}/index_broken.npz"], "not a readable .npz"),
    ("retrieve", ["eval", "--emb", "{ws}/emb.npz", "--model", "{ws}/broken/ckpt.pt"], "not a readable checkpoint"),
    ("retrieve", ["eval", "--emb", "{ws}/emb.npz", "--model", "{ws}/r16.pt"], "checkpoint mismatch"),
    ("retrieve", ["train", "--method", "mixer", "--out", "{ws}/r.pt"], "give --emb"),
    ("retrieve", ["train", "--method", "infonce", "--out", "{ws}/r.pt"], "give --ckpt and --pairs"),
    ("retrieve", ["train", "--method", "mixer", "--emb", "{ws}/e16.npz", "--out", "{ws}/r.pt", "--candidates", "64"],
     "need more than --candidates 64"),
    ("retrieve", ["index", "--ckpt", CKPT, "--stories", "{ws}/missing.txt", "--out", "{ws}/i.npz"],
     "input file not found"),
    ("retrieve", ["search", "--ckpt", CKPT, "--index", "{ws}/index.npz", "--query", ""], "--query is empty"),
    ("retrieve", ["search", "--ckpt", CKPT, "--index", "{ws}/index.npz", "--query", "  "], "--query is empty"),
    ("retrieve", ["search", "--ckpt", CKPT, "--index", "{ws}/index_broken.npz", "--query", "a cat"],
     "not a readable .npz"),
    ("retrieve", ["search", "--ckpt", "{ws}/tuned.pt", "--index", "{ws}/index.npz", "--query", "a cat"],
     "checkpoint mismatch"),
    ("retrieve", ["search", "--ckpt", CKPT, "--index", "{ws}/index.npz", "--query", "a cat", "-k", "0"],
     "not a positive integer"),
]


@pytest.mark.parametrize("entry, argv, words", BAD_INPUTS, ids=[f"{e}:{' '.join(a)[:60]}" for e, a, _ in BAD_INPUTS])
def test_bad_input_gets_one_clear_line_and_changes_nothing(entry, argv, words, workspace, capsys):
    assert_one_clear_line(ENTRY_POINTS[entry], argv, words, workspace, capsys)


def test_train_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--batch_size", 16), ("--lr", 0.0005), ("--warmup_iters", 200), ("--max_iters", 5000),
                          ("--eval_interval", 250), ("--weight_decay", 0.1), ("--n_layer", 4), ("--block_size", 512)]:
        assert re.search(rf"{flag} \S+ .*?default:? {default}\b", help_text), flag
    assert "--mixing {full,toeplitz}" in help_text and "--attn_impl {sdpa,eager}" in help_text  # every choice shown


@pytest.mark.parametrize("tty", [True, False])
def test_progress_lines_use_carriage_returns_only_on_a_terminal(tty):

    class Stream(io.StringIO):
        def isatty(self):
            return tty

    stream = Stream()
    progress = cli.Progress(log_every=0.0, stream=stream)
    progress.every = 0.0  # every update prints
    progress.update("step 1")
    progress.update("step 2")
    progress.done("done")
    expected = "\rstep 1\rstep 2\rdone  \n" if tty else "step 1\nstep 2\ndone\n"
    assert stream.getvalue() == expected


def test_cost_line_and_eta(prepared, tmp_path, capsys):
    run_train("--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN, "--max_iters", 30, "--eval_interval", 15)
    out = capsys.readouterr().out
    assert re.search(r"^cost: [\d,]+ ms/step, so 30 steps = 2\d more steps \([\d.]+M tokens\) in \w+, plus 2 evals of "
                     r"\w+: about \w+ in all$", out, re.M), out
    assert re.findall(r"^step (\d+)/30: loss [\d.]+, lr [\d.e-]+, \d+ ms/step, (\w+) left$", out, re.M)[-1][0] == "30"


def test_cost_of_a_long_cpu_run_names_a_run_of_minutes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    budget = train.Budget(max_iters=5000)
    # the laptop: 15 s a step, a 5-minute eval
    lines = train.cost_lines(budget, 250, 3, 45.0, 15.0, 300.0, 8192, torch.device("cpu"))
    assert lines[0].startswith("cost: 15,000 ms/step, so 5,000 steps = 4,997 more steps (40.9M tokens) in 20h49m, "
                               "plus 20 evals of 5m00s: about 22h29m in all")
    assert "the README's Quick start" in lines[1]  # points there instead of carrying a copy that drifts
    quick_start = (HERE / "README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
    assert "on a laptop CPU" in quick_start and "python train.py --arch mixer" in quick_start
    budget.max_minutes = 5  # a time budget that ends first
    lines = train.cost_lines(budget, 250, 3, 45.0, 0.1, 2.0, 8192, torch.device("cpu"))
    assert lines == ["cost: 100 ms/step, so --max_minutes 5 = 2,550 more steps (20.9M tokens) in 4m15s, plus 11 evals "
                     "of 2s: about 4m37s in all"]


def test_eval_batches_hold_the_eval_tokens_and_stay_on_resume(prepared, tmp_path, capsys):
    run_train("--data_dir", prepared, "--out_dir", tmp_path, *[a for a in TINY_RUN if a not in ("--eval_iters", 5)],
              "--max_iters", 4, "--eval_interval", 2, "--eval_tokens", 5000)
    assert "evals of 5 batches per split" in capsys.readouterr().out  # 5000 / (16 x 64) = 4.9
    assert cli.load_checkpoint(tmp_path / "ckpt.pt")["train_args"]["eval_iters"] == 5
    run_train("--data_dir", prepared, "--out_dir", tmp_path, "--max_iters", 6, "--resume")
    assert "evals of 5 batches per split" in capsys.readouterr().out


def start_training(*argv, code=None):
    """train.py in a subprocess (or `code`, which calls train.main), its stdout line by line."""
    command = ["-c", code] if code else ["train.py"]
    return subprocess.Popen([sys.executable, *command, *map(str, argv)], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_ctrl_c_during_a_long_eval_saves_and_exits_within_seconds(prepared, tmp_path):
    proc = start_training("--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN, "--eval_iters", 100000)
    assert proc.stdout.readline().startswith("mixer:")  # the step-0 eval (minutes long) begins
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    started = time.time()
    rest = proc.communicate(timeout=60)[0]
    assert time.time() - started < 15 and proc.returncode == 0, rest
    assert "interrupted at step 0: saved" in rest
    assert cli.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 0
    run_train("--data_dir", prepared, "--out_dir", tmp_path, "--resume", "--max_iters", 3, "--eval_iters", 1)
    assert cli.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 3


SLOW_SAVE = """import sys, time, train
save = train.atomic_save
def slow_save(obj, path):
    print("saving", flush=True)
    time.sleep(120)
    save(obj, path)
train.atomic_save = slow_save
train.main(sys.argv[1:])
"""


def test_a_second_ctrl_c_exits_at_once_and_leaves_the_last_checkpoint(prepared, tmp_path):
    run_train("--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN, "--max_iters", 5, "--eval_interval", 5)
    before = (tmp_path / "ckpt.pt").read_bytes()
    proc = start_training("--data_dir", prepared, "--out_dir", tmp_path, "--resume", "--max_iters", 10**6,
                          "--eval_interval", 10**6, "--log_interval", 1, code=SLOW_SAVE)
    for line in proc.stdout:
        if line.startswith("step 7/"):
            proc.send_signal(signal.SIGINT)  # the first: stop and save (a save that takes minutes here)
        if line.startswith("saving"):
            break
    proc.send_signal(signal.SIGINT)  # the second, during the save
    started = time.time()
    rest = proc.communicate(timeout=60)[0]
    assert time.time() - started < 10 and proc.returncode == 130, rest
    assert "second Ctrl-C" in rest
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert cli.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 5


def test_sigkill_at_any_moment_leaves_a_checkpoint_that_resumes(prepared, tmp_path):
    """Kill training (SIGKILL, no chance to clean up) several times, half of them the moment a
    checkpoint write begins: ckpt.pt must always load, and --resume must carry on to the end."""
    # a checkpoint every step (eval_interval 1), on batches of 4: what is tested is the writes, not the steps
    argv = [sys.executable, "train.py", "--data_dir", str(prepared), "--out_dir", str(tmp_path),
            *map(str, TINY_RUN), "--batch_size", "4", "--max_iters", "200", "--eval_interval", "1", "--eval_iters",
            "1", "--log_interval", "50"]
    ckpt, tmp = tmp_path / "ckpt.pt", tmp_path / "ckpt.pt.tmp"
    rng = np.random.default_rng(0)
    steps_seen = []
    for attempt in range(4):
        tmp.unlink(missing_ok=True)  # a killed write's leftover: the next one to appear is new
        written = ckpt.stat().st_mtime_ns if ckpt.exists() else None
        proc = subprocess.Popen(argv + (["--resume"] if attempt else []), cwd=HERE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        # wait until this process has saved a checkpoint of its own: it is past start-up and training
        while (not ckpt.exists() or ckpt.stat().st_mtime_ns == written) and time.time() < deadline:
            time.sleep(0.01)
        if attempt % 2:
            time.sleep(rng.uniform(0.2, 1.5))  # a random moment
        else:
            while not tmp.exists() and time.time() < deadline:  # the moment a write begins
                time.sleep(0.0005)
        proc.kill()
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        state = cli.load_checkpoint(ckpt)  # never half-written
        cli.model_from_checkpoint(state, ckpt)
        steps_seen.append(state["step"])
    finish = subprocess.run(argv + ["--resume"], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert cli.load_checkpoint(ckpt)["step"] == 200 and int(read_log(tmp_path)[-1]["step"]) == 200
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] > 0  # every resume made progress


# ---------------------------------------------------------------------------------------- one training step


@pytest.mark.parametrize("script", ["train", "retrieve infonce", "retrieve mixer"])
def test_float16_trains_with_the_loss_scaler_in_every_script(script, scaler_updates, prepared, tiny_ckpt, tmp_path,
                                                             capsys):
    if script == "train":
        run_train("--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN, "--dtype", "float16", "--max_iters", 3)
    elif script == "retrieve infonce":
        pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(16, seed=0))
        run_retrieve("train", "--method", "infonce", "--ckpt", tiny_ckpt, "--pairs", pairs, "--out", tmp_path / "t.pt",
                     "--steps", 3, "--group", 8, "--dtype", "float16")
    else:
        np.savez(tmp_path / "e.npz", summary=np.random.rand(20, 16).astype(np.float32),
                 story=np.random.rand(20, 16).astype(np.float32))
        run_retrieve("train", "--method", "mixer", "--emb", tmp_path / "e.npz", "--out", tmp_path / "r.pt",
                     "--steps", 3, "--candidates", 8, "--dtype", "float16")
    assert len(scaler_updates) >= 3 and all(scaler_updates)
