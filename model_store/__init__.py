"""Longhaul's on-disk model repository, shared by exporters (write) and service (read).

Standard library and pydantic only: never imports torch, ``exporters`` or ``service``.
"""

from model_store.errors import (
    ManifestError,
    ModelNotFoundError,
    ModelStoreError,
    OutdatedManifestError,
    PublishError,
    StoreNotFoundError,
    VersionExistsError,
    VersionNotFoundError,
)
from model_store.manifest import (
    MANIFEST_FILE,
    NEW_ENTRIES_OUTPUT,
    PAST_INPUT_PREFIX,
    SCHEMA_VERSION,
    UNASSIGNED_VERSION,
    CacheLayout,
    ExtrapolationReport,
    FileEntry,
    GraphSignature,
    Manifest,
    MemoryBoundReport,
    ParityCase,
    ParityReport,
    Provenance,
    TensorSpec,
    past_input_names,
    past_inputs,
)
from model_store.repository import (
    FileMismatch,
    ModelRepository,
    ModelVersion,
    VerificationResult,
    sha256_file,
)

__all__ = [
    "MANIFEST_FILE",
    "NEW_ENTRIES_OUTPUT",
    "PAST_INPUT_PREFIX",
    "SCHEMA_VERSION",
    "UNASSIGNED_VERSION",
    "CacheLayout",
    "ExtrapolationReport",
    "FileEntry",
    "FileMismatch",
    "GraphSignature",
    "Manifest",
    "ManifestError",
    "MemoryBoundReport",
    "ModelNotFoundError",
    "ModelRepository",
    "ModelStoreError",
    "ModelVersion",
    "OutdatedManifestError",
    "ParityCase",
    "ParityReport",
    "Provenance",
    "PublishError",
    "StoreNotFoundError",
    "TensorSpec",
    "VerificationResult",
    "VersionExistsError",
    "VersionNotFoundError",
    "past_input_names",
    "past_inputs",
    "sha256_file",
]
