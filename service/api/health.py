"""Liveness, readiness and Prometheus metrics: open (no key), so probes and scrapers need none."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.api.deps import AppMetrics, Registry
from service.metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])


@router.get("/health/live")
async def live() -> dict[str, str]:
    """The process answers HTTP (models may still be loading)."""
    return {"status": "ok"}


@router.get("/health/ready", responses={503: {"description": "still loading, or nothing servable"}})
async def ready(registry: Registry) -> JSONResponse:
    """200 once start-up loading is done and at least one served model is healthy; ``details``
    says, per model, whether it is (README, "Readiness with several models")."""
    body = {
        "status": "ready" if registry.ready else "not_ready",
        "models": {served.name: served.version for served in registry.models()},
        "loading": not registry.started,
        "details": {
            served.name: {
                "version": served.version,
                "status": "healthy" if served.healthy else "unhealthy",
                "consecutive_failures": served.consecutive_failures,
                "last_error": served.last_error,
            }
            for served in registry.models()
        },
    }
    return JSONResponse(body, status_code=200 if registry.ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics(metrics: AppMetrics) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE)
