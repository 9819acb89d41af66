"""``create_app(settings)``: the FastAPI app; ``uvicorn --factory service.app:create_app`` works.

Settings are read here, once (never at import time). Models load in the lifespan, in the
background, so /health/live answers while they load and /health/ready reports when they are done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from model_store import ModelRepository
from service import __version__
from service.api import embeddings, encode, errors, generate, health, logs, models, openapi
from service.api.middleware import (
    BodyLimitMiddleware,
    MetricsMiddleware,
    RequestContextMiddleware,
)
from service.engine.registry import ModelRegistry, parse_model_spec
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


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
    routers = [
        encode.router,
        embeddings.router,
        generate.router,
        models.router,
        models.admin_router,
        health.router,
    ]
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
