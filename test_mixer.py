"""The model's tests (mixer.py): causality, the mask, the kernels against the paper's line, gradients,
cached and streamed generation. The quick loop: python -m pytest -q test_mixer.py"""

import pytest
import torch
import torch.nn.functional as F

import cli
import mixer
from mixer import ARCHS, Config, MaskedMixing, Model
from testkit import (HAS_C_COMPILER, SAMPLE_TEXT, TINY_RUN, VARIANTS, count_fft_calls, run_train,
                     tiny_model)


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


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t0", [0, 3])
def test_masked_matmul_matches_autograd_through_an_explicit_mask(causal, t0):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 5, 5 + t0, dtype=torch.double, generator=g, requires_grad=True)
    v = torch.randn(3, 2, 5 + t0, 4, dtype=torch.double, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, v: mixer.MaskedMatmul.apply(w, v, t0, causal), (w, v))
    mask = torch.ones(5, 5 + t0, dtype=torch.double).tril(t0) if causal else 1.0
    grad_y = torch.randn(3, 2, 5, 4, dtype=torch.double, generator=g)
    ours = torch.autograd.grad(mixer.MaskedMatmul.apply(w, v, t0, causal), (w, v), grad_y)
    plain = torch.autograd.grad((w * mask) @ v, (w, v), grad_y)
    assert all(torch.allclose(a, b) for a, b in zip(ours, plain))


def test_the_paper_line_and_masked_matmul_agree_in_values_and_gradients():
    """mixer.masked_mix is the paper's y = tril(W[:T, :T]) @ x + b as written; MaskedMixing (through
    MaskedMatmul, which saves less for backward) must compute the same thing."""
    mix = tiny_model("mixer-2head", n_layer=1).blocks[0].mix
    x = torch.randn(3, 2, 11, 16, dtype=torch.double, requires_grad=True)  # [B, h, T < block_size, dh]
    w, b = mix.weight.detach().double().requires_grad_(), mix.bias.detach().double().requires_grad_()
    plain = mixer.masked_mix(w, b, x)
    lean = mixer.MaskedMatmul.apply(w[:, :11, :11], x, 0, True) + b[:, :11]
    grad_y = torch.randn_like(plain)
    assert torch.allclose(plain, lean)
    assert all(torch.allclose(p, q) for p, q in zip(torch.autograd.grad(plain, (w, b, x), grad_y),
                                                    torch.autograd.grad(lean, (w, b, x), grad_y)))


@pytest.mark.parametrize("t0", [0, 3])
def test_toeplitz_matmul_is_the_full_mixer_with_a_toeplitz_matrix(t0):
    g = torch.Generator().manual_seed(0)
    T, S = 5, 5 + t0
    kernel = torch.randn(2, 9, dtype=torch.double, generator=g, requires_grad=True)  # [h, block_size]
    v = torch.randn(3, 2, S, 4, dtype=torch.double, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k, v: mixer.ToeplitzMatmul.apply(k, v, t0, T), (kernel, v))
    # the same W written out entry by entry (W[t, s] = kernel[t0 + t - s] on and below the diagonal)
    zero = kernel.new_zeros(())
    w = torch.stack([torch.stack([torch.stack([kernel[h, t0 + t - s] if t0 + t >= s else zero for s in range(S)])
                                  for t in range(T)]) for h in range(2)])
    grad_y = torch.randn(3, 2, T, 4, dtype=torch.double, generator=g)
    ours = mixer.ToeplitzMatmul.apply(kernel, v, t0, T)
    full = mixer.MaskedMatmul.apply(w, v, t0, True)
    assert torch.allclose(ours, full)
    assert all(torch.allclose(a, b) for a, b in zip(torch.autograd.grad(ours, (kernel, v), grad_y),
                                                    torch.autograd.grad(full, (kernel, v), grad_y)))


