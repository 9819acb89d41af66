"""Shatter: single-headed self-attention with relative sequence partitioning (MLM encoder).

One attention head computes a single (t × s) map ``a = softmax(q kᵀ / sqrt(e) + padding bias)``.
Instead of h heads, the relative offset r = j − i is softly split into P parts and each part has
its own value matrix V_p::

    out_i = Σ_j a_ij Σ_p π_p(j − i) (x_j V_p)          then the output projection W_o

so one score map serves P "views" of the sequence: memory is one n×n map per batch row instead of
h, at O(P·n²) multiply-adds. The (n, n, P) partition weights are computed once per forward and
shared by every layer and batch row (1 GiB at n = 8192, P = 4, fp32).

Sequences longer than ``attention_block`` run :func:`shatter_attention_blocked` instead: queries
in blocks, each block's score map and partition weights gathered from the (P, 2n − 1) table of
distinct offsets, so nothing of size n × n exists (memory O(P · block · n)). Exported graphs take
the unblocked form (``attention_block=0``; docs/decisions.md).

Partition functions (fixed, not learned; identical in every layer)
-----------------------------------------------------------------
With D = ``max_distance`` (a hint, NOT a limit), σ-scale w = ``partition_width`` and P parts::

    u(r)  = sign(r) · log(1 + |r|)                         signed log-scaled offset
    U     = log(1 + D)
    c_p   = −U + p · Δ,   Δ = 2U / (P − 1),  p = 0 … P−1    evenly spaced centres on [−U, U]
    σ     = w · Δ
    π_p(r) = softmax_p( −(u(r) − c_p)² / (2σ²) )
    (P = 1: c_0 = 0 and π_0 ≡ 1, i.e. plain single-head attention.)

Why this choice:

* π_p ≥ 0 and Σ_p π_p = 1 for every r by construction (a softmax), so the parts redistribute
  the attention mass a_ij without changing it; a fully relative model needs no position table.
* The log scale resolves near offsets finely (1, 2, 3, …) and far ones coarsely, which is where
  the information is; beyond ±D every offset saturates smoothly into the outermost part, so any
  length (8192 and beyond) runs with no position table and no out-of-range index. Softmax is
  shift-invariant, so huge |r| cannot overflow: only differences of the logits matter.
* The coordinate is SIGNED, so the model can tell left from right: π(+r) ≠ π(−r) for P ≥ 2
  (the centres are mirror images, π_p(−r) = π_{P−1−p}(r)). A scheme on |r| alone would make
  attention symmetric in direction and an encoder could not distinguish "ab" from "ba" beyond
  distance cues. With P even, r = 0 is shared equally by the two middle parts; with P odd a
  centre sits at 0, a "self" part.
* Gaussian bumps in u are smooth, so neighbouring offsets get similar mixtures (no hard bucket
  edges for the model to overfit to).

No position embeddings: the partitions are the only position signal. With P = 1 the model is
permutation-equivariant (a bag of words); use P ≥ 2.

Export: positions come from ``arange`` of the input shape and the partition table is gathered by
index (no ``%``, no ``.item()``, no data-dependent branches), so ONNX (dynamic batch/sequence) and
traced TorchScript graphs run at any length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from exporters.architectures.common import (
    FeedForward,
    LMHead,
    init_weights,
    key_padding_bias,
    require_positive,
)


def shatter_partitions(
    rel_positions: Tensor, n_parts: int, max_distance: int = 512, width: float = 0.5
) -> Tensor:
    """Soft membership π_p(r) of relative offsets r = j − i (formulas in the module docstring).

    rel_positions: (...) integer or float offsets of any magnitude.
    Returns (..., p) float32, every entry ≥ 0, summing to 1 over the last axis.
    """
    r = rel_positions.to(torch.float32)
    u = torch.sign(r) * torch.log1p(r.abs())  # (...)
    if n_parts == 1:
        centres = torch.zeros(1, device=r.device)
        sigma = 1.0  # irrelevant: a softmax over one element is exactly 1
    else:
        half_range = math.log1p(max_distance)
        spacing = 2.0 * half_range / (n_parts - 1)
        centres = torch.linspace(-half_range, half_range, n_parts, device=r.device)  # (p,)
        sigma = width * spacing
    logits = -((u[..., None] - centres) ** 2) / (2.0 * sigma**2)  # (..., p)
    return logits.softmax(dim=-1)


def shatter_attention(
    q: Tensor,
    k: Tensor,
    values_per_part: Tensor,
    partitions: Tensor,
    key_mask: Tensor | None,
) -> Tensor:
    """Single-head attention whose value path is split by relative-position partitions.

    q: (b, t, e), k: (b, s, e), values_per_part: (b, p, s, e) = x V_p,
    partitions: (t, s, p) = π_p(j − i), key_mask: (b, s) 1 = real, 0 = padding (or None).
    Returns (b, t, e) = Σ_p (a ⊙ π_p) @ (x V_p) with a = softmax_j(q kᵀ / sqrt(e)).
    """
    # `** -0.5` rather than math.sqrt: under tracing the width is a 0-d tensor and stays one.
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (b, t, s)
    if key_mask is not None:
        scores = scores + key_padding_bias(key_mask, scores.dtype)[:, 0]  # (b, 1, s)
    attn = scores.softmax(dim=-1)  # (b, t, s): the ONE score map
    partitions = partitions.to(attn.dtype)
    # Memory trade-off: einsum('bts,tsp,bpse->bte') would be one line, but contracted pairwise it
    # materialises a (b, t, s, p) tensor — P score maps, 4 GiB at b=1, n=8192, P=4 in fp32 —
    # which is exactly what a single head is meant to avoid. Looping over the (static) P keeps the
    # peak at two (b, t, s) maps; unbind (not range(shape)) keeps the tracer free of int casts.
    parts = partitions.unbind(-1)  # p × (t, s)
    values = values_per_part.unbind(1)  # p × (b, s, e)
    out = (attn * parts[0]) @ values[0]  # (b, t, s) @ (b, s, e) -> (b, t, e)
    for part, value in zip(parts[1:], values[1:], strict=True):
        out = out + (attn * part) @ value
    return out


def shatter_attention_blocked(
    q: Tensor,
    k: Tensor,
    values_per_part: Tensor,
    table: Tensor,
    key_mask: Tensor | None,
    block: int,
) -> Tensor:
    """:func:`shatter_attention` with the queries taken ``block`` at a time.

    q: (b, t, e), k: (b, s, e), values_per_part: (b, p, s, e), table: (p, t + s − 1) =
    π_p(r) for r = −(t − 1) … s − 1 (row r + t − 1), key_mask: (b, s) or None.
    Returns (b, t, e), the same numbers as the unblocked function within fp32 rounding.

    Each block reads its (block, s, p) partition weights as a view of the table and computes,
    softmaxes and applies its (b, block, s) score map before the next: the largest tensors are
    O(P · block · s) instead of the (t, s, p) weights and (b, t, s) map.
    """
    t, s = q.shape[1], k.shape[1]
    # Row i of the weights is the table window starting at offset −i, i.e. window t − 1 − i of
    # unfold: rows run backwards through the windows. Taking each block's queries in reverse
    # order turns that into a forward slice, a strided view of the table: no gather, no copy.
    windows = table.unfold(-1, s, 1)  # (p, t, s): window w = table[:, w : w + s]
    # One output written block by block, not a list joined at the end: each block's result kept
    # alive between the blocks' large temporaries pins the heap, and peak RSS grew faster than
    # the length (docs/decisions.md, "Blocked attention and the allocator").
    out = q.new_empty(q.shape[0], t, values_per_part.shape[-1])
    for start in range(0, t, block):
        end = min(start + block, t)
        partitions = windows[:, t - end : t - start].permute(1, 2, 0)  # (B, s, p), rows reversed
        reversed_q = q[:, start:end].flip(1)  # (b, B, e), query end − 1 first
        part = shatter_attention(reversed_q, k, values_per_part, partitions, key_mask)
        out[:, start:end] = part.flip(1)
    return out  # (b, t, e)


@dataclass(frozen=True)
class ShatterConfig:
    vocab_size: int = 256  # tokens, the 4 special tokens of common.py first
    d_model: int = 64  # residual width, also the width e of the single head
    n_layers: int = 2  # pre-LayerNorm blocks
    d_ff: int = 256  # feed-forward hidden width
    n_parts: int = 4  # P relative-position partitions, one value matrix each
    max_distance: int = 512  # offset of the outermost partition centres; a hint, not a limit
    partition_width: float = 0.5  # σ of each partition bump, in units of the centre spacing
    dropout: float = 0.0  # on residual branches while training; identity in eval/export
    # Query rows per attention block for sequences longer than this: memory P·block·n instead of
    # P·n², same numbers. Compute, not weights: 0 = unblocked (what exported graphs hold).
    attention_block: int = 256

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "d_ff", "n_parts", "max_distance"):
            require_positive(name, getattr(self, name))
        if not self.partition_width > 0:
            raise ValueError(f"partition_width must be positive, got {self.partition_width}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attention_block < 0:
            raise ValueError(
                f"attention_block must be >= 0 (0 = unblocked), got {self.attention_block}"
            )

    @property
    def task(self) -> str:
        return "encode"

    @property
    def max_positions(self) -> int | None:
        return None  # purely relative positions: no length limit


class ShatterAttention(nn.Module):
    """q, k and P value projections around `shatter_attention`, plus the output projection."""

    def __init__(self, config: ShatterConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_parts = config.n_parts
        self.block = config.attention_block
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, config.n_parts * d)  # all V_p fused into one GEMM
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor, partitions: Tensor, attention_mask: Tensor) -> Tensor:
        """``partitions`` is the (t, t, p) grid, or for a blocked forward (t longer than the
        block) the (p, 2t − 1) table of :meth:`ShatterEncoder.partition_table`."""
        values = self.v_proj(x).unflatten(-1, (self.n_parts, -1))  # (b, s, p, e)
        values = values.transpose(1, 2)  # (b, p, s, e)
        q, k = self.q_proj(x), self.k_proj(x)
        if partitions.dim() == 2:
            out = shatter_attention_blocked(q, k, values, partitions, attention_mask, self.block)
        else:
            out = shatter_attention(q, k, values, partitions, attention_mask)  # (b, t, e)
        return self.out_proj(out)


class ShatterBlock(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + ff(ln(x))."""

    def __init__(self, config: ShatterConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = ShatterAttention(config)
        self.ln_ff = nn.LayerNorm(config.d_model)
        self.ff = FeedForward(config.d_model, config.d_ff)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, partitions: Tensor, attention_mask: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.ln_attn(x), partitions, attention_mask))
        return x + self.dropout(self.ff(self.ln_ff(x)))


