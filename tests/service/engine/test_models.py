"""load_model: verified files only; typed errors that name the problem."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from model_store import ModelRepository
from service.backends.onnx import OnnxBackend
from service.engine.errors import ModelLoadError, ModelNotFound, ModelVerificationError
from service.engine.models import load_model
from service.settings import Settings
from tests.model_store.builders import with_old_cache_contract, with_stacked_past_contract
from tests.service.conftest import ServiceStore


def test_loads_a_verified_version(service_store: ServiceStore) -> None:
    repo = ModelRepository(service_store.root)
    loaded = load_model(repo, "lin", None, Settings(store=service_store.root))
    assert (loaded.name, loaded.version, loaded.manifest.task) == ("lin", 1, "encode")
    assert isinstance(loaded.backend, OnnxBackend)
    assert loaded.tokenizer.encode("x").ids[0] == 3
    assert loaded.hidden_size == loaded.manifest.signature.output("hidden").shape[-1] == 32


def test_a_kv_cache_decoder_has_no_embedding_width(service_store: ServiceStore) -> None:
    loaded = load_model(
        ModelRepository(service_store.root), "ali", None, Settings(store=service_store.root)
    )
    assert loaded.manifest.signature.generation_mode == "kv_cache"
    assert loaded.hidden_size is None


def test_checksum_mismatch_names_the_file(store_copy: ServiceStore) -> None:
    repo = ModelRepository(store_copy.root)
    tokenizer = repo.resolve("lin").tokenizer_path
    tokenizer.write_text(tokenizer.read_text().replace("<cls>", "<CLS>"))
    with pytest.raises(ModelVerificationError, match=r"tokenizer\.json has sha256") as info:
        load_model(repo, "lin", 1, Settings(store=store_copy.root))
    assert info.value.files == ["tokenizer.json"]


def test_unlisted_file_fails_verification(store_copy: ServiceStore) -> None:
    repo = ModelRepository(store_copy.root)
    (repo.resolve("lin").path / "extra.bin").write_bytes(b"x")
    with pytest.raises(ModelVerificationError, match=r"extra\.bin is not listed"):
        load_model(repo, "lin", None, Settings(store=store_copy.root))


@pytest.mark.parametrize(("name", "version"), [("nope", None), ("lin", 7)])
def test_unknown_model_or_version(
    service_store: ServiceStore, name: str, version: int | None
) -> None:
    with pytest.raises(ModelNotFound):
        load_model(
            ModelRepository(service_store.root), name, version, Settings(store=service_store.root)
        )


@pytest.mark.parametrize(
    ("downgrade", "named"),
    [
        # Its cache output is the whole cache: served as new entries it would corrupt every
        # sequence.
        (with_old_cache_contract, "present_key_values"),
        # One stacked past input: the engine passes past_key_values.{l}.key / .value.
        (with_stacked_past_contract, "one input 'past_key_values'"),
    ],
)
def test_a_graph_exported_under_an_older_cache_contract_is_refused(
    store_copy: ServiceStore,
    downgrade: Callable[[dict[str, Any]], dict[str, Any]],
    named: str,
) -> None:
    """Its files are intact, but the engine cannot drive it: its manifest's migration refuses
    it, and loading stops and says to re-export."""
    repo = ModelRepository(store_copy.root)
    path = repo.resolve("ali").path / "manifest.json"
    path.write_text(json.dumps(downgrade(json.loads(path.read_text()))))
    assert repo.verify("ali").outdated
    with pytest.raises(ModelLoadError, match=re.escape(named)) as info:
        load_model(repo, "ali", None, Settings(store=store_copy.root))
    assert "Re-export it from its checkpoint" in str(info.value)
    assert "--format onnx" in str(info.value)
    assert "make models" in str(info.value)
