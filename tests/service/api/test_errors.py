"""Every error has the wire shape and the right status; bad input never yields a 500."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.engine.batcher import EncodeBatcher
from service.engine.models import LoadedModel
from service.metrics import Metrics
from service.settings import Settings
from tests.service.conftest import (
    ServiceStore,
    make_settings,
    run,
    running_app,
    wait_for,
    wait_ready,
)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "message", "param", "code", "request_id"}
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    assert body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "lin", "inputs": ""}, "inputs"),  # empty string
        ({"model": "lin", "inputs": []}, "inputs"),  # empty list
        ({"model": "lin", "inputs": ["ok", ""]}, "inputs"),  # an empty string inside a list
        ({"model": "lin", "inputs": 42}, "inputs"),  # wrong type
        ({"model": "lin", "inputs": [1, 2]}, "inputs"),  # token ids are not texts here
        ({"model": "lin", "inputs": "x", "pooling": "max"}, "pooling"),  # absurd parameter
        ({"model": "lin", "inputs": "x", "normalize": "yes"}, "normalize"),
        ({"model": "lin", "inputs": "x", "truncate": 1}, "truncate"),
        ({"model": "lin", "inputs": "x", "poolng": "cls"}, "poolng"),  # typo in a field name
        ({"model": "lin"}, "inputs"),  # missing field
        ({"model": 7, "inputs": "x"}, "model"),
        ({"model": "lin", "inputs": "x", "truncate": True, "chunk": True}, None),
        ({"model": "lin", "inputs": "x", "chunk": True, "pooling": "none"}, None),
    ],
)
def test_invalid_encode_bodies_are_422_naming_the_field(
    client: TestClient, body: dict[str, Any], param: str | None
) -> None:
    error = error_of(client.post("/v1/encode", json=body), 422)
    assert error["type"] == "invalid_request_error" and error["code"] == "validation_error"
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "lin", "input": ""},
        {"model": "lin", "input": []},
        {"model": "lin", "input": [[]]},
        {"model": "lin", "input": [-1]},
        {"model": "lin", "input": [["a"]]},
        {"model": "lin", "input": "x", "encoding_format": "hex"},
        {"model": "lin", "input": "x", "dimensions": 0},
    ],
)
def test_invalid_embedding_bodies_are_422(client: TestClient, body: dict[str, Any]) -> None:
    assert error_of(client.post("/v1/embeddings", json=body), 422)["param"] is not None


def test_token_id_outside_vocabulary_is_400(client: TestClient) -> None:
    error = error_of(
        client.post("/v1/embeddings", json={"model": "lin", "input": [[5, 10**6]]}), 400
    )
    assert error["code"] == "invalid_input" and error["param"] == "input[0]"


def test_unsupported_dimensions_is_400(client: TestClient) -> None:
    error = error_of(
        client.post("/v1/embeddings", json={"model": "lin", "input": "x", "dimensions": 8}), 400
    )
    assert error["param"] == "dimensions"


@pytest.mark.parametrize("route", ["/v1/encode", "/v1/embeddings"])
def test_unknown_model_is_404_model_not_found(client: TestClient, route: str) -> None:
    field = "inputs" if route == "/v1/encode" else "input"
    error = error_of(client.post(route, json={"model": "linformer-xl", field: "x"}), 404)
    assert (error["type"], error["code"], error["param"]) == (
        "not_found_error",
        "model_not_found",
        "model",
    )
    assert "lin" in error["message"]  # lists what is available


@pytest.mark.parametrize(
    "content",
    [
        b'{"model": "lin", "inputs": "caf\xe9"}',  # latin-1 byte: invalid UTF-8
        b'{"model": "lin", "inputs": ',  # truncated JSON
        b"\xff\xfe\x00garbage",
    ],
)
def test_unparsable_body_is_400_with_the_error_shape(client: TestClient, content: bytes) -> None:
    response = client.post(
        "/v1/encode", content=content, headers={"content-type": "application/json"}
    )
    assert error_of(response, 400)["code"] in ("invalid_json", "invalid_body")


def test_huge_body_is_413_from_content_length(client: TestClient) -> None:
    limit = client.app.state.settings.max_body_bytes  # type: ignore[attr-defined]
    body = json.dumps({"model": "lin", "inputs": "a" * (limit + 10)})
    error = error_of(
        client.post("/v1/encode", content=body, headers={"content-type": "application/json"}), 413
    )
    assert error["code"] == "request_too_large"


def test_huge_chunked_body_is_413(client: TestClient) -> None:
    limit = client.app.state.settings.max_body_bytes  # type: ignore[attr-defined]

    def stream() -> Iterator[bytes]:  # no Content-Length: transfer-encoding chunked
        yield b'{"model": "lin", "inputs": "'
        for _ in range(limit // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    response = client.post(
        "/v1/encode", content=stream(), headers={"content-type": "application/json"}
    )
    assert error_of(response, 413)["code"] == "request_too_large"


def test_unknown_route_and_method(client: TestClient) -> None:
    assert error_of(client.post("/v1/encodings", json={}), 404)["code"] == "route_not_found"
    assert error_of(client.get("/v1/encode"), 405)["code"] == "method_not_allowed"


def test_unexpected_error_is_500_without_internals(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def explode(self: EncodeBatcher, *args: object, **kwargs: object) -> None:
        raise RuntimeError("secret path /etc/passwd")

    monkeypatch.setattr(EncodeBatcher, "encode", explode)
    with TestClient(client.app, raise_server_exceptions=False) as quiet:
        error = error_of(quiet.post("/v1/encode", json={"model": "lin", "inputs": "x"}), 500)
    assert error["type"] == "server_error" and "secret" not in error["message"]


# ------------------------------------------------------------------------------ auth


@pytest.fixture(scope="module")
def keyed_client(service_store: ServiceStore) -> Iterator[TestClient]:
    settings = make_settings(
        service_store.root, models=["lin"], api_keys=["k-user"], admin_keys=["k-admin"]
    )
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "k-user"}]
)
def test_missing_or_wrong_key_is_401(keyed_client: TestClient, headers: dict[str, str]) -> None:
    response = keyed_client.post(
        "/v1/encode", json={"model": "lin", "inputs": "x"}, headers=headers
    )
    assert error_of(response, 401)["type"] == "authentication_error"
    assert response.headers["www-authenticate"] == "Bearer"
    assert error_of(keyed_client.get("/v1/models", headers=headers), 401)


@pytest.mark.parametrize("key", ["k-user", "k-admin"])
def test_valid_key_is_accepted(keyed_client: TestClient, key: str) -> None:
    response = keyed_client.post(
        "/v1/encode",
        json={"model": "lin", "inputs": "x"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200


def test_probes_and_metrics_need_no_key(keyed_client: TestClient) -> None:
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert keyed_client.get(path).status_code == 200


def test_user_key_cannot_use_admin_routes(keyed_client: TestClient) -> None:
    response = keyed_client.post("/v1/models/lin/load", headers={"Authorization": "Bearer k-user"})
    assert error_of(response, 401)["code"] == "invalid_api_key"


# ------------------------------------------------------------------------------ not ready


def test_not_ready_is_503_until_warm_up_answers(service_store: ServiceStore) -> None:
    gate = threading.Event()

    class SlowWarmup(EncodeBatcher):
        async def warmup(self) -> None:
            await asyncio.to_thread(gate.wait, 30)
            await super().warmup()

    app = create_app(make_settings(service_store.root, models=["lin"]))
    app.state.registry.factories = {"encode": SlowWarmup}
    with TestClient(app) as test_client:
        ready = test_client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
        assert test_client.get("/health/live").status_code == 200
        response = test_client.post("/v1/encode", json={"model": "lin", "inputs": "x"})
        error = error_of(response, 503)
        assert error["code"] == "model_not_ready" and response.headers["retry-after"] == "1"
        gate.set()
        wait_ready(test_client)
        assert (
            test_client.post("/v1/encode", json={"model": "lin", "inputs": "x"}).status_code == 200
        )


# ------------------------------------------------------------------------------ wrong task


class NullEngine:
    """Stands in for a generation engine: serves nothing, so only the routing is tested."""

    def __init__(self, model: LoadedModel, settings: Settings, metrics: Metrics) -> None:
        self.model = model

    async def start(self) -> None: ...
    async def warmup(self) -> None: ...
    async def stop(self) -> None: ...


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/encode", {"inputs": "x"}),
        ("/v1/embeddings", {"input": "x"}),
        ("/v1/embeddings", {"input": "x", "dimensions": 8}),  # a decoder has no embedding width
    ],
)
def test_encoding_a_generate_model_is_400_wrong_task(
    service_store: ServiceStore, route: str, body: dict[str, object]
) -> None:
    app = create_app(make_settings(service_store.root, models=["ali"]))
    app.state.registry.factories = {"encode": EncodeBatcher, "generate": NullEngine}
    with TestClient(app) as test_client:
        wait_ready(test_client)
        error = error_of(test_client.post(route, json={"model": "ali", **body}), 400)
    assert error["code"] == "wrong_task" and "generate model" in error["message"]


# ------------------------------------------------------------------------------ queue full


def test_queue_full_is_429_with_retry_after(service_store: ServiceStore) -> None:
    settings = make_settings(
        service_store.root,
        models=["lin"],
        max_queue_requests=1,
        max_wait_ms=0.0,
        retry_after_seconds=3,
    )
    app = create_app(settings)
    gate, entered = threading.Event(), threading.Event()

    async def main() -> tuple[list[int], httpx.Response, str]:
        async with running_app(app) as http:
            backend = app.state.registry.get("lin").loaded.backend
            real_run = backend.run

            def held_run(inputs: dict[str, Any]) -> dict[str, Any]:
                entered.set()
                gate.wait(30)
                return real_run(inputs)  # type: ignore[no-any-return]

            backend.run = held_run
            body = {"model": "lin", "inputs": "x"}
            first = asyncio.create_task(http.post("/v1/encode", json=body))
            await asyncio.to_thread(entered.wait, 30)  # first is in the backend, queue empty
            second = asyncio.create_task(http.post("/v1/encode", json=body))
            depth = app.state.metrics.registry.get_sample_value
            # second is waiting in the queue: it is full
            await wait_for(lambda: depth("longhaul_queue_depth", {"model": "lin"}) == 1, 30)
            rejected = await http.post("/v1/encode", json=body)
            gate.set()
            statuses = [r.status_code for r in await asyncio.gather(first, second)]
            return statuses, rejected, (await http.get("/metrics")).text

    statuses, rejected, metrics = run(main())
    assert statuses == [200, 200]
    error = error_of(rejected, 429)
    assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
    assert rejected.headers["retry-after"] == "3"
    assert 'longhaul_requests_rejected_total{model="lin",reason="queue_full"} 1.0' in metrics
