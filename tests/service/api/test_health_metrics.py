"""Probes and /metrics: every metric docs/architecture.md lists is exported; requests are
counted with labels."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

DOCUMENTED_METRICS = {
    "longhaul_requests": "counter",
    "longhaul_request_duration_seconds": "histogram",
    "longhaul_queue_duration_seconds": "histogram",
    "longhaul_queue_depth": "gauge",
    "longhaul_batch_size": "histogram",
    "longhaul_batch_tokens": "histogram",
    "longhaul_batch_padding_ratio": "histogram",
    "longhaul_inference_duration_seconds": "histogram",
    "longhaul_input_tokens": "counter",
    "longhaul_generated_tokens": "counter",
    "longhaul_time_to_first_token_seconds": "histogram",
    "longhaul_inter_token_latency_seconds": "histogram",
    "longhaul_requests_rejected": "counter",
    "longhaul_model_info": "gauge",
    "longhaul_running_sequences": "gauge",
    "longhaul_waiting_sequences": "gauge",
    "longhaul_kv_cache_bytes": "gauge",
}


def families(client: TestClient) -> dict[str, object]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def value(text: str, pattern: str) -> float:
    match = re.search(pattern + r" ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_probes(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "ok"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert (body["status"], body["models"], body["loading"]) == (
        "ready",
        {"lin": 1, "sha": 1},
        False,
    )
    assert body["details"]["lin"] == {
        "version": 1,
        "status": "healthy",
        "consecutive_failures": 0,
        "last_error": None,
    }


def test_every_design_metric_is_exported(client: TestClient) -> None:
    found = families(client)
    for name, kind in DOCUMENTED_METRICS.items():
        assert name in found, name
        assert found[name].type == kind, name  # type: ignore[attr-defined]


def test_requests_are_counted_by_model_endpoint_and_status(client: TestClient) -> None:
    before = client.get("/metrics").text
    ok = r'longhaul_requests_total\{endpoint="/v1/encode",model="lin",status="200"\}'
    bad = r'longhaul_requests_total\{endpoint="/v1/encode",model="unknown",status="404"\}'
    tokens = r'longhaul_input_tokens_total\{model="lin"\}'
    client.post("/v1/encode", json={"model": "lin", "inputs": ["a b c", "d"]})
    client.post("/v1/encode", json={"model": "no-such-model", "inputs": "x"})
    after = client.get("/metrics").text
    assert value(after, ok) == value(before, ok) + 1
    assert value(after, bad) == value(before, bad) + 1  # unknown names do not become labels
    assert "no-such-model" not in after
    assert value(after, tokens) > value(before, tokens)
    assert (
        value(
            after, r'longhaul_inference_duration_seconds_count\{length_bucket="<=128",model="lin"\}'
        )
        > 0
    )
    assert (
        value(
            after, r'longhaul_request_duration_seconds_count\{endpoint="/v1/encode",model="lin"\}'
        )
        > 0
    )
    assert re.search(r'longhaul_queue_depth\{model="lin"\} 0\.0', after)
    assert re.search(r'longhaul_model_info\{.*model="sha".*provider="torch-cpu".*\} 1\.0', after)


def test_error_statuses_are_counted(client: TestClient) -> None:
    before = client.get("/metrics").text
    pattern = r'longhaul_requests_total\{endpoint="/v1/encode",model="",status="422"\}'
    client.post("/v1/encode", json={"model": "lin", "inputs": []})
    assert value(client.get("/metrics").text, pattern) == value(before, pattern) + 1


def test_requests_refused_before_routing_are_labelled_with_their_route(client: TestClient) -> None:
    pattern = r'longhaul_requests_total\{endpoint="/v1/encode",model="",status="413"\}'
    before = value(client.get("/metrics").text, pattern)
    limit = client.app.state.settings.max_body_bytes  # type: ignore[attr-defined]
    client.post(
        "/v1/encode", content=b"x" * (limit + 1), headers={"content-type": "application/json"}
    )
    client.get("/no/such/route")
    after = client.get("/metrics").text
    assert value(after, pattern) == before + 1
    assert re.search(
        r'longhaul_requests_total\{endpoint="unmatched",model="",status="404"\}', after
    )
