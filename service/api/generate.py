"""``POST /v1/generate`` (native) and ``POST /v1/completions`` (OpenAI-compatible): thin routers
over the model's ``GenerateEngine`` (service/engine/interfaces.py).

Every limit is checked before a response starts (400/404/422/429 arrive as ordinary error
answers, also for ``stream: true``). A request holds a lease on the model version for as long as
its generation runs, so a reload waits for it. Whichever way the client goes away — a streaming
connection closed mid-stream, or a non-streaming request abandoned while it waits — the sequence
is cancelled and the engine frees its cache at the next step boundary. A request with several
prompts or choices holds one stream per choice (prompt-major), under one lease.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from service.api.deadlines import Deadline, RequestDeadline
from service.api.deps import ApiKey, AppMetrics, AppSettings, Registry, record_outcome
from service.api.errors import ERROR_RESPONSES, ApiError, request_id_of
from service.api.generate_protocol import (
    ChoiceResult,
    CompletionIdentity,
    CompletionRequest,
    CompletionResponse,
    GenerateRequest,
    GenerateResponse,
    generate_response,
    generate_stream_events,
)
from service.engine.errors import EngineError
from service.engine.generation_stream import GenerationStream, collect_chunks
from service.engine.generation_types import (
    GenerationChunk,
    GenerationError,
    GenerationResult,
)
from service.engine.registry import ModelRegistry, ServedModel
from service.engine.sampling import SamplingParams
from service.metrics import Metrics

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["generate"], dependencies=[ApiKey])

#: nginx's convention for "client closed the request": recorded in requests_total, never seen.
CLIENT_CLOSED = 499
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: 200 may be JSON or, with ``stream: true``, an event stream; say so in /docs.
RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    200: {"content": {"text/event-stream": {"description": "with stream: true"}}},
}


class _Session:
    """Generations bound to a lease on their model version, one stream per choice (prompt-major,
    ``per_prompt`` per prompt). ``close`` is idempotent and cancels what has not finished.

    Chunks go through :meth:`chunks`, which keeps ``request.state`` current for the access log
    (prompt and completion tokens, the time the sequences waited for admission) and the model's
    health (a forward pass that failed counts against it), and enforces the request's deadline
    (deadlines.py): past it every generation of the request is cancelled and a 504 raised.
    """

    def __init__(
        self, served: ServedModel, streams: list[GenerationStream], per_prompt: int,
        request: Request, metrics: Metrics, deadline: Deadline,
    ) -> None:  # fmt: skip
        self.served = served
        self.streams = streams
        self.request = request
        self.metrics = metrics
        self.deadline = deadline
        self.request_id = request_id_of(request)
        self._closed = False
        self._completion = [0] * len(streams)
        request.state.prompt_tokens = sum(s.prompt_tokens for s in streams[::per_prompt])
        request.state.completion_tokens = 0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for stream in self.streams:
                stream.cancel()  # no-op when the generation already finished
            self.served.release()
            waited = [s.queue_seconds for s in self.streams if s.queue_seconds is not None]
            if waited:
                self.request.state.queue_seconds = max(waited)

    async def chunks(self, index: int = 0) -> AsyncIterator[GenerationChunk]:
        """Stream ``index``'s chunks, with the bookkeeping above."""
        stream = self.streams[index]
        while True:
            try:
                async with self.deadline.timeout():
                    chunk = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise self.timed_out() from None
            except GenerationError as exc:  # the backend failed a forward pass
                record_outcome(self.metrics, self.served, exc)
                raise
            self._completion[index] = chunk.completion_tokens
            self.request.state.completion_tokens = sum(self._completion)
            if chunk.finish_reason is not None:
                record_outcome(self.metrics, self.served, None)
            yield chunk

    def timed_out(self) -> ApiError:
        """Cancel the generations (the engine frees them within a step) and build the 504."""
        if all(stream.queue_seconds is None for stream in self.streams):
            stage = "queued"
        else:
            stage = "decode" if self.request.state.completion_tokens else "prefill"
        self.close()
        return self.deadline.exceeded(self.metrics, self.served.name, stage)

    async def collect(self, index: int) -> GenerationResult:
        return await collect_chunks(self.chunks(index))

    async def results(self, request: Request) -> list[GenerationResult] | None:
        """Every generation, or None if the client disconnected first (then cancelled)."""
        collecting: asyncio.Future[list[GenerationResult]] = asyncio.ensure_future(
            asyncio.gather(*(self.collect(i) for i in range(len(self.streams))))
        )
        watching = asyncio.ensure_future(_disconnected(request))
        try:
            watched: set[asyncio.Future[Any]] = {collecting, watching}
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if collecting.done():
                return list(collecting.result())
            return None
        finally:
            for task in (collecting, watching):
                task.cancel()
            self.close()

    async def merged(self) -> AsyncIterator[tuple[int, GenerationChunk]]:
        """(stream index, chunk) as chunks arrive on any stream; the chunks of one step
        (delivered together) come in stream order."""
        sources = [self.chunks(i) for i in range(len(self.streams))]
        pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(sources)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: pending[t]):
                    index = pending.pop(task)
                    try:
                        chunk = task.result()
                    except StopAsyncIteration:  # cancelled: no final chunk
                        continue
                    yield index, chunk
                    pending[asyncio.ensure_future(anext(sources[index]))] = index
        finally:
            for task in pending:
                task.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so nothing else arrives)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _open(
    registry: ModelRegistry, request: Request, name: str, prompts: Seq[str | list[int]],
    params: SamplingParams, metrics: Metrics, deadline: Deadline, choices: int = 1,
) -> _Session:  # fmt: skip
    """Queue every prompt (``choices`` each) under one lease."""
    request.state.model = name  # the metrics middleware labels requests_total with it
    served = registry.get(name)
    engine = served.generator()
    served.acquire()
    try:
        # Tokenizing happens before the sequences are queued: a timeout here leaves nothing
        # behind.
        async with deadline.timeout():
            groups = await engine.submit_many(prompts, params, choices)
    except TimeoutError:
        served.release()
        raise deadline.exceeded(metrics, name, "queued") from None
    except BaseException:
        served.release()
        raise
    streams = [stream for group in groups for stream in group]
    return _Session(served, streams, choices, request, metrics, deadline)


