"""EncodeBatcher: batch formation by cost/size/age, per-caller results, queue limits, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.engine.batcher import EncodeBatcher, Sequence, _Request, form_batch
from service.engine.cost import quadratic_cost
from service.engine.errors import EngineStopped, QueueFull
from service.engine.models import LoadedModel
from service.metrics import Metrics
from service.settings import Settings
from tests.service.conftest import run, wait_for
from tests.service.engine.conftest import FakeBackend


def seqs(*lengths: int) -> list[Sequence]:
    loop = asyncio.new_event_loop()  # futures need a loop; form_batch never touches them
    try:
        return [
            Sequence(np.arange(n, dtype=np.int64), "mean", loop.create_future(), _Request(1))
            for n in lengths
        ]
    finally:
        loop.close()


def lengths(batch: list[Sequence]) -> list[int]:
    return sorted(s.length for s in batch)


# ------------------------------------------------------------------------------ form_batch


def test_batch_grows_around_the_oldest_by_closest_length() -> None:
    pending = seqs(50, 10, 400, 52, 11, 49)
    batch, full = form_batch(pending, quadratic_cost, {}, budget=3 * 52**2, max_batch_size=32)
    assert pending[0] in batch  # the oldest always goes
    assert lengths(batch) == [49, 50, 52]  # its length neighbours, not the short/long outliers
    assert full  # stopped by the budget, not by running out of candidates


def test_budget_counts_padding_to_the_longest() -> None:
    pending = seqs(10, 10, 10, 10)
    batch, full = form_batch(pending, quadratic_cost, {}, budget=2 * 100, max_batch_size=32)
    assert len(batch) == 2 and full


def test_sequence_over_budget_runs_alone() -> None:
    pending = seqs(1000, 5, 5)
    batch, full = form_batch(pending, quadratic_cost, {}, budget=100.0, max_batch_size=32)
    assert lengths(batch) == [1000] and full


def test_max_batch_size_closes_a_batch() -> None:
    batch, full = form_batch(seqs(*[8] * 10), quadratic_cost, {}, budget=1e9, max_batch_size=4)
    assert len(batch) == 4 and full
    batch, full = form_batch(seqs(*[8] * 4), quadratic_cost, {}, budget=1e9, max_batch_size=4)
    assert len(batch) == 4 and full


def test_not_full_when_pending_runs_out() -> None:
    batch, full = form_batch(seqs(8, 9), quadratic_cost, {}, budget=1e9, max_batch_size=32)
    assert len(batch) == 2 and not full


# ------------------------------------------------------------------------------ EncodeBatcher


def settings(**overrides: object) -> Settings:
    values: dict[str, object] = {"max_wait_ms": 50.0}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def backend_of(model: LoadedModel) -> FakeBackend:
    assert isinstance(model.backend, FakeBackend)
    return model.backend


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def queue_depth(metrics: Metrics) -> float:
    return sample(metrics, "longhaul_queue_depth", model="lin")


def test_concurrent_requests_share_a_batch_and_get_their_own_results(
    fake_model: LoadedModel,
) -> None:
    metrics = Metrics()
    batcher = EncodeBatcher(fake_model, settings(), metrics)
    rows = [np.array([4 + i] * (3 + i % 3), dtype=np.int64) for i in range(8)]

    async def main() -> list[list[np.ndarray]]:
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit([row], "mean") for row in rows))
        finally:
            await batcher.stop()

    results = run(main())
    for row, (vector,) in zip(rows, results, strict=True):
        # (mean id, mean position, 1): the id identifies the caller, the position its length.
        np.testing.assert_allclose(vector, [row[0], (len(row) - 1) / 2, 1.0])
    assert max(b for b, _ in backend_of(fake_model).batches) > 1
    assert sample(metrics, "longhaul_batch_size_count", model="lin") == len(
        backend_of(fake_model).batches
    )
    assert sample(metrics, "longhaul_batch_size_sum", model="lin") == 8
    # Lengths 3..5 padded to 5 in one batch: padding was measured.
    assert sample(metrics, "longhaul_batch_padding_ratio_sum", model="lin") > 0


def test_budget_splits_concurrent_requests(fake_model: LoadedModel) -> None:
    batcher = EncodeBatcher(fake_model, settings(batch_cost_budget=2 * 10 * 16), Metrics())
    rows = [np.full(10, 7, dtype=np.int64) for _ in range(4)]  # linformer tiny k=16: cost 160 each

    async def main() -> None:
        await batcher.start()
        await asyncio.gather(*(batcher.submit([row], "mean") for row in rows))
        await batcher.stop()

    assert fake_model.manifest.config["k"] == 16
    run(main())
    assert backend_of(fake_model).batches == [(2, 10), (2, 10)]


def test_lone_request_waits_for_max_wait_then_runs_alone(fake_model: LoadedModel) -> None:
    """Nothing else arrives: the batch closes on the oldest request's deadline, not before (a
    timer cannot fire early, so the lower bound is exact; how late it runs on a busy machine is
    not this test's business)."""
    metrics = Metrics()
    batcher = EncodeBatcher(fake_model, settings(max_wait_ms=40.0), metrics)

    async def main() -> None:
        await batcher.start()
        await batcher.submit([np.array([5, 6], dtype=np.int64)], "cls")
        await batcher.stop()

    run(main())
    assert backend_of(fake_model).batches == [(1, 2)]
    assert sample(metrics, "longhaul_queue_duration_seconds_count", model="lin") == 1
    assert sample(metrics, "longhaul_queue_duration_seconds_sum", model="lin") >= 0.035


