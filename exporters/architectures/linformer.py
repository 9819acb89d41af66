"""Linformer encoder with an MLM head (Wang et al., 2020, "Linformer: Self-Attention with Linear
Complexity").

Keys and values are projected along the sequence axis by learned matrices E, F of shape
(k, n_max), sliced to the real length n, so every layer costs O(n·k) instead of O(n²). Padded
keys/values are zeroed *before* the projection: a zero row adds nothing to E @ K, so appending
padding never changes the outputs at real tokens. Learned absolute positions make n_max a hard
limit.

Sharing modes (the paper's options, Section 4):
    "none"       each layer has its own E and F, shared by that layer's heads (the paper's
                 headwise sharing, and the layout of lucidrains/linformer);
    "key-value"  each layer has one matrix used as both E and F;
    "layerwise"  a single matrix used as E and F by every layer and head.

Shape legend: see ``common.py`` (b, t, s, h, d, e, v, k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from exporters.architectures.common import (
    SPECIAL_TOKENS,
    Activation,
    FeedForward,
    LMHead,
    init_weights,
    require_choice,
    require_positive,
    sinusoidal_positions,
)

Sharing = Literal["none", "key-value", "layerwise"]


def linformer_project(x: Tensor, E: Tensor, mask: Tensor) -> Tensor:
    """Project keys or values along the sequence axis.

    x (b, h, s, e), E (k, n_max) with s <= n_max (only its first s columns are used),
    mask (b, s) with 1 for real tokens and 0 for padding -> (b, h, k, e).
    """
    s = x.shape[-2]
    if s > E.shape[-1]:
        raise ValueError(f"sequence length {s} exceeds the projection's n_max {E.shape[-1]}")
    # Zero the padded rows so that they contribute nothing, whatever E holds there.
    x = x * mask[:, None, :, None].to(x.dtype)
    # The slice end comes from a tensor shape, so exported graphs keep s dynamic.
    return torch.matmul(E[:, :s], x)  # (k, s) @ (b, h, s, e) -> (b, h, k, e)


def linformer_attention(
    q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor, key_mask: Tensor
) -> Tensor:
    """Linformer attention: softmax(q (E k)ᵀ / √e) (F v).

    q (b, h, t, e), k and v (b, h, s, e), E and F (k, n_max), key_mask (b, s) 1/0 -> (b, h, t, e).
    With k = s and E = F = identity (and no padding) this is exactly full softmax attention.
    No mask is needed after the projection: each projected key mixes real tokens only.
    """
    k_proj = linformer_project(k, E, key_mask)  # (b, h, k, e)
    v_proj = linformer_project(v, F, key_mask)  # (b, h, k, e)
    scores = torch.matmul(q, k_proj.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (b, h, t, k)
    return torch.matmul(torch.softmax(scores, dim=-1), v_proj)  # (b, h, t, e)


@dataclass(frozen=True)
class LinformerConfig:
    vocab_size: int = 1024  # tokens, the special tokens of common.py included
    d_model: int = 64  # model width d
    n_heads: int = 4  # attention heads h; d_model must be divisible by it
    n_layers: int = 2  # pre-LayerNorm transformer blocks
    d_ff: int = 256  # feed-forward inner width
    k: int = 32  # projected length of keys/values (the paper's k), at most n_max
    n_max: int = 256  # longest input: the size of E/F and of the position table (hard limit)
    sharing: Sharing = "none"  # how E/F are shared: "none" | "key-value" | "layerwise"
    norm_eps: float = 1e-5  # LayerNorm epsilon
    # For imported checkpoints (lucidrains/linformer); the defaults are Longhaul's own model.
    activation: Activation = "gelu_tanh"  # feed-forward activation (lucidrains: exact "gelu")
    final_norm: bool = True  # LayerNorm before the LM head (lucidrains' LinformerLM has none)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "k", "n_max"):
            require_positive(name, getattr(self, name))
        if self.vocab_size < len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size must hold the {len(SPECIAL_TOKENS)} special tokens, "
                f"got {self.vocab_size}"
            )
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        # k > n_max would lengthen the sequence instead of compressing it: surely a mistake.
        if self.k > self.n_max:
            raise ValueError(f"k ({self.k}) must not exceed n_max ({self.n_max})")
        if self.sharing not in get_args(Sharing):
            raise ValueError(
                f"sharing must be one of {', '.join(get_args(Sharing))}, got {self.sharing!r}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        require_choice("activation", self.activation, Activation)

    @property
    def task(self) -> Literal["encode"]:
        return "encode"

    @property
    def max_positions(self) -> int:
        return self.n_max


def projection_layout(sharing: Sharing, n_layers: int) -> list[tuple[int, int]]:
    """For each layer, the indices of its (E, F) in the model's list of projection matrices."""
    if sharing == "layerwise":
        return [(0, 0)] * n_layers
    if sharing == "key-value":
        return [(i, i) for i in range(n_layers)]
    return [(2 * i, 2 * i + 1) for i in range(n_layers)]


