"""Attention cost per sequence, per architecture (docs/architecture.md, "Batching").

Units are "attention score computations per layer per head", up to a constant: only ratios
matter, because the batcher compares ``batch_size × cost(padded length)`` with
``settings.batch_cost_budget``. Each function takes the padded length and the manifest's config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

CostFunction = Callable[[int, Mapping[str, Any]], float]


def linformer_cost(n: int, config: Mapping[str, Any]) -> float:
    """O(n·k): every query attends to k projected keys."""
    return float(n * int(config.get("k", 256)))


def reformer_cost(n: int, config: Mapping[str, Any]) -> float:
    """O(n log n): sorting by LSH bucket dominates; attention is chunk-local."""
    return float(n * max(1.0, math.log2(max(n, 2))))


def quadratic_cost(n: int, config: Mapping[str, Any]) -> float:
    """O(n²): one full score matrix (ALiBi per head, Shatter's single head)."""
    return float(n * n)


COST_FUNCTIONS: dict[str, CostFunction] = {
    "linformer": linformer_cost,
    "reformer": reformer_cost,
    "alibi": quadratic_cost,
    "shatter": quadratic_cost,
}


def cost_function(architecture: str) -> CostFunction:
    # Unknown architectures are costed as quadratic: over-estimating only makes batches smaller.
    return COST_FUNCTIONS.get(architecture, quadratic_cost)


#: A prefill chunk never shrinks below this many tokens, so a long prompt always advances.
MIN_PREFILL_CHUNK = 16


def prefill_chunk_limit(past: int, pair_budget: int) -> int:
    """The longest chunk n whose attention n · (past + n) query-key pairs fits ``pair_budget``
    (at least MIN_PREFILL_CHUNK).

    For a decoder that attends to its whole past, a chunk's cost grows with the past: a
    512-token chunk on top of 16K cached tokens attends 32x the pairs of the first one, and the
    running streams wait for it. Bounding pairs instead of tokens keeps every prefill step, and
    so their inter-token latency, about as long as the first.
    """
    if past < 0 or pair_budget < 1:
        raise ValueError(f"need past >= 0 and pair_budget >= 1, got {past}, {pair_budget}")
    # Positive root of n² + past·n − budget = 0, then step down past any float rounding.
    n = int((-past + math.sqrt(past * past + 4 * pair_budget)) / 2)
    while n > 0 and n * (past + n) > pair_budget:
        n -= 1
    return max(n, MIN_PREFILL_CHUNK)


def attends_whole_past(architecture: str) -> bool:
    """True where a prefill chunk's cost grows with the cached past (full causal attention)."""
    return cost_function(architecture) is quadratic_cost


def batch_cost(
    cost: CostFunction, config: Mapping[str, Any], size: int, padded_length: int
) -> float:
    return size * cost(padded_length, config)
