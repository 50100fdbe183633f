"""
Summary-to-story retrieval with embeddings from a trained generative model (the paper's second claim).

    python retrieve.py embed --ckpt out-mixer/ckpt.pt --pairs data/tinystories/pairs_val.jsonl --out emb_val.npz
    python retrieve.py eval --emb emb_val.npz --bm25               # raw embeddings (cosine) and BM25
    python retrieve.py train --method mixer --emb emb_train.npz --out retrieval.pt   # paper v1
    python retrieve.py eval --emb emb_val.npz --model retrieval.pt
    python retrieve.py train --method infonce --ckpt out-mixer/ckpt.pt --pairs data/tinystories/pairs_train.jsonl \\
        --out out-mixer-infonce/ckpt.pt                            # paper v2+: fine-tune the model itself
    python retrieve.py index --ckpt out-mixer/ckpt.pt --stories data/tinystories/pairs_val.jsonl --out index.npz
    python retrieve.py search --ckpt out-mixer/ckpt.pt --index index.npz --query "a dog finds a lost ball" -k 5

An embedding is Model.embed: the mean of the final hidden states over a text (--pool mean, default),
or the state at its last token (--pool last; see mixer.py). A text longer than the context is
embedded by --long: its last window (default), its first, or the mean of all its windows. Pairs are
jsonl lines {"summary": ..., "story": ...}, as data_prep.py writes them.
"""
import argparse
import dataclasses
import hashlib
import json
import re
import shlex
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import (COLOURS, AtomicFile, HelpFormatter, Progress, UserError, machine, mean_and_range, nonneg_float,
                 nonneg_int, positive_float, positive_int, pyplot, run, unit_interval)
from compare import ranking
from data_prep import check_inputs, load_encoding, read_stories
from mixer import Block, Config
from train import (Schedule, add_dtype_flag, atomic_save, autocast, load_checkpoint, load_model, make_optimizer,
                   mixed_precision, pick_device, train_step)


# Defaults of retrieve.py train (and compare's --steps), per method: InfoNCE's lr is the best of the
# mixer and of the transformer on validation pairs (RESULTS.md section 4)
DEFAULT_LR = {"infonce": 3e-3, "mixer": 1e-3}
DEFAULT_STEPS = {"infonce": 300, "mixer": 2000}


class RetrievalError(UserError):
    """Bad retrieval input: missing or mismatched pairs, embeddings, index or retrieval model."""


# ---------------------------------------------------------------------------------------- embedding

def read_pairs(path):
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"pairs file not found: {path} (data_prep.py writes pairs_train/val.jsonl "
                             "when its input has summaries)")
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
        except json.JSONDecodeError as e:
            raise RetrievalError(f"{path}: line {n} is not JSON ({e})") from None
        if not (isinstance(pair, dict) and isinstance(pair.get("summary"), str) and isinstance(pair.get("story"), str)):
            raise RetrievalError(f"{path}: line {n} needs string fields \"summary\" and \"story\"")
        pairs.append(pair)
    if not pairs:
        raise RetrievalError(f"{path}: no pairs (empty file)")
    return pairs


