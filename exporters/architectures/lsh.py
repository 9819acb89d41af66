"""The Reformer's attention math as pure functions: angular LSH hashing, chunked shared-QK LSH
attention under Longhaul's rule (``lsh_attention``) and under HF's (``hf_lsh_attention``), the
cached form of Longhaul's rule (``lsh_attention_cached``) and HF's "local" chunked attention.
The modules that own the parameters are in reformer.py.

Shape legend: b batch, t length (a multiple of the chunk length), h heads, e head width, r hash
rounds, n chunks, c chunk length, s cached + new length.

Both LSH rules share the first half (``sort_into_chunks``): sort positions by (bucket, position),
cut the sorted sequence into chunks of c and let each chunk attend to itself and the chunk before
it; and the last (``_attend``, ``_unsort``): scores in fp32, a query's own position scored
SELF_SCORE, rounds combined by their softmax normalisers. They differ in four places, each a
line of the rule functions: keys, score scale, look-back, causal mask and the round weights.
Longhaul's rule keeps a row's output independent of padding and, causally, of later tokens
(so it can be cached); HF's reproduces ``transformers`` exactly (see reformer.py's docstring).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Score for a query attending to its own position: large enough that it loses to every real key,
# finite so it still beats the (far more negative) masked keys when nothing else is available.
SELF_SCORE = -1e5
# HF's length normalisation epsilon for LSH keys (hf_lsh_attention only).
HF_KEY_EPS = 1e-6


def lsh_buckets(vecs: Tensor, rotations: Tensor, factors: Sequence[int]) -> Tensor:
    """Angular LSH: bucket = argmax over [xR, -xR] for a random rotation R per round.

    vecs (b, h, t, e); rotations (h, e, r, sum(factors) // 2) -> buckets (b, h, r, t) int64 in
    [0, prod(factors)). One factor is the paper's hashing into that many buckets. Several are
    HF's factorised hashing (``num_buckets`` as a list): factor i hashes with its own slice of
    f_i / 2 rotation columns, and the bucket is the mixed-radix number of the per-factor
    buckets, ``b_0 + f_0·b_1 + f_0·f_1·b_2 ...``; 64 × 128 buckets then cost 96 columns, not
    4096. The factors are config constants, so the loop unrolls in an exported graph.
    """
    rotated = torch.einsum("bhte,herk->bhrtk", vecs, rotations.to(vecs.dtype))  # (b, h, r, t, k)
    buckets = torch.zeros(rotated.shape[:-1], dtype=torch.long, device=vecs.device)
    start, radix = 0, 1
    for factor in factors:
        part = rotated[..., start : start + factor // 2]  # (b, h, r, t, f/2)
        buckets = buckets + radix * torch.cat([part, -part], dim=-1).argmax(dim=-1)
        start, radix = start + factor // 2, radix * factor
    return buckets  # (b, h, r, t)


def look_one_back(x: Tensor, wrap: bool = False) -> Tensor:
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


class Chunks(NamedTuple):
    """The sequence sorted by (bucket, position) per round and cut into chunks of c."""

    order: Tensor  # (b, h, r, t) int64: the original position at each sorted slot
    q: Tensor  # (b, h, r, n, c, e) fp32 shared-QK vectors
    v: Tensor  # (b, h, r, n, c, e) values, in the model dtype
    pos: Tensor  # (b, h, r, n, c) int64 original positions
    valid: Tensor  # (b, h, r, n, c) bool, True for real tokens
    bucket: Tensor  # (b, h, r, n, c) int64


def sort_into_chunks(
    qk: Tensor, v: Tensor, buckets: Tensor, key_mask: Tensor, chunk_length: int
) -> Chunks:
    """qk, v (b, h, t, e), buckets (b, h, r, t) int64, key_mask (b, t) bool -> :class:`Chunks`."""
    b, h, t, e = qk.shape
    r = buckets.shape[2]
    c = chunk_length
    positions = torch.arange(t, device=qk.device)
    # bucket * t + position is unique, so the sort has no ties: eager and ONNX Runtime agree.
    order = torch.argsort(buckets * t + positions, dim=-1)  # (b, h, r, t) original positions
    flat = order.reshape(b, h, r * t, 1).expand(-1, -1, -1, e)  # (b, h, r*t, e)
    valid = key_mask[:, None, None, :].expand(b, h, r, t).gather(3, order)  # (b, h, r, t)
    return Chunks(
        order=order,
        q=qk.gather(2, flat).reshape(b, h, r, -1, c, e).float(),
        v=v.gather(2, flat).reshape(b, h, r, -1, c, e),
        pos=order.reshape(b, h, r, -1, c),
        valid=valid.reshape(b, h, r, -1, c),
        bucket=buckets.gather(3, order).reshape(b, h, r, -1, c),
    )


def _attend(
    scores: Tensor, masked: Tensor, pos_q: Tensor, pos_k: Tensor, v: Tensor
) -> tuple[Tensor, Tensor]:
    """Softmax within each chunk. scores (b, h, r, n, c, 2c) fp32; masked broadcastable to it;
    pos_q (.., n, c), pos_k (.., n, 2c) original positions; v (b, h, r, n, 2c, e) -> out
    (b, h, r, n, c, e), lse (b, h, r, n, c, 1)."""
    scores = scores.masked_fill(pos_q[..., :, None] == pos_k[..., None, :], SELF_SCORE)
    # Masked keys must lose even to the self score; finite so an all-masked row stays finite.
    scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min / 2)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.exp(scores - lse).to(v.dtype) @ v, lse


def _unsort(out: Tensor, lse: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """Back to original positions: out (b, h, r, n, c, e), lse (b, h, r, n, c, 1) -> (b, h, r,
    t, e), (b, h, r, t). order is a permutation, so argsort(order) is its inverse."""
    b, h, r, t = order.shape
    e = out.shape[-1]
    undo = torch.argsort(order, dim=-1)  # (b, h, r, t)
    out = out.reshape(b, h, r, t, e).gather(3, undo[..., None].expand(-1, -1, -1, -1, e))
    return out, lse.reshape(b, h, r, t).gather(3, undo)


def lsh_attention(
    qk: Tensor, v: Tensor, buckets: Tensor, key_mask: Tensor, chunk_length: int, causal: bool
) -> Tensor:
    """Longhaul's rule: shared-QK attention within LSH chunks, r rounds combined by logsumexp
    weighting.

    qk, v (b, h, t, e) with t a multiple of chunk_length; buckets (b, h, r, t) int64 (give padding
    a bucket above every real one to keep padding from re-chunking real tokens); key_mask (b, t)
    bool, True for real tokens. Returns (b, h, t, e). A query attends to its own position only
    when no other key is visible; a query with no valid key at all gets a finite (uniform) row.

    Bidirectional: a query sees every valid key of its chunk and the previous one (chunk 0 does
    not wrap around). Causal: plain chunking would leak the future, since a later token's bucket
    shifts the chunk boundaries of earlier ones and so changes which keys they see. So a causal
    query sees only earlier keys of its OWN bucket at most c sorted slots back: within a bucket
    the sort is by position, so that set is "its up-to-c most recent same-bucket predecessors",
    a function of earlier tokens only. It always lies inside the chunk and the previous one, so
    the chunked shapes are unchanged.
    """
    e, c = qk.shape[-1], chunk_length
    ch = sort_into_chunks(qk, v, buckets, key_mask, c)
    k = look_one_back(F.normalize(ch.q, dim=-1))  # (b, h, r, n, 2c, e) unit-length queries
    pos_k = look_one_back(ch.pos)  # (b, h, r, n, 2c)
    masked = ~look_one_back(ch.valid)[..., None, :]  # (b, h, r, n, 1, 2c); chunk 0's block too
    if causal:
        slot_q = torch.arange(qk.shape[2], device=qk.device).reshape(-1, c)  # (n, c) sorted slot
        slot_k = look_one_back(slot_q[None, None, None])[0, 0, 0]  # (n, 2c)
        masked = (
            masked
            | (pos_k[..., None, :] > ch.pos[..., :, None])
            | (look_one_back(ch.bucket)[..., None, :] != ch.bucket[..., :, None])
            | (slot_k[:, None, :] < slot_q[:, :, None] - c)
        )  # (b, h, r, n, c, 2c)
    scores = (ch.q @ k.transpose(-1, -2)) * e**-0.5  # (b, h, r, n, c, 2c)
    out, lse = _unsort(*_attend(scores, masked, ch.pos, pos_k, look_one_back(ch.v)), ch.order)
    # Each round is a softmax over its own keys; weighting the rounds by softmax(lse) makes the
    # sum a softmax over the union of the rounds' keys (a key found twice counts twice).
    weights = torch.softmax(lse, dim=2)  # (b, h, r, t)
    return (out * weights.to(v.dtype)[..., None]).sum(dim=2)  # (b, h, t, e)


def hf_lsh_attention(
    qk: Tensor,
    v: Tensor,
    buckets: Tensor,
    key_mask: Tensor,
    chunk_length: int,
    causal: bool,
    hf_plain: Tensor | None = None,
) -> Tensor:
    """HF ``transformers``' rule, for imported checkpoints; arguments and shapes as
    :func:`lsh_attention`. ``hf_plain`` (0-d bool): HF attends plainly because the model's input
    was no longer than its shortest chunk.

    It differs from Longhaul's rule in: keys are HF's ``x · rsqrt(mean(x²) + 1e-6) / √e`` and
    scores are not scaled again; the look-back wraps (chunk 0 of round k sees the last chunk of
    round k − 1); the causal mask is by position only (any earlier key of the chunk or the one
    before); and rounds are combined with HF's ``exp(lse − logsumexp(lse))``.
    """
    t, e, c = qk.shape[2], qk.shape[-1], chunk_length
    ch = sort_into_chunks(qk, v, buckets, key_mask, c)
    # RMS-normalise, then divide by √e (≈ unit length), and leave the scores unscaled.
    k = ch.q * torch.rsqrt(ch.q.pow(2).mean(dim=-1, keepdim=True) + HF_KEY_EPS) / math.sqrt(e)
    k = look_one_back(k, wrap=True)  # (b, h, r, n, 2c, e)
    pos_k = look_one_back(ch.pos, wrap=True)  # (b, h, r, n, 2c)
    plain = _hf_plain(t, c, qk.device, hf_plain)
    valid = _drop_look_back(look_one_back(ch.valid, wrap=True), plain, c)  # (b, h, r, n, 2c)
    masked = ~valid[..., None, :]  # (b, h, r, n, 1, 2c)
    if causal:
        masked = masked | (pos_k[..., None, :] > ch.pos[..., :, None])  # (b, h, r, n, c, 2c)
    scores = ch.q @ k.transpose(-1, -2)  # (b, h, r, n, c, 2c)
    v_k = look_one_back(ch.v, wrap=True)
    out, lse = _unsort(*_attend(scores, masked, ch.pos, pos_k, v_k), ch.order)
    # HF's arithmetic, not just its math: exp(lse − logsumexp) rounds at the magnitude of
    # SELF_SCORE for a token that sees only itself (the first one), so its rounds' weights sum
    # to ≈ 0.998, not 1 as with softmax (which subtracts the max first). Plain attention has no
    # rounds to combine in HF (every round here is the same): keep softmax.
    hf_weights = torch.exp(lse - torch.logsumexp(lse, dim=2, keepdim=True))
    weights = torch.where(plain, torch.softmax(lse, dim=2), hf_weights)  # (b, h, r, t)
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
    """The causal rule of :func:`lsh_attention` (Longhaul's, not HF's) for t NEW queries
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
    :func:`hf_lsh_attention`. Returns (b, h, t, e).
    """
    b, h, t, e = q.shape
    c = chunk_length
    positions = torch.arange(t, device=q.device)
    # A singleton "round" axis so the LSH chunk helpers apply unchanged.
    q = q.unflatten(2, (1, -1, c)).float()  # (b, h, 1, n, c, e)
    k = look_one_back(k.unflatten(2, (1, -1, c)).float(), wrap)  # (b, h, 1, n, 2c, e)
    v = look_one_back(v.unflatten(2, (1, -1, c)), wrap)  # (b, h, 1, n, 2c, e)
    pos_q = positions.reshape(1, 1, 1, -1, c)  # (1, 1, 1, n, c)
    pos_k = look_one_back(pos_q, wrap)  # (1, 1, 1, n, 2c)
    valid = look_one_back(key_mask.reshape(b, 1, 1, -1, c), wrap)  # (b, 1, 1, n, 2c)
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
