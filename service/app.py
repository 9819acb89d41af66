"""``create_app(settings)``: the FastAPI app; ``uvicorn --factory service.app:create_app`` works.

Settings are read here, once (never at import time). Models load in the lifespan, in the
background, so /health/live answers while they load and /health/ready reports when they are done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from model_store import ModelRepository
from service import __version__
from service.api import embeddings, encode, errors, health, logs, models, openapi
from service.api.middleware import (
    BodyLimitMiddleware,
    MetricsMiddleware,
    RequestContextMiddleware,
)
from service.engine.registry import ModelRegistry, parse_model_spec
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


def generation_router() -> APIRouter | None:
    """The generation routes once service/api/generate.py exists (written separately)."""
    try:
        from service.api.generate import router  # type: ignore[import-not-found,unused-ignore]
    except ModuleNotFoundError as exc:
        if exc.name != "service.api.generate":
            raise
        return None
    generate_router: APIRouter = router
    return generate_router


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    logs.configure(settings.log_level, settings.log_format)
    repo = ModelRepository(settings.store)  # fails fast on a missing store
    metrics = Metrics()
    registry = ModelRegistry(repo, settings, metrics)
    specs = [parse_model_spec(s) for s in settings.models] or [
        (n, None) for n in repo.list_models()
    ]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if "generate" not in registry.factories:
            log.warning(
                "service/engine/generation.py is not available: generate models are not served"
            )
        loading = asyncio.create_task(registry.start(specs), name="load-models")
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await registry.close()

    app = FastAPI(title="Longhaul", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.registry = registry
    errors.install(app)
    routers = [encode.router, embeddings.router, models.router, models.admin_router, health.router]
    generate = generation_router()
    if generate is not None:
        routers.append(generate)
    for router in routers:
        app.include_router(router)
    openapi.install(app, settings)
    routes = [route for router in routers for route in router.routes]
    # Added last = outermost: metrics see the 413s that the body limit answers.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        MetricsMiddleware, metrics=metrics, is_known_model=registry.known, routes=routes
    )
    # Outermost: every answer, the body limit's 413 included, carries the request id.
    app.add_middleware(RequestContextMiddleware, routes=routes)
    return app
