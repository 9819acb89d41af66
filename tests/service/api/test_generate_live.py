"""Generation over a real socket: the official openai client (streaming included) and clients
that disconnect early, against uvicorn on a loopback port (the ``live_server`` fixture)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch

from service.backends.base import Backend
from service.engine.generation import GenerationEngine
from tests.service.conftest import EagerReference, LiveServer

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
    with pytest.raises(openai.BadRequestError, match="best_of"):
        oai.completions.create(model="ali", prompt=PROMPT, max_tokens=2, n=3, best_of=2)
    with pytest.raises(openai.BadRequestError, match="suffix"):
        oai.completions.create(model="ali", prompt=PROMPT, max_tokens=2, suffix="x")
    with pytest.raises(openai.UnprocessableEntityError):
        oai.completions.create(model="ali", prompt=PROMPT, max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)


# ----------------------------------------------------------------------------- logprobs, echo, n


def eager_log_softmax(reference: EagerReference, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        x = torch.tensor([ids], dtype=torch.long)
        logits = reference.ckpt.model(x, torch.ones_like(x))[0][0].double()
    out: np.ndarray = torch.log_softmax(logits, dim=-1).numpy()
    return out


def test_openai_client_logprobs(oai: openai.OpenAI) -> None:
    completion = oai.completions.create(
        model="ali", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2
    )
    (choice,) = completion.choices
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert completion.usage is not None
    assert len(lp.tokens) == completion.usage.completion_tokens == 5
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert isinstance(logprob, float) and logprob < 0
        assert 2 <= len(top) <= 3 and top[token] == logprob  # greedy: the token is the top one
        assert max(top.values()) == pytest.approx(logprob)


def test_openai_client_echo_scores_the_prompt_like_the_eager_model(
    oai: openai.OpenAI, eager: Callable[[str], EagerReference]
) -> None:
    reference = eager("ali")
    ids = reference.token_ids(PROMPT)
    completion = oai.completions.create(
        model="ali", prompt=ids, max_tokens=0, echo=True, logprobs=1
    )
    (choice,) = completion.choices
    assert choice.text == PROMPT and choice.finish_reason == "length"
    lp = choice.logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes it
    expected = eager_log_softmax(reference, ids)[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(np.array(lp.token_logprobs[1:], float), expected, atol=1e-4)
    assert "".join(lp.tokens or []) == PROMPT
    assert completion.usage is not None and completion.usage.completion_tokens == 0


def test_native_prompt_logprobs_score_the_prompt_like_the_eager_model(
    live_server: LiveServer, eager: Callable[[str], EagerReference]
) -> None:
    """vLLM's prompt_logprobs on /v1/generate: every prompt token given those before it (the
    first: null), k alternatives each; the generation itself is unchanged, streamed or not."""
    reference = eager("ali")
    ids = reference.token_ids(PROMPT)
    body = {"prompt": PROMPT, "max_new_tokens": 4, "temperature": 0}
    plain = native(live_server, **body)
    scored = native(live_server, **body, prompt_logprobs=2)
    assert "prompt_logprobs" not in plain
    assert scored["text"] == plain["text"] and "logprobs" not in scored
    prompt = scored["prompt_logprobs"]
    assert prompt["prompt_text"] == PROMPT
    tokens = prompt["tokens"]
    assert [t["id"] for t in tokens] == ids and tokens[0]["logprob"] is None
    expected = eager_log_softmax(reference, ids)[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose([t["logprob"] for t in tokens[1:]], expected, atol=1e-4)
    assert all(len(t["top"]) == 2 for t in tokens[1:])
    assert "".join(t["token"] for t in tokens) == PROMPT
    assert [PROMPT.startswith(t["token"], t["offset"]) for t in tokens] == [True] * len(ids)
    with httpx.stream(
        "POST", f"{live_server.url}/v1/generate", timeout=60,
        json={"model": "ali", **body, "prompt_logprobs": 2, "stream": True},
    ) as response:  # fmt: skip
        events = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: {")]  # fmt: skip
    assert events[0]["prompt_logprobs"] == prompt
    assert all("prompt_logprobs" not in e for e in events[1:])
    assert "".join(e["text"] for e in events) == plain["text"]
    over = httpx.post(
        f"{live_server.url}/v1/generate", timeout=60,
        json={"model": "ali", **body, "prompt_logprobs": 10**6},
    )  # fmt: skip
    assert over.status_code == 422 and over.json()["error"]["param"] == "prompt_logprobs"


def test_openai_client_batched_token_id_prompts_as_harnesses_send_them(
    oai: openai.OpenAI, eager: Callable[[str], EagerReference]
) -> None:
    reference = eager("ali")
    prompts = [reference.token_ids(PROMPT), reference.token_ids("import os\n"), [7, 8, 9]]
    batch = oai.completions.create(
        model="ali", prompt=prompts, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1, 2]
    for ids, choice in zip(prompts, batch.choices, strict=True):
        alone = oai.completions.create(
            model="ali", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0
        ).choices[0]
        assert choice.text == alone.text
        assert choice.logprobs is not None and alone.logprobs is not None
        assert len(choice.logprobs.tokens or []) == len(ids) + 1
        np.testing.assert_allclose(
            np.array(choice.logprobs.token_logprobs[1:], float),  # type: ignore[index]
            np.array(alone.logprobs.token_logprobs[1:], float),  # type: ignore[index]
            atol=1e-5,
        )
    assert batch.usage is not None
    assert batch.usage.prompt_tokens == sum(len(ids) for ids in prompts)
    texts = oai.completions.create(model="ali", prompt=["a", "b"], max_tokens=2, n=2, seed=1)
    assert [c.index for c in texts.choices] == [0, 1, 2, 3]


def test_openai_client_n_3_is_reproducible_per_choice(oai: openai.OpenAI) -> None:
    first = oai.completions.create(model="ali", prompt=PROMPT, max_tokens=6, n=3, seed=9)
    again = oai.completions.create(model="ali", prompt=PROMPT, max_tokens=6, n=3, seed=9)
    single = oai.completions.create(model="ali", prompt=PROMPT, max_tokens=6, seed=9)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text == single.choices[0].text
    assert len({c.text for c in first.choices}) > 1
    best = oai.completions.create(
        model="ali", prompt=PROMPT, max_tokens=6, n=1, best_of=3, seed=9, logprobs=0
    )
    scored = oai.completions.create(
        model="ali", prompt=PROMPT, max_tokens=6, n=3, seed=9, logprobs=0
    )
    totals = [sum(c.logprobs.token_logprobs or []) for c in scored.choices if c.logprobs]
    assert best.choices[0].text == scored.choices[int(np.argmax(totals))].text


def test_openai_client_streams_logprobs(oai: openai.OpenAI) -> None:
    body: dict[str, Any] = {"model": "ali", "prompt": PROMPT, "max_tokens": 6, "seed": 5,
                            "logprobs": 1}  # fmt: skip
    whole = oai.completions.create(**body).choices[0]
    chunks = list(oai.completions.create(**body, stream=True))
    tokens: list[str] = []
    logprobs: list[float | None] = []
    offsets: list[int] = []
    for chunk in chunks:
        lp = chunk.choices[0].logprobs
        assert lp is not None
        tokens += lp.tokens or []
        logprobs += lp.token_logprobs or []
        offsets += lp.text_offset or []
    assert whole.logprobs is not None
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    np.testing.assert_allclose(logprobs, whole.logprobs.token_logprobs or [], atol=1e-6)
    assert "".join(c.choices[0].text for c in chunks) == whole.text


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


def test_a_stream_abandoned_before_its_first_event_is_cancelled(live_server: LiveServer) -> None:
    """Nothing is sent before the first event; a client that leaves before it still frees its
    sequence (the route watches for the disconnect while it waits) and is counted as 499."""
    served = live_server.app.state.registry.get("ali")
    engine = served.engine
    assert isinstance(engine, GenerationEngine)
    fast = served.loaded.backend
    served.loaded.backend = Slow(fast, delay=0.6)  # the prefill alone outlasts the client
    closed_before = client_closed(live_server)
    try:
        before = generated_tokens(live_server)
        body = {"model": "ali", "prompt": PROMPT, "max_tokens": 400, "stream": True}
        with pytest.raises(httpx.ReadTimeout):  # no headers within 0.2 s: the client leaves
            httpx.post(f"{live_server.url}/v1/completions", json=body, timeout=0.2)
        assert wait_until_freed(engine) < 3.0
        assert generated_tokens(live_server) - before <= 1  # at most the prefill's token
    finally:
        served.loaded.backend = fast
    assert client_closed(live_server) - closed_before == 1.0


def client_closed(live_server: LiveServer) -> float:
    value = live_server.app.state.metrics.registry.get_sample_value(
        "longhaul_requests_total", {"model": "ali", "endpoint": "/v1/completions", "status": "499"}
    )
    return float(value or 0.0)
