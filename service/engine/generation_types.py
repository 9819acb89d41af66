"""What generation hands back to its callers: chunks, results, the scheduler's stats, errors.

The api and benchmarks import these; they depend on nothing else in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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

    running: int  # admitted and not finished: prefilling or decoding (longhaul_running_sequences)
    waiting: int  # queued, not admitted yet (longhaul_waiting_sequences)
    kv_cache_bytes: int  # cache arrays held right now: the decode buffer + partial prefills
    decoding: int  # of ``running``, those past their prefill (rows of the decode step)
    prefix_cache_bytes: int = 0  # KV entries the prefix cache holds (beside kv_cache_bytes)


class GenerationError(RuntimeError):
    """The backend failed during a forward pass; the request cannot complete (-> 500)."""
