"""``POST /v1/generate`` (native) and ``POST /v1/completions`` (OpenAI-compatible): thin routers
over the model's ``GenerateEngine`` (service/engine/interfaces.py).

Every limit is checked before a response starts (400/404/422/429 arrive as ordinary error
answers, also for ``stream: true``). A request holds a lease on the model version for as long as
its generation runs, so a reload waits for it. Whichever way the client goes away — a streaming
connection closed mid-stream, or a non-streaming request abandoned while it waits — the sequence
is cancelled and the engine frees its cache at the next step boundary.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from service.api.deps import ApiKey, AppMetrics, AppSettings, Registry, record_outcome
from service.api.errors import ERROR_RESPONSES, ApiError, request_id_of
from service.api.generate_protocol import (
    CompletionIdentity,
    CompletionRequest,
    CompletionResponse,
    GenerateRequest,
    GenerateResponse,
    generate_response,
    generate_stream_events,
)
from service.engine.errors import EngineError
from service.engine.generation_stream import GenerationStream
from service.engine.generation_types import GenerationChunk, GenerationError, GenerationResult
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
    """One generation bound to a lease on its model version. ``close`` is idempotent.

    Its chunks go through :meth:`chunks`, which keeps ``request.state`` current for the access
    log (prompt and completion tokens, the time the sequence waited for admission) and the
    model's health (a forward pass that failed counts against it).
    """

    def __init__(
        self, served: ServedModel, stream: GenerationStream, request: Request, metrics: Metrics
    ) -> None:
        self.served = served
        self.stream = stream
        self.request = request
        self.metrics = metrics
        self.request_id = request_id_of(request)
        self._closed = False
        request.state.prompt_tokens = stream.prompt_tokens
        request.state.completion_tokens = 0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.stream.cancel()  # no-op when the generation already finished
            self.served.release()
            if self.stream.queue_seconds is not None:
                self.request.state.queue_seconds = self.stream.queue_seconds

    async def chunks(self) -> AsyncIterator[GenerationChunk]:
        """The stream's chunks, with the bookkeeping above."""
        while True:
            try:
                chunk = await anext(self.stream)
            except StopAsyncIteration:
                return
            except GenerationError as exc:  # the backend failed a forward pass
                record_outcome(self.metrics, self.served, exc)
                raise
            self.request.state.completion_tokens = chunk.completion_tokens
            if chunk.finish_reason is not None:
                record_outcome(self.metrics, self.served, None)
            yield chunk

    async def collect(self) -> GenerationResult:
        pieces: list[str] = []
        tokens: list[int] = []
        async for chunk in self.chunks():
            pieces.append(chunk.text)
            tokens.extend(chunk.token_ids)
            if chunk.finish_reason is not None:
                return GenerationResult(
                    "".join(pieces), tokens, chunk.finish_reason, chunk.prompt_tokens,
                    chunk.completion_tokens,
                )  # fmt: skip
        raise GenerationError("the generation ended without a final chunk")

    async def result(self, request: Request) -> GenerationResult | None:
        """The whole generation, or None if the client disconnected first (then cancelled)."""
        collecting = asyncio.ensure_future(self.collect())
        watching = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
            if collecting.done():
                return collecting.result()
            return None
        finally:
            for task in (collecting, watching):
                task.cancel()
            self.close()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so nothing else arrives)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _open(
    registry: ModelRegistry, request: Request, name: str, prompt: str | list[int],
    params: SamplingParams, metrics: Metrics,
) -> _Session:  # fmt: skip
    request.state.model = name  # the metrics middleware labels requests_total with it
    served = registry.get(name)
    engine = served.generator()
    served.acquire()
    try:
        stream = await engine.submit(prompt, params)
    except BaseException:
        served.release()
        raise
    return _Session(served, stream, request, metrics)


def _sse(data: object) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _event_stream(
    session: _Session, render: Callable[[GenerationChunk], list[dict[str, Any]]]
) -> StreamingResponse:
    """Chunks as Server-Sent Events, then ``data: [DONE]``.

    A failure after the response started cannot change the status any more: it is sent as an
    OpenAI-style ``data: {"error": ...}`` event (the openai client raises on it) and the stream
    ends without [DONE].
    """

    async def events() -> AsyncIterator[bytes]:
        try:
            async for chunk in session.chunks():
                for payload in render(chunk):
                    yield _sse(payload)
            yield b"data: [DONE]\n\n"
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
        events(), media_type="text/event-stream", headers=SSE_HEADERS,
        background=BackgroundTask(session.close),
    )  # fmt: skip


def _error_payload(message: str, type_: str, code: str, request_id: str | None) -> dict[str, Any]:
    error = ApiError(500, message, type=type_, code=code)
    return {"error": error.detail(request_id)}


@router.post("/generate", response_model=GenerateResponse, responses=RESPONSES)
async def generate(
    body: GenerateRequest, request: Request, registry: Registry, settings: AppSettings,
    metrics: AppMetrics,
) -> Response:  # fmt: skip
    """Continue a prompt. With ``stream: true``: SSE ``data: {model, text}`` per token chunk, a
    last event with ``finish_reason`` and ``usage``, then ``data: [DONE]``."""
    params = body.to_sampling_params(settings)
    session = await _open(registry, request, body.model, body.prompt, params, metrics)
    if body.stream:
        return _event_stream(session, lambda chunk: generate_stream_events(body.model, chunk))
    result = await session.result(request)
    if result is None:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(generate_response(body.model, result))


@router.post("/completions", response_model=CompletionResponse, responses=RESPONSES)
async def completions(
    body: CompletionRequest, request: Request, registry: Registry, settings: AppSettings,
    metrics: AppMetrics,
) -> Response:  # fmt: skip
    """OpenAI-compatible text completion (n = 1; no logprobs, echo, suffix or penalties)."""
    refusal = body.unsupported()
    if refusal is not None:
        raise refusal
    params = body.to_sampling_params(settings)
    session = await _open(registry, request, body.model, body.prompt, params, metrics)
    identity = CompletionIdentity(body.model)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return _event_stream(session, lambda chunk: identity.stream_events(chunk, include_usage))
    result = await session.result(request)
    if result is None:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(identity.response(result))
