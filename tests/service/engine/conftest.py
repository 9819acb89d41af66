"""Engine fixtures: a LoadedModel with the real manifest/tokenizer and a scripted fake backend;
the generation tests' shared prompts, backend probe and engine runner."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from model_store import ModelRepository
from model_store.tokens import EOS_ID
from service.backends.base import Backend
from service.engine.generation import GenerationEngine
from service.engine.models import LoadedModel
from service.metrics import Metrics
from service.settings import Settings
from tests.service.conftest import EagerReference, ServiceStore


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


# ----------------------------------------------------------------------------- generation

PROMPT = "def parse(self, text):\n    return"
OTHER_PROMPTS = ["import os\n", "class Foo(object):\n    def __init__(self, x, y, z):", "#"]


@dataclass
class Call:
    input_shape: tuple[int, ...]
    past_length: int  # slots of the past cache passed (a decode step: the buffer's capacity)
    past_bytes: int
    past_tokens: tuple[int, ...]  # real tokens of each row's past (its mask over the past)
    outputs: dict[str, np.ndarray]


def past_cache(inputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """The past a kv_cache step was given (``past_key_values.{l}.key`` / ``.value``, as
    DecodeBatch passes it), restacked as (L, 2, b, h, P, e); None for other graphs."""
    layers = [value for name, value in inputs.items() if name.startswith("past_key_values.")]
    if not layers:
        return None
    return np.stack(layers).reshape(len(layers) // 2, 2, *layers[0].shape)


class Probe(Backend):
    """Wraps a backend: records every call, can slow it down, hold it, or make it fail."""

    provider = "probe"

    def __init__(self, inner: Backend, delay: float = 0.0) -> None:
        self.inner = inner
        self.delay = delay
        self.calls: list[Call] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail: Exception | None = None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.gate.wait(timeout=30)
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        outputs = self.inner.run(inputs)
        past = past_cache(inputs)
        slots = 0 if past is None else past.shape[4]
        real = inputs["attention_mask"][:, :slots].sum(axis=1)
        self.calls.append(
            Call(
                inputs["input_ids"].shape,
                slots,
                0 if past is None else past.nbytes,
                tuple(int(n) for n in real),
                outputs,
            )
        )
        return outputs


def with_backend(model: LoadedModel, backend: Backend) -> LoadedModel:
    return replace(model, backend=backend)


def settings_for(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"intra_op_threads": 2, "drain_timeout_seconds": 5.0}
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running(
    model: LoadedModel, metrics: Metrics | None = None, **overrides: Any
) -> AsyncIterator[GenerationEngine]:
    engine = GenerationEngine(model, settings_for(**overrides), metrics or Metrics())
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


def eager_greedy(reference: EagerReference, ids: list[int], n: int) -> list[int]:
    """The eager model's own greedy loop: full recompute per token, no cache, no batching."""
    out: list[int] = []
    model = reference.ckpt.model
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([ids + out], dtype=torch.long)
            logits, _ = model(x, torch.ones_like(x))
            out.append(int(logits[0, -1].argmax()))
            if out[-1] == EOS_ID:
                break
    return out
