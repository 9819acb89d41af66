"""Blocks shared by the four architectures.

Shape legend used in every architecture file:
    b - batch, t - query length, s - key length, h - heads, d - model width, e - head width,
    v - vocabulary, k - Linformer projected length, p - Shatter partitions.

Model contract (relied upon by the exporters, the tests and, through the exported graphs,
the service):

* ``forward(input_ids, attention_mask) -> (logits, hidden)`` for every model:
  ``input_ids`` (b, t) int64, ``attention_mask`` (b, t) int64 with 1 for real tokens and 0 for
  padding; ``logits`` (b, t, v) float, ``hidden`` (b, t, d) the final (normalised, where the
  model has a final norm) hidden states; a Reformer that concatenates its two reversible streams
  (``stream_merge="concat"``) returns (b, t, 2d), its config's ``hidden_size``.
  Outputs at padding positions are unspecified but finite.
* The ALiBi decoder (and the causal native Reformer) also has
  ``forward_step(input_ids, attention_mask, past_key_values)`` -> ``(logits, new_key_values)``
  where the mask covers past + new tokens (b, s + t), 0 at padding slots anywhere in the past,
  the past is one (key, value) pair of (b, h, s, e) tensors per layer (:data:`LayerCache`) and
  ``new_key_values`` (layers, 2, b, h, t, e) holds only the new tokens' entries (what the
  ``kv_cache`` graph exports); ``forward_cached`` takes the past as one stacked tensor
  (layers, 2, b, h, s, e) instead and returns the whole present cache (layers, 2, b, h, s + t, e)
  for eager callers (:class:`StackedCacheMixin`).
* Configs are frozen dataclasses validated in ``__post_init__`` and expose ``task``
  ("encode" | "generate") and ``max_positions`` (hard length limit, or None when unbounded).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The special tokens at the start of every Longhaul vocabulary, defined once for both halves;
# the architectures, tokenizer and training import them from here.
from model_store.tokens import (  # noqa: F401
    CLS_ID,
    CLS_TOKEN,
    EOS_ID,
    EOS_TOKEN,
    MASK_ID,
    MASK_TOKEN,
    PAD_ID,
    PAD_TOKEN,
    SPECIAL_TOKENS,
)

# One layer's past cache: (key, value), each (b, h, P, e). Kept apart per layer (not one stacked
# tensor) so a graph runtime without views (ONNX Runtime) need not split, i.e. copy, the cache.
LayerCache = tuple[Tensor, Tensor]


def layer_caches(past_key_values: Tensor) -> list[LayerCache]:
    """A stacked cache (L, 2, b, h, P, e) as per-layer (key, value) views (no copy)."""
    return [(layer[0], layer[1]) for layer in past_key_values.unbind(0)]


class StackedCacheMixin:
    """The stacked-cache API of a decoder with a KV cache (ALiBi, the causal Reformer), built on
    its ``forward_step`` (what the ``kv_cache`` graph exports): eager callers and tests keep one
    (L, 2, b, h, P, e) tensor and get the whole present cache back."""

    config: Any  # n_layers, n_heads and head_dim are read

    def forward_step(
        self, input_ids: Tensor, attention_mask: Tensor, past_key_values: Sequence[LayerCache]
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def empty_cache(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(L, 2, b, h, 0, e): the cache before the first token (prefill = a call with this)."""
        c = self.config
        return torch.zeros(
            c.n_layers, 2, batch_size, c.n_heads, 0, c.head_dim, dtype=dtype, device=device
        )

    def forward_cached(
        self, input_ids: Tensor, attention_mask: Tensor, past_key_values: Tensor
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward_step` from a stacked past (L, 2, b, h, P, e), returning logits and the
        whole present cache (L, 2, b, h, P + t, e): the past followed by the new entries."""
        logits, new = self.forward_step(input_ids, attention_mask, layer_caches(past_key_values))
        return logits, torch.cat([past_key_values, new], dim=4)


# Feed-forward activations by config name. "gelu_tanh" is Longhaul's own (it exports to one ONNX
# pattern); the others exist because imported models were trained with them: exact GELU (MPT,
# lucidrains/linformer) and ReLU (HF Reformer's default).
Activation = Literal["gelu_tanh", "gelu", "relu"]
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class FeedForward(nn.Module):
    """Position-wise MLP: d -> d_ff -> activation -> d."""

    def __init__(
        self, d_model: int, d_ff: int, activation: Activation = "gelu_tanh", bias: bool = True
    ) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_ff, bias=bias)
        self.fc_out = nn.Linear(d_ff, d_model, bias=bias)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class LMHead(nn.Module):
    """Normalised hidden states -> vocabulary logits. Used for MLM and next-token LM alike."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden)


def key_padding_bias(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(b, s) 1/0 mask -> (b, 1, 1, s) additive bias: 0 for real keys, a large negative for pads.

    A finite value (not -inf) keeps fully masked rows finite instead of NaN.
    """
    neg = torch.finfo(dtype).min / 2
    return (1.0 - attention_mask.to(dtype))[:, None, None, :] * neg


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """(length, dim) fixed sinusoidal position encodings (Vaswani et al.), unbounded in length."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    # Frequencies from Python floats, not torch.exp: ORT's exp differs from torch's by one ulp and
    # the angle error grows with position (6e-5 at 4096), enough to flip an LSH bucket.
    inv_freq = torch.tensor(
        [math.exp(-math.log(10000.0) * i / dim) for i in range(0, dim, 2)], device=device
    )
    angles = pos * inv_freq  # (length, dim/2)
    out = torch.zeros(length, dim, device=device)
    out[:, 0::2] = torch.sin(angles)
    out[:, 1::2] = torch.cos(angles[:, : dim // 2])
    return out


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 style init: N(0, std) for linear and embedding weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)


def require_positive(name: str, value: int) -> None:
    """Shared config validation: a clear message naming the field."""
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def require_choice(name: str, value: object, choices: object) -> None:
    """Shared config validation for Literal fields: ``choices`` is the Literal type."""
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def require_token_ids(vocab_size: int, eos_token_id: int | None, pad_token_id: int) -> None:
    """Special token ids recorded in a config must name real vocabulary entries."""
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if value is not None and not 0 <= value < vocab_size:
            raise ValueError(f"{name} must be in [0, vocab_size={vocab_size}), got {value}")
