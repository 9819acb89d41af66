"""Steppers: how one generation mode turns admitted sequences into next-token logits.

The scheduler (generation_scheduler.py) owns the queue, admission, cancellation and what a
token means for its request (sampling, stop rules, streaming, metrics); a stepper owns the
model-specific state between steps and runs the forward passes. One stepper per
``generation_mode`` of the manifest:

* :class:`KVCacheStepper` (``kv_cache`` graphs: ALiBi, causal native Reformer). Each step first
  decodes one token for every decoding sequence in one forward pass over the preallocated decode
  buffer (kv_cache.py), whose new entries are written in place, then prefills admitted prompts:
  at most ``settings.prefill_chunk_tokens`` prompt tokens per step, each prompt in chunks on top
  of its own exact-length cache. For decoders that attend to the whole cached past (ALiBi), a
  step's chunks also attend at most ``settings.prefill_chunk_pairs`` query-key pairs
  (cost.prefill_chunk_limit): late chunks of a 16K prompt shrink instead of costing 32x the
  first one. A long prompt is thus spread over several steps and the decoding streams keep
  getting a token every step instead of stalling for the whole prefill. A prompt whose prefill
  completes samples its first token and joins the decode batch for the next step. With the
  prefix cache on (prefix_cache.py), every chunk first takes what the cache holds of the
  prompt's next tokens (other prompts' completed blocks, up to all but the last token) and
  offers the whole blocks it completes, so a shared document is prefilled once, even by
  prompts admitted together.
* :class:`FullSequenceStepper` (``full_sequence`` graphs: causal Reformers with
  ``hf_compatible`` or "local" layers, whose outputs a cache could not reproduce). Nothing is
  carried between steps, so every step recomputes every sequence in full, prompt and generated
  tokens. Generating n tokens after a prompt of p costs Σ_{i<n} cost(p + i) ≈ n · cost(p + n)
  instead of the kv graph's O(p² + n · (p + n)); chunked prefill and the KV budget do not apply
  (``max_num_seqs`` is the only bound).

Every forward pass ends in the :class:`StepSink`: ``accept`` with the logits of the next token
of each row (one call per pass, so per-row work can be done for the whole batch at once), or
``fail`` for the rows of a pass that raised; then ``flush`` delivers what the pass produced, so
streamed decode tokens are not held back while the same step goes on to prefill.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from model_store.manifest import CacheLayout, GenerationMode
from service.engine.cost import attends_whole_past, prefill_chunk_limit
from service.engine.generation_stream import GenerationStream
from service.engine.generation_text import TextTracker
from service.engine.kv_cache import CacheShape, DecodeBatch, KVBudget, prefill_inputs
from service.engine.models import LoadedModel
from service.engine.prefix_cache import Chain, PrefixCache
from service.engine.sampling import SamplingParams
from service.metrics import Metrics
from service.settings import Settings


@dataclass(eq=False)
class Sequence:
    """Worker-side state of one request, whatever the mode."""

    id: int
    prompt: list[int]
    params: SamplingParams
    stream: GenerationStream
    text: TextTracker
    rng: np.random.Generator
    arrival: float  # perf_counter at submit
    record_metrics: bool = True  # warm-up requests stay out of the metrics
    admitted: float = 0.0
    generated: list[int] = field(default_factory=list)
    last_token_at: float = 0.0

    @property
    def reserved_tokens(self) -> int:
        """The most tokens this sequence can ever hold: prompt + max_new_tokens."""
        return len(self.prompt) + self.params.max_new_tokens


class StepSink(Protocol):
    """Where a stepper hands the results of each forward pass (the scheduler)."""

    def accept(self, rows: Seq[Sequence], logits: np.ndarray) -> set[int]:
        """``logits`` (b, v): the next-token logits of each row, in row order. Samples one token
        per row; returns the ids of the rows whose generation ended (the stepper drops them)."""
        ...

    def fail(self, rows: Seq[Sequence], exc: Exception) -> None:
        """A forward pass over ``rows`` raised; the stepper has already dropped them."""
        ...

    def flush(self) -> None:
        """Deliver what the forward passes so far produced."""
        ...


class Stepper(Protocol):
    """One generation mode's state and forward passes (see the module docstring)."""

    def refusal(self, prompt_tokens: int, new_tokens: int) -> str | None:
        """Why a request of this size could never run, however long it waited; None if it can."""
        ...

    def fits(self, reservations: Seq[int]) -> bool:
        """Would sequences reserving these many tokens each all fit at once?"""
        ...

    def admit(self, seq: Sequence) -> None:
        """Take an admitted sequence; its first token comes from a later :meth:`step`."""
        ...

    def step(self, sink: StepSink) -> None:
        """One iteration: at most one new token for each sequence (none while it prefills)."""
        ...

    def release(self, seq_ids: Collection[int]) -> None:
        """Forget these sequences (cancelled, or the engine is stopping) and free their state."""
        ...

    @property
    def cache_bytes(self) -> int:
        """Bytes of cache arrays held right now."""
        ...

    @property
    def decoding(self) -> int:
        """Sequences past their prefill (the rows of the next decode step)."""
        ...

    @property
    def prefix_cache_bytes(self) -> int:
        """Bytes the prefix cache holds (0 where there is none)."""
        ...


