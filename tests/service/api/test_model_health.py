"""A model whose backend raises on every call is reported unhealthy (/v1/models, /health/ready
details, metrics) while the other models keep serving; a success makes it healthy again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI

from service.app import create_app
from service.backends.base import Backend
from service.engine.registry import UNHEALTHY_AFTER
from tests.service.conftest import ServiceStore, make_settings


class Broken(Backend):
    provider = "broken"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise RuntimeError("device lost")


@asynccontextmanager
async def running_app(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Lifespan + an in-process client that gets the 500 instead of the re-raised exception."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            deadline = time.monotonic() + 60
            while (await http.get("/health/ready")).status_code != 200:
                assert time.monotonic() < deadline, "app not ready"
                await asyncio.sleep(0.02)
            yield http


def sample(app: Any, name: str, labels: dict[str, str]) -> float:
    return float(app.state.metrics.registry.get_sample_value(name, labels) or 0.0)


def test_a_failing_model_is_unhealthy_and_the_others_serve(service_store: ServiceStore) -> None:
    app = create_app(make_settings(service_store.root, models=["lin", "sha", "ali"]))

    async def main() -> None:
        async with running_app(app) as http:
            lin, ali = app.state.registry.get("lin"), app.state.registry.get("ali")
            working = {"lin": lin.loaded.backend, "ali": ali.loaded.backend}
            lin.loaded.backend = Broken()
            for _ in range(UNHEALTHY_AFTER):
                failed = await http.post("/v1/encode", json={"model": "lin", "inputs": "x"})
                assert failed.status_code == 500
                assert failed.json()["error"]["code"] == "internal_error"
            cards = {c["id"]: c for c in (await http.get("/v1/models")).json()["data"]}
            assert {k: c["status"] for k, c in cards.items()} == {
                "lin": "unhealthy", "sha": "healthy", "ali": "healthy"}  # fmt: skip
            ready = await http.get("/health/ready")
            assert ready.status_code == 200  # other models serve: the replica stays in service
            details = ready.json()["details"]["lin"]
            assert (details["status"], details["consecutive_failures"]) == (
                "unhealthy", UNHEALTHY_AFTER)  # fmt: skip
            assert "device lost" in details["last_error"]
            assert sample(app, "longhaul_model_failures_total", {"model": "lin"}) == 3
            assert sample(app, "longhaul_model_healthy", {"model": "lin"}) == 0
            # The others keep serving.
            ok = await http.post("/v1/encode", json={"model": "sha", "inputs": "x"})
            assert ok.status_code == 200
            generated = await http.post(
                "/v1/generate", json={"model": "ali", "prompt": "x", "max_new_tokens": 2}
            )
            assert generated.status_code == 200
            assert sample(app, "longhaul_model_healthy", {"model": "ali"}) == 1
            # A generation model failing, too: every forward pass raises.
            ali.loaded.backend = Broken()
            for _ in range(UNHEALTHY_AFTER):
                failed = await http.post(
                    "/v1/generate", json={"model": "ali", "prompt": "x", "max_new_tokens": 2}
                )
                assert failed.status_code == 500
            assert (await http.get("/v1/models/ali")).json()["status"] == "unhealthy"
            # Only sha is healthy now; once it is gone too, the replica is not ready.
            assert (await http.get("/health/ready")).status_code == 200
            # Repaired: the next success makes each healthy again.
            lin.loaded.backend, ali.loaded.backend = working["lin"], working["ali"]
            assert (await http.post("/v1/encode", json={"model": "lin", "inputs": "x"})).is_success
            assert (await http.get("/v1/models/lin")).json()["status"] == "healthy"
            assert sample(app, "longhaul_model_healthy", {"model": "lin"}) == 1

    asyncio.run(main())


def test_not_ready_when_every_model_is_unhealthy(service_store: ServiceStore) -> None:
    app = create_app(make_settings(service_store.root, models=["lin"]))

    async def main() -> None:
        async with running_app(app) as http:
            app.state.registry.get("lin").loaded.backend = Broken()
            for _ in range(UNHEALTHY_AFTER):
                await http.post("/v1/encode", json={"model": "lin", "inputs": "x"})
            ready = await http.get("/health/ready")
            assert ready.status_code == 503
            assert ready.json()["details"]["lin"]["status"] == "unhealthy"

    asyncio.run(main())
