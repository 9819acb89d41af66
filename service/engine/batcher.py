"""Encode batching: a per-model queue; its worker takes what is queued the moment it is free.

One request may carry several sequences (several inputs, or the windows of a chunked input); each
sequence is queued on its own so that length grouping can put it next to sequences of similar
length from other requests, and the request resolves when all of its sequences are done.

Policy ``throughput`` (the default, ``settings.batch_policy``), run whenever the worker is free:

* nothing waits on a timer: a lone request on an idle model runs at once, as a batch of one;
  requests that arrive while a batch runs form the next one (as TEI and continuous batchers do);
* the batch is the one that maximises predicted *real* (unpadded) tokens per second among the
  batches the queue allows (:func:`choose_batch`): the oldest sequence always goes (nothing
  starves), the rest are its neighbours in length order, within ``max_batch_size`` and
  ``batch_cost_budget`` (a sequence over the budget still runs, alone);
* predictions come from a :class:`~service.engine.cost.BatchTimeModel` fitted at warm-up to
  timings of this model on this hardware (the architecture's cost function alone when nothing
  could be timed); on CPUs it mostly picks small batches of similar length, on GPUs large ones;
  a batch of several rows must beat the oldest alone by more than the fit's own relative error
  on its warm-up samples, so timings too noisy to predict a gain run one row at a time;
* the worker holds a batch back only when the model predicts that waiting for the next arrival
  (expected from the gaps between recent overlapping arrivals) and running both together
  finishes sooner than running now and the newcomer after (:func:`wait_pays`), and never longer
  than ``max_wait_ms`` after the oldest arrived.

Policy ``deadline`` is the earlier rule, kept for comparison: the batch grows by closest length
until ``size × cost(padded length)`` passes the budget (``form_batch``), and a batch that is not
full waits until its oldest sequence has waited ``max_wait_ms``.

Inference runs in one worker thread per model (ORT and torch release the GIL), so the event loop
keeps accepting requests meanwhile.
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

from model_store.tokens import PAD_ID
from service.engine.cost import (
    TERMS,
    BatchTimeModel,
    CostFunction,
    architecture_model,
    batch_cost,
    calibrate,
    calibration_shapes,
    cost_function,
)
from service.engine.encoding import EncodeOutput, EncodeParams, Pooling, combine, pool, prepare
from service.engine.errors import EngineStopped, QueueFull
from service.engine.models import LoadedModel
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

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


def choose_batch(
    pending: list[Sequence],
    model: BatchTimeModel,
    budget: float,
    max_batch_size: int,
    margin: float = 0.0,
) -> list[Sequence]:
    """The batch with the most predicted real tokens per second among all batches that hold
    the oldest sequence (``pending[0]``), have at most ``max_batch_size`` rows and fit
    ``budget`` (the oldest alone always fits). Ties go to the larger batch (fewer passes).

    A batch of more than one row must beat the oldest alone by more than ``margin`` (the
    relative error of the model's own fit): a gain smaller than the model's error is not a
    prediction, and on a CPU where batching buys little, noisy warm-up timings would otherwise
    make padding look worth it.

    Exact, not greedy: for a given row count b and longest row (padded width), the most real
    tokens come from the oldest plus the b-1 longest others that are not longer, which is a
    window of the length-sorted queue (plus the oldest when it sits below the window). So every
    (width, b) pair has one best batch, and all pairs are scored at once from prefix sums.
    """
    if not pending:
        return []
    order = sorted(range(len(pending)), key=lambda i: (pending[i].length, i))
    lengths = np.asarray([pending[i].length for i in order], dtype=np.float64)
    prefix = np.concatenate([[0.0], np.cumsum(lengths)])
    pos = order.index(0)  # the oldest, in length order
    his = np.arange(pos, len(order))[:, None]  # the longest row of the batch (its width)
    sizes = np.arange(1, max_batch_size + 1)[None, :]
    # Rows: the window of b ending at hi when it reaches down to the oldest, else the b-1
    # longest below hi plus the oldest.
    contains = his - sizes + 1 <= pos
    window = prefix[his + 1] - prefix[np.maximum(his - sizes + 1, 0)]
    beside = prefix[his + 1] - prefix[np.maximum(his - sizes + 2, 0)] + lengths[pos]
    real = np.where(contains, window, beside)
    widths = lengths[his]
    attention = np.asarray(
        [model.cost(int(n), model.config) for n in widths[:, 0]], dtype=np.float64
    )[:, None]
    fixed, per_sequence, per_token, per_attention = model.coefficients
    seconds = fixed + per_sequence * sizes + per_token * sizes * widths
    seconds = seconds + per_attention * sizes * attention
    allowed = (sizes <= his + 1) & ((sizes == 1) | (sizes * attention <= budget))
    score = np.where(allowed, real / np.maximum(seconds, 1e-30), -np.inf)
    best = score.max()
    if best < score[0, 0] * (1 + margin):  # row 0, size 1: the oldest alone
        return [pending[0]]
    near = np.argwhere(score >= best * (1 - 1e-9))
    # Largest b first, then the narrowest width.
    row, col = min(near.tolist(), key=lambda rc: (-rc[1], rc[0]))
    hi, size = pos + row, col + 1
    if hi - size + 1 <= pos:
        chosen = list(range(hi - size + 1, hi + 1))
    else:
        chosen = [pos, *range(hi - size + 2, hi + 1)]
    return [pending[order[i]] for i in chosen]


def wait_pays(
    model: BatchTimeModel,
    batch: list[Sequence],
    expected_gap: float,
    expected_length: int,
    margin: float = 0.0,
) -> bool:
    """Is waiting ``expected_gap`` seconds for one more sequence of ``expected_length`` tokens,
    then running it with ``batch``, predicted to finish both sooner than running ``batch`` now
    and the newcomer after it, by more than ``margin`` (the fit's relative error)? Only a
    per-pass cost larger than the gap makes it so."""
    size, width = len(batch), max(seq.length for seq in batch)
    now_then_alone = model.seconds(size, width) + model.seconds(1, expected_length)
    wait_then_together = expected_gap + model.seconds(size + 1, max(width, expected_length))
    return wait_then_together * (1 + margin) < now_then_alone


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
        # Until warm-up calibrates it, batches are scored by the architecture's cost alone.
        self.time_model: BatchTimeModel = architecture_model(
            self.cost, self.config, "not calibrated (no warm-up has run)"
        )
        self._busy = False  # a batch is running in the worker thread
        # Arrivals that found work outstanding: their mean gap predicts the next one (None when
        # the last arrival found the model idle, as every arrival at one client does).
        self._last_arrival: float | None = None
        self._gap: float | None = None
        self._mean_length = 0.0
        self._arrivals = 0
        self._hold: tuple[Sequence, int] | None = None  # (oldest, arrivals) when last held back

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
        """One real request through queue, batch and backend (proves the model answers), then
        the batch time model is calibrated on this hardware."""
        await self.encode([WARMUP_TEXT], EncodeParams(), count_tokens=False)
        if self.settings.batch_policy == "throughput":
            await self.calibrate()

    async def calibrate(self) -> BatchTimeModel:
        """Time the backend at a few (batch, padded length) shapes within
        ``settings.calibration_seconds`` and fit :attr:`time_model`; reported in metrics and
        logged. Runs in the worker thread, before the model takes traffic."""
        settings = self.settings
        if settings.calibration_seconds <= 0:
            model = architecture_model(
                self.cost, self.config, "calibration disabled (calibration_seconds = 0)"
            )
        else:
            shapes = calibration_shapes(
                self.model.manifest.max_context, settings.max_batch_size, self.cost,
                self.config, settings.batch_cost_budget,
            )  # fmt: skip
            loop = asyncio.get_running_loop()
            model = await loop.run_in_executor(
                self._executor, calibrate, self._time_shape, shapes,
                settings.calibration_seconds, self.cost, self.config,
            )  # fmt: skip
        self.time_model = model
        self.metrics.set_batch_time_model(
            self.name, model.source, dict(zip(TERMS, model.coefficients, strict=True)),
            model.seconds_spent,
        )  # fmt: skip
        log.info(
            "%s/%d: batch time model %s (%s): %s; max relative error %s; %.2f s",
            self.name, self.model.version, model.source, model.reason,
            ", ".join(f"{t} {c:.3g}" for t, c in zip(TERMS, model.coefficients, strict=True)),
            model.max_relative_error, model.seconds_spent,
        )  # fmt: skip
        return model

    def _time_shape(self, size: int, length: int) -> None:
        """One forward pass of ``size`` real-token rows of ``length`` (calibration)."""
        sample = self.model.tokenizer.encode(WARMUP_TEXT).ids or [PAD_ID]
        row = np.resize(np.asarray(sample, dtype=np.int64), length)
        ids = np.tile(row, (size, 1))
        self.model.backend.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})

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
        self._note_arrival(rows)
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

    def _note_arrival(self, rows: list[np.ndarray]) -> None:
        now = time.perf_counter()
        if self._busy or self._pending:
            if self._last_arrival is not None:
                gap = now - self._last_arrival
                self._gap = gap if self._gap is None else 0.8 * self._gap + 0.2 * gap
        else:
            self._gap = None  # it found the model idle: nothing to predict the next from
        self._last_arrival = now
        self._arrivals += 1
        length = sum(int(r.shape[0]) for r in rows) / max(1, len(rows))
        self._mean_length = (
            length if not self._mean_length else (0.8 * self._mean_length + 0.2 * length)
        )

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
        if self.settings.batch_policy == "throughput":
            return await self._step_throughput()
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

    async def _step_throughput(self) -> bool:
        settings = self.settings
        margin = self.time_model.max_relative_error or 0.0
        batch = choose_batch(
            self._pending,
            self.time_model,
            settings.batch_cost_budget,
            settings.max_batch_size,
            margin,
        )
        oldest = self._pending[0]
        remaining = oldest.enqueued + settings.max_wait_ms / 1000 - time.perf_counter()
        gap = self._gap
        held_already = self._hold is not None and self._hold == (oldest, self._arrivals)
        if (
            gap is not None
            and not self._closing
            and not held_already
            and len(batch) < settings.max_batch_size
            and gap <= remaining
            and wait_pays(self.time_model, batch, gap, max(1, round(self._mean_length)), margin)
        ):
            self._hold = (oldest, self._arrivals)
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=gap)
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
        self._busy = True
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
        finally:
            self._busy = False
        self.metrics.observe_inference(self.name, width, seconds)
        for seq, result in zip(batch, results, strict=True):
            if not seq.future.done():  # the caller may have disconnected meanwhile
                seq.future.set_result(result)
