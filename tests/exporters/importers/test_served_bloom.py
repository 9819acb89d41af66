"""An imported BLOOM served end to end: import -> export -> model store -> the app's
/v1/generate, against ``transformers``' own greedy ``generate`` on the same prompt."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from model_store import ModelRepository, ModelVersion
from model_store.manifest import UNASSIGNED_VERSION
from service.app import create_app
from tests.exporters.importers.conftest import Imported
from tests.service.conftest import make_settings, wait_ready

NEW_TOKENS = 32
LONGHAUL_EOS = 1  # the id a Longhaul-trained vocabulary ends documents with (contracts.md)


@pytest.fixture(scope="module")
def client(
    bloom: Imported, exported: Callable[[Imported], ModelVersion], import_store: Path
) -> Iterator[TestClient]:
    exported(bloom)
    settings = make_settings(import_store, models=[bloom.name], max_new_tokens_limit=64)
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client


def transformers_generate(bloom: Imported, prompt: str) -> list[int]:
    ids = torch.tensor([bloom.tokenizer.encode(prompt).ids])
    with torch.no_grad():
        out = bloom.reference.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )  # fmt: skip
    new: list[int] = out[0, ids.shape[1] :].tolist()
    return new


def served(client: TestClient, name: str, prompt: str) -> dict[str, object]:
    body = {"model": name, "prompt": prompt, "max_new_tokens": NEW_TOKENS, "temperature": 0}
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    data: dict[str, object] = response.json()
    return data


@pytest.mark.parametrize("prompt", ["def forward(self, x):", "The quick brown fox"])
def test_served_greedy_text_equals_transformers(
    client: TestClient, bloom: Imported, prompt: str
) -> None:
    expected = transformers_generate(bloom, prompt)
    # Neither the model's eos nor Longhaul's own <eos> id occurs: the full 32 tokens compare
    # the numbers alone (the end token has its own test below).
    assert len(expected) == NEW_TOKENS and not {2, LONGHAUL_EOS} & set(expected)
    data = served(client, bloom.name, prompt)
    assert data["usage"] == {
        "prompt_tokens": len(bloom.tokenizer.encode(prompt).ids),
        "completion_tokens": NEW_TOKENS,
    }
    assert data["finish_reason"] == "length"
    assert data["text"] == bloom.tokenizer.decode(expected)


def test_served_generation_stops_at_the_imported_eos(
    client: TestClient, bloom: Imported, exported: Callable[[Imported], ModelVersion],
    import_store: Path, tmp_path: Path,
) -> None:  # fmt: skip
    """The same graph republished with an eos the continuation reaches (the config is what the
    service knows the end token from): generation ends there with finish_reason "stop"."""
    prompt = "def forward(self, x):"
    continuation = transformers_generate(bloom, prompt)
    stop_at = 3
    eos = continuation[stop_at]
    assert eos not in continuation[:stop_at]
    version = exported(bloom)
    staging = tmp_path / "staging"
    staging.mkdir()
    for name in (version.manifest.model_file, version.manifest.tokenizer_file):
        shutil.copy(version.path / name, staging / name)
    config = {**version.manifest.config, "eos_token_id": eos}
    manifest = version.manifest.model_copy(
        update={"name": "bloom-eos", "version": UNASSIGNED_VERSION, "config": config, "files": {}}
    )
    ModelRepository(import_store).publish(staging, manifest)
    settings = make_settings(import_store, models=["bloom-eos"], max_new_tokens_limit=64)
    with TestClient(create_app(settings)) as eos_client:
        wait_ready(eos_client)
        data = served(eos_client, "bloom-eos", prompt)
    assert data["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == stop_at + 1  # type: ignore[index]
    assert data["text"] == bloom.tokenizer.decode(continuation[:stop_at])
