"""Request deadlines: ``LONGHAUL_REQUEST_TIMEOUT_SECONDS`` for every encode and generate request,
``X-Request-Timeout: <seconds>`` to ask for less.

The deadline counts from the request's arrival (RequestContextMiddleware notes it). The routes
enforce it with asyncio timeouts around what they await and cancel through the engines' own
cancellation path, wherever the request is:

* encode: the awaiting task is cancelled, which cancels its rows' futures; rows not yet in a
  batch leave the queue at the batcher's next step, a batch already running finishes and its
  rows are dropped;
* generation: ``GenerateEngine.cancel`` (through the stream); a waiting sequence leaves the
  queue at once, an admitted one (prefilling or decoding) is dropped, and its slot and KV cache
  freed, at the scheduler's next step boundary.

The answer is 504 ``deadline_exceeded`` in the error shape; a stream starts with its first event
(generate.py, ``_event_stream``), so only one past it ends with that error as its last event
(no ``[DONE]``). ``longhaul_deadline_exceeded_total{model,
stage}`` counts them by where the request was: ``queued``, ``prefill``, ``decode`` (generation)
or ``encode``.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from pydantic import WithJsonSchema

from service.api.deps import AppSettings
from service.api.errors import ApiError
from service.metrics import Metrics


@dataclass(frozen=True)
class Deadline:
    seconds: float  # the budget from arrival; inf = none
    arrived: float  # time.monotonic() at arrival

    def when(self) -> float | None:
        """The deadline on the running loop's clock, for ``asyncio.timeout_at`` (None: none)."""
        if math.isinf(self.seconds):
            return None
        loop = asyncio.get_running_loop()
        return loop.time() + self.seconds - (time.monotonic() - self.arrived)

    def timeout(self) -> asyncio.Timeout:
        """``async with deadline.timeout():`` raises TimeoutError once the deadline passed."""
        return asyncio.timeout_at(self.when())

    def exceeded(self, metrics: Metrics, model: str, stage: str) -> ApiError:
        """Count it and build the 504 (the caller cancels the work)."""
        metrics.count_deadline_exceeded(model, stage)
        return ApiError(
            504, f"deadline of {self.seconds:g} s exceeded while {stage}; the request was "
            "cancelled", code="deadline_exceeded",
        )  # fmt: skip


_HEADER_DOC = (
    "this request's deadline in seconds from arrival; at most LONGHAUL_REQUEST_TIMEOUT_SECONDS "
    "when that is set (a longer value is capped at it)"
)


def request_deadline(
    request: Request,
    settings: AppSettings,
    x_request_timeout: Annotated[
        float | None,
        Header(gt=0, allow_inf_nan=False, description=_HEADER_DOC),
        # A header is absent or a number, never null: publish just the number.
        WithJsonSchema({"type": "number", "exclusiveMinimum": 0, "description": _HEADER_DOC}),
    ] = None,
) -> Deadline:
    server = settings.request_timeout_seconds or math.inf
    seconds = server if x_request_timeout is None else min(server, x_request_timeout)
    arrived = getattr(request.state, "arrived", None)
    return Deadline(seconds, arrived if isinstance(arrived, float) else time.monotonic())


RequestDeadline = Annotated[Deadline, Depends(request_deadline)]
