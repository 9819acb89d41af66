"""ALiBi causal decoder LM (Press et al. 2022, "Train Short, Test Long").

No position embeddings: every head adds a linear penalty −m·(i−j) to the score of query i for
key j, with a fixed per-head slope m. Because the penalty depends only on the distance, the model
runs past the length it was trained on.

Shape legend (see common.py): b batch, t new tokens, s keys (past + new), h heads, e head width,
d model width, v vocabulary, L layers.

``forward_step`` is what the exporter turns into the ``kv_cache`` graph: it reads the past as one
(key, value) pair of (b, h, s, e) tensors per layer and returns only the new tokens' entries
(L, 2, b, h, t, e), and attention scores the past and the new keys separately instead of
concatenating the caches, so a decode step copies nothing of size s (docs/decisions.md,
"kv-cache graphs return only the new entries", "one past input per layer"). ``forward_cached``
is the same step on one stacked cache (L, 2, b, h, s, e), returning the whole present cache,
for eager callers. Everything on that path is export-safe: no ``.item()``, no branch on tensor
values, every index built from an ``arange`` or ``cumsum`` of shapes.

The past may hold padding slots anywhere (mask 0): positions are ``cumsum(mask) - 1``, so they
shift no distance between real tokens, and padded keys are masked before the softmax.

A step of more than ``attention_block`` new tokens (a whole-sequence forward, a long prefill)
runs :func:`alibi_attention_blocked`: queries in blocks, each block's bias built from positions,
so memory is O(h · block · s) instead of O(h · t · s). Exported graphs take the unblocked form
(``attention_block=0``): their callers bound the new tokens per call (docs/decisions.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

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
    layer_caches,
    require_choice,
    require_positive,
    require_token_ids,
)

SlopeRule = Literal["paper", "mpt"]


def alibi_slopes(n_heads: int, bias_max: float = 8.0, rule: SlopeRule = "paper") -> Tensor:
    """(h,) per-head slopes.

    "paper" is exactly the official ``get_slopes`` (and BLOOM's): for h a power of two, the
    geometric sequence 2^(−8/h), 2^(−16/h), …, 2^(−8). Otherwise take the largest power of two
    n < h, use its slopes, and append every other slope of the 2n-head sequence (the ones falling
    between the n-head slopes) until there are h.

    "mpt" is MosaicML's variant: the sequence for the next power of two n ≥ h, and when n > h
    the odd-indexed slopes first, then the even-indexed ones, cut to h. For h a power of two the
    two rules agree. ``bias_max`` (MPT's ``alibi_bias_max``) replaces the 8 in the exponents.
    """
    require_positive("n_heads", n_heads)

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-bias_max * (i + 1) / n) for i in range(n)]

    if rule == "mpt":
        n = 2 ** math.ceil(math.log2(n_heads))
        slopes = power_of_two(n)
        if n != n_heads:
            slopes = (slopes[1::2] + slopes[0::2])[:n_heads]
    else:
        n = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(n) + power_of_two(2 * n)[0::2][: n_heads - n]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: Tensor, query_positions: Tensor, key_positions: Tensor) -> Tensor:
    """Additive score bias −m·(i−j).

    slopes (h,); query_positions (..., t) and key_positions (..., s), integer token positions.
    Returns (..., h, t, s) float32: (h, t, s) for 1-D positions, (b, h, t, s) for per-row ones.
    """
    rel = (query_positions[..., :, None] - key_positions[..., None, :]).to(slopes.dtype)
    return -slopes[:, None, None] * rel[..., None, :, :]  # (..., h, t, s)


class SplitBias(NamedTuple):
    """What attention adds and masks, for the past keys and the new keys kept apart (built once
    per step and shared by every layer): the past may hold padding slots anywhere."""

    past: Tensor  # (b, h, t, P) or (h, t, P) fp32 additive bias of the past keys
    new: Tensor  # (b, h, t, t) or (h, t, t) fp32 additive bias of the new keys
    past_visible: Tensor  # (b, 1, 1, P) bool: real past slots, seen by every new query
    new_visible: Tensor  # (b, 1, t, t) bool: real new keys at or before the query


def split_visibility(key_padding_mask: Tensor, t: int) -> tuple[Tensor, Tensor]:
    """key_padding_mask (b, P + t), 1 for real keys -> (past_visible, new_visible) of
    :class:`SplitBias`: new query i sees every real past key and the real new keys 0..i."""
    p = key_padding_mask.shape[-1] - t
    new_slots = torch.arange(t, device=key_padding_mask.device)
    causal = new_slots[None, :] <= new_slots[:, None]  # (t, t)
    valid = key_padding_mask.bool()
    return valid[:, None, None, :p], causal & valid[:, None, None, p:]


class BlockPositions(NamedTuple):
    """What :func:`alibi_attention_blocked` builds each block's bias and mask from (shared by
    every layer; every tensor O(b · s), none O(t · s))."""

    slopes: Tensor  # (h,) fp32
    query_positions: Tensor  # (b, t) int64 positions of the new tokens
    past_positions: Tensor  # (b, P) int64 positions of the past slots
    past_visible: Tensor  # (b, 1, 1, P) bool: real past slots, seen by every new query
    new_real: Tensor  # (b, t) bool: real new tokens
    # (h, block, P + t + block) fp32 bias and causal mask of every block at once, when every
    # token is real (see :func:`toeplitz_mask`); None: each block builds its own.
    toeplitz: Tensor | None = None


def toeplitz_mask(slopes: Tensor, block: int, width: int, shift: int) -> Tensor:
    """(h, block, width) fp32: entry (i, c) is the additive mask of distance r = i − c + shift,
    −m·r for r ≥ 0 and the lowest float for r < 0 (a future key).

    When every token is real, positions are slot numbers and the (bias + causal mask) of query
    block [start, end) over keys [0, P + end) depends on i − j only: it is the slice
    ``[:, :end − start, t − start : t − start + P + end]`` of this one tensor (``shift`` P + t,
    ``width`` P + t + block), a view, shared by every block and layer. Same numbers as
    :func:`alibi_bias` (the distance is exact in fp32 and scaled by the same −m)."""
    rel = (
        torch.arange(block, device=slopes.device)[:, None]
        - torch.arange(width, device=slopes.device)[None, :]
    )
    rel = (rel + shift).to(slopes.dtype)  # (block, width)
    mask = -slopes[:, None, None] * rel  # (h, block, width)
    return mask.masked_fill_(rel < 0, torch.finfo(torch.float32).min)


def block_positions(
    slopes: Tensor, attention_mask: Tensor, t: int, block: int = 0
) -> BlockPositions:
    """attention_mask (b, P + t), 1 for real tokens -> :class:`BlockPositions` for t new tokens.

    Positions count real tokens only (``cumsum - 1``), as in :class:`AlibiLM`. With ``block``
    and no padding anywhere, the shared :func:`toeplitz_mask` is built too (O(h · block · s))."""
    past = attention_mask.shape[-1] - t
    positions = attention_mask.cumsum(dim=-1) - 1  # (b, P + t)
    real = attention_mask.bool()
    toeplitz = None
    # A tensor value decides it: eager only, like every blocked path (exports are unblocked).
    if block and bool(real.all()):
        s = attention_mask.shape[-1]
        toeplitz = toeplitz_mask(slopes, block, s + block, s)
    return BlockPositions(
        slopes,
        positions[:, past:],
        positions[:, :past],
        real[:, None, None, :past],
        real[:, past:],
        toeplitz,
    )


def alibi_attention_blocked(
    q: Tensor,
    past_k: Tensor,
    past_v: Tensor,
    k: Tensor,
    v: Tensor,
    positions: BlockPositions,
    block: int,
    scale: float | None = None,
) -> Tensor:
    """:func:`alibi_attention_split` with the t new queries taken ``block`` at a time.

    q, k, v (b, h, t, e); past_k, past_v (b, h, P, e), P may be 0. Returns (b, h, t, e), the
    same numbers as the unblocked function within fp32 rounding (the softmax of each row is over
    the same scores; masked keys contribute exact zeros either way).

    Each block's scores, bias and masks are built, softmaxed and applied before the next, so the
    largest tensors are (b, h, block, P + t): O(h · block · s) memory instead of O(h · t · s).
    Causality also lets block [i0, i1) skip the new keys after i1, halving the work of a prefill.

    fp32 blocks run ``scaled_dot_product_attention`` with the block's bias and mask as its
    additive mask (one pass over it, score tiles kept in cache), read as a view of
    ``positions.toeplitz`` when there is one; reduced precision keeps the split path, whose
    scores are fp32 whatever the model's dtype (docs/decisions.md, "Blocked attention").
    """
    t = q.shape[-2]
    p = past_k.shape[-2]
    slots = torch.arange(t, device=q.device)
    fused = q.dtype == torch.float32
    toeplitz = positions.toeplitz if fused else None
    if toeplitz is not None and toeplitz.shape[-2] < min(block, t):
        raise ValueError(f"toeplitz mask built for blocks of {toeplitz.shape[-2]}, not {block}")
    if fused and p:
        keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)  # (b,h,s,e)
    else:
        keys, values = k, v
    out = []
    # Last block first: causal blocks grow with their end, and run in increasing order each
    # one's tensors outgrow the memory the previous ones freed, so the heap fragments and RSS
    # grew ~quadratically (measured: 571 MiB at 8K tokens, 1 layer, 4 heads, where one block
    # needs ~200). Largest first, every later block fits in what the first one freed.
    for start in reversed(range(0, t, block)):
        end = min(start + block, t)
        query_positions = positions.query_positions[:, start:end]  # (b, B)
        causal = slots[None, :end] <= slots[start:end, None]  # (B, end)
        new_visible = causal & positions.new_real[:, None, None, :end]  # (b, 1, B, end)
        if toeplitz is not None:
            mask = toeplitz[None, :, : end - start, t - start : t - start + p + end]  # a view
        elif fused:
            mask = _block_mask(positions, query_positions, end, new_visible)
        else:
            split = SplitBias(
                alibi_bias(positions.slopes, query_positions, positions.past_positions),
                alibi_bias(positions.slopes, query_positions, positions.query_positions[:, :end]),
                positions.past_visible,
                new_visible,
            )  # (b, h, B, P) and (b, h, B, end) biases
            out.append(
                alibi_attention_split(
                    q[..., start:end, :], past_k, past_v, k[..., :end, :], v[..., :end, :],
                    split, scale,
                )
            )  # fmt: skip
            continue
        # Masked keys hold the lowest float, not −inf: a query with no visible key (a left-pad
        # slot) gets a finite uniform row, as in alibi_attention_split.
        out.append(
            F.scaled_dot_product_attention(
                q[..., start:end, :], keys[..., : p + end, :], values[..., : p + end, :],
                attn_mask=mask, scale=q.shape[-1] ** -0.5 if scale is None else scale,
            )
        )  # fmt: skip
    return torch.cat(out[::-1], dim=-2)  # (b, h, t, e)


def _block_mask(
    positions: BlockPositions, query_positions: Tensor, end: int, new_visible: Tensor
) -> Tensor:
    """(b, h, B, P + end) fp32 additive bias and mask of one query block over the past keys and
    the new keys up to the block's end, for a batch with padding."""
    keys = torch.cat([positions.past_positions, positions.query_positions[:, :end]], -1)
    mask = alibi_bias(positions.slopes, query_positions, keys)  # (b, h, B, P + end)
    b, _, rows, _ = new_visible.shape
    visible = torch.cat([positions.past_visible.expand(b, 1, rows, -1), new_visible], -1)
    return mask.masked_fill_(~visible, torch.finfo(torch.float32).min)


def alibi_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    key_padding_mask: Tensor,
    scale: float | None = None,
) -> Tensor:
    """Causal softmax attention with an additive bias.

    q (b, h, t, e); k, v (b, h, s, e) with s ≥ t: the queries are the LAST t of the s key slots
    (the past cache followed by the new tokens), so query i sits at slot s − t + i.
    bias (b, h, t, s) or (h, t, s); key_padding_mask (b, s), 1 for real keys and 0 for padding.
    Returns (b, h, t, e). A query with no visible key (a left-pad slot) gets a uniform, finite row.
    ``scale`` multiplies q·k; None is the usual 1/√e. The math is :func:`alibi_attention_split`'s.
    """
    t = q.shape[-2]
    p = k.shape[-2] - t
    past_visible, new_visible = split_visibility(key_padding_mask, t)
    split = SplitBias(bias[..., :p], bias[..., p:], past_visible, new_visible)
    return alibi_attention_split(
        q, k[..., :p, :], v[..., :p, :], k[..., p:, :], v[..., p:, :], split, scale
    )