class ShatterEncoder(nn.Module):
    """Token embedding -> pre-LN Shatter blocks -> final LayerNorm -> MLM head."""

    def __init__(self, config: ShatterConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(ShatterBlock(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.lm_head = LMHead(config.d_model, config.vocab_size)
        init_weights(self)

    def partition_table(self, input_ids: Tensor) -> Tensor:
        """(b, t) ids -> (p, 2t − 1) π_p(r) for r = −(t − 1) … t − 1: every distinct offset once."""
        c = self.config
        t = input_ids.shape[1]
        offsets = torch.arange(1 - t, t, device=input_ids.device)  # (2t − 1,)
        return shatter_partitions(offsets, c.n_parts, c.max_distance, c.partition_width).T

    def relative_partitions(self, input_ids: Tensor) -> Tensor:
        """(b, t) ids -> (t, t, p) partition weights π_p(j − i), shared by every layer.

        π depends only on r, so it is evaluated on the 2t − 1 distinct offsets and gathered into
        the (t, t) grid: the exp/log work is O(t·p) and the only O(t²) tensor is the result.
        """
        t = input_ids.shape[1]
        table = self.partition_table(input_ids)  # (p, 2t − 1)
        pos = torch.arange(t, device=input_ids.device)
        index = pos[None, :] - pos[:, None] + (t - 1)  # (t, t): j − i shifted to table rows
        # Gather part-major, then view as (t, t, p): each π_p slice that shatter_attention takes
        # is then contiguous (measured at n = 2048: whole forward ~1.7x faster, eager and ORT).
        return table[:, index].permute(1, 2, 0)  # (p, t, t) -> (t, t, p)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """input_ids, attention_mask (b, t) int64 -> (logits (b, t, v), hidden (b, t, d))."""
        x = self.embed(input_ids)  # (b, t, d)
        block = self.config.attention_block
        # A config switch and a Python int, never a tensor value: export-safe (exports use 0).
        if 0 < block < input_ids.shape[1]:
            partitions = self.partition_table(input_ids).to(x.dtype)  # (p, 2t − 1)
        else:
            partitions = self.relative_partitions(input_ids).to(x.dtype)  # cast once, not per layer
        for layer in self.blocks:
            x = layer(x, partitions, attention_mask)
        hidden = self.norm(x)
        return self.lm_head(hidden), hidden


__all__ = [
    "ShatterAttention",
    "ShatterBlock",
    "ShatterConfig",
    "ShatterEncoder",
    "shatter_attention",
    "shatter_attention_blocked",
    "shatter_partitions",
]
