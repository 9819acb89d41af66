"""Inference backends; ``create_backend`` picks one by the manifest's format (a small registry)."""

from __future__ import annotations

from collections.abc import Callable

from model_store import ModelVersion
from service.backends.base import Backend, BackendError
from service.settings import Settings


def _onnx(version: ModelVersion, settings: Settings, threads: int) -> Backend:
    from service.backends.onnx import OnnxBackend

    return OnnxBackend(
        version.model_path,
        settings.providers,
        threads,
        spinning=settings.intra_op_spinning,
        gpu_tf32=settings.gpu_tf32,
    )


def _torchscript(version: ModelVersion, settings: Settings, threads: int) -> Backend:
    from service.backends.torchscript import TorchScriptBackend

    signature = version.manifest.signature
    return TorchScriptBackend(
        version.model_path,
        [spec.name for spec in signature.inputs],
        [spec.name for spec in signature.outputs],
        threads,
        settings.torchscript_device,
    )


# Imports are deferred so a deployment serving only ONNX never pays for importing torch.
BACKENDS: dict[str, Callable[[ModelVersion, Settings, int], Backend]] = {
    "onnx": _onnx,
    "torchscript": _torchscript,
}


def create_backend(
    version: ModelVersion, settings: Settings, threads: int | None = None
) -> Backend:
    """A backend for ``version`` by ``manifest.format``; ``BackendError`` if it cannot load.

    ``threads``: its intra-op threads, its share of ``settings.thread_budget`` (default: the
    share of a model loaded alone)."""
    factory = BACKENDS.get(version.manifest.format)
    if factory is None:
        raise BackendError(f"{version.path}: no backend for format {version.manifest.format!r}")
    return factory(version, settings, threads or settings.threads_per_model(1))


__all__ = ["BACKENDS", "Backend", "BackendError", "create_backend"]