def alibi_attention_split(
    q: Tensor,
    past_k: Tensor,
    past_v: Tensor,
    k: Tensor,
    v: Tensor,
    bias: SplitBias,
    scale: float | None = None,
) -> Tensor:
    """:func:`alibi_attention` over past keys and new keys kept apart.

    q, k, v (b, h, t, e): the t new tokens; past_k, past_v (b, h, P, e), P may be 0; keys are the
    P past slots followed by the t new ones. Returns (b, h, t, e).

    The caches are never concatenated: each block is scored, biased and masked on its own, only
    the masked (t × (P + t)) scores are concatenated for one softmax, and the output is
    p_past @ past_v + p_new @ v, because concatenating the (b, h, P, e) caches would copy the
    whole cache per layer and per step (docs/decisions.md, "kv-cache graphs return only the new
    entries").
    """
    p = past_k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # Scaling q (t × e) rather than the scores (t × (P + t)) saves a pass over the scores; in a
    # bf16/fp16 model that rounds q once more, no more than its matmul rounds anyway.
    q = q * scale
    # Scores, bias and softmax in fp32 so a bf16/fp16 model keeps large distances exact; one
    # masked_fill per block (not a sum of large negatives) so nothing can overflow to -inf.
    lowest = torch.finfo(torch.float32).min
    past = (q @ past_k.transpose(-1, -2)).float() + bias.past  # (b, h, t, P)
    past = past.masked_fill(~bias.past_visible, lowest)
    new = (q @ k.transpose(-1, -2)).float() + bias.new  # (b, h, t, t)
    new = new.masked_fill(~bias.new_visible, lowest)
    probs = F.softmax(torch.cat([past, new], dim=-1), dim=-1).to(v.dtype)  # masked: exactly 0
    return probs[..., :p] @ past_v + probs[..., p:] @ v  # (b, h, t, e)


