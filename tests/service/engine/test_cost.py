"""Cost functions (the asymptotics docs/architecture.md states, per architecture) and the batch
time model fitted to timings at warm-up."""

from __future__ import annotations

import pytest

from service.engine.cost import (
    COST_FUNCTIONS,
    MIN_PREFILL_CHUNK,
    attends_whole_past,
    batch_cost,
    calibrate,
    calibration_shapes,
    cost_function,
    features,
    fit_batch_time,
    prefill_chunk_limit,
    quadratic_cost,
)


def test_growth_rates_match_the_attention_complexity() -> None:
    config = {"k": 64}
    lin, ref, quad = (COST_FUNCTIONS[a] for a in ("linformer", "reformer", "alibi"))
    # Doubling n: linear x2, n log n a bit more than x2, quadratic x4.
    assert lin(2048, config) / lin(1024, config) == pytest.approx(2.0)
    assert 2.0 < ref(2048, config) / ref(1024, config) < 2.3
    assert quad(2048, config) / quad(1024, config) == pytest.approx(4.0)
    assert COST_FUNCTIONS["shatter"] is quad
    assert lin(1000, {"k": 32}) == 32_000  # the projected length k comes from the manifest


def test_batch_cost_is_size_times_padded_cost() -> None:
    quad = cost_function("shatter")
    assert batch_cost(quad, {}, 4, 100) == 4 * 100 * 100


def test_unknown_architecture_is_costed_conservatively() -> None:
    assert cost_function("mystery")(100, {}) == 100 * 100


@pytest.mark.parametrize("past", [0, 1, 100, 512, 4096, 16384, 100_000])
@pytest.mark.parametrize("pairs", [256, 512 * 1024, 3_000_000])
def test_prefill_chunk_limit_is_the_longest_chunk_within_the_pair_budget(
    past: int, pairs: int
) -> None:
    n = prefill_chunk_limit(past, pairs)
    if n > MIN_PREFILL_CHUNK:
        assert n * (past + n) <= pairs < (n + 1) * (past + n + 1)
    else:  # never below the floor, so a long prompt always advances
        assert n == MIN_PREFILL_CHUNK and (n + 1) * (past + n + 1) > pairs


def test_prefill_chunks_shrink_as_the_past_grows() -> None:
    budget = 512 * 1024
    assert prefill_chunk_limit(0, budget) == 724  # more than the 512-token default: no effect
    assert prefill_chunk_limit(512, budget) == 512
    assert prefill_chunk_limit(16384, budget) == 31
    assert attends_whole_past("alibi")
    assert not attends_whole_past("reformer")  # LSH: a chunk's cost does not grow with the past


def test_prefill_chunk_limit_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        prefill_chunk_limit(-1, 100)


# ------------------------------------------------------------------------------ batch time model


def test_fit_recovers_a_known_cost_with_the_architecture_shape() -> None:
    quad = cost_function("shatter")
    truth = (0.003, 2e-4, 1e-6, 5e-9)  # fixed, per sequence, per token, per attention pair

    def seconds(b: int, n: int) -> float:
        return sum(c * f for c, f in zip(truth, features(quad, {}, b, n), strict=True))

    samples = [(b, n, seconds(b, n)) for b in (1, 4, 16) for n in (16, 256, 1024)]
    model = fit_batch_time(quad, {}, samples)
    assert model.source == "measured"
    for got, want in zip(model.coefficients, truth, strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    assert model.seconds(8, 512) == pytest.approx(seconds(8, 512), rel=1e-6)


def test_fit_never_returns_a_negative_cost() -> None:
    lin = cost_function("linformer")
    # Noisy timings whose unconstrained fit would give a negative fixed cost.
    samples = [(1, 16, 1.0e-4), (1, 64, 6.5e-4), (4, 64, 2.4e-3), (16, 256, 4.2e-2)]
    model = fit_batch_time(lin, {"k": 16}, samples)
    assert model.source == "measured"
    assert min(model.coefficients) >= 0
    assert model.coefficients[3] == 0.0  # Linformer's n*k is the per-token term already
    assert model.max_relative_error is not None and model.max_relative_error < 0.5


def test_one_shape_is_not_enough_to_fit() -> None:
    model = fit_batch_time(quadratic_cost, {}, [(1, 16, 0.01), (1, 16, 0.011)])
    assert model.source == "architecture" and "at least 2" in model.reason
    assert model.seconds(3, 10) == 3 * 100


def test_calibration_stops_at_its_time_budget() -> None:
    clock = [0.0]
    timed: list[tuple[int, int]] = []

    def run(b: int, n: int) -> None:
        timed.append((b, n))
        clock[0] += 1e-3 * b * n  # 1 ms per token

    shapes = calibration_shapes(1024, 32, quadratic_cost, {}, budget=1e12)
    assert shapes[0] == (1, 16) and shapes[-1] == (16, 1024)  # cheapest first
    model = calibrate(run, shapes, 1.0, quadratic_cost, {}, clock=lambda: clock[0])
    assert clock[0] <= 1.0 + 1e-9  # a shape predicted to overrun the budget is not started
    assert {(b, n) for b, n, _ in model.samples} == {(1, 16), (1, 64), (4, 16)}
    assert model.source == "measured"


def test_calibration_shapes_stay_within_the_limits() -> None:
    shapes = calibration_shapes(128, 4, quadratic_cost, {}, budget=4 * 64 * 64)
    assert max(n for _, n in shapes) == 128 and max(b for b, _ in shapes) == 4
    assert all(b == 1 or b * n * n <= 4 * 64 * 64 for b, n in shapes)
    assert (1, 128) in shapes  # one sequence always runs, whatever the budget
