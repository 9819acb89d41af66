"""The one small interface every inference backend implements.

Backends see numpy arrays keyed by the graph names the manifest's signature lists
(docs/contracts.md) and know nothing about HTTP, batching or tokenizers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from model_store import CacheLayout, past_input_names


class BackendError(RuntimeError):
    """A model file could not be loaded or run."""


class Backend(ABC):
    #: Where the graph really runs, read back from the runtime: "CUDAExecutionProvider",
    #: "CPUExecutionProvider", "torch-cuda" or "torch-cpu". Reported in model_info.
    provider: str

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass. Inputs/outputs by graph name; outputs are float32 numpy arrays."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends need nothing
        """Release runtime resources (sessions, device memory)."""


def past_inputs(cache: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    """A stacked cache (L, 2, b, h, P, e) as a ``kv_cache`` graph's per-layer past inputs:
    ``{prefix}.{l}.key`` = cache[l, 0], ``{prefix}.{l}.value`` = cache[l, 1].

    Views, not copies: for a C-contiguous cache each is one contiguous block, which ONNX
    Runtime's Python binding and ``torch.from_numpy`` read in place (docs/decisions.md,
    "one past input per layer", has the measurement).
    """
    names = past_input_names(prefix, cache.shape[0])
    return {name: cache[i // 2, i % 2] for i, name in enumerate(names)}


def per_layer_feed(
    inputs: dict[str, np.ndarray], cache: CacheLayout | None
) -> dict[str, np.ndarray]:
    """``inputs`` with a stacked past passed under the layout's name (``past_key_values``,
    (L, 2, b, h, P, e)) replaced by the graph's per-layer views of it; other inputs as given.

    Callers may keep and pass the cache stacked (the generation engine's prefill does); the
    graph takes it per layer (docs/contracts.md), and splitting here costs no copy.
    """
    if cache is None or cache.input not in inputs:
        return inputs
    feed = {name: value for name, value in inputs.items() if name != cache.input}
    feed.update(past_inputs(inputs[cache.input], cache.input))
    return feed
