"""The exporter's default precision: ONNX int8 where it meets the parity floor, fp32 where it
does not, and the choice recorded in the manifest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from exporters import parity as parity_module
from exporters.cli import build_parser
from exporters.export import ExportRequest, export
from exporters.precision import AUTO, REQUESTED, default_precision
from model_store import ModelRepository


def _export(checkpoint: Path, store: Path, fmt: str, precision: str, name: str = "m"):
    return export(
        ExportRequest(
            checkpoint=checkpoint, store=store, name=name, format=fmt, precision=precision,
            progress=False,
        )
    )  # fmt: skip


def test_the_cli_defaults_to_auto_and_keeps_fp32_available() -> None:
    parser = build_parser()
    base = ["export", "ckpt", "--format", "onnx", "--store", "s", "--name", "n"]
    assert parser.parse_args(base).precision == AUTO
    assert parser.parse_args([*base, "--precision", "fp32"]).precision == "fp32"
    assert default_precision("onnx")[0] == "int8"
    assert default_precision("torchscript")[0] == "fp32"
    with pytest.raises(ValueError, match="unknown format"):
        default_precision("tflite")


def test_auto_exports_onnx_int8_and_records_why(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    result = _export(tiny_checkpoint("shatter"), tmp_path, "onnx", AUTO)
    manifest = result.published.manifest
    assert manifest.precision == "int8"
    assert manifest.parity.min_cosine is not None
    assert manifest.parity.min_cosine >= parity_module.MIN_COSINE
    assert manifest.precision_reason is not None and "benchmarks.md" in manifest.precision_reason
    # The reason survives the round trip through manifest.json.
    assert (
        ModelRepository(tmp_path).load_manifest("m").precision_reason == manifest.precision_reason
    )


def test_auto_falls_back_to_fp32_below_the_parity_floor(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parity_module, "MIN_COSINE", 1.000001)  # no int8 graph can pass
    result = _export(tiny_checkpoint("shatter"), tmp_path, "onnx", AUTO)
    manifest = result.published.manifest
    assert manifest.precision == "fp32"
    assert manifest.parity.passed and manifest.parity.tolerance is not None
    assert manifest.precision_reason is not None
    assert "missed the parity floor" in manifest.precision_reason
    # Only the fp32 version was published: the failed int8 attempt left nothing behind.
    assert ModelRepository(tmp_path).list_versions("m") == [1]


def test_explicit_fp32_is_recorded_as_requested(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    result = _export(tiny_checkpoint("shatter"), tmp_path, "torchscript", "fp32")
    manifest = result.published.manifest
    assert manifest.precision == "fp32" and manifest.precision_reason == REQUESTED
    auto = _export(tiny_checkpoint("shatter"), tmp_path, "torchscript", AUTO, name="ts")
    assert auto.published.manifest.precision == "fp32"
    assert "TorchScript stays fp32" in (auto.published.manifest.precision_reason or "")