def timed_forward(
    model: LoadedModel, metrics: Metrics, inputs: dict[str, np.ndarray], length: int
) -> dict[str, np.ndarray]:
    """One backend call, observed in ``inference_duration_seconds`` under ``length``'s bucket.
    ``model.backend`` is read per call, so a backend swapped in (tests) is used at once."""
    started = time.perf_counter()
    outputs = model.backend.run(inputs)
    metrics.observe_inference(model.name, length, time.perf_counter() - started)
    return outputs


# ----------------------------------------------------------------------------- kv_cache


@dataclass(eq=False)
class _Prefill:
    """A sequence whose prompt is partly in its own cache. ``cache`` may start non-empty: a
    prefill resumes from whatever prefix of the prompt is already cached."""

    seq: Sequence
    cache: np.ndarray  # (L, 2, 1, h, n, e): the prompt's first n tokens
    looked_up: bool = False  # the prefix cache was asked at least once

    @property
    def done(self) -> int:
        return int(self.cache.shape[4])

    @property
    def remaining(self) -> int:
        return len(self.seq.prompt) - self.done


class KVCacheStepper:
    """Decode with a KV cache; prefill in chunks bounded in tokens (and, for full causal
    attention, in query-key pairs) per step."""

    def __init__(
        self, model: LoadedModel, settings: Settings, metrics: Metrics, layout: CacheLayout
    ) -> None:
        self.model = model
        self.metrics = metrics
        self.shape = CacheShape.from_layout(layout)
        self.past_names = list(layout.inputs)  # per-layer past inputs, in graph order
        self.cache_output = layout.output
        self.budget = KVBudget(self.shape, settings.kv_cache_bytes)
        self.chunk_tokens = settings.prefill_chunk_tokens
        self.chunk_pairs = settings.prefill_chunk_pairs
        # ALiBi chunks attend to the whole cached past, so their cost is bounded in pairs too.
        self.bound_pairs = attends_whole_past(model.manifest.architecture)
        self.batch = DecodeBatch(self.shape)
        self._decoding: dict[int, Sequence] = {}  # the rows of ``batch``, by id
        self._prefills: list[_Prefill] = []  # admission order
        self.prefix = prefix_cache_for(self.shape, settings)
        self._chains: dict[int, Chain] = {}  # prefix-cache blocks each running sequence holds
        self._evictions_reported = 0

    def refusal(self, prompt_tokens: int, new_tokens: int) -> str | None:
        total = prompt_tokens + new_tokens
        if self.budget.fits_alone(total):
            return None
        return (
            f"{prompt_tokens} prompt tokens + {new_tokens} new tokens need "
            f"{self.budget.footprint([total])} bytes of KV cache, more than the model's "
            f"budget of {self.budget.capacity_bytes} (LONGHAUL_KV_CACHE_BYTES)"
        )

    def fits(self, reservations: Seq[int]) -> bool:
        return self.budget.fits(reservations)

    def admit(self, seq: Sequence) -> None:
        self._prefills.append(_Prefill(seq, self.shape.empty(1)))

    def step(self, sink: StepSink) -> None:
        if self._decoding:
            self._decode(sink)
        if self._prefills:
            self._prefill(sink)

    def release(self, seq_ids: Collection[int]) -> None:
        ids = set(seq_ids)
        self._prefills = [p for p in self._prefills if p.seq.id not in ids]
        for seq_id in ids:
            self._decoding.pop(seq_id, None)
            self._release_chain(seq_id)
        self.batch.remove(ids)

    @property
    def cache_bytes(self) -> int:
        return self.batch.nbytes + sum(p.cache.nbytes for p in self._prefills)

    @property
    def decoding(self) -> int:
        return len(self._decoding)

    @property
    def prefix_cache_bytes(self) -> int:
        return 0 if self.prefix is None else self.prefix.nbytes

    def _decode(self, sink: StepSink) -> None:
        rows = [self._decoding[seq_id] for seq_id in self.batch.ids]
        inputs = self.batch.inputs([seq.generated[-1] for seq in rows], self.past_names)
        real = int(self.batch.lengths.sum())
        span = self.batch.capacity + 1  # keys each row's new token attends over, free slots too
        try:
            outputs = timed_forward(self.model, self.metrics, inputs, span)
            self.batch.advance(outputs[self.cache_output])
        except Exception as exc:
            self.release([seq.id for seq in rows])
            sink.fail(rows, exc)
            sink.flush()
            return
        b = len(rows)
        self.metrics.observe_batch(self.model.name, b, b * span, real + b, [])
        finished = sink.accept(rows, outputs["logits"][:, -1])
        if finished:
            self.release(finished)
        sink.flush()  # before any prefill work this step: streams get their token now

    def _prefill(self, sink: StepSink) -> None:
        tokens, pairs = self.chunk_tokens, self.chunk_pairs
        for prefill in list(self._prefills):
            if tokens <= 0 or pairs <= 0:
                break
            if self.prefix is not None:
                self._reuse(prefill)
            n = min(prefill.remaining, tokens)
            if self.bound_pairs:
                n = min(n, prefill_chunk_limit(prefill.done, pairs))
                pairs -= n * (prefill.done + n)
            tokens -= n
            seq, start = prefill.seq, prefill.done
            inputs = prefill_inputs(seq.prompt[start : start + n], prefill.cache, self.past_names)
            try:
                outputs = timed_forward(self.model, self.metrics, inputs, start + n)
            except Exception as exc:
                self._prefills.remove(prefill)
                self._release_chain(seq.id)
                sink.fail([seq], exc)
                sink.flush()
                continue
            self.metrics.observe_batch(self.model.name, 1, n, n, [])
            # The graph returns this chunk's entries only; a prompt has few chunks, so appending
            # them to the sequence's own exact-length cache copies little.
            prefill.cache = np.concatenate([prefill.cache, outputs[self.cache_output]], axis=4)
            if self.prefix is not None:
                self._store(prefill)
            if prefill.remaining:
                continue
            self._prefills.remove(prefill)
            if sink.accept([seq], outputs["logits"][:, -1]):
                self._release_chain(seq.id)
            else:
                held = sum(p.cache.nbytes for p in self._prefills)  # beside the decode rows
                self.batch.max_bytes = max(0, self.budget.capacity_bytes - held)
                self.batch.add(seq.id, prefill.cache, seq.reserved_tokens)
                self._decoding[seq.id] = seq
            sink.flush()

    # --- prefix cache (prefix_cache.py)

    def _reuse(self, prefill: _Prefill) -> None:
        """Skip the prompt tokens after ``prefill.done`` whose entries the prefix cache holds
        (another sequence may have computed them since the last chunk). At most all but the
        last prompt token: its logits give the first generated token."""
        assert self.prefix is not None
        seq = prefill.seq
        chain = self._chains.setdefault(seq.id, Chain())
        found = self.prefix.extend(chain, seq.prompt, prefill.done, len(seq.prompt) - 1)
        hit = int(found.shape[4])
        if hit:
            prefill.cache = np.concatenate([prefill.cache, found], axis=4)
        looked_up = 0 if prefill.looked_up else len(seq.prompt)
        if seq.record_metrics and (looked_up or hit):
            self.metrics.observe_prefix_lookup(self.model.name, looked_up, hit)
        prefill.looked_up = True

    def _store(self, prefill: _Prefill) -> None:
        """Offer the whole blocks a chunk completed to the prefix cache."""
        assert self.prefix is not None
        self.prefix.insert(self._chains[prefill.seq.id], prefill.seq.prompt, prefill.cache)
        self._report_prefix()

    def _release_chain(self, seq_id: int) -> None:
        chain = self._chains.pop(seq_id, None)
        if chain is not None and self.prefix is not None:
            self.prefix.release(chain)

    def _report_prefix(self) -> None:
        if self.prefix is None:
            return
        evicted, self._evictions_reported = (
            self.prefix.evictions - self._evictions_reported,
            self.prefix.evictions,
        )
        self.metrics.set_prefix_cache(
            self.model.name, self.prefix.nbytes, len(self.prefix), evicted
        )


