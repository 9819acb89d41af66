"""The bridge between the generation worker thread and asyncio callers.

Each request gets a :class:`GenerationStream`, an ``asyncio.Queue`` of chunks owned by the event
loop that submitted it. The worker never touches it directly: it collects the results of one
forward pass in an :class:`Outbox` and flushes them with one ``loop.call_soon_threadsafe`` per
loop, so a step over 16 rows wakes the loop once, not 16 times.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from service.engine.generation_types import (
    GenerationChunk,
    GenerationError,
    GenerationResult,
    PromptEcho,
    TokenLogprob,
)


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
        #: Arrival to admission, seconds; written once by the worker when the sequence is admitted.
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
        return await collect_chunks(self)

    def cancel(self) -> None:
        """Idempotent; a no-op once the final chunk was consumed. Ends a pending iteration."""
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self._queue.put_nowait(None)  # wakes a consumer blocked in __anext__
            self._cancel(self.id)

    def put(self, item: GenerationChunk | BaseException | None) -> None:
        """Event loop only (the outbox delivers through ``call_soon_threadsafe``). None ends
        the iteration without a final chunk: the engine dropped the request (cancelled)."""
        self._queue.put_nowait(item)


_Item = tuple[GenerationStream, GenerationChunk | BaseException | None]


class Outbox:
    """Results of one forward pass, handed to the event loop(s) in one call each. Worker only."""

    def __init__(self) -> None:
        self.items: list[_Item] = []

    def put(self, stream: GenerationStream, item: GenerationChunk | BaseException | None) -> None:
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
        stream.put(item)


async def collect_chunks(chunks: AsyncIterator[GenerationChunk]) -> GenerationResult:
    """The whole generation from its chunks (text, tokens, logprobs joined; the final chunk's
    counts and finish reason)."""
    pieces: list[str] = []
    tokens: list[int] = []
    logprobs: list[TokenLogprob] = []
    prompt: PromptEcho | None = None
    async for chunk in chunks:
        pieces.append(chunk.text)
        tokens.extend(chunk.token_ids)
        logprobs.extend(chunk.logprobs)
        prompt = prompt or chunk.prompt
        if chunk.finish_reason is not None:
            return GenerationResult(
                "".join(pieces), tokens, chunk.finish_reason, chunk.prompt_tokens,
                chunk.completion_tokens, logprobs, prompt, chunk.cumulative_logprob,
            )  # fmt: skip
    raise GenerationError("the generation ended without a final chunk")
