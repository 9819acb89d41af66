"""One loaded model version: manifest + tokenizer + backend, built only from verified files.

This is the seam between the model store and both engines (encode batcher, generation engine):
neither touches the disk; both receive a :class:`LoadedModel`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from model_store import (
    Manifest,
    ModelNotFoundError,
    ModelRepository,
    ModelStoreError,
    ModelVersion,
    OutdatedManifestError,
    VersionNotFoundError,
)
from service.backends import Backend, BackendError, create_backend
from service.engine.errors import ModelLoadError, ModelNotFound, ModelVerificationError
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    version: int
    manifest: Manifest
    tokenizer: Tokenizer
    backend: Backend
    threads: int | None = None  # intra-op threads it was given (None: the runtime's default)

    #: Width of the graph's ``hidden`` output (the embedding width), read once at load; None
    #: for graphs without one (kv_cache decoders). Not the config's d_model: a Reformer that
    #: concatenates its streams is 2·d_model wide (docs/contracts.md).
    hidden_size: int | None = field(init=False)

    def __post_init__(self) -> None:
        self.hidden_size = hidden_size(self.manifest)

    def close(self) -> None:
        self.backend.close()


def hidden_size(manifest: Manifest) -> int | None:
    """The last axis of the graph's ``hidden`` output, when it has one and it is static."""
    try:
        width = manifest.signature.output("hidden").shape[-1]
    except KeyError:
        return None
    return width if isinstance(width, int) else None


def resolve_version(repo: ModelRepository, name: str, version: int | None) -> ModelVersion:
    """The pinned or highest version; store errors become engine errors the API can map."""
    try:
        return repo.resolve(name, version)
    except (ModelNotFoundError, VersionNotFoundError) as exc:
        raise ModelNotFound(name, detail=str(exc)) from exc
    except OutdatedManifestError as exc:
        # Its files are intact (verification would pass): say what to do.
        raise ModelLoadError(
            name,
            version,
            f"{exc.reason}. Re-export it from its checkpoint: python -m exporters export "
            f"<checkpoint> --format {exc.format or '<format>'} --store <store> --name {name} "
            "(for the demo store, `make models` rebuilds it)",
        ) from exc
    except ModelStoreError as exc:
        raise ModelLoadError(name, version, str(exc)) from exc


def verify_version(repo: ModelRepository, resolved: ModelVersion) -> None:
    """Re-hash every file; raise :class:`ModelVerificationError` naming each bad file."""
    result = repo.verify(resolved.name, resolved.version)
    if result.ok:
        return
    if result.error is not None:
        raise ModelVerificationError(resolved.name, resolved.version, [], result.error)
    problems = [
        f"{m.file} is missing"
        if m.missing
        else f"{m.file} has sha256 {m.actual_sha256}, manifest says {m.expected_sha256}"
        for m in result.mismatches
    ] + [f"{f} is not listed in the manifest" for f in result.extra_files]
    files = [m.file for m in result.mismatches] + result.extra_files
    raise ModelVerificationError(resolved.name, resolved.version, files, "; ".join(problems))


def load_model(
    repo: ModelRepository,
    name: str,
    version: int | None,
    settings: Settings,
    threads: int | None = None,
) -> LoadedModel:
    """Verify checksums -> read tokenizer -> create backend. Blocking: call it off the event loop.

    Raises ``ModelNotFound`` (no such model/version), ``ModelVerificationError`` (checksums) or
    ``ModelLoadError`` (anything else that stops the version from loading, including a graph
    exported under an older contract, whose manifest's migration refuses it).
    """
    resolved = resolve_version(repo, name, version)
    verify_version(repo, resolved)
    try:
        tokenizer = Tokenizer.from_file(str(resolved.tokenizer_path))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise ModelLoadError(name, resolved.version, f"{resolved.tokenizer_path}: {exc}") from exc
    # The service pads and truncates itself (contracts.md): a tokenizer.json saved with padding or
    # truncation enabled must not change what encode() returns.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    try:
        backend = create_backend(resolved, settings, threads)
    except BackendError as exc:
        raise ModelLoadError(name, resolved.version, str(exc)) from exc
    log.info(
        "loaded %s/%d (%s, %s, %s) on %s, %s intra-op threads",
        name, resolved.version, resolved.manifest.architecture, resolved.manifest.format,
        resolved.manifest.precision, backend.provider, threads or "default",
    )  # fmt: skip
    return LoadedModel(name, resolved.version, resolved.manifest, tokenizer, backend, threads)
