"""The one place errors become HTTP: wire schema, :class:`ApiError`, and every exception handler.

Every error answer has the OpenAI shape ``{"error": {"type", "message", "param", "code"}}`` so the
official client raises the right exception class, plus ``request_id`` (the ``X-Request-Id`` of the
answer, service/api/logs.py) so a failed request can be found in the server's log. Engine errors
(service/engine/errors.py) map through :func:`engine_error_to_api`; anything unexpected is logged
with a traceback and answered with a 500 that names the request id but never the exception text.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine.errors import (
    ContextLengthExceeded,
    EngineError,
    EngineStopped,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    QueueFull,
    WrongTask,
)

log = logging.getLogger(__name__)

# OpenAI's error "type" per status, which the openai client maps to exception classes.
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None
    code: str | None = None
    request_id: str | None = Field(None, description="the X-Request-Id of this answer")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    """Raise anywhere in a route to answer with this status and the error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or TYPES.get(status, "invalid_request_error")
        self.code = code
        self.param = param
        self.headers = headers

    def detail(self, request_id: str | None = None) -> dict[str, Any]:
        return ErrorDetail(
            type=self.type, message=self.message, param=self.param, code=self.code,
            request_id=request_id,
        ).model_dump()  # fmt: skip

    def response(self, request_id: str | None = None) -> JSONResponse:
        return JSONResponse(
            {"error": self.detail(request_id)}, status_code=self.status, headers=self.headers
        )


def error_response(
    status: int, message: str, code: str | None = None, param: str | None = None,
    headers: dict[str, str] | None = None, request_id: str | None = None,
) -> JSONResponse:  # fmt: skip
    return ApiError(status, message, code=code, param=param, headers=headers).response(request_id)


def request_id_of(request: Request) -> str | None:
    """The id RequestContextMiddleware gave this request (None in apps built without it)."""
    request_id = getattr(request.state, "request_id", None)
    return request_id if isinstance(request_id, str) else None


def _describe(status: int, text: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": text}


#: ``responses=ERROR_RESPONSES`` on a route lists every error it can answer in /docs.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _describe(400, "Invalid request (e.g. context_length_exceeded, invalid_json, wrong task)"),
    401: _describe(401, "Missing or wrong API key"),
    404: _describe(404, "Unknown model (model_not_found)"),
    413: _describe(413, "Request body larger than LONGHAUL_MAX_BODY_BYTES"),
    422: _describe(422, "Request body does not match the schema; `param` names the field"),
    429: _describe(429, "Queue full; retry after the Retry-After header"),
    500: _describe(500, "Internal error (logged with the id in the message)"),
    503: _describe(503, "Model still loading or being unloaded"),
}
ADMIN_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    403: _describe(
        403, "Admin routes disabled (no LONGHAUL_ADMIN_KEYS) or key is not an admin key"
    ),
    409: _describe(409, "The version failed to load; the previous version keeps serving"),
}


def engine_error_to_api(exc: EngineError) -> ApiError:
    """Map a typed engine error to status, type and code (the table lives here and only here)."""
    if isinstance(exc, ModelNotFound):
        return ApiError(404, exc.message, code="model_not_found", param=exc.param)
    if isinstance(exc, ContextLengthExceeded):
        return ApiError(400, exc.message, code="context_length_exceeded", param=exc.param)
    if isinstance(exc, WrongTask):
        return ApiError(400, exc.message, code="wrong_task", param=exc.param)
    if isinstance(exc, InvalidInput):
        return ApiError(400, exc.message, code="invalid_input", param=exc.param)
    if isinstance(exc, QueueFull):
        return ApiError(
            429, exc.message, code="queue_full", headers={"Retry-After": str(exc.retry_after)}
        )
    if isinstance(exc, ModelNotReady):
        return ApiError(
            503, exc.message, code="model_not_ready", headers={"Retry-After": str(exc.retry_after)}
        )
    if isinstance(exc, EngineStopped):
        return ApiError(503, exc.message, code="model_unloaded", headers={"Retry-After": "1"})
    if isinstance(exc, ModelLoadError):
        return ApiError(409, exc.message, code="model_load_failed", param=exc.param)
    return ApiError(400, exc.message, code="invalid_request", param=exc.param)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _is_union_tag(part: int | str) -> bool:
    """pydantic names each member of a union in the loc ("constrained-str", "list[int]")."""
    return isinstance(part, str) and (part in _TYPE_TAGS or any(c in part for c in "[]-"))


def _param(loc: tuple[int | str, ...]) -> str | None:
    """("body", "inputs", "list[str]", 2) -> "inputs[2]": the caller's own field path."""
    parts = [p for p in loc[1:] if not _is_union_tag(p)] if loc and loc[0] == "body" else list(loc)
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _validation(exc: RequestValidationError) -> ApiError:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = errors[0].get("ctx", {}).get("error", "")
        return ApiError(400, f"request body is not valid JSON: {detail}", code="invalid_json")
    if errors and errors[0].get("type") == "model_attributes_type" and len(errors[0]["loc"]) == 1:
        return ApiError(422, "request body must be a JSON object (Content-Type: application/json)",
                        code="validation_error")  # fmt: skip
    shown: list[str] = []
    params: list[str | None] = []
    for error in errors:
        param = _param(tuple(error.get("loc", ())))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        line = f"{param}: {message}" if param else message
        if line not in shown:  # a union reports the same problem once per member
            shown.append(line)
            params.append(param)
    # The most specific path is the most useful one ("inputs[3]" rather than "inputs").
    param = max(
        params, key=lambda p: 0 if p is None else p.count(".") + p.count("[") + 1, default=None
    )
    more = f" (and {len(shown) - 5} more)" if len(shown) > 5 else ""
    return ApiError(422, "; ".join(shown[:5]) + more, code="validation_error", param=param)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response(request_id_of(request))


async def _engine_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineError)
    return engine_error_to_api(exc).response(request_id_of(request))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _validation(exc).response(request_id_of(request))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 404:
        message = f"no route {request.method} {request.url.path}"
        code = "route_not_found"
    elif status == 400 and isinstance(exc.__cause__, ValueError):
        # FastAPI turns a body that json.loads cannot even decode (bad UTF-8) into a bare 400.
        message = f"request body is not valid UTF-8 JSON: {exc.__cause__}"
        code = "invalid_json"
    elif status == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
        code = "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    error = ApiError(status, message, code=code, headers=dict(exc.headers or {}))
    return error.response(request_id_of(request))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The request id ties the answer to this log line (the record carries it too).
    request_id = request_id_of(request) or uuid.uuid4().hex
    log.exception("unhandled error on %s %s (request %s)", request.method, request.url.path,
                  request_id)  # fmt: skip
    # Starlette answers this one outside every middleware: the header is set here.
    return ApiError(500, f"internal server error (request id {request_id})", code="internal_error",
                    headers={"X-Request-Id": request_id}).response(request_id)  # fmt: skip


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
