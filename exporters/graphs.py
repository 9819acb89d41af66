"""What gets exported: thin wrappers fixing each graph's inputs and outputs (docs/contracts.md).

Outputs are always float32 so the service never has to know the precision the graph computes
in; reduced-precision models cast inside the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model_store import PAST_INPUT_PREFIX, past_input_names

# (name, dtype, shape): a dimension is a symbolic name or a fixed size.
GraphTensor = tuple[str, str, tuple[str | int, ...]]


@dataclass(frozen=True)
class GraphSpec:
    """Names, dtypes and symbolic shapes of one exported graph."""

    mode: str  # "encode" | "full_sequence" | "kv_cache"
    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]

    @property
    def input_names(self) -> list[str]:
        return [name for name, _, _ in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [name for name, _, _ in self.outputs]

    @property
    def cache_dims(self) -> tuple[int, int, int]:
        """(layers, heads, head_dim) of a kv_cache graph: the fixed sizes of its new_key_values
        output (layers, 2, batch, heads, sequence, head_dim)."""
        layers, _, _, heads, _, head_dim = self.outputs[1][2]
        return int(layers), int(heads), int(head_dim)


class SequenceGraph(nn.Module):
    """(input_ids, attention_mask) -> (logits, hidden): encoders and full-sequence decoders."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        logits, hidden = self.model(input_ids, attention_mask)
        return logits.float(), hidden.float()


class KVCacheGraph(nn.Module):
    """(input_ids, attention_mask, past_key_values.0.key, past_key_values.0.value, ...) ->
    (logits, new_key_values).

    The past crosses the graph boundary as one float32 (batch, heads, past, head_dim) input per
    layer and per key/value, and only the t new tokens' entries come out, stacked
    (layers, 2, batch, heads, t, head_dim). Per-layer inputs because ONNX Runtime has no views:
    indexing one stacked past input per layer became Split ops that copied the whole cache every
    step (docs/decisions.md, "one past input per layer"). The caller keeps the cache and passes
    views of it. Reduced-precision models cast each past input in and the new entries out so
    one cache layout serves every precision.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, *past_key_values: Tensor
    ) -> tuple[Tensor, Tensor]:
        # Pairs (key, value) per layer; .to() of an fp32 model is the identity, not a copy.
        past = [
            (past_key_values[i].to(self.dtype), past_key_values[i + 1].to(self.dtype))
            for i in range(0, len(past_key_values), 2)
        ]
        logits, new = self.model.forward_step(input_ids, attention_mask, past)  # type: ignore[operator]
        return logits.float(), new.float()


def graph_spec(task: str, config: object) -> GraphSpec:
    """The signature of the graph exported for a model with this task and config."""
    ids = ("input_ids", "int64", ("batch", "sequence"))
    logits = ("logits", "float32", ("batch", "sequence", config.vocab_size))  # type: ignore[attr-defined]
    d_model: int = config.d_model  # type: ignore[attr-defined]
    # hidden_size where a config has one (a Reformer concatenating its streams is 2·d_model wide)
    width: int = getattr(config, "hidden_size", d_model)
    hidden = ("hidden", "float32", ("batch", "sequence", width))
    if task == "encode":
        return GraphSpec(
            "encode", (ids, ("attention_mask", "int64", ("batch", "sequence"))), (logits, hidden)
        )
    if not hasattr(config, "n_heads") or not _has_kv_cache(config):
        return GraphSpec(
            "full_sequence",
            (ids, ("attention_mask", "int64", ("batch", "sequence"))),
            (logits, hidden),
        )
    layers: int = config.n_layers  # type: ignore[attr-defined]
    heads: int = config.n_heads  # type: ignore[attr-defined]
    # head_dim where a config has one (a Reformer's attn_head_dim may differ from d_model / h)
    head_dim: int = getattr(config, "head_dim", d_model // heads)
    layer_shape = ("batch", heads, "past_sequence", head_dim)
    names = past_input_names(PAST_INPUT_PREFIX, layers)
    past = tuple((name, "float32", layer_shape) for name in names)
    # Only the new tokens' entries: the caller owns the cache (docs/contracts.md).
    new = ("new_key_values", "float32", (layers, 2, "batch", heads, "sequence", head_dim))
    mask = ("attention_mask", "int64", ("batch", "total_sequence"))
    return GraphSpec("kv_cache", (ids, mask, *past), (logits, new))


def _has_kv_cache(config: object) -> bool:
    """A model class with ``forward_step`` (the cached step the graph exports), and, where the
    class says which configs its cache reproduces (``supports_kv_cache``, e.g. Reformer: causal
    native LSH only), this config."""
    from exporters.architectures import ARCHITECTURES, architecture_of

    model_class = ARCHITECTURES[architecture_of(config)].model_class
    if not hasattr(model_class, "forward_step"):
        return False
    supports = getattr(model_class, "supports_kv_cache", None)
    return supports is None or bool(supports(config))


def wrap(model: nn.Module, spec: GraphSpec, dtype: torch.dtype) -> nn.Module:
    if spec.mode == "kv_cache":
        return KVCacheGraph(model, dtype).eval()
    return SequenceGraph(model).eval()
