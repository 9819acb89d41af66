"""Fixtures: manifests and staged fake model files (random bytes), no torch involved."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from model_store import ModelRepository
from tests.model_store.builders import StageFn


@pytest.fixture
def store(tmp_path: Path) -> ModelRepository:
    return ModelRepository(tmp_path / "store", create=True)


@pytest.fixture
def stage(tmp_path: Path) -> StageFn:
    """Factory: write a staging directory of random-byte files, return its path."""
    counter = itertools.count()

    def make(files: dict[str, int] | None = None) -> Path:
        sizes = files or {"model.onnx": 3000, "model.onnx.data": 70_000, "tokenizer.json": 500}
        directory = tmp_path / f"staging-{next(counter)}"
        for rel, size in sizes.items():
            path = directory / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(size))
        return directory

    return make
