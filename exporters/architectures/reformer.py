"""Reformer (Kitaev et al. 2020): LSH attention, reversible residual layers, chunked feed-forward.

Shape legend (see common.py): b batch, t length (padded to a multiple of the chunk length),
h heads, e head width, d model width, v vocabulary, r hash rounds, n chunks, c chunk length.

LSH attention: queries and keys share one projection (keys are the L2-normalised queries). Every
round hashes the vectors into buckets with a FIXED random rotation (a seeded buffer, so the same
input always gives the same output), sorts positions by (bucket, position), cuts the sorted
sequence into chunks of c and lets each chunk attend to itself and the chunk before it (the
causal variant narrows that further so the future cannot leak, see ``lsh_attention``). The r
rounds are combined weighted by each round's softmax normaliser (logsumexp).

Padding never changes what a real token computes: padding keys are masked, padding positions are
hashed into an extra bucket that sorts after every real one (so real tokens are chunked the same
however much padding a row carries), chunk 0 does not wrap around to look at the last chunk, and
positions count real tokens only (left padding does not shift them). A row's output is therefore
independent of the length it was padded to in a batch.

Export: no ``.item()``, no branch on tensor values; the only Python branches are on config fields.
Checked: the dynamo ONNX export with dynamic batch and sequence axes, and ``torch.jit.trace``, run
at lengths other than the export length (not multiples of c, and 4096+) and match eager.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exporters.architectures.common import (
    SPECIAL_TOKENS,
    FeedForward,
    LMHead,
    init_weights,
    require_positive,
    sinusoidal_positions,
)

# Score for a query attending to its own position: large enough that it loses to every real key,
# finite so it still beats the (far more negative) masked keys when nothing else is available.
SELF_SCORE = -1e5


def lsh_buckets(vecs: Tensor, rotations: Tensor, n_buckets: int) -> Tensor:
    """Angular LSH: bucket = argmax over [xR, -xR] for a random rotation R per round.

    vecs (b, h, t, e); rotations (h, e, r, n_buckets // 2) -> buckets (b, h, r, t) int64 in
    [0, n_buckets).
    """
    rotated = torch.einsum("bhte,herk->bhrtk", vecs, rotations.to(vecs.dtype))  # (b, h, r, t, k)
    return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)  # (b, h, r, t)


def _look_one_back(x: Tensor) -> Tensor:
    """(b, h, r, n, c, ...) -> (b, h, r, n, 2c, ...): each chunk followed by the previous one.

    Chunk 0 gets a block of zeros / False instead of wrapping around to the last chunk; the
    caller marks that block invalid. No wrap-around keeps outputs independent of padding.
    """
    prev = torch.cat([torch.zeros_like(x[:, :, :, :1]), x[:, :, :, :-1]], dim=3)
    return torch.cat([x, prev], dim=4)


def lsh_attention(
    qk: Tensor, v: Tensor, buckets: Tensor, key_mask: Tensor, chunk_length: int, causal: bool
) -> Tensor:
    """Shared-QK attention within LSH chunks, r rounds combined by logsumexp weighting.

    qk, v (b, h, t, e) with t a multiple of chunk_length; buckets (b, h, r, t) int64 (give padding
    a bucket above every real one to keep padding from re-chunking real tokens); key_mask (b, t)
    bool, True for real tokens. Returns (b, h, t, e). A query attends to its own position only
    when no other key is visible; a query with no valid key at all gets a finite (uniform) row.

    Bidirectional: a query sees every valid key of its chunk and the previous one. Causal: plain
    chunking would leak the future, since a later token's bucket shifts the chunk boundaries of
    earlier ones and so changes which keys they see. So a causal query sees only earlier keys of
    its OWN bucket at most c sorted slots back: within a bucket the sort is by position, so that
    set is "its up-to-c most recent same-bucket predecessors", a function of earlier tokens only.
    It always lies inside the chunk and the previous one, so the chunked shapes are unchanged.
    """
    b, h, t, e = qk.shape
    r = buckets.shape[2]
    c = chunk_length
    positions = torch.arange(t, device=qk.device)
    # bucket * t + position is unique, so the sort has no ties: eager and ONNX Runtime agree.
    order = torch.argsort(buckets * t + positions, dim=-1)  # (b, h, r, t) original positions
    flat = order.reshape(b, h, r * t, 1).expand(-1, -1, -1, e)  # (b, h, r*t, e)

    q = qk.gather(2, flat).reshape(b, h, r, -1, c, e).float()  # (b, h, r, n, c, e)
    k = F.normalize(q, dim=-1)  # shared QK: keys are unit-length queries
    v_sorted = v.gather(2, flat).reshape(b, h, r, -1, c, e)  # (b, h, r, n, c, e)
    pos_q = order.reshape(b, h, r, -1, c)  # (b, h, r, n, c)
    valid = key_mask[:, None, None, :].expand(b, h, r, t).gather(3, order)  # (b, h, r, t)
    valid = valid.reshape(b, h, r, -1, c)  # (b, h, r, n, c)
    bucket_q = buckets.gather(3, order).reshape(b, h, r, -1, c)  # (b, h, r, n, c)
    slot_q = positions.reshape(-1, c)  # (n, c) index in the sorted sequence

    k = _look_one_back(k)  # (b, h, r, n, 2c, e)
    v_sorted = _look_one_back(v_sorted)  # (b, h, r, n, 2c, e)
    pos_k = _look_one_back(pos_q)  # (b, h, r, n, 2c)
    valid = _look_one_back(valid)  # (b, h, r, n, 2c); chunk 0's look-back block is False

    # Scores and softmax in fp32 (bf16/fp16 models too) so the two mask levels stay ordered.
    scores = (q @ k.transpose(-1, -2)) * e**-0.5  # (b, h, r, n, c, 2c)
    scores = scores.masked_fill(pos_q[..., :, None] == pos_k[..., None, :], SELF_SCORE)
    masked = ~valid[..., None, :]  # (b, h, r, n, 1, 2c)
    if causal:
        bucket_k = _look_one_back(bucket_q)  # (b, h, r, n, 2c)
        slot_k = _look_one_back(slot_q[None, None, None])[0, 0, 0]  # (n, 2c)
        masked = (
            masked
            | (pos_k[..., None, :] > pos_q[..., :, None])
            | (bucket_k[..., None, :] != bucket_q[..., :, None])
            | (slot_k[:, None, :] < slot_q[:, :, None] - c)
        )  # (b, h, r, n, c, 2c)
    # Masked keys must lose even to the self score; finite so an all-masked row stays finite.
    scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min / 2)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (b, h, r, n, c, 1)
    out = torch.exp(scores - lse).to(v.dtype) @ v_sorted  # (b, h, r, n, c, e)

    # Undo the sort: order is a permutation, so argsort(order) is its inverse.
    undo = torch.argsort(order, dim=-1)  # (b, h, r, t)
    out = out.reshape(b, h, r, t, e).gather(3, undo[..., None].expand(-1, -1, -1, -1, e))
    lse = lse.reshape(b, h, r, t).gather(3, undo)  # (b, h, r, t)
    # Each round is a softmax over its own keys; weighting the rounds by softmax(lse) makes the
    # sum a softmax over the union of the rounds' keys (a key found twice counts twice).
    weights = torch.softmax(lse, dim=2).to(v.dtype)  # (b, h, r, t)
    return (out * weights[..., None]).sum(dim=2)  # (b, h, t, e)


@dataclass(frozen=True)
class ReformerConfig:
    vocab_size: int = 1024  # tokens, the special tokens of common.py included
    d_model: int = 64  # width of each of the two reversible streams (and of `hidden`)
    n_heads: int = 4  # attention heads h; d_model must be divisible by it
    n_layers: int = 2  # reversible blocks (one attention + one feed-forward each)
    d_ff: int = 256  # feed-forward inner width
    chunk_length: int = 32  # LSH chunk length c; inputs are padded internally to a multiple
    n_buckets: int = 8  # hash buckets per round (even: half are the negated rotations)
    n_hashes: int = 2  # hash rounds r; more rounds, fewer missed neighbours, r× the cost
    hash_seed: int = 0  # seeds the fixed rotations (layer i uses hash_seed + i)
    # Feed-forward applied over the sequence in pieces of this many tokens to cap the peak
    # (b, t, d_ff) activation in eager runs; 0 = one piece. The split is a Python loop whose trip
    # count depends on the length (dynamo freezes the sequence axis, a trace fails at other
    # lengths), so exporters must build the model with 0. The math is position-wise, so the same
    # state dict gives the same outputs either way.
    ff_chunk_size: int = 0
    causal: bool = True  # True: causal LM ("generate"); False: bidirectional encoder ("encode")
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon

    def __post_init__(self) -> None:
        for name in (
            "vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "chunk_length", "n_buckets",
            "n_hashes",
        ):  # fmt: skip
            require_positive(name, getattr(self, name))
        if self.vocab_size < len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size must hold the {len(SPECIAL_TOKENS)} special tokens, "
                f"got {self.vocab_size}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.n_buckets % 2:
            raise ValueError(f"n_buckets must be even, got {self.n_buckets}")
        if self.hash_seed < 0:
            raise ValueError(f"hash_seed must be non-negative, got {self.hash_seed}")
        if self.ff_chunk_size < 0:
            raise ValueError(
                f"ff_chunk_size must be >= 0 (0 = no chunking), got {self.ff_chunk_size}"
            )
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}")

    @property
    def task(self) -> str:
        return "generate" if self.causal else "encode"

    @property
    def max_positions(self) -> int | None:
        return None  # sinusoidal positions and chunked attention: no length limit

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class LSHSelfAttention(nn.Module):
    """F of the reversible block: LayerNorm -> shared-QK LSH attention -> output projection."""

    def __init__(self, config: ReformerConfig, layer: int) -> None:
        super().__init__()
        self.config = config
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.qk = nn.Linear(config.d_model, config.d_model, bias=False)
        self.v = nn.Linear(config.d_model, config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model)
        # Fixed rotations, saved with the weights: hashing is part of the model, not noise. A loaded
        # checkpoint's rotations win over the ones drawn here.
        generator = torch.Generator().manual_seed(config.hash_seed + layer)
        shape = (config.n_heads, config.head_dim, config.n_hashes, config.n_buckets // 2)
        self.register_buffer("rotations", torch.randn(shape, generator=generator))

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        """x (b, t, d), key_mask (b, t) bool, t a multiple of chunk_length -> (b, t, d)."""
        c = self.config
        x = self.norm(x)
        # unflatten, not view(b, t, ...), so no batch/length size is baked into a trace.
        qk = self.qk(x).unflatten(-1, (c.n_heads, c.head_dim)).transpose(1, 2)  # (b, h, t, e)
        v = self.v(x).unflatten(-1, (c.n_heads, c.head_dim)).transpose(1, 2)  # (b, h, t, e)
        buckets = lsh_buckets(qk, self.rotations, c.n_buckets)  # (b, h, r, t)
        buckets = buckets.masked_fill(~key_mask[:, None, None, :], c.n_buckets)  # pads last
        y = lsh_attention(qk, v, buckets, key_mask, c.chunk_length, c.causal)  # (b, h, t, e)
        return self.out(y.transpose(1, 2).flatten(2))  # (b, t, d)


class ChunkedFeedForward(nn.Module):
    """G of the reversible block: LayerNorm -> FeedForward, optionally in sequence chunks."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.chunk_size = config.ff_chunk_size
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ff = FeedForward(config.d_model, config.d_ff)

    def forward(self, x: Tensor) -> Tensor:
        """(b, t, d) -> (b, t, d)."""
        x = self.norm(x)
        if self.chunk_size == 0:  # config switch, not a tensor value: export-safe
            return self.ff(x)
        return torch.cat([self.ff(piece) for piece in x.split(self.chunk_size, dim=1)], dim=1)


class ReversibleBlock(nn.Module):
    """RevNet block as in Reformer: y1 = x1 + F(x2), y2 = x2 + G(y1).

    The inputs can be recomputed from the outputs (``inverse``), which is what lets Reformer
    train without storing activations. Training here uses ordinary autograd (activations are
    kept); only the forward math is the reversible formulation, so ``inverse`` is exact.
    """

    def __init__(self, config: ReformerConfig, layer: int) -> None:
        super().__init__()
        self.attn = LSHSelfAttention(config, layer)
        self.ff = ChunkedFeedForward(config)

    def forward(self, x1: Tensor, x2: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor]:
        """x1, x2 (b, t, d), key_mask (b, t) bool -> y1, y2 (b, t, d)."""
        y1 = x1 + self.attn(x2, key_mask)
        y2 = x2 + self.ff(y1)
        return y1, y2

    def inverse(self, y1: Tensor, y2: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor]:
        """y1, y2 (b, t, d), key_mask (b, t) bool -> the inputs x1, x2 of ``forward``."""
        x2 = y2 - self.ff(y1)
        x1 = y1 - self.attn(x2, key_mask)
        return x1, x2


class ReformerModel(nn.Module):
    """Embeddings duplicated into the two streams (x1 = x2), reversible blocks, then the MEAN of
    the two streams (the paper concatenates to 2d; the mean keeps ``hidden`` at d_model as the
    model contract requires), LayerNorm and the LM head."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(ReversibleBlock(config, i) for i in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.head = LMHead(config.d_model, config.vocab_size)
        init_weights(self)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """input_ids, attention_mask (b, t) int64 -> logits (b, t, v), hidden (b, t, d)."""
        t = input_ids.shape[1]
        c = self.config.chunk_length
        # Positions count real tokens only, so left padding (decoders) does not shift them;
        # pads get a repeated position but are masked as keys and their outputs are unused.
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (b, t)
        table = sinusoidal_positions(t, self.config.d_model, input_ids.device)  # (t, d)
        x = self.embed(input_ids) + table.to(self.embed.weight.dtype)[positions]  # (b, t, d)

        # Pad to a multiple of c. c is a Python constant, so (-t) % c is shape arithmetic that
        # both the dynamo exporter and the tracer keep symbolic (a symbolic divisor would not be).
        pad = (-t) % c
        x = F.pad(x, (0, 0, 0, pad))  # (b, t + pad, d)
        key_mask = F.pad(attention_mask, (0, pad)).bool()  # (b, t + pad)

        x1, x2 = x, x
        for block in self.blocks:
            x1, x2 = block(x1, x2, key_mask)
        hidden = self.norm((x1 + x2) / 2)[:, :t]  # (b, t, d)
        return self.head(hidden), hidden