def test_toeplitz_under_bf16_autocast_and_the_fft_path_agree_with_float32_dense():
    g = torch.Generator().manual_seed(0)
    kernel = (torch.randn(2, 64, generator=g) / 8).requires_grad_()
    v = torch.randn(3, 2, 64, 8, generator=g, requires_grad=True)
    grad_y = torch.randn(3, 2, 64, 8, generator=g)
    dense = mixer.ToeplitzMatmul.apply(kernel, v, 0, 64)
    reference = (dense, *torch.autograd.grad(dense, (kernel, v), grad_y))
    fft = mixer.ToeplitzFFT.apply(kernel, v)
    for a, b in zip(reference, (fft, *torch.autograd.grad(fft, (kernel, v), grad_y))):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = mixer.ToeplitzMatmul.apply(kernel, v.bfloat16(), 0, 64)
        low_fft = mixer.ToeplitzFFT.apply(kernel, v.bfloat16())
    for y in (low, low_fft):  # bf16's precision (about 3 digits), whatever the CPU's rounding
        assert y.dtype == torch.bfloat16
        assert (y.float() - dense).abs().max() < 0.05 * dense.abs().max()
    for a, b in zip(torch.autograd.grad(low.float(), (kernel, v), grad_y), reference[1:]):
        assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_a_long_context_toeplitz_model_takes_the_fft_and_gives_the_same_logits(monkeypatch):
    model = tiny_model("toeplitz-2head")
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense, _ = model(idx)
        monkeypatch.setattr(mixer, "FFT_FROM", {"float32": 8, "bfloat16": 8})  # "long" from 8 tokens on
        calls = count_fft_calls(monkeypatch)
        by_fft, _ = model(idx)
        assert len(calls) == 2 and torch.allclose(dense, by_fft, atol=1e-5)
        cache = mixer.Cache()  # the cache extends one row at a time: dense rows, the same logits
        stepwise = torch.cat([model(idx[:, t : t + 1], cache=cache)[0] for t in range(16)], dim=1)
    assert len(calls) == 2 and torch.allclose(stepwise, by_fft, atol=1e-5)


@pytest.mark.parametrize("amx, avx512_bf16", [(True, True), (False, True), (False, False)],
                         ids=["intel-amx", "amd-avx512-bf16", "amd-avx2-only"])
def test_the_fft_threshold_follows_the_dtype_the_product_runs_in(amx, avx512_bf16, monkeypatch):
    """Each CPU kind trains in its --dtype auto; the Toeplitz product takes the FFT from that dtype's threshold."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(mixer, "FFT_FROM", {"float32": 8, "bfloat16": 16})  # small, to run a tiny model
    calls = count_fft_calls(monkeypatch)
    cpu = torch.device("cpu")
    ctx, dtype = cli.autocast(cpu, "auto")
    model = tiny_model("toeplitz")  # block_size 16
    with torch.no_grad(), ctx:
        assert mixer.fft_from(torch.zeros(1, 1, 8, 4)) == mixer.FFT_FROM[dtype]
        model(torch.zeros(1, 8, dtype=torch.long))
        assert len(calls) == (2 if dtype == "float32" else 0)  # 8 tokens: the FFT in float32 only (2 layers)
        model(torch.zeros(1, 16, dtype=torch.long))
    assert len(calls) == (4 if dtype == "float32" else 2)  # 16 tokens: the FFT in both


@pytest.mark.parametrize("mixing", ["full", "toeplitz"])
def test_only_the_toeplitz_mixers_parameters_grow_linearly_with_the_context(mixing):
    count = {T: Model(Config(arch="mixer", mixing=mixing, mixer_heads=2, vocab_size=64, n_layer=2, n_embd=32,
                             block_size=T)).num_params() for T in (16, 32, 64)}
    growth = [count[32] - count[16], count[64] - count[32]]
    if mixing == "toeplitz":  # kernel and bias: 2 heads x 2 layers x 2 weights per position
        assert growth == [8 * 16, 8 * 32]
    else:
        assert growth[1] > 3 * growth[0]  # T^2


@pytest.mark.parametrize("variant", ["mixer", "mixer-2head", "transformer", "hybrid", "toeplitz-2head", "hybrid-toeplitz"])
def test_gradients_of_every_parameter_match_finite_differences(variant):
    """float64, eval mode: autograd's gradient of the loss with respect to every parameter, the token
    embedding (the inputs) included, against central differences. Catches a hand-written backward
    that is wrong (MaskedMatmul) and a path that stops passing gradient (say, the hybrid's mixing of
    the attention output), which leave every output unchanged."""
    model = tiny_model(variant, vocab_size=7, block_size=4, n_layer=1, n_embd=8, n_head=2).double()
    names, params = zip(*[(name, p.detach().requires_grad_()) for name, p in model.named_parameters()])
    idx = torch.randint(0, 7, (2, 4), generator=torch.Generator().manual_seed(0))

    def loss(*values):  # the loss in float64 (the model's own casts logits to float32, for bf16 training)
        logits, _ = torch.func.functional_call(model, dict(zip(names, values)), (idx,))
        return F.cross_entropy(logits.flatten(0, 1), idx.flatten())

    # fast_mode compares v^T J u for random u and v: a wrong or missing gradient anywhere changes it
    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


# Compiled: the hybrid (attention and the full mixing in one graph) and the Toeplitz mixer, so every
# kind of token mixing goes through inductor; each graph costs 10-30 s to compile on a cold cache.
@pytest.mark.parametrize("arch, compiled", [*[(arch, False) for arch in (*ARCHS, "toeplitz")],
                                            *[pytest.param(arch, True, marks=pytest.mark.compile)
                                              for arch in ("hybrid", "toeplitz")]],
                         ids=lambda v: {False: "eager", True: "compiled"}.get(v, v) if isinstance(v, bool) else v)
def test_bf16_autocast_and_compile_keep_causality_and_the_mask(arch, compiled):
    """The training modes of a CPU with native bf16 (autocast, optionally torch.compile): earlier outputs
    are exactly blind to a later token, and masked mixing weights get exactly zero gradient."""
    if compiled and not HAS_C_COMPILER:
        pytest.skip("torch.compile on the CPU needs a C compiler")
    model = tiny_model(arch).train()  # (arch "toeplitz": the Toeplitz mixer variant)
    run = torch.compile(model) if compiled else model
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 5] = (idx[:, 5] + 1) % 256
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = run(idx, idx)
        loss.backward()
        logits_changed, _ = run(changed, changed)  # the same (training) graph: one compile per arch
    logits, logits_changed = logits.detach(), logits_changed.detach()
    assert logits.dtype == torch.bfloat16  # autocast was in effect
    assert torch.equal(logits[:, :5], logits_changed[:, :5]), "a later token changed an earlier output"
    assert (logits[:, 5:] != logits_changed[:, 5:]).any(-1).all()
    above = torch.triu(torch.ones(16, 16, dtype=torch.bool), diagonal=1)
    for m in (m for m in model.modules() if isinstance(m, MaskedMixing)):
        if m.mixing == "toeplitz":  # nothing above the diagonal to mask: every offset is learned
            assert torch.count_nonzero(m.kernel.grad) == m.kernel.numel()
            continue
        assert torch.count_nonzero(m.weight.grad[:, above]) == 0
        assert torch.count_nonzero(m.weight.grad[:, ~above]) > 0.9 * (~above).sum() * m.weight.size(0)


@pytest.mark.compile
def test_compiled_model_with_the_generation_cache_equals_eager():
    """The hybrid holds both caches (mixer inputs and attention K/V). What compile can get wrong here is
    the tracing: the cache's in-place appends and the guards on its length. aot_eager traces as inductor
    does (dynamo, then AOTAutograd) without generating kernels, a fifth of the time on a cold cache;
    inductor's kernels for these ops are compiled by the test above."""
    model = tiny_model("hybrid")
    compiled = torch.compile(model, backend="aot_eager")
    idx = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    cache = mixer.Cache()
    with torch.no_grad():
        full, _ = model(idx)
        steps = [compiled(idx[:, :5], cache=cache)[0]] + [compiled(idx[:, t : t + 1], cache=cache)[0] for t in (5, 6, 7)]
        uncached, _ = compiled(idx)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert torch.allclose(uncached, full, atol=1e-5)


