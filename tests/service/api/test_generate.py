"""POST /v1/generate and POST /v1/completions through the app: shapes, SSE, validation, errors,
admission (429). The live-socket behaviour (openai client, disconnects) is in test_generate_live."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.backends.base import Backend
from service.engine.generation import GenerationEngine
from tests.service.conftest import ServiceStore, make_settings, running_app, wait_ready

LIMIT = 64  # max_new_tokens_limit for these tests
PROMPT = "def parse(self, text):\n    return"


@pytest.fixture(scope="module")
def client(service_store: ServiceStore) -> Iterator[TestClient]:
    settings = make_settings(service_store.root, models=["ali", "lin"], max_new_tokens_limit=LIMIT)
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client


def engine_of(client: TestClient | httpx.AsyncClient, app: Any = None) -> GenerationEngine:
    app = app or client.app  # type: ignore[union-attr]
    engine = app.state.registry.get("ali").engine
    assert isinstance(engine, GenerationEngine)
    return engine


def sse_events(body: str) -> list[str]:
    """The data fields of an event stream, checking the framing on the way."""
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: ") :] for e in events]


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"type", "message", "param", "code", "request_id"}
    assert error["request_id"] == response.headers["x-request-id"]
    return error


# ----------------------------------------------------------------------------- /v1/generate


def test_generate_returns_text_finish_reason_and_usage(client: TestClient) -> None:
    body = {"model": "ali", "prompt": PROMPT, "max_new_tokens": 7, "temperature": 0}
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert set(data) == {"model", "text", "finish_reason", "usage"}
    assert data["model"] == "ali"
    assert data["finish_reason"] in ("length", "stop")
    tokenizer = client.app.state.registry.get("ali").loaded.tokenizer  # type: ignore[attr-defined]
    assert data["usage"]["prompt_tokens"] == len(tokenizer.encode(PROMPT).ids)
    assert 1 <= data["usage"]["completion_tokens"] <= 7
    assert client.post("/v1/generate", json=body).json() == data  # greedy: deterministic


def test_generate_seed_makes_sampling_reproducible(client: TestClient) -> None:
    body = {"model": "ali", "prompt": PROMPT, "max_new_tokens": 12, "seed": 42}
    first = client.post("/v1/generate", json=body).json()
    assert client.post("/v1/generate", json=body).json() == first


def test_generate_stream_is_sse_ending_with_done(client: TestClient) -> None:
    body = {"model": "ali", "prompt": PROMPT, "max_new_tokens": 9, "temperature": 0}
    expected = client.post("/v1/generate", json=body).json()
    response = client.post("/v1/generate", json={**body, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["model"] == "ali" for c in chunks)
    assert "".join(c["text"] for c in chunks) == expected["text"]
    assert chunks[-1]["finish_reason"] == expected["finish_reason"]
    assert chunks[-1]["usage"] == expected["usage"]
    assert all(c.get("finish_reason") is None for c in chunks[:-1])


def test_generate_stop_string_is_excluded(client: TestClient) -> None:
    body = {"model": "ali", "prompt": PROMPT, "max_new_tokens": 20, "seed": 1}
    text = client.post("/v1/generate", json=body).json()["text"]
    assert len(text) >= 4  # seeded, so stable; a stop string needs some text to cut
    stop = text[len(text) // 2 :][:2]
    stopped = client.post("/v1/generate", json={**body, "stop": [stop]}).json()
    assert stopped["text"] == text[: text.index(stop)]
    assert stopped["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", -3),
        ("max_new_tokens", LIMIT + 1),
        ("temperature", -0.5),
        ("top_p", 1.5),
        ("top_p", 0.0),
        ("top_k", -1),
        ("seed", -1),
        ("stop", [""]),
    ],
)
def test_generate_invalid_parameters_are_422_naming_the_field(
    client: TestClient, field: str, value: object
) -> None:
    body = {"model": "ali", "prompt": PROMPT, field: value}
    error = error_of(client.post("/v1/generate", json=body), 422)
    assert error["code"] == "validation_error"
    assert error["param"] is not None and error["param"].startswith(field)


def test_prompt_plus_new_tokens_beyond_max_context_is_400(client: TestClient) -> None:
    max_context = client.app.state.registry.get("ali").loaded.manifest.max_context  # type: ignore[attr-defined]
    long_prompt = "x = 1\n" * max_context  # well over max_context tokens
    body = {"model": "ali", "prompt": long_prompt, "max_new_tokens": 4}
    error = error_of(client.post("/v1/generate", json=body), 400)
    assert error["code"] == "context_length_exceeded"
    assert str(max_context) in error["message"]


def test_unknown_model_is_404_and_encode_model_is_400(client: TestClient) -> None:
    body = {"prompt": PROMPT, "max_new_tokens": 2}
    assert (
        error_of(client.post("/v1/generate", json={**body, "model": "nope"}), 404)["code"]
        == "model_not_found"
    )
    assert (
        error_of(client.post("/v1/generate", json={**body, "model": "lin"}), 400)["code"]
        == "wrong_task"
    )


def test_misspelt_field_is_422(client: TestClient) -> None:
    body = {"model": "ali", "prompt": PROMPT, "max_tokens": 3}  # the OpenAI name, wrong route
    assert error_of(client.post("/v1/generate", json=body), 422)["param"] == "max_tokens"


# ----------------------------------------------------------------------------- /v1/completions


def test_completion_has_the_openai_shape(client: TestClient) -> None:
    body = {"model": "ali", "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    data = client.post("/v1/completions", json=body).json()
    assert set(data) == {"id", "object", "created", "model", "choices", "usage"}
    assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
    assert isinstance(data["created"], int) and data["model"] == "ali"
    (choice,) = data["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    native = client.post(
        "/v1/generate",
        json={"model": "ali", "prompt": PROMPT, "max_new_tokens": 5, "temperature": 0},
    ).json()
    assert choice["text"] == native["text"]
    assert choice["finish_reason"] == native["finish_reason"]


def test_completion_accepts_token_ids_and_a_single_stop_string(client: TestClient) -> None:
    tokenizer = client.app.state.registry.get("ali").loaded.tokenizer  # type: ignore[attr-defined]
    ids = tokenizer.encode(PROMPT).ids
    by_text = {"model": "ali", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    by_ids = {**by_text, "prompt": ids}
    assert (
        client.post("/v1/completions", json=by_ids).json()["choices"]
        == client.post("/v1/completions", json=by_text).json()["choices"]
    )
    error = error_of(client.post("/v1/completions", json={**by_ids, "prompt": [5, 10**6]}), 400)
    assert error["param"] == "prompt"


def test_completion_stream_chunks_and_usage(client: TestClient) -> None:
    body = {"model": "ali", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    expected = client.post("/v1/completions", json=body).json()
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(client.post("/v1/completions", json=stream_body).text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert all(c["object"] == "text_completion" for c in chunks)
    *content, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == expected["usage"]
    assert "".join(c["choices"][0]["text"] for c in content) == expected["choices"][0]["text"]
    assert content[-1]["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert all("usage" not in c for c in content)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": 1}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ],
)
def test_completion_unsupported_parameters_are_400(
    client: TestClient, extra: dict[str, Any], param: str
) -> None:
    body = {"model": "ali", "prompt": PROMPT, "max_tokens": 2, **extra}
    error = error_of(client.post("/v1/completions", json=body), 400)
    assert (error["code"], error["param"]) == ("unsupported_parameter", param)


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", 0), ("max_tokens", LIMIT + 1), ("top_p", 2.0), ("temperature", -1.0)],
)
def test_completion_invalid_parameters_are_422(
    client: TestClient, field: str, value: object
) -> None:
    body = {"model": "ali", "prompt": PROMPT, field: value}
    assert error_of(client.post("/v1/completions", json=body), 422)["param"] == field


# ----------------------------------------------------------------------------- admission


class Gate(Backend):
    """Holds every forward pass until released."""

    provider = "gate"

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.open = threading.Event()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.open.wait(timeout=30)
        return self.inner.run(inputs)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def test_full_queue_is_429_with_retry_after(service_store: ServiceStore) -> None:
    settings = make_settings(
        service_store.root, models=["ali"], max_num_seqs=1, max_waiting_sequences=1
    )
    app = create_app(settings)

    async def main() -> None:
        async with running_app(app) as http:
            served = app.state.registry.get("ali")
            gate = Gate(served.loaded.backend)
            served.loaded.backend = gate  # the engine reads model.backend on every step
            engine = engine_of(http, app)
            body = {"model": "ali", "prompt": PROMPT, "max_new_tokens": 3}
            first = asyncio.create_task(http.post("/v1/generate", json=body))
            await until(lambda: engine.stats().running == 1)
            second = asyncio.create_task(http.post("/v1/generate", json=body))
            await until(lambda: engine.stats().waiting == 1)
            refused = await http.post("/v1/generate", json=body)
            error = error_of(refused, 429)
            assert error["type"] == "rate_limit_error"
            assert refused.headers["retry-after"] == str(settings.retry_after_seconds)
            gate.open.set()
            assert (await first).status_code == 200
            assert (await second).status_code == 200
            served.loaded.backend = gate.inner

    asyncio.run(main())
