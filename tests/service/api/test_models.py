"""GET /v1/models and the admin routes: load (reload), unload, failures, auth."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from model_store import ModelRepository
from service.app import create_app
from tests.service.conftest import LIN_MAX_CONTEXT, ServiceStore, make_settings, wait_ready
from tests.service.helpers import corrupt_model_file, publish_copy

ADMIN = {"Authorization": "Bearer admin-key"}


def test_list_has_openai_shape_and_longhaul_fields(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert set(cards) == {"lin", "sha"}
    lin = cards["lin"]
    assert lin["object"] == "model" and lin["owned_by"] == "longhaul"
    assert isinstance(lin["created"], int) and lin["created"] > 1_700_000_000
    assert (lin["version"], lin["task"], lin["max_context"]) == (1, "encode", LIN_MAX_CONTEXT)
    assert (lin["architecture"], lin["format"], lin["provider"]) == (
        "linformer",
        "onnx",
        "CPUExecutionProvider",
    )
    assert cards["sha"]["format"] == "torchscript" and cards["sha"]["provider"] == "torch-cpu"
    # Settings prefer the GPU; this machine's runtimes say why each model runs on the CPU.
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "CUDAExecutionProvider is not in this ONNX Runtime build" in lin["fallback"]
    if not torch.cuda.is_available():
        assert "torch" in cards["sha"]["fallback"] and "CUDA" in cards["sha"]["fallback"]
    assert client.get("/v1/models/sha").json() == cards["sha"]
    assert client.get("/v1/models/nope").status_code == 404


def test_cards_show_the_calibrated_batch_time_model_and_threads(client: TestClient) -> None:
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    for name in ("lin", "sha"):
        card = cards[name]
        assert card["threads"] == 2  # make_settings: intra_op_threads 2
        batching = card["batching"]
        assert batching["source"] == "measured", batching["reason"]
        assert set(batching["coefficients"]) == {
            "fixed", "per_sequence", "per_token", "per_attention"
        }  # fmt: skip
        assert min(batching["coefficients"].values()) >= 0
        assert len({(s["batch"], s["length"]) for s in batching["samples"]}) >= 2
        assert all(s["length"] <= card["max_context"] for s in batching["samples"])
    samples = {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
    }
    fixed = (("model", "lin"), ("source", "measured"), ("term", "fixed"))
    assert ("longhaul_batch_time_coefficient", fixed) in samples
    assert ("longhaul_calibration_duration_seconds", (("model", "sha"),)) in samples


def test_admin_routes_are_disabled_without_admin_keys(client: TestClient) -> None:
    response = client.post("/v1/models/lin/load")
    assert response.status_code == 403 and response.json()["error"]["code"] == "admin_disabled"


@pytest.fixture
def admin_client(store_copy: ServiceStore) -> Iterator[TestClient]:
    settings = make_settings(store_copy.root, models=["lin"], admin_keys=["admin-key"])
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client


def encode(client: TestClient) -> list[float]:
    response = client.post("/v1/encode", json={"model": "lin", "inputs": "value = 42"})
    assert response.status_code == 200, response.text
    return response.json()["embeddings"][0]  # type: ignore[no-any-return]


def test_reload_to_a_new_version_swaps(
    admin_client: TestClient, store_copy: ServiceStore, tmp_path: Path
) -> None:
    before = encode(admin_client)
    v2 = publish_copy(store_copy.root, "lin", tmp_path)
    response = admin_client.post("/v1/models/lin/load", headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == v2
    assert admin_client.get("/v1/models/lin").json()["version"] == v2
    assert encode(admin_client) == pytest.approx(before, abs=1e-6)  # same weights republished
    metrics = admin_client.get("/metrics").text
    labels = (
        'architecture="linformer",format="onnx",model="lin",precision="fp32",'
        f'provider="CPUExecutionProvider",version="{v2}"'
    )
    assert f"longhaul_model_info{{{labels}}} 1.0" in metrics
    assert 'model="lin",precision="fp32",provider="CPUExecutionProvider",version="1"' not in metrics


def test_pinned_version_load(
    admin_client: TestClient, store_copy: ServiceStore, tmp_path: Path
) -> None:
    publish_copy(store_copy.root, "lin", tmp_path)
    assert (
        admin_client.post("/v1/models/lin/load", json={"version": 2}, headers=ADMIN).json()[
            "version"
        ]
        == 2
    )
    assert (
        admin_client.post("/v1/models/lin/load", json={"version": 1}, headers=ADMIN).json()[
            "version"
        ]
        == 1
    )


def test_failed_load_keeps_the_old_version_and_says_why(
    admin_client: TestClient, store_copy: ServiceStore, tmp_path: Path
) -> None:
    v2 = publish_copy(store_copy.root, "lin", tmp_path)
    corrupt_model_file(store_copy.root, "lin", v2)
    response = admin_client.post("/v1/models/lin/load", headers=ADMIN)
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "model_load_failed"
    assert "model.onnx" in error["message"] and "checksum" in error["message"]
    assert admin_client.get("/v1/models/lin").json()["version"] == 1
    encode(admin_client)


@pytest.mark.parametrize(
    ("path", "body"), [("/v1/models/nope/load", None), ("/v1/models/lin/load", {"version": 9})]
)
def test_load_of_unknown_model_or_version_is_404(
    admin_client: TestClient, path: str, body: dict[str, int] | None
) -> None:
    response = admin_client.post(path, json=body, headers=ADMIN)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_load_body_is_validated(admin_client: TestClient) -> None:
    response = admin_client.post("/v1/models/lin/load", json={"version": "two"}, headers=ADMIN)
    assert response.status_code == 422 and response.json()["error"]["param"] == "version"


def test_unload_then_load_again(admin_client: TestClient, store_copy: ServiceStore) -> None:
    response = admin_client.post("/v1/models/lin/unload", headers=ADMIN)
    assert response.json() == {"id": "lin", "version": 1, "object": "model", "unloaded": True}
    assert admin_client.post("/v1/encode", json={"model": "lin", "inputs": "x"}).status_code == 404
    assert admin_client.get("/v1/models").json()["data"] == []
    assert admin_client.get("/health/ready").status_code == 503  # nothing served any more
    assert admin_client.post("/v1/models/lin/unload", headers=ADMIN).status_code == 404
    # A model that was not loaded at start-up can be loaded later.
    assert admin_client.post("/v1/models/sha/load", headers=ADMIN).json()["format"] == "torchscript"
    assert admin_client.post("/v1/models/lin/load", headers=ADMIN).status_code == 200
    assert admin_client.get("/health/ready").status_code == 200
    assert ModelRepository(store_copy.root).list_models() == ["ali", "lin", "sha"]