@pytest.mark.parametrize("arch", ["transformer", "hybrid"])
def test_eager_attention_equals_sdpa(arch):
    sdpa, eager = tiny_model(arch), tiny_model(arch, attn_impl="eager")  # same seed: same weights
    idx = torch.randint(0, 256, (2, 16))
    sdpa.train(), eager.train()
    (ls, loss_s), (le, loss_e) = sdpa(idx, idx), eager(idx, idx)
    loss_s.backward(), loss_e.backward()
    assert torch.allclose(ls, le, atol=1e-5)
    for (name, a), b in zip(sdpa.named_parameters(), eager.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def longest_input(variant):
    """The Toeplitz mixer (a convolution) and attention (RoPE) run past block_size 16; the full mixer's W ends there."""
    full_mixing = VARIANTS[variant]["arch"] != "transformer" and VARIANTS[variant].get("mixing", "full") == "full"
    return 16 if full_mixing else 40


@pytest.mark.parametrize("variant", VARIANTS)
def test_short_input_equals_prefix_of_long_input(variant):
    model = tiny_model(variant)
    idx = torch.randint(0, 256, (3, longest_input(variant)))
    with torch.no_grad():
        full, _ = model(idx)
        short, _ = model(idx[:, :7])
        block, _ = model(idx[:, :16])
    assert short.shape == (3, 7, 256)
    assert torch.allclose(short, full[:, :7], atol=1e-5) and torch.allclose(block, full[:, :16], atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_logits_equal_full_forward(variant):
    model = tiny_model(variant)
    idx = torch.randint(0, 256, (2, longest_input(variant)))
    cache = mixer.Cache()
    with torch.no_grad():
        full, _ = model(idx)
        steps = [model(idx[:, :5], cache=cache)[0]]  # prefill 5, then one token at a time
        steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, idx.size(1))]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


