"""Generation: iteration-level (continuous) batching for decoder models.

:class:`GenerationEngine` is what the api and the registry see (the ``GenerateEngine`` interface
of interfaces.py): it checks and tokenizes a request on the event loop, hands it to the
:class:`~service.engine.generation_scheduler.Scheduler` (admission, budgets, cancellation, one
worker thread per model) and returns its :class:`GenerationStream`. The scheduler drives the
stepper of the manifest's ``generation_mode`` (generation_steppers.py: KV-cache decoding with
chunked prefill, or full-sequence recompute). The pieces:

    generation_types.py      chunks, results, stats, errors (what callers import)
    generation_stream.py     the bridge to asyncio: a stream per request, an outbox per pass
    generation_scheduler.py  queue, admission, cancellation, sampling and stop rules, gauges
    generation_steppers.py   per-mode state and forward passes behind one Stepper interface
"""

from __future__ import annotations

import asyncio
import itertools
import time

from model_store.tokens import EOS_ID, PAD_ID
from service.engine.errors import ContextLengthExceeded, InvalidInput
from service.engine.generation_scheduler import Scheduler
from service.engine.generation_steppers import Sequence, stepper_for
from service.engine.generation_stream import GenerationStream
from service.engine.generation_text import TextTracker
from service.engine.generation_types import (
    FinishReason,
    GenerationChunk,
    GenerationError,
    GenerationResult,
    GenerationStats,
)
from service.engine.models import LoadedModel
from service.engine.sampling import SamplingParams
from service.metrics import Metrics
from service.settings import Settings

__all__ = [
    "EOS_ID",
    "PAD_ID",
    "FinishReason",
    "GenerationChunk",
    "GenerationEngine",
    "GenerationError",
    "GenerationResult",
    "GenerationStats",
    "GenerationStream",
]

# PAD_ID / EOS_ID are Longhaul's own vocabulary's (model_store/tokens.py); a manifest config
# that names other ids (``eos_token_id``/``pad_token_id``, e.g. an imported BLOOM) takes
# precedence. Documents in the training data are separated by <eos>, so it also serves as the
# "start of document" an empty prompt conditions on.


class GenerationEngine:
    """Continuous-batching generation for one loaded decoder model (see the module docstring)."""

    def __init__(self, model: LoadedModel, settings: Settings, metrics: Metrics) -> None:
        manifest = model.manifest
        if manifest.task != "generate":
            raise ValueError(f"{model.name}: task {manifest.task!r} is not 'generate'")
        self.model = model
        self.settings = settings
        self.max_context = manifest.max_context
        config = manifest.config
        self.vocab_size = int(config.get("vocab_size", model.tokenizer.get_vocab_size()))
        pad = config.get("pad_token_id")
        self.pad_id = PAD_ID if pad is None else int(pad)
        # A config without the field is a native Longhaul model (eos = 1); an explicit null is
        # an imported model with no end token: it generates until max_new_tokens.
        eos = config.get("eos_token_id", EOS_ID)
        self.eos_id: int | None = None if eos is None else int(eos)
        # What an empty prompt (and the warm-up) starts from: the end token, else padding.
        self.start_id = self.pad_id if self.eos_id is None else self.eos_id
        self.stepper = stepper_for(model, settings, metrics)
        self.scheduler = Scheduler(model.name, self.stepper, settings, metrics, self.eos_id)
        self._ids = itertools.count()

    @property
    def name(self) -> str:
        return self.model.name

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.scheduler.start()

    async def warmup(self) -> None:
        """Two greedy tokens from a one-token prompt: runs prefill and (kv mode) a decode step."""
        params = SamplingParams(max_new_tokens=2, temperature=0)
        stream = self._enqueue([self.start_id], params, time.perf_counter(), record_metrics=False)
        await stream.collect()

    async def stop(self) -> None:
        """Refuse new requests; let admitted and waiting ones finish for up to
        ``settings.drain_timeout_seconds``; fail what is left with :class:`EngineStopped`."""
        await asyncio.to_thread(self.scheduler.stop)

    def stats(self) -> GenerationStats:
        return self.scheduler.stats()

    # ------------------------------------------------------------------ requests

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
        return self._enqueue(ids, params, arrival, record_metrics=True)

    def cancel(self, stream_id: int) -> None:
        """End a request (``GenerationStream.id``): a waiting one leaves the queue at once, an
        admitted one frees its slot and cache at the next step boundary; its stream's iteration
        ends without a final chunk. Idempotent; ids that finished or never existed are ignored.
        ``GenerationStream.cancel`` (the client went away) calls this."""
        self.scheduler.cancel(stream_id)

    def _enqueue(
        self, prompt_ids: list[int], params: SamplingParams, arrival: float, record_metrics: bool
    ) -> GenerationStream:
        ids = prompt_ids or [self.start_id]
        total = len(ids) + params.max_new_tokens
        if total > self.max_context:
            raise ContextLengthExceeded(
                total, self.max_context, param="prompt",
                hint=f" ({len(ids)} prompt tokens + {params.max_new_tokens} new tokens requested)",
            )  # fmt: skip
        refusal = self.stepper.refusal(len(ids), params.max_new_tokens)
        if refusal is not None:
            raise InvalidInput(refusal, param="max_new_tokens")
        seq_id = next(self._ids)
        stream = GenerationStream(seq_id, len(ids), self.cancel)
        seq = Sequence(
            seq_id, ids, params, stream, TextTracker(self.model.tokenizer, params.stop),
            params.generator(), arrival, record_metrics,
        )  # fmt: skip
        self.scheduler.enqueue(seq)
        return stream
