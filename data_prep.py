"""
TinyStories -> GPT-2 BPE tokens (tiktoken) -> uint16 train.bin / val.bin, nanoGPT layout, plus
summary/story pairs for retrieval.

    python data_prep.py                              # download TinyStories (1.6 GB), tokenize
    python data_prep.py --max_stories 100000         # a quick start: the first 100k stories
    python data_prep.py --input my_stories.txt.gz    # offline / own data (val split taken from it)
    python data_prep.py --vocab_size 4096            # GPT-2 BPE cut to its first 4095 merges + EOT

The download is TinyStories_all_data.tar.gz (1.61 GB): about 5M stories written by GPT-3.5 and
GPT-4, each as a JSON record with the story and, for most, a one-paragraph summary. One file gives
both the language-model text and the retrieval pairs (TinyStoriesV2-GPT4, 2.2 GB, has no
summaries). A stable hash of each story puts --val_fraction of them in the val split.

Writes to --out_dir: train.bin, val.bin (uint16 token ids, one <|endoftext|> after every story),
meta.json (the encoding, counts, sources), and pairs_train.jsonl / pairs_val.jsonl ({"summary",
"story"}, the first --max_pairs / --max_val_pairs stories of each split that have a summary). A pair
follows its story's split, so no val story is ever in pairs_train. Everything is written into a
folder beside --out_dir first and moved in only when complete, meta.json last: a bad input or a
Ctrl-C at any point leaves an existing --out_dir as it was, and a folder with a meta.json is
complete.
"""
import argparse
import contextlib
import gzip
import hashlib
import itertools
import json
import lzma
import os
import re
import shutil
import signal
import tarfile
import time
import zlib
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import numpy as np
import tiktoken

from cli import (AtomicFile, HelpFormatter, Progress, UserError, check_folder, nonneg_int,
                 positive_int, run)

HF_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
DOWNLOAD = "TinyStories_all_data.tar.gz"  # data00.json .. data49.json, each a list of records
EOT = "<|endoftext|>"
STORIES_PER_CHUNK = 2048  # the unit of parallel tokenization; bounds memory


class DataError(UserError):
    """Bad input data or settings."""


def fraction(text):
    """A flag type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


# ---------------------------------------------------------------------------------------- encoding

def load_encoding(meta):
    """The tiktoken encoding a meta.json describes. The one place train/sample/retrieve get it from.

    vocab_size < 50257 keeps GPT-2's first vocab_size - 1 BPE ranks and maps <|endoftext|> to
    vocab_size - 1. The truncated table is a valid BPE: tiktoken merges lowest rank first and every
    token's parts rank below it, so encoding simply stops before the dropped merges. Ids are
    GPT-2's.
    """
    name, vocab_size = meta["encoding"], meta["vocab_size"]
    if name != "gpt2":
        raise DataError(f"unknown encoding {name!r} in meta.json (only 'gpt2' is supported)")
    try:
        full = tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken fetches its BPE files on first use
        raise DataError(f"could not load tiktoken's GPT-2 files ({type(e).__name__}); offline, set "
                        "TIKTOKEN_CACHE_DIR to a folder holding them") from None
    if vocab_size == full.n_vocab:
        return full
    if vocab_size > 65536:
        raise DataError(f"--vocab_size {vocab_size} does not fit uint16 shards (at most 65536)")
    if not 257 <= vocab_size <= full.n_vocab:
        raise DataError(f"--vocab_size must be between 257 (the 256 bytes + EOT) and "
                        f"{full.n_vocab}")
    ranks = {token: rank for token, rank in full._mergeable_ranks.items() if rank < vocab_size - 1}
    return tiktoken.Encoding(name=f"gpt2_{vocab_size}", pat_str=full._pat_str,
                             mergeable_ranks=ranks, special_tokens={EOT: vocab_size - 1})


# ---------------------------------------------------------------------------------------- download

def download(url, dest):
    """Fetch url to dest with a progress line; resumes a partial dest.part left by an earlier
    run."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    try:
        headers = {"Range": f"bytes={have}-"} if have else {}  # resume where the part ends
        response = urlopen(Request(url, headers=headers), timeout=60)
    except HTTPError as e:
        if e.code == 416 and have:  # nothing left to fetch: the part is complete
            return part.rename(dest)
        raise DataError(f"download of {url} failed: HTTP {e.code}") from None
    except (URLError, OSError) as e:
        raise DataError(f"could not download {url} ({getattr(e, 'reason', e)}). Offline? Pass "
                        "local files: python data_prep.py --input stories.txt [--val_input "
                        "valid.txt]") from None
    with response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        total = have + int(response.headers.get("Content-Length", 0))
        with open(part, "ab" if have else "wb") as f:
            copy_with_progress(response, f, dest.name, have, total)
    return part.rename(dest)


