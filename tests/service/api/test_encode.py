"""POST /v1/encode through the real app, numbers compared with the eager models (both formats)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.engine.encoding import CHUNK_OVERLAP_FRACTION, window_starts
from tests.service.conftest import LIN_MAX_CONTEXT, EagerReference

TEXTS = ["def add(a, b):\n    return a + b\n", "import sys", "x = [i * i for i in range(10)]"]
# About 400 tokens with the tiny tokenizer: longer than lin's max_context of 128.
LONG = "".join(f"def function_{i}(value):\n    return value + {i}\n" for i in range(40))
ATOL = 1e-4


def encode(client: TestClient, **body: object) -> dict:  # type: ignore[type-arg]
    response = client.post("/v1/encode", json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("model", ["lin", "sha"])  # ONNX and TorchScript
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooled_embeddings_match_eager(
    client: TestClient, eager: Callable[[str], EagerReference], model: str, pooling: str
) -> None:
    body = encode(client, model=model, inputs=TEXTS, pooling=pooling)
    ref = eager(model)
    assert body["model"] == model and len(body["embeddings"]) == len(TEXTS)
    for text, got in zip(TEXTS, body["embeddings"], strict=True):
        np.testing.assert_allclose(got, ref.embed(ref.token_ids(text), pooling), atol=ATOL)
        assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-5)
    assert body["usage"] == {
        "prompt_tokens": sum(len(ref.token_ids(t)) for t in TEXTS),
        "truncated_tokens": 0,
        "chunks": len(TEXTS),
    }


@pytest.mark.parametrize("model", ["lin", "sha"])
def test_per_token_vectors_unnormalised(
    client: TestClient, eager: Callable[[str], EagerReference], model: str
) -> None:
    body = encode(client, model=model, inputs=TEXTS[0], pooling="none", normalize=False)
    ref = eager(model)
    (matrix,) = body["embeddings"]
    np.testing.assert_allclose(matrix, ref.hidden(ref.token_ids(TEXTS[0])), atol=ATOL)


def test_a_single_string_is_one_input(
    client: TestClient, eager: Callable[[str], EagerReference]
) -> None:
    body = encode(client, model="lin", inputs=TEXTS[1])
    ref = eager("lin")
    (vector,) = body["embeddings"]
    np.testing.assert_allclose(vector, ref.embed(ref.token_ids(TEXTS[1])), atol=ATOL)


def test_too_long_is_400_context_length_exceeded(client: TestClient) -> None:
    response = client.post("/v1/encode", json={"model": "lin", "inputs": ["short", LONG]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "inputs[1]"
    assert f"maximum context is {LIN_MAX_CONTEXT}" in error["message"]


def test_truncate_drops_the_tail(
    client: TestClient, eager: Callable[[str], EagerReference]
) -> None:
    ref = eager("lin")
    ids = ref.token_ids(LONG)
    body = encode(client, model="lin", inputs=LONG, truncate=True)
    np.testing.assert_allclose(body["embeddings"][0], ref.embed(ids[:LIN_MAX_CONTEXT]), atol=ATOL)
    assert body["usage"] == {
        "prompt_tokens": LIN_MAX_CONTEXT,
        "truncated_tokens": len(ids) - LIN_MAX_CONTEXT,
        "chunks": 1,
    }


def test_chunk_averages_overlapping_windows(
    client: TestClient, eager: Callable[[str], EagerReference]
) -> None:
    ref = eager("lin")
    content = ref.ckpt.tokenizer.encode(LONG, add_special_tokens=False).ids
    width = LIN_MAX_CONTEXT - 1  # each window is <cls> + content
    starts = window_starts(len(content), width, LIN_MAX_CONTEXT // CHUNK_OVERLAP_FRACTION)
    windows = [[3, *content[s : s + width]] for s in starts]
    # Token-count-weighted mean of window means = mean over all window positions.
    expected = np.concatenate([ref.hidden(w) for w in windows]).mean(axis=0)
    expected /= np.linalg.norm(expected)
    body = encode(client, model="lin", inputs=[LONG, "short"], chunk=True)
    np.testing.assert_allclose(body["embeddings"][0], expected, atol=ATOL)
    np.testing.assert_allclose(body["embeddings"][1], ref.embed(ref.token_ids("short")), atol=ATOL)
    assert body["usage"]["chunks"] == len(windows) + 1 and len(windows) >= 3
    assert body["usage"]["prompt_tokens"] == len(content) + 1 + len(ref.token_ids("short"))
