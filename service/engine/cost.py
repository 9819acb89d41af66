"""Attention cost per sequence, per architecture (DESIGN.md, "Batching").

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


def batch_cost(
    cost: CostFunction, config: Mapping[str, Any], size: int, padded_length: int
) -> float:
    return size * cost(padded_length, config)
