"""``make models``: the demo store, every architecture in ONNX (``<arch>-demo``) and TorchScript
(``<arch>-demo-ts``), built from demo checkpoints that are trained once and cached.

A second run trains nothing and exports nothing that is already published; it only verifies.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from exporters.checkpoint import REPORT_FILE
from exporters.export import ExportRequest, export
from exporters.training import train
from model_store import ModelRepository

ARCHS = ("linformer", "reformer", "alibi", "shatter")
FORMATS = {"onnx": "{arch}-demo", "torchscript": "{arch}-demo-ts"}


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
            if name in repo.list_models():
                log(f"{name} already published, not re-exporting")
                continue
            started = time.perf_counter()
            result = export(ExportRequest(checkpoint=ckpt, store=store, name=name, format=fmt))
            timings[f"export {name}"] = time.perf_counter() - started
            log(result.summary())
    return timings