def copy_with_progress(src, dst, name, done, total):
    start, start_bytes, progress = time.time(), done, Progress()
    while chunk := src.read(1 << 20):
        dst.write(chunk)
        done += len(chunk)
        rate = (done - start_bytes) / max(time.time() - start, 1e-9)
        eta = (total - done) / rate if rate and total else float("nan")
        progress.update(f"{name}: {done / 1e6:,.0f}/{total / 1e6:,.0f} MB  {rate / 1e6:.1f} MB/s  "
                        f"ETA {eta:.0f}s")
    progress.done(f"{name}: {done / 1e6:,.0f} MB in {time.time() - start:.0f}s")


# ---------------------------------------------------------------------------------------- reading

def open_binary(path):
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    return opener(path, "rb")


def decode(raw, path, offset):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = " (of the decompressed text)" if path.suffix in (".gz", ".xz") else ""
        raise DataError(f"{path}: bytes that are not UTF-8 at byte offset {offset + e.start}"
                        f"{where}") from None


def text_lines(path):
    offset = 0
    with open_binary(path) as f:
        for raw in f:
            yield decode(raw, path, offset)
            offset += len(raw)


def read_text(path):
    """Records of the official .txt layout (each followed by a <|endoftext|> line) as (story,
    summary). TinyStoriesInstruct records (Features:/Summary:/.../Story: fields) give their summary
    too."""
    record = []
    for line in itertools.chain(text_lines(path), [EOT]):
        if line.strip() != EOT:
            record.append(line)
            continue
        text = "".join(record)
        record = []
        story_field = re.search(r"^Story:[ \t]*", text, re.M)
        if story_field is None:
            yield text, None
            continue
        fields = text[: story_field.start()]  # Features:, Summary:, ... before the story
        summary = re.search(r"^Summary:(.*?)(?=^\w[\w ]*:|\Z)", fields, re.M | re.S)
        yield text[story_field.end():], summary and summary.group(1)


def read_json(path):
    """.jsonl (one object a line) or .json (a list of objects), with "story" or "text" and an
    optional "summary". A .json file is parsed whole; use .jsonl for large inputs."""
    if ".jsonl" in path.suffixes:
        objects = ((n, json.loads(line)) for n, line in enumerate(text_lines(path), 1)
                   if line.strip())
    else:
        with open_binary(path) as f:
            data = json.loads(decode(f.read(), path, 0))
        objects = enumerate(data if isinstance(data, list) else [data], 1)
    where = "line" if ".jsonl" in path.suffixes else "record"
    for n, obj in objects:
        yield story_and_summary(obj, f"{path}: {where} {n}")


def read_tar(path):
    """A .tar.gz of .json members (TinyStories_all_data.tar.gz), streamed one member at a time."""
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                data = json.loads(decode(tar.extractfile(member).read(), Path(member.name), 0))
                for n, obj in enumerate(data if isinstance(data, list) else [data], 1):
                    yield story_and_summary(obj, f"{path} member {member.name} record {n}")


def story_and_summary(obj, where):
    story = obj.get("story", obj.get("text")) if isinstance(obj, dict) else None
    if not isinstance(story, str):
        raise DataError(f"{where} has no \"story\" or \"text\" string field")
    summary = obj.get("summary")
    return story, summary if isinstance(summary, str) else None


def read_stories(paths, max_stories=None):
    """(story, summary or None) for every non-empty story of every input file, stripped."""
    def generate():
        for path in paths:
            found = 0
            reader = read_tar if ".tar" in path.suffixes else \
                read_json if {".json", ".jsonl"} & set(path.suffixes) else read_text
            try:
                for story, summary in reader(path):
                    if story.strip():
                        found += 1
                        yield story.strip(), summary.strip() if summary else None
            except (json.JSONDecodeError, EOFError, OSError, lzma.LZMAError, tarfile.TarError,
                    zlib.error) as e:
                raise DataError(f"{path}: cannot be read as {reader.__name__[5:]} ({e})") from None
            if not found:
                raise DataError(f"{path}: no stories found (expected stories separated by {EOT} "
                                "lines, or .jsonl/.json records with a \"story\" or \"text\" "
                                "field)")
    return itertools.islice(generate(), max_stories)


def check_inputs(paths):
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise DataError(f"input file not found: {path}")
        if path.stat().st_size == 0:
            raise DataError(f"input file is empty: {path}")
    return paths


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def is_val(story, val_fraction):
    """A stable hash of the text decides the split, so a story (and every pair that contains it) is
    always on the same side, however often it occurs and in whatever order the input comes."""
    return zlib.crc32(story.encode()) % 1_000_000 < val_fraction * 1_000_000


