"""The generation scheduler: one worker thread per model drives steps of its stepper.

At every step, in this order:

1. cancelled sequences (client gone) leave and the stepper frees their state;
2. waiting sequences are admitted in arrival order while there is a free slot
   (``settings.max_num_seqs``) and the stepper says their worst case fits
   (:meth:`Stepper.fits`: the KV budget in ``kv_cache`` mode); the head of the queue is never
   overtaken, so a large request cannot starve;
3. the stepper runs its forward passes (generation_steppers.py) and hands each pass's logits to
   :meth:`Scheduler.accept`, which samples, applies the stop rules, updates the metrics and
   queues a chunk per request; the chunks reach the event loop after every pass.

The event loop only enqueues (:meth:`Scheduler.enqueue`) and cancels (:meth:`Scheduler.cancel`),
under one lock; everything else is worker-only state.

Determinism: a sequence's tokens depend only on its own prompt, parameters and generator
(sampling.py). Padding slots are invisible to the model (kv_cache.py), and each row of a batched
forward pass computes the same numbers as the row alone up to floating-point reassociation
(well below anything that changes a sampled token in practice; the tests check it).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence as Seq

import numpy as np

from service.engine.errors import EngineStopped, QueueFull
from service.engine.generation_steppers import Sequence, Stepper
from service.engine.generation_stream import Outbox
from service.engine.generation_types import (
    FinishReason,
    GenerationChunk,
    GenerationError,
    GenerationStats,
)
from service.engine.sampling import sample
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


class Scheduler:
    """Admission, budgets, cancellation and token acceptance around one :class:`Stepper`."""

    def __init__(
        self,
        name: str,
        stepper: Stepper,
        settings: Settings,
        metrics: Metrics,
        eos_id: int | None,
    ) -> None:
        self.name = name
        self.stepper = stepper
        self.settings = settings
        self.metrics = metrics
        self.eos_id = eos_id  # None: the model has no end token (generates to max_new_tokens)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Shared with the event loop (under _lock): waiting queue, cancellations, lifecycle.
        self._waiting: deque[Sequence] = deque()
        self._cancelled: set[int] = set()
        self._accepting = False
        self._stopping = False
        self._stop_deadline = float("inf")
        self._stats = GenerationStats(0, 0, 0, 0)
        # Worker-only state.
        self._active: dict[int, Sequence] = {}  # admitted and not finished, in admission order
        self._outbox = Outbox()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ event loop side

    def start(self) -> None:
        if self._thread is not None:
            return
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name=f"generate-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Blocking (call it off the loop): refuse new requests, let admitted and waiting ones
        finish for up to ``settings.drain_timeout_seconds``, fail the rest with EngineStopped."""
        with self._lock:
            self._accepting = False
            self._stopping = True
            self._stop_deadline = time.monotonic() + self.settings.drain_timeout_seconds
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def stats(self) -> GenerationStats:
        with self._lock:
            return self._stats

    def enqueue(self, seq: Sequence) -> None:
        """Raises ``EngineStopped`` (not running) or ``QueueFull``."""
        with self._lock:
            if not self._accepting:
                raise EngineStopped(f"model {self.name!r} is not running (unloaded or stopping)")
            if len(self._waiting) >= self.settings.max_waiting_sequences:
                self.metrics.reject(self.name, "queue_full")
                raise QueueFull(
                    self.name,
                    self.settings.max_waiting_sequences,
                    self.settings.retry_after_seconds,
                )
            self._waiting.append(seq)
            self._publish_waiting_locked()
            self._wake.notify()

    def cancel(self, seq_id: int) -> None:
        """A waiting sequence leaves the queue now; an admitted one at the next step boundary.
        Either way its stream ends without a final chunk. Unknown or finished ids are ignored.
        Any thread."""
        with self._lock:
            for seq in self._waiting:
                if seq.id == seq_id:
                    self._waiting.remove(seq)  # never admitted: nothing to free
                    self._publish_waiting_locked()
                    break
            else:
                self._cancelled.add(seq_id)
                self._wake.notify()
                return
        ended = Outbox()  # its consumer's iteration ends (a no-op after GenerationStream.cancel)
        ended.put(seq.stream, None)
        ended.flush()

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._stopping or self._waiting or self._cancelled or self._active):
                        self._wake.wait()
                    idle = not (self._waiting or self._active)
                    if self._stopping and (idle or time.monotonic() > self._stop_deadline):
                        break
                self._step()
        except BaseException:  # a bug in the scheduler itself: fail every request, loudly
            log.exception("%s: generation worker crashed", self.name)
            with self._lock:
                self._accepting = False
            self._fail_all(GenerationError(f"model {self.name!r}: generation worker crashed"))
            raise
        self._fail_all(EngineStopped(f"model {self.name!r} was unloaded before this request ended"))

    def _step(self) -> None:
        self._drop_cancelled()
        if self._admit():
            self._publish()  # admissions show in the gauges before a possibly long prefill
        if self._active:
            self.stepper.step(self)
        self._publish()

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        cancelled &= self._active.keys()  # finished meanwhile: nothing left to free
        if not cancelled:
            return
        self.stepper.release(cancelled)
        for seq_id in cancelled:
            self._outbox.put(self._active.pop(seq_id).stream, None)
        self.flush()

    def _admit(self) -> list[Sequence]:
        """Move waiting sequences to the stepper, in arrival order."""
        admitted: list[Sequence] = []
        held = [seq.reserved_tokens for seq in self._active.values()]
        with self._lock:
            while self._waiting and len(self._active) + len(admitted) < self.settings.max_num_seqs:
                head = self._waiting[0]
                if not self.stepper.fits([*held, head.reserved_tokens]):
                    break  # head-of-line waits for memory; later ones do not overtake it
                held.append(head.reserved_tokens)
                admitted.append(self._waiting.popleft())
        now = time.perf_counter()
        for seq in admitted:
            seq.admitted = now
            seq.stream.queue_seconds = now - seq.arrival
            if seq.record_metrics:
                self.metrics.count_input_tokens(self.name, len(seq.prompt))
                self.metrics.observe_queue(self.name, now - seq.arrival)
            self._active[seq.id] = seq
            self.stepper.admit(seq)
        return admitted

    # --- StepSink: what the stepper calls after each forward pass

    def accept(self, rows: Seq[Sequence], logits: np.ndarray) -> set[int]:
        """Sample the next token of every row from ``logits`` (b, v); the ids that ended."""
        tokens = self._sample(rows, logits)
        now = time.perf_counter()
        finished: set[int] = set()
        for seq, token in zip(rows, tokens, strict=True):
            if self._push(seq, token, now):
                finished.add(seq.id)
                del self._active[seq.id]
        return finished

    def fail(self, rows: Seq[Sequence], exc: Exception) -> None:
        """A forward pass failed: these sequences end with an error."""
        log.error("%s: forward pass failed for %d sequence(s)", self.name, len(rows), exc_info=exc)
        for seq in rows:
            self._active.pop(seq.id, None)
            self._outbox.put(seq.stream, GenerationError(f"model {self.name!r}: inference failed"))

    def flush(self) -> None:
        """Update the gauges first, so a caller that has its final chunk sees the cache freed."""
        self._publish()
        self._outbox.flush()

    # --- tokens

    @staticmethod
    def _sample(rows: Seq[Sequence], logits: np.ndarray) -> list[int]:
        """One token per row; greedy rows in one argmax over the batch (same result per row)."""
        greedy = [r for r, seq in enumerate(rows) if seq.params.greedy]
        tokens = [0] * len(rows)
        if greedy:
            picked = np.argmax(logits[greedy], axis=-1)
            for r, token in zip(greedy, picked, strict=True):
                tokens[r] = int(token)
        for r, seq in enumerate(rows):
            if not seq.params.greedy:
                tokens[r] = sample(logits[r], seq.params, seq.rng)
        return tokens

    def _push(self, seq: Sequence, token: int, now: float) -> bool:
        """Record ``token`` for ``seq`` and queue its chunk; True if the sequence ended."""
        if seq.record_metrics:
            if seq.generated:
                self.metrics.observe_inter_token(self.name, now - seq.last_token_at)
            else:
                self.metrics.observe_first_token(self.name, now - seq.arrival)
            self.metrics.count_generated_tokens(self.name, 1)
        seq.last_token_at = now
        seq.generated.append(token)
        reason: FinishReason | None = None
        if token == self.eos_id:
            text, reason = seq.text.finish(), "stop"
        else:
            text = seq.text.push(token)
            if seq.text.stopped:
                reason = "stop"
            elif len(seq.generated) >= seq.params.max_new_tokens:
                text, reason = text + seq.text.finish(), "length"
        chunk = GenerationChunk(text, (token,), reason, len(seq.prompt), len(seq.generated))
        self._outbox.put(seq.stream, chunk)
        return reason is not None

    # --- lifecycle and gauges

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            pending = [*self._waiting, *self._active.values()]
            self._waiting.clear()
            self._cancelled.clear()
        self.stepper.release(list(self._active))
        self._active = {}
        for seq in pending:
            self._outbox.put(seq.stream, error)
        self.flush()

    def _publish(self) -> None:
        """Worker: recompute the snapshot and the gauges from the worker-owned state."""
        kv, decoding = self.stepper.cache_bytes, self.stepper.decoding
        prefix = self.stepper.prefix_cache_bytes
        with self._lock:
            self._stats = GenerationStats(
                len(self._active), len(self._waiting), kv, decoding, prefix
            )
            self._report_locked()

    def _publish_waiting_locked(self) -> None:
        """Event loop: only the waiting count changed (the rest belongs to the worker)."""
        self._stats = dataclasses.replace(self._stats, waiting=len(self._waiting))
        self._report_locked()

    def _report_locked(self) -> None:
        stats = self._stats
        self.metrics.set_generation_state(
            self.name, stats.running, stats.waiting, stats.kv_cache_bytes
        )
