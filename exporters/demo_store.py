"""``make models``: the demo store, every architecture in ONNX (``<arch>-demo``) and TorchScript
(``<arch>-demo-ts``), built from demo checkpoints that are trained once and cached.

A second run trains nothing and exports nothing that is already published; it only verifies.
The exception is a model whose newest version was exported under an older graph contract (its
manifest's schema migration refuses it: ``OutdatedManifestError``): the service cannot load it,
so it is exported again from the cached checkpoint as a new version (the stale one stays,
immutable, reported as outdated by ``python -m model_store verify``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from exporters.checkpoint import REPORT_FILE
from exporters.export import ExportRequest, export
from exporters.precision import AUTO
from exporters.training import train
from model_store import ModelRepository, OutdatedManifestError

ARCHS = ("linformer", "reformer", "alibi", "shatter")
FORMATS = {"onnx": "{arch}-demo", "torchscript": "{arch}-demo-ts"}
# The exporter's default (exporters/precision.py): ONNX int8 where it meets the parity floor.
DEMO_PRECISION = AUTO


def is_current(repo: ModelRepository, name: str, log: Callable[[str], None]) -> bool:
    """Is the newest version of ``name`` published and servable as is? A version exported
    under an older graph contract is not: keeping it would leave the demo model unservable."""
    if name not in repo.list_models():
        return False
    try:
        repo.load_manifest(name)
    except OutdatedManifestError as exc:
        version = repo.list_versions(name)[-1]
        log(f"{name}/{version} is stale: {exc.reason}; re-exporting it as a new version")
        return False
    return True


def build_demo_store(
    checkpoints: Path, store: Path, log: Callable[[str], None], preset: str = "demo"
) -> dict[str, float]:
    """Returns seconds spent per step, keyed like "train alibi" / "export alibi-demo"."""
    timings: dict[str, float] = {}
    repo = ModelRepository(store, create=True)
    for arch in ARCHS:
        ckpt = checkpoints / arch
        if not (ckpt / REPORT_FILE).is_file():
            started = time.perf_counter()
            report = train(arch, preset, ckpt)
            timings[f"train {arch}"] = time.perf_counter() - started
            log(f"trained {arch}: {json.dumps(report)}")
        else:
            log(f"checkpoint {ckpt} exists, not retraining")
        for fmt, pattern in FORMATS.items():
            name = pattern.format(arch=arch)
            if is_current(repo, name, log):
                log(f"{name} already published, not re-exporting")
                continue
            started = time.perf_counter()
            request = ExportRequest(checkpoint=ckpt, store=store, name=name, format=fmt)
            result = export(dataclasses.replace(request, precision=DEMO_PRECISION))
            timings[f"export {name}"] = time.perf_counter() - started
            log(result.summary())
    return timings
