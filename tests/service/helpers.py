"""Store manipulation helpers for service tests (new versions, corruption)."""

from __future__ import annotations

import shutil
from pathlib import Path

from model_store import MANIFEST_FILE, UNASSIGNED_VERSION, ModelRepository


def publish_copy(store: Path, name: str, tmp: Path) -> int:
    """Publish the newest version of ``name`` again as the next version; returns its number."""
    repo = ModelRepository(store)
    current = repo.resolve(name)
    staging = tmp / f"staging-{name}-{current.version}"
    shutil.copytree(current.path, staging)
    (staging / MANIFEST_FILE).unlink()
    manifest = current.manifest.model_copy(update={"version": UNASSIGNED_VERSION, "files": {}})
    return repo.publish(staging, manifest).version


def corrupt_model_file(store: Path, name: str, version: int) -> Path:
    """Flip bytes in the middle of the model file (checksums no longer match)."""
    path = ModelRepository(store).resolve(name, version).model_path
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))
    return path
