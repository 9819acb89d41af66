"""Attention cost per sequence, per architecture (docs/architecture.md, "Batching"), and the
batch time model fitted to timings at warm-up.

Cost units are "attention score computations per layer per head", up to a constant: only ratios
matter. ``batch_size × cost(padded length)`` is compared with ``settings.batch_cost_budget``
(a bound on what one batch may hold). Each function takes the padded length and the manifest's
config.

:class:`BatchTimeModel` predicts a batch's seconds from (rows, padded length) with the cost
function as the shape of its attention term; :func:`calibrate` times a few shapes on the
hardware and :func:`fit_batch_time` fits it. The batcher uses it to choose the batch with the
most real tokens per second (service/engine/batcher.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

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


# ----------------------------------------------------------------------------- batch time model

#: Names of the fitted terms, in the order of ``BatchTimeModel.coefficients``.
TERMS = ("fixed", "per_sequence", "per_token", "per_attention")


def is_linear(cost: CostFunction, config: Mapping[str, Any]) -> bool:
    """True when ``cost`` grows linearly in n (Linformer's n·k): then its term is the per-token
    term again, and fitting both would make the fit ambiguous."""
    return math.isclose(cost(2048, config), 2 * cost(1024, config), rel_tol=1e-9)


def features(
    cost: CostFunction, config: Mapping[str, Any], size: int, length: int
) -> tuple[float, float, float, float]:
    """The terms of a batch of ``size`` sequences padded to ``length``, matching TERMS."""
    return (1.0, float(size), float(size * length), size * cost(length, config))


@dataclass(frozen=True)
class BatchTimeModel:
    """Predicted seconds of one forward pass over ``size`` sequences padded to ``length``:

        t = fixed + per_sequence·b + per_token·b·n + per_attention·b·cost(n)

    where cost is the architecture's attention cost function (the shape of the fit). ``source``
    is "measured" when the coefficients were fitted to timings on this hardware, "architecture"
    when nothing could be measured: then t = b·cost(n) in cost units, which orders batches by
    their attention work alone (only ratios of predictions are used, so units do not matter).
    """

    cost: CostFunction
    config: Mapping[str, Any]
    coefficients: tuple[float, float, float, float]
    source: str  # "measured" | "architecture"
    reason: str  # why this source, in words
    samples: tuple[tuple[int, int, float], ...] = ()  # (batch, padded length, seconds)
    max_relative_error: float | None = None  # of the fit over its samples
    seconds_spent: float = 0.0

    def seconds(self, size: int, length: int) -> float:
        terms = features(self.cost, self.config, size, length)
        return sum(c * f for c, f in zip(self.coefficients, terms, strict=True))

    def describe(self) -> dict[str, Any]:
        """What /v1/models and the start-up log report."""
        return {
            "source": self.source,
            "reason": self.reason,
            "coefficients": dict(zip(TERMS, self.coefficients, strict=True)),
            "samples": [{"batch": b, "length": n, "seconds": s} for b, n, s in self.samples],
            "max_relative_error": self.max_relative_error,
            "seconds_spent": round(self.seconds_spent, 3),
        }


def architecture_model(
    cost: CostFunction, config: Mapping[str, Any], reason: str
) -> BatchTimeModel:
    """The fallback when no timing is possible: the architecture's cost function alone."""
    return BatchTimeModel(cost, config, (0.0, 0.0, 0.0, 1.0), "architecture", reason)


def _least_squares(rows: list[list[float]], target: list[float]) -> list[float] | None:
    """min ||A x - y||; None when A is rank-deficient (the terms cannot be told apart)."""
    a = np.asarray(rows, dtype=np.float64)
    solution, _, rank, _ = np.linalg.lstsq(a, np.asarray(target, dtype=np.float64), rcond=None)
    if rank < a.shape[1]:
        return None
    return [float(v) for v in solution]


def fit_batch_time(
    cost: CostFunction,
    config: Mapping[str, Any],
    samples: list[tuple[int, int, float]],
    seconds_spent: float = 0.0,
) -> BatchTimeModel:
    """Non-negative least squares of TERMS on measured (batch, length, seconds), in relative
    error (a 2 ms shape counts as much as a 2 s one). Every subset of the terms is solved and
    the best one whose coefficients are all >= 0 is kept: a negative cost per token would make
    padding look free. Falls back to :func:`architecture_model` with fewer than two shapes.
    """
    shapes = {(b, n) for b, n, _ in samples}
    if len(shapes) < 2:
        return architecture_model(
            cost, config, f"{len(shapes)} shape(s) measured, a fit needs at least 2"
        )
    usable = [0, 1, 2] if is_linear(cost, config) else [0, 1, 2, 3]
    best: tuple[float, list[float]] | None = None
    for mask in range(1, 1 << len(usable)):
        terms = [t for i, t in enumerate(usable) if mask >> i & 1]
        if len(terms) > len(shapes):
            continue
        rows = [[features(cost, config, b, n)[t] / s for t in terms] for b, n, s in samples]
        solution = _least_squares(rows, [1.0] * len(samples))
        if solution is None or min(solution) < 0:
            continue
        residual = sum((sum(c * v for c, v in zip(solution, row, strict=True)) - 1.0) ** 2
                       for row in rows)  # fmt: skip
        if best is None or residual < best[0] - 1e-12:
            coefficients = [0.0] * len(TERMS)
            for t, c in zip(terms, solution, strict=True):
                coefficients[t] = c
            best = (residual, coefficients)
    if best is None:
        return architecture_model(cost, config, "no non-negative fit of the measured timings")
    model = BatchTimeModel(
        cost, config, tuple(best[1]), "measured",  # type: ignore[arg-type]
        f"fitted to {len(samples)} timings at {len(shapes)} shapes",
        samples=tuple(samples), seconds_spent=seconds_spent,
    )  # fmt: skip
    error = max(abs(model.seconds(b, n) / s - 1.0) for b, n, s in samples)
    return dataclasses.replace(model, max_relative_error=round(error, 4))


def calibration_shapes(
    max_context: int,
    max_batch_size: int,
    cost: CostFunction,
    config: Mapping[str, Any],
    budget: float,
    lengths: tuple[int, ...] = (16, 64, 256, 1024),
    sizes: tuple[int, ...] = (1, 4, 16),
) -> list[tuple[int, int]]:
    """(batch, padded length) shapes to time at warm-up, cheapest (fewest tokens) first, within
    max_context, max_batch_size and the batch cost budget: only shapes the batcher may form."""
    shapes = {(min(b, max_batch_size), min(n, max_context)) for b in sizes for n in lengths}
    allowed = [(b, n) for b, n in shapes if b == 1 or b * cost(n, config) <= budget]
    return sorted(allowed, key=lambda s: (s[0] * s[1], s[1]))


def calibrate(
    run: Callable[[int, int], object],
    shapes: list[tuple[int, int]],
    time_budget_s: float,
    cost: CostFunction,
    config: Mapping[str, Any],
    clock: Callable[[], float] | None = None,
    repeats: int = 2,
) -> BatchTimeModel:
    """Time ``run(batch, length)`` at ``shapes`` (cheapest first) within ``time_budget_s`` and
    fit a :class:`BatchTimeModel`; the architecture model when nothing could be measured.

    Each shape runs once untimed (first use of a shape allocates) and ``repeats`` times timed;
    the minimum is kept (background load only ever adds time). A shape is skipped when its
    predicted time, from the slowest seconds-per-token seen so far, would overrun the budget.
    """
    import time

    now = clock or time.perf_counter
    started = now()
    samples: list[tuple[int, int, float]] = []
    per_token = 0.0
    for size, length in shapes:
        left = time_budget_s - (now() - started)
        if left <= 0:
            break
        if per_token and per_token * size * length * (repeats + 1) > left:
            continue
        try:
            run(size, length)
            timings = []
            for _ in range(repeats):
                t0 = now()
                run(size, length)
                timings.append(now() - t0)
        except Exception as exc:  # a backend that cannot run a shape cannot be timed
            return architecture_model(
                cost, config, f"timing {size} x {length} failed: {type(exc).__name__}: {exc}"
            )
        seconds = min(timings)
        if seconds <= 0:
            return architecture_model(cost, config, "the clock measured no time")
        samples.append((size, length, seconds))
        per_token = max(per_token, max(timings) / (size * length))
    spent = now() - started
    model = fit_batch_time(cost, config, samples, spent)
    if model.source == "architecture":
        reason = f"{model.reason} within the {time_budget_s:g} s calibration budget"
        return dataclasses.replace(model, reason=reason, seconds_spent=spent)
    return model
