"""Shared route dependencies: settings, registry, metrics, bearer-key auth.

Used as typed aliases (``Registry``, ``AppSettings``...) in route signatures, and as
``dependencies=[Depends(require_api_key)]`` on routers (the generation router too).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from service.api.errors import ApiError
from service.engine.registry import ModelRegistry, ServedModel
from service.metrics import Metrics
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


AppSettings = Annotated[Settings, Depends(get_settings)]
Registry = Annotated[ModelRegistry, Depends(get_registry)]
AppMetrics = Annotated[Metrics, Depends(get_metrics)]


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, keys: list[str]) -> bool:
    # Constant-time comparison against every key, so timing does not reveal a prefix match.
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def require_api_key(request: Request, settings: AppSettings) -> None:
    """Open when no keys are configured; otherwise an API key or an admin key is required."""
    keys = settings.api_keys
    if not keys:
        return
    token = bearer_token(request)
    if token is None:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'",
                       code="missing_api_key", headers=_UNAUTHORIZED)  # fmt: skip
    if not _matches(token, keys + settings.admin_keys):
        raise ApiError(401, "invalid API key", code="invalid_api_key", headers=_UNAUTHORIZED)


def require_admin_key(request: Request, settings: AppSettings) -> None:
    """Admin routes are off (403) unless admin keys are configured; then one must be presented."""
    if not settings.admin_keys:
        raise ApiError(403, "admin routes are disabled: set LONGHAUL_ADMIN_KEYS to enable them",
                       code="admin_disabled")  # fmt: skip
    token = bearer_token(request)
    if token is None:
        raise ApiError(401, "missing admin key: send 'Authorization: Bearer <admin key>'",
                       code="missing_api_key", headers=_UNAUTHORIZED)  # fmt: skip
    if not _matches(token, settings.admin_keys):
        raise ApiError(401, "invalid admin key", code="invalid_api_key", headers=_UNAUTHORIZED)


ApiKey = Depends(require_api_key)
AdminKey = Depends(require_admin_key)


def record_outcome(metrics: Metrics, served: ServedModel, error: BaseException | None) -> None:
    """A request finished inside the model (``error`` None) or failed there (a backend error,
    never bad input): keeps the model's health and its metrics current."""
    if error is None:
        served.record_success()
    else:
        served.record_failure(f"{type(error).__name__}: {error}")
    metrics.observe_model_outcome(served.name, error is None, served.healthy)