# ---------------------------------------------------------------------------------------- writing

def middle_sentence(story):
    """The proxy query of --proxy_pairs: the story's middle sentence (None if it has fewer than
    3)."""
    sentences = re.split(r"(?<=[.!?])\s+", story)
    return sentences[len(sentences) // 2] if len(sentences) >= 3 else None


class SplitWriter:
    """Writes one split: its token shard, its pairs file (at most max_pairs lines), and its
    counts."""

    def __init__(self, out_dir, name, max_pairs):
        self.shard = AtomicFile(out_dir / f"{name}.bin")
        self.pairs = AtomicFile(out_dir / f"pairs_{name}.jsonl", "w")
        self.max_pairs = max_pairs
        self.stories = self.tokens = self.n_pairs = 0

    def add(self, stories, token_lists, eot):
        ids = itertools.chain.from_iterable(t + [eot] for t in token_lists)
        ids = np.fromiter(ids, dtype=np.uint16)
        ids.tofile(self.shard.file)
        self.stories += len(token_lists)
        self.tokens += ids.size
        for story, summary in stories:
            if summary and self.n_pairs < self.max_pairs:
                self.pairs.file.write(json.dumps({"summary": summary, "story": story}) + "\n")
                self.n_pairs += 1

    def commit(self):
        self.shard.commit()
        self.pairs.commit() if self.n_pairs else self.pairs.discard()

    def discard(self):
        self.shard.discard()
        self.pairs.discard()


def write_splits(stories, splits, enc, num_proc):
    """Stream (story, summary, split_name) in chunks; tiktoken encodes each chunk on num_proc
    threads (it releases the GIL). Memory is bounded by the chunk size, not the input size."""
    start, n_tokens, progress = time.time(), 0, Progress()
    while chunk := list(itertools.islice(stories, STORIES_PER_CHUNK * num_proc)):
        texts = [story for story, _, _ in chunk]
        token_lists = enc.encode_ordinary_batch(texts, num_threads=num_proc)
        for name, split in splits.items():
            keep = [i for i, (_, _, s) in enumerate(chunk) if s == name]
            split.add([chunk[i][:2] for i in keep], [token_lists[i] for i in keep], enc.eot_token)
        n_tokens += sum(map(len, token_lists)) + len(chunk)
        stories_done = sum(s.stories for s in splits.values())
        progress.update(f"tokenized {stories_done:,} stories, {n_tokens:,} tokens, "
                        f"{n_tokens / (time.time() - start):,.0f} tokens/s")
    elapsed = time.time() - start
    progress.done(f"tokenized {sum(s.stories for s in splits.values()):,} stories, {n_tokens:,} "
                  f"tokens in {elapsed:.1f}s ({n_tokens / max(elapsed, 1e-9):,.0f} tokens/s)")


def labelled(stories, split, proxy_pairs):
    for story, summary in stories:
        if proxy_pairs and not summary:
            summary = middle_sentence(story)
        yield story, summary, split(story) if callable(split) else split


def prepare(args):
    """Check every input, then tokenize into a folder beside --out_dir and swap it in when it is
    complete: a bad input or Ctrl-C at any point leaves an existing --out_dir as it was."""
    out_dir = Path(args.out_dir)
    check_folder(out_dir, "--out_dir")
    if args.input:
        train_paths, val_paths = check_inputs(args.input), check_inputs(args.val_input or [])
    else:
        if args.val_input:
            raise DataError("--val_input needs --input")
        check_folder(args.download_dir, "--download_dir")
        train_paths = [download(HF_URL + DOWNLOAD, Path(args.download_dir) / DOWNLOAD)]
        val_paths = []
    enc = load_encoding({"encoding": "gpt2", "vocab_size": args.vocab_size or 50257})
    inputs = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
              for p in train_paths + val_paths]
    settings = {"vocab_size": enc.n_vocab, "val_fraction": None if val_paths else args.val_fraction,
                "max_stories": args.max_stories, "max_pairs": [args.max_pairs, args.max_val_pairs],
                "proxy_pairs": args.proxy_pairs, "inputs": inputs}
    meta_path = out_dir / "meta.json"
    done = meta_path.exists() and json.loads(meta_path.read_text()).get("settings") == settings
    if done and not args.force:
        print(f"{out_dir} already holds these inputs tokenized with these settings; --force to "
              "redo")
        return
    build = out_dir.resolve().parent / f".{out_dir.resolve().name}.partial"
    shutil.rmtree(build, ignore_errors=True)  # a partial build left by a killed run
    build.mkdir(parents=True)
    try:
        splits = write_folder(build, train_paths, val_paths, enc, settings, args)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    swap_in(build, out_dir)
    for name, split in splits.items():
        print(f"{name}: {split.stories:,} stories, {split.tokens:,} tokens "
              f"({split.tokens / split.stories:.1f} per story), {split.n_pairs:,} summary/story "
              "pairs")
    print(f"wrote {out_dir}/")