def _sse(data: object) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _event_stream(
    session: _Session, request: Request, events: Callable[[], AsyncIterator[dict[str, Any]]]
) -> Response:
    """``events()`` as Server-Sent Events, then ``data: [DONE]``.

    The response starts with the first event: until then nothing is sent, so a request that
    fails before it (its deadline passed while queued or prefilling, the model unloaded, a
    forward pass failed) gets its status and the error shape like any other, and a client that
    disconnects while it waits frees its slot (499, nothing sent). A failure after the response
    started cannot change the status any more: it is sent as an OpenAI-style
    ``data: {"error": ...}`` event (the openai client raises on it) and the stream ends without
    [DONE].
    """
    source = events()
    first: asyncio.Future[dict[str, Any]] = asyncio.ensure_future(anext(source))
    watching = asyncio.ensure_future(_disconnected(request))
    try:
        waiting: set[asyncio.Future[Any]] = {first, watching}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
    if not first.done():  # the client left before anything could be sent
        first.cancel()
        session.close()
        return Response(status_code=CLIENT_CLOSED)
    try:
        head: list[dict[str, Any]] = [first.result()]
    except StopAsyncIteration:
        head = []
    except BaseException:
        session.close()  # raised to the route's error handlers: a status and the error shape
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            for payload in head:
                yield _sse(payload)
            async for payload in source:
                yield _sse(payload)
            yield b"data: [DONE]\n\n"
        except ApiError as exc:  # the deadline passed: the generation is already cancelled
            yield _sse({"error": exc.detail(session.request_id)})
        except EngineError as exc:  # e.g. the model was unloaded mid-stream
            yield _sse(_error_payload(exc.message, "service_unavailable", "model_unloaded",
                                      session.request_id))  # fmt: skip
        except Exception:
            log.exception("generation failed mid-stream")
            yield _sse(_error_payload("generation failed", "server_error", "internal_error",
                                      session.request_id))  # fmt: skip
        finally:
            # Also runs when Starlette cancels this generator because the client disconnected.
            session.close()

    # The background task covers a response that never started iterating (client gone first).
    return StreamingResponse(
        body(), media_type="text/event-stream", headers=SSE_HEADERS,
        background=BackgroundTask(session.close),
    )  # fmt: skip


def _error_payload(message: str, type_: str, code: str, request_id: str | None) -> dict[str, Any]:
    error = ApiError(500, message, type=type_, code=code)
    return {"error": error.detail(request_id)}


