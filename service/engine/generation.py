"""Generation: iteration-level (continuous) batching for decoder models.

One worker thread per model drives *steps*; the event loop only tokenizes, enqueues and relays
results. At every step:

1. cancelled sequences (client gone) leave and free their cache;
2. waiting sequences are admitted in arrival order while there is a free slot
   (``settings.max_num_seqs``) and the KV budget holds their worst case (:class:`KVBudget`);
   the head of the queue is never overtaken, so a large request cannot starve;
3. ``kv_cache`` graphs (ALiBi, causal native Reformer): the running batch decodes one token per
   sequence in one forward pass over the preallocated decode buffer (kv_cache.py), whose new
   entries are written in place; then admitted prompts are prefilled: at most
   ``settings.prefill_chunk_tokens`` prompt tokens per step, each prompt in chunks on top of its
   own exact-length cache (each chunk's new entries appended: a prompt has few chunks). For
   ALiBi, whose chunks attend to the whole cached past, a step's chunks also attend at most
   ``settings.prefill_chunk_pairs`` query-key pairs (cost.prefill_chunk_limit): late chunks of
   a 16K prompt shrink instead of costing 32x the first one. A long
   prompt is thus spread over several steps and the running streams keep getting a token every
   step instead of stalling for the whole prefill. A prompt whose prefill completes samples its
   first token and joins the decode batch for the next step;
4. ``full_sequence`` graphs (causal Reformers with ``hf_compatible`` or "local" layers, whose
   outputs a cache could not reproduce): there is no cache to carry between steps, so every
   step recomputes every running sequence in full — prompt and generated tokens, left-padded to
   the longest row. Generating n tokens after a prompt of p therefore costs
   Σ_{i<n} cost(p + i) ≈ n · cost(p + n) (O(n · (p + n) log(p + n)) for LSH attention) instead of
   the kv graph's O(p² + n · (p + n)), and every row pays for the longest one in the batch;
   chunked prefill does not apply (there is nothing to chunk into) and the KV budget does not
   either (``max_num_seqs`` is the only bound). Native causal Reformers, whose causal LSH rule
   depends only on earlier tokens, export a ``kv_cache`` graph instead (their cache holds each
   layer's shared-QK vectors and values; docs/decisions.md, "Reformer incremental decoding").

Results cross to asyncio with ``loop.call_soon_threadsafe`` into one ``asyncio.Queue`` per
request (:class:`GenerationStream`), after every forward pass, so streamed decode tokens are not
held back while the same step goes on to prefill.

Determinism: a sequence's tokens depend only on its own prompt, parameters and generator
(sampling.py). Padding slots are invisible to the model (kv_cache.py), and each row of a batched
forward pass computes the same numbers as the row alone up to floating-point reassociation
(well below anything that changes a sampled token in practice; the tests check it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from service.engine.cost import attends_whole_past, prefill_chunk_limit
from service.engine.errors import (
    ContextLengthExceeded,
    EngineStopped,
    InvalidInput,
    QueueFull,
)
from service.engine.generation_text import TextTracker
from service.engine.kv_cache import CacheShape, DecodeBatch, KVBudget, prefill_inputs
from service.engine.models import LoadedModel
from service.engine.sampling import SamplingParams, sample
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

# docs/contracts.md: every Longhaul vocabulary starts <pad>=0, <eos>=1. A manifest config that
# names other ids (``eos_token_id``/``pad_token_id``, e.g. an imported BLOOM) takes precedence.
# Documents in the training data are separated by <eos>, so it also serves as the "start of
# document" an empty prompt conditions on.
PAD_ID = 0
EOS_ID = 1

FinishReason = Literal["length", "stop"]


@dataclass(frozen=True)
class GenerationChunk:
    """What one step produced for one request. The last chunk has ``finish_reason`` set."""

    text: str  # newly released text; may be empty (held back: incomplete character, stop prefix)
    token_ids: tuple[int, ...]  # the token(s) generated this step
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int  # generated so far, this chunk included


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerationStats:
    """A snapshot of the scheduler for tests, benchmarks and gauges."""

    running: int  # admitted: prefilling or decoding
    waiting: int
    kv_cache_bytes: int  # cache arrays held right now (the decode buffer + partial prefills)
    decode_batch: int  # rows of the decode batch


class GenerationError(RuntimeError):
    """The backend failed during a forward pass; the request cannot complete (-> 500)."""


class GenerationStream:
    """One request's results: ``async for chunk in stream`` or ``await stream.collect()``.

    Cancel it (client disconnected) and the engine drops the sequence at the next step boundary.
    """

    def __init__(self, seq_id: int, prompt_tokens: int, cancel: Callable[[int], None]) -> None:
        self.id = seq_id
        self.prompt_tokens = prompt_tokens
        self.loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[GenerationChunk | BaseException | None] = asyncio.Queue()
        self._cancel = cancel
        self.finished = False  # the final chunk (or an error) was consumed
        self.cancelled = False
        #: Arrival to admission, seconds; set by the worker when the sequence is admitted.
        self.queue_seconds: float | None = None

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> GenerationChunk:
        if self.finished or self.cancelled:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None or self.cancelled:  # None: put there by cancel()
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finish_reason is not None:
            self.finished = True
        return item

    async def collect(self) -> GenerationResult:
        """Wait for the whole generation."""
        pieces: list[str] = []
        tokens: list[int] = []
        async for chunk in self:
            pieces.append(chunk.text)
            tokens.extend(chunk.token_ids)
            if chunk.finish_reason is not None:
                return GenerationResult(
                    "".join(pieces), tokens, chunk.finish_reason, chunk.prompt_tokens,
                    chunk.completion_tokens,
                )  # fmt: skip
        raise GenerationError("the generation ended without a final chunk")

    def cancel(self) -> None:
        """Idempotent; a no-op once the final chunk was consumed. Ends a pending iteration."""
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self._queue.put_nowait(None)  # wakes a consumer blocked in __anext__
            self._cancel(self.id)

    def _put(self, item: GenerationChunk | BaseException) -> None:
        self._queue.put_nowait(item)


@dataclass(eq=False)
class _Sequence:
    """Worker-side state of one request."""

    id: int
    prompt: list[int]
    params: SamplingParams
    stream: GenerationStream
    text: TextTracker
    rng: np.random.Generator
    arrival: float  # perf_counter at submit
    record_metrics: bool = True  # warm-up requests stay out of the metrics
    admitted: float = 0.0
    prefilled: int = 0  # prompt tokens already in ``cache``
    cache: np.ndarray | None = None  # own exact-length cache while prefilling (L, 2, 1, h, n, e)
    generated: list[int] = field(default_factory=list)
    last_token_at: float = 0.0

    @property
    def reserved_tokens(self) -> int:
        """The most tokens this sequence can ever hold in the cache."""
        return len(self.prompt) + self.params.max_new_tokens


_Item = tuple[GenerationStream, GenerationChunk | BaseException]


class _Outbox:
    """Results of one forward pass, handed to the event loop(s) in one call each."""

    def __init__(self) -> None:
        self.items: list[_Item] = []

    def put(self, stream: GenerationStream, item: GenerationChunk | BaseException) -> None:
        self.items.append((stream, item))

    def flush(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Item]] = {}
        for stream, item in self.items:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        self.items = []
        for loop, items in by_loop.items():
            # A closed loop raises RuntimeError: nobody is waiting for these results any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[_Item]) -> None:
    for stream, item in items:
        stream._put(item)


class GenerationEngine:
    """Continuous-batching generation for one loaded decoder model (see the module docstring)."""

    def __init__(self, model: LoadedModel, settings: Settings, metrics: Metrics) -> None:
        manifest = model.manifest
        if manifest.task != "generate":
            raise ValueError(f"{model.name}: task {manifest.task!r} is not 'generate'")
        mode = manifest.signature.generation_mode
        if mode is None:
            raise ValueError(f"{model.name}: the manifest names no generation_mode")
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self.mode = mode
        # ALiBi chunks attend to the whole cached past, so their cost is bounded in pairs too.
        self.bound_prefill_pairs = attends_whole_past(manifest.architecture)
        self.max_context = manifest.max_context
        self.vocab_size = int(manifest.config.get("vocab_size", model.tokenizer.get_vocab_size()))
        config = manifest.config
        pad = config.get("pad_token_id")
        self.pad_id = PAD_ID if pad is None else int(pad)
        # A config without the field is a native Longhaul model (eos = 1); an explicit null is
        # an imported model with no end token: it generates until max_new_tokens.
        eos = config.get("eos_token_id", EOS_ID)
        self.eos_id: int | None = None if eos is None else int(eos)
        # What an empty prompt (and the warm-up) starts from: the end token, else padding.
        self.start_id = self.pad_id if self.eos_id is None else self.eos_id
        cache = manifest.signature.cache
        self.shape = CacheShape.from_layout(cache) if cache is not None else None
        # The per-layer past input names, in graph order, as the manifest records them.
        self.past_names = list(cache.inputs) if cache is not None else []
        self.cache_output = cache.output if cache is not None else ""
        self.budget = (
            KVBudget(self.shape, settings.kv_cache_bytes) if self.shape is not None else None
        )
        self.batch = DecodeBatch(self.shape) if self.shape is not None else None

        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Shared with the event loop (under _lock): waiting queue, cancellations, lifecycle.
        self._waiting: deque[_Sequence] = deque()
        self._cancelled: set[int] = set()
        self._accepting = False
        self._stopping = False
        self._stop_deadline = float("inf")
        self._stats = GenerationStats(0, 0, 0, 0)
        # Worker-only state.
        self._prefilling: list[_Sequence] = []
        self._running: dict[int, _Sequence] = {}  # decoding; kv mode: same set as batch.ids
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.model.name

    # ------------------------------------------------------------------ lifecycle (event loop)

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name=f"generate-{self.name}", daemon=True)
        self._thread.start()

    async def warmup(self) -> None:
        """Two greedy tokens from a one-token prompt: runs prefill and (kv mode) a decode step."""
        params = SamplingParams(max_new_tokens=2, temperature=0)
        stream = await self._enqueue(
            [self.start_id], params, time.perf_counter(), record_metrics=False
        )
        await stream.collect()

    async def stop(self) -> None:
        """Refuse new requests; let admitted and waiting ones finish for up to
        ``settings.drain_timeout_seconds``; fail what is left with :class:`EngineStopped`."""
        with self._lock:
            self._accepting = False
            self._stopping = True
            self._stop_deadline = time.monotonic() + self.settings.drain_timeout_seconds
            self._wake.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def stats(self) -> GenerationStats:
        with self._lock:
            return self._stats

    # ------------------------------------------------------------------ requests (event loop)

    async def submit(self, prompt: str | list[int], params: SamplingParams) -> GenerationStream:
        """Tokenize, check limits and queue. Raises before anything is queued:

        ``ContextLengthExceeded`` (prompt + max_new_tokens > max_context), ``InvalidInput``
        (token id outside the vocabulary; a request larger than the whole KV budget),
        ``QueueFull`` (``settings.max_waiting_sequences`` already waiting), ``EngineStopped``.
        """
        arrival = time.perf_counter()  # time to first token counts tokenization too
        if isinstance(prompt, str):
            # Off the loop: a prompt near max_context takes milliseconds to tokenize.
            ids = (await asyncio.to_thread(self.model.tokenizer.encode, prompt)).ids
        else:
            bad = [i for i in prompt if not 0 <= i < self.vocab_size]
            if bad:
                raise InvalidInput(
                    f"token ids must be in [0, {self.vocab_size}); got {bad[:5]}", param="prompt"
                )
            ids = list(prompt)
        return await self._enqueue(ids, params, arrival, record_metrics=True)

    async def _enqueue(
        self, prompt_ids: list[int], params: SamplingParams, arrival: float, record_metrics: bool
    ) -> GenerationStream:
        ids = prompt_ids or [self.start_id]
        total = len(ids) + params.max_new_tokens
        if total > self.max_context:
            raise ContextLengthExceeded(
                total, self.max_context, param="prompt",
                hint=f" ({len(ids)} prompt tokens + {params.max_new_tokens} new tokens requested)",
            )  # fmt: skip
        if self.budget is not None and not self.budget.fits_alone(total):
            raise InvalidInput(
                f"{len(ids)} prompt tokens + {params.max_new_tokens} new tokens need "
                f"{self.budget.footprint([total])} bytes of KV cache, more than the model's "
                f"budget of {self.budget.capacity_bytes} (LONGHAUL_KV_CACHE_BYTES)",
                param="max_new_tokens",
            )
        seq_id = next(self._ids)
        stream = GenerationStream(seq_id, len(ids), self._cancel)
        seq = _Sequence(
            seq_id, ids, params, stream, TextTracker(self.model.tokenizer, params.stop),
            params.generator(), arrival, record_metrics,
        )  # fmt: skip
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
        return stream

    def _cancel(self, seq_id: int) -> None:
        with self._lock:
            for seq in self._waiting:
                if seq.id == seq_id:
                    self._waiting.remove(seq)  # never admitted: nothing to free
                    self._publish_waiting_locked()
                    return
            self._cancelled.add(seq_id)
            self._wake.notify()

    # ------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (
                        self._stopping or self._waiting or self._cancelled or self._active()
                    ):
                        self._wake.wait()
                    idle = not (self._waiting or self._active())
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

    def _active(self) -> int:
        return len(self._prefilling) + len(self._running)

    def _step(self) -> None:
        self._drop_cancelled()
        admitted = self._admit()
        queue_seconds = [s.admitted - s.arrival for s in admitted if s.record_metrics]
        if admitted:
            self._publish()  # admissions show in the gauges before a possibly long prefill
        if self.mode == "kv_cache":
            if self._running:
                self._decode_step()
            if self._prefilling:
                self._prefill_step(queue_seconds)
        elif self._running:
            self._full_sequence_step(queue_seconds)
        self._publish()

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        self._prefilling = [s for s in self._prefilling if s.id not in cancelled]
        for seq_id in cancelled:
            self._running.pop(seq_id, None)
        if self.batch is not None:
            self.batch.remove(cancelled)
        self._publish()

    def _admit(self) -> list[_Sequence]:
        """Move waiting sequences into the running set, in arrival order."""
        admitted: list[_Sequence] = []
        with self._lock:
            while self._waiting and self._active() + len(admitted) < self.settings.max_num_seqs:
                head = self._waiting[0]
                if self.budget is not None:
                    held = [s.reserved_tokens for s in (*self._prefilling, *self._running.values())]
                    lengths = [*held, *(s.reserved_tokens for s in admitted), head.reserved_tokens]
                    if not self.budget.fits(lengths):
                        break  # head-of-line waits for memory; later ones do not overtake it
                admitted.append(self._waiting.popleft())
        now = time.perf_counter()
        for seq in admitted:
            seq.admitted = now
            seq.stream.queue_seconds = now - seq.arrival
            if seq.record_metrics:
                self.metrics.count_input_tokens(self.name, len(seq.prompt))
            if self.mode == "kv_cache":
                self._prefilling.append(seq)
            else:
                self._running[seq.id] = seq
        return admitted

    # --- kv_cache mode

    def _decode_step(self) -> None:
        assert self.batch is not None
        rows = [self._running[seq_id] for seq_id in self.batch.ids]
        inputs = self.batch.inputs([seq.generated[-1] for seq in rows], self.past_names)
        lengths = self.batch.real_lengths()
        span = self.batch.capacity + 1  # keys each row's new token attends over, free slots too
        outbox = _Outbox()
        try:
            outputs = self._forward(inputs, span)
            self.batch.advance(outputs[self.cache_output])
        except Exception as exc:
            self._fail(rows, exc, outbox)
            self._send(outbox)
            return
        b = len(rows)
        self.metrics.observe_batch(self.name, b, b * span, sum(lengths) + b, [])
        logits = outputs["logits"][:, -1]  # (b, v)
        finished = {
            seq.id for row, seq in enumerate(rows) if self._accept(seq, logits[row], outbox)
        }
        if finished:
            self.batch.remove(finished)
            for seq_id in finished:
                del self._running[seq_id]
        self._send(outbox)  # before any prefill work this step: streams get their token now

    def _prefill_step(self, queue_seconds: list[float]) -> None:
        assert self.shape is not None and self.batch is not None
        budget = self.settings.prefill_chunk_tokens
        pairs = self.settings.prefill_chunk_pairs
        for seq in list(self._prefilling):
            if budget <= 0 or pairs <= 0:
                break
            n = min(len(seq.prompt) - seq.prefilled, budget)
            if self.bound_prefill_pairs:
                n = min(n, prefill_chunk_limit(seq.prefilled, pairs))
                pairs -= n * (seq.prefilled + n)
            budget -= n
            past = seq.cache if seq.cache is not None else self.shape.empty(1)
            total = past.shape[4] + n
            chunk = seq.prompt[seq.prefilled : seq.prefilled + n]
            inputs = prefill_inputs(chunk, past, self.past_names)
            outbox = _Outbox()
            try:
                outputs = self._forward(inputs, total)
            except Exception as exc:
                self._prefilling.remove(seq)
                self._fail([seq], exc, outbox)
                self._send(outbox)
                continue
            first_chunk = seq.prefilled == 0
            self.metrics.observe_batch(self.name, 1, n, n, queue_seconds if first_chunk else [])
            if first_chunk:
                queue_seconds = []
            # The graph returns this chunk's entries only; a prompt has few chunks, so appending
            # them to the sequence's own exact-length cache copies little.
            seq.cache = np.concatenate([past, outputs[self.cache_output]], axis=4)
            seq.prefilled += n
            if seq.prefilled < len(seq.prompt):
                continue
            self._prefilling.remove(seq)
            finished = self._accept(seq, outputs["logits"][0, -1], outbox)
            if not finished:
                self.batch.add(seq.id, seq.cache, seq.reserved_tokens)
                self._running[seq.id] = seq
            seq.cache = None
            self._send(outbox)

    # --- full_sequence mode

    def _full_sequence_step(self, queue_seconds: list[float]) -> None:
        """One token for every running sequence, recomputing each in full.

        Rows are batched only with rows of the same length, so no row is ever padded: the
        full-sequence graphs served here (HF-compatible Reformers) chunk and hash padding along
        with real tokens, which moved logits by ~1e-3 and changed sampled tokens. Unpadded,
        every row computes exactly what it would alone.
        """
        groups: dict[int, list[_Sequence]] = {}
        for seq in self._running.values():
            groups.setdefault(len(seq.prompt) + len(seq.generated), []).append(seq)
        outbox = _Outbox()
        for width, rows in groups.items():
            ids = np.array([seq.prompt + seq.generated for seq in rows], dtype=np.int64)
            mask = np.ones_like(ids)
            try:
                outputs = self._forward({"input_ids": ids, "attention_mask": mask}, width)
            except Exception as exc:
                self._fail(rows, exc, outbox)
                continue
            self.metrics.observe_batch(self.name, len(rows), ids.size, ids.size, queue_seconds)
            queue_seconds = []  # each request's queue time is reported once
            logits = outputs["logits"][:, -1]
            for r, seq in enumerate(rows):
                if self._accept(seq, logits[r], outbox):
                    del self._running[seq.id]
        self._send(outbox)

    # --- shared

    def _forward(self, inputs: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        outputs = self.model.backend.run(inputs)
        self.metrics.observe_inference(self.name, length, time.perf_counter() - started)
        return outputs

    def _accept(self, seq: _Sequence, logits: np.ndarray, outbox: _Outbox) -> bool:
        """Sample the next token of ``seq`` from its logits (v,); True if the sequence ended."""
        token = sample(logits, seq.params, seq.rng)
        now = time.perf_counter()
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
        outbox.put(seq.stream, chunk)
        return reason is not None

    def _fail(self, rows: list[_Sequence], exc: Exception, outbox: _Outbox) -> None:
        """A forward pass failed: these sequences end with an error and free their caches."""
        log.error("%s: forward pass failed for %d sequence(s)", self.name, len(rows), exc_info=exc)
        ids = {seq.id for seq in rows}
        for seq in rows:
            seq.cache = None
            self._running.pop(seq.id, None)
            outbox.put(seq.stream, GenerationError(f"model {self.name!r}: inference failed"))
        if self.batch is not None:
            self.batch.remove(ids)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            pending = [*self._waiting, *self._prefilling, *self._running.values()]
            self._waiting.clear()
            self._cancelled.clear()
        self._prefilling, self._running = [], {}
        if self.batch is not None:
            self.batch.remove(set(self.batch.ids))
        outbox = _Outbox()
        for seq in pending:
            outbox.put(seq.stream, error)
        self._send(outbox)

    def _send(self, outbox: _Outbox) -> None:
        """Update the gauges first, so a caller that has its final chunk sees the cache freed."""
        self._publish()
        outbox.flush()

    def _publish(self) -> None:
        """Worker: recompute the snapshot and the gauges from the worker-owned state."""
        kv = sum(s.cache.nbytes for s in self._prefilling if s.cache is not None)
        if self.batch is not None:
            kv += self.batch.nbytes
            decode = len(self.batch)
        else:
            decode = len(self._running)
        with self._lock:
            self._stats = GenerationStats(self._active(), len(self._waiting), kv, decode)
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
