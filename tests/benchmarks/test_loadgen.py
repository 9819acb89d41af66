"""Combining load-generator rounds."""

from __future__ import annotations

from benchmarks.loadgen import LoadResult


def test_rounds_merge_into_one_result_over_their_summed_time() -> None:
    first = LoadResult(4, sent=10, ok=9, errors={"http 429": 1}, latencies_s=[0.1] * 9,
                       tokens=900, elapsed_s=2.0)  # fmt: skip
    second = LoadResult(4, sent=6, ok=6, errors={}, latencies_s=[0.3] * 6, tokens=600,
                        elapsed_s=1.0)  # fmt: skip
    merged = first.merge(second).summary()
    assert (merged["sent"], merged["ok"], merged["errors"]) == (16, 15, {"http 429": 1})
    assert merged["requests_per_s"] == 15 / 3.0 and merged["tokens_per_s"] == 1500 / 3.0
    assert merged["p99_s"] == 0.3 and len(merged["latencies_s"]) == 15
