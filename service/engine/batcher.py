"""Encode batching: a per-model queue whose batches close on attention cost, size or age.

One request may carry several sequences (several inputs, or the windows of a chunked input); each
sequence is queued on its own so that length grouping can put it next to sequences of similar
length from other requests, and the request resolves when all of its sequences are done.

Batch formation (``form_batch``), run whenever the worker is free:

* the oldest waiting sequence is always in the batch, so nothing starves;
* the pending sequences are sorted by length and the batch grows outwards from the oldest one,
  taking the neighbour whose length is closer first (small padding);
* it stops growing when the next sequence would push ``size × cost(padded length)`` over
  ``settings.batch_cost_budget`` or the size over ``settings.max_batch_size``;
* a sequence whose own cost exceeds the budget still runs, alone (refusing it would make the
  model unusable at lengths the manifest allows; the budget bounds batching, not admission).

A batch is dispatched as soon as it is full (it stopped growing because of a limit) or the oldest
sequence has waited ``settings.max_wait_ms``. Inference runs in one worker thread per model (ORT
and torch release the GIL), so the event loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.engine.cost import CostFunction, batch_cost, cost_function
from service.engine.encoding import EncodeOutput, EncodeParams, Pooling, combine, pool, prepare
from service.engine.errors import EngineStopped, QueueFull
from service.engine.models import LoadedModel
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

PAD_ID = 0  # contracts.md: <pad> is id 0 in every Longhaul vocabulary
WARMUP_TEXT = "def warm_up(): return 42"


@dataclass
class _Request:
    """Bookkeeping for one caller: how many of its sequences are still waiting for a batch."""

    waiting: int


@dataclass(eq=False)  # identity: two rows with equal ids are still two callers' rows
class Sequence:
    """One row of a future batch."""

    ids: np.ndarray  # (t,) int64, already within max_context
    pooling: Pooling
    future: asyncio.Future[np.ndarray]
    request: _Request
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # perf_counter when its batch was dispatched

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


def form_batch(
    pending: list[Sequence],
    cost: CostFunction,
    config: dict[str, object],
    budget: float,
    max_batch_size: int,
) -> tuple[list[Sequence], bool]:
    """Choose the next batch from ``pending`` (arrival order). Returns (batch, full).

    ``full`` is True when growth stopped because of the budget or the size limit, i.e. waiting
    longer could not make this batch bigger.
    """
    if not pending:
        return [], False
    order = sorted(range(len(pending)), key=lambda i: (pending[i].length, i))
    # pending is in arrival order, so index 0 is the oldest; find it in length order.
    pos = order.index(0)
    lo, hi = pos, pos  # the batch is order[lo : hi + 1]
    longest = pending[0].length
    size = 1
    full = False
    while lo > 0 or hi < len(order) - 1:
        if size >= max_batch_size:
            full = True
            break
        below = pending[order[lo - 1]].length if lo > 0 else None
        above = pending[order[hi + 1]].length if hi < len(order) - 1 else None
        # Prefer the neighbour closer in length to the batch's current range.
        candidates: list[str] = []
        if below is not None and above is not None:
            shortest = pending[order[lo]].length
            candidates = (
                ["below", "above"] if shortest - below <= above - longest else ["above", "below"]
            )
        elif below is not None:
            candidates = ["below"]
        else:
            candidates = ["above"]
        grown = False
        for side in candidates:
            length = below if side == "below" else above
            assert length is not None
            new_longest = max(longest, length)
            if batch_cost(cost, config, size + 1, new_longest) > budget:
                continue
            if side == "below":
                lo -= 1
            else:
                hi += 1
            longest, size, grown = new_longest, size + 1, True
            break
        if not grown:
            full = True
            break
    full = full or size >= max_batch_size
    return [pending[i] for i in order[lo : hi + 1]], full


def run_batch(model: LoadedModel, batch: list[Sequence]) -> tuple[list[np.ndarray], float]:
    """Pad on the right, run the graph, pool each row. Runs in the model's worker thread."""
    width = max(seq.length for seq in batch)
    ids = np.full((len(batch), width), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for row, seq in enumerate(batch):
        ids[row, : seq.length] = seq.ids
        mask[row, : seq.length] = 1
    started = time.perf_counter()
    hidden = model.backend.run({"input_ids": ids, "attention_mask": mask})["hidden"]  # (b, t, d)
    seconds = time.perf_counter() - started
    results = [pool(hidden[row, : seq.length], seq.pooling) for row, seq in enumerate(batch)]
    return results, seconds


class EncodeBatcher:
    """Per-model encode queue + one worker thread. The ``engine`` of a served encode model."""

    def __init__(self, model: LoadedModel, settings: Settings, metrics: Metrics) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self.cost = cost_function(model.manifest.architecture)
        self.config: dict[str, object] = dict(model.manifest.config)
        self._pending: list[Sequence] = []
        self._waiting_requests = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def accepting(self) -> bool:
        """False once stop() was called: new requests get EngineStopped."""
        return not self._closing

    # ----------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{self.name}")
        self._worker = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def warmup(self) -> None:
        """One real request through queue, batch and backend: proves the model answers."""
        await self.encode([WARMUP_TEXT], EncodeParams(), count_tokens=False)

    async def stop(self) -> None:
        """Refuse new work, finish everything already queued, then release the thread."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self.metrics.set_queue_depth(self.name, 0)

    # ----------------------------------------------------------------------------- requests

    async def encode(
        self, inputs: list[str] | list[list[int]], params: EncodeParams, count_tokens: bool = True
    ) -> EncodeOutput:
        """Tokenize, enforce max_context (error / truncate / chunk), batch, pool, combine.

        Raises ``ContextLengthExceeded``, ``InvalidInput``, ``QueueFull`` or ``EngineStopped``.
        """
        if self._closing:
            raise EngineStopped(
                f"model {self.name!r} version {self.model.version} is being unloaded"
            )
        # Tokenizing a long document takes milliseconds: keep it off the event loop too.
        prepared = await asyncio.to_thread(prepare, self.model, inputs, params)
        sequences = [window for item in prepared for window in item.windows]
        vectors, queue_seconds = await self._submit(sequences, params.pooling)
        if count_tokens:
            self.metrics.count_input_tokens(self.name, sum(item.prompt_tokens for item in prepared))
        output = combine(prepared, vectors, params)
        return dataclasses.replace(output, queue_seconds=queue_seconds)

    async def submit(self, rows: list[np.ndarray], pooling: Pooling) -> list[np.ndarray]:
        """Queue token-id rows; resolve to one pooled vector (or per-token matrix) per row."""
        vectors, _ = await self._submit(rows, pooling)
        return vectors

    async def _submit(
        self, rows: list[np.ndarray], pooling: Pooling
    ) -> tuple[list[np.ndarray], float]:
        """``submit`` plus the longest time one of the rows waited for its batch, seconds."""
        if self._closing:
            raise EngineStopped(
                f"model {self.name!r} version {self.model.version} is being unloaded"
            )
        if self._waiting_requests >= self.settings.max_queue_requests:
            self.metrics.reject(self.name, "queue_full")
            raise QueueFull(
                self.name, self.settings.max_queue_requests, self.settings.retry_after_seconds
            )
        loop = asyncio.get_running_loop()
        request = _Request(waiting=len(rows))
        sequences = [Sequence(ids, pooling, loop.create_future(), request) for ids in rows]
        self._pending.extend(sequences)
        self._waiting_requests += 1
        self.metrics.set_queue_depth(self.name, self._waiting_requests)
        self._wakeup.set()
        try:
            vectors = list(await asyncio.gather(*(seq.future for seq in sequences)))
            return vectors, max(seq.started - seq.enqueued for seq in sequences)
        except asyncio.CancelledError:
            # The caller went away: drop its sequences that have not reached a batch yet.
            for seq in sequences:
                seq.future.cancel()
            raise

    # ----------------------------------------------------------------------------- worker

    async def _run(self) -> None:
        while True:
            try:
                if not await self._step():
                    return
            except Exception as exc:
                # A bug here must not leave callers waiting forever: fail what is queued, go on.
                log.exception("%s: batcher step failed", self.name)
                for seq in self._pending:
                    if not seq.future.done():
                        seq.future.set_exception(exc)

    async def _step(self) -> bool:
        """Wait for work, then dispatch at most one batch. False when stopped and drained."""
        self._drop_cancelled()
        if not self._pending:
            if self._closing:
                return False
            self._wakeup.clear()
            await self._wakeup.wait()
            return True
        batch, full = form_batch(
            self._pending, self.cost, self.config,
            self.settings.batch_cost_budget, self.settings.max_batch_size,
        )  # fmt: skip
        deadline = self._pending[0].enqueued + self.settings.max_wait_ms / 1000
        remaining = deadline - time.perf_counter()
        if not full and remaining > 0 and not self._closing:
            # Wait for more arrivals (they may fill the batch) or for the oldest's deadline.
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            return True
        await self._dispatch(batch)
        return True

    def _drop_cancelled(self) -> None:
        kept = []
        for seq in self._pending:
            if seq.future.done():
                self._taken(seq)
            else:
                kept.append(seq)
        self._pending = kept

    def _taken(self, seq: Sequence) -> None:
        seq.request.waiting -= 1
        if seq.request.waiting == 0:
            self._waiting_requests -= 1
            self.metrics.set_queue_depth(self.name, self._waiting_requests)

    async def _dispatch(self, batch: list[Sequence]) -> None:
        chosen = set(batch)
        self._pending = [seq for seq in self._pending if seq not in chosen]
        for seq in batch:
            self._taken(seq)
        now = time.perf_counter()
        for seq in batch:
            seq.started = now
        real = sum(seq.length for seq in batch)
        width = max(seq.length for seq in batch)
        self.metrics.observe_batch(
            self.name, len(batch), width * len(batch), real, [now - seq.enqueued for seq in batch]
        )
        loop = asyncio.get_running_loop()
        try:
            results, seconds = await loop.run_in_executor(
                self._executor, run_batch, self.model, batch
            )
        except Exception as exc:
            log.exception(
                "%s: inference failed on a batch of %d x %d", self.name, len(batch), width
            )
            for seq in batch:
                if not seq.future.done():
                    seq.future.set_exception(exc)
            return
        self.metrics.observe_inference(self.name, width, seconds)
        for seq, result in zip(batch, results, strict=True):
            if not seq.future.done():  # the caller may have disconnected meanwhile
                seq.future.set_result(result)
