"""The serving benchmark's scratch-store reuse on a fresh clone."""

from __future__ import annotations

from pathlib import Path

from benchmarks.serving import reuse


def test_reuse_finds_nothing_when_no_store_was_made_yet(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert reuse(ckpt, tmp_path / "no-store-yet", "encoder-default", "onnx", "int8") is None
