"""Manifest schema: round trip, validation errors, schema versions and migrations."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from model_store import (
    SCHEMA_VERSION,
    Manifest,
    ManifestError,
    OutdatedManifestError,
    Provenance,
    past_input_names,
    past_inputs,
)
from model_store import manifest as manifest_module
from tests.model_store.builders import (
    make_manifest,
    manifest_document,
    with_old_cache_contract,
    with_stacked_past_contract,
)

ENCODER_SIGNATURE = {
    "inputs": [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]},
    ],
    "outputs": [
        {"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", 300]},
        {"name": "hidden", "dtype": "float32", "shape": ["batch", "sequence", 32]},
    ],
    "generation_mode": None,
    "cache": None,
}


def with_signature(**changes: Any) -> dict[str, Any]:
    document = manifest_document()
    document["signature"] = {**document["signature"], **changes}
    return document


def test_round_trip_through_json_file(tmp_path: Path) -> None:
    manifest = make_manifest(version=3)
    path = tmp_path / "manifest.json"
    manifest.dump(path)
    loaded = Manifest.load(path)
    assert loaded == manifest
    assert loaded.provenance.created_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert loaded.signature.cache is not None and loaded.signature.cache.n_layers == 2
    # Mixed str/int axes survive: "2" stays a name, 2 stays a size.
    assert loaded.signature.input("past_key_values.1.value").shape == [
        "batch",
        4,
        "past_sequence",
        8,
    ]
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION


def test_encoder_manifest_without_cache_is_valid() -> None:
    manifest = make_manifest(
        architecture="linformer",
        task="encode",
        signature=ENCODER_SIGNATURE,
        extrapolation=None,
        format="torchscript",
        model_file="model.ts",
    )
    assert manifest.signature.generation_mode is None
    assert manifest.signature.output("hidden").shape == ["batch", "sequence", 32]
    with pytest.raises(KeyError, match="no graph output named 'nope'"):
        manifest.signature.output("nope")


def test_manifest_is_frozen() -> None:
    manifest = make_manifest()
    with pytest.raises(ValidationError, match="frozen"):
        manifest.max_context = 10  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "Tiny"}, "should match pattern"),
        ({"name": ".hidden"}, "should match pattern"),
        ({"name": "a/b"}, "should match pattern"),
        ({"version": -1}, "greater than or equal to 0"),
        ({"architecture": "performer"}, "linformer"),
        ({"task": "classify"}, "encode"),
        ({"format": "tflite"}, "onnx"),
        ({"precision": "fp8"}, "fp32"),
        ({"max_context": 0}, "greater than or equal to 1"),
        ({"schema_version": SCHEMA_VERSION - 1}, f"always schema {SCHEMA_VERSION}"),
        ({"unexpected": 1}, "Extra inputs are not permitted"),
        ({"model_file": "model.ts"}, "format 'onnx' stores its graph"),
        ({"model_file": "../model.onnx"}, "not a plain relative path"),
        ({"files": {"model.onnx": {"sha256": "xyz", "size": 1}}}, "should match pattern"),
        ({"files": {"model.onnx": {"sha256": "0" * 64, "size": -1}}}, "greater than or equal"),
        ({"files": {"model.onnx": {"sha256": "0" * 64, "size": 1}}}, "does not list"),
        ({"files": {"/etc/passwd": {"sha256": "0" * 64, "size": 1}}}, "not a plain relative"),
        ({"task": "encode"}, "task 'generate' requires"),
    ],
)
def test_validation_errors(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_manifest(**overrides)


def test_fp32_requires_parity_tolerance() -> None:
    document = manifest_document()
    document["parity"] = {**document["parity"], "tolerance": None}
    with pytest.raises(ValidationError, match="parity tolerance"):
        Manifest.model_validate(document)


def test_reduced_precision_requires_cosine_or_argmax_agreement() -> None:
    document = manifest_document(precision="bf16")
    document["parity"] = {**document["parity"], "argmax_agreement": None, "tolerance": None}
    with pytest.raises(ValidationError, match="bf16 models record parity min_cosine"):
        Manifest.model_validate(document)
    document["parity"]["min_cosine"] = 0.9993
    assert Manifest.model_validate(document).parity.min_cosine == 0.9993


def test_kv_cache_mode_requires_cache_layout() -> None:
    with pytest.raises(ValidationError, match="requires a cache layout"):
        Manifest.model_validate(with_signature(cache=None))


def test_cache_layout_must_name_graph_tensors() -> None:
    document = manifest_document()
    names = past_input_names("past", 2)
    cache = {**document["signature"]["cache"], "input_prefix": "past", "inputs": names}
    with pytest.raises(ValidationError, match=r"cache inputs \['past\.0\.key'"):
        Manifest.model_validate(with_signature(cache=cache))


def test_cache_layout_names_one_key_and_one_value_input_per_layer() -> None:
    cache = manifest_document()["signature"]["cache"]
    for inputs in (cache["inputs"][:2], cache["inputs"][::-1]):  # one layer; values first
        with pytest.raises(ValidationError, match="one key and one value input per layer"):
            Manifest.model_validate(with_signature(cache={**cache, "inputs": inputs}))


@pytest.mark.parametrize(
    ("downgrade", "named"),
    [
        (with_old_cache_contract, ["'present_key_values'", "'new_key_values'", "schema 1"]),
        (with_stacked_past_contract, ["one input 'past_key_values'", "past_key_values.0.key"]),
        (
            lambda d: with_stacked_past_contract(d, schema_version=2),
            ["one input 'past_key_values'", "schema 2"],
        ),
    ],
)
def test_a_graph_of_an_older_cache_contract_is_refused_by_its_migration(
    tmp_path: Path, downgrade: Callable[[dict[str, Any]], dict[str, Any]], named: list[str]
) -> None:
    """The whole cache out (schema 1), or one stacked past input (schema 2): the migration to
    the current schema refuses it, typed, with the document's schema and format."""
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(downgrade(manifest_document())))
    with pytest.raises(OutdatedManifestError) as info:
        Manifest.load(path)
    assert all(part in info.value.reason for part in named), info.value.reason
    assert info.value.format == "onnx"
    assert info.value.schema_version in (1, 2)