class LinformerSelfAttention(nn.Module):
    """Multi-head self-attention whose E, F are passed in, so that the model can share them."""

    def __init__(self, config: LinformerConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: Tensor, key_mask: Tensor, E: Tensor, F: Tensor) -> Tensor:
        # unflatten/flatten never name b or t, so both stay symbolic when exported.
        qkv = self.qkv(x).unflatten(-1, (3, self.n_heads, -1))  # (b, t, 3, h, e)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (b, h, t, e)
        y = linformer_attention(q, k, v, E, F, key_mask)  # (b, h, t, e)
        return self.out(y.transpose(1, 2).flatten(2))  # (b, t, d)


class LinformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, config: LinformerConfig) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.attn = LinformerSelfAttention(config)
        self.norm_ff = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.ff = FeedForward(config.d_model, config.d_ff, config.activation)

    def forward(self, x: Tensor, key_mask: Tensor, E: Tensor, F: Tensor) -> Tensor:
        x = x + self.attn(self.norm_attn(x), key_mask, E, F)
        return x + self.ff(self.norm_ff(x))


class LinformerEncoder(nn.Module):
    """Token + learned position embeddings -> blocks -> LayerNorm (hidden) -> LMHead (logits)."""

    def __init__(self, config: LinformerConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.n_max, config.d_model)
        self.blocks = nn.ModuleList(LinformerBlock(config) for _ in range(config.n_layers))
        # Shared matrices live once in this list and layers index into it, so the state dict
        # holds each shared tensor once (safetensors refuses aliased tensors).
        self.layout = projection_layout(config.sharing, config.n_layers)
        n_matrices = 1 + max(i for pair in self.layout for i in pair)
        self.seq_proj = nn.ParameterList(
            nn.Parameter(torch.empty(config.k, config.n_max)) for _ in range(n_matrices)
        )
        # Identity has no parameters, so a model without the norm has no norm.* keys either.
        self.norm = (
            nn.LayerNorm(config.d_model, eps=config.norm_eps)
            if config.final_norm
            else nn.Identity()
        )
        self.lm_head = LMHead(config.d_model, config.vocab_size)
        init_weights(self)
        # U(±1/√k) as lucidrains/linformer, so imported and native checkpoints start alike.
        bound = 1.0 / math.sqrt(config.k)
        for matrix in self.seq_proj:
            nn.init.uniform_(matrix, -bound, bound)
        # The position table is learned, but starts as sinusoids (Vaswani et al.) at the
        # embeddings' 0.02 scale rather than as noise: neighbouring positions then start out
        # similar, which masked-token prediction needs first. Measured on the demo preset (500
        # steps, same seed): held-out loss 0.927 x unigram against 0.970 from noise.
        with torch.no_grad():
            self.pos_emb.weight.copy_(0.02 * sinusoidal_positions(config.n_max, config.d_model))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """input_ids, attention_mask (b, t) int64 -> logits (b, t, v), hidden (b, t, d)."""
        hidden = self.hidden_states(input_ids, attention_mask)
        return self.lm_head(hidden), hidden

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The forward without the LM head, (b, t) -> (b, t, d): MLM training projects only the
        masked positions onto the vocabulary (a fifth of the demo's step time saved)."""
        t = input_ids.shape[1]
        # Reads only a shape: torch.export turns it into the bound Dim(max=n_max) on the sequence
        # axis and the graph holds no check, so callers of an exported model must enforce it.
        if t > self.config.n_max:
            raise ValueError(
                f"input length {t} exceeds the maximum length of this Linformer, "
                f"n_max={self.config.n_max}"
            )
        x = self.tok_emb(input_ids) + self.pos_emb.weight[:t]  # (b, t, d)
        for block, (e_index, f_index) in zip(self.blocks, self.layout, strict=True):
            x = block(x, attention_mask, self.seq_proj[e_index], self.seq_proj[f_index])
        return self.norm(x)  # (b, t, d); the last block's output when final_norm is False