def write_folder(folder, train_paths, val_paths, enc, settings, args):
    """Tokenize the inputs into folder (its shards, pairs and meta.json): {split name:
    SplitWriter}."""
    if val_paths:
        stories = itertools.chain(
            labelled(read_stories(train_paths, args.max_stories), "train", args.proxy_pairs),
            labelled(read_stories(val_paths, args.max_stories), "val", args.proxy_pairs))
    else:
        def split_of(story):
            return "val" if is_val(story, args.val_fraction) else "train"
        stories = labelled(read_stories(train_paths, args.max_stories), split_of, args.proxy_pairs)
    splits = {"train": SplitWriter(folder, "train", args.max_pairs),
              "val": SplitWriter(folder, "val", args.max_val_pairs)}
    try:
        write_splits(stories, splits, enc, args.num_proc)
        for name, split in splits.items():
            if split.tokens == 0:
                raise DataError(f"the {name} split is empty: give --val_input, or a larger "
                                "--val_fraction/input so that both splits get stories")
    except BaseException:
        for split in splits.values():
            split.discard()
        raise
    for split in splits.values():
        split.commit()
    query = "summary"
    if args.proxy_pairs:
        query = "middle sentence (--proxy_pairs) where a story has no summary"
    meta = {"encoding": "gpt2", "vocab_size": enc.n_vocab, "eot_token": enc.eot_token,
            "dtype": "uint16",
            "tokens": {n: s.tokens for n, s in splits.items()},
            "stories": {n: s.stories for n, s in splits.items()},
            "pairs": {n: s.n_pairs for n, s in splits.items()}, "pairs_query": query,
            "sources": [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256(p)}
                        for p in train_paths + val_paths],
            "settings": settings}
    with AtomicFile(folder / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
    return splits


OUTPUTS = ("train.bin", "val.bin", "pairs_train.jsonl", "pairs_val.jsonl")  # and meta.json, last


def swap_in(build, out_dir):
    """Move the complete folder build's files over out_dir's (other files there stay), meta.json
    last and Ctrl-C held off meanwhile: out_dir never holds a meta.json beside shards it does not
    describe. (Only a SIGKILL within these renames can leave it without meta.json: then it says
    so.)"""
    out_dir.mkdir(parents=True, exist_ok=True)
    with signals_held():
        (out_dir / "meta.json").unlink(missing_ok=True)
        for name in OUTPUTS:
            if (build / name).exists():
                os.replace(build / name, out_dir / name)
            else:  # no pairs this time: the old ones belong to the old data
                (out_dir / name).unlink(missing_ok=True)
        os.replace(build / "meta.json", out_dir / "meta.json")
    build.rmdir()


@contextlib.contextmanager
def signals_held():
    """Ctrl-C (SIGINT) and SIGTERM wait until the block is done."""
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--input", nargs="+",
                   help="local files (.txt, .jsonl, .json, optionally .gz/.xz) instead of "
                        "downloading")
    p.add_argument("--val_input", nargs="+",
                   help="local validation files; without them --val_fraction of --input is held "
                        "out")
    p.add_argument("--val_fraction", type=fraction, default=0.02,
                   help="share of stories held out for val when there is no val input")
    p.add_argument("--max_stories", type=positive_int,
                   help="use only the first N stories of the train (and of the val) input")
    p.add_argument("--vocab_size", type=positive_int,
                   help="cut GPT-2's BPE to this many tokens (e.g. 4096, as in the paper)")
    p.add_argument("--max_pairs", type=nonneg_int, default=200_000,
                   help="summary/story pairs kept for pairs_train.jsonl")
    p.add_argument("--max_val_pairs", type=nonneg_int, default=10_000,
                   help="pairs kept for pairs_val.jsonl")
    p.add_argument("--proxy_pairs", action="store_true",
                   help="stories without a summary get their middle sentence as the query: a "
                        "stand-in retrieval task for text that has no summaries (the shared "
                        "sample, your own stories)")
    p.add_argument("--out_dir", default="data/tinystories")
    p.add_argument("--download_dir", default="data/download",
                   help="where downloads are kept (and resumed)")
    p.add_argument("--num_proc", type=positive_int, default=os.cpu_count(),
                   help="tokenizer threads")
    p.add_argument("--force", action="store_true",
                   help="redo even if out_dir already holds this result")
    return p.parse_args(argv)


def main(argv=None):
    run("data_prep.py", prepare, parse_args(argv))


if __name__ == "__main__":
    main()