@pytest.mark.parametrize("task", ["generate", "encode"])
def test_a_schema_1_document_of_the_current_contract_migrates_unchanged(
    tmp_path: Path, task: str
) -> None:
    """Schema 1 stayed in use through both cache contract changes: a schema-1 kv_cache graph
    with new_key_values and per-layer inputs, like any graph without a cache, is current (its
    cache's prefix field, then called "input", is renamed)."""
    current = manifest_document()
    document = manifest_document(schema_version=1)
    cache = document["signature"]["cache"]
    cache["input"] = cache.pop("input_prefix")
    if task == "encode":
        document.update(
            architecture="shatter", task="encode", signature=ENCODER_SIGNATURE, extrapolation=None
        )
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(document))
    manifest = Manifest.load(path)
    assert manifest.schema_version == SCHEMA_VERSION
    if task == "encode":
        current.update(document, schema_version=SCHEMA_VERSION)
    assert manifest == Manifest.model_validate(current)


def test_a_current_schema_cache_layout_names_the_new_entries_and_every_past_input() -> None:
    cache = manifest_document()["signature"]["cache"]
    with pytest.raises(ValidationError, match="new_key_values"):
        Manifest.model_validate(with_signature(cache={**cache, "output": "present_key_values"}))
    with pytest.raises(ValidationError, match="inputs"):
        Manifest.model_validate(with_signature(cache={**cache, "inputs": []}))


