"""ONNX Runtime backend: provider selection (CUDA EP -> CPU EP) and numerics against eager."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort
import pytest

from model_store import ModelRepository
from service.backends import BackendError, create_backend
from service.backends.onnx import (
    CPU_PROVIDER,
    OnnxBackend,
    choose_providers,
    fallback_reason,
    provider_options,
)
from service.settings import Settings
from tests.service.conftest import EagerReference, ServiceStore

CUDA = "CUDAExecutionProvider"


def lin_path(store: ServiceStore) -> Path:
    return ModelRepository(store.root).resolve("lin").model_path


class FakeSession:
    """Stands in for ort.InferenceSession: records what it was asked for, reports ``actual``."""

    created: ClassVar[list[dict[str, Any]]] = []
    actual: ClassVar[list[str]] = [CPU_PROVIDER]

    def __init__(
        self,
        path: str,
        sess_options: ort.SessionOptions,
        providers: list[str],
        provider_options: list[dict[str, str]],
    ) -> None:
        FakeSession.created.append(
            {"providers": providers, "options": sess_options, "provider_options": provider_options}
        )

    def get_providers(self) -> list[str]:
        return list(FakeSession.actual)

    def get_inputs(self) -> list[Any]:
        return []

    def get_outputs(self) -> list[Any]:
        return []


@pytest.fixture
def fake_session(monkeypatch: pytest.MonkeyPatch) -> type[FakeSession]:
    FakeSession.created = []
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    return FakeSession


def test_choose_providers_keeps_preference_order_and_falls_back_to_cpu() -> None:
    assert choose_providers([CUDA, CPU_PROVIDER], [CUDA, CPU_PROVIDER]) == [CUDA, CPU_PROVIDER]
    assert choose_providers([CUDA, CPU_PROVIDER], ["AzureExecutionProvider", CPU_PROVIDER]) == [
        CPU_PROVIDER
    ]
    # CPU is the last resort even when settings forgot it.
    assert choose_providers([CUDA], [CUDA, CPU_PROVIDER]) == [CUDA, CPU_PROVIDER]


def test_cuda_absent_requests_and_reports_cpu(
    monkeypatch: pytest.MonkeyPatch, fake_session: type[FakeSession]
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU_PROVIDER])
    backend = OnnxBackend(Path("model.onnx"), [CUDA, CPU_PROVIDER])
    assert fake_session.created[0]["providers"] == [CPU_PROVIDER]
    assert backend.provider == CPU_PROVIDER
    assert backend.fallback is not None
    assert "CUDAExecutionProvider is not in this ONNX Runtime build" in backend.fallback
    assert "install onnxruntime-gpu" in backend.fallback


def test_cuda_available_but_session_runs_on_cpu_records_cpu(
    monkeypatch: pytest.MonkeyPatch, fake_session: type[FakeSession]
) -> None:
    # onnxruntime-gpu without working CUDA libraries: the EP is "available", the session says CPU.
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU_PROVIDER])
    fake_session.actual = [CPU_PROVIDER]
    backend = OnnxBackend(Path("model.onnx"), [CUDA, CPU_PROVIDER])
    assert fake_session.created[0]["providers"] == [CUDA, CPU_PROVIDER]
    assert backend.provider == CPU_PROVIDER
    assert backend.fallback is not None and "could not use it" in backend.fallback


def test_cuda_session_is_reported_as_cuda(
    monkeypatch: pytest.MonkeyPatch, fake_session: type[FakeSession]
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU_PROVIDER])
    fake_session.actual = [CUDA, CPU_PROVIDER]
    backend = OnnxBackend(Path("model.onnx"), [CUDA, CPU_PROVIDER])
    assert (backend.provider, backend.fallback) == (CUDA, None)


def test_cpu_preferred_and_got_is_no_fallback() -> None:
    assert fallback_reason([CPU_PROVIDER], [CUDA, CPU_PROVIDER], CPU_PROVIDER, "ort") is None
    assert fallback_reason([], [CPU_PROVIDER], CPU_PROVIDER, "ort") is None


def test_cuda_ep_multiplies_fp32_in_fp32_unless_tf32_is_allowed() -> None:
    assert provider_options([CUDA, CPU_PROVIDER], gpu_tf32=False) == [{"use_tf32": "0"}, {}]
    assert provider_options([CUDA, CPU_PROVIDER], gpu_tf32=True) == [{"use_tf32": "1"}, {}]
    assert provider_options([CPU_PROVIDER], gpu_tf32=False) == [{}]


def test_cuda_libraries_are_preloaded_only_when_cuda_is_requested(
    monkeypatch: pytest.MonkeyPatch, fake_session: type[FakeSession]
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(ort, "preload_dlls", lambda: calls.append(1), raising=False)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU_PROVIDER])
    OnnxBackend(Path("model.onnx"), [CPU_PROVIDER])
    assert calls == []
    fake_session.actual = [CUDA, CPU_PROVIDER]
    OnnxBackend(Path("model.onnx"), [CUDA, CPU_PROVIDER])
    assert calls == [1]
    assert fake_session.created[-1]["provider_options"] == [{"use_tf32": "0"}, {}]


def test_thread_count_from_settings(fake_session: type[FakeSession]) -> None:
    OnnxBackend(Path("model.onnx"), [CPU_PROVIDER], intra_op_threads=3)
    assert fake_session.created[0]["options"].intra_op_num_threads == 3


@pytest.mark.parametrize(("spinning", "entry"), [(True, None), (False, "0")])
def test_idle_thread_spinning_from_settings(
    fake_session: type[FakeSession], spinning: bool, entry: str | None
) -> None:
    """Spinning stays ORT's default (no entry at all) unless turned off."""
    OnnxBackend(Path("model.onnx"), [CPU_PROVIDER], intra_op_threads=2, spinning=spinning)
    options = fake_session.created[0]["options"]
    try:
        found: str | None = options.get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # ORT raises for a key never set
        found = None
    assert found == entry


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
def test_real_session_with_fake_cuda_availability_runs_on_cpu(
    monkeypatch: pytest.MonkeyPatch, service_store: ServiceStore
) -> None:
    # The CPU wheel cannot create a CUDA EP; asking for it must still give a working CPU session.
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU_PROVIDER])
    backend = OnnxBackend(lin_path(service_store), [CUDA, CPU_PROVIDER], intra_op_threads=1)
    assert backend.provider == CPU_PROVIDER
    out = backend.run(
        {"input_ids": np.array([[3, 10, 11]]), "attention_mask": np.ones((1, 3), np.int64)}
    )
    assert out["hidden"].shape[:2] == (1, 3)


def test_outputs_match_eager_model(
    service_store: ServiceStore, eager: Callable[[str], EagerReference]
) -> None:
    version = ModelRepository(service_store.root).resolve("lin")
    backend = create_backend(version, Settings(store=service_store.root, intra_op_threads=2))
    assert isinstance(backend, OnnxBackend)
    ref = eager("lin")
    ids = ref.token_ids("def add(a, b):\n    return a + b\n")
    out = backend.run(
        {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    )
    assert out["hidden"].dtype == np.float32
    np.testing.assert_allclose(out["hidden"][0], ref.hidden(ids), atol=1e-4)


def test_unloadable_graph_is_a_backend_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx graph")
    with pytest.raises(BackendError, match=r"model\.onnx"):
        OnnxBackend(bad, [CPU_PROVIDER])
