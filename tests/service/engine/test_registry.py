"""ModelRegistry: start-up skipping, atomic reload with draining, failed loads, unload."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from model_store import ModelRepository
from service.engine.batcher import EncodeBatcher
from service.engine.errors import (
    EngineStopped,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    ModelVerificationError,
)
from service.engine.generation import GenerationEngine
from service.engine.registry import (
    ModelRegistry,
    default_engine_factories,
    parse_model_spec,
)
from service.metrics import Metrics
from service.settings import Settings
from tests.service.conftest import ServiceStore, run
from tests.service.helpers import corrupt_model_file, publish_copy


def registry_for(store: Path, **settings: object) -> ModelRegistry:
    values: dict[str, object] = {"store": store, "intra_op_threads": 1, "max_wait_ms": 1.0}
    values.update(settings)
    return ModelRegistry(ModelRepository(store), Settings(**values), Metrics())  # type: ignore[arg-type]


def model_info(registry: ModelRegistry, name: str) -> list[dict[str, str]]:
    return [
        s.labels
        for m in registry.metrics.model_info.collect()
        for s in m.samples
        if s.labels["model"] == name
    ]


def test_model_spec_parsing() -> None:
    assert parse_model_spec("lin") == ("lin", None)
    assert parse_model_spec("lin:3") == ("lin", 3)
    with pytest.raises(ValueError, match="name:version"):
        parse_model_spec("lin:0")


def test_startup_skips_a_corrupt_newest_version_and_serves_the_previous(
    store_copy: ServiceStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    v2 = publish_copy(store_copy.root, "lin", tmp_path)
    corrupt_model_file(store_copy.root, "lin", v2)
    registry = registry_for(store_copy.root)

    async def main() -> None:
        await registry.start([("lin", None), ("sha", None)])
        assert registry.ready
        assert registry.get("lin").version == 1
        assert registry.get("sha").version == 1
        await registry.close()

    with caplog.at_level(logging.ERROR, logger="service.engine.registry"):
        run(main())
    assert any("lin/2" in r.message and "model.onnx" in r.message for r in caplog.records)


def test_not_ready_while_loading_then_not_found_for_unknown(service_store: ServiceStore) -> None:
    registry = registry_for(service_store.root)

    async def main() -> None:
        loading = asyncio.create_task(registry.start([("lin", None)]))
        await asyncio.sleep(0)
        assert not registry.ready
        with pytest.raises(ModelNotReady):
            registry.get("lin")
        await loading
        assert registry.ready and registry.get("lin").name == "lin"
        with pytest.raises(ModelNotFound, match="available: lin"):
            registry.get("other")
        await registry.close()

    run(main())


def test_nothing_servable_is_not_ready(store_copy: ServiceStore) -> None:
    corrupt_model_file(store_copy.root, "lin", 1)
    registry = registry_for(store_copy.root)
    run(registry.start([("lin", None), ("missing", None)]))
    assert registry.started and not registry.ready


def test_reload_swaps_atomically_and_in_flight_requests_finish_on_the_old_version(
    store_copy: ServiceStore, tmp_path: Path
) -> None:
    registry = registry_for(store_copy.root)
    v2 = publish_copy(store_copy.root, "lin", tmp_path)
    ids = np.array([3, 40, 41, 42], dtype=np.int64)

    async def main() -> None:
        old = await registry.load("lin", 1)
        assert isinstance(old.engine, EncodeBatcher)
        async with registry.lease("lin") as leased:
            assert leased is old
            new = await registry.load("lin")  # newest = v2
            assert registry.get("lin") is new and new.version == v2
            # The lease holds v1 alive: it still answers.
            (vector,) = await old.engine.submit([ids], "mean")
            assert vector.shape == (32,)
        # Released: v1 is drained and stopped in the background.
        for _ in range(200):
            if not old.engine.accepting:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(EngineStopped):
            await old.engine.submit([ids], "mean")
        (again,) = await new.engine.submit([ids], "mean")  # same weights, same answer
        np.testing.assert_allclose(again, vector, atol=1e-6)
        assert model_info(registry, "lin") == [
            {"model": "lin", "version": str(v2), "architecture": "linformer", "format": "onnx",
             "precision": "fp32", "provider": "CPUExecutionProvider"}
        ]  # fmt: skip
        await registry.close()

    run(main())


def test_failed_reload_keeps_the_old_version_serving(
    store_copy: ServiceStore, tmp_path: Path
) -> None:
    registry = registry_for(store_copy.root)
    v2 = publish_copy(store_copy.root, "lin", tmp_path)
    corrupt_model_file(store_copy.root, "lin", v2)

    async def main() -> None:
        old = await registry.load("lin", 1)
        with pytest.raises(ModelVerificationError) as info:
            await registry.load("lin", v2)
        assert info.value.files == ["model.onnx"]
        assert registry.get("lin") is old
        (vector,) = await old.engine.submit([np.array([3, 9])], "mean")  # type: ignore[attr-defined]
        assert np.isfinite(vector).all()
        await registry.close()

    run(main())


def test_warmup_failure_is_a_load_error(service_store: ServiceStore) -> None:
    class BrokenBatcher(EncodeBatcher):
        async def warmup(self) -> None:
            raise RuntimeError("no answer")

    registry = registry_for(service_store.root)
    registry.factories = {"encode": BrokenBatcher}
    with pytest.raises(ModelLoadError, match="warm-up failed: no answer"):
        run(registry.load("lin"))
    assert "lin" not in registry


def test_unload_stops_serving(service_store: ServiceStore) -> None:
    registry = registry_for(service_store.root)

    async def main() -> None:
        await registry.load("lin")
        served = await registry.unload("lin")
        assert served.version == 1 and "lin" not in registry
        with pytest.raises(ModelNotFound):
            registry.get("lin")
        with pytest.raises(ModelNotFound):
            await registry.unload("lin")
        assert model_info(registry, "lin") == []
        await registry.close()

    run(main())


def test_concurrent_loads_of_one_name_are_serialised(service_store: ServiceStore) -> None:
    registry = registry_for(service_store.root)
    active = 0
    peak = 0
    lock = threading.Lock()

    class CountingBatcher(EncodeBatcher):
        async def warmup(self) -> None:
            nonlocal active, peak
            with lock:
                active += 1
                peak = max(peak, active)
            await asyncio.sleep(0.05)
            with lock:
                active -= 1

    registry.factories = {"encode": CountingBatcher}

    async def main() -> None:
        await asyncio.gather(registry.load("lin"), registry.load("lin"), registry.load("lin"))
        await registry.close()

    run(main())
    assert peak == 1


def test_a_task_without_an_engine_is_refused_at_load(service_store: ServiceStore) -> None:
    registry = registry_for(service_store.root)
    registry.factories = {"encode": EncodeBatcher}
    with pytest.raises(ModelLoadError, match="no engine for task 'generate'"):
        run(registry.load("ali"))


def test_each_task_has_its_engine() -> None:
    assert default_engine_factories() == {"encode": EncodeBatcher, "generate": GenerationEngine}
