"""Engine fixtures: a LoadedModel with the real manifest/tokenizer and a scripted fake backend."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
from tokenizers import Tokenizer

from model_store import ModelRepository
from service.backends.base import Backend
from service.engine.models import LoadedModel
from tests.service.conftest import ServiceStore


class FakeBackend(Backend):
    """hidden[b, t] = (input id, position, 1): pooled results reveal which row they came from.

    Records every batch shape; ``gate`` (when set) blocks run() until released, so tests can
    hold a batch in flight; ``fail`` makes run() raise.
    """

    provider = "fake"

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.fail: Exception | None = None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = inputs["input_ids"]
        self.batches.append(ids.shape)
        self.started.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.fail is not None:
            raise self.fail
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
        hidden = np.stack([ids, positions, np.ones_like(ids)], axis=-1).astype(np.float32)
        return {"hidden": hidden, "logits": hidden}


@pytest.fixture
def fake_model(service_store: ServiceStore) -> LoadedModel:
    version = ModelRepository(service_store.root).resolve("lin")
    tokenizer = Tokenizer.from_file(str(version.tokenizer_path))
    return LoadedModel("lin", version.version, version.manifest, tokenizer, FakeBackend())


def with_max_context(model: LoadedModel, max_context: int) -> LoadedModel:
    manifest = model.manifest.model_copy(update={"max_context": max_context})
    return replace(model, manifest=manifest)
