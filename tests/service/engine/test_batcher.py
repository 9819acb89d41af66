"""EncodeBatcher: batch choice by predicted throughput (and the older deadline rule), no waiting
when idle, calibration at warm-up, per-caller results, queue limits, shutdown."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from service.backends.base import Backend
from service.engine.batcher import (
    EncodeBatcher,
    Sequence,
    _Request,
    choose_batch,
    form_batch,
    wait_pays,
)
from service.engine.cost import (
    BatchTimeModel,
    architecture_model,
    batch_cost,
    cost_function,
    linformer_cost,
    quadratic_cost,
)
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
    # The deadline rule pads freely (the throughput rule would avoid padding here).
    batcher = EncodeBatcher(fake_model, settings(batch_policy="deadline"), metrics)
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


def test_deadline_policy_holds_a_lone_request_up_to_max_wait(fake_model: LoadedModel) -> None:
    """Nothing else arrives: the batch closes on the oldest request's deadline, not before (a
    timer cannot fire early, so the lower bound is exact)."""
    metrics = Metrics()
    batcher = EncodeBatcher(
        fake_model, settings(max_wait_ms=40.0, batch_policy="deadline"), metrics
    )

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
    # The deadline policy holds both requests for their (10 s) batch deadline.
    policy = settings(max_wait_ms=10_000.0, batch_policy="deadline")
    batcher = EncodeBatcher(fake_model, policy, metrics)

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
    # The deadline policy holds a lone request for max_wait_ms: a caller cancelled meanwhile is
    # still queued, and must leave the queue without reaching the backend.
    metrics = Metrics()
    batcher = EncodeBatcher(
        fake_model, settings(max_wait_ms=50.0, batch_policy="deadline"), metrics
    )

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
    # form_batch is the deadline policy's batch formation.
    policy = settings(max_wait_ms=0.0, batch_policy="deadline")
    batcher = EncodeBatcher(fake_model, policy, Metrics())

    async def main() -> None:
        await batcher.start()
        with pytest.raises(ValueError, match="bug in batch formation"):
            await asyncio.wait_for(batcher.submit([np.array([5])], "mean"), timeout=5)
        (vector,) = await asyncio.wait_for(batcher.submit([np.array([6])], "mean"), timeout=5)
        assert vector[0] == 6.0
        await batcher.stop()

    run(main())


# ------------------------------------------------------------------------------ throughput policy


class CostedBackend(Backend):
    """A backend whose time is known: ``fixed + per_token * b * n`` seconds on a fake clock
    (``clock``), plus the FakeBackend's (id, position, 1) hidden states. ``fail_above`` makes
    batches wider than that many padded tokens raise (a backend that cannot run a shape)."""

    provider = "costed"

    def __init__(self, fixed: float, per_token: float, fail_above: int | None = None) -> None:
        self.fixed, self.per_token, self.fail_above = fixed, per_token, fail_above
        self.now = 0.0
        self.batches: list[tuple[int, int]] = []

    def clock(self) -> float:
        return self.now

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = inputs["input_ids"]
        b, n = ids.shape
        if self.fail_above is not None and b * n > self.fail_above:
            raise MemoryError(f"cannot allocate {b} x {n}")
        self.batches.append((b, n))
        self.now += self.fixed + self.per_token * b * n
        positions = np.broadcast_to(np.arange(n), ids.shape)
        hidden = np.stack([ids, positions, np.ones_like(ids)], axis=-1).astype(np.float32)
        return {"hidden": hidden}


def stub_model(backend: Backend, architecture: str = "linformer") -> LoadedModel:
    """A LoadedModel without a store: the batcher reads only these manifest fields."""
    vocab = {"[UNK]": 0, "def": 5, "warm_up():": 6, "return": 7, "42": 8}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()  # type: ignore[assignment]
    hidden = SimpleNamespace(shape=["batch", "sequence", 3])
    manifest = SimpleNamespace(
        architecture=architecture,
        config={"k": 16},
        max_context=512,
        task="encode",
        signature=SimpleNamespace(output=lambda name: hidden),
    )
    return LoadedModel("stub", 1, cast(Any, manifest), tokenizer, backend)


def measured(fixed: float, per_sequence: float, per_token: float, per_attention: float,
             architecture: str = "linformer") -> BatchTimeModel:  # fmt: skip
    return BatchTimeModel(
        cost_function(architecture), {"k": 16},
        (fixed, per_sequence, per_token, per_attention), "measured", "test",
    )  # fmt: skip


def predicted_rate(model: BatchTimeModel, batch: list[Sequence]) -> float:
    return sum(s.length for s in batch) / model.seconds(len(batch), max(s.length for s in batch))


@pytest.mark.parametrize("seed", range(6))
def test_chosen_batch_maximises_predicted_real_tokens_per_second(seed: int) -> None:
    rng = random.Random(seed)
    model = measured(
        rng.choice([0.0, 1e-3, 2e-2]), rng.choice([0.0, 1e-4]), 1e-5,
        rng.choice([0.0, 1e-9]), rng.choice(["linformer", "shatter"]),
    )  # fmt: skip
    pending = seqs(*(rng.randint(1, 300) for _ in range(rng.randint(1, 9))))
    max_size = rng.choice([1, 3, 32])
    budget = rng.choice([1e12, 4 * model.cost(200, model.config)])
    batch = choose_batch(pending, model, budget, max_size)

    def allowed(group: tuple[Sequence, ...]) -> bool:
        longest = max(s.length for s in group)
        fits = (
            len(group) == 1 or batch_cost(model.cost, model.config, len(group), longest) <= budget
        )
        return pending[0] in group and len(group) <= max_size and fits

    # Brute force over every subset of the queue the limits allow.
    candidates = [
        group
        for size in range(1, len(pending) + 1)
        for group in itertools.combinations(pending, size)
        if allowed(group)
    ]
    best = max(predicted_rate(model, list(group)) for group in candidates)
    assert allowed(tuple(batch))
    assert predicted_rate(model, batch) == pytest.approx(best, rel=1e-9)


def test_measured_fixed_cost_makes_similar_lengths_batch_and_outliers_wait() -> None:
    # A pass costs 20 ms plus 0.1 ms per padded token: the five rows near 100 tokens share a
    # pass (495 tokens in 70.5 ms); padding them to the 300-token row (795 in 200 ms) or adding
    # the 5-token row (500 in 80.6 ms) would lower the rate.
    model = measured(0.02, 0.0, 1e-4, 0.0)
    pending = seqs(100, 98, 300, 5, 101, 99, 97)
    batch = choose_batch(pending, model, budget=1e12, max_batch_size=32)
    assert lengths(batch) == [97, 98, 99, 100, 101]
    # On a machine with no per-pass cost, padding only costs: the oldest runs with its exact
    # neighbours, without the 5-token row.
    cpu = measured(0.0, 0.0, 1e-4, 0.0)
    assert lengths(choose_batch(pending, cpu, 1e12, 32)) == [100]
    equal = seqs(64, 64, 64, 10)
    assert lengths(choose_batch(equal, cpu, 1e12, 32)) == [64, 64, 64]  # ties: fewer passes


def test_a_batch_must_beat_the_oldest_alone_by_more_than_the_fits_error() -> None:
    # 5 ms per pass + 0.1 ms per token: four 100-token rows in one pass (45 ms for 400 tokens)
    # beat the oldest alone (15 ms for 100) by 1/3 in predicted tokens per second.
    model = measured(0.005, 0.0, 1e-4, 0.0)
    pending = seqs(100, 100, 100, 100)
    assert len(choose_batch(pending, model, 1e12, 32, margin=0.2)) == 4
    # A fit that is off by 40% on its own samples cannot promise a 33% gain: one row.
    assert lengths(choose_batch(pending, model, 1e12, 32, margin=0.4)) == [100]
    assert choose_batch(pending, model, 1e12, 32, margin=0.4)[0] is pending[0]
    # Waiting for company is judged by the same margin.
    gpu_like = measured(0.010, 0.0, 1e-7, 0.0)
    assert wait_pays(gpu_like, seqs(100), 0.002, 100, margin=0.5)
    assert not wait_pays(gpu_like, seqs(100), 0.002, 100, margin=1.0)


def test_batch_choice_respects_size_and_cost_limits() -> None:
    model = measured(1.0, 0.0, 1e-6, 0.0)  # a huge per-pass cost: as big as allowed
    pending = seqs(*[50] * 10)
    assert len(choose_batch(pending, model, 1e12, 4)) == 4
    budget = 3 * linformer_cost(50, {"k": 16})
    assert len(choose_batch(pending, model, budget, 32)) == 3
    # A sequence over the budget still runs, alone.
    assert lengths(choose_batch(seqs(500, 50, 50), model, budget, 32)) == [500]


def test_waiting_pays_only_when_the_next_arrival_is_predicted_before_the_per_pass_cost() -> None:
    batch = seqs(100)
    gpu_like = measured(0.010, 0.0, 1e-7, 0.0)  # 10 ms per pass, tokens nearly free
    assert wait_pays(gpu_like, batch, expected_gap=0.002, expected_length=100)
    assert not wait_pays(gpu_like, batch, expected_gap=0.020, expected_length=100)
    cpu_like = measured(1e-4, 0.0, 1e-4, 0.0)  # per-pass cost tiny next to the tokens'
    assert not wait_pays(cpu_like, batch, expected_gap=0.002, expected_length=100)
    unmeasured = architecture_model(linformer_cost, {"k": 16}, "test")
    assert not wait_pays(unmeasured, batch, expected_gap=0.0, expected_length=100)


def test_idle_worker_dispatches_a_lone_request_at_once() -> None:
    backend = CostedBackend(fixed=0.0, per_token=0.0)
    # A wait window of 10 s that the old rule would have spent waiting for company.
    batcher = EncodeBatcher(stub_model(backend), settings(max_wait_ms=10_000.0), Metrics())
    batcher.time_model = measured(0.5, 0.0, 1e-6, 0.0)  # even with a large per-pass cost

    async def main() -> list[float]:
        await batcher.start()
        elapsed = []
        for n in (3, 7, 5):  # one client: each request arrives to an idle model
            started = time.perf_counter()
            (vector,) = await batcher.submit([np.full(n, 9, dtype=np.int64)], "mean")
            elapsed.append(time.perf_counter() - started)
            assert vector[0] == 9.0
        await batcher.stop()
        return elapsed

    elapsed = run(main())
    assert backend.batches == [(1, 3), (1, 7), (1, 5)]
    assert max(elapsed) < 5.0  # nowhere near the 10 s window: nothing waited on a timer


def test_requests_arriving_while_busy_form_the_next_batch() -> None:
    backend = FakeBackend()
    backend.gate = threading.Event()
    batcher = EncodeBatcher(stub_model(backend), settings(max_wait_ms=10_000.0), Metrics())

    async def main() -> None:
        await batcher.start()
        first = asyncio.create_task(batcher.submit([np.full(4, 1, dtype=np.int64)], "mean"))
        await asyncio.to_thread(backend.started.wait, 10)  # the first runs alone, at once
        later = [
            asyncio.create_task(batcher.submit([np.full(4, 2 + i, dtype=np.int64)], "mean"))
            for i in range(3)
        ]
        await asyncio.sleep(0.01)
        backend.gate.set()  # type: ignore[union-attr]
        await asyncio.gather(first, *later)
        await batcher.stop()

    run(main())
    assert backend.batches == [(1, 4), (3, 4)]


def test_calibration_fits_the_backend_cost_on_its_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.engine.batcher as batcher_module
    from service.engine.cost import calibrate as real_calibrate

    backend = CostedBackend(fixed=0.004, per_token=2e-6)
    metrics = Metrics()
    batcher = EncodeBatcher(stub_model(backend), settings(calibration_seconds=60.0), metrics)

    def on_fake_clock(*args: Any, **kwargs: Any) -> BatchTimeModel:
        return real_calibrate(*args, clock=backend.clock, **kwargs)

    monkeypatch.setattr(batcher_module, "calibrate", on_fake_clock)

    async def main() -> BatchTimeModel:
        await batcher.start()
        await batcher.warmup()
        await batcher.stop()
        return batcher.time_model

    model = run(main())
    assert model.source == "measured"
    fixed, per_sequence, per_token, per_attention = model.coefficients
    assert fixed == pytest.approx(0.004, rel=1e-6)
    assert per_token == pytest.approx(2e-6, rel=1e-6)
    assert per_sequence == pytest.approx(0.0, abs=1e-9) and per_attention == 0.0
    assert model.max_relative_error == pytest.approx(0.0, abs=1e-6)
    # Shapes within max_context 512 and the default batch limits, several batch sizes timed.
    shapes = {(b, n) for b, n, _ in model.samples}
    assert {b for b, _ in shapes} == {1, 4, 16} and max(n for _, n in shapes) == 512
    assert sample(metrics, "longhaul_batch_time_coefficient", model="stub", term="fixed",
                  source="measured") == pytest.approx(0.004)  # fmt: skip


def test_calibration_falls_back_to_the_architecture_cost_when_timing_fails() -> None:
    # The backend answers the warm-up request but cannot run any calibration shape.
    backend = CostedBackend(fixed=0.0, per_token=0.0, fail_above=8)
    metrics = Metrics()
    batcher = EncodeBatcher(stub_model(backend, "shatter"), settings(), metrics)

    async def main() -> BatchTimeModel:
        await batcher.start()
        await batcher.warmup()
        await batcher.stop()
        return batcher.time_model

    model = run(main())
    assert model.source == "architecture"
    assert "MemoryError" in model.reason
    assert model.coefficients == (0.0, 0.0, 0.0, 1.0)
    assert model.seconds(2, 100) == 2 * quadratic_cost(100, {})  # the architecture's shape
    assert sample(metrics, "longhaul_batch_time_coefficient", model="stub",
                  term="per_attention", source="architecture") == 1.0  # fmt: skip


def test_calibration_disabled_uses_the_architecture_cost() -> None:
    backend = CostedBackend(fixed=0.0, per_token=0.0)
    batcher = EncodeBatcher(stub_model(backend), settings(calibration_seconds=0.0), Metrics())

    async def main() -> BatchTimeModel:
        await batcher.start()
        await batcher.warmup()
        await batcher.stop()
        return batcher.time_model

    model = run(main())
    assert model.source == "architecture" and "disabled" in model.reason
    assert len(backend.batches) == 1  # only the warm-up request ran