@router.post("/generate", response_model=GenerateResponse, responses=RESPONSES)
async def generate(
    body: GenerateRequest, request: Request, registry: Registry, settings: AppSettings,
    metrics: AppMetrics, deadline: RequestDeadline,
) -> Response:  # fmt: skip
    """Continue a prompt. With ``stream: true``: SSE ``data: {model, text}`` per token chunk, a
    last event with ``finish_reason`` and ``usage``, then ``data: [DONE]``. With ``logprobs``,
    each token's log-probability (in each event, for its tokens); with ``prompt_logprobs``, each
    prompt token's (in the first event)."""
    params = body.to_sampling_params(settings)
    session = await _open(registry, request, body.model, [body.prompt], params, metrics, deadline)
    logprobs = params.logprobs is not None
    scored = params.prompt_logprobs is not None
    if body.stream:

        async def events() -> AsyncIterator[dict[str, Any]]:
            async for chunk in session.chunks():
                for payload in generate_stream_events(body.model, chunk, logprobs, scored):
                    yield payload

        return await _event_stream(session, request, events)
    results = await session.results(request)
    if results is None:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(generate_response(body.model, results[0], logprobs, scored))


@router.post("/completions", response_model=CompletionResponse, responses=RESPONSES)
async def completions(
    body: CompletionRequest, request: Request, registry: Registry, settings: AppSettings,
    metrics: AppMetrics, deadline: RequestDeadline,
) -> Response:  # fmt: skip
    """OpenAI-compatible text completion: one prompt or a batch, n / best_of choices each,
    logprobs and echo (no suffix or penalties). Choice ``index`` = prompt index x n + rank."""
    refusal = body.unsupported()
    if refusal is not None:
        raise refusal
    prompts = body.prompts(settings)
    n, best_of = body.choices(settings)
    ranked = best_of > n
    params = body.to_sampling_params(settings, ranked)
    session = await _open(
        registry, request, body.model, prompts, params, metrics, deadline, best_of
    )
    identity = CompletionIdentity(body.model, body.echo, body.logprobs is not None)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    if body.stream and not ranked:
        return await _event_stream(
            session, request, lambda: _completion_events(session, identity, n, include_usage)
        )
    results = await session.results(request)
    if results is None:
        return Response(status_code=CLIENT_CLOSED)
    choices = _best(results, n, best_of)
    prompt_tokens = sum(results[p * best_of].prompt_tokens for p in range(len(prompts)))
    completion_tokens = sum(c.result.completion_tokens for c in choices)
    if body.stream:  # best_of > n: the n best are known once all finished; sent whole
        usage = (prompt_tokens, completion_tokens)
        return await _event_stream(
            session, request, lambda: _whole_events(identity, choices, usage, include_usage)
        )
    return JSONResponse(identity.response(choices, prompt_tokens, completion_tokens))


def _best(results: list[GenerationResult], n: int, best_of: int) -> list[ChoiceResult]:
    """Per prompt (``best_of`` consecutive results), the ``n`` of highest cumulative logprob
    (ties: the lower choice), indexed prompt-major. With best_of = n, all, in choice order."""
    choices: list[ChoiceResult] = []
    for p in range(len(results) // best_of):
        group = results[p * best_of : (p + 1) * best_of]
        order = list(range(best_of))
        if best_of > n:
            order.sort(key=lambda c: -(group[c].cumulative_logprob or 0.0))
        choices.extend(ChoiceResult(p * n + rank, group[c]) for rank, c in enumerate(order[:n]))
    return choices


async def _completion_events(
    session: _Session, identity: CompletionIdentity, per_prompt: int, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    """Chunks of every choice as they come (one ``index`` per stream), then the usage."""
    streams = session.streams
    completion_tokens = 0
    async for index, chunk in session.merged():
        for payload in identity.stream_events(index, chunk):
            yield payload
        if chunk.finish_reason is not None:
            completion_tokens += chunk.completion_tokens
    if include_usage:
        prompt_tokens = sum(s.prompt_tokens for s in streams[::per_prompt])
        yield identity.usage_event(prompt_tokens, completion_tokens)


async def _whole_events(
    identity: CompletionIdentity, choices: list[ChoiceResult], usage: tuple[int, int],
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
    for choice in choices:
        yield identity.chunk_of(identity.choice(choice.index, choice.result))
    if include_usage:
        yield identity.usage_event(*usage)
