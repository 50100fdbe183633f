"""Test suite: python -m pytest -q  (CPU, no network; real text from ../shared/data when present)."""
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


def tiny_model(variant, seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(vocab_size=256, block_size=16, n_layer=2, n_embd=32, n_head=4) | VARIANTS[variant] | overrides
    return Model(Config(**kw)).eval()


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
    model = tiny_model(variant, vocab_size=50304, block_size=32, n_embd=64).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5, f"{variant} did not memorise 128 tokens: loss {loss.item():.3f} (starts near 10.8)"
