"""OpenAI-compatible POST /v1/embeddings: shapes, encodings, token-id input, the real client."""

from __future__ import annotations

import base64
from collections.abc import Callable

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from tests.service.conftest import EagerReference, LiveServer

TEXTS = ["for line in open(path):", "class Point:\n    x: int\n    y: int"]


@pytest.mark.parametrize("model", ["lin", "sha"])
def test_response_shape_and_numbers(
    client: TestClient, eager: Callable[[str], EagerReference], model: str
) -> None:
    response = client.post("/v1/embeddings", json={"model": model, "input": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    ref = eager(model)
    assert body["object"] == "list" and body["model"] == model
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"])
    for text, item in zip(TEXTS, body["data"], strict=True):
        np.testing.assert_allclose(item["embedding"], ref.embed(ref.token_ids(text)), atol=1e-4)
    tokens = sum(len(ref.token_ids(t)) for t in TEXTS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_base64_is_little_endian_float32_of_the_same_vector(client: TestClient) -> None:
    floats = client.post("/v1/embeddings", json={"model": "lin", "input": TEXTS[0]}).json()
    packed = client.post(
        "/v1/embeddings", json={"model": "lin", "input": TEXTS[0], "encoding_format": "base64"}
    ).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, np.asarray(floats["data"][0]["embedding"], dtype="<f4"))


@pytest.mark.parametrize("shape", ["flat", "nested"])
def test_token_ids_are_encoded_as_given(
    client: TestClient, eager: Callable[[str], EagerReference], shape: str
) -> None:
    ref = eager("lin")
    ids = ref.token_ids(TEXTS[1])
    payload = ids if shape == "flat" else [ids, ids[:5]]
    body = client.post("/v1/embeddings", json={"model": "lin", "input": payload}).json()
    np.testing.assert_allclose(body["data"][0]["embedding"], ref.embed(ids), atol=1e-4)
    if shape == "nested":
        np.testing.assert_allclose(body["data"][1]["embedding"], ref.embed(ids[:5]), atol=1e-4)
    assert body["usage"]["prompt_tokens"] == len(ids) + (5 if shape == "nested" else 0)


def test_matching_dimensions_is_accepted(client: TestClient) -> None:
    response = client.post("/v1/embeddings", json={"model": "lin", "input": "x", "dimensions": 32})
    assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 32


def test_official_openai_client_against_a_live_server(
    live_server: LiveServer, eager: Callable[[str], EagerReference]
) -> None:
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="x", max_retries=0)
    ref = eager("sha")
    result = client.embeddings.create(model="sha", input=TEXTS)  # the client asks for base64
    assert [d.index for d in result.data] == [0, 1] and result.model == "sha"
    for text, item in zip(TEXTS, result.data, strict=True):
        np.testing.assert_allclose(item.embedding, ref.embed(ref.token_ids(text)), atol=1e-4)
    floats = client.embeddings.create(model="lin", input="x = 1", encoding_format="float")
    assert len(floats.data[0].embedding) == 32
    assert result.usage.prompt_tokens == sum(len(ref.token_ids(t)) for t in TEXTS)

    listed = {m.id: m for m in client.models.list()}
    assert {"lin", "sha"} <= set(listed)
    assert listed["lin"].owned_by == "longhaul"

    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="nope", input="x")
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model="lin", input="def f(): pass\n" * 200)
    assert bad.value.code == "context_length_exceeded"