def fingerprint(model):
    """Identifies the weights an embedding came from, so indexes and embeddings are not mixed up."""
    return hashlib.sha256(model.wte.weight.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def tokenize(texts, enc):
    """Token ids of each text (an empty text becomes one <|endoftext|>)."""
    return [enc.encode_ordinary(text) or [enc.eot_token] for text in texts]


def texts_of(pairs, enc):
    """(summary token ids, story token ids) of pairs."""
    return tokenize([p["summary"] for p in pairs], enc), tokenize([p["story"] for p in pairs], enc)


def sentences_of(pairs, enc):
    """Token ids of each story's sentences (the queries of --crop)."""
    return [tokenize(re.split(r"(?<=[.!?])\s+", p["story"].strip()), enc) for p in pairs]


def windows(ids, block_size, long):
    """The pieces of a token list that get embedded: the list itself when it fits the context; else
    its first block_size tokens (long="first"), its last (long="last"), or every consecutive
    block_size window (long="mean", pooled by embed_texts)."""
    if len(ids) <= block_size:
        return [ids]
    if long == "first":
        return [ids[:block_size]]
    if long == "last":
        return [ids[-block_size:]]
    return [ids[i : i + block_size] for i in range(0, len(ids), block_size)]


def padded(ids, device):
    """Right-padded batch [B, L] and lengths [B]: padding cannot reach a causal model's last real token."""
    lengths = torch.tensor([len(t) for t in ids])
    batch = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for row, t in enumerate(ids):
        batch[row, : len(t)] = torch.tensor(t)
    return batch.to(device), lengths.to(device)


def embed_batch(model, texts, long, device, pool="last"):
    """[len(texts), n_embd] embeddings of token lists (differentiable: InfoNCE trains through it).
    long="mean" embeds every window of a text (see windows) and averages their unit-length
    embeddings; "first" and "last" embed one window."""
    pieces = [(text, w) for text, t in enumerate(texts) for w in windows(t, model.config.block_size, long)]
    emb = model.embed(*padded([w for _, w in pieces], device), pool=pool)  # [pieces, d]
    if long != "mean":
        return emb
    owner = torch.tensor([text for text, _ in pieces], device=device)
    pooled = torch.zeros(len(texts), emb.size(1), device=device).index_add(0, owner, F.normalize(emb, dim=-1))
    return pooled / torch.bincount(owner, minlength=len(texts)).unsqueeze(1)


@torch.no_grad()
def embed_texts(model, ids, long, batch_size, device, label=None, pool="last"):
    """[N, n_embd] float32 embeddings of token lists, batch_size texts at a time in order of length
    (little padding), with a progress line unless label is None."""
    longer = sum(len(t) > model.config.block_size for t in ids)
    if longer and label:
        print(f"{label}: {longer:,} of {len(ids):,} texts are longer than block_size {model.config.block_size}; "
              f"--long {long}: " + {"first": "their first window is embedded", "last": "their last window is embedded",
                                     "mean": "the mean of all their windows"}[long])
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = np.empty((len(ids), model.config.n_embd), dtype=np.float32)
    start, progress = time.time(), Progress()
    for first in range(0, len(ids), batch_size):
        rows = order[first : first + batch_size]
        out[rows] = embed_batch(model, [ids[i] for i in rows], long, device, pool).float().cpu().numpy()
        if label:
            progress.update(f"{label}: {first + len(rows):,}/{len(ids):,} ({time.time() - start:.0f}s)")
    if label:
        progress.done(f"{label}: {len(ids):,} texts in {time.time() - start:.1f}s")
    return out


def flat(ids):
    """Token lists as one array and offsets (an .npz holds no ragged arrays)."""
    return np.concatenate([np.asarray(t, dtype=np.int64) for t in ids]), np.cumsum([0] + [len(t) for t in ids])


def unflat(tokens, offsets):
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def load(ckpt, device):
    model, meta = load_model(ckpt, device)
    return model, load_encoding(meta)


def cmd_embed(args):
    device = pick_device(args.device)
    model, enc = load(args.ckpt, device)
    pairs = read_pairs(args.pairs)
    arrays = {}
    for field in ("summary", "story"):
        ids = tokenize([p[field] for p in pairs], enc)
        with autocast(device, args.dtype)[0]:
            arrays[field] = embed_texts(model, ids, args.long, args.batch_size, device, f"embedding {field} texts",
                                        args.pool)
        arrays[f"{field}_ids"], arrays[f"{field}_offsets"] = flat(ids)  # whole texts, for eval --bm25
    save_npz(args.out, **arrays, long=args.long, pool=args.pool, fingerprint=fingerprint(model))
    print(f"wrote {args.out}: {len(pairs):,} pairs, {model.config.n_embd}-dim")


def read_npz(path, needs, made_by, optional=()):
    """The arrays `needs` (and those of `optional` that it has) of an .npz written by `made_by`, as
    numpy arrays; every failure to read one is a RetrievalError that says how to make it again."""
    if not Path(path).is_file():
        raise RetrievalError(f"not found: {path} (make it with: {made_by})")
    try:
        with np.load(path) as f:
            missing = [name for name in needs if name not in f.files]
            if missing:
                raise RetrievalError(f"{path} has no {', '.join(missing)} array: not made by {made_by}")
            return {name: f[name] for name in (*needs, *optional) if name in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise RetrievalError(f"{path} is not a readable .npz ({str(e)[:100]}): make it again with {made_by}") from None


def load_embeddings(path):
    arrays = read_npz(path, ("summary", "story"), "retrieve.py embed")
    return torch.from_numpy(arrays["summary"]), torch.from_numpy(arrays["story"])


# ---------------------------------------------------------------------------------------- evaluation

def candidate_sets(n_pairs, n_candidates, seed, chunk=1024):
    """[Q, N] story indices per query (query q's true story is q) and the column holding it. The
    N - 1 others are distinct, drawn with a fixed seed; the true story sits at a random column."""
    g = torch.Generator().manual_seed(seed)
    others = torch.cat([torch.rand(min(chunk, n_pairs - i), n_pairs - 1, generator=g).topk(n_candidates - 1).indices
                        for i in range(0, n_pairs, chunk)])  # [Q, N - 1], indices into the other stories
    queries = torch.arange(n_pairs)
    others += (others >= queries.unsqueeze(1)).long()  # skip the true story's own index
    cands = torch.cat([others, queries.unsqueeze(1)], dim=1)  # true story in the last column...
    true_col = torch.randint(0, n_candidates, (n_pairs,), generator=g)
    cands[queries, -1] = cands[queries, true_col]  # ...swapped into a random one
    cands[queries, true_col] = queries
    return cands, true_col


def rank_metrics(scores, true_col):
    """scores [Q, N] -> top-1, top-5, mean reciprocal rank of the true column (ties count against it)."""
    true_score = scores.gather(1, true_col.unsqueeze(1))
    rank = (scores >= true_score).sum(dim=1) - 1  # 0 = best
    return {"top1": (rank == 0).float().mean().item(), "top5": (rank < 5).float().mean().item(),
            "mrr": (1.0 / (rank + 1).float()).mean().item()}


def cosine_scores(summaries, stories, cands, chunk=512):
    q, s = F.normalize(summaries, dim=-1), F.normalize(stories, dim=-1)
    return torch.cat([(q[i : i + chunk].unsqueeze(1) * s[cands[i : i + chunk]]).sum(-1)
                      for i in range(0, len(q), chunk)])


@torch.no_grad()
def mixer_scores(model, summaries, stories, cands, chunk=256):
    return torch.cat([model(slots(summaries[i : i + chunk], stories, cands[i : i + chunk]))
                      for i in range(0, len(summaries), chunk)])


def bm25_scores(query_ids, story_ids, cands, k1=1.2, b=0.75, chunk=256):
    """Okapi BM25 of each query's candidate stories [Q, N]: word overlap weighted by rarity, on the
    same tokens the models read. The stories of the file are the corpus (document frequencies)."""
    n_docs, vocab = len(story_ids), 1 + max(int(t.max()) for t in story_ids + query_ids)
    doc = torch.from_numpy(np.repeat(np.arange(n_docs), [len(t) for t in story_ids]))
    term = torch.from_numpy(np.concatenate(story_ids))
    tf = torch.sparse_coo_tensor(torch.stack([doc, term]), torch.ones(len(term)), (n_docs, vocab),
                                 check_invariants=True).coalesce()
    (doc, term), count = tf.indices(), tf.values()  # one entry per (story, token): how often it occurs
    df = torch.bincount(term, minlength=vocab).float()  # stories that contain each token
    idf = torch.log((n_docs - df + 0.5) / (df + 0.5) + 1)
    length = torch.tensor([len(t) for t in story_ids], dtype=torch.float)
    weight = idf[term] * count * (k1 + 1) / (count + k1 * (1 - b + b * length[doc] / length.mean()))
    story_weights = torch.sparse_coo_tensor(torch.stack([doc, term]), weight, (n_docs, vocab),
                                            check_invariants=True)  # [D, V]
    scores = []
    for i in range(0, len(query_ids), chunk):
        queries = torch.zeros(min(chunk, len(query_ids) - i), vocab)  # [c, V]: each query's token counts
        for row, ids in enumerate(query_ids[i : i + chunk]):
            queries[row].index_add_(0, torch.from_numpy(ids), torch.ones(len(ids)))
        all_stories = torch.sparse.mm(story_weights, queries.T).T  # [c, D]
        scores.append(all_stories.gather(1, cands[i : i + chunk]))
    return torch.cat(scores)


def candidate_counts(n_pairs):
    """32, 64, ... up to the number of held-out pairs (the paper: 32 .. 8192)."""
    counts = [n for n in (2**k for k in range(5, 30)) if n <= n_pairs]
    return counts or [n_pairs]


def scorers(args, arrays):
    """(name, candidate counts, scores(cands)) for each row of the eval table."""
    summaries, stories = torch.from_numpy(arrays["summary"]), torch.from_numpy(arrays["story"])
    counts = candidate_counts(len(stories))
    if args.model:
        model = load_retrieval_model(args.model, summaries.size(1))
        if model.candidates > len(stories):
            raise RetrievalError(f"the retrieval model compares {model.candidates} candidates but {args.emb} has only "
                                 f"{len(stories)} pairs")
        yield f"retrieval mixer {args.model}", [model.candidates], lambda c: mixer_scores(model, summaries, stories, c)
    else:
        yield f"cosine, {args.emb}", counts, lambda c: cosine_scores(summaries, stories, c)
    if args.bm25:
        query_ids, story_ids = unflat(arrays["summary_ids"], arrays["summary_offsets"]), \
            unflat(arrays["story_ids"], arrays["story_offsets"])
        yield "BM25 (word overlap, same tokens)", counts, lambda c: bm25_scores(query_ids, story_ids, c)


def cmd_eval(args):
    needs = ("summary", "story") + (("summary_ids", "summary_offsets", "story_ids", "story_offsets") if args.bm25 else ())
    arrays = read_npz(args.emb, needs, "retrieve.py embed")
    rows = list(scorers(args, arrays))
    counts = candidate_counts(len(arrays["story"]))
    print(f"{len(arrays['story']):,} held-out pairs; top-1 (top-5) of the true story among N candidates, "
          "chance 1/N")
    print("| scorer | " + " | ".join(f"N = {n}" for n in counts) + " |\n|---|" + "---|" * len(counts))
    results = []
    for name, scored_counts, score in rows:
        cells = []
        for n in counts:
            if n not in scored_counts:
                cells.append("-")
                continue
            cands, true_col = candidate_sets(len(arrays["story"]), n, args.seed)
            m = rank_metrics(score(cands), true_col)
            cells.append(f"{m['top1']:.1%} ({m['top5']:.1%})")
            results.append({"scorer": name, "n": n, **m})
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        for r in results:
            print(json.dumps(r))


# ---------------------------------------------------------------------------------------- retrieval mixer (v1)

class RetrievalMixer(nn.Module):
    """Paper v1: a small bidirectional mixer over the slots [query, candidate_1 .. candidate_N]
    (embeddings from the frozen generative model); one score per candidate. The slots are mixed by
    mixer.py's block with an unmasked mixing matrix.

    Init: every candidate slot starts with the query mixed in (W[i, 0] = 1 besides mixer.py's W = I),
    so each block's MLP sees query and candidate together from the first step. With W = I alone no
    candidate sees the query, the gradient that would teach it to look is about zero, and the model
    sat at chance (loss ln 32) on real embeddings: it could not even memorise 500 training pairs.
    With this init it memorises them (99% train top-1) and on 6.7k proxy pairs reaches the held-out
    top-1 of a bilinear probe (measured: README, Retrieval).
    """

    def __init__(self, d_in, candidates, width=256, n_layer=2):
        super().__init__()
        self.candidates = candidates
        self.config = Config(arch="mixer", block_size=candidates + 1, n_embd=width, n_layer=n_layer, causal=False)
        self.proj_in = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(Block(self.config) for _ in range(n_layer))
        with torch.no_grad():
            for block in self.blocks:
                block.mix.weight[:, 1:, 0] = 1.0  # slot 0 is the query
        self.norm = nn.RMSNorm(width)
        self.score = nn.Linear(width, 1)

    def forward(self, slots):  # [B, 1 + N, d_in] -> [B, N]
        x = self.proj_in(slots)
        for block in self.blocks:
            x = block(x)
        return self.score(self.norm(x[:, 1:])).squeeze(-1)


def slots(summaries, stories, cands):
    return torch.cat([summaries.unsqueeze(1), stories[cands]], dim=1)  # [B, 1 + N, d]


def load_retrieval_model(path, d_in):
    saved = load_checkpoint(path, needs=("model", "d_in", "candidates", "width", "n_layer"))
    if saved["d_in"] != d_in:
        raise RetrievalError(f"{path} was trained on {saved['d_in']}-dim embeddings, these are {d_in}-dim: "
                             "checkpoint mismatch (embed with the checkpoint it was trained for)")
    model = RetrievalMixer(saved["d_in"], saved["candidates"], saved["width"], saved["n_layer"])
    model.load_state_dict(saved["model"])
    return model.eval()


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a retrieval model trains: InfoNCE fine-tuning of the language model (method "infonce", the
    paper's v2+) or the v1 retrieval mixer on frozen embeddings (method "mixer"). The flags of
    retrieve.py train, whose defaults are measured (README, Retrieval)."""
    method: str
    lr: float
    steps: int
    warmup_iters: int
    weight_decay: float
    seed: int
    dtype: str = "auto"
    log_interval: int = 100
    group: int = 32            # infonce: pairs per group (in-batch negatives)
    temperature: float = 0.02  # infonce
    long: str = "last"         # infonce: how texts longer than the context are embedded
    pool: str = "mean"         # infonce: the mean of the final states over the text, or the last one (Model.embed)
    crop: float = 0.0          # infonce: the share of queries that are a random sentence of their story
    batch_size: int = 32       # mixer: queries per step
    candidates: int = 32       # mixer: candidates per query
    width: int = 256           # mixer
    n_layer: int = 2           # mixer

    @classmethod
    def of(cls, args, **changes):
        """The recipe of retrieve.py's flags (args), with changes."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in changes}, **changes)


def train_retrieval_mixer(summaries, stories, recipe):
    """A v1 retrieval mixer trained on frozen embeddings [n, d] of matching summaries and stories."""
    n = len(stories)
    if n <= recipe.candidates:
        raise RetrievalError(f"{n} training pairs: need more than --candidates {recipe.candidates}")
    torch.manual_seed(recipe.seed)
    model = RetrievalMixer(summaries.size(1), recipe.candidates, recipe.width, recipe.n_layer)
    g = torch.Generator().manual_seed(recipe.seed)

    def next_loss():
        queries = torch.randint(0, n, (recipe.batch_size,), generator=g)
        # fresh negatives every step: candidates drawn among all stories, the true one at a random slot
        cands = torch.randint(0, n - 1, (recipe.batch_size, recipe.candidates), generator=g)
        cands = cands + (cands >= queries.unsqueeze(1)).long()
        true_col = torch.randint(0, recipe.candidates, (recipe.batch_size,), generator=g)
        cands[torch.arange(recipe.batch_size), true_col] = queries
        return F.cross_entropy(model(slots(summaries[queries], stories, cands)), true_col)

    fit(model, next_loss, recipe, torch.device("cpu"), chance=np.log(recipe.candidates))
    return model


def fit(model, next_loss, recipe, device, chance):
    """Train model for recipe.steps steps through train.py's optimizer, schedule and step (warmup,
    then cosine decay; clipping; the fp16 loss scaler), printing the loss every log_interval steps."""
    optimizer = make_optimizer(model, recipe.lr, recipe.weight_decay, device)
    schedule = Schedule(recipe.lr, recipe.warmup_iters)
    ctx, scaler, _ = mixed_precision(device, recipe.dtype)
    for step in range(recipe.steps):
        lr = schedule.lr_at(step / recipe.steps, step, recipe.warmup_iters / recipe.steps)
        loss = train_step(optimizer, scaler, next_loss, lr, ctx)
        if (step + 1) % recipe.log_interval == 0 or step + 1 == recipe.steps:
            print(f"step {step + 1}: loss {loss.item():.4f} (chance {chance:.4f}), lr {lr:.2e}", flush=True)


# ---------------------------------------------------------------------------------------- InfoNCE (v2+)

def infonce_loss(queries, stories, temperature):
    """Symmetric InfoNCE over a group of pairs: [G, d] query and story embeddings, query i matching
    story i. Scores are cosine similarities divided by the temperature, in float32 even under
    autocast (1 / 0.02 = 50 times a bf16 cosine would keep only two significant digits)."""
    with torch.autocast(queries.device.type, enabled=False):
        q, s = F.normalize(queries.float(), dim=-1), F.normalize(stories.float(), dim=-1)
        logits = q @ s.T / temperature  # [G, G]; the matching pairs are on the diagonal
        target = torch.arange(len(q), device=q.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def fine_tune(model, summaries, stories, recipe, device, sentences=None):
    """InfoNCE fine-tuning of a language model (in place) on token ids of matching summaries and
    stories: a summary's embedding should be closest (cosine) to its own story's among the
    recipe.group stories of its group. With recipe.crop, that share of the queries is a random
    sentence of the story instead (sentences: token ids of each story's sentences), as Contriever's
    cropping makes queries from the documents themselves: more pairs from the same stories."""
    if len(summaries) < recipe.group:
        raise RetrievalError(f"{len(summaries)} pairs: need at least --group {recipe.group}")
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    model.train()

    def query(i):
        return sentences[i][rng.integers(len(sentences[i]))] if rng.random() < recipe.crop else summaries[i]

    def next_loss():  # texts longer than the context are embedded as eval will embed them (--long)
        group = torch.randperm(len(summaries))[: recipe.group].tolist()
        return infonce_loss(embed_batch(model, [query(i) for i in group], recipe.long, device, recipe.pool),
                            embed_batch(model, [stories[i] for i in group], recipe.long, device, recipe.pool),
                            recipe.temperature)

    fit(model, next_loss, recipe, device, chance=np.log(recipe.group))
    return model.eval()


def train_infonce(args):
    """retrieve.py train --method infonce: fine-tune --ckpt on --pairs, save it as a checkpoint."""
    device = pick_device(args.device)
    model, meta = load_model(args.ckpt, device)
    enc = load_encoding(meta)
    pairs = read_pairs(args.pairs)
    print(f"fine-tuning {model.config.arch} on {len(pairs):,} pairs, device {device}, "
          f"{mixed_precision(device, args.dtype)[2]}")
    fine_tune(model, *texts_of(pairs, enc), Recipe.of(args), device, sentences_of(pairs, enc) if args.crop else None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"model": model.state_dict(), "config": dataclasses.asdict(model.config),
                 "data_meta": meta}, args.out)
    print(f"wrote {args.out} (embed with it: retrieve.py embed --ckpt {args.out} ...)")


def cmd_train(args):
    args.lr, args.steps = args.lr or DEFAULT_LR[args.method], args.steps or DEFAULT_STEPS[args.method]
    if args.method == "infonce":
        if not (args.ckpt and args.pairs):
            raise RetrievalError("--method infonce fine-tunes a generative model: give --ckpt and --pairs")
        return train_infonce(args)
    if not args.emb:
        raise RetrievalError("--method mixer trains on frozen embeddings: give --emb (from retrieve.py embed)")
    summaries, stories = load_embeddings(args.emb)
    model = train_retrieval_mixer(summaries, stories, Recipe.of(args))
    atomic_save({"model": model.state_dict(), "d_in": summaries.size(1), "candidates": args.candidates,
                 "width": args.width, "n_layer": args.n_layer}, args.out)
    print(f"wrote {args.out}")


# ---------------------------------------------------------------------------------------- compare

def variant_of(config):
    """The cli.VARIANTS name of a model config: its arch, or "toeplitz"."""
    return "toeplitz" if config["arch"] == "mixer" and config.get("mixing") == "toeplitz" else config["arch"]


def language_models(paths):
    """({variant: [(LM seed, checkpoint path), ...] in seed order}, the data meta they share). The
    first checkpoint of each variant is its selection model: the learning rates are chosen on it."""
    found, metas = {}, set()
    for path in paths:
        ckpt = load_checkpoint(path, needs=("config", "data_meta", "train_args"))
        found.setdefault(variant_of(ckpt["config"]), []).append((ckpt["train_args"]["seed"], str(path)))
        metas.add(json.dumps(ckpt["data_meta"], sort_keys=True))
    if len(metas) > 1:
        raise RetrievalError("the checkpoints were trained on different data (their data meta differ): compare "
                             "the models of one language-model comparison")
    return {variant: sorted(runs) for variant, runs in found.items()}, json.loads(metas.pop())


def retrieval_data(args, enc):
    """Token ids (summaries, stories) of three splits: fit and val from --pairs (val: --val_pairs of
    them, drawn with a fixed seed; it chooses the learning rates) and --held_out (reported only)."""
    pairs, held_out = read_pairs(args.pairs), read_pairs(args.held_out)
    if len(pairs) < 2 * args.val_pairs:
        raise RetrievalError(f"{args.pairs} has {len(pairs)} pairs: too few to hold out --val_pairs {args.val_pairs}")
    order = np.random.default_rng(0).permutation(len(pairs))
    fit_pairs = [pairs[i] for i in order[args.val_pairs:]]
    return {"fit": texts_of(fit_pairs, enc), "fit_sentences": sentences_of(fit_pairs, enc) if args.crop else None,
            "val": texts_of([pairs[i] for i in order[: args.val_pairs]], enc), "held_out": texts_of(held_out, enc)}


def frozen_embeddings(model, texts, args, device):
    """Embeddings [n, d] (float32) of (summary ids, story ids) by a model that is not trained further."""
    with autocast(device, args.dtype)[0]:
        return tuple(torch.from_numpy(embed_texts(model, ids, args.long, args.batch_size, device, pool=args.pool))
                     for ids in texts)


UNTRAINED = {}  # frozen_embeddings of a language model as it was saved: the same every time, so made once


def untrained_embeddings(path, model, data, split, args, device):
    key = (path, split, args.pool, args.long, args.dtype)
    if key not in UNTRAINED:
        UNTRAINED[key] = frozen_embeddings(model, data[split], args, device)
    return UNTRAINED[key]


def metrics_by_n(score, n_pairs, counts, seed):
    """{N: rank metrics} of score (candidate sets [Q, N] -> scores) on the fixed candidate sets of each N."""
    metrics = {}
    for n in counts:
        cands, true_col = candidate_sets(n_pairs, n, seed)
        metrics[str(n)] = rank_metrics(score(cands), true_col)
    return metrics


def retrieval_run(method, path, lr, seed, data, args, device):
    """Train one retrieval model from the LM at path and score it on the val and held-out pairs:
    {"val": {N: metrics}, "held_out": {N: metrics}}. infonce fine-tunes the LM and scores by cosine at
    every N; the v1 mixer scores its own number of candidates. raw: the LM as it is, by cosine."""
    model, _ = load_model(path, device)
    recipe = Recipe.of(args, method=method, lr=lr, seed=seed, steps=args.steps if method == "infonce" else args.v1_steps)
    if method == "infonce":
        fine_tune(model, *data["fit"], recipe, device, data["fit_sentences"])
    elif method == "mixer":
        retrieval_mixer = train_retrieval_mixer(*untrained_embeddings(path, model, data, "fit", args, device), recipe)
        retrieval_mixer.eval()
    results = {}
    for split in ("val", "held_out"):
        queries, stories = (frozen_embeddings(model, data[split], args, device) if method == "infonce"
                            else untrained_embeddings(path, model, data, split, args, device))
        if method == "mixer":
            counts, score = [recipe.candidates], lambda c: mixer_scores(retrieval_mixer, queries, stories, c)  # noqa: B023
        else:
            counts, score = candidate_counts(len(queries)), lambda c: cosine_scores(queries, stories, c)  # noqa: B023
        results[split] = metrics_by_n(score, len(queries), counts, args.seed)
    return results


class Runs:
    """results.jsonl in --out_dir: every finished run, one line each, keyed by all that sets its result;
    a run found there is read back, not trained again (an interrupted comparison continues)."""

    def __init__(self, args, data, device):
        self.args, self.data, self.device = args, data, device
        self.path = Path(args.out_dir) / "results.jsonl"
        self.done = [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def get(self, method, variant, lm_seed, path, lr, seed, stage):
        args = self.args
        key = {"method": method, "variant": variant, "lm_seed": lm_seed, "ckpt": path, "lr": lr, "seed": seed,
               "steps": {"infonce": args.steps, "mixer": args.v1_steps}.get(method), "pairs_file": args.pairs,
               "held_out_file": args.held_out, "val_pairs": args.val_pairs, "long": args.long, "pool": args.pool,
               "crop": args.crop,
               **{f: getattr(args, f) for f in ("warmup_iters", "weight_decay", "group", "temperature", "batch_size",
                                                "candidates", "width", "n_layer")}}
        found = next((r for r in self.done if all(r.get(k) == v for k, v in key.items())), None)
        what = f"[{stage}] {method} {variant} (LM seed {lm_seed})" + (f" lr {lr:g}" if lr else "")
        if found is None:
            print(f"{what}: training", flush=True)
            started = time.time()
            found = {**key, **retrieval_run(method, path, lr, seed, self.data, args, self.device),
                     "seconds": time.time() - started}
            with open(self.path, "a") as f:
                f.write(json.dumps(found) + "\n")
            self.done.append(found)
        print(f"{what}: val top-1 {top1_at_first(found['val']):.1%}, held-out {top1_at_first(found['held_out']):.1%}",
              flush=True)
        return found


def top1_at_first(metrics):
    """top-1 at the smallest N scored (N = 32: the comparison's headline)."""
    return metrics[min(metrics, key=int)]["top1"]


def compare_method(runs, method, lrs, models):
    """Each variant's grid on its selection LM (fine-tuning seed 0), the best lr by validation top-1
    at N = 32, then that lr on every LM of the variant with a fresh fine-tuning seed (1):
    {variant: {"grid": [runs], "best": lr, "confirmed": [runs]}}."""
    out = {}
    for variant, lms in models.items():
        grid = [runs.get(method, variant, *lms[0], lr, 0, "grid") for lr in lrs]
        best = max(grid, key=lambda r: top1_at_first(r["val"]))["lr"]
        out[variant] = {"grid": grid, "best": best,
                        "confirmed": [runs.get(method, variant, *lm, best, 1, "confirm") for lm in lms]}
    return out


def cmd_compare(args):
    device = pick_device(args.device)
    models, meta = language_models(args.ckpt)
    data = retrieval_data(args, load_encoding(meta))
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    runs = Runs(args, data, device)
    raw = {variant: [runs.get("raw", variant, *lm, None, None, "raw") for lm in lms] for variant, lms in models.items()}
    infonce = compare_method(runs, "infonce", args.lrs, models)
    v1 = compare_method(runs, "mixer", args.v1_lrs, models) if args.v1_lrs else None
    query_ids, story_ids = ([np.asarray(t) for t in texts] for texts in data["held_out"])
    n_held = len(query_ids)
    bm25 = metrics_by_n(lambda c: bm25_scores(query_ids, story_ids, c), n_held, candidate_counts(n_held), args.seed)
    write_retrieval_results(args, models, raw, infonce, v1, bm25, data)
    plot_retrieval(args, infonce, bm25)


def held_out_cell(runs, n):
    values = [r["held_out"][str(n)]["top1"] * 100 for r in runs if str(n) in r["held_out"]]
    return mean_and_range(values, ".1f") if values else "-"


def method_lines(title, result, lrs):
    """The grid (validation top-1 at the smallest N per lr), the confirmed held-out table and the verdict."""
    first = next(iter(result.values()))["confirmed"][0]["held_out"]
    counts, n = sorted(map(int, first)), min(map(int, first))  # N = 32 ...; the v1 mixer: its own candidates
    edge = lambda lr: " (edge)" if lr in (min(lrs), max(lrs)) else ""  # noqa: E731
    lines = [f"## {title}", "", f"Grid: validation top-1 (%) at N = {n} on each arch's selection LM (fine-tuning "
             "seed 0):", "", "| arch | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |",
             "|---|" + "---|" * (len(lrs) + 1)]
    for variant, r in result.items():
        cells = [f"{100 * top1_at_first(g['val']):.1f}" for g in r["grid"]]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {r['best']:g}{edge(r['best'])} |")
    lines += ["", "Held-out top-1 (%) at each arch's best lr, every LM seed fine-tuned again (seed 1), mean (min-max):", "",
              "| arch | best lr | " + " | ".join(f"N = {c}" for c in counts) + " |", "|---|---|" + "---|" * len(counts)]
    for variant, r in result.items():
        lines.append(f"| {variant} | {r['best']:g} | " + " | ".join(held_out_cell(r["confirmed"], c) for c in counts) + " |")
    verdict = {v: [top1_at_first(c["held_out"]) * 100 for c in r["confirmed"]] for v, r in result.items()}
    return lines + ["", f"Verdict at N = {n}: " + " ".join(ranking(verdict, higher_is_better=True, fmt=".1f",
                                                                  unit=" points")), ""]


def write_retrieval_results(args, models, raw, infonce, v1, bm25, data):
    counts = [int(n) for n in bm25]
    lms = "; ".join(f"{v}: " + ", ".join(path for _, path in lm) for v, lm in models.items())
    lines = ["# Retrieval, each arch at its best fine-tuning learning rate", "",
             f"`{shlex.join(['python', 'retrieve.py', *args.argv])}`", "",
             f"Machine: {machine(pick_device(args.device))}, torch {torch.__version__}. Language models: {lms}. "
             f"Pairs: {len(data['fit'][0]):,} to fit and {len(data['val'][0]):,} to choose the lr (both from "
             f"{args.pairs}), {len(data['held_out'][0]):,} held out ({args.held_out}), reported here only. InfoNCE "
             f"{args.steps} steps, group {args.group}, temperature {args.temperature:g}, --long {args.long}, "
             f"--pool {args.pool}, --crop {args.crop:g}; "
             f"warmup {args.warmup_iters}, weight decay {args.weight_decay:g}.", "",
             "Held-out top-1 (%) without training (raw embeddings, cosine) and by word overlap:", "",
             "| scorer | " + " | ".join(f"N = {n}" for n in counts) + " |", "|---|" + "---|" * len(counts),
             "| BM25 (no model) | " + " | ".join(f"{100 * bm25[str(n)]['top1']:.1f}" for n in counts) + " |"]
    lines += [f"| {v}, raw | " + " | ".join(held_out_cell(r, n) for n in counts) + " |" for v, r in raw.items()]
    lines += ["", *method_lines("InfoNCE fine-tuning (the paper's v2+)", infonce, args.lrs)]
    if v1:
        lines += method_lines(f"v1: a retrieval mixer on frozen embeddings ({args.v1_steps} steps, "
                              f"{args.candidates} candidates)", v1, args.v1_lrs)
    (Path(args.out_dir) / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot_retrieval(args, infonce, bm25):
    """results.png: held-out top-1 against N (each arch at its best lr; BM25 dashed), and the
    validation top-1 at N = 32 against the fine-tuning lr."""
    plt = pyplot("results.png", f"the numbers are in {Path(args.out_dir) / 'results.md'}")
    if plt is None:
        return
    fig, (by_n, by_lr) = plt.subplots(1, 2, figsize=(11, 4))
    counts = [int(n) for n in bm25]
    for variant, r in infonce.items():
        top1 = np.array([[c["held_out"][str(n)]["top1"] for n in counts] for c in r["confirmed"]]) * 100
        mean = top1.mean(0)
        by_n.errorbar(counts, mean, yerr=[mean - top1.min(0), top1.max(0) - mean], marker="o", capsize=3,
                      color=COLOURS[variant], label=f"{variant} (lr {r['best']:g})")
        by_lr.plot(args.lrs, [100 * top1_at_first(g["val"]) for g in r["grid"]], marker="o", color=COLOURS[variant],
                   label=variant)
    by_n.plot(counts, [100 * bm25[str(n)]["top1"] for n in counts], "k--", label="BM25")
    by_n.set(xscale="log", xlabel="candidates N", ylabel="held-out top-1 (%)", title="InfoNCE, each at its best lr")
    by_n.set_xticks(counts, [str(n) for n in counts])
    by_lr.set(xscale="log", xlabel="fine-tuning lr", ylabel="validation top-1 at N = 32 (%)", title="the grid")
    for ax in (by_n, by_lr):
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(args.out_dir) / "results.png", dpi=110)
    print(f"wrote {Path(args.out_dir) / 'results.png'}")


# ---------------------------------------------------------------------------------------- search

def save_npz(path, **arrays):
    """np.savez to path (exactly that name, atomically: cli.AtomicFile)."""
    with AtomicFile(path) as f:
        np.savez(f, **arrays)


def cmd_index(args):
    device = pick_device(args.device)
    model, enc = load(args.ckpt, device)
    stories = [story for story, _ in read_stories(check_inputs(args.stories))]
    with autocast(device, args.dtype)[0]:
        emb = embed_texts(model, tokenize(stories, enc), args.long, args.batch_size, device, "indexing stories",
                          args.pool)
    # the texts as one UTF-8 blob and offsets: compact for 100k+ stories (a numpy string array pads
    # every story to the longest one, 4 bytes a character)
    encoded = [story.encode() for story in stories]
    offsets = np.cumsum([0] + [len(b) for b in encoded])
    save_npz(args.out, embeddings=emb, text=np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets=offsets,
             fingerprint=fingerprint(model), pool=args.pool, long=args.long)
    print(f"wrote {args.out}: {len(stories):,} stories")


def cmd_search(args):
    if not args.query.strip():
        raise RetrievalError("--query is empty: give the text to search for")
    device = pick_device(args.device)
    model, enc = load(args.ckpt, device)
    index = read_npz(args.index, ("embeddings", "text", "offsets", "fingerprint"), "retrieve.py index",
                     optional=("pool",))
    if str(index["fingerprint"]) != fingerprint(model):
        raise RetrievalError(f"{args.index} was built with another checkpoint than {args.ckpt}: "
                             "checkpoint mismatch (rebuild it with retrieve.py index --ckpt ...)")
    # the query is embedded as the stories were (an index from before --pool: the last position)
    pool = str(index["pool"]) if "pool" in index else "last"
    with autocast(device, args.dtype)[0]:  # the same precision as the index was built with (the same rule)
        query = embed_texts(model, tokenize([args.query], enc), args.long, 1, device, pool=pool)  # [1, d]
    scores = F.cosine_similarity(torch.from_numpy(query), torch.from_numpy(index["embeddings"]))  # [N]
    top = scores.topk(min(args.k, len(scores)))
    text, offsets = index["text"], index["offsets"]
    for rank, (score, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        story = text[offsets[i] : offsets[i + 1]].tobytes().decode()
        shown = story if args.full else " ".join(story.split())[:100]  # one line: newlines folded
        print(f"{rank:>2}. {score:.3f}  #{i}  {shown}" + ("\n" if args.full else ""))


def recipe_flags(parser):
    """The training flags of train and compare (Recipe): optimisation, InfoNCE and the v1 mixer."""
    r = parser.add_argument_group("training (both methods: train.py's optimizer, schedule and step)")
    r.add_argument("--warmup_iters", type=nonneg_int, default=50, help="steps of linear warmup, then cosine decay")
    r.add_argument("--weight_decay", type=nonneg_float, default=0.1, help="AdamW's, on matrices (train.make_optimizer)")
    r.add_argument("--log_interval", type=positive_int, default=100)
    r.add_argument("--group", type=positive_int, default=32, help="infonce: pairs per group (in-batch negatives)")
    r.add_argument("--temperature", type=positive_float, default=0.02, help="infonce: as in the author's code")
    r.add_argument("--crop", type=unit_interval, default=0.0, help="infonce: the share of queries replaced by a random "
                                                                   "sentence of their own story (Contriever's cropping)")
    r.add_argument("--candidates", type=positive_int, default=32, help="mixer: candidates per query (chance = 1/N)")
    r.add_argument("--width", type=positive_int, default=256, help="mixer: hidden width")
    r.add_argument("--n_layer", type=positive_int, default=2, help="mixer: blocks")


def compare_flags(c):
    """The flags of retrieve.py compare."""
    c.add_argument("--ckpt", nargs="+", required=True, help="LM checkpoints, several seeds per arch (the lowest seed "
                                                            "of each arch chooses its lr)")
    c.add_argument("--pairs", required=True, help="training pairs; --val_pairs of them choose the learning rates")
    c.add_argument("--held_out", required=True, help="held-out pairs: the reported result, never used to choose")
    c.add_argument("--val_pairs", type=positive_int, default=500, help="validation pairs taken from --pairs")
    c.add_argument("--lrs", nargs="+", type=positive_float, default=[3e-4, 1e-3, 3e-3, 1e-2],
                   help="InfoNCE learning rates (the grid)")
    c.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS["infonce"], help="InfoNCE steps, every arch")
    c.add_argument("--v1_lrs", nargs="*", type=positive_float, default=[3e-4, 1e-3, 3e-3, 1e-2],
                   help="the v1 retrieval mixer's learning rates (none: skip v1)")
    c.add_argument("--v1_steps", type=positive_int, default=DEFAULT_STEPS["mixer"], help="v1 retrieval mixer steps")
    c.add_argument("--out_dir", default="out-retrieval", help="results.jsonl (resumable), results.md, results.png")
    recipe_flags(c)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False, formatter_class=HelpFormatter)
    common.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    common.add_argument("--batch_size", type=positive_int, default=32, help="texts per batch")
    add_dtype_flag(common)  # embed, index, search and train --method infonce
    common.add_argument("--seed", type=int, default=1337, help="for candidate sets and training")
    common.add_argument("--long", choices=["first", "last", "mean"], default="last",
                        help="texts longer than the context: embed the first window, the last, or the mean of all")
    common.add_argument("--pool", choices=["last", "mean"], default="mean",
                        help="an embedding is the mean of the final states over the text's tokens, or the last "
                             "token's (search: the index's choice; mean retrieves better, RESULTS.md section 4)")

    def command(name, help):
        return sub.add_parser(name, parents=[common], help=help, description=help, formatter_class=HelpFormatter)

    e = command("embed", "embed every summary and story of a pairs file")
    e.add_argument("--ckpt", required=True, help="a checkpoint from train.py (or from train --method infonce)")
    e.add_argument("--pairs", required=True, help="jsonl with summary and story fields")
    e.add_argument("--out", required=True, help="embeddings .npz to write")

    t = command("train", "train a retrieval mixer (v1) or fine-tune with InfoNCE (v2+)")
    t.add_argument("--method", choices=["mixer", "infonce"], required=True)
    t.add_argument("--emb", help="mixer: embeddings of the training pairs")
    t.add_argument("--ckpt", help="infonce: the generative model to fine-tune")
    t.add_argument("--pairs", help="infonce: the training pairs")
    t.add_argument("--out", required=True, help="mixer: retrieval model .pt; infonce: fine-tuned checkpoint .pt")
    t.add_argument("--steps", type=positive_int, help=f"default: {DEFAULT_STEPS['infonce']} for infonce, "
                                                      f"{DEFAULT_STEPS['mixer']} for mixer")
    t.add_argument("--lr", type=positive_float, help=f"default: {DEFAULT_LR['infonce']:g} for infonce, "
                                                     f"{DEFAULT_LR['mixer']:g} for mixer")
    recipe_flags(t)

    compare_flags(command("compare", "each arch's retrieval at its best fine-tuning lr: grid on validation pairs, "
                                     "held-out result"))
    v = command("eval", "top-1 and top-5 of held-out summaries among N candidates, N = 32, 64, ...")
    v.add_argument("--emb", required=True, help="embeddings of held-out pairs")
    v.add_argument("--model", help="a retrieval mixer from train --method mixer (default: cosine similarity)")
    v.add_argument("--bm25", action="store_true", help="add a row: BM25 word overlap on the same candidate sets")
    v.add_argument("--json", action="store_true", help="also one JSON object per scorer and N (top1, top5, mrr)")

    i = command("index", "embed stories once for search")
    i.add_argument("--ckpt", required=True, help="a checkpoint from train.py")
    i.add_argument("--stories", nargs="+", required=True, help="pairs .jsonl, or any data_prep.py input")
    i.add_argument("--out", required=True, help="index .npz to write")

    s = command("search", "the k stories closest to a query, one line each")
    s.add_argument("--ckpt", required=True, help="the checkpoint the index was built with")
    s.add_argument("--index", required=True, help="from retrieve.py index")
    s.add_argument("--query", required=True, help="the text to search for")
    s.add_argument("-k", type=positive_int, default=5, help="how many stories")
    s.add_argument("--full", action="store_true", help="print each story whole, not its first 100 characters")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


COMMANDS = {"embed": cmd_embed, "train": cmd_train, "compare": cmd_compare, "eval": cmd_eval, "index": cmd_index,
            "search": cmd_search}


def main(argv=None):
    args = parse_args(argv)
    run("retrieve.py", COMMANDS[args.command], args)


if __name__ == "__main__":
    main()
