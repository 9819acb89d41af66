"""Request ids (X-Request-Id) on every answer and in error bodies; one access line per request;
``LONGHAUL_LOG_FORMAT=json`` gives JSON lines from a real ``python -m service``."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.logs import ACCESS_LOGGER, JsonFormatter, RequestIdFilter, TextFormatter
from service.app import create_app
from tests.service.conftest import ServiceStore, free_port, make_settings, wait_ready

GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def client(service_store: ServiceStore) -> Iterator[TestClient]:
    settings = make_settings(service_store.root, models=["lin", "ali"], max_new_tokens_limit=16)
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ACCESS_LOGGER]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/encode", {"model": "lin", "inputs": "x = 1"}, 200),
        ("POST", "/v1/encode", {"model": "lin", "inputs": ""}, 422),
        ("POST", "/v1/encode", {"model": "nope", "inputs": "x"}, 404),
        ("POST", "/v1/generate", {"model": "lin", "prompt": "x"}, 400),
        ("GET", "/v1/models", None, 200),
        ("GET", "/no/such/route", None, 404),
        ("DELETE", "/v1/encode", None, 405),
        ("GET", "/health/ready", None, 200),
        ("GET", "/metrics", None, 200),
    ],
)
def test_every_answer_carries_a_generated_request_id(
    client: TestClient, method: str, path: str, body: dict[str, Any] | None, status: int
) -> None:
    response = client.request(method, path, json=body)
    assert response.status_code == status, response.text
    request_id = response.headers["x-request-id"]
    assert GENERATED.fullmatch(request_id)
    if status >= 400:
        assert response.json()["error"]["request_id"] == request_id


def test_a_client_request_id_is_kept(client: TestClient) -> None:
    for given in ("trace-7f3a", "a" * 128, "req:1/2@x"):
        response = client.post("/v1/encode", json={"model": "lin", "inputs": ""},
                               headers={"X-Request-Id": given})  # fmt: skip
        assert response.headers["x-request-id"] == given
        assert response.json()["error"]["request_id"] == given


@pytest.mark.parametrize("given", ["", "a" * 129, "has space", "tab\there", "ünïcode"])
def test_an_unusable_request_id_is_replaced(client: TestClient, given: str) -> None:
    response = client.get("/v1/models", headers={"X-Request-Id": given.encode("utf-8")})
    assert GENERATED.fullmatch(response.headers["x-request-id"])


def test_a_413_from_the_body_limit_has_the_request_id(client: TestClient) -> None:
    limit = client.app.state.settings.max_body_bytes  # type: ignore[attr-defined]
    response = client.post("/v1/encode", content=b"x" * (limit + 1),
                           headers={"content-type": "application/json",
                                    "x-request-id": "big-1"})  # fmt: skip
    assert response.status_code == 413
    assert response.headers["x-request-id"] == "big-1"
    assert response.json()["error"]["request_id"] == "big-1"


def test_one_access_line_per_request_with_its_figures(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)

    def post(path: str, body: dict[str, Any], request_id: str) -> None:
        client.post(path, json=body, headers={"x-request-id": request_id})

    post("/v1/encode", {"model": "lin", "inputs": ["a b c", "d"]}, "enc-1")
    generate = {"model": "ali", "prompt": "def f(", "max_new_tokens": 5, "temperature": 0}
    post("/v1/generate", generate, "gen-1")
    streamed = {"model": "ali", "prompt": "x", "stream": True, "max_new_tokens": 4}
    with client.stream(
        "POST", "/v1/generate", json=streamed, headers={"x-request-id": "sse-1"}
    ) as stream:
        stream.read()
    post("/v1/encode", {"model": "nope", "inputs": "x"}, "bad-1")
    by_id = {r.request_id: r for r in access_records(caplog)}  # type: ignore[attr-defined]
    assert [r.request_id for r in access_records(caplog)] == ["enc-1", "gen-1", "sse-1", "bad-1"]  # type: ignore[attr-defined]
    enc, gen, sse, bad = (vars(by_id[k]) for k in ("enc-1", "gen-1", "sse-1", "bad-1"))
    assert (enc["route"], enc["model"], enc["status"]) == ("/v1/encode", "lin", 200)
    assert enc["prompt_tokens"] > 0 and enc["completion_tokens"] is None
    assert 0 <= enc["queue_ms"] <= enc["total_ms"]
    assert (gen["route"], gen["model"], gen["status"]) == ("/v1/generate", "ali", 200)
    assert gen["prompt_tokens"] > 0 and gen["completion_tokens"] == 5
    assert 0 <= gen["queue_ms"] <= gen["total_ms"]
    assert sse["status"] == 200 and 1 <= sse["completion_tokens"] <= 4
    assert (bad["status"], bad["prompt_tokens"], bad["queue_ms"]) == (404, None, None)
    text = TextFormatter().format(by_id["enc-1"])
    assert " INFO service.access: POST /v1/encode 200 request_id=enc-1 method=POST " in text
    assert "route=/v1/encode" in text and "model=lin" in text and "total_ms=" in text
    assert "completion_tokens" not in text  # fields that do not apply are left out of text


def test_records_emitted_during_a_request_carry_its_id(client: TestClient) -> None:
    """The filter reads the context variable the middleware sets for the request's task."""
    from service.api.logs import current_request_id

    record = logging.LogRecord("x", logging.INFO, "", 0, "inside", None, None)
    token = current_request_id.set("ctx-1")
    try:
        RequestIdFilter().filter(record)
    finally:
        current_request_id.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "ctx-1" and line["message"] == "inside"


@pytest.mark.slow
def test_json_log_lines_from_a_real_server(service_store: ServiceStore) -> None:
    """``python -m service`` with LONGHAUL_LOG_FORMAT=json: every stderr line is JSON, the access
    line has the documented fields, uvicorn's own lines are JSON too."""
    port = free_port()
    env = {**os.environ, "LONGHAUL_LOG_FORMAT": "json", "LONGHAUL_MODELS": '["lin", "ali"]',
           "LONGHAUL_INTRA_OP_THREADS": "1"}  # fmt: skip
    command = [sys.executable, "-m", "service", "--store", str(service_store.root),
               "--port", str(port)]  # fmt: skip
    server = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        body = {"model": "ali", "prompt": "def f(", "max_new_tokens": 3, "temperature": 0}
        response = httpx.post(f"{url}/v1/generate", json=body, headers={"x-request-id": "json-1"})
        assert response.status_code == 200
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=60)
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]  # all JSON
    access = [line for line in lines if line.get("request_id") == "json-1"]
    assert len(access) == 1, stderr[-3000:]
    line = access[0]
    assert line["logger"] == ACCESS_LOGGER and line["level"] == "info"
    assert (line["route"], line["model"], line["status"]) == ("/v1/generate", "ali", 200)
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] == 3
    assert 0 <= line["queue_ms"] <= line["total_ms"]
    assert any(line["logger"].startswith("uvicorn") for line in lines)
