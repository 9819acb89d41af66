"""ModelRepository: layout, resolve, atomic publish, verification."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model_store import (
    MANIFEST_FILE,
    FileEntry,
    Manifest,
    ManifestError,
    ModelNotFoundError,
    ModelRepository,
    PublishError,
    StoreNotFoundError,
    VersionExistsError,
    VersionNotFoundError,
    sha256_file,
)
from model_store import repository as repository_module
from tests.model_store.builders import StageFn, make_manifest


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish_versions(store: ModelRepository, stage: StageFn, name: str, count: int) -> None:
    for _ in range(count):
        store.publish(stage(), make_manifest(name=name))


def visible_entries(store: ModelRepository) -> list[str]:
    return sorted(p.name for p in store.root.iterdir())


# ----------------------------------------------------------------------------- store root


def test_imports_neither_torch_nor_the_other_halves() -> None:
    code = (
        "import sys, model_store, model_store.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'exporters', 'service'}))"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert done.stdout.strip() == "[]"


def test_missing_store_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="not a directory"):
        ModelRepository(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreNotFoundError):
        ModelRepository(tmp_path / "file")
    assert ModelRepository(tmp_path / "a" / "b", create=True).root.is_dir()


def test_sha256_file_reads_in_chunks(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path, chunk_size=7) == sha256_bytes(data)
    assert sha256_file(path) == sha256_bytes(data)


# ----------------------------------------------------------------------------- publish


def test_publish_writes_layout_manifest_and_checksums(
    store: ModelRepository, stage: StageFn
) -> None:
    staging = stage({"model.onnx": 1000, "model.onnx.data": 50_000, "tokenizer.json": 200})
    published = store.publish(staging, make_manifest())

    assert published.version == 1
    assert published.path == store.root / "tiny-alibi" / "1"
    assert published.model_path == published.path / "model.onnx"
    assert published.tokenizer_path == published.path / "tokenizer.json"
    assert sorted(p.name for p in published.path.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
    ]
    for rel in ("model.onnx", "model.onnx.data", "tokenizer.json"):
        data = (staging / rel).read_bytes()
        assert (published.path / rel).read_bytes() == data
        assert published.manifest.files[rel] == FileEntry(sha256=sha256_bytes(data), size=len(data))
    on_disk = Manifest.load(published.path / MANIFEST_FILE)
    assert on_disk == published.manifest
    assert on_disk.version == 1
    assert on_disk.total_size == 51_200
    # The staging directory is the caller's and stays as it was.
    assert sorted(p.name for p in staging.iterdir()) == [
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
    ]
    assert visible_entries(store) == ["tiny-alibi"]  # no temp dir left behind


def test_publish_allocates_next_version_or_uses_pinned(
    store: ModelRepository, stage: StageFn
) -> None:
    assert store.publish(stage(), make_manifest()).version == 1
    assert store.publish(stage(), make_manifest(version=5)).version == 5
    assert store.publish(stage(), make_manifest()).version == 6
    assert store.list_versions("tiny-alibi") == [1, 5, 6]


def test_publish_refuses_existing_version(store: ModelRepository, stage: StageFn) -> None:
    store.publish(stage(), make_manifest(version=2))
    original = (store.root / "tiny-alibi" / "2" / "model.onnx").read_bytes()
    with pytest.raises(VersionExistsError, match="version 2 of model 'tiny-alibi' already exists"):
        store.publish(stage(), make_manifest(version=2))
    assert (store.root / "tiny-alibi" / "2" / "model.onnx").read_bytes() == original
    assert visible_entries(store) == ["tiny-alibi"]


def test_publish_refuses_even_an_empty_existing_version_dir(
    store: ModelRepository, stage: StageFn
) -> None:
    # rename(2) would silently replace an empty directory; publish must not.
    (store.root / "tiny-alibi" / "3").mkdir(parents=True)
    with pytest.raises(VersionExistsError):
        store.publish(stage(), make_manifest(version=3))


def test_lost_allocation_race_retries_with_next_version(
    store: ModelRepository, stage: StageFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.publish(stage(), make_manifest())
    real_rename = os.rename
    raced: list[int] = []

    def rename_after_a_rival(src: str | Path, dst: str | Path) -> None:
        if not raced:  # a rival publisher takes version 2 between allocation and rename
            raced.append(1)
            rival = Path(dst)
            rival.mkdir()
            (rival / "model.onnx").write_bytes(b"rival")
            raise OSError(errno.ENOTEMPTY, "Directory not empty", str(dst))
        real_rename(src, dst)

    monkeypatch.setattr(repository_module.os, "rename", rename_after_a_rival)
    published = store.publish(stage(), make_manifest())
    assert published.version == 3
    assert Manifest.load(published.path / MANIFEST_FILE).version == 3


def test_crash_before_rename_leaves_nothing_visible(
    store: ModelRepository, stage: StageFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.publish(stage(), make_manifest())

    def crash(src: str | Path, dst: str | Path) -> None:
        raise OSError(errno.EIO, "simulated crash before rename")

    monkeypatch.setattr(repository_module.os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.publish(stage(), make_manifest())
    with pytest.raises(OSError, match="simulated crash"):
        store.publish(stage(), make_manifest(name="other-model"))

    assert store.list_models() == ["tiny-alibi"]
    assert store.list_versions("tiny-alibi") == [1]
    assert store.resolve("tiny-alibi").version == 1
    with pytest.raises(ModelNotFoundError):
        store.resolve("other-model")
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]  # temp dirs removed


def test_leftover_temp_dir_is_invisible_and_cleanable(
    store: ModelRepository, stage: StageFn
) -> None:
    # What a writer killed mid-publish leaves: a complete-looking version under a hidden name.
    published = store.publish(stage(), make_manifest(name="ghost"))
    leftover = store.root / ".tmp-ghost-0123abcd"
    os.rename(published.path, leftover)
    shutil.rmtree(store.root / "ghost")
    store.publish(stage(), make_manifest())

    assert store.list_models() == ["tiny-alibi"]
    assert list(store.verify_all()) == [("tiny-alibi", 1)]
    with pytest.raises(ModelNotFoundError):
        store.resolve("ghost")

    assert store.remove_stale_temp_dirs(older_than_seconds=3600) == []  # may still be in use
    assert store.remove_stale_temp_dirs(older_than_seconds=-1) == [leftover]
    assert not leftover.exists()


def test_publish_failure_while_copying_removes_temp_dir(
    store: ModelRepository, stage: StageFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(handle: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(repository_module, "_sync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.publish(stage(), make_manifest())
    assert visible_entries(store) == []


def test_publish_checks_files_the_caller_already_listed(
    store: ModelRepository, stage: StageFn
) -> None:
    staging = stage({"model.onnx": 100, "tokenizer.json": 10})
    files = {
        rel: FileEntry(sha256=sha256_file(staging / rel), size=(staging / rel).stat().st_size)
        for rel in ("model.onnx", "tokenizer.json")
    }
    assert store.publish(staging, make_manifest(files=files)).manifest.files == files

    wrong = {**files, "model.onnx": FileEntry(sha256="0" * 64, size=100)}
    with pytest.raises(PublishError, match=r"model.onnx: manifest says sha256 0{64}"):
        store.publish(staging, make_manifest(files=wrong))
    assert store.list_versions("tiny-alibi") == [1]


def test_publish_rejects_bad_staging(
    store: ModelRepository, stage: StageFn, tmp_path: Path
) -> None:
    with pytest.raises(PublishError, match="staging directory not found"):
        store.publish(tmp_path / "absent", make_manifest())
    with pytest.raises(PublishError, match=r"lacks \['model.onnx'\]"):
        store.publish(stage({"model.ts": 10, "tokenizer.json": 10}), make_manifest())
    with pytest.raises(PublishError, match=r"manifest\.json is written by publish"):
        store.publish(
            stage({"model.onnx": 1, "tokenizer.json": 1, "manifest.json": 1}), make_manifest()
        )
    with pytest.raises(PublishError, match="not a plain relative path"):
        store.publish(
            stage({"model.onnx": 1, "tokenizer.json": 1, ".DS_Store": 1}), make_manifest()
        )
    assert visible_entries(store) == []


def test_publish_keeps_subdirectories(store: ModelRepository, stage: StageFn) -> None:
    published = store.publish(
        stage({"model.onnx": 10, "tokenizer.json": 10, "extra/vocab.txt": 10}), make_manifest()
    )
    assert "extra/vocab.txt" in published.manifest.files
    assert store.verify("tiny-alibi", 1).ok


# ----------------------------------------------------------------------------- list / resolve


def test_list_and_resolve_latest_or_pinned(store: ModelRepository, stage: StageFn) -> None:
    publish_versions(store, stage, "tiny-alibi", 3)
    publish_versions(store, stage, "enc-linformer", 1)
    # Noise that is not a version: hidden, non-integer, zero-padded, zero, a stray file.
    model_dir = store.root / "tiny-alibi"
    for junk in (".tmp-x", "latest", "007", "0", "10a"):
        (model_dir / junk).mkdir()
    (model_dir / "12").write_text("a file, not a version directory")
    (store.root / "README.txt").write_text("not a model")
    (store.root / "Not-A-Valid-Name").mkdir()
    (store.root / "empty-model").mkdir()

    assert store.list_models() == ["enc-linformer", "tiny-alibi"]
    assert store.list_versions("tiny-alibi") == [1, 2, 3]
    assert store.resolve("tiny-alibi").version == 3
    assert store.resolve("tiny-alibi", "latest").version == 3
    pinned = store.resolve("tiny-alibi", 2)
    assert (pinned.version, pinned.manifest.version, pinned.path) == (2, 2, model_dir / "2")
    assert store.load_manifest("tiny-alibi", 1).version == 1


def test_resolve_errors_are_typed(store: ModelRepository, stage: StageFn) -> None:
    publish_versions(store, stage, "tiny-alibi", 2)
    with pytest.raises(ModelNotFoundError, match="'nope'") as missing:
        store.resolve("nope")
    assert missing.value.name == "nope"
    with pytest.raises(VersionNotFoundError, match=r"available: \[1, 2\]") as info:
        store.resolve("tiny-alibi", 7)
    assert (info.value.name, info.value.version, info.value.available) == ("tiny-alibi", 7, [1, 2])
    with pytest.raises(ModelNotFoundError):
        store.resolve("../etc")
    with pytest.raises(ModelNotFoundError):
        store.list_versions("nope")


def test_resolve_rejects_manifest_that_lies_about_its_place(
    store: ModelRepository, stage: StageFn
) -> None:
    published = store.publish(stage(), make_manifest())
    copy = store.root / "tiny-alibi" / "2"
    shutil.copytree(published.path, copy)
    with pytest.raises(ManifestError, match="describes tiny-alibi/1 but lives in tiny-alibi/2"):
        store.resolve("tiny-alibi")


# ----------------------------------------------------------------------------- verify


def test_verify_ok_after_publish(store: ModelRepository, stage: StageFn) -> None:
    publish_versions(store, stage, "tiny-alibi", 2)
    result = store.verify("tiny-alibi", 2)
    assert result.ok
    assert (result.name, result.version, result.mismatches, result.extra_files) == (
        "tiny-alibi",
        2,
        [],
        [],
    )
    assert all(r.ok for r in store.verify_all().values())


def test_tampered_file_fails_verify_with_both_hashes(
    store: ModelRepository, stage: StageFn
) -> None:
    published = store.publish(stage(), make_manifest())
    target = published.path / "model.onnx.data"
    data = bytearray(target.read_bytes())
    data[1234] ^= 0xFF  # same size, one flipped byte
    target.write_bytes(bytes(data))

    result = store.verify("tiny-alibi", 1)
    assert not result.ok
    [mismatch] = result.mismatches
    assert mismatch.file == "model.onnx.data"
    assert mismatch.expected_sha256 == published.manifest.files["model.onnx.data"].sha256
    assert mismatch.actual_sha256 == sha256_bytes(bytes(data))
    assert mismatch.expected_size == mismatch.actual_size == len(data)
    assert not mismatch.missing


def test_deleted_file_reported_missing(store: ModelRepository, stage: StageFn) -> None:
    published = store.publish(stage(), make_manifest())
    (published.path / "tokenizer.json").unlink()
    [mismatch] = store.verify("tiny-alibi").mismatches
    assert mismatch.file == "tokenizer.json"
    assert mismatch.missing and mismatch.actual_sha256 is None and mismatch.actual_size is None


def test_extra_file_reported(store: ModelRepository, stage: StageFn) -> None:
    published = store.publish(stage(), make_manifest())
    (published.path / "sneaky.bin").write_bytes(b"x")
    (published.path / "sub").mkdir()
    (published.path / "sub" / "more.bin").write_bytes(b"y")
    result = store.verify("tiny-alibi", 1)
    assert not result.ok
    assert result.mismatches == []
    assert result.extra_files == ["sneaky.bin", "sub/more.bin"]


def test_unreadable_manifest_is_reported_not_raised(store: ModelRepository, stage: StageFn) -> None:
    publish_versions(store, stage, "tiny-alibi", 2)
    (store.root / "tiny-alibi" / "1" / MANIFEST_FILE).write_text("{")
    results = store.verify_all()
    assert not results[("tiny-alibi", 1)].ok
    assert "invalid JSON" in (results[("tiny-alibi", 1)].error or "")
    assert results[("tiny-alibi", 2)].ok


def test_newer_schema_in_store_is_reported(store: ModelRepository, stage: StageFn) -> None:
    published = store.publish(stage(), make_manifest())
    path = published.path / MANIFEST_FILE
    document = json.loads(path.read_text())
    document["schema_version"] = 99
    path.write_text(json.dumps(document))
    result = store.verify("tiny-alibi")
    assert result.error is not None and "newer than this model_store supports" in result.error


def test_verify_all_filters_by_name_and_orders_keys(store: ModelRepository, stage: StageFn) -> None:
    publish_versions(store, stage, "b-model", 2)
    publish_versions(store, stage, "a-model", 1)
    assert list(store.verify_all()) == [("a-model", 1), ("b-model", 1), ("b-model", 2)]
    assert list(store.verify_all("b-model")) == [("b-model", 1), ("b-model", 2)]
    with pytest.raises(ModelNotFoundError):
        store.verify_all("c-model")
    with pytest.raises(VersionNotFoundError):
        store.verify("a-model", 2)
