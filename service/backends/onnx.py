"""ONNX Runtime backend: CUDA EP when the runtime really uses it, CPU EP otherwise.

The provider list comes from settings (preference order). Only providers the installed wheel
offers are requested; what the session then reports with ``get_providers()`` is the truth —
onnxruntime-gpu silently falls back to CPU when CUDA libraries are missing, and
``get_available_providers()`` would still list CUDA. When the model does not run on the first
preferred provider, ``fallback`` says why.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.backends.base import Backend, BackendError

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


def choose_providers(preferred: list[str], available: list[str]) -> list[str]:
    """The preferred providers the runtime offers, in preference order; CPU always last resort."""
    chosen = [p for p in preferred if p in available]
    if CPU_PROVIDER not in chosen:
        chosen.append(CPU_PROVIDER)
    return chosen


def fallback_reason(
    preferred: list[str], available: list[str], actual: str, package: str
) -> str | None:
    """Why the session runs on ``actual`` rather than the first preferred provider; None if it
    does not. ``package`` is the installed ONNX Runtime distribution, named in the reason."""
    wanted = preferred[0] if preferred else CPU_PROVIDER
    if actual == wanted:
        return None
    if wanted not in available:
        return (
            f"{wanted} is not in this ONNX Runtime build ({package}; it offers "
            f"{', '.join(available)})"
            + ("; install onnxruntime-gpu for the CUDA EP" if wanted == CUDA_PROVIDER else "")
        )
    return (
        f"{wanted} is offered but the session could not use it and runs on {actual} "
        "(ONNX Runtime's log above says why: usually CUDA or cuDNN libraries it cannot load)"
    )


def installed_package() -> str:
    """The ONNX Runtime distribution behind ``import onnxruntime`` (both install that module)."""
    from importlib import metadata

    for name in ("onnxruntime-gpu", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return f"{name} {metadata.version(name)}"
    return f"onnxruntime {ort.__version__}"


def provider_options(requested: list[str], gpu_tf32: bool) -> list[dict[str, Any]]:
    """Options per requested provider. The CUDA EP computes fp32 GEMMs in TF32 unless told not
    to; an fp32 model's parity report was measured in fp32, so TF32 is opt-in."""
    return [{"use_tf32": "1" if gpu_tf32 else "0"} if p == CUDA_PROVIDER else {} for p in requested]


class OnnxBackend(Backend):
    def __init__(
        self,
        model_path: Path,
        providers: list[str],
        intra_op_threads: int = 0,
        spinning: bool = True,
        gpu_tf32: bool = False,
    ) -> None:
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if not spinning:
            # Idle intra-op threads sleep instead of busy-waiting for the next run, leaving the
            # cores to the Python work between runs (sampling, streaming) on a small machine.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # One worker thread per model already serialises calls; inter-op parallelism would only
        # fight the other models for the same cores.
        options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        requested = choose_providers(providers, available)
        if CUDA_PROVIDER in requested and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds CUDA and cuDNN installed as pip packages (nvidia-*, what a
            # CUDA build of torch brings) only once they are preloaded; with system-wide CUDA
            # libraries this changes nothing.
            try:
                ort.preload_dlls()
            except Exception as exc:  # a missing library is reported by the session below
                log.debug("onnxruntime.preload_dlls failed: %s", exc)
        try:
            self.session = ort.InferenceSession(
                str(model_path),
                sess_options=options,
                providers=requested,
                provider_options=provider_options(requested, gpu_tf32),
            )
        except Exception as exc:  # ORT raises its own untyped exceptions (Fail, InvalidGraph...)
            raise BackendError(f"{model_path}: ONNX Runtime cannot load the graph: {exc}") from exc
        actual = self.session.get_providers()
        self.provider = actual[0] if actual else CPU_PROVIDER
        self.fallback = fallback_reason(providers, available, self.provider, installed_package())
        if self.fallback:
            # A CPU-only build is a deployment's choice (info); a GPU build that could not use
            # the GPU is a fault (warning).
            wanted = providers[0] if providers else CPU_PROVIDER
            level = logging.WARNING if wanted in available else logging.INFO
            log.log(level, "%s runs on %s: %s", model_path, self.provider, self.fallback)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: inputs[name] for name in self.input_names}
        outputs = self.session.run(self.output_names, feed)
        return {
            name: np.asarray(value, dtype=np.float32)
            for name, value in zip(self.output_names, outputs, strict=True)
        }

    def close(self) -> None:
        # ORT frees the session (and its device memory) when the last reference goes.
        del self.session