STREAMS = ("toeplitz", "toeplitz-2head")  # generate() streams the Toeplitz mixer past block_size; the others crop


def greedy_by_whole_forward(model, idx, new_tokens):
    for _ in range(new_tokens):
        idx = torch.cat([idx, model(idx)[0][:, -1:].argmax(-1)], dim=1)
    return idx


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generation_matches_recomputation_past_block_size(variant):
    """The Toeplitz mixer streams: the whole sequence's forward, however long. The others crop to the
    last block_size tokens, as generating without the cache does."""
    model = tiny_model(variant)
    prompt = torch.randint(0, 256, (2, 3))
    cached = model.generate(prompt, max_new_tokens=30, temperature=0)  # 33 > block_size 16
    with torch.no_grad():
        recomputed = (greedy_by_whole_forward(model, prompt, 30) if variant in STREAMS else
                      model.generate(prompt, max_new_tokens=30, temperature=0, use_cache=False))
    assert cached.shape == (2, 33)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("variant", STREAMS)
def test_streaming_keeps_block_size_inputs_and_equals_the_whole_forward_four_blocks_long(variant):
    model = tiny_model(variant)  # block_size 16
    idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    cache = mixer.Cache()
    with torch.no_grad():
        whole, _ = model(idx)
        steps = [model(idx[:, :20], cache=cache)[0]]  # a prompt longer than the block, then a token at a time
        for t in range(20, 64):
            steps.append(model(idx[:, t : t + 1], cache=cache)[0])
            assert all(past.size(2) == 15 for past in cache.values())  # O(block_size) per token at any length
    assert cache.length == 64 and torch.allclose(torch.cat(steps, dim=1), whole, atol=1e-5)


@pytest.mark.parametrize("variant", STREAMS)
def test_generation_streams_a_prompt_longer_than_the_block_whole_and_each_step_is_the_whole_forward(variant):
    """generate() reads a 40-token prompt (block_size 16) in one streamed pass, not cropped to its last 16
    tokens: the logits of every generated step equal the whole sequence's forward at its last position.
    (Greedy tokens alone often agree where the logits do not.)"""
    model = tiny_model(variant)
    prompt = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.float()))
    out = model.generate(prompt, 6, temperature=0)
    hook.remove()
    with torch.no_grad():
        whole = [model(out[:, :t])[0][:, -1] for t in range(40, 46)]
        cropped = model(prompt[:, -16:])[0][:, -1]
    assert len(seen) == 6 and all(torch.allclose(s, w, atol=1e-5) for s, w in zip(seen, whole))
    assert (whole[0] - cropped).abs().max() > 1e-3  # cropping the prompt first would be told apart


@pytest.mark.parametrize("mixing_bias", mixer.MIXING_BIASES)
@pytest.mark.parametrize("length", [32, 5], ids=["4-blocks", "shorter-than-the-block"])
def test_toeplitz_mixing_past_block_size_is_the_convolution_truncated_at_the_kernel_plus_the_last_bias(
        mixing_bias, length, monkeypatch):
    """The reference that streaming equals: y_t = sum_{m <= min(t, L - 1)} k[m] x_{t - m} + b_{min(t, L - 1)},
    by the dense kernel and by the FFT, in values and gradients, at 4 x block_size (and inside the block)."""
    L = 8
    layer = MaskedMixing(Config(block_size=L, n_embd=4, mixing="toeplitz", mixing_bias=mixing_bias))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(2, length, 4, requires_grad=True)
    k, b = layer.kernel[0], layer.bias[0, :, 0] if layer.bias is not None else torch.zeros(1)
    expected = torch.stack([sum(k[m] * x[:, t - m] for m in range(min(t + 1, L))) + b[min(t, b.numel() - 1)]
                            for t in range(length)], dim=1)
    grad_y = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (x, layer.kernel), grad_y)
    for fft_from in (10**9, 1):  # dense, then the FFT
        monkeypatch.setattr(mixer, "FFT_FROM", {"float32": fft_from})
        y = layer(x)
        assert torch.allclose(y, expected, atol=1e-4)
        assert all(torch.allclose(a, e, atol=1e-4) for a, e in zip(torch.autograd.grad(y, (x, layer.kernel), grad_y), want))


