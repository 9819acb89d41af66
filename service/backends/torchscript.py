"""TorchScript backend: ``torch.jit.load`` on CUDA when torch sees a GPU, else CPU.

``device`` is "auto" (CUDA when torch sees a GPU), "cuda" or "cpu" (settings'
``torchscript_device``). When the model does not run on CUDA although "auto" or "cuda" asked for
it, ``fallback`` says why.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.backends.base import Backend, BackendError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")


def choose_device(cuda_available: bool) -> torch.device:
    return torch.device("cuda") if cuda_available else torch.device("cpu")


def cuda_unavailable_reason() -> str | None:
    """Why torch cannot run on a GPU here, or None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return (
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: "
            "torch.cuda.is_available() is False"
        )
    return None


def fixed_devices(module: torch.jit.ScriptModule) -> set[str]:
    """Devices written as constants into the graphs of ``module`` and its submodules: a trace
    records ``torch.arange(n, device=x.device)`` with the device it saw, and ``map_location``
    does not move those. Longhaul's exporter makes them follow the inputs; older files may not."""
    scripted: list[Any] = [sub._c for sub in module.modules()]  # torch._C.ScriptModule, untyped
    return {
        node.s("value")
        for c in scripted
        for name in c._method_names()
        for node in c._get_method(name).graph.findAllNodes("prim::Constant")
        if node.output().type().kind() == "DeviceObjType"
    }


def _load(model_path: Path, device: torch.device) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            # TorchScript is a format this store publishes on purpose (docs/architecture.md);
            # torch's deprecation notice would only add a warning per model load to the log.
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(model_path), map_location=device).eval()
    except Exception as exc:  # torch raises RuntimeError or its own C++ errors
        raise BackendError(f"{model_path}: torch.jit.load failed: {exc}") from exc


class TorchScriptBackend(Backend):
    def __init__(
        self,
        model_path: Path,
        input_names: list[str],
        output_names: list[str],
        intra_op_threads: int = 0,
        device: str = "auto",
    ) -> None:
        if device not in DEVICES:
            raise BackendError(f"unknown TorchScript device {device!r}; expected one of {DEVICES}")
        if intra_op_threads:
            # Process-wide in torch; the last model loaded decides. Same value for every model.
            torch.set_num_threads(intra_op_threads)
        # The profiling executor re-specialises the graph for every new input shape; serving
        # sees a new (batch, length) almost every call, which showed up as 300 ms spikes per
        # decode step. The legacy executor runs the traced graph as is. Process-wide, like threads.
        torch._C._jit_set_profiling_executor(False)
        reason = cuda_unavailable_reason() if device != "cpu" else None
        fault = device == "cuda"  # asked for explicitly: not getting it is worth a warning
        self.device = choose_device(device != "cpu" and reason is None)
        self.module = _load(model_path, self.device)
        if self.device.type == "cuda":
            stuck = sorted(d for d in fixed_devices(self.module) if not d.startswith("cuda"))
            if stuck:
                reason = (
                    f"{model_path.name} creates tensors on {', '.join(stuck)} whatever the "
                    "device (traced before exports followed the input's device); re-export "
                    "it to run on cuda"
                )
                fault = True
                self.device = torch.device("cpu")
                self.module = _load(model_path, self.device)
        self.provider = f"torch-{self.device.type}"
        self.fallback = reason
        if reason:
            log.log(
                logging.WARNING if fault else logging.INFO,
                "%s runs on %s: %s",
                model_path,
                self.provider,
                reason,
            )
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
