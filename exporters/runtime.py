"""Running exported graphs the way the service will: ONNX Runtime sessions and TorchScript.

Session construction prefers the CUDA EP when ONNX Runtime can really use it; which provider a
session ended up on is read back from ``session.get_providers()``, since requesting CUDA on a
machine without a working CUDA stack silently falls back to the CPU EP.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


def requested_providers(available: list[str], prefer_cuda: bool = True) -> list[str]:
    """CUDA first when the installed ORT build offers it, CPU always as the fallback."""
    providers = [CUDA_EP] if prefer_cuda and CUDA_EP in available else []
    return [*providers, CPU_EP]


def create_session(
    path: Path, prefer_cuda: bool = True, threads: int | None = None
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    providers = requested_providers(ort.get_available_providers(), prefer_cuda)
    # The CUDA EP multiplies fp32 in TF32 unless told not to; parity is measured in fp32.
    options_per_provider = [{"use_tf32": "0"} if p == CUDA_EP else {} for p in providers]
    return ort.InferenceSession(
        str(path),
        sess_options=options,
        providers=providers,
        provider_options=options_per_provider,
    )


class Runner:
    """Calls an exported graph with numpy inputs and returns numpy float32 outputs by name."""

    provider: str

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class OnnxRunner(Runner):
    def __init__(self, path: Path, output_names: list[str]) -> None:
        self.session = create_session(path)
        self.provider = self.session.get_providers()[0]
        self.output_names = output_names

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outputs, strict=True))


class TorchScriptRunner(Runner):
    def __init__(self, path: Path, input_names: list[str], output_names: list[str]) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.module = torch.jit.load(str(path), map_location=self.device)
        self.provider = f"torch-{self.device.type}"
        self.input_names = input_names
        self.output_names = output_names

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(inputs[name]).to(self.device) for name in self.input_names]
        with torch.no_grad():
            outputs = self.module(*args)
        return {
            name: out.float().cpu().numpy()
            for name, out in zip(self.output_names, outputs, strict=True)
        }
