"""TorchScript backend: device choice and numerics against eager."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from model_store import ModelRepository
from service.backends import BACKENDS, BackendError, create_backend
from service.backends.torchscript import TorchScriptBackend, choose_device
from service.settings import Settings
from tests.service.conftest import EagerReference, ServiceStore


def test_device_follows_cuda_availability() -> None:
    assert choose_device(True).type == "cuda"
    assert choose_device(False).type == "cpu"


def test_cpu_when_cuda_unavailable(
    monkeypatch: pytest.MonkeyPatch, service_store: ServiceStore
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    version = ModelRepository(service_store.root).resolve("sha")
    backend = create_backend(version, Settings(store=service_store.root))
    assert isinstance(backend, TorchScriptBackend)
    assert backend.provider == "torch-cpu"


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


def test_unloadable_file_is_a_backend_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.ts"
    bad.write_bytes(b"garbage")
    with pytest.raises(BackendError, match=r"model\.ts"):
        TorchScriptBackend(bad, ["input_ids", "attention_mask"], ["logits", "hidden"])
