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

Incremental decoding (causal native models, ``ReformerModel.supports_kv_cache``): the causal
rule makes a token's output a function of earlier tokens only, so ``forward_step`` reads each
layer's cached qk vectors and values (ALiBi's cache layout: one (qk, v) pair per layer) and
returns the new tokens' entries, and ``lsh_attention_cached`` applies the same rule to the new
tokens without sorting; it equals
``forward`` up to float rounding. Padding slots may sit anywhere in the past (positions and
bucket ranks count real tokens only); ``forward_cached`` returns the whole present cache.

HF-compatible mode (``hf_compatible=True``, for checkpoints imported from HF ``transformers``)
reproduces HF's ``ReformerModelWithLMHead`` instead, and so gives up both properties above:

* chunk look-back wraps: HF concatenates the hash rounds into one sorted sequence, so the first
  chunk of round k looks back at the last chunk of round k − 1 (round 0 at the last round's);
* the causal LSH mask is by position only (any earlier key of the chunk or the previous chunk),
  so a later token, by moving chunk boundaries, can change an earlier token's output, and a row's
  output depends on how far it was padded (HF pads to a multiple of the chunk lengths too);
* keys are HF's ``x · rsqrt(mean(x²) + 1e-6) / √e``, scores are not scaled again, and rounds are
  combined with HF's ``exp(lse − logsumexp(lse))``, which rounds differently from a softmax.

Where HF attends plainly (no chunks, no hashing), because the input fits its shortest chunk
length or the padded sequence fits a layer's chunk, every real token here already sits in chunk
0 of every round, so the chunked computation is that same attention once the look-back block
(padding or repeated keys then) is masked and rounds are combined by softmax (``hf_plain``).
Positions still count real tokens, so for unpadded and right-padded inputs the outputs equal
HF's. Other HF pieces are ordinary options: "local" layers (``attn_layers``), learned or axial
position tables (``position_embedding``), a head width other than d/h (``attn_head_dim``), the
concatenated streams (``stream_merge``) and the feed-forward ``activation``.

Export: no ``.item()``, no branch on tensor values; the only Python branches are on config fields.
Checked: the dynamo ONNX export with dynamic batch and sequence axes, and ``torch.jit.trace``, run
at lengths other than the export length (not multiples of c, and 4096+) and match eager.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exporters.architectures.common import (
    SPECIAL_TOKENS,
    Activation,
    FeedForward,
    LayerCache,
    LMHead,
    StackedCacheMixin,
    init_weights,
    require_choice,
    require_positive,
    require_token_ids,
    sinusoidal_positions,
)

AttentionKind = Literal["lsh", "local"]
PositionEmbedding = Literal["sinusoidal", "learned", "axial"]
StreamMerge = Literal["mean", "concat"]

# Score for a query attending to its own position: large enough that it loses to every real key,
# finite so it still beats the (far more negative) masked keys when nothing else is available.
SELF_SCORE = -1e5
# RMS of a sinusoidal encoding is 1/sqrt(2) per dimension; this brings it to 0.02 (init std).
SINUSOID_SCALE = 0.02 * 2**0.5
# HF's length normalisation epsilon for LSH keys (hf_compatible only).
HF_KEY_EPS = 1e-6


def lsh_buckets(vecs: Tensor, rotations: Tensor, n_buckets: int) -> Tensor:
    """Angular LSH: bucket = argmax over [xR, -xR] for a random rotation R per round.

    vecs (b, h, t, e); rotations (h, e, r, n_buckets // 2) -> buckets (b, h, r, t) int64 in
    [0, n_buckets).
    """
    rotated = torch.einsum("bhte,herk->bhrtk", vecs, rotations.to(vecs.dtype))  # (b, h, r, t, k)
    return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)  # (b, h, r, t)


def _look_one_back(x: Tensor, wrap: bool = False) -> Tensor:
    """(b, h, r, n, c, ...) -> (b, h, r, n, 2c, ...): each chunk followed by the previous one.

    Without ``wrap``, chunk 0 gets a block of zeros / False instead of wrapping around to the
    last chunk; the caller marks that block invalid. No wrap-around keeps outputs independent of
    padding. With ``wrap`` (HF), the r rounds form one sequence of r·n chunks and chunk 0 of round
    k looks back at the last chunk of round k − 1, round 0 at the last round's.
    """
    if wrap:
        flat = x.flatten(2, 3)  # (b, h, r*n, c, ...)
        prev = torch.cat([flat[:, :, -1:], flat[:, :, :-1]], dim=2).unflatten(2, x.shape[2:4])
    else:
        prev = torch.cat([torch.zeros_like(x[:, :, :, :1]), x[:, :, :, :-1]], dim=3)
    return torch.cat([x, prev], dim=4)


