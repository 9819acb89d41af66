"""Generation over a real socket: the official openai client (streaming included) and clients
that disconnect early, against uvicorn on a loopback port (the ``live_server`` fixture)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from service.backends.base import Backend
from service.engine.generation import GenerationEngine
from tests.service.conftest import LiveServer

PROMPT = "def parse(self, text):\n    return"


@pytest.fixture
def oai(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)


def native(live_server: LiveServer, **body: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{live_server.url}/v1/generate", json={"model": "ali", **body}, timeout=60
    )
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def test_openai_client_completion(live_server: LiveServer, oai: openai.OpenAI) -> None:
    completion = oai.completions.create(model="ali", prompt=PROMPT, max_tokens=8, temperature=0)
    expected = native(live_server, prompt=PROMPT, max_new_tokens=8, temperature=0)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == expected["text"]
    assert completion.choices[0].finish_reason == expected["finish_reason"]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert completion.usage.prompt_tokens == expected["usage"]["prompt_tokens"]


def test_openai_client_streaming_completion(live_server: LiveServer, oai: openai.OpenAI) -> None:
    expected = native(live_server, prompt=PROMPT, max_new_tokens=10, seed=3)
    stream = oai.completions.create(
        model="ali", prompt=PROMPT, max_tokens=10, seed=3, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected["text"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == expected["finish_reason"] and not any(finishes[:-1])
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == expected["usage"]["completion_tokens"]


def test_openai_client_sees_typed_errors(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        oai.completions.create(model="ali", prompt=PROMPT, max_tokens=2, n=2)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.completions.create(model="ali", prompt=PROMPT, max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)


# ----------------------------------------------------------------------------- disconnects


class Slow(Backend):
    """Makes every forward pass take at least ``delay`` seconds, so a generation is still
    running when the client leaves, however fast the machine is."""

    provider = "slow"

    def __init__(self, inner: Backend, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(self.delay)
        return self.inner.run(inputs)


@pytest.fixture
def slow_engine(live_server: LiveServer) -> Iterator[GenerationEngine]:
    served = live_server.app.state.registry.get("ali")
    engine = served.engine
    assert isinstance(engine, GenerationEngine)
    fast = served.loaded.backend
    served.loaded.backend = Slow(fast, delay=0.005)  # read by the engine on every step
    try:
        yield engine
    finally:
        served.loaded.backend = fast


def generated_tokens(live_server: LiveServer) -> float:
    value = live_server.app.state.metrics.registry.get_sample_value(
        "longhaul_generated_tokens_total", {"model": "ali"}
    )
    return float(value or 0.0)


def wait_until_freed(engine: GenerationEngine, timeout: float = 5.0) -> float:
    """Seconds until the engine holds no sequence and no cache."""
    started = time.monotonic()
    while True:
        stats = engine.stats()
        if stats.running == 0 and stats.waiting == 0 and stats.kv_cache_bytes == 0:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"not freed: {stats}"
        time.sleep(0.005)


def running_gauge(live_server: LiveServer) -> str:
    text = httpx.get(f"{live_server.url}/metrics").text
    return next(line for line in text.splitlines() if line.startswith(
        'longhaul_running_sequences{model="ali"}'
    ))  # fmt: skip


def test_stream_closed_after_two_chunks_cancels_and_frees(
    live_server: LiveServer, slow_engine: GenerationEngine
) -> None:
    before = generated_tokens(live_server)
    # Greedy (no early <eos>): the stream is certainly still running when the client leaves.
    body = {
        "model": "ali",
        "prompt": PROMPT,
        "max_new_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    url = f"{live_server.url}/v1/generate"
    with httpx.Client(timeout=30) as http, http.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 2:
                break
        assert slow_engine.stats().running == 1  # still generating when we leave
    # Leaving the block closed the connection mid-stream; the rest would take >= 2 s.
    assert wait_until_freed(slow_engine) < 1.0
    assert generated_tokens(live_server) - before < 400
    assert running_gauge(live_server).endswith(" 0.0")


def test_abandoned_non_streaming_request_is_cancelled(
    live_server: LiveServer, slow_engine: GenerationEngine
) -> None:
    before = generated_tokens(live_server)
    # >= 2 s at 5 ms a step; greedy, so no early <eos>.
    body = {"model": "ali", "prompt": PROMPT, "max_tokens": 400, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{live_server.url}/v1/completions", json=body, timeout=0.3)
    assert wait_until_freed(slow_engine) < 1.0
    assert generated_tokens(live_server) - before < 400
