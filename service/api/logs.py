"""Request identity and logs: the request id, one access-log line per request, JSON lines.

* The request id comes from the client's ``X-Request-Id`` when it is usable (1-128 visible ASCII
  characters), else a fresh one (32 hex digits) replaces it; it goes back in the response header,
  in every error body (``error.request_id``), in the access line and in every log record emitted
  while the request is handled (:class:`RequestIdFilter`, through a context variable).
* ``LONGHAUL_LOG_FORMAT=json`` writes every log record as one JSON object per line
  (:class:`JsonFormatter`); ``text`` (the default) writes ``time level logger: message`` followed
  by the record's fields as ``key=value`` pairs (:class:`TextFormatter`).

The access line (logger ``service.access``, level INFO, message ``METHOD PATH STATUS``) carries
the fields :data:`ACCESS_FIELDS`: request_id, method, route (the route template), path, model,
status, prompt_tokens, completion_tokens, queue_ms (time waiting for a batch or for admission),
total_ms (arrival to the last byte sent). A field that does not apply is null.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from typing import Any

REQUEST_ID_HEADER = "x-request-id"
_USABLE_ID = re.compile(r"[\x21-\x7e]{1,128}")
ACCESS_LOGGER = "service.access"

#: The id of the request being handled in this context ("" outside a request).
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar(
    "longhaul_request_id", default=""
)

#: The access line's fields, in order; also the ``extra`` keys a JSON line carries.
ACCESS_FIELDS = ("request_id", "method", "route", "path", "model", "status", "prompt_tokens",
                 "completion_tokens", "queue_ms", "total_ms")  # fmt: skip
#: Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}
#: ``extra`` keys that only repeat the message (uvicorn's ANSI-coloured copy of it).
_DROPPED = frozenset({"color_message"})


def request_id_from(header: bytes | None) -> str:
    """The client's id if usable, else a new one."""
    if header is not None:
        try:
            text = header.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if _USABLE_ID.fullmatch(text):
            return text
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record (the current request's, or "")."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = current_request_id.get()
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """What ``extra=`` put on a record (request_id and the access fields), in insertion order."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _RECORD_ATTRS and key not in _DROPPED and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (ISO 8601, UTC), level, logger, message, the ``extra``
    fields (request_id and the access fields), and the traceback as ``exc_info`` if any."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if not out.get("request_id"):
            out.pop("request_id", None)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message``, then the ``extra`` fields as ``key=value`` pairs."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        pairs = " ".join(f"{k}={v}" for k, v in _extras(record).items() if v not in (None, ""))
        return f"{line} {pairs}" if pairs else line


def configure(level: str, fmt: str) -> None:
    """Root logging for the service (only when the embedding application set up none)."""
    root = logging.getLogger()
    if root.handlers:
        for handler in root.handlers:
            handler.addFilter(RequestIdFilter())
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
