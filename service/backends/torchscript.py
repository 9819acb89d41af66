"""TorchScript backend: ``torch.jit.load`` on CUDA when torch sees a GPU, else CPU."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from service.backends.base import Backend, BackendError


def choose_device(cuda_available: bool) -> torch.device:
    return torch.device("cuda") if cuda_available else torch.device("cpu")


class TorchScriptBackend(Backend):
    def __init__(
        self,
        model_path: Path,
        input_names: list[str],
        output_names: list[str],
        intra_op_threads: int = 0,
    ) -> None:
        if intra_op_threads:
            # Process-wide in torch; the last model loaded decides. Same value for every model.
            torch.set_num_threads(intra_op_threads)
        # The profiling executor re-specialises the graph for every new input shape; serving
        # sees a new (batch, length) almost every call, which showed up as 300 ms spikes per
        # decode step. The legacy executor runs the traced graph as is. Process-wide, like threads.
        torch._C._jit_set_profiling_executor(False)
        self.device = choose_device(torch.cuda.is_available())
        try:
            with warnings.catch_warnings():
                # TorchScript is a format this store publishes on purpose
                # (docs/architecture.md); torch's deprecation notice would only add a warning
                # per model load to the server log.
                warnings.simplefilter("ignore", DeprecationWarning)
                self.module = torch.jit.load(str(model_path), map_location=self.device).eval()
        except Exception as exc:  # torch raises RuntimeError or its own C++ errors
            raise BackendError(f"{model_path}: torch.jit.load failed: {exc}") from exc
        self.provider = f"torch-{self.device.type}"
        self.input_names = input_names
        self.output_names = output_names

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [
            torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self.device)
            for n in self.input_names
        ]
        with torch.inference_mode():
            outputs = self.module(*args)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return {
            name: value.float().cpu().numpy()
            for name, value in zip(self.output_names, outputs, strict=True)
        }

    def close(self) -> None:
        del self.module
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