@dataclass(frozen=True)
class AlibiConfig:
    vocab_size: int  # tokens, special tokens included
    d_model: int  # residual stream width
    n_heads: int  # attention heads; each gets its own ALiBi slope
    n_layers: int  # decoder blocks
    d_ff: int  # feed-forward inner width
    trained_context: int  # training sequence length; informational, not a limit
    dropout: float = 0.0  # residual/embedding dropout during training; inactive in eval
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon
    # The fields below let imported checkpoints (BLOOM, MPT) run on this architecture unforked;
    # their defaults are Longhaul's own model.
    embed_layer_norm: bool = False  # LayerNorm right after the token embedding (BLOOM)
    bias: bool = True  # biases in the blocks' linear layers and in every LayerNorm (MPT: none)
    activation: Activation = "gelu_tanh"  # feed-forward activation (MPT: exact "gelu")
    alibi_slope_rule: SlopeRule = "paper"  # "paper" (official, BLOOM) or "mpt" (see alibi_slopes)
    alibi_bias_max: float = 8.0  # the 8 in the slope exponents (MPT's alibi_bias_max)
    clip_qkv: float | None = None  # clamp q, k, v to [−clip, clip] after projection (MPT)
    softmax_scale: float | None = None  # score scale; None = 1/√head_dim (MPT's softmax_scale)
    eos_token_id: int | None = 1  # generation stops here; None = only at the length limit
    pad_token_id: int = 0  # fills padded slots (always masked, so any id works)
    # Query rows per attention block when a step has more new tokens than this (full forwards,
    # long prefills): memory h·block·s instead of h·t·s, same numbers. Compute, not weights:
    # 0 = one unblocked score tensor per layer (what exported graphs hold).
    attention_block: int = 256

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "trained_context"):
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
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}")
        require_choice("activation", self.activation, Activation)
        require_choice("alibi_slope_rule", self.alibi_slope_rule, SlopeRule)
        if self.alibi_bias_max <= 0:
            raise ValueError(f"alibi_bias_max must be positive, got {self.alibi_bias_max}")
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            raise ValueError(f"clip_qkv must be positive or None, got {self.clip_qkv}")
        if self.softmax_scale is not None and self.softmax_scale <= 0:
            raise ValueError(f"softmax_scale must be positive or None, got {self.softmax_scale}")
        require_token_ids(self.vocab_size, self.eos_token_id, self.pad_token_id)
        if self.attention_block < 0:
            raise ValueError(
                f"attention_block must be >= 0 (0 = unblocked), got {self.attention_block}"
            )

    @property
    def task(self) -> str:
        return "generate"

    @property
    def max_positions(self) -> int | None:
        return None  # ALiBi has no position table: any length runs (quality degrades slowly)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class AlibiSelfAttention(nn.Module):
    def __init__(self, config: AlibiConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.block = config.attention_block
        self.clip_qkv = config.clip_qkv
        self.softmax_scale = config.softmax_scale
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.out = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(
        self, x: Tensor, bias: SplitBias | BlockPositions, past_kv: LayerCache
    ) -> tuple[Tensor, Tensor]:
        """x (b, t, d), past_kv (key, value) each (b, h, P, e) -> (b, t, d), new_kv
        (2, b, h, t, e): the new tokens' keys and values only; the past is read, never copied.
        ``bias`` is the whole step's :class:`SplitBias`, or :class:`BlockPositions` for a step
        run in query blocks."""
        qkv = self.qkv(x)  # (b, t, 3d)
        if self.clip_qkv is not None:  # config switch, not a tensor value: export-safe
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = qkv.chunk(3, dim=-1)
        # unflatten rather than view(b, t, ...) so no batch/length size is baked into a trace.
        q = q.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)  # (b, h, t, e)
        k = k.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)  # (b, h, t, e)
        v = v.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)  # (b, h, t, e)
        if isinstance(bias, BlockPositions):
            y = alibi_attention_blocked(
                q, past_kv[0], past_kv[1], k, v, bias, self.block, self.softmax_scale
            )
        else:
            y = alibi_attention_split(q, past_kv[0], past_kv[1], k, v, bias, self.softmax_scale)
        y = y.transpose(1, 2).flatten(2)  # (b, t, d)
        return self.out(y), torch.stack([k, v])


