"""Pure ASGI middleware (no BaseHTTPMiddleware: it buffers streams and breaks SSE).

* :class:`BodyLimitMiddleware` answers 413 before any parsing: from Content-Length when present,
  else by counting the streamed body (which it then replays to the app).
* :class:`MetricsMiddleware` records ``requests_total`` and ``request_duration_seconds`` for every
  request, labelled with the route template and the model the route put in ``request.state``.
* :class:`RequestContextMiddleware` (outermost) gives every request its id (service/api/logs.py),
  returns it as ``X-Request-Id`` and writes the access-log line when the response is done, from
  what the route left in ``request.state`` (model, token counts, queue time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response
from service.api.logs import (
    ACCESS_LOGGER,
    REQUEST_ID_HEADER,
    current_request_id,
    request_id_from,
)
from service.metrics import Metrics

access_log = logging.getLogger(ACCESS_LOGGER)


def route_template(scope: Scope, routes: list[BaseRoute]) -> str:
    """The route template ("/v1/models/{name}/load"), never the raw path (cardinality)."""
    route: BaseRoute | None = scope.get("route")
    if route is None:
        # Answered before routing (e.g. the body limit's 413): find the route it was meant for.
        route = next((r for r in routes if r.matches(scope)[0] != Match.NONE), None)
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        # Read the whole body here (bounded by max_bytes) so an oversized chunked upload is
        # refused before the app has started parsing it.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: wait for the disconnect, like the server would

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, f"request body exceeds {self.max_bytes} bytes (LONGHAUL_MAX_BODY_BYTES)",
            code="request_too_large", request_id=scope.get("state", {}).get("request_id"),
        )  # fmt: skip
        # Connection: close, because the unread rest of the body is still on the wire.
        response.headers["connection"] = "close"
        await response(scope, receive, send)


class MetricsMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        is_known_model: Callable[[str], bool],
        routes: list[BaseRoute],
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.is_known_model = is_known_model
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app dies before sending a status, that is what the client sees

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            model = scope.get("state", {}).get("model", "")
            # Model names come from request bodies: label only known ones (bounded cardinality).
            if model and not self.is_known_model(model):
                model = "unknown"
            seconds = time.perf_counter() - started
            self.metrics.observe_request(model, route_template(scope, self.routes), status, seconds)


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_from(dict(scope["headers"]).get(REQUEST_ID_HEADER.encode()))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k != REQUEST_ID_HEADER.encode()
                ]
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        token = current_request_id.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)
            self._log(scope, state, status, time.perf_counter() - started)

    def _log(self, scope: Scope, state: dict[str, object], status: int, seconds: float) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        queue = state.get("queue_seconds")
        fields: dict[str, object] = {
            "request_id": state["request_id"],
            "method": scope["method"],
            "route": route_template(scope, self.routes),
            "path": scope["path"],
            "model": state.get("model") or None,
            "status": status,
            "prompt_tokens": state.get("prompt_tokens"),
            "completion_tokens": state.get("completion_tokens"),
            "queue_ms": round(queue * 1000, 3) if isinstance(queue, float) else None,
            "total_ms": round(seconds * 1000, 3),
        }
        access_log.info("%s %s %d", scope["method"], scope["path"], status, extra=fields)
