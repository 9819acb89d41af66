"""Typed engine errors. Plain exceptions: ``service/api/errors.py`` maps each to HTTP in one place.

The engine and the generation engine raise these; neither knows about status codes.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class: a request or an admin action the engine refuses, with a user-facing message."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ModelNotFound(EngineError):  # noqa: N818 - named for the condition, like an HTTP status
    """No served model (or no stored version) by that name -> 404 model_not_found."""

    def __init__(
        self, name: str, available: list[str] | None = None, detail: str | None = None
    ) -> None:
        self.name = name
        self.available = available or []
        message = detail or f"model {name!r} is not served"
        if available is not None:
            message += f"; available: {', '.join(available) or 'none'}"
        super().__init__(message, param="model")


class ModelLoadError(EngineError):
    """A version could not be loaded or warmed up; whatever served before keeps serving."""

    def __init__(self, name: str, version: int | None, reason: str) -> None:
        self.name = name
        self.version = version
        self.reason = reason
        where = f"{name}/{version}" if version is not None else name
        super().__init__(f"cannot load {where}: {reason}")


class ModelVerificationError(ModelLoadError):
    """Checksums of a version directory do not match its manifest; ``files`` names the culprits."""

    def __init__(self, name: str, version: int, files: list[str], detail: str) -> None:
        self.files = files
        super().__init__(name, version, f"checksum verification failed: {detail}")


class WrongTask(EngineError):  # noqa: N818 - named for the condition, like an HTTP status
    """The model exists but does another task (e.g. /v1/encode on a generate model) -> 400."""

    def __init__(self, name: str, task: str, wanted: str) -> None:
        self.task = task
        super().__init__(
            f"model {name!r} is a {task} model; this endpoint serves {wanted} models", param="model"
        )


class InvalidInput(EngineError):  # noqa: N818 - named for the condition, like an HTTP status
    """Input the schema could not catch (e.g. a token id outside the vocabulary) -> 400."""


class ContextLengthExceeded(EngineError):  # noqa: N818 - named for the condition, like an HTTP status
    """Input longer than the model's max_context and the caller did not ask to truncate -> 400."""

    def __init__(self, tokens: int, max_context: int, param: str = "input", hint: str = "") -> None:
        self.tokens = tokens
        self.max_context = max_context
        super().__init__(
            f"input has {tokens} tokens but the model's maximum context is {max_context}{hint}",
            param=param,
        )


class QueueFull(EngineError):  # noqa: N818 - named for the condition, like an HTTP status
    """The model's queue is at its limit -> 429 with Retry-After."""

    def __init__(self, name: str, limit: int, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(f"model {name!r} has {limit} requests waiting; retry in {retry_after} s")


class EngineStopped(EngineError):  # noqa: N818 - named for the condition, like an HTTP status
    """The model was unloaded while the request waited -> 503."""


class ModelNotReady(EngineError):  # noqa: N818 - named for the condition, like an HTTP status
    """The model is still loading and warming up at start-up -> 503 with Retry-After."""

    def __init__(self, name: str, retry_after: int = 1) -> None:
        self.retry_after = retry_after
        super().__init__(
            f"model {name!r} is still loading; retry in {retry_after} s", param="model"
        )