class AlibiBlock(nn.Module):
    """Pre-LayerNorm GPT block: x + attn(ln(x)), then x + ff(ln(x))."""

    def __init__(self, config: AlibiConfig) -> None:
        super().__init__()
        eps, bias = config.layer_norm_eps, config.bias
        self.ln_attn = nn.LayerNorm(config.d_model, eps=eps, bias=bias)
        self.attn = AlibiSelfAttention(config)
        self.ln_ff = nn.LayerNorm(config.d_model, eps=eps, bias=bias)
        self.ff = FeedForward(config.d_model, config.d_ff, config.activation, bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, bias: SplitBias | BlockPositions, past_kv: LayerCache
    ) -> tuple[Tensor, Tensor]:
        a, new_kv = self.attn(self.ln_attn(x), bias, past_kv)
        x = x + self.drop(a)
        x = x + self.drop(self.ff(self.ln_ff(x)))
        return x, new_kv


class AlibiLM(StackedCacheMixin, nn.Module):
    def __init__(self, config: AlibiConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        # Only created when configured, so Longhaul's own checkpoints keep their exact key set.
        if config.embed_layer_norm:
            self.embed_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(AlibiBlock(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.head = LMHead(config.d_model, config.vocab_size)
        init_weights(self)

    def _decode(
        self, input_ids: Tensor, attention_mask: Tensor, past_key_values: Sequence[LayerCache]
    ) -> tuple[Tensor, Tensor]:
        """Shared body -> (hidden (b, t, d), new entries (L, 2, b, h, t, e))."""
        # Positions count real tokens only, so pads anywhere (left padding, a short chunk of a
        # row in a mixed batch, or free slots of a preallocated cache between a row's tokens and
        # its new one) never change the distances i − j between real tokens. Pad slots get a
        # repeated position but are masked as keys and their outputs are unused.
        past = past_key_values[0][0].shape[-2]
        t = input_ids.shape[1]
        c = self.config
        slopes = alibi_slopes(c.n_heads, c.alibi_bias_max, c.alibi_slope_rule).to(input_ids.device)
        bias: SplitBias | BlockPositions
        # A config switch and a Python int, never a tensor value: export-safe (exports use 0).
        if 0 < c.attention_block < t:
            bias = block_positions(slopes, attention_mask, t, c.attention_block)
        else:
            key_positions = attention_mask.cumsum(dim=-1) - 1  # (b, P + t)
            query_positions = key_positions[:, past:]  # (b, t)
            bias = SplitBias(
                alibi_bias(slopes, query_positions, key_positions[:, :past]),  # (b, h, t, P)
                alibi_bias(slopes, query_positions, query_positions),  # (b, h, t, t)
                *split_visibility(attention_mask, t),
            )

        x = self.embed(input_ids)  # (b, t, d)
        if c.embed_layer_norm:
            x = self.embed_norm(x)
        x = self.drop(x)
        news = []
        for layer, block in enumerate(self.blocks):
            x, new_kv = block(x, bias, past_key_values[layer])
            news.append(new_kv)
        return self.ln_f(x), torch.stack(news)  # (L, 2, b, h, t, e): t tokens, cheap to stack

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask (b, t) int64 -> hidden (b, t, d), without the (b, t, v)
        logits: long-sequence callers apply ``head`` a slice at a time."""
        past = self.empty_cache(input_ids.shape[0], self.embed.weight.dtype, input_ids.device)
        hidden, _ = self._decode(input_ids, attention_mask, layer_caches(past))
        return hidden

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """input_ids, attention_mask (b, t) int64 -> logits (b, t, v), hidden (b, t, d)."""
        hidden = self.hidden_states(input_ids, attention_mask)
        return self.head(hidden), hidden

    def forward_step(
        self, input_ids: Tensor, attention_mask: Tensor, past_key_values: Sequence[LayerCache]
    ) -> tuple[Tensor, Tensor]:
        """One prefill, chunk or decode step, returning only the new tokens' cache entries (what
        the ``kv_cache`` graph exports).

        input_ids (b, t) int64; attention_mask (b, P + t) int64 over the cached and the new
        tokens, 0 at padding slots, which may sit anywhere in the past; past_key_values one
        (key, value) pair per layer, each (b, h, P, e), P may be 0. Returns logits (b, t, v)
        and new_key_values (L, 2, b, h, t, e): the caller appends them to its cache wherever
        it keeps the tokens.
        """
        hidden, new = self._decode(input_ids, attention_mask, past_key_values)
        return self.head(hidden), new
