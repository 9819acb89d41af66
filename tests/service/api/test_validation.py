"""Validation is the published schema: numbers as JSON Schema reads them, finite bounded floats,
refused OpenAI parameters stated as such, settings-dependent bounds in /openapi.json.

Bodies are sent as raw JSON text where the point is the literal on the wire (``1e999``,
``24753.0``, ``NaN``), which a Python dict would not reproduce.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.schema_types import MAX_EXACT_INT, MAX_TEMPERATURE

LIMIT = 8  # max_new_tokens_limit: below the default of 16 on purpose
PROMPT = "def parse(self, text):\n    return"


@pytest.fixture(scope="module")
def client(generate_client: TestClient) -> TestClient:
    return generate_client  # ali + lin, max_new_tokens_limit = LIMIT (api/conftest.py)


def post_raw(client: TestClient, path: str, body: str) -> Any:
    return client.post(path, content=body, headers={"content-type": "application/json"})


def error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    detail: dict[str, Any] = response.json()["error"]
    return detail


# ----------------------------------------------------------------------------- floats


@pytest.mark.parametrize(
    ("path", "field", "literal"),
    [
        ("/v1/generate", "temperature", "1e999"),
        ("/v1/generate", "temperature", "-1e999"),
        ("/v1/generate", "temperature", "NaN"),
        ("/v1/generate", "top_p", "Infinity"),
        ("/v1/completions", "temperature", "1e999"),
        ("/v1/completions", "top_p", "NaN"),
        ("/v1/completions", "presence_penalty", "NaN"),
        ("/v1/completions", "frequency_penalty", "-Infinity"),
    ],
)
def test_non_finite_numbers_are_422(
    client: TestClient, path: str, field: str, literal: str
) -> None:
    body = f'{{"model": "ali", "prompt": "x", "{field}": {literal}}}'
    detail = error(post_raw(client, path, body), 422)
    assert detail["code"] == "validation_error" and detail["param"] == field


def test_logit_bias_values_must_be_finite(client: TestClient) -> None:
    body = '{"model": "ali", "prompt": "x", "logit_bias": {"5": 1e999}}'
    assert error(post_raw(client, "/v1/completions", body), 422)["param"].startswith("logit_bias")


def test_temperature_range_is_closed_and_finite(client: TestClient) -> None:
    body = {"model": "ali", "prompt": PROMPT, "max_new_tokens": 2}
    ok = client.post("/v1/generate", json={**body, "temperature": MAX_TEMPERATURE})
    assert ok.status_code == 200, ok.text
    too_hot = client.post("/v1/generate", json={**body, "temperature": MAX_TEMPERATURE + 0.5})
    assert error(too_hot, 422)["param"] == "temperature"


@pytest.mark.parametrize("temperature", [1e-300, 5e-324])
def test_a_tiny_temperature_samples_the_greedy_tokens(
    client: TestClient, temperature: float
) -> None:
    """Logits divided by 1e-300 overflow unless shifted first; the limit of T -> 0 is argmax."""
    body = {"model": "ali", "prompt": PROMPT, "max_new_tokens": LIMIT, "seed": 3}
    greedy = client.post("/v1/generate", json={**body, "temperature": 0}).json()
    tiny = client.post("/v1/generate", json={**body, "temperature": temperature})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["text"] == greedy["text"]
    assert tiny.json()["usage"] == greedy["usage"]


# ----------------------------------------------------------------------------- integers


def test_token_ids_with_a_zero_fraction_are_integers(client: TestClient) -> None:
    """JSON Schema counts 24.0 as an integer; the answer equals the one for 24."""
    ints = '{"model": "ali", "prompt": [24, 25, 26], "max_tokens": 4, "temperature": 0}'
    floats = '{"model": "ali", "prompt": [24.0, 25.0, 26.0], "max_tokens": 4.0, "temperature": 0}'
    a, b = post_raw(client, "/v1/completions", ints), post_raw(client, "/v1/completions", floats)
    assert a.status_code == b.status_code == 200, b.text
    assert a.json()["choices"] == b.json()["choices"] and a.json()["usage"] == b.json()["usage"]
    embed_ints = post_raw(client, "/v1/embeddings", '{"model": "lin", "input": [[3, 40, 41]]}')
    embed_floats = post_raw(
        client, "/v1/embeddings", '{"model": "lin", "input": [[3.0, 40.0, 41.0]]}'
    )
    assert embed_floats.status_code == 200, embed_floats.text
    assert embed_floats.json()["data"] == embed_ints.json()["data"]


@pytest.mark.parametrize("literal", ["24.5", '"24"', "true", "1e400"])
def test_non_integral_token_ids_are_422(client: TestClient, literal: str) -> None:
    body = f'{{"model": "lin", "input": [3, {literal}]}}'
    assert error(post_raw(client, "/v1/embeddings", body), 422)["code"] == "validation_error"


@pytest.mark.parametrize(
    ("seed", "status"),
    [(0, 200), (MAX_EXACT_INT, 200), (float(MAX_EXACT_INT), 200), (MAX_EXACT_INT + 1, 422),
     (2**63, 422), (2**64, 422), (-1, 422)],
)  # fmt: skip
def test_seed_range_is_what_the_schema_says(client: TestClient, seed: float, status: int) -> None:
    body = {"model": "ali", "prompt": PROMPT, "max_tokens": 2, "seed": seed}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    schema = client.get("/openapi.json").json()["components"]["schemas"]["CompletionRequest"]
    bounds = schema["properties"]["seed"]["anyOf"][0]
    assert (bounds["minimum"], bounds["maximum"]) == (0, MAX_EXACT_INT)


# ----------------------------------------------------------------------------- refused params


@pytest.mark.parametrize(
    "neutral",
    [{"n": 1}, {"n": 1.0}, {"logprobs": None}, {"echo": False}, {"best_of": 1},
     {"best_of": None}, {"suffix": None}, {"presence_penalty": 0}, {"frequency_penalty": 0.0},
     {"logit_bias": {}}, {"logit_bias": None}],
)  # fmt: skip
def test_refused_parameters_accept_their_neutral_value(
    client: TestClient, neutral: dict[str, Any]
) -> None:
    body = {"model": "ali", "prompt": PROMPT, "max_tokens": 2, **neutral}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text


def test_schema_states_the_refused_parameters(client: TestClient) -> None:
    props = client.get("/openapi.json").json()["components"]["schemas"]["CompletionRequest"][
        "properties"
    ]
    assert props["suffix"]["type"] == "null"
    assert props["presence_penalty"]["const"] == 0 == props["frequency_penalty"]["const"]
    assert {"type": "object", "maxProperties": 0} in props["logit_bias"]["anyOf"]
    for name in ("suffix", "presence_penalty", "frequency_penalty", "logit_bias"):
        assert "unsupported_parameter" in props[name]["description"], name


def test_schema_states_the_batch_choice_and_logprob_limits(client: TestClient) -> None:
    settings = client.app.state.settings  # type: ignore[attr-defined]
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    props = schemas["CompletionRequest"]["properties"]
    batches = [b for b in props["prompt"]["anyOf"] if "maxItems" in b]
    assert len(batches) == 2  # a list of texts and a list of token-id lists
    assert {b["maxItems"] for b in batches} == {settings.max_completion_prompts}
    assert props["n"]["maximum"] == settings.max_completion_choices
    assert props["best_of"]["anyOf"][0]["maximum"] == settings.max_completion_choices
    assert props["max_tokens"]["minimum"] == 0  # 0 with echo: scoring
    for component, prop in [
        ("CompletionRequest", "logprobs"),
        ("GenerateRequest", "logprobs"),
        ("GenerateRequest", "prompt_logprobs"),
    ]:
        logprobs = schemas[component]["properties"][prop]["anyOf"][0]
        assert (logprobs["minimum"], logprobs["maximum"]) == (0, settings.max_logprobs)


# ----------------------------------------------------------------------------- settings bounds


def test_new_token_limit_is_in_the_schema_and_caps_the_default(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for component, field in (("GenerateRequest", "max_new_tokens"),
                             ("CompletionRequest", "max_tokens")):  # fmt: skip
        prop = schemas[component]["properties"][field]
        assert (prop["maximum"], prop["default"]) == (LIMIT, LIMIT), prop
    # Left out, the default (16) is capped at the limit instead of being refused.
    response = client.post("/v1/generate", json={"model": "ali", "prompt": PROMPT})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= LIMIT
    asked = client.post("/v1/generate", json={"model": "ali", "prompt": "x", "max_new_tokens": 16})
    assert error(asked, 422)["param"] == "max_new_tokens"


def test_incompatible_encode_options_are_in_the_schema(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]["EncodeRequest"]
    refused = [clause["not"]["properties"] for clause in schema["allOf"]]
    assert {"truncate": {"const": True}, "chunk": {"const": True}} in refused
    both = {"model": "lin", "inputs": "x", "truncate": True, "chunk": True}
    assert error(client.post("/v1/encode", json=both), 422)["code"] == "validation_error"
