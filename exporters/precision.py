"""The exporter's default precision: the fastest path that stays accurate (docs/benchmarks.md §2).

``--precision auto`` (the default of ``python -m exporters export`` and of ``make models``) picks,
per format, what section 2 of the benchmarks measured as fastest within the parity floor on CPU:

* ONNX: int8 dynamic quantization (2.47× eager fp32 on average there, min logits cosine above
  ``exporters.parity.MIN_COSINE`` on every architecture). A model whose int8 graph misses the
  floor is exported in fp32 instead, and nothing of the failed attempt is published.
* TorchScript: fp32. Its bf16 path is only faster on CPUs with native bf16 instructions, and
  the CPU default path is ONNX int8 anyway; TorchScript stays the portable full-precision format.

The manifest records the outcome and why (``Manifest.precision_reason``); an explicit
``--precision`` is recorded as requested.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exporters.export import ExportRequest, ExportResult

AUTO = "auto"
REQUESTED = "requested explicitly"

#: The first choice per format under ``auto``, and why.
DEFAULTS: dict[str, tuple[str, str]] = {
    "onnx": (
        "int8",
        "default: ONNX int8 is the fastest CPU path within the parity floor "
        "(docs/benchmarks.md §2)",
    ),
    "torchscript": (
        "fp32",
        "default: TorchScript stays fp32 (its bf16 pays only on CPUs with native bf16; "
        "the fast CPU path is ONNX int8, docs/benchmarks.md §2)",
    ),
}


def default_precision(fmt: str) -> tuple[str, str]:
    """(precision, reason) that ``auto`` tries first for ``fmt``."""
    if fmt not in DEFAULTS:
        raise ValueError(f"unknown format {fmt!r}; expected {' or '.join(DEFAULTS)}")
    return DEFAULTS[fmt]


def export_auto(request: ExportRequest) -> ExportResult:
    """Export with the default precision; fall back to fp32 when it misses the parity floor.

    The checkpoint and the extrapolation sweep are prepared once for both attempts."""
    import time

    from exporters.export import export, prepare
    from exporters.parity import ParityError

    started = time.perf_counter()
    precision, reason = default_precision(request.format)
    prepared = prepare(request)
    first = dataclasses.replace(request, precision=precision, precision_reason=reason)
    try:
        result = export(first, prepared)
    except ParityError as exc:
        if precision == "fp32":
            raise
        fallback = f"default {precision} missed the parity floor ({exc.report.summary()}), so fp32"
        retry = dataclasses.replace(request, precision="fp32", precision_reason=fallback)
        result = export(retry, prepared)
    # The sweep and the failed attempt are part of what the user waited for.
    return dataclasses.replace(result, seconds=time.perf_counter() - started)
