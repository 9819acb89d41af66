"""Manifest builders shared by the model_store tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from model_store import SCHEMA_VERSION, Manifest, past_input_names

# stage(files={relative path: size}) -> staging directory of random bytes (conftest fixture)
StageFn = Callable[..., Path]


def manifest_document(**overrides: Any) -> dict[str, Any]:
    """A valid fp32 ONNX ALiBi decoder manifest as plain JSON data, before publishing."""
    document: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": "tiny-alibi",
        "version": 0,
        "architecture": "alibi",
        "task": "generate",
        "format": "onnx",
        "precision": "fp32",
        "max_context": 512,
        "trained_context": 128,
        "config": {"d_model": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 300},
        "signature": {
            "inputs": [
                {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
                {
                    "name": "attention_mask",
                    "dtype": "int64",
                    "shape": ["batch", "past_sequence + sequence"],
                },
                *(
                    {
                        "name": name,
                        "dtype": "float32",
                        "shape": ["batch", 4, "past_sequence", 8],
                    }
                    for name in past_input_names("past_key_values", 2)
                ),
            ],
            "outputs": [
                {"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", 300]},
                {
                    "name": "new_key_values",
                    "dtype": "float32",
                    "shape": [2, 2, "batch", 4, "sequence", 8],
                },
            ],
            "generation_mode": "kv_cache",
            "cache": {
                "input_prefix": "past_key_values",
                "inputs": past_input_names("past_key_values", 2),
                "output": "new_key_values",
                "layout": ["layers", "2", "batch", "heads", "past_sequence", "head_dim"],
                "n_layers": 2,
                "n_heads": 4,
                "head_dim": 8,
                "dtype": "float32",
            },
        },
        "files": {},
        "parity": {
            "reference": "eager fp32 PyTorch",
            "lengths": [1, 17, 128],
            "cases": [
                {
                    "batch": 2,
                    "length": n,
                    "max_abs_diff": 2e-6,
                    "cosine": None,
                    "argmax_agreement": 1.0,
                }
                for n in (1, 17, 128)
            ],
            "max_abs_diff": 2e-6,
            "tolerance": 1e-4,
            "min_cosine": None,
            "argmax_agreement": 1.0,
            "passed": True,
        },
        "provenance": {
            "source_checkpoint": "checkpoints/tiny-alibi",
            "source_checkpoint_sha256": "ab" * 32,
            "exporter_version": "0.1.0",
            "created_at": "2026-01-02T03:04:05Z",
            "torch_version": "2.13.0",
            "onnx_opset": 18,
        },
        "extrapolation": {
            "lengths": [128, 256, 512],
            "losses": [3.0, 3.1, 3.3],
            "ratios": [1.0, 3.1 / 3.0, 1.1],
            "rule": "largest length whose loss stays within 10% of the 1x loss",
            "max_context_override": 512,
        },
        "tokenizer_file": "tokenizer.json",
        "model_file": "model.onnx",
    }
    document.update(overrides)
    return document


def make_manifest(**overrides: Any) -> Manifest:
    return Manifest.model_validate(manifest_document(**overrides))


OLD_CACHE_OUTPUT = "present_key_values"


def with_stacked_past_contract(document: dict[str, Any], schema_version: int = 1) -> dict[str, Any]:
    """``document`` (a kv_cache manifest) as exported before the past went in per layer: one
    stacked input "past_key_values" (layers, 2, batch, heads, past_sequence, head_dim) and a
    cache layout without ``inputs``. Such graphs were published as schema 1 (the number was
    bumped only later) or, by the schema's own history, 2."""
    signature = document["signature"]
    # Before schema 3 the prefix field was called "input".
    cache = {
        ("input" if k == "input_prefix" else k): v
        for k, v in signature["cache"].items()
        if k != "inputs"
    }
    per_layer = set(signature["cache"]["inputs"])
    stacked = {
        "name": cache["input"],
        "dtype": "float32",
        "shape": [
            cache["n_layers"],
            2,
            "batch",
            cache["n_heads"],
            "past_sequence",
            cache["head_dim"],
        ],
    }
    inputs = [spec for spec in signature["inputs"] if spec["name"] not in per_layer]
    signature = {**signature, "inputs": [*inputs, stacked], "cache": cache}
    return {**document, "schema_version": schema_version, "signature": signature}


def with_old_cache_contract(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` (a kv_cache manifest) as exported before kv_cache graphs returned only the
    new tokens' entries: the past went in stacked (:func:`with_stacked_past_contract`) and the
    cache output was the whole present cache, "present_key_values". Schema 1."""
    document = with_stacked_past_contract(document)
    signature = document["signature"]
    new_name = signature["cache"]["output"]
    outputs = [
        {**spec, "name": OLD_CACHE_OUTPUT} if spec["name"] == new_name else spec
        for spec in signature["outputs"]
    ]
    cache = {**signature["cache"], "output": OLD_CACHE_OUTPUT}
    return {**document, "signature": {**signature, "outputs": outputs, "cache": cache}}
