"""
Masked mixer, transformer and hybrid language models in one file.

Badger, "Masked Mixers for Language Generation and Retrieval" (2024): replace self-attention by a
causally masked, learned [T, T] mixing over the token axis. All three models here share one block:

    x = x + mix(norm(x))      # the only part that differs between architectures
    x = x + mlp(norm(x))

Fairness: the paper's mixer used LayerNorm + GELU MLP and its best transformer RMSNorm + SwiGLU.
Here every arch uses the same RMSNorm and SwiGLU MLP (and the same final norm and untied head), so a
comparison measures the token mixing alone.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("mixer", "transformer", "hybrid")
MIXINGS = ("full", "toeplitz")
MIXING_BIASES = ("position", "head", "none")
ATTN_IMPLS = ("sdpa", "eager")
# The heads each arch splits its width into (only those must divide n_embd)
HEADS_USED = {"mixer": ("mixer_heads",), "transformer": ("n_head",),
              "hybrid": ("n_head", "mixer_heads")}


@dataclass
class Config:
    arch: str = "mixer"         # "mixer" | "transformer" | "hybrid"
    vocab_size: int = 50304     # GPT-2's 50257 padded up to a multiple of 64
    block_size: int = 512       # context length; part of the mixer's weights (W is [T, T])
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4             # attention heads (transformer, hybrid)
    mixer_heads: int = 1        # masked-mixing heads; 1 = the paper's flat mixer (no projections)
    mixing: str = "full"        # "full": a [T, T] matrix per head (the paper);
                                # "toeplitz": T weights per head (the author's follow-up)
    mixing_bias: str = "position"  # the mixing's bias b: one per head and position (the paper),
                                   # one per head, or none
    dropout: float = 0.0
    bias: bool = False          # biases in Linear layers (the mixing's own bias is mixing_bias)
    causal: bool = True         # False: unmasked, bidirectional (retrieve.py's retrieval mixer)
    attn_impl: str = "sdpa"     # "sdpa": fused kernel; "eager": materialised [T, T] softmax
                                # (the paper's baseline)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}: choose one of {', '.join(ARCHS)}")
        for count in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "mixer_heads"):
            if getattr(self, count) < 1:
                raise ValueError(f"{count} must be at least 1, not {getattr(self, count)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attn_impl {self.attn_impl!r}: choose "
                             f"{' or '.join(ATTN_IMPLS)}")
        if self.mixing not in MIXINGS:
            raise ValueError(f"unknown mixing {self.mixing!r}: choose {' or '.join(MIXINGS)}")
        if self.mixing_bias not in MIXING_BIASES:
            raise ValueError(f"unknown mixing_bias {self.mixing_bias!r}: choose one of "
                             f"{', '.join(MIXING_BIASES)}")
        if not self.causal and (self.arch != "mixer" or self.mixing != "full"):
            raise ValueError("causal=False (bidirectional mixing) is only defined for arch 'mixer' "
                             "with full mixing")
        for heads in HEADS_USED[self.arch]:  # only the heads the arch has split the width
            if self.n_embd % getattr(self, heads):
                raise ValueError(f"n_embd={self.n_embd} is not divisible by "
                                 f"{heads}={getattr(self, heads)}")
        if self.arch != "mixer" and self.n_embd // self.n_head % 2:
            raise ValueError(f"attention heads of n_embd / n_head = {self.n_embd // self.n_head} "
                             "dimensions: RoPE rotates pairs of dimensions, so it must be even")


# -------------------------------------------------------------------------------- the masked mixing

def masked_mix(weight, bias, x):
    """The paper's masked mixing as written, for x [B, h, T, dh] with T <= block_size:

        y_i = sum_{j <= i} W[i, j] x_j + b_i,        y = tril(W[:T, :T]) @ x + b[:T]

    One learned [T, T] matrix W (and bias b) per head, mixing along the token axis: the same weights
    for every input, where attention computes them from the input. The mask keeps the lower triangle
    (diagonal included), so output i depends on inputs 0..i only: a causal language model. Inputs
    shorter than T use the top-left corner, which is exact because of the mask."""
    T = x.size(2)
    return weight[:, :T, :T].tril() @ x + bias[:, :T]  # [h, T, T] @ [B, h, T, dh] -> [B, h, T, dh]


class MaskedMixing(nn.Module):
    """masked_mix per head: y = tril(W) @ x + b, with W one of two things.

    mixing "full" (the paper): W is a learned [T, T] matrix per head (T = block_size); W[i, j] is
    specific to positions i and j, so no positional encoding is needed. mixing "toeplitz" (the
    author's follow-up): W[i, j] = k[i - j] from a learned kernel k of T weights per head, one
    weight per offset: a causal convolution along the tokens, so it runs at any length (offsets past
    the kernel add nothing) and generation streams past T. Both start as the identity.
    """

    def __init__(self, config):
        super().__init__()
        T, h = config.block_size, config.mixer_heads
        self.n_head, self.causal, self.mixing = h, config.causal, config.mixing
        # heads > 1: each head sees its own projection of x (one Linear, split into heads) and the
        # concatenated heads are projected back. One head is the paper's flat mixer: no projections.
        projection = lambda: nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # noqa: E731
        self.proj_in = projection() if h > 1 else nn.Identity()
        self.proj_out = projection() if h > 1 else nn.Identity()
        # b: one scalar per head and output position (the paper), one per head, or none
        bias_rows = {"position": T, "head": 1, "none": 0}[config.mixing_bias]
        self.bias = nn.Parameter(torch.zeros(h, bias_rows, 1)) if bias_rows else None
        # Init W = identity: each position starts by passing its own state through, so the network
        # begins as a per-token model and learns how much of the past to mix in. Measured on the
        # shared TinyStories slice (d64, 2 layers, T64, 150 steps): identity reached val loss 3.69,
        # zeros 3.83, PyTorch's default random init (scaled per row to its i+1 live inputs) 5.95, no
        # better than unigram: a random mix of earlier tokens drowns each token's own identity.
        if self.mixing == "toeplitz":
            self.kernel = nn.Parameter(torch.zeros(h, T))  # k[:, 0]: the diagonal; k[:, 1]: 1 back
            with torch.no_grad():
                self.kernel[:, 0] = 1.0
        else:
            self.weight = nn.Parameter(torch.eye(T).repeat(h, 1, 1))  # [h, T, T]

    def forward(self, x, cache=None):
        B, T, C = x.shape
        v = self.proj_in(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # B, h, T, dh
        t0 = 0  # the absolute position of x's first token
        if cache is not None:  # generation: the inputs before x, kept by the cache, join v
            t0 = cache.length
            keep = self.kernel.size(1) - 1 if self.mixing == "toeplitz" else None  # what k reaches
            v = cache.append(self, v, keep=keep)
        y = self.tril_w_times(v, past=v.size(2) - T) + self.bias_at(t0, T)  # [B, h, T, dh]
        return self.proj_out(y.transpose(1, 2).reshape(B, T, C))

    def tril_w_times(self, v, past):
        """The last T rows of tril(W) @ v, for v [B, h, past + T, dh] that holds `past` inputs
        before the T new ones: row past + i keeps columns <= past + i. (For the Toeplitz mixer,
        column 0 is the oldest input the cache keeps, not always position 0: only offsets matter.)
        Each kernel below builds W inside itself, so that autograd keeps no [h, T, T] copy per
        layer."""
        T = v.size(2) - past
        if self.mixing == "full":
            # W is the learned matrix. MaskedMatmul equals masked_mix in values and gradients
            # (test_the_paper_line_and_masked_matmul_agree_in_values_and_gradients).
            weight = self.weight[:, past : past + T, : past + T]
            return MaskedMatmul.apply(weight, v, past, self.causal)
        if past == 0 and T >= fft_from(v):
            # W[i, j] = kernel[i - j], a long context at once: a convolution by FFT, equal to the
            # dense product
            # (test_a_long_context_toeplitz_model_takes_the_fft_and_gives_the_same_logits).
            return ToeplitzFFT.apply(self.kernel, v)
        # W[i, j] = kernel[i - j], built densely in the op: equal to MaskedMatmul with that W
        # (test_toeplitz_matmul_is_the_full_mixer_with_a_toeplitz_matrix).
        return ToeplitzMatmul.apply(self.kernel, v, past, T)

    def bias_at(self, t0, T):
        """b of positions t0 .. t0 + T - 1: [h, T, 1], [h, 1, 1] (one per head) or 0 (none). Past
        block_size (the Toeplitz mixer) every position takes the last one's: its kernel's window of
        block_size inputs is full, as theirs are."""
        if self.bias is None:
            return 0
        if self.bias.size(1) == 1:  # one per head: the same at every position
            return self.bias
        rows = torch.arange(t0, t0 + T, device=self.bias.device).clamp(max=self.bias.size(1) - 1)
        return self.bias[:, rows]

    def matrix(self):
        """[h, T, T]: the masked mixing matrix each head applies (for mixing.py and the tests)."""
        if self.mixing == "toeplitz":
            T = self.kernel.size(1)
            return toeplitz(self.kernel, 0, T, T)
        return masked(self.weight, 0, self.causal)


def rope_tables(head_dim, block_size, base=10000.0):
    """cos/sin of RoPE angles, each [block_size, head_dim // 2]."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(block_size).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x[..., i], x[..., i + dh/2]) of x [B, h, T, dh] by angles that grow with the
    position: q k^T then depends on the positions' difference only."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Llama-style causal self-attention: RoPE positions, no biases, the fused SDPA kernel (or
    eager)."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.dropout, self.attn_impl = config.n_head, config.dropout, config.attn_impl
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj_out = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def queries_keys_values(self, x, t0=0):
        """q, k, v [B, h, T, dh] of x [B, T, C] at positions t0.., q and k rotated by RoPE."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, h, T, dh]
        cos, sin = self.cos, self.sin
        if t0 + T > cos.size(0):  # past block_size: positions it never trained at (same formula)
            cos, sin = (table.to(x.device) for table in rope_tables(C // self.n_head, t0 + T))
        cos, sin = cos[t0 : t0 + T], sin[t0 : t0 + T]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cache=None):
        B, T, C = x.shape
        t0 = cache.length if cache is not None else 0  # the absolute position of x's first token
        q, k, v = self.queries_keys_values(x, t0)
        if cache is not None:
            k, v = cache.append((self, "k"), k), cache.append((self, "v"), v)
        # A causal mask aligned top-left is right for a prefill (t0 == 0); a cached decode step adds
        # one query that may see every key, so it needs no mask.
        assert t0 == 0 or T == 1, "cached attention extends one token at a time"
        dropout = self.dropout if self.training else 0.0
        if self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t0 == 0, dropout_p=dropout)
        else:
            y = eager_attention(q, k, v, causal=t0 == 0, dropout=dropout)
        return self.proj_out(y.transpose(1, 2).reshape(B, T, C))


def eager_attention(q, k, v, causal, dropout):
    """softmax(q k^T / sqrt(dh)) v with the [B, h, T, S] attention matrix materialised (and kept for
    backward), as the paper's transformer did (Hugging Face's "eager" attention): the baseline of
    its memory comparison. The fused SDPA kernel gives the same result without storing that
    matrix."""
    attn = attention_probs(q, k, causal)
    if dropout:
        attn = F.dropout(attn, dropout)
    return attn @ v  # [B, h, T, dh]


def attention_probs(q, k, causal):
    """softmax(q k^T / sqrt(dh)) [B, h, T, S] for q [B, h, T, dh], k [B, h, S, dh]; causal masks
    s > t."""
    T, S = q.size(-2), k.size(-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # [B, h, T, S]
    if causal:
        future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1)


class Hybrid(nn.Module):
    """The paper's transformer + mixer hybrid: the attention output a is also masked-mixed,
    a + mix(a)."""

    def __init__(self, config):
        super().__init__()
        self.attn = Attention(config)
        self.mix = MaskedMixing(config)

    def forward(self, x, cache=None):
        a = self.attn(x, cache)
        return a + self.mix(a, cache)


TOKEN_MIXERS = {"mixer": MaskedMixing, "transformer": Attention, "hybrid": Hybrid}


class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x)). Hidden width 8d/3 (rounded up to a multiple of 64)
    gives about the parameters and FLOPs of a 4d GELU MLP."""

    def __init__(self, config):
        super().__init__()
        hidden = 64 * math.ceil(8 * config.n_embd / 3 / 64)
        self.gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.up = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.proj_out = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.proj_out(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """The one block skeleton: x + mix(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config):
        super().__init__()
        self.norm_mix = nn.RMSNorm(config.n_embd)
        self.mix = TOKEN_MIXERS[config.arch](config)
        self.norm_mlp = nn.RMSNorm(config.n_embd)
        self.mlp = SwiGLU(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        x = x + self.dropout(self.mix(self.norm_mix(x), cache))
        return x + self.dropout(self.mlp(self.norm_mlp(x)))


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_out = nn.RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied (the paper)
        # GPT-2 init; each residual branch's proj_out scaled down with depth, so the residual
        # stream's variance does not grow with n_layer (flat mixers have none: the mixing init sets
        # their scale).
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj_out.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def runs_past_block_size(self):
        """Whether the mixing defines inputs longer than block_size: the Toeplitz mixer is a
        convolution (offsets past its kernel add nothing), attention rotates by RoPE at positions it
        never trained at; the full mixer's W (the hybrid's too) ends at block_size."""
        return self.config.mixing == "toeplitz" or self.config.arch == "transformer"

    def hidden_states(self, idx, cache=None):
        """Final normalised hidden states [B, T, n_embd] (the input to lm_head)."""
        T = idx.size(1) + (cache.length if cache is not None else 0)  # cached + new positions
        if T > self.config.block_size and not self.runs_past_block_size():
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}, "
                             f"where the full mixer's W ends: crop the input to the last "
                             f"{self.config.block_size} tokens")
        x = self.dropout(self.wte(idx))
        for block in self.blocks:
            x = block(x, cache)
        if cache is not None:
            cache.length += idx.size(1)
        return self.norm_out(x)

    def forward(self, idx, targets=None, cache=None):
        """idx [B, T] -> logits [B, T, vocab] and, with targets [B, T] (-1 = ignore), the mean
        cross-entropy."""
        logits = self.lm_head(self.hidden_states(idx, cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    def embed(self, idx, lengths=None, pool="mean"):
        """Retrieval embedding [B, n_embd] of right-padded sequences idx [B, T] (lengths [B]; None:
        no padding): the mean of the final hidden states over each sequence's real tokens (pool
        "mean"), or the state at its last real token (pool "last", the paper's).

        Why the last position: our loss trains every input position (targets are the inputs shifted
        by one inside a block_size + 1 window), so the last token's state is trained and is the only
        one that has seen the whole text. (The author used the second-to-last token because in his
        setup the last position never received a loss.) Why a mean: a trained mixer's last state
        mostly encodes the last few tokens, so a query about the middle of a text finds little
        there; the mean retrieves better (RESULTS.md section 4). Padding can be any token: causality
        keeps it out of every real position.
        """
        h = self.hidden_states(idx)  # [B, T, d]
        T = idx.size(1)
        if lengths is None:
            lengths = torch.full((idx.size(0),), T, device=idx.device)
        lengths = lengths.to(idx.device)
        if pool == "last":
            return h[torch.arange(idx.size(0), device=idx.device), lengths - 1]
        real = torch.arange(T, device=idx.device) < lengths.unsqueeze(1)  # [B, T]
        real = real.unsqueeze(-1)  # [B, T, 1]
        return (h * real).sum(1) / lengths.unsqueeze(1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx [B, T]; temperature 0 is greedy. With
        use_cache each layer keeps its past inputs (mixer) or K and V (attention): a new token costs
        O(t). Past block_size the context is cropped to the last block_size tokens (nanoGPT) and the
        window recomputed, except with use_cache in the Toeplitz mixer, which streams: each layer
        keeps its last block_size inputs, so a token costs O(block_size) at any length and equals
        the whole sequence's forward (a deeper layer sees further back than the crop's block_size
        tokens)."""
        streams = use_cache and self.config.arch == "mixer" and self.config.mixing == "toeplitz"
        cache = Cache()
        for _ in range(max_new_tokens):
            if cache.length and (streams or idx.size(1) <= self.config.block_size):  # a token on
                h = self.hidden_states(idx[:, -1:], cache)
            else:
                cache = Cache()
                context = idx if streams else idx[:, -self.config.block_size:]
                h = self.hidden_states(context, cache if use_cache else None)
            logits = self.lm_head(h[:, -1]).float()  # [B, vocab]: the last position only (nanoGPT)
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits[logits < kth] = -float("inf")
                next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat([idx, next_token], dim=1)
        return idx

    def make_optimizer(self, lr, weight_decay, device):
        """AdamW; weight decay on every parameter of 2 or more dims (matrices, the mixing's W or
        kernel, and its bias [h, T, 1] too), not on norms or Linear biases."""
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")

    def num_params(self, non_embedding=False):
        """All parameters, or (non_embedding) without the token embedding and the untied lm_head."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() - self.lm_head.weight.numel() if non_embedding else n

    def flops_per_token(self, T=None):
        """Training FLOPs (forward + backward = 3 x forward) per token at sequence length T.

        Forward: 2 FLOPs per weight of every matmul (the embedding is a lookup; the [T, T] mixing
        weights are counted below), plus the sequence-length-dependent matmuls of each layer, each
        2 * T * n_embd per token: attention has two (Q K^T and A V), the mixer one (W x), the
        hybrid three. Counted dense, as executed (nanoGPT counts attention the same way).
        """
        T = T or self.config.block_size
        dense = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        seq_matmuls = {"mixer": 1, "transformer": 2, "hybrid": 3}[self.config.arch]
        forward = 2 * dense + self.config.n_layer * seq_matmuls * 2 * T * self.config.n_embd
        return 3 * forward


# ---------------------- Part 2, which a learner may skip: the kernels MaskedMixing calls, the cache

def masked(w, past, causal):
    """The causal mask of the rows after `past` earlier inputs: zero every entry above the diagonal
    shifted by past."""
    return w.tril(past) if causal else w


class MaskedMatmul(torch.autograd.Function):
    """y = mask(W) @ v for W [h, T, S] and v [B, h, S, dh], its rows after `past` earlier inputs.
    Autograd would save the masked copy of W (the largest activation at long contexts); this
    backward keeps only W (a parameter, stored anyway) and v, and masks again, so masked entries get
    exactly zero gradient. causal=False mixes bidirectionally (retrieve.py's retrieval mixer)."""

    @staticmethod
    def forward(ctx, weight, v, past, causal):
        ctx.save_for_backward(weight, v)
        ctx.past, ctx.causal = past, causal
        return torch.einsum("hts,bhsd->bhtd", masked(weight, past, causal), v)

    @staticmethod
    def backward(ctx, grad_y):
        weight, v = ctx.saved_tensors
        w = masked(weight, ctx.past, ctx.causal).to(grad_y.dtype)  # the forward's (autocast) dtype
        grad_w, grad_v = matmul_grads(w, v, grad_y)
        return masked(grad_w, ctx.past, ctx.causal).to(weight.dtype), grad_v.to(v.dtype), None, None


def matmul_grads(w, v, grad_y):
    """Gradients of y = w @ v (w [h, T, S], v [B, h, S, dh]): grad_w summed over the batch, and
    grad_v."""
    grad_v = torch.einsum("hts,bhtd->bhsd", w, grad_y)
    grad_w = torch.einsum("bhtd,bhsd->hts", grad_y, v.to(grad_y.dtype))
    return grad_w, grad_v


# The Toeplitz mixer's W[t, s] = k[t - s], built inside the op (mixing.py found trained full mixers
# close to it).

def offsets(past, T, S, device):
    """[T, S] offsets t - s of rows past .. past + T - 1 and columns 0 .. S - 1 (negative:
    masked)."""
    return past + torch.arange(T, device=device).unsqueeze(1) - torch.arange(S, device=device)


def toeplitz(kernel, past, T, S):
    """Rows past .. past + T - 1 of the masked Toeplitz matrix of kernel [h, L]: [h, T, S], entry
    (t, s) = kernel[past + t - s] where 0 <= past + t - s < L, 0 elsewhere (above the diagonal, past
    the kernel)."""
    k = offsets(past, T, S, kernel.device)
    return kernel[:, k.clamp(0, kernel.size(1) - 1)] * in_kernel(k, kernel)


def in_kernel(k, kernel):  # [T, S] bool: which offsets k the kernel [h, L] covers
    return (k >= 0) & (k < kernel.size(1))


class ToeplitzMatmul(torch.autograd.Function):
    """y = toeplitz(kernel) @ v for kernel [h, L] and v [B, h, S, dh] (rows past .. past + T - 1),
    saving only the kernel and v: the [T, S] matrix is built again in the backward, and its gradient
    (that of the full mixer) is summed along each diagonal onto the kernel entry it came from."""

    @staticmethod
    def forward(ctx, kernel, v, past, T):
        ctx.save_for_backward(kernel, v)
        ctx.past, ctx.T = past, T
        return torch.einsum("hts,bhsd->bhtd", toeplitz(kernel, past, T, v.size(2)).to(v.dtype), v)

    @staticmethod
    def backward(ctx, grad_y):
        kernel, v = ctx.saved_tensors
        S = v.size(2)
        w = toeplitz(kernel, ctx.past, ctx.T, S).to(grad_y.dtype)
        grad_w, grad_v = matmul_grads(w, v, grad_y)
        k = offsets(ctx.past, ctx.T, S, kernel.device)
        live = in_kernel(k, kernel)  # [T, S]
        grad_kernel = torch.zeros_like(kernel, dtype=grad_w.dtype)
        grad_kernel.index_add_(1, k[live], grad_w[:, live])
        return grad_kernel.to(kernel.dtype), grad_v.to(v.dtype), None, None


# The Toeplitz mixer convolves by FFT from this context length on, by the dtype its product runs
# in (the autocast dtype under autocast): where the FFT won in every round of bench --toeplitz
# (RESULTS.md section 2).
FFT_FROM = {"float32": 1024, "bfloat16": 2048}


def fft_from(v):  # the threshold for the dtype the product of v [B, h, S, dh] runs in
    autocast = torch.is_autocast_enabled(v.device.type)
    dtype = torch.get_autocast_dtype(v.device.type) if autocast else v.dtype
    return FFT_FROM.get(str(dtype).removeprefix("torch."), FFT_FROM["float32"])


class ToeplitzFFT(torch.autograd.Function):
    """toeplitz(kernel) @ v for the whole context at once (rows 0 .. S - 1), as a causal convolution
    by FFT: O(S log S) instead of O(S^2). In float32 (the CPU's FFT has no bf16). Like the dense
    kernels it saves only the kernel and v, and the backward computes their spectra again: autograd
    would keep complex float32 spectra of v, more than the dense product saves (RESULTS.md section
    3)."""

    @staticmethod
    def forward(ctx, kernel, v):
        ctx.save_for_backward(kernel, v)
        S = v.size(2)
        product = spectrum(kernel, S, dim=1).unsqueeze(-1) * spectrum(v, S, dim=2)
        y = first_of_inverse(product, S, dim=2)
        return y.to(v.dtype)  # [B, h, S, dh]

    @staticmethod
    def backward(ctx, grad_y):
        kernel, v = ctx.saved_tensors
        S = v.size(2)
        # y[t] = sum_m k[m] v[t - m], so grad_v[s] = sum_t k[t - s] g[t] and
        # grad_k[m] = sum_t g[t] v[t - m]: correlations, products with a conjugate spectrum
        g = spectrum(grad_y, S, dim=2)  # [B, h, S + 1, dh]
        grad_v = first_of_inverse(spectrum(kernel, S, dim=1).unsqueeze(-1).conj() * g, S, dim=2)
        per_offset = (g * spectrum(v, S, dim=2).conj()).sum((0, 3))
        grad_k = first_of_inverse(per_offset, S, dim=1)  # [h, S]: offsets 0 .. S - 1
        grad_kernel = torch.zeros_like(kernel)
        grad_kernel[:, :S] = grad_k[:, : kernel.size(1)]
        return grad_kernel, grad_v.to(v.dtype)


def spectrum(x, S, dim):
    """rfft of x's first S entries along dim, in float32, zero-padded to 2S: a product of two such
    spectra is a convolution that does not wrap around."""
    return torch.fft.rfft(x.narrow(dim, 0, min(S, x.size(dim))).float(), n=2 * S, dim=dim)


def first_of_inverse(product, S, dim):
    """The first S entries of the inverse of a product of spectrum()s."""
    return torch.fft.irfft(product, n=2 * S, dim=dim).narrow(dim, 0, S)


class Cache(dict):
    """The generation cache of one batch of sequences: each module's past inputs (mixing) or keys
    and values (attention) [B, h, t, dh] under its own keys, and length, the positions computed so
    far."""
    length = 0

    def append(self, key, new, keep=None):
        """self[key] then new [B, h, T, dh] along time, returned whole; the last `keep` positions
        stay (None: all)."""
        whole = torch.cat([self[key], new], dim=2) if key in self else new
        self[key] = whole if keep is None else whole[:, :, max(0, whole.size(2) - keep):]
        return whole