def test_duplicate_tensor_names_and_unknown_dtypes_rejected() -> None:
    document = manifest_document()
    inputs = document["signature"]["inputs"]
    with pytest.raises(ValidationError, match="duplicate input names"):
        Manifest.model_validate(with_signature(inputs=[*inputs, inputs[0]]))
    bad = [{**inputs[0], "dtype": "torch.int64"}, *inputs[1:]]
    with pytest.raises(ValidationError, match=r"unknown dtype 'torch\.int64'"):
        Manifest.model_validate(with_signature(inputs=bad))


def test_extrapolation_lists_must_align() -> None:
    document = manifest_document()
    document["extrapolation"] = {**document["extrapolation"], "ratios": [1.0]}
    with pytest.raises(ValidationError, match="differ in length"):
        Manifest.model_validate(document)


def test_created_at_is_timezone_aware_and_stored_in_utc() -> None:
    base = manifest_document()["provenance"]
    plus_two = timezone(timedelta(hours=2))
    provenance = Provenance.model_validate(
        {**base, "created_at": datetime(2026, 1, 2, 5, 4, 5, tzinfo=plus_two)}
    )
    assert provenance.created_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert provenance.created_at.utcoffset() == timedelta(0)
    with pytest.raises(ValidationError, match="timezone-aware"):
        Provenance.model_validate({**base, "created_at": "2026-01-02T03:04:05"})


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="invalid JSON") as info:
        Manifest.load(path)
    assert info.value.path == path
    assert str(path) in str(info.value)


def test_missing_file_and_non_object_are_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="missing"):
        Manifest.load(tmp_path / "absent.json")
    path = tmp_path / "manifest.json"
    path.write_text("[1, 2]")
    with pytest.raises(ManifestError, match="expected a JSON object, got list"):
        Manifest.load(path)


def test_schema_validation_failure_names_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest_document(max_context=0)))
    with pytest.raises(ManifestError, match="max_context") as info:
        Manifest.load(path)
    assert str(path) in str(info.value)


def test_newer_schema_version_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest_document(schema_version=SCHEMA_VERSION + 1)))
    with pytest.raises(ManifestError, match="newer than this model_store supports"):
        Manifest.load(path)


@pytest.mark.parametrize("value", [None, "1", True])
def test_schema_version_must_be_an_integer(tmp_path: Path, value: object) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest_document(schema_version=value)))
    with pytest.raises(ManifestError, match="schema_version must be an integer"):
        Manifest.load(path)


def test_older_schema_is_migrated_step_by_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend the current schema is 1 and a schema-0 document called max_context "max_len".
    old = manifest_document(schema_version=0)
    old["max_len"] = old.pop("max_context")

    def rename_max_len(document: dict[str, Any]) -> dict[str, Any]:
        document["max_context"] = document.pop("max_len")
        return document

    monkeypatch.setitem(manifest_module.MIGRATIONS, 0, rename_max_len)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(old))
    manifest = Manifest.load(path)
    assert manifest.max_context == 512
    assert manifest.schema_version == SCHEMA_VERSION


def test_older_schema_without_migration_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest_document(schema_version=0)))
    with pytest.raises(ManifestError, match="no migration from schema_version 0"):
        Manifest.load(path)


def test_past_inputs_are_per_layer_views_in_graph_order() -> None:
    cache = np.arange(3 * 2 * 1 * 2 * 4 * 5, dtype=np.float32).reshape(3, 2, 1, 2, 4, 5)
    names = past_input_names("past_key_values", 3)
    inputs = past_inputs(cache, names)
    assert list(inputs) == names
    for layer in range(3):
        for kv, suffix in enumerate(("key", "value")):
            view = inputs[f"past_key_values.{layer}.{suffix}"]
            assert np.shares_memory(view, cache) and view.flags.c_contiguous
            np.testing.assert_array_equal(view, cache[layer, kv])
    with pytest.raises(ValueError, match="4 past inputs for a cache of 3 layers"):
        past_inputs(cache, names[:4])
