"""The peer every scaling figure is compared with: a plain pre-LayerNorm transformer encoder with
explicit softmax attention, as a PyTorch user would write it (and as HF BERT's "eager" attention
computes it).

Why explicit softmax and not ``F.scaled_dot_product_attention``: on CPU, SDPA dispatches to a
flash-style kernel that never materialises the (n × n) score matrix, which hides the quadratic
memory that efficient attention exists to remove (its time stays quadratic). The explicit form
keeps the cost model of "full attention" honest in both time and memory and matches the
attention the Longhaul models themselves compute (explicit matmul + softmax). The comparison is
of architectures, not of attention kernels.

Same contract as the Longhaul models (common.py): ``forward(input_ids, attention_mask) ->
(logits, hidden)``. Positions are sinusoidal so any length runs without a position table.

Shape legend: b batch, t length, h heads, e head width, d width, v vocabulary.
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
    sinusoidal_positions,
)


def full_attention(q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor) -> Tensor:
    """softmax(q kᵀ / √e + padding bias) v with the (b, h, t, t) score matrix materialised.

    q, k, v (b, h, t, e); attention_mask (b, t) 1 = real, 0 = padding -> (b, h, t, e).
    """
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (b, h, t, t)
    scores = scores + key_padding_bias(attention_mask, scores.dtype)  # (b, 1, 1, t) broadcast
    return torch.softmax(scores, dim=-1) @ v  # (b, h, t, e)


@dataclass(frozen=True)
class VanillaConfig:
    vocab_size: int = 1024  # tokens
    d_model: int = 256  # model width d
    n_heads: int = 4  # attention heads h
    n_layers: int = 4  # pre-LN blocks
    d_ff: int = 1024  # feed-forward inner width
    norm_eps: float = 1e-5  # LayerNorm epsilon

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff"):
            require_positive(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )


class VanillaSelfAttention(nn.Module):
    def __init__(self, config: VanillaConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: Tensor, attention_mask: Tensor) -> Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.n_heads, -1))  # (b, t, 3, h, e)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (b, h, t, e)
        y = full_attention(q, k, v, attention_mask)  # (b, h, t, e)
        return self.out(y.transpose(1, 2).flatten(2))  # (b, t, d)


class VanillaBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, config: VanillaConfig) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.attn = VanillaSelfAttention(config)
        self.norm_ff = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.ff = FeedForward(config.d_model, config.d_ff)

    def forward(self, x: Tensor, attention_mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm_attn(x), attention_mask)
        return x + self.ff(self.norm_ff(x))


class VanillaEncoder(nn.Module):
    """Token embedding + sinusoidal positions -> blocks -> LayerNorm (hidden) -> LM head."""

    def __init__(self, config: VanillaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(VanillaBlock(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = LMHead(config.d_model, config.vocab_size)
        init_weights(self)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """input_ids, attention_mask (b, t) int64 -> logits (b, t, v), hidden (b, t, d)."""
        t = input_ids.shape[1]
        positions = sinusoidal_positions(t, self.config.d_model, input_ids.device)  # (t, d)
        x = self.tok_emb(input_ids) + positions.to(self.tok_emb.weight.dtype)  # (b, t, d)
        for block in self.blocks:
            x = block(x, attention_mask)
        hidden = self.norm(x)  # (b, t, d)
        return self.lm_head(hidden), hidden