def test_a_checkpoint_from_before_mixing_bias_loads_with_the_bias_per_position(tmp_path):
    model = tiny_model("toeplitz")
    config = {name: value for name, value in vars(model.config).items() if name != "mixing_bias"}
    loaded = cli.model_from_checkpoint({"config": config, "model": model.state_dict()}, tmp_path / "ckpt.pt")
    idx = torch.randint(0, 256, (1, 16))
    assert loaded.config.mixing_bias == "position" and torch.equal(loaded(idx)[0], model(idx)[0])


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny_model("mixer")
    prompt = torch.zeros(1, 1, dtype=torch.long)
    torch.manual_seed(3)
    a = model.generate(prompt, 10, temperature=1.0, top_k=1)
    greedy = model.generate(prompt, 10, temperature=0)
    assert torch.equal(a, greedy)  # top_k=1 leaves only the argmax
    # top_k=3 at a high temperature (nearly uniform among the three): 3,000 draws of the next token
    # give exactly the three most likely tokens, and each of them often
    top3 = model(prompt)[0][0, -1].topk(3).indices.tolist()
    torch.manual_seed(5)
    drawn = model.generate(prompt.expand(3000, 1), 1, temperature=100.0, top_k=3)[:, -1]
    counts = torch.bincount(drawn, minlength=256)
    assert sorted(counts.nonzero().flatten().tolist()) == sorted(top3) and counts[top3].min() > 800
    torch.manual_seed(4)
    b = model.generate(prompt, 10, temperature=2.0)
    torch.manual_seed(4)
    assert torch.equal(b, model.generate(prompt, 10, temperature=2.0))


def test_too_long_input_names_both_lengths():
    model = tiny_model("mixer")
    with pytest.raises(ValueError, match=r"17.*block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_a_mixers_width_needs_no_attention_heads(prepared, tmp_path):
    """n_embd 50 is not divisible by the default n_head 4, which only attention uses: a mixer trains."""
    assert Model(Config(arch="mixer", n_embd=50, block_size=8, vocab_size=64)).num_params() > 0
    with pytest.raises(ValueError, match="not divisible by n_head=4"):
        Config(arch="transformer", n_embd=50)
    run_train("--data_dir", prepared, "--out_dir", tmp_path, *TINY_RUN, "--n_embd", 50, "--max_iters", 2)
    assert cli.load_checkpoint(tmp_path / "ckpt.pt")["config"]["n_embd"] == 50


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


@pytest.mark.parametrize("variant", ["mixer", "transformer"])
def test_mean_pooling_averages_the_real_tokens_final_states(variant):
    model = tiny_model(variant)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([16, 9])
    with torch.no_grad():
        pooled = model.embed(idx, lengths, pool="mean")
        h = model.hidden_states(idx)
        assert torch.allclose(pooled[0], h[0].mean(0), atol=1e-6) and torch.allclose(pooled[1], h[1, :9].mean(0), atol=1e-6)
        idx[1, 9:] = 0  # padding cannot reach the real tokens
        assert torch.allclose(model.embed(idx, lengths, pool="mean"), pooled, atol=1e-6)


def test_flops_count_the_mixing_matmuls():
    shared = dict(vocab_size=256, block_size=64, n_layer=2, n_embd=32)
    flops = {arch: Model(Config(arch=arch, mixer_heads=1, **shared)).flops_per_token() for arch in ARCHS}
    per_seq_matmul = 3 * 2 * 2 * 64 * 32  # fwd+bwd x 2 FLOPs x n_layer x T x d
    dense_attn = 3 * 2 * 2 * 4 * 32 * 32  # qkv + out projections
    assert flops["transformer"] - flops["mixer"] == dense_attn + per_seq_matmul
    assert flops["hybrid"] - flops["transformer"] == per_seq_matmul


@pytest.mark.parametrize("variant", VARIANTS)
def test_overfits_one_batch_of_real_text(variant, gpt2):
    text = SAMPLE_TEXT.read_text(encoding="utf-8")[:20000]
    tokens = torch.tensor(gpt2.encode(text, allowed_special={"<|endoftext|>"})[: 4 * 33]).view(4, 33)
    # renumbered 0..73, the batch's own vocabulary: the same text at a tenth of the cost of a 50,304-row
    # embedding. Its next token given the current one alone has 0.62 nats of entropy, so a loss under 0.5
    # takes the earlier context: the mixing must carry it.
    tokens = torch.unique(tokens, return_inverse=True)[1]
    model = tiny_model(variant, perturb=False, vocab_size=128, block_size=32, n_embd=64).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5, f"{variant} did not memorise 128 tokens: loss {loss.item():.3f} (starts near 4.9)"
