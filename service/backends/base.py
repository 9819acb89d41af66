"""The one small interface every inference backend implements.

Backends see numpy arrays keyed by the graph names the manifest's signature lists
(docs/contracts.md) and know nothing about HTTP, batching or tokenizers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class BackendError(RuntimeError):
    """A model file could not be loaded or run."""


class Backend(ABC):
    #: Where the graph really runs, read back from the runtime: "CUDAExecutionProvider",
    #: "CPUExecutionProvider", "torch-cuda" or "torch-cpu". Reported in model_info.
    provider: str
    #: Why ``provider`` is not the first one the settings prefer (for example "CUDA EP not in
    #: this onnxruntime build"); None when the model got it. Reported in /v1/models.
    fallback: str | None = None

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass. Inputs/outputs by graph name; outputs are float32 numpy arrays."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends need nothing
        """Release runtime resources (sessions, device memory)."""
