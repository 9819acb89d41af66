"""The on-disk model repository: ``<root>/<name>/<version>/`` holding manifest, model, tokenizer.

Versions are positive integers; the highest is served unless one is pinned. A version directory
is immutable once visible: :meth:`ModelRepository.publish` builds it under a hidden temp
directory in the same store (``<root>/.tmp-<name>-<hex>/``), fsyncs every file and directory,
then renames it into place, so a reader sees either the whole version or nothing. Anything whose
name starts with a dot, or that is not a canonical positive integer, is not a version.

Checksums are not checked on resolve (that reads every byte); callers that are about to serve a
version call :meth:`ModelRepository.verify` first.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from model_store.errors import (
    ManifestError,
    ModelNotFoundError,
    OutdatedManifestError,
    PublishError,
    StoreNotFoundError,
    VersionExistsError,
    VersionNotFoundError,
)
from model_store.manifest import (
    MANIFEST_FILE,
    UNASSIGNED_VERSION,
    FileEntry,
    Manifest,
    check_relative_path,
    is_valid_name,
)

CHUNK_SIZE = 8 * 1024 * 1024
TEMP_PREFIX = ".tmp-"
_VERSION_DIR = re.compile(r"[1-9][0-9]*")
# A concurrent publisher can take the version we allocated; retry with the next one this often.
_MAX_ALLOCATION_ATTEMPTS = 100

VersionSpec = int | Literal["latest"] | None


def sha256_file(path: Path, chunk_size: int = CHUNK_SIZE) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB weights never sit in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelVersion:
    """One resolved version: where it lives and what its manifest says (checksums unverified)."""

    name: str
    version: int
    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest.tokenizer_file


@dataclass(frozen=True)
class FileMismatch:
    """A listed file whose bytes differ from the manifest; ``actual_sha256`` None = missing."""

    file: str
    expected_sha256: str
    actual_sha256: str | None
    expected_size: int
    actual_size: int | None

    @property
    def missing(self) -> bool:
        return self.actual_sha256 is None


@dataclass(frozen=True)
class VerificationResult:
    """Checksums of one version directory against its manifest.

    ``error`` is set when the manifest itself cannot be read (then nothing else was checked);
    ``outdated`` too when that is because its schema's migration refuses the graph (the version
    is intact but no longer servable: re-export it).
    Files present on disk but not listed in the manifest make the version fail too: a published
    directory is exactly what was published.
    """

    name: str
    version: int
    path: Path
    mismatches: list[FileMismatch] = field(default_factory=list)
    extra_files: list[str] = field(default_factory=list)
    error: str | None = None
    outdated: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.mismatches and not self.extra_files


class ModelRepository:
    """A model store rooted at ``root``; ``create=True`` makes the directory if it is missing."""

    def __init__(self, root: Path, *, create: bool = False) -> None:
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        if not self.root.is_dir():
            raise StoreNotFoundError(self.root)

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.root)!r})"

    # ----------------------------------------------------------------------------- reading

    def list_models(self) -> list[str]:
        """Names with at least one version, sorted. Hidden and temp directories never count."""
        names = []
        for entry in self.root.iterdir():
            if entry.is_dir() and is_valid_name(entry.name) and self._versions(entry.name):
                names.append(entry.name)
        return sorted(names)

    def list_versions(self, name: str) -> list[int]:
        """Versions of ``name``, ascending; raises ``ModelNotFoundError`` when there are none."""
        versions = self._versions(name)
        if not versions:
            raise ModelNotFoundError(name)
        return versions

    def resolve(self, name: str, version: VersionSpec = None) -> ModelVersion:
        """The pinned ``version``, or the highest one for ``"latest"``/None, with its manifest."""
        chosen = self._choose(name, version)
        return ModelVersion(name, chosen, self.version_path(name, chosen), self._read(name, chosen))

    def load_manifest(self, name: str, version: VersionSpec = None) -> Manifest:
        return self.resolve(name, version).manifest

    def version_path(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    def _choose(self, name: str, version: VersionSpec) -> int:
        versions = self.list_versions(name)
        if version is None or version == "latest":
            return versions[-1]
        if isinstance(version, bool) or not isinstance(version, int):
            raise TypeError(f"version must be an int, 'latest' or None, got {version!r}")
        if version not in versions:
            raise VersionNotFoundError(name, version, versions)
        return version

    def _versions(self, name: str) -> list[int]:
        if not is_valid_name(name):
            return []
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        return sorted(
            int(entry.name)
            for entry in model_dir.iterdir()
            if _VERSION_DIR.fullmatch(entry.name) and entry.is_dir()
        )

    def _read(self, name: str, version: int) -> Manifest:
        path = self.version_path(name, version) / MANIFEST_FILE
        manifest = Manifest.load(path)
        if manifest.name != name or manifest.version != version:
            raise ManifestError(
                path,
                f"manifest describes {manifest.name}/{manifest.version} "
                f"but lives in {name}/{version}",
            )
        return manifest

    # ----------------------------------------------------------------------------- verifying

    def verify(self, name: str, version: VersionSpec = None) -> VerificationResult:
        """Re-hash every file of one version against its manifest (missing, changed, extra)."""
        chosen = self._choose(name, version)
        path = self.version_path(name, chosen)
        try:
            manifest = self._read(name, chosen)
        except OutdatedManifestError as exc:
            return VerificationResult(name, chosen, path, error=str(exc), outdated=True)
        except ManifestError as exc:
            return VerificationResult(name, chosen, path, error=str(exc))

        on_disk = set(_relative_files(path)) - {MANIFEST_FILE}
        mismatches = []
        for file, entry in sorted(manifest.files.items()):
            if file not in on_disk:
                mismatches.append(FileMismatch(file, entry.sha256, None, entry.size, None))
                continue
            try:
                actual_size = (path / file).stat().st_size
                actual_sha256 = sha256_file(path / file)
            except FileNotFoundError:  # deleted while we were walking
                mismatches.append(FileMismatch(file, entry.sha256, None, entry.size, None))
                continue
            if actual_sha256 != entry.sha256 or actual_size != entry.size:
                mismatches.append(
                    FileMismatch(file, entry.sha256, actual_sha256, entry.size, actual_size)
                )
        extra = sorted(on_disk - manifest.files.keys())
        return VerificationResult(name, chosen, path, mismatches, extra)

    def verify_all(self, name: str | None = None) -> dict[tuple[str, int], VerificationResult]:
        """Every version of every model (or of ``name``), keyed by (name, version), in order."""
        names = [name] if name is not None else self.list_models()
        results = {}
        for model in names:
            for version in self.list_versions(model):
                results[(model, version)] = self.verify(model, version)
        return results

    # ----------------------------------------------------------------------------- publishing

    def publish(self, staging_dir: Path, manifest: Manifest) -> ModelVersion:
        """Copy ``staging_dir`` into the store as a new, immutable version of ``manifest.name``.

        The version is ``manifest.version``, or the next free one (highest + 1) when it is
        ``UNASSIGNED_VERSION`` (0); an existing version is never overwritten
        (``VersionExistsError``). ``manifest.files`` is filled with the sha256 and size of every
        staged file; if the caller already listed files, they must match what was copied.
        The staging directory is left untouched. Returns the published version.
        """
        staging_dir = Path(staging_dir)
        if not staging_dir.is_dir():
            raise PublishError(f"staging directory not found: {staging_dir}")
        staged = _staged_files(staging_dir)
        missing = [f for f in (manifest.model_file, manifest.tokenizer_file) if f not in staged]
        if missing:
            raise PublishError(f"{staging_dir} lacks {missing} named by the manifest")
        pinned = manifest.version != UNASSIGNED_VERSION
        if pinned and self.version_path(manifest.name, manifest.version).exists():
            raise VersionExistsError(manifest.name, manifest.version)  # before copying GBs

        temp = self.root / f"{TEMP_PREFIX}{manifest.name}-{uuid.uuid4().hex}"
        temp.mkdir()
        try:
            files = {rel: _copy_synced(staging_dir / rel, temp / rel) for rel in staged}
            if manifest.files and manifest.files != files:
                raise PublishError(_describe_difference(manifest.files, files))
            model_dir = self.root / manifest.name
            if not model_dir.is_dir():
                model_dir.mkdir()
                _fsync_dir(self.root)
            published = self._rename_into_place(temp, manifest, files, pinned)
            _fsync_dir(model_dir)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return published

    def _rename_into_place(
        self, temp: Path, manifest: Manifest, files: dict[str, FileEntry], pinned: bool
    ) -> ModelVersion:
        version = manifest.version if pinned else self._next_version(manifest.name)
        for _ in range(_MAX_ALLOCATION_ATTEMPTS):
            final_manifest = Manifest.model_validate(
                {**manifest.model_dump(), "version": version, "files": files}
            )
            _write_synced(temp / MANIFEST_FILE, final_manifest.to_json().encode("utf-8"))
            for directory in _directories_bottom_up(temp):
                _fsync_dir(directory)
            final = self.version_path(manifest.name, version)
            try:
                # Linux lets rename() replace an EMPTY directory, so refuse any existing path.
                if final.exists():
                    raise FileExistsError(errno.EEXIST, "version exists", str(final))
                os.rename(temp, final)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                if pinned:
                    raise VersionExistsError(manifest.name, version) from exc
                version = max(version + 1, self._next_version(manifest.name))
                continue
            return ModelVersion(manifest.name, version, final, final_manifest)
        raise PublishError(
            f"could not allocate a version of {manifest.name!r}: too much contention"
        )

    def _next_version(self, name: str) -> int:
        versions = self._versions(name)
        return versions[-1] + 1 if versions else 1

    def remove_stale_temp_dirs(self, older_than_seconds: float = 3600.0) -> list[Path]:
        """Delete publish temp dirs left by crashed writers (younger ones may still be in use)."""
        cutoff = time.time() - older_than_seconds
        removed = []
        for entry in self.root.iterdir():
            is_temp = entry.name.startswith(TEMP_PREFIX) and entry.is_dir()
            if is_temp and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed


def _relative_files(directory: Path) -> Iterator[str]:
    """Regular files under ``directory`` as POSIX paths relative to it."""
    for dirpath, _, filenames in os.walk(directory):
        for filename in filenames:
            yield (Path(dirpath) / filename).relative_to(directory).as_posix()


def _staged_files(staging_dir: Path) -> list[str]:
    problems = []
    files = []
    for dirpath, dirnames, filenames in os.walk(staging_dir):
        for dirname in dirnames:
            if (Path(dirpath) / dirname).is_symlink():
                problems.append(f"{dirname}: symlinked directories are not published")
        for rel in (
            (Path(dirpath) / filename).relative_to(staging_dir).as_posix() for filename in filenames
        ):
            try:
                check_relative_path(rel)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if rel == MANIFEST_FILE:
                problems.append(f"{MANIFEST_FILE} is written by publish, not staged")
            else:
                files.append(rel)
    if problems:
        raise PublishError(f"cannot publish {staging_dir}: " + "; ".join(problems))
    return sorted(files)


def _copy_synced(source: Path, target: Path) -> FileEntry:
    """Copy and hash in one pass, then fsync; returns the checksum of the bytes written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with source.open("rb") as src, target.open("xb") as dst:
        while chunk := src.read(CHUNK_SIZE):
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
        _sync(dst)
    return FileEntry(sha256=digest.hexdigest(), size=size)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        _sync(handle)


def _sync(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _directories_bottom_up(root: Path) -> Iterator[Path]:
    for dirpath, _, _ in os.walk(root, topdown=False):
        yield Path(dirpath)


def _describe_difference(expected: dict[str, FileEntry], actual: dict[str, FileEntry]) -> str:
    lines = []
    for file in sorted(expected.keys() | actual.keys()):
        want, got = expected.get(file), actual.get(file)
        if want == got:
            continue
        if want is None:
            lines.append(f"{file}: staged but not listed in manifest.files")
        elif got is None:
            lines.append(f"{file}: listed in manifest.files but not staged")
        else:
            lines.append(f"{file}: manifest says sha256 {want.sha256}, staged copy is {got.sha256}")
    return "manifest.files disagrees with the staged files: " + "; ".join(lines)
