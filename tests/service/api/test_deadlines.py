"""Deadlines: a request past LONGHAUL_REQUEST_TIMEOUT_SECONDS or its X-Request-Timeout is
cancelled wherever it is (queued, prefilling, decoding, waiting for or in an encode batch), its
slot and cache are freed within a step, and it gets 504 deadline_exceeded (a started stream: a
last error event)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.backends.base import Backend
from service.engine.batcher import EncodeBatcher
from service.engine.generation import GenerationEngine
from tests.service.conftest import ServiceStore, make_settings, running_app, wait_for

PROMPT = "def parse(self, text):\n    return"


class Gate(Backend):
    """Holds every forward pass until opened; then each takes at least ``delay`` seconds.
    Counts the passes that started, so a test can tell what ran after a deadline."""

    provider = "gate"

    def __init__(self, inner: Backend, delay: float = 0.0) -> None:
        self.inner = inner
        self.delay = delay
        self.open = threading.Event()
        self.started = 0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.started += 1
        self.open.wait(timeout=30)
        time.sleep(self.delay)
        return self.inner.run(inputs)


def deadline_count(app: Any, model: str, stage: str) -> float:
    value = app.state.metrics.registry.get_sample_value(
        "longhaul_deadline_exceeded_total", {"model": model, "stage": stage}
    )
    return float(value or 0.0)


def timeout_error(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 504, response.text
    error: dict[str, Any] = response.json()["error"]
    assert (error["type"], error["code"]) == ("timeout_error", "deadline_exceeded")
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def gated(app: Any, model: str, delay: float = 0.0) -> Gate:
    served = app.state.registry.get(model)
    gate = Gate(served.loaded.backend, delay)
    served.loaded.backend = gate  # both engines read model.backend on every pass
    return gate


def engine_of(app: Any) -> GenerationEngine:
    engine = app.state.registry.get("ali").engine
    assert isinstance(engine, GenerationEngine)
    return engine


def freed(engine: GenerationEngine) -> bool:
    stats = engine.stats()
    return stats.running == 0 and stats.waiting == 0 and stats.kv_cache_bytes == 0


def test_generation_cancelled_while_queued_prefilling_and_decoding(
    service_store: ServiceStore,
) -> None:
    app = create_app(make_settings(service_store.root, models=["ali"], max_num_seqs=1))

    async def main() -> None:
        async with running_app(app) as http:
            engine = engine_of(app)
            gate = gated(app, "ali")
            body = {"model": "ali", "prompt": PROMPT, "max_new_tokens": 40}
            short = {"X-Request-Timeout": "0.4"}
            # Prefill: admitted, its first forward pass held by the gate.
            first = asyncio.create_task(http.post("/v1/generate", json=body, headers=short))
            await wait_for(lambda: engine.stats().running == 1 and gate.started == 1)
            # Queued: the only slot is taken.
            second = asyncio.create_task(http.post("/v1/generate", json=body, headers=short))
            assert "queued" in timeout_error(await second)["message"]
            assert engine.stats().waiting == 0  # left the queue at once, not at a step
            assert "prefill" in timeout_error(await first)["message"]
            gate.open.set()
            await wait_for(lambda: freed(engine))
            # The held pass was the last one: the cancelled prompt's next chunk never ran, and
            # the queued request never reached the model.
            assert gate.started == 1
            assert deadline_count(app, "ali", "queued") == 1
            assert deadline_count(app, "ali", "prefill") == 1
            # Decode: every pass takes 50 ms, 40 tokens cannot make 0.6 s.
            gate.delay = 0.05
            started = time.monotonic()
            response = await http.post(
                "/v1/generate", json=body, headers={"X-Request-Timeout": "0.6"}
            )
            passes_at_deadline = gate.started
            assert "decode" in timeout_error(response)["message"]
            assert time.monotonic() - started < 40 * 0.05
            await wait_for(lambda: freed(engine))
            # Freed within a step: at most the pass that was starting when the deadline fired.
            assert gate.started - passes_at_deadline <= 1
            assert deadline_count(app, "ali", "decode") == 1
            # The engine goes on serving.
            gate.delay = 0.0
            ok = await http.post("/v1/generate", json={**body, "max_new_tokens": 2})
            assert ok.status_code == 200, ok.text

    asyncio.run(main())


def test_a_stream_past_its_deadline_before_its_first_event_gets_the_504(
    service_store: ServiceStore,
) -> None:
    """Nothing was sent yet, so the status can still say it: 504 and the error shape, as for a
    request that does not stream; the sequence is freed."""
    app = create_app(make_settings(service_store.root, models=["ali"], max_num_seqs=1))

    async def main() -> None:
        async with running_app(app) as http:
            engine = engine_of(app)
            gate = gated(app, "ali")  # every forward pass held: no first token
            short = {"X-Request-Timeout": "0.4"}
            # The first is admitted and held in its prefill; the second waits for the one slot,
            # which the held pass keeps until it returns.
            for path, body, stage in [
                ("/v1/generate", {"prompt": PROMPT, "max_new_tokens": 4}, "prefill"),
                ("/v1/completions", {"prompt": PROMPT, "max_tokens": 4}, "queued"),
            ]:
                response = await http.post(
                    path, json={"model": "ali", "stream": True, **body}, headers=short
                )
                assert response.headers["content-type"].startswith("application/json")
                assert stage in timeout_error(response)["message"]
            gate.open.set()
            await wait_for(lambda: freed(engine))
            assert deadline_count(app, "ali", "prefill") == 1
            assert deadline_count(app, "ali", "queued") == 1
            ok = await http.post(
                "/v1/generate", json={"model": "ali", "prompt": PROMPT, "stream": True}
            )
            assert ok.status_code == 200 and ok.text.endswith("data: [DONE]\n\n"), ok.text

    asyncio.run(main())


def test_a_started_stream_ends_with_a_deadline_event(service_store: ServiceStore) -> None:
    app = create_app(make_settings(service_store.root, models=["ali"]))

    async def main() -> None:
        async with running_app(app) as http:
            engine = engine_of(app)
            gate = gated(app, "ali", delay=0.05)
            gate.open.set()
            for path, body in [
                ("/v1/generate", {"prompt": PROMPT, "max_new_tokens": 40}),
                ("/v1/completions", {"prompt": PROMPT, "max_tokens": 40}),
            ]:
                response = await http.post(
                    path, json={"model": "ali", "stream": True, **body},
                    headers={"X-Request-Timeout": "0.8", "X-Request-Id": "s-1"},
                )  # fmt: skip
                assert response.status_code == 200
                events = [e.removeprefix("data: ") for e in response.text.strip().split("\n\n")]
                assert "[DONE]" not in events
                assert len(events) >= 2  # tokens came before the deadline
                last = json.loads(events[-1])["error"]
                assert (last["code"], last["request_id"]) == ("deadline_exceeded", "s-1")
                await wait_for(lambda: freed(engine))
            assert deadline_count(app, "ali", "decode") == 2

    asyncio.run(main())


def test_encode_cancelled_in_its_batch_and_in_the_queue(service_store: ServiceStore) -> None:
    app = create_app(make_settings(service_store.root, models=["lin"], max_batch_size=1))

    async def main() -> None:
        async with running_app(app) as http:
            engine = app.state.registry.get("lin").engine
            assert isinstance(engine, EncodeBatcher)
            gate = gated(app, "lin")
            short = {"X-Request-Timeout": "0.4"}
            body = {"model": "lin", "inputs": "value = 42"}
            running = asyncio.create_task(http.post("/v1/encode", json=body, headers=short))
            await wait_for(lambda: gate.started == 1)
            queued = asyncio.create_task(http.post("/v1/embeddings", json={
                "model": "lin", "input": "x"}, headers=short))  # fmt: skip
            await wait_for(lambda: engine._waiting_requests == 1)
            timeout_error(await running)
            timeout_error(await queued)
            assert deadline_count(app, "lin", "encode") == 2
            gate.open.set()
            await wait_for(lambda: engine._waiting_requests == 0)
            ok = await http.post("/v1/encode", json=body)
            assert ok.status_code == 200, ok.text
            # The held batch, then the new request: the queued one was dropped, never run.
            assert gate.started == 2

    asyncio.run(main())


def test_the_server_default_applies_and_a_header_cannot_extend_it(
    service_store: ServiceStore,
) -> None:
    settings = make_settings(service_store.root, models=["ali"], request_timeout_seconds=0.4)
    app = create_app(settings)

    async def main() -> None:
        async with running_app(app) as http:
            gate = gated(app, "ali")
            body = {"model": "ali", "prompt": PROMPT, "max_new_tokens": 4}
            timeout_error(await http.post("/v1/generate", json=body))
            longer = await http.post("/v1/generate", json=body, headers={"X-Request-Timeout": "60"})
            assert "0.4 s" in timeout_error(longer)["message"]
            gate.open.set()
            await wait_for(lambda: freed(engine_of(app)))

    asyncio.run(main())


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf", "nan", "1e999"])
def test_an_invalid_timeout_header_is_422(service_store: ServiceStore, value: str) -> None:
    app = create_app(make_settings(service_store.root, models=["lin"], warmup=False))

    async def main() -> None:
        async with running_app(app) as http:
            response = await http.post(
                "/v1/encode", json={"model": "lin", "inputs": "x"},
                headers={"X-Request-Timeout": value},
            )  # fmt: skip
            assert response.status_code == 422, response.text
            assert response.json()["error"]["param"] == "header.x-request-timeout"

    asyncio.run(main())
