"""``make models``: what the demo store rebuilds and what it keeps."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exporters import demo_store
from model_store import ModelRepository
from model_store.cli import main as store_main
from tests.model_store.builders import with_old_cache_contract, with_stacked_past_contract


@pytest.mark.parametrize("old_contract", [with_old_cache_contract, with_stacked_past_contract])
def test_a_stale_kv_cache_model_is_exported_again_then_kept(
    tmp_path: Path,
    tiny_checkpoint: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
    old_contract: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    """A model whose newest version has an old cache contract (the whole cache out, or one
    stacked past input) is refused by the service, so the demo store exports it again (a new
    version) instead of counting it as published; once current, a second run exports
    nothing."""
    monkeypatch.setattr(demo_store, "ARCHS", ("alibi",))
    monkeypatch.setattr(demo_store, "FORMATS", {"onnx": "{arch}-demo"})
    checkpoints, store = tmp_path / "checkpoints", tmp_path / "store"
    shutil.copytree(tiny_checkpoint("alibi"), checkpoints / "alibi")  # trained: not retrained
    logs: list[str] = []

    timings = demo_store.build_demo_store(checkpoints, store, logs.append)
    assert set(timings) == {"export alibi-demo"}
    repo = ModelRepository(store)
    manifest = repo.resolve("alibi-demo").path / "manifest.json"
    manifest.write_text(json.dumps(old_contract(json.loads(manifest.read_text()))))

    logs.clear()
    timings = demo_store.build_demo_store(checkpoints, store, logs.append)
    assert set(timings) == {"export alibi-demo"}
    assert any("alibi-demo/1 is stale" in line and "re-exporting" in line for line in logs)
    assert repo.list_versions("alibi-demo") == [1, 2]
    assert repo.load_manifest("alibi-demo").version == 2  # the current contract: it loads
    assert repo.verify("alibi-demo", 1).outdated and repo.verify("alibi-demo", 2).ok
    assert store_main(["verify", str(store)]) == 0  # `make models` verifies the store after

    logs.clear()
    assert demo_store.build_demo_store(checkpoints, store, logs.append) == {}
    assert "alibi-demo already published, not re-exporting" in logs