def prefix_cache_for(shape: CacheShape, settings: Settings) -> PrefixCache | None:
    """The model's prefix cache, or None when ``settings.prefix_cache`` is off."""
    if not settings.prefix_cache:
        return None
    return PrefixCache(shape, settings.prefix_cache_block_tokens, settings.prefix_cache_bytes)


# ----------------------------------------------------------------------------- full_sequence


class FullSequenceStepper:
    """Recompute every sequence in full each step; only rows of equal length share a pass.

    The full-sequence graphs served here (HF-compatible Reformers) chunk and hash padding along
    with real tokens, which moved logits by ~1e-3 and changed sampled tokens; unpadded, every row
    computes exactly what it would alone.
    """

    def __init__(self, model: LoadedModel, settings: Settings, metrics: Metrics) -> None:
        self.model = model
        self.metrics = metrics
        self._rows: dict[int, Sequence] = {}

    def refusal(self, prompt_tokens: int, new_tokens: int) -> str | None:
        return None  # no cache: max_context and max_num_seqs are the only bounds

    def fits(self, reservations: Seq[int]) -> bool:
        return True

    def admit(self, seq: Sequence) -> None:
        self._rows[seq.id] = seq

    def step(self, sink: StepSink) -> None:
        groups: dict[int, list[Sequence]] = {}
        for seq in self._rows.values():
            groups.setdefault(len(seq.prompt) + len(seq.generated), []).append(seq)
        for width, rows in groups.items():
            ids = np.array([seq.prompt + seq.generated for seq in rows], dtype=np.int64)
            inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            try:
                outputs = timed_forward(self.model, self.metrics, inputs, width)
            except Exception as exc:
                self.release([seq.id for seq in rows])
                sink.fail(rows, exc)
                continue
            self.metrics.observe_batch(self.model.name, len(rows), ids.size, ids.size, [])
            self.release(sink.accept(rows, outputs["logits"][:, -1]))
        sink.flush()

    def release(self, seq_ids: Collection[int]) -> None:
        for seq_id in seq_ids:
            self._rows.pop(seq_id, None)

    @property
    def cache_bytes(self) -> int:
        return 0

    @property
    def decoding(self) -> int:
        return len(self._rows)

    @property
    def prefix_cache_bytes(self) -> int:
        return 0  # nothing is cached between steps, let alone between requests


StepperFactory = Callable[[LoadedModel, Settings, Metrics], Stepper]


def _kv_cache(model: LoadedModel, settings: Settings, metrics: Metrics) -> Stepper:
    layout = model.manifest.signature.cache
    if layout is None:  # the manifest validator already requires it; this is for mypy
        raise ValueError(f"{model.name}: generation_mode 'kv_cache' without a cache layout")
    return KVCacheStepper(model, settings, metrics, layout)


STEPPERS: dict[GenerationMode, StepperFactory] = {
    "kv_cache": _kv_cache,
    "full_sequence": FullSequenceStepper,
}


def stepper_for(model: LoadedModel, settings: Settings, metrics: Metrics) -> Stepper:
    """The stepper of the manifest's ``generation_mode``."""
    mode = model.manifest.signature.generation_mode
    if mode is None:
        raise ValueError(f"{model.name}: the manifest names no generation_mode")
    return STEPPERS[mode](model, settings, metrics)
