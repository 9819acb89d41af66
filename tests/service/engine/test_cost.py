"""Cost functions: the asymptotics DESIGN.md states, per architecture."""

from __future__ import annotations

import pytest

from service.engine.cost import COST_FUNCTIONS, batch_cost, cost_function


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
