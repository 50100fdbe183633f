"""
Summary-to-story retrieval with embeddings from a trained generative model (the paper's second
claim).

    python retrieve.py embed --ckpt out-mixer/ckpt.pt --pairs data/tinystories/pairs_val.jsonl \\
        --out emb_val.npz
    python retrieve.py eval --emb emb_val.npz --bm25           # raw embeddings (cosine) and BM25
    python retrieve.py train --method infonce --ckpt out-mixer/ckpt.pt \\
        --pairs data/tinystories/pairs_train.jsonl --out out-mixer-infonce/ckpt.pt    # v2+
    python retrieve.py train --method mixer --emb emb_train.npz --out retrieval.pt   # paper v1
    python retrieve.py eval --emb emb_val.npz --model retrieval.pt
    python retrieve.py index --ckpt out-mixer/ckpt.pt --stories data/tinystories/pairs_val.jsonl \\
        --out index.npz
    python retrieve.py search --ckpt out-mixer/ckpt.pt --index index.npz -k 5 \\
        --query "a dog finds a lost ball"

Each arch at its best fine-tuning lr, chosen on validation pairs: python -m experiments.retrieval.

Part 1 reads in the README's order: an embedding (Model.embed: the mean of the final states over a
text, --pool mean, or the state at its last token, --pool last; a text longer than the context by
--long: its last window, its first, or the mean of all), InfoNCE fine-tuning (the method the results
use), the v1 retrieval mixer, and the metrics they are judged by. Part 2 is the commands, file I/O
and flags. Pairs are jsonl lines {"summary": ..., "story": ...} (data_prep.py).
"""
import argparse
import dataclasses
import hashlib
import json
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import (AtomicFile, HelpFormatter, Progress, UserError, add_config_flags, add_dtype_flag,
                 atomic_save, autocast, flag, load_checkpoint, load_model, mixed_precision,
                 nonneg_float, nonneg_int, pick_device, positive_float, positive_int, run,
                 unit_interval)
from data_prep import check_inputs, load_encoding, read_stories
from mixer import Block, Config, Model
from train import Schedule, train_step

# Defaults of retrieve.py train, per method; InfoNCE's lr is every arch's best in RESULTS.md
# section 4
DEFAULT_LR = {"infonce": 3e-3, "mixer": 1e-3}
DEFAULT_STEPS = {"infonce": 300, "mixer": 2000}


class RetrievalError(UserError):
    """Bad retrieval input: missing or mismatched pairs, embeddings, index or retrieval model."""


# ---------------------------------------------------------------------------------------- embedding

def tokenize(texts, enc):
    """Token ids of each text (an empty text becomes one <|endoftext|>)."""
    return [enc.encode_ordinary(text) or [enc.eot_token] for text in texts]


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
    """Right-padded batch [B, L] and lengths [B]: padding cannot reach a causal model's last real
    token."""
    lengths = torch.tensor([len(t) for t in ids])
    batch = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for row, t in enumerate(ids):
        batch[row, : len(t)] = torch.tensor(t)
    return batch.to(device), lengths.to(device)


def embed_batch(model, texts, long, device, pool="mean"):
    """[len(texts), n_embd] embeddings of token lists (differentiable: InfoNCE trains through it).
    long="mean" embeds every window of a text (see windows) and averages their unit-length
    embeddings; "first" and "last" embed one window."""
    T = model.config.block_size
    pieces = [(text, w) for text, t in enumerate(texts) for w in windows(t, T, long)]
    emb = model.embed(*padded([w for _, w in pieces], device), pool=pool)  # [pieces, d]
    if long != "mean":
        return emb
    owner = torch.tensor([text for text, _ in pieces], device=device)
    pooled = torch.zeros(len(texts), emb.size(1), device=device)
    pooled.index_add_(0, owner, F.normalize(emb, dim=-1))
    return pooled / torch.bincount(owner, minlength=len(texts)).unsqueeze(1)


