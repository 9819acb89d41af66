"""TorchScript backend: device choice and numerics against eager."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from model_store import ModelRepository
from service.backends import BACKENDS, BackendError, create_backend, torchscript
from service.backends.torchscript import TorchScriptBackend, choose_device, fixed_devices
from service.settings import Settings
from tests.service.conftest import EagerReference, ServiceStore


def test_device_follows_cuda_availability() -> None:
    assert choose_device(True).type == "cuda"
    assert choose_device(False).type == "cpu"


def test_cpu_when_cuda_unavailable(
    monkeypatch: pytest.MonkeyPatch, service_store: ServiceStore
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA build that sees no GPU
    version = ModelRepository(service_store.root).resolve("sha")
    backend = create_backend(version, Settings(store=service_store.root))
    assert isinstance(backend, TorchScriptBackend)
    assert backend.provider == "torch-cpu"
    assert backend.fallback is not None and "is_available() is False" in backend.fallback


def test_cpu_build_of_torch_is_named_as_the_reason(
    monkeypatch: pytest.MonkeyPatch, service_store: ServiceStore
) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    version = ModelRepository(service_store.root).resolve("sha")
    backend = create_backend(version, Settings(store=service_store.root))
    assert backend.provider == "torch-cpu"
    assert backend.fallback == f"torch {torch.__version__} is built without CUDA"


def test_cpu_asked_for_is_no_fallback(service_store: ServiceStore) -> None:
    version = ModelRepository(service_store.root).resolve("sha")
    backend = create_backend(version, Settings(store=service_store.root, torchscript_device="cpu"))
    assert (backend.provider, backend.fallback) == ("torch-cpu", None)


class _Positions(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(x.shape[1], device=x.device).to(x.dtype)


def test_a_file_that_fixes_its_device_to_cpu_stays_on_cpu_and_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A plain trace (no device-generic export) records device="cpu" for its arange.
    with torch.no_grad():
        traced = torch.jit.trace(_Positions(), (torch.zeros(1, 3),))
    path = tmp_path / "model.ts"
    traced.save(str(path))
    assert fixed_devices(torch.jit.load(str(path))) == {"cpu"}
    # Pretend torch sees a GPU and load on the CPU whatever the device: only the decision is
    # tested here, no numbers are.
    loads: list[str] = []
    real_load = torchscript._load

    def load_anywhere(model_path: Path, device: torch.device) -> torch.jit.ScriptModule:
        loads.append(device.type)
        return real_load(model_path, torch.device("cpu"))

    monkeypatch.setattr(torchscript, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(torchscript, "_load", load_anywhere)
    backend = TorchScriptBackend(path, ["x"], ["y"])
    assert loads == ["cuda", "cpu"]
    assert backend.provider == "torch-cpu"
    assert backend.fallback is not None
    assert "creates tensors on cpu" in backend.fallback and "re-export" in backend.fallback
    out = backend.run({"x": np.zeros((1, 4), np.float32)})
    np.testing.assert_array_equal(out["y"], [[0.0, 1.0, 2.0, 3.0]])


def test_outputs_match_eager_model(
    service_store: ServiceStore, eager: Callable[[str], EagerReference]
) -> None:
    version = ModelRepository(service_store.root).resolve("sha")
    backend = create_backend(version, Settings(store=service_store.root))
    ref = eager("sha")
    ids = ref.token_ids("import os\nprint(os.getcwd())")
    # Two rows, the second right-padded: the real row must not change with padding.
    width = len(ids) + 5
    batch = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    batch[0, : len(ids)], mask[0, : len(ids)] = ids, 1
    batch[1, : len(ids) - 2], mask[1, : len(ids) - 2] = ids[:-2], 1
    out = backend.run({"input_ids": batch, "attention_mask": mask})
    assert set(out) == {"logits", "hidden"}
    np.testing.assert_allclose(out["hidden"][0, : len(ids)], ref.hidden(ids), atol=1e-4)
    np.testing.assert_allclose(out["hidden"][1, : len(ids) - 2], ref.hidden(ids[:-2]), atol=1e-4)


def test_format_registry_covers_every_manifest_format() -> None:
    assert set(BACKENDS) == {"onnx", "torchscript"}


def test_unknown_device_is_a_backend_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="unknown TorchScript device"):
        TorchScriptBackend(tmp_path / "model.ts", ["x"], ["y"], device="tpu")


def test_unloadable_file_is_a_backend_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.ts"
    bad.write_bytes(b"garbage")
    with pytest.raises(BackendError, match=r"model\.ts"):
        TorchScriptBackend(bad, ["input_ids", "attention_mask"], ["logits", "hidden"])
