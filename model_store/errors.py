"""Typed errors of the model store; every one derives from :class:`ModelStoreError`.

Each carries the fields a caller needs to answer without parsing the message (the service maps
``ModelNotFoundError`` to 404 ``model_not_found``, for example).
"""

from __future__ import annotations

from pathlib import Path


class ModelStoreError(Exception):
    """Base class: anything the model store refuses or cannot read."""


class StoreNotFoundError(ModelStoreError):
    """The store root does not exist (or is not a directory)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        super().__init__(f"model store not found: {root} is not a directory")


class ManifestError(ModelStoreError):
    """A manifest that cannot be read as it is: bad JSON, failed validation, unknown schema."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class OutdatedManifestError(ManifestError):
    """A manifest of an older schema whose graph this version of Longhaul cannot serve: its
    migration refuses it. The files are intact; re-exporting the checkpoint replaces it."""

    def __init__(self, path: Path, reason: str, schema_version: int, format: str | None) -> None:
        super().__init__(path, reason)
        self.schema_version = schema_version
        self.format = format


class ModelNotFoundError(ModelStoreError):
    """No model of that name has any version in the store."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"model not found: {name!r}")


class VersionNotFoundError(ModelStoreError):
    """The model exists but not at that version."""

    def __init__(self, name: str, version: int, available: list[int]) -> None:
        self.name = name
        self.version = version
        self.available = available
        super().__init__(
            f"version {version} of model {name!r} not found (available: {available or 'none'})"
        )


class VersionExistsError(ModelStoreError):
    """Publishing would overwrite a version that is already in the store."""

    def __init__(self, name: str, version: int) -> None:
        self.name = name
        self.version = version
        super().__init__(
            f"version {version} of model {name!r} already exists; versions are immutable"
        )


class PublishError(ModelStoreError):
    """The staging directory or the manifest given to ``publish`` is not publishable."""