@torch.no_grad()
def embed_texts(model, ids, long, batch_size, device, label=None, pool="mean"):
    """[N, n_embd] float32 embeddings of token lists, batch_size texts at a time in order of length
    (little padding), with a progress line unless label is None."""
    longer = sum(len(t) > model.config.block_size for t in ids)
    if longer and label:
        how = {"first": "their first window is embedded", "last": "their last window is embedded",
               "mean": "the mean of all their windows"}[long]
        print(f"{label}: {longer:,} of {len(ids):,} texts are longer than block_size "
              f"{model.config.block_size}; --long {long}: {how}")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = np.empty((len(ids), model.config.n_embd), dtype=np.float32)
    start, progress = time.time(), Progress()
    for first in range(0, len(ids), batch_size):
        rows = order[first : first + batch_size]
        emb = embed_batch(model, [ids[i] for i in rows], long, device, pool)
        out[rows] = emb.float().cpu().numpy()
        if label:
            done = first + len(rows)
            progress.update(f"{label}: {done:,}/{len(ids):,} ({time.time() - start:.0f}s)")
    if label:
        progress.done(f"{label}: {len(ids):,} texts in {time.time() - start:.1f}s")
    return out


# -------------------------------------------------------------------------- training (both methods)

@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a retrieval model trains, whichever the method: train.py's schedule and step (fit) for
    `steps` steps at `lr`. Each method adds its own settings (InfoNCE, V1Mixer). The fields made by
    flag() are flags of retrieve.py train and of the retrieval comparison (README, Retrieval)."""
    lr: float
    steps: int
    seed: int
    dtype: str = "auto"
    warmup_iters: int = flag(50, nonneg_int, "steps of linear warmup, then cosine decay")
    weight_decay: float = flag(0.1, nonneg_float, "AdamW's, on matrices (Model.make_optimizer)")
    log_interval: int = flag(100, positive_int, "steps between loss lines")


def fit(model, next_loss, recipe, device, chance):
    """Train model for recipe.steps steps with train.py's schedule and step, printing the loss every
    log_interval steps beside chance, the loss of a model that has learnt nothing."""
    optimizer = model.make_optimizer(recipe.lr, recipe.weight_decay, device)
    schedule = Schedule(recipe.lr, recipe.warmup_iters)
    ctx, scaler, _ = mixed_precision(device, recipe.dtype)
    for step in range(recipe.steps):
        lr = schedule.lr_at(step / recipe.steps, step, recipe.warmup_iters / recipe.steps)
        loss = train_step(optimizer, scaler, next_loss, lr, ctx)
        if (step + 1) % recipe.log_interval == 0 or step + 1 == recipe.steps:
            print(f"step {step + 1}: loss {loss.item():.4f} (chance {chance:.4f}), lr {lr:.2e}",
                  flush=True)


# ------------------------------------------------------------------------------------ InfoNCE (v2+)

@dataclasses.dataclass(frozen=True)
class InfoNCE:
    """InfoNCE fine-tuning's own settings (the paper's v2+): how texts are embedded as eval will
    embed them (--long, --pool), the group of in-batch negatives and the temperature."""
    long: str = "last"   # texts longer than the context (--long)
    pool: str = "mean"   # the mean of the final states over the text, or the last one (--pool)
    group: int = flag(32, positive_int, "infonce: pairs per group (in-batch negatives)")
    temperature: float = flag(0.02, positive_float, "infonce: as in the author's code")
    crop: float = flag(0.0, unit_interval, "infonce: the share of queries that are a random "
                       "sentence of their story")


def infonce_loss(queries, stories, temperature):
    """Symmetric InfoNCE over a group of pairs: [G, d] query and story embeddings, query i matching
    story i. Scores are cosine similarities divided by the temperature, in float32 even under
    autocast (1 / 0.02 = 50 times a bf16 cosine would keep only two significant digits)."""
    with torch.autocast(queries.device.type, enabled=False):
        q, s = F.normalize(queries.float(), dim=-1), F.normalize(stories.float(), dim=-1)
        logits = q @ s.T / temperature  # [G, G]; the matching pairs are on the diagonal
        target = torch.arange(len(q), device=q.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def fine_tune(model, summaries, stories, recipe, infonce, device, sentences=None):
    """InfoNCE fine-tuning of a language model (in place) on token ids of matching summaries and
    stories: a summary's embedding should be closest (cosine) to its own story's among its group's.
    With infonce.crop, that share of the queries is a random sentence of the story (sentences: each
    story's), as in Contriever."""
    check_pairs(len(summaries), infonce.group, "training pairs", "--group", infonce.group)
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    model.train()

    def query(i):
        if rng.random() < infonce.crop:
            return sentences[i][rng.integers(len(sentences[i]))]
        return summaries[i]

    def embedded(texts):  # texts longer than the context: as eval will embed them (--long)
        return embed_batch(model, texts, infonce.long, device, infonce.pool)

    def next_loss():
        group = torch.randperm(len(summaries))[: infonce.group].tolist()
        queries, group_stories = [query(i) for i in group], [stories[i] for i in group]
        return infonce_loss(embedded(queries), embedded(group_stories), infonce.temperature)

    fit(model, next_loss, recipe, device, chance=np.log(infonce.group))
    return model.eval()


# --------------------------------------------------------------------------- the v1 retrieval mixer

@dataclasses.dataclass(frozen=True)
class V1Mixer:
    """The v1 retrieval mixer's own settings."""
    batch_size: int = 32  # queries per step (--batch_size)
    candidates: int = flag(32, positive_int, "mixer: candidates per query (chance = 1/N)")
    width: int = flag(256, positive_int, "mixer: hidden width")
    n_layer: int = flag(2, positive_int, "mixer: blocks")


def settings_of(cls, args, **changes):
    """A Recipe, InfoNCE or V1Mixer of retrieve.py's flags (args), with changes."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in changes]
    fields = {name: getattr(args, name) for name in names}
    return cls(**fields, **changes)


class RetrievalMixer(nn.Module):
    """Paper v1: a small bidirectional mixer over the slots [query, candidate_1 .. candidate_N]
    (embeddings from the frozen generative model); one score per candidate. The slots are mixed by
    mixer.py's block with an unmasked mixing matrix.

    Init: every candidate slot starts with the query mixed in (W[i, 0] = 1 besides mixer.py's
    W = I), so each block's MLP sees query and candidate together from the first step. With W = I
    alone no candidate sees the query, the gradient that would teach it to look is about zero, and
    the model sat at chance (loss ln 32) on real embeddings: it could not even memorise 500
    training pairs. With this init it memorises them (99% train top-1) and on 6.7k proxy pairs
    reaches the held-out top-1 of a bilinear probe.
    """

    def __init__(self, d_in, candidates, width=256, n_layer=2):
        super().__init__()
        self.candidates = candidates
        self.config = Config(arch="mixer", block_size=candidates + 1, n_embd=width, n_layer=n_layer,
                             causal=False)
        self.proj_in = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(Block(self.config) for _ in range(n_layer))
        with torch.no_grad():
            for block in self.blocks:
                block.mix.weight[:, 1:, 0] = 1.0  # slot 0 is the query
        self.norm = nn.RMSNorm(width)
        self.score = nn.Linear(width, 1)

    make_optimizer = Model.make_optimizer  # the same AdamW groups as the language models

    def forward(self, slots):  # [B, 1 + N, d_in] -> [B, N]
        x = self.proj_in(slots)
        for block in self.blocks:
            x = block(x)
        return self.score(self.norm(x[:, 1:])).squeeze(-1)


def slots(summaries, stories, cands):
    return torch.cat([summaries.unsqueeze(1), stories[cands]], dim=1)  # [B, 1 + N, d]


def train_retrieval_mixer(summaries, stories, recipe, v1):
    """A v1 retrieval mixer trained on frozen embeddings [n, d] of matching summaries and
    stories."""
    n = len(stories)
    check_pairs(n, v1.candidates + 1, "training pairs", "--candidates", v1.candidates)
    torch.manual_seed(recipe.seed)
    model = RetrievalMixer(summaries.size(1), v1.candidates, v1.width, v1.n_layer)
    g = torch.Generator().manual_seed(recipe.seed)

    def next_loss():  # fresh negatives every step
        queries = torch.randint(0, n, (v1.batch_size,), generator=g)
        cands, true_col = draw_candidates(queries, n, v1.candidates, g)
        return F.cross_entropy(model(slots(summaries[queries], stories, cands)), true_col)

    fit(model, next_loss, recipe, torch.device("cpu"), chance=np.log(v1.candidates))
    return model


# ------------------------------------------------------------------------------------------ metrics

def draw_candidates(queries, n_stories, n_candidates, generator, chunk=1024):
    """[Q, N] story indices for each query (query q's true story is queries[q]) and the column
    holding it: the negatives of training (v1) and of evaluation. The N - 1 others are distinct
    stories, drawn with generator; the true story sits at a random column."""
    Q = len(queries)
    others = torch.cat([  # [Q, N - 1], indices into the other stories
        torch.rand(min(chunk, Q - i), n_stories - 1, generator=generator).topk(n_candidates - 1)[1]
        for i in range(0, Q, chunk)])
    others += (others >= queries.unsqueeze(1)).long()  # skip the true story's own index
    cands = torch.cat([others, queries.unsqueeze(1)], dim=1)  # true story in the last column...
    true_col = torch.randint(0, n_candidates, (Q,), generator=generator)
    rows = torch.arange(Q)
    cands[rows, -1] = cands[rows, true_col]  # ...swapped into a random one
    cands[rows, true_col] = queries
    return cands, true_col


def candidate_sets(n_pairs, n_candidates, seed):
    """The fixed candidate sets of evaluation: every pair's summary is a query, drawn with a fixed
    seed."""
    generator = torch.Generator().manual_seed(seed)
    return draw_candidates(torch.arange(n_pairs), n_pairs, n_candidates, generator)


def rank_metrics(scores, true_col):
    """scores [Q, N] -> top-1, top-5, mean reciprocal rank of the true column (ties count against
    it)."""
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
    # one entry per (story, token): how often it occurs
    (doc, term), count = tf.indices(), tf.values()
    df = torch.bincount(term, minlength=vocab).float()  # stories that contain each token
    idf = torch.log((n_docs - df + 0.5) / (df + 0.5) + 1)
    length = torch.tensor([len(t) for t in story_ids], dtype=torch.float)
    weight = idf[term] * count * (k1 + 1) / (count + k1 * (1 - b + b * length[doc] / length.mean()))
    story_weights = torch.sparse_coo_tensor(torch.stack([doc, term]), weight, (n_docs, vocab),
                                            check_invariants=True)  # [D, V]
    scores = []
    for i in range(0, len(query_ids), chunk):
        queries = torch.zeros(min(chunk, len(query_ids) - i), vocab)  # [c, V]: each one's counts
        for row, ids in enumerate(query_ids[i : i + chunk]):
            queries[row].index_add_(0, torch.from_numpy(ids), torch.ones(len(ids)))
        all_stories = torch.sparse.mm(story_weights, queries.T).T  # [c, D]
        scores.append(all_stories.gather(1, cands[i : i + chunk]))
    return torch.cat(scores)


def candidate_counts(n_pairs):
    """32, 64, ... up to the number of held-out pairs (the paper: 32 .. 8192)."""
    counts = [n for n in (2**k for k in range(5, 30)) if n <= n_pairs]
    return counts or [n_pairs]


def metrics_by_n(score, n_pairs, counts, seed):
    """{N: rank metrics} of score (candidate sets [Q, N] -> scores) on the fixed candidate sets of
    each N."""
    return {str(n): rank_metrics(score(cands), true_col) for n in counts
            for cands, true_col in [candidate_sets(n_pairs, n, seed)]}


# ------------------- Part 2, which a learner may skip: the commands, files and flags

# -------------------------------------------------------------------------------------------- files

def read_pairs(path):
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"pairs file not found: {path} (data_prep.py writes "
                             "pairs_train/val.jsonl when its input has summaries)")
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
        except json.JSONDecodeError as e:
            raise RetrievalError(f"{path}: line {n} is not JSON ({e})") from None
        fields = ("summary", "story")
        if not (isinstance(pair, dict) and all(isinstance(pair.get(k), str) for k in fields)):
            raise RetrievalError(f"{path}: line {n} needs string fields \"summary\" and \"story\"")
        pairs.append(pair)
    if not pairs:
        raise RetrievalError(f"{path}: no pairs (empty file)")
    return pairs


def check_pairs(count, needed, what, flag, value):
    """A RetrievalError unless count pairs are at least needed, which flag (at value) asks for:
    one rule for every place that draws a group or a candidate set from pairs."""
    if count < needed:
        more = "more than" if needed > value else "at least"
        raise RetrievalError(f"{count} {what}: need {more} {flag} {value} (give more pairs or a "
                             f"smaller {flag})")


def texts_of(pairs, enc):
    """(summary token ids, story token ids) of pairs."""
    return tokenize([p["summary"] for p in pairs], enc), tokenize([p["story"] for p in pairs], enc)


def sentences_of(pairs, enc):
    """Token ids of each story's sentences (the queries of --crop)."""
    return [tokenize(re.split(r"(?<=[.!?])\s+", p["story"].strip()), enc) for p in pairs]


def fingerprint(model):
    """Identifies the weights an embedding came from, so indexes and embeddings are not mixed up."""
    weights = model.wte.weight.detach().float().cpu().numpy()
    return hashlib.sha256(weights.tobytes()).hexdigest()[:16]


def flat(ids):
    """Token lists as one array and offsets (an .npz holds no ragged arrays)."""
    tokens = np.concatenate([np.asarray(t, dtype=np.int64) for t in ids])
    return tokens, np.cumsum([0] + [len(t) for t in ids])


def unflat(tokens, offsets):
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def load_lm(ckpt, device):
    """(model, tokenizer, data meta) of a language-model checkpoint: the one loader of every
    command."""
    model, meta = load_model(ckpt, device)
    return model, load_encoding(meta), meta


def read_npz(path, needs, made_by, optional=()):
    """The arrays `needs` (and `optional` ones it has) of an .npz made by `made_by`; a failure says
    how to remake it."""
    if not Path(path).is_file():
        raise RetrievalError(f"not found: {path} (make it with: {made_by})")
    try:
        with np.load(path) as f:
            missing = [name for name in needs if name not in f.files]
            if missing:
                raise RetrievalError(f"{path} has no {', '.join(missing)} array: not made by "
                                     f"{made_by}")
            return {name: f[name] for name in (*needs, *optional) if name in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise RetrievalError(f"{path} is not a readable .npz ({str(e)[:100]}): make it again with "
                             f"{made_by}") from None


def save_npz(path, **arrays):
    """np.savez to path (exactly that name, atomically: cli.AtomicFile)."""
    with AtomicFile(path) as f:
        np.savez(f, **arrays)


def load_embeddings(path):
    arrays = read_npz(path, ("summary", "story"), "retrieve.py embed")
    return torch.from_numpy(arrays["summary"]), torch.from_numpy(arrays["story"])


def load_retrieval_model(path, d_in):
    saved = load_checkpoint(path, needs=("model", "d_in", "candidates", "width", "n_layer"))
    if saved["d_in"] != d_in:
        raise RetrievalError(f"{path} was trained on {saved['d_in']}-dim embeddings, these are "
                             f"{d_in}-dim: checkpoint mismatch (embed with the checkpoint it was "
                             "trained for)")
    model = RetrievalMixer(saved["d_in"], saved["candidates"], saved["width"], saved["n_layer"])
    model.load_state_dict(saved["model"])
    return model.eval()


# ------------------------------------------------------------------------------------- the commands

def cmd_embed(args):
    device = pick_device(args.device)
    model, enc, _ = load_lm(args.ckpt, device)
    pairs = read_pairs(args.pairs)
    arrays = {}
    for field in ("summary", "story"):
        ids = tokenize([p[field] for p in pairs], enc)
        with autocast(device, args.dtype)[0]:
            arrays[field] = embed_texts(model, ids, args.long, args.batch_size, device,
                                        f"embedding {field} texts", args.pool)
        arrays[f"{field}_ids"], arrays[f"{field}_offsets"] = flat(ids)  # whole texts, for --bm25
    save_npz(args.out, **arrays, long=args.long, pool=args.pool, fingerprint=fingerprint(model))
    print(f"wrote {args.out}: {len(pairs):,} pairs, {model.config.n_embd}-dim")


def scorers(args, arrays):
    """(name, candidate counts, scores(cands)) for each row of the eval table."""
    summaries, stories = torch.from_numpy(arrays["summary"]), torch.from_numpy(arrays["story"])
    counts = candidate_counts(len(stories))
    if args.model:
        model = load_retrieval_model(args.model, summaries.size(1))
        if model.candidates > len(stories):
            raise RetrievalError(f"the retrieval model compares {model.candidates} candidates but "
                                 f"{args.emb} has only {len(stories)} pairs")
        yield (f"retrieval mixer {args.model}", [model.candidates],
               lambda c: mixer_scores(model, summaries, stories, c))
    else:
        yield f"cosine, {args.emb}", counts, lambda c: cosine_scores(summaries, stories, c)
    if args.bm25:
        query_ids, story_ids = (unflat(arrays[f"{text}_ids"], arrays[f"{text}_offsets"])
                                for text in ("summary", "story"))
        yield ("BM25 (word overlap, same tokens)", counts,
               lambda c: bm25_scores(query_ids, story_ids, c))


def cmd_eval(args):
    needs = ("summary", "story")
    if args.bm25:
        needs += ("summary_ids", "summary_offsets", "story_ids", "story_offsets")
    arrays = read_npz(args.emb, needs, "retrieve.py embed")
    rows = list(scorers(args, arrays))
    counts = candidate_counts(len(arrays["story"]))
    print(f"{len(arrays['story']):,} held-out pairs; top-1 (top-5) of the true story among N "
          "candidates, chance 1/N")
    print("| scorer | " + " | ".join(f"N = {n}" for n in counts) + " |")
    print("|---|" + "---|" * len(counts))
    results = []
    for name, scored_counts, score in rows:
        metrics = metrics_by_n(score, len(arrays["story"]), scored_counts, args.seed)
        cells = [f"{m['top1']:.1%} ({m['top5']:.1%})" if (m := metrics.get(str(n))) else "-"
                 for n in counts]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        results += [{"scorer": name, "n": int(n), **m} for n, m in metrics.items()]
    if args.json:
        for r in results:
            print(json.dumps(r))


def cmd_train(args):
    recipe = settings_of(Recipe, args, lr=args.lr or DEFAULT_LR[args.method],
                         steps=args.steps or DEFAULT_STEPS[args.method])
    if args.method == "infonce":
        if not (args.ckpt and args.pairs):
            raise RetrievalError("--method infonce fine-tunes a generative model: give --ckpt and "
                                 "--pairs")
        return train_infonce(args, recipe)
    if not args.emb:
        raise RetrievalError("--method mixer trains on frozen embeddings: give --emb (from "
                             "retrieve.py embed)")
    summaries, stories = load_embeddings(args.emb)
    model = train_retrieval_mixer(summaries, stories, recipe, settings_of(V1Mixer, args))
    saved = {"model": model.state_dict(), "d_in": summaries.size(1), "candidates": args.candidates,
             "width": args.width, "n_layer": args.n_layer}
    atomic_save(saved, args.out)
    print(f"wrote {args.out}")


def train_infonce(args, recipe):
    """retrieve.py train --method infonce: fine-tune --ckpt on --pairs, save it as a checkpoint."""
    device = pick_device(args.device)
    model, enc, meta = load_lm(args.ckpt, device)
    pairs = read_pairs(args.pairs)
    print(f"fine-tuning {model.config.arch} on {len(pairs):,} pairs, device {device}, "
          f"{mixed_precision(device, args.dtype)[2]}")
    sentences = sentences_of(pairs, enc) if args.crop else None
    fine_tune(model, *texts_of(pairs, enc), recipe, settings_of(InfoNCE, args), device, sentences)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"model": model.state_dict(), "config": dataclasses.asdict(model.config),
                 "data_meta": meta}, args.out)
    print(f"wrote {args.out} (embed with it: retrieve.py embed --ckpt {args.out} ...)")


def cmd_index(args):
    device = pick_device(args.device)
    model, enc, _ = load_lm(args.ckpt, device)
    stories = [story for story, _ in read_stories(check_inputs(args.stories))]
    with autocast(device, args.dtype)[0]:
        emb = embed_texts(model, tokenize(stories, enc), args.long, args.batch_size, device,
                          "indexing stories", args.pool)
    # the texts as one UTF-8 blob and offsets: compact for 100k+ stories (a numpy string array pads
    # every story to the longest one, 4 bytes a character)
    encoded = [story.encode() for story in stories]
    offsets = np.cumsum([0] + [len(b) for b in encoded])
    text = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    save_npz(args.out, embeddings=emb, text=text, offsets=offsets, fingerprint=fingerprint(model),
             pool=args.pool, long=args.long)
    print(f"wrote {args.out}: {len(stories):,} stories")


def cmd_search(args):
    if not args.query.strip():
        raise RetrievalError("--query is empty: give the text to search for")
    device = pick_device(args.device)
    model, enc, _ = load_lm(args.ckpt, device)
    needs = ("embeddings", "text", "offsets", "fingerprint")
    index = read_npz(args.index, needs, "retrieve.py index", optional=("pool",))
    if str(index["fingerprint"]) != fingerprint(model):
        raise RetrievalError(f"{args.index} was built with another checkpoint than {args.ckpt}: "
                             "checkpoint mismatch (rebuild it with retrieve.py index --ckpt ...)")
    # the query is embedded as the stories were (an index from before --pool: the last position)
    pool = str(index["pool"]) if "pool" in index else "last"
    with autocast(device, args.dtype)[0]:  # the precision the index was built in (the same rule)
        query = embed_texts(model, tokenize([args.query], enc), args.long, 1, device, pool=pool)
    query, stories = torch.from_numpy(query), torch.from_numpy(index["embeddings"])  # [1 | N, d]
    scores = F.cosine_similarity(query, stories)  # [N]
    top = scores.topk(min(args.k, len(scores)))
    text, offsets = index["text"], index["offsets"]
    for rank, (score, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        story = text[offsets[i] : offsets[i + 1]].tobytes().decode()
        shown = story if args.full else " ".join(story.split())[:100]  # one line: newlines folded
        print(f"{rank:>2}. {score:.3f}  #{i}  {shown}" + ("\n" if args.full else ""))


# -------------------------------------------------------------------------------------------- flags

def recipe_flags(parser):
    """The training flags of train and of the retrieval comparison: the fields made by flag() of
    Recipe (both methods), InfoNCE and V1Mixer."""
    add_config_flags(parser, Recipe, "training (both methods: train.py's schedule and step)",
                     set_defaults=True)
    add_config_flags(parser, InfoNCE, "InfoNCE (--method infonce)", set_defaults=True)
    add_config_flags(parser, V1Mixer, "the v1 retrieval mixer (--method mixer)", set_defaults=True)


def common_flags(parser):
    """The flags of every command (and of the retrieval comparison): device, precision, seeds,
    embedding."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="texts per batch")
    add_dtype_flag(parser)  # embed, index, search and train --method infonce
    parser.add_argument("--seed", type=int, default=1337, help="for candidate sets and training")
    parser.add_argument("--long", choices=["first", "last", "mean"], default="last",
                        help="texts longer than the context: embed the first window, the last, or "
                             "the mean of all")
    parser.add_argument("--pool", choices=["mean", "last"], default="mean",
                        help="the mean of the final states, or the last one (search: the index's; "
                             "mean retrieves better, RESULTS.md section 4)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False, formatter_class=HelpFormatter)
    common_flags(common)

    def command(name, help):
        return sub.add_parser(name, parents=[common], help=help, description=help,
                              formatter_class=HelpFormatter)

    e = command("embed", "embed every summary and story of a pairs file")
    e.add_argument("--ckpt", required=True,
                   help="a checkpoint from train.py (or from train --method infonce)")
    e.add_argument("--pairs", required=True, help="jsonl with summary and story fields")
    e.add_argument("--out", required=True, help="embeddings .npz to write")

    t = command("train", "train a retrieval mixer (v1) or fine-tune with InfoNCE (v2+)")
    t.add_argument("--method", choices=["mixer", "infonce"], required=True)
    t.add_argument("--emb", help="mixer: embeddings of the training pairs")
    t.add_argument("--ckpt", help="infonce: the generative model to fine-tune")
    t.add_argument("--pairs", help="infonce: the training pairs")
    t.add_argument("--out", required=True,
                   help="mixer: retrieval model .pt; infonce: fine-tuned checkpoint .pt")
    t.add_argument("--steps", type=positive_int, help=f"default by method: {DEFAULT_STEPS}")
    t.add_argument("--lr", type=positive_float, help=f"default by method: {DEFAULT_LR}")
    recipe_flags(t)

    v = command("eval", "top-1 and top-5 of held-out summaries among N candidates, N = 32, 64, ...")
    v.add_argument("--emb", required=True, help="embeddings of held-out pairs")
    v.add_argument("--model",
                   help="a retrieval mixer from train --method mixer (default: cosine similarity)")
    v.add_argument("--bm25", action="store_true",
                   help="add a row: BM25 word overlap on the same candidate sets")
    v.add_argument("--json", action="store_true",
                   help="also one JSON object per scorer and N (top1, top5, mrr)")

    i = command("index", "embed stories once for search")
    i.add_argument("--ckpt", required=True, help="a checkpoint from train.py")
    i.add_argument("--stories", nargs="+", required=True,
                   help="pairs .jsonl, or any data_prep.py input")
    i.add_argument("--out", required=True, help="index .npz to write")

    s = command("search", "the k stories closest to a query, one line each")
    s.add_argument("--ckpt", required=True, help="the checkpoint the index was built with")
    s.add_argument("--index", required=True, help="from retrieve.py index")
    s.add_argument("--query", required=True, help="the text to search for")
    s.add_argument("-k", type=positive_int, default=5, help="how many stories")
    s.add_argument("--full", action="store_true",
                   help="print each story whole, not its first 100 characters")
    return p.parse_args(argv)


COMMANDS = {"embed": cmd_embed, "train": cmd_train, "eval": cmd_eval, "index": cmd_index,
            "search": cmd_search}


def main(argv=None):
    args = parse_args(argv)
    run("retrieve.py", COMMANDS[args.command], args)



if __name__ == "__main__":
    main()
