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
from collections.abc import Sequence as Seq

from model_store.tokens import EOS_ID, PAD_ID
from service.engine.errors import ContextLengthExceeded, InvalidInput
from service.engine.generation_scheduler import Scheduler
from service.engine.generation_steppers import PromptState, Sequence, stepper_for
from service.engine.generation_stream import GenerationStream
from service.engine.generation_text import TextTracker, TokenTexts, decode_with_offsets
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
        self.token_texts = TokenTexts(model.tokenizer)
        self.scheduler = Scheduler(
            model.name, self.stepper, settings, metrics, self.eos_id, self.token_texts
        )
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
        (group,) = self._enqueue(
            [[self.start_id]], params, 1, time.perf_counter(), record_metrics=False
        )
        await group[0].collect()

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
        (group,) = await self.submit_many([prompt], params)
        return group[0]

    async def submit_many(
        self, prompts: Seq[str | list[int]], params: SamplingParams, choices: int = 1
    ) -> list[list[GenerationStream]]:
        """Several prompts, ``choices`` continuations of each (n > 1 / best_of), queued together
        or not at all; the streams per prompt, in order, choice 0 first. The choices of one
        prompt share its prefill (KV-cache models: one prefill, its cache copied per choice)
        and each samples with its own generator (``SamplingParams.generator``). Raises what
        :meth:`submit` raises, for the first prompt at fault (``param`` names its index), and
        ``InvalidInput`` when the choices of one prompt could never run together."""
        if choices < 1:
            raise ValueError(f"choices must be >= 1, got {choices}")
        arrival = time.perf_counter()  # time to first token counts tokenization too
        tokenized: list[list[int]] = []
        for index, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
            if isinstance(prompt, str):
                # Off the loop: a prompt near max_context takes milliseconds to tokenize.
                ids = (await asyncio.to_thread(self.model.tokenizer.encode, prompt)).ids
            else:
                bad = [i for i in prompt if not 0 <= i < self.vocab_size]
                if bad:
                    raise InvalidInput(
                        f"token ids must be in [0, {self.vocab_size}); got {bad[:5]}", param=param
                    )
                ids = list(prompt)
            tokenized.append(ids)
        echoes: list[PromptState | None] = [None] * len(prompts)
        if params.echoes:
            echoes = await asyncio.to_thread(self._prompt_states, tokenized)
        return self._enqueue(tokenized, params, choices, arrival, True, echoes)

    def _prompt_states(self, prompts: list[list[int]]) -> list[PromptState | None]:
        """Text and token offsets of each prompt as it will be run (empty = the start token)."""
        states: list[PromptState | None] = []
        for ids in prompts:
            text, offsets = decode_with_offsets(self.model.tokenizer, ids or [self.start_id])
            states.append(PromptState(text, offsets))
        return states

    def cancel(self, stream_id: int) -> None:
        """End a request (``GenerationStream.id``): a waiting one leaves the queue at once, an
        admitted one frees its slot and cache at the next step boundary; its stream's iteration
        ends without a final chunk. Idempotent; ids that finished or never existed are ignored.
        ``GenerationStream.cancel`` (the client went away) calls this."""
        self.scheduler.cancel(stream_id)

    def _enqueue(
        self, prompts: list[list[int]], params: SamplingParams, choices: int, arrival: float,
        record_metrics: bool, echoes: list[PromptState | None] | None = None,
    ) -> list[list[GenerationStream]]:  # fmt: skip
        total = len(prompts) * choices
        if total > self.settings.max_waiting_sequences:
            raise InvalidInput(
                f"{len(prompts)} prompts x {choices} choices = {total} sequences, more than the "
                f"queue holds ({self.settings.max_waiting_sequences}, "
                "LONGHAUL_MAX_WAITING_SEQUENCES)",
                param="prompt",
            )
        groups: list[Sequence] = []
        for index, prompt_ids in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
            ids = prompt_ids or [self.start_id]
            self._check(len(ids), params.max_new_tokens, choices, param)
            state = None if echoes is None else echoes[index]
            members = []
            for choice in range(choices):
                seq_id = next(self._ids)
                stream = GenerationStream(seq_id, len(ids), self.cancel)
                members.append(
                    Sequence(
                        seq_id, ids, params, stream, TextTracker(self.model.tokenizer, params.stop),
                        params.generator(choice), arrival, record_metrics, prompt_state=state,
                    )
                )  # fmt: skip
            members[0].forks = members[1:]
            groups.append(members[0])
        self.scheduler.enqueue_many(groups)
        return [[seq.stream for seq in head.group] for head in groups]

    def _check(self, prompt_tokens: int, new_tokens: int, choices: int, param: str) -> None:
        """Refuse what could never run, however long it waited."""
        total = prompt_tokens + new_tokens
        if total > self.max_context:
            raise ContextLengthExceeded(
                total, self.max_context, param=param,
                hint=f" ({prompt_tokens} prompt tokens + {new_tokens} new tokens requested)",
            )  # fmt: skip
        refusal = self.stepper.refusal(prompt_tokens, new_tokens)
        if refusal is not None:
            raise InvalidInput(refusal, param="max_new_tokens")
        settings = self.settings
        limits = [
            (settings.max_num_seqs, "LONGHAUL_MAX_NUM_SEQS"),
            (settings.max_waiting_sequences, "LONGHAUL_MAX_WAITING_SEQUENCES"),
        ]
        for limit, name in limits:
            if choices > limit:
                raise InvalidInput(
                    f"{choices} choices of one prompt must run together; at most {limit} ({name})",
                    param="n",
                )
        if choices > 1 and not self.stepper.fits([total] * choices):
            raise InvalidInput(
                f"{choices} choices of {total} tokens each do not fit the KV cache budget "
                "together (LONGHAUL_KV_CACHE_BYTES)",
                param="n",
            )