def _hf_plain(t: int, c: int, device: torch.device, hf_plain: Tensor | None) -> Tensor:
    """0-d bool: would HF run this layer as plain attention (no chunks, no hash rounds)?

    HF does when the (padded) sequence fits one chunk, or when the model's input was no longer
    than its shortest chunk length (``hf_plain``, then HF pads nothing). Computed from shapes as
    a tensor, not a Python bool, so an exported graph decides it again for every length.
    """
    plain = torch.arange(t, device=device)[-1] < c
    return plain if hf_plain is None else plain | hf_plain


def _drop_look_back(valid: Tensor, plain: Tensor, c: int) -> Tensor:
    """valid (..., n, 2c) -> the same with the look-back block masked where ``plain``.

    In plain attention the real tokens all sit in chunk 0 of a round and the wrapped look-back
    holds either padding or the same keys again. A softmax ignores a uniform repeat except
    through rounding at SELF_SCORE: a first token that can attend only to itself would weigh
    2 × exp(−1e5 − lse) with lse rounded at magnitude 1e5, 0.4% off instead of exactly 1.
    """
    look_back = torch.arange(2 * c, device=valid.device) >= c  # (2c,)
    return valid & ~(look_back & plain)


def lsh_attention(
    qk: Tensor,
    v: Tensor,
    buckets: Tensor,
    key_mask: Tensor,
    chunk_length: int,
    causal: bool,
    hf_compatible: bool = False,
    hf_plain: Tensor | None = None,
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

    ``hf_compatible``: HF's rules instead (module docstring): wrapped look-back, causal by
    position only, HF's key normalisation and score scale; ``hf_plain`` (0-d bool) says that HF
    would attend plainly because the model's input was no longer than its shortest chunk.
    """
    b, h, t, e = qk.shape
    r = buckets.shape[2]
    c = chunk_length
    positions = torch.arange(t, device=qk.device)
    # bucket * t + position is unique, so the sort has no ties: eager and ONNX Runtime agree.
    order = torch.argsort(buckets * t + positions, dim=-1)  # (b, h, r, t) original positions
    flat = order.reshape(b, h, r * t, 1).expand(-1, -1, -1, e)  # (b, h, r*t, e)

    q = qk.gather(2, flat).reshape(b, h, r, -1, c, e).float()  # (b, h, r, n, c, e)
    if hf_compatible:
        # HF: RMS-normalise, then divide by √e (≈ unit length), and leave the scores unscaled.
        k = q * torch.rsqrt(q.pow(2).mean(dim=-1, keepdim=True) + HF_KEY_EPS) / math.sqrt(e)
        scale = 1.0
    else:
        k = F.normalize(q, dim=-1)  # shared QK: keys are unit-length queries
        scale = e**-0.5
    v_sorted = v.gather(2, flat).reshape(b, h, r, -1, c, e)  # (b, h, r, n, c, e)
    pos_q = order.reshape(b, h, r, -1, c)  # (b, h, r, n, c)
    valid = key_mask[:, None, None, :].expand(b, h, r, t).gather(3, order)  # (b, h, r, t)
    valid = valid.reshape(b, h, r, -1, c)  # (b, h, r, n, c)
    bucket_q = buckets.gather(3, order).reshape(b, h, r, -1, c)  # (b, h, r, n, c)
    slot_q = positions.reshape(-1, c)  # (n, c) index in the sorted sequence

    wrap = hf_compatible
    k = _look_one_back(k, wrap)  # (b, h, r, n, 2c, e)
    v_sorted = _look_one_back(v_sorted, wrap)  # (b, h, r, n, 2c, e)
    pos_k = _look_one_back(pos_q, wrap)  # (b, h, r, n, 2c)
    valid = _look_one_back(valid, wrap)  # (b, h, r, n, 2c); unwrapped: chunk 0's block is False
    plain = _hf_plain(t, c, qk.device, hf_plain)
    if wrap:
        valid = _drop_look_back(valid, plain, c)

    # Scores and softmax in fp32 (bf16/fp16 models too) so the two mask levels stay ordered.
    scores = (q @ k.transpose(-1, -2)) * scale  # (b, h, r, n, c, 2c)
    scores = scores.masked_fill(pos_q[..., :, None] == pos_k[..., None, :], SELF_SCORE)
    masked = ~valid[..., None, :]  # (b, h, r, n, 1, 2c)
    if causal and hf_compatible:
        masked = masked | (pos_k[..., None, :] > pos_q[..., :, None])  # (b, h, r, n, c, 2c)
    elif causal:
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
    weights = torch.softmax(lse, dim=2)  # (b, h, r, t)
    if hf_compatible:
        # HF's arithmetic, not just its math: exp(lse − logsumexp) rounds at the magnitude of
        # SELF_SCORE for a token that sees only itself (the first one), so its rounds' weights
        # sum to ≈ 0.998, not 1 as with softmax (which subtracts the max first). Plain attention
        # has no rounds to combine in HF (every round here is the same): keep softmax.
        hf_weights = torch.exp(lse - torch.logsumexp(lse, dim=2, keepdim=True))
        weights = torch.where(plain, weights, hf_weights)
    return (out * weights.to(v.dtype)[..., None]).sum(dim=2)  # (b, h, t, e)


def lsh_attention_cached(
    q_new: Tensor,
    qk_all: Tensor,
    v_all: Tensor,
    buckets_all: Tensor,
    key_mask: Tensor,
    chunk_length: int,
    n_buckets: int,
) -> Tensor:
    """The causal rule of :func:`lsh_attention` (native, not hf_compatible) for t NEW queries
    over s cached + new keys, without sorting or chunking.

    q_new (b, h, t, e): the new tokens' shared-QK vectors, which are also the LAST t of
    qk_all, v_all (b, h, s, e); buckets_all (b, h, r, s) int64 in [0, n_buckets]; key_mask
    (b, s) bool, True for real tokens (padding is moved to bucket n_buckets here). Returns
    (b, h, t, e).

    A causal query sees, per round, itself and its up-to-c most recent valid predecessors in its
    own bucket (lsh_attention's docstring): in the (bucket, slot) order those are the c + 1
    sorted positions ending at its own. That order needs no sort: a key's sorted position is the
    number of valid keys in lower buckets plus its rank in its own bucket, both cumulative counts
    over a one-hot of the buckets, and scattering slots to those positions inverts it. Each
    query then gathers its c + 1 candidates and masks those outside its bucket (or before the
    first). Itself scores SELF_SCORE, so it counts only when nothing else is visible; scores are
    fp32 and rounds are combined by softmax over their logsumexp, as in :func:`lsh_attention`,
    so the outputs equal a full forward's up to float rounding. Cost O(s·n_buckets + t·c·e) per
    round and head: O(s) for one decoded token.
    """
    b, h, t, e = q_new.shape
    s = qk_all.shape[-2]
    r = buckets_all.shape[2]
    c = chunk_length
    device = q_new.device
    buckets = buckets_all.masked_fill(~key_mask[:, None, None, :], n_buckets)  # (b, h, r, s)
    one_hot = buckets[..., None] == torch.arange(n_buckets + 1, device=device)  # (..., s, nb+1)
    counts = one_hot.long().cumsum(dim=3)  # (b, h, r, s, nb+1) keys of each bucket at <= slot
    rank = counts.gather(4, buckets[..., None])[..., 0]  # (b, h, r, s), 1 for a bucket's first
    totals = counts[:, :, :, -1]  # (b, h, r, nb+1) keys per bucket
    offsets = totals.cumsum(dim=-1) - totals  # (b, h, r, nb+1) keys in lower buckets
    sorted_pos = offsets.gather(3, buckets) + rank - 1  # (b, h, r, s) a permutation of slots
    slots = torch.arange(s, device=device).expand(b, h, r, s)
    order = torch.zeros_like(sorted_pos).scatter(3, sorted_pos, slots)  # sorted pos -> slot

    # Candidates of each new query: the sorted positions pos − c .. pos (pos = its own).
    back = torch.arange(c + 1, device=device)  # (c+1,) 0 = the query itself
    window = sorted_pos[..., s - t :, None] - back  # (b, h, r, t, c+1)
    cand = order.gather(3, window.clamp(min=0).flatten(3))  # (b, h, r, t*(c+1)) key slots
    visible = (
        (window >= 0)
        & (buckets.gather(3, cand).unflatten(3, (t, c + 1)) == buckets[..., s - t :, None])
        & key_mask[:, None, None, :].expand(b, h, r, s).gather(3, cand).unflatten(3, (t, c + 1))
    )  # (b, h, r, t, c+1); same bucket and not before its first key => at or before the query

    index = cand.reshape(b, h, -1, 1).expand(-1, -1, -1, e)  # (b, h, r*t*(c+1), e)
    k = F.normalize(qk_all.float(), dim=-1).gather(2, index)  # shared QK: unit-length queries
    k = k.reshape(b, h, r, t, c + 1, e)
    v = v_all.gather(2, index).reshape(b, h, r, t, c + 1, e)
    q = q_new.float()[:, :, None, :, None, :]  # (b, h, 1, t, 1, e)
    scores = (q @ k.transpose(-1, -2))[..., 0, :] * e**-0.5  # (b, h, r, t, c+1)
    scores = scores.masked_fill(back == 0, SELF_SCORE)
    # Masked keys must lose even to the self score; finite so an all-masked row stays finite.
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min / 2)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (b, h, r, t, 1)
    probs = torch.exp(scores - lse).to(v.dtype)[..., None, :]  # (b, h, r, t, 1, c+1)
    out = (probs @ v)[..., 0, :]  # (b, h, r, t, e)
    weights = torch.softmax(lse, dim=2)  # (b, h, r, t, 1): softmax over the rounds' keys
    return (out * weights.to(v.dtype)).sum(dim=2)  # (b, h, t, e)


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor,
    chunk_length: int,
    causal: bool,
    wrap: bool,
    hf_plain: Tensor | None = None,
) -> Tensor:
    """Chunked attention by position (HF Reformer's "local" layers): each chunk of c positions
    attends to itself and the previous chunk; causal queries see no later key. No self mask.

    q, k, v (b, h, t, e) with t a multiple of chunk_length; key_mask (b, t) bool. ``wrap``: chunk
    0 looks back at the last chunk (HF) instead of at nothing; under the causal mask both are the
    same (the last chunk lies in chunk 0's future, or is chunk 0 itself). ``hf_plain``: as in
    :func:`lsh_attention`. Returns (b, h, t, e).
    """
    b, h, t, e = q.shape
    c = chunk_length
    positions = torch.arange(t, device=q.device)
    # A singleton "round" axis so the LSH chunk helpers apply unchanged.
    q = q.unflatten(2, (1, -1, c)).float()  # (b, h, 1, n, c, e)
    k = _look_one_back(k.unflatten(2, (1, -1, c)).float(), wrap)  # (b, h, 1, n, 2c, e)
    v = _look_one_back(v.unflatten(2, (1, -1, c)), wrap)  # (b, h, 1, n, 2c, e)
    pos_q = positions.reshape(1, 1, 1, -1, c)  # (1, 1, 1, n, c)
    pos_k = _look_one_back(pos_q, wrap)  # (1, 1, 1, n, 2c)
    valid = _look_one_back(key_mask.reshape(b, 1, 1, -1, c), wrap)  # (b, 1, 1, n, 2c)
    if wrap:
        valid = _drop_look_back(valid, _hf_plain(t, c, q.device, hf_plain), c)

    scores = (q @ k.transpose(-1, -2)) * e**-0.5  # (b, h, 1, n, c, 2c)
    masked = ~valid[..., None, :]  # (b, 1, 1, n, 1, 2c)
    if causal:
        masked = masked | (pos_k[..., None, :] > pos_q[..., :, None])
    # Finite: a padding query with no visible key gets a uniform row instead of NaN.
    scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min / 2)
    out = torch.softmax(scores, dim=-1).to(v.dtype) @ v  # (b, h, 1, n, c, e)
    return out.reshape(b, h, t, e)


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
    # The fields below let HF Reformer checkpoints run on this architecture unforked; their
    # defaults are Longhaul's own model (see the module docstring for hf_compatible).
    hf_compatible: bool = False  # HF's LSH rules: wrapped look-back, causal by position, HF keys
    attn_layers: tuple[AttentionKind, ...] = ()  # per layer "lsh" | "local"; () = all "lsh"
    local_chunk_length: int = 64  # chunk length of "local" layers (own + previous chunk)
    attn_head_dim: int = 0  # head width e; 0 = d_model // n_heads (HF's attention_head_size)
    position_embedding: PositionEmbedding = "sinusoidal"  # or a "learned" / "axial" table
    max_position_embeddings: int = 0  # rows of the "learned" table
    axial_pos_shape: tuple[
        int, ...
    ] = ()  # "axial": (n0, n1), position p -> row p // n1, col p % n1
    axial_pos_dims: tuple[int, ...] = ()  # "axial": widths (d0, d1) of the two factors, d0 + d1 = d
    activation: Activation = "gelu_tanh"  # feed-forward activation (HF default: "relu")
    stream_merge: StreamMerge = "mean"  # "concat": LayerNorm + head over both streams (2d, HF)
    eos_token_id: int | None = 1  # generation stops here; None = only at the length limit
    pad_token_id: int = 0  # fills padded slots (always masked, so any id works)

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
        if self.attn_head_dim < 0:
            raise ValueError(f"attn_head_dim must be >= 0 (0 = d/h), got {self.attn_head_dim}")
        if not self.attn_head_dim and self.d_model % self.n_heads:
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
        # JSON gives lists; keep tuples so the frozen config stays hashable and compares equal.
        for name in ("attn_layers", "axial_pos_shape", "axial_pos_dims"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for kind in self.attn_layers:
            require_choice("attn_layers entries", kind, AttentionKind)
        if self.attn_layers and len(self.attn_layers) != self.n_layers:
            raise ValueError(
                f"attn_layers names {len(self.attn_layers)} layers, n_layers is {self.n_layers}"
            )
        require_positive("local_chunk_length", self.local_chunk_length)
        require_choice("position_embedding", self.position_embedding, PositionEmbedding)
        if self.position_embedding == "learned":
            require_positive("max_position_embeddings", self.max_position_embeddings)
        if self.position_embedding == "axial":
            if len(self.axial_pos_shape) != 2 or len(self.axial_pos_dims) != 2:
                raise ValueError(
                    "axial positions need axial_pos_shape and axial_pos_dims of two entries each, "
                    f"got {self.axial_pos_shape} and {self.axial_pos_dims}"
                )
            if min(*self.axial_pos_shape, *self.axial_pos_dims) <= 0:
                raise ValueError(
                    f"axial_pos_shape {self.axial_pos_shape} and axial_pos_dims "
                    f"{self.axial_pos_dims} must be positive"
                )
            if sum(self.axial_pos_dims) != self.d_model:
                raise ValueError(
                    f"axial_pos_dims {self.axial_pos_dims} must sum to d_model ({self.d_model})"
                )
        require_choice("activation", self.activation, Activation)
        require_choice("stream_merge", self.stream_merge, StreamMerge)
        require_token_ids(self.vocab_size, self.eos_token_id, self.pad_token_id)

    @property
    def task(self) -> str:
        return "generate" if self.causal else "encode"

    @property
    def max_positions(self) -> int | None:
        """Sinusoidal positions and chunked attention: no limit; a position table: its size."""
        if self.position_embedding == "learned":
            return self.max_position_embeddings
        if self.position_embedding == "axial":
            return self.axial_pos_shape[0] * self.axial_pos_shape[1]
        return None

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.n_heads

    @property
    def hidden_size(self) -> int:
        """Width of the ``hidden`` output: both streams side by side when concatenated."""
        return 2 * self.d_model if self.stream_merge == "concat" else self.d_model

    @property
    def layer_kinds(self) -> tuple[AttentionKind, ...]:
        all_lsh: tuple[AttentionKind, ...] = tuple("lsh" for _ in range(self.n_layers))
        return self.attn_layers or all_lsh

    @property
    def chunk_lengths(self) -> set[int]:
        """The chunk lengths of the layers in use (LSH, local or both)."""
        return {
            self.chunk_length if kind == "lsh" else self.local_chunk_length
            for kind in self.layer_kinds
        }

    @property
    def pad_multiple(self) -> int:
        """Inputs are padded to a multiple of every chunk length in use (HF pads the same)."""
        return math.lcm(*self.chunk_lengths)


class LSHSelfAttention(nn.Module):
    """F of the reversible block: LayerNorm -> shared-QK LSH attention -> output projection."""

    def __init__(self, config: ReformerConfig, layer: int) -> None:
        super().__init__()
        self.config = config
        inner = config.n_heads * config.head_dim
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.qk = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.out = nn.Linear(inner, config.d_model)
        # Fixed rotations, saved with the weights: hashing is part of the model, not noise. A loaded
        # checkpoint's rotations win over the ones drawn here.
        generator = torch.Generator().manual_seed(config.hash_seed + layer)
        shape = (config.n_heads, config.head_dim, config.n_hashes, config.n_buckets // 2)
        self.register_buffer("rotations", torch.randn(shape, generator=generator))

    def forward(self, x: Tensor, key_mask: Tensor, hf_plain: Tensor | None = None) -> Tensor:
        """x (b, t, d), key_mask (b, t) bool, t a multiple of chunk_length -> (b, t, d)."""
        c = self.config
        x = self.norm(x)
        # unflatten, not view(b, t, ...), so no batch/length size is baked into a trace.
        qk = self.qk(x).unflatten(-1, (c.n_heads, c.head_dim)).transpose(1, 2)  # (b, h, t, e)
        v = self.v(x).unflatten(-1, (c.n_heads, c.head_dim)).transpose(1, 2)  # (b, h, t, e)
        buckets = lsh_buckets(qk, self.rotations, c.n_buckets)  # (b, h, r, t)
        buckets = buckets.masked_fill(~key_mask[:, None, None, :], c.n_buckets)  # pads last
        y = lsh_attention(
            qk, v, buckets, key_mask, c.chunk_length, c.causal, c.hf_compatible, hf_plain
        )
        return self.out(y.transpose(1, 2).flatten(2))  # (b, h, t, e) -> (b, t, d)

    def forward_step(self, x: Tensor, key_mask: Tensor, past: LayerCache) -> tuple[Tensor, Tensor]:
        """Causal native models only: x (b, t, d) new tokens, key_mask (b, s) bool over the
        cached + new tokens (padding anywhere in the past), past (qk, v), each (b, h, s − t, e),
        of the cached slots -> (b, t, d), new (2, b, h, t, e): [qk, v] of the new tokens.
        Buckets are recomputed from the cached qk (the rotations are fixed), so qk and v are all
        a layer needs to keep. The caches are concatenated here: the bucket ranks read every
        key anyway, so a token costs O(s) either way."""
        c = self.config
        x = self.norm(x)
        qk = self.qk(x).unflatten(-1, (c.n_heads, c.head_dim)).transpose(1, 2)  # (b, h, t, e)
        v = self.v(x).unflatten(-1, (c.n_heads, c.head_dim)).transpose(1, 2)  # (b, h, t, e)
        qk_all = torch.cat([past[0], qk], dim=2)  # (b, h, s, e)
        v_all = torch.cat([past[1], v], dim=2)  # (b, h, s, e)
        buckets = lsh_buckets(qk_all, self.rotations, c.n_buckets)  # (b, h, r, s)
        buckets = buckets.masked_fill(~key_mask[:, None, None, :], c.n_buckets)
        y = lsh_attention_cached(qk, qk_all, v_all, buckets, key_mask, c.chunk_length, c.n_buckets)
        return self.out(y.transpose(1, 2).flatten(2)), torch.stack([qk, v])


class LocalSelfAttention(nn.Module):
    """F of a "local" reversible block: LayerNorm -> chunked attention by position -> projection.

    Unlike LSH attention, queries and keys have separate projections (HF's LocalSelfAttention).
    """

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.config = config
        inner = config.n_heads * config.head_dim
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.out = nn.Linear(inner, config.d_model)

    def forward(self, x: Tensor, key_mask: Tensor, hf_plain: Tensor | None = None) -> Tensor:
        """x (b, t, d), key_mask (b, t) bool, t a multiple of local_chunk_length -> (b, t, d)."""
        c = self.config
        x = self.norm(x)
        heads = (c.n_heads, c.head_dim)
        q = self.q(x).unflatten(-1, heads).transpose(1, 2)  # (b, h, t, e)
        k = self.k(x).unflatten(-1, heads).transpose(1, 2)  # (b, h, t, e)
        v = self.v(x).unflatten(-1, heads).transpose(1, 2)  # (b, h, t, e)
        y = local_attention(
            q, k, v, key_mask, c.local_chunk_length, c.causal, c.hf_compatible, hf_plain
        )
        return self.out(y.transpose(1, 2).flatten(2))  # (b, h, t, e) -> (b, t, d)


class ChunkedFeedForward(nn.Module):
    """G of the reversible block: LayerNorm -> FeedForward, optionally in sequence chunks."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.chunk_size = config.ff_chunk_size
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ff = FeedForward(config.d_model, config.d_ff, config.activation)

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
        self.attn: nn.Module = (
            LocalSelfAttention(config)
            if config.layer_kinds[layer] == "local"
            else LSHSelfAttention(config, layer)
        )
        self.ff = ChunkedFeedForward(config)

    def forward(
        self, x1: Tensor, x2: Tensor, key_mask: Tensor, hf_plain: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x1, x2 (b, t, d), key_mask (b, t) bool -> y1, y2 (b, t, d). ``hf_plain``: see
        :func:`lsh_attention` (hf_compatible models only)."""
        y1 = x1 + self.attn(x2, key_mask, hf_plain)
        y2 = x2 + self.ff(y1)
        return y1, y2

    def forward_step(
        self, x1: Tensor, x2: Tensor, key_mask: Tensor, past: LayerCache
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``forward`` for t new tokens (LSH layers of causal native models): x1, x2 (b, t, d),
        key_mask (b, s) bool, past (qk, v) each (b, h, s − t, e) -> y1, y2 (b, t, d), the new
        tokens' entries (2, b, h, t, e). F reads only x2, which for a new token depends on
        nothing but its own streams, so caching F's qk and v of every earlier token is enough."""
        a, new = self.attn.forward_step(x2, key_mask, past)  # type: ignore[operator]
        y1 = x1 + a
        y2 = x2 + self.ff(y1)
        return y1, y2, new

    def inverse(
        self, y1: Tensor, y2: Tensor, key_mask: Tensor, hf_plain: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """y1, y2 (b, t, d), key_mask (b, t) bool -> the inputs x1, x2 of ``forward``."""
        x2 = y2 - self.ff(y1)
        x1 = y1 - self.attn(x2, key_mask, hf_plain)
        return x1, x2


class ReformerModel(StackedCacheMixin, nn.Module):
    """Embeddings duplicated into the two streams (x1 = x2), reversible blocks, then the MEAN of
    the two streams (the paper concatenates to 2d; the mean keeps ``hidden`` at d_model as the
    model contract requires; ``stream_merge="concat"`` concatenates, as HF does), LayerNorm and
    the LM head."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        # Position tables only exist when configured, so sinusoidal models keep their key set.
        if config.position_embedding == "learned":
            self.pos_embed = nn.Embedding(config.max_position_embeddings, config.d_model)
        elif config.position_embedding == "axial":
            self.pos_axial = nn.ParameterList(
                nn.Parameter(torch.randn(n, dim))
                for n, dim in zip(config.axial_pos_shape, config.axial_pos_dims, strict=True)
            )
        self.blocks = nn.ModuleList(ReversibleBlock(config, i) for i in range(config.n_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = LMHead(config.hidden_size, config.vocab_size)
        init_weights(self)

    def _positions(self, positions: Tensor, t: int) -> Tensor:
        """(b, t) int64 positions -> (b, t, d) position embeddings, in the embedding dtype."""
        c = self.config
        dtype = self.embed.weight.dtype
        if c.position_embedding == "learned":
            return self.pos_embed(positions)
        if c.position_embedding == "axial":
            # The table is the outer "sum" of a row and a column factor: position p takes row
            # p // n1 of the first factor beside column p % n1 of the second. Gathering per
            # position avoids materialising all n0·n1 rows.
            cols = c.axial_pos_shape[1]
            row = torch.div(positions, cols, rounding_mode="floor")
            rows, cols_table = self.pos_axial
            return torch.cat([rows[row], cols_table[positions - row * cols]], dim=-1)
        # Scaled to the RMS of the N(0, 0.02) token embeddings: unscaled (RMS 0.7 per dim) the
        # position drowned the token 35:1 and the demo LM never got past the unigram loss.
        table = sinusoidal_positions(t, c.d_model, positions.device) * SINUSOID_SCALE
        return table.to(dtype)[positions]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """input_ids, attention_mask (b, t) int64 -> logits (b, t, v), hidden (b, t, hidden_size)
        (d_model, or 2·d_model for concatenated streams)."""
        t = input_ids.shape[1]
        limit = self.config.max_positions
        # Reads only a shape (export-safe); a table model cannot embed positions past its size.
        if limit is not None and t > limit:
            raise ValueError(f"input length {t} exceeds this Reformer's position table ({limit})")
        c = self.config.pad_multiple
        # Positions count real tokens only, so left padding (decoders) does not shift them;
        # pads get a repeated position but are masked as keys and their outputs are unused.
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (b, t)
        x = self.embed(input_ids) + self._positions(positions, t)  # (b, t, d)

        # Pad to a multiple of c. c is a Python constant, so (-t) % c is shape arithmetic that
        # both the dynamo exporter and the tracer keep symbolic (a symbolic divisor would not be).
        pad = (-t) % c
        x = F.pad(x, (0, 0, 0, pad))  # (b, t + pad, d)
        key_mask = F.pad(attention_mask, (0, pad)).bool()  # (b, t + pad)

        # HF pads nothing and attends plainly when the input fits its shortest chunk (a tensor
        # from the shape, so exported graphs decide it per call; unused unless hf_compatible).
        hf_plain = torch.arange(t, device=input_ids.device)[-1] < min(self.config.chunk_lengths)

        x1, x2 = x, x
        for block in self.blocks:
            x1, x2 = block(x1, x2, key_mask, hf_plain)
        merged = (
            torch.cat([x1, x2], dim=-1) if self.config.stream_merge == "concat" else (x1 + x2) / 2
        )
        hidden = self.norm(merged)[:, :t]  # (b, t, hidden_size)
        return self.head(hidden), hidden

    # --- incremental decoding (causal native models): the ALiBi cache convention

    @staticmethod
    def supports_kv_cache(config: ReformerConfig) -> bool:
        """Causal, native LSH rule, LSH layers only. Only then is a token's output a function of
        earlier tokens alone (module docstring), so a cache can reproduce the full forward.
        hf_compatible chunking lets later tokens move earlier ones' chunks; "local" layers chunk
        by padded slot, which left padding shifts."""
        return (
            config.causal
            and not config.hf_compatible
            and all(kind == "lsh" for kind in config.layer_kinds)
        )

    def _require_kv_cache(self) -> None:
        c = self.config
        if not self.supports_kv_cache(c):
            raise ValueError(
                "Reformer forward_cached needs a causal model with the native LSH rule and LSH "
                f"layers only (got causal={c.causal}, hf_compatible={c.hf_compatible}, "
                f"attn_layers={c.layer_kinds}); run forward() on the whole sequence instead"
            )

    def empty_cache(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        self._require_kv_cache()  # a clear error rather than a cache no forward_step accepts
        return super().empty_cache(batch_size, dtype, device)

    def forward_step(
        self, input_ids: Tensor, attention_mask: Tensor, past_key_values: Sequence[LayerCache]
    ) -> tuple[Tensor, Tensor]:
        """One prefill, chunk or decode step, equal to ``forward`` on the whole sequence up to
        float rounding (docs/decisions.md, "Reformer incremental decoding"), returning only the
        new tokens' cache entries (what the ``kv_cache`` graph exports).

        input_ids (b, t) int64; attention_mask (b, s + t) int64 over the cached and the new
        tokens, 0 at padding slots, which may sit anywhere in the past (real tokens, free slots,
        then the new token: positions and bucket ranks count real tokens only, and padded keys
        are never visible); past_key_values one (qk, v) pair per layer, each (b, h, s, e), s may
        be 0: the qk vectors (before normalisation) and the values of each LSH layer. Returns logits
        (b, t, v) and new_key_values (L, 2, b, h, t, e). No padding to a chunk multiple: the
        masks of :func:`lsh_attention_cached` replace the chunks.
        """
        self._require_kv_cache()
        total = attention_mask.shape[1]
        limit = self.config.max_positions
        if limit is not None and total > limit:  # a shape, not a value: export-safe
            raise ValueError(
                f"input length {total} exceeds this Reformer's position table ({limit})"
            )
        # Positions count real tokens only, as in forward: padding slots do not shift them.
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (b, s + t)
        positions = positions[:, past_key_values[0][0].shape[-2] :]  # (b, t)
        x = self.embed(input_ids) + self._positions(positions, total)  # (b, t, d)
        key_mask = attention_mask.bool()  # (b, s + t)
        x1, x2 = x, x
        news = []
        for layer, block in enumerate(self.blocks):
            x1, x2, new = block.forward_step(x1, x2, key_mask, past_key_values[layer])
            news.append(new)
        merged = (
            torch.cat([x1, x2], dim=-1) if self.config.stream_merge == "concat" else (x1 + x2) / 2
        )
        return self.head(self.norm(merged)), torch.stack(news)
