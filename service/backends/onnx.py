"""ONNX Runtime backend: CUDA EP when the runtime really uses it, CPU EP otherwise.

The provider list comes from settings (preference order). Only providers the installed wheel
offers are requested; what the session then reports with ``get_providers()`` is the truth —
onnxruntime-gpu silently falls back to CPU when CUDA libraries are missing, and
``get_available_providers()`` would still list CUDA.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.backends.base import Backend, BackendError

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"


def choose_providers(preferred: list[str], available: list[str]) -> list[str]:
    """The preferred providers the runtime offers, in preference order; CPU always last resort."""
    chosen = [p for p in preferred if p in available]
    if CPU_PROVIDER not in chosen:
        chosen.append(CPU_PROVIDER)
    return chosen


class OnnxBackend(Backend):
    def __init__(
        self,
        model_path: Path,
        providers: list[str],
        intra_op_threads: int = 0,
        spinning: bool = True,
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
        requested = choose_providers(providers, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=requested
            )
        except Exception as exc:  # ORT raises its own untyped exceptions (Fail, InvalidGraph...)
            raise BackendError(f"{model_path}: ONNX Runtime cannot load the graph: {exc}") from exc
        actual = self.session.get_providers()
        self.provider = actual[0] if actual else CPU_PROVIDER
        if requested[0] != self.provider:
            log.warning(
                "%s: requested %s but the session runs on %s",
                model_path,
                requested[0],
                self.provider,
            )
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
