"""What generation hands back to its callers: chunks, results, the scheduler's stats, errors.

The api and benchmarks import these; they depend on nothing else in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["length", "stop"]


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str  # the token's own text (TokenTexts in generation_text.py)
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model's raw distribution (log-softmax of the logits
    at temperature 1, before top-k/top-p), and the most probable tokens at its position."""

    token_id: int
    token: str
    logprob: float | None  # None only for a prompt's first token: nothing precedes it
    top: tuple[TopLogprob, ...]  # the k most probable, most probable first (ties: lower id)
    offset: int  # character offset of the token in its text (the prompt's, or the completion's)


@dataclass(frozen=True)
class PromptEcho:
    """The prompt as the engine saw it, returned on the first chunk of a request that asks for
    it (``SamplingParams.echo``; with ``prompt_logprobs``, scored token by token)."""

    text: str  # the prompt ids decoded
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None  # one per prompt token, when requested


@dataclass(frozen=True)
class GenerationChunk:
    """What one step produced for one request. The last chunk has ``finish_reason`` set."""

    text: str  # newly released text; may be empty (held back: incomplete character, stop prefix)
    token_ids: tuple[int, ...]  # the token(s) generated this step
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int  # generated so far, this chunk included
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token of ``token_ids``, when requested
    prompt: PromptEcho | None = None  # on the first chunk only, when requested
    # On the final chunk, when logprobs were requested: the sum over the generated tokens.
    cumulative_logprob: float | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when requested
    prompt: PromptEcho | None = None
    cumulative_logprob: float | None = None


@dataclass(frozen=True)
class GenerationStats:
    """A snapshot of the scheduler for tests, benchmarks and gauges."""

    running: int  # admitted and not finished: prefilling or decoding (longhaul_running_sequences)
    waiting: int  # queued, not admitted yet (longhaul_waiting_sequences)
    kv_cache_bytes: int  # cache arrays held right now: the decode buffer + partial prefills
    decoding: int  # of ``running``, those past their prefill (rows of the decode step)
    prefix_cache_bytes: int = 0  # KV entries the prefix cache holds (beside kv_cache_bytes)


class GenerationError(RuntimeError):
    """The backend failed during a forward pass; the request cannot complete (-> 500)."""