def test_queue_full_is_rejected_and_counted(fake_model: LoadedModel) -> None:
    metrics = Metrics()
    batcher = EncodeBatcher(fake_model, settings(max_queue_requests=1, max_wait_ms=0.0), metrics)
    backend = backend_of(fake_model)
    backend.gate = threading.Event()
    row = np.array([5, 6], dtype=np.int64)

    async def main() -> None:
        await batcher.start()
        first = asyncio.create_task(batcher.submit([row], "mean"))
        await asyncio.to_thread(backend.started.wait, 10)  # first is in flight, queue is empty
        second = asyncio.create_task(batcher.submit([row], "mean"))
        await wait_for(lambda: queue_depth(metrics) == 1)  # second waits: the queue is full
        with pytest.raises(QueueFull):
            await batcher.submit([row], "mean")
        backend.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(first, second)
        await batcher.stop()

    run(main())
    assert (
        sample(metrics, "longhaul_requests_rejected_total", model="lin", reason="queue_full") == 1
    )


def test_stop_finishes_queued_work_then_refuses(fake_model: LoadedModel) -> None:
    metrics = Metrics()
    batcher = EncodeBatcher(fake_model, settings(max_wait_ms=10_000.0), metrics)

    async def main() -> None:
        await batcher.start()
        pending = [asyncio.create_task(batcher.submit([np.array([9] * n)], "mean")) for n in (2, 3)]
        await wait_for(lambda: queue_depth(metrics) == 2)  # both queued
        await batcher.stop()  # must not wait 10 s for the batch deadline
        results = await asyncio.gather(*pending)
        assert [r[0][0] for r in results] == [9.0, 9.0]
        with pytest.raises(EngineStopped):
            await batcher.submit([np.array([1])], "mean")

    started = time.perf_counter()
    run(main())
    assert time.perf_counter() - started < 5


def test_backend_failure_reaches_callers_and_worker_survives(fake_model: LoadedModel) -> None:
    batcher = EncodeBatcher(fake_model, settings(max_wait_ms=0.0), Metrics())
    backend = backend_of(fake_model)

    async def main() -> None:
        await batcher.start()
        backend.fail = RuntimeError("kernel exploded")
        with pytest.raises(RuntimeError, match="kernel exploded"):
            await batcher.submit([np.array([5])], "mean")
        backend.fail = None
        (vector,) = await batcher.submit([np.array([5])], "mean")
        assert vector[0] == 5.0
        await batcher.stop()

    run(main())


def test_cancelled_caller_is_dropped_from_the_queue(fake_model: LoadedModel) -> None:
    metrics = Metrics()
    batcher = EncodeBatcher(fake_model, settings(max_wait_ms=50.0), metrics)

    async def main() -> None:
        await batcher.start()
        gone = asyncio.create_task(batcher.submit([np.array([5] * 7)], "mean"))
        await wait_for(lambda: queue_depth(metrics) == 1)  # queued, its batch not yet closed
        gone.cancel()
        (vector,) = await batcher.submit([np.array([6] * 3)], "mean")
        assert vector[0] == 6.0
        await batcher.stop()

    run(main())
    assert backend_of(fake_model).batches == [(1, 3)]


def test_a_failing_batcher_step_fails_callers_instead_of_hanging(
    fake_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.engine.batcher as batcher_module

    real_form_batch = batcher_module.form_batch
    calls = 0

    def flaky(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("bug in batch formation")
        return real_form_batch(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(batcher_module, "form_batch", flaky)
    batcher = EncodeBatcher(fake_model, settings(max_wait_ms=0.0), Metrics())

    async def main() -> None:
        await batcher.start()
        with pytest.raises(ValueError, match="bug in batch formation"):
            await asyncio.wait_for(batcher.submit([np.array([5])], "mean"), timeout=5)
        (vector,) = await asyncio.wait_for(batcher.submit([np.array([6])], "mean"), timeout=5)
        assert vector[0] == 6.0
        await batcher.stop()

    run(main())
