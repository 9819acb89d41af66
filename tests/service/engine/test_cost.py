"""Cost functions: the asymptotics docs/architecture.md states, per architecture."""

from __future__ import annotations

import pytest

from service.engine.cost import (
    COST_FUNCTIONS,
    MIN_PREFILL_CHUNK,
    attends_whole_past,
    batch_cost,
    cost_function,
    prefill_chunk_limit,
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
