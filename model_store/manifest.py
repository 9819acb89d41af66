"""``manifest.json``: what a published model version is, how it was made and how it was checked.

One manifest per version directory (``<store>/<name>/<version>/manifest.json``). Exporters build
it, :meth:`ModelRepository.publish <model_store.repository.ModelRepository.publish>` fills in the
version and the file checksums, the service reads it to choose a backend, enforce
``max_context`` and wire the graph's inputs and outputs. Every model here is frozen and rejects
unknown fields, so a typo in a hand-edited manifest is an error rather than a silent default.

Documents written by an older ``schema_version`` are upgraded on load through
:data:`MIGRATIONS`, or refused with an :class:`OutdatedManifestError` where the graph they
describe cannot be served any more; documents from a newer one are refused with a
:class:`ManifestError`. Every change to what a manifest means bumps :data:`SCHEMA_VERSION`
(docs/decisions.md, "Manifest schema versions").
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, Protocol, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model_store.errors import ManifestError, OutdatedManifestError

# 1: the first schema. 2: a kv_cache graph returns only the new tokens' cache entries
# (new_key_values). 3: its past goes in as one input per layer and per key/value (cache.inputs,
# whose common prefix is cache.input_prefix, formerly cache.input).
SCHEMA_VERSION = 3
MANIFEST_FILE = "manifest.json"
# A manifest built before publishing does not know its version yet; publish allocates one.
UNASSIGNED_VERSION = 0

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
DTYPES = (
    "bool",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
)
# The model file each format is stored under (docs/architecture.md, "model_store").
MODEL_FILE_SUFFIX = {"onnx": ".onnx", "torchscript": ".ts"}

Architecture = Literal["linformer", "reformer", "alibi", "shatter"]
Task = Literal["encode", "generate"]
Format = Literal["onnx", "torchscript"]
Precision = Literal["fp32", "bf16", "fp16", "int8"]
GenerationMode = Literal["kv_cache", "full_sequence"]

Document = dict[str, Any]


def check_relative_path(path: str) -> str:
    """A file name inside a version directory: relative, POSIX, no ``..``, nothing hidden."""
    parts = path.split("/")
    if (
        not path
        or "\\" in path
        or path.startswith("/")
        or any(part in ("", ".", "..") or part.startswith(".") for part in parts)
    ):
        raise ValueError(f"{path!r} is not a plain relative path inside the version directory")
    return path


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class FileEntry(_Frozen):
    sha256: str = Field(pattern=SHA256_PATTERN, description="lower-case hex digest")
    size: int = Field(ge=0, description="bytes")


class TensorSpec(_Frozen):
    """One graph input or output. String axes are dynamic and named ("batch", "sequence")."""

    name: str = Field(min_length=1)
    dtype: str
    shape: list[str | int]

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; expected one of {', '.join(DTYPES)}")
        return value

    @field_validator("shape")
    @classmethod
    def _axes(cls, value: list[str | int]) -> list[str | int]:
        for axis in value:
            if isinstance(axis, int) and axis < 0:
                raise ValueError(f"static axis sizes must be >= 0, got {axis}")
            if isinstance(axis, str) and not axis.strip():
                raise ValueError("dynamic axis names must not be empty")
        return value


# docs/contracts.md: a kv_cache graph returns only the new tokens' cache entries, under this
# name (schema 2 on; see MIGRATIONS for older graphs).
NEW_ENTRIES_OUTPUT: Final = "new_key_values"
# The past goes in as one input per layer and per key/value, named as Hugging Face Optimum
# names them; one stacked past input made ONNX Runtime copy the whole cache every step.
PAST_INPUT_PREFIX = "past_key_values"


def past_input_names(prefix: str, n_layers: int) -> list[str]:
    """The 2L past inputs, layer-major, key before value: ``{prefix}.{l}.key``,
    ``{prefix}.{l}.value`` (docs/contracts.md)."""
    return [f"{prefix}.{layer}.{kv}" for layer in range(n_layers) for kv in ("key", "value")]


class StackedCache(Protocol):
    """An (L, 2, b, h, P, e) array (numpy or torch): all :func:`past_inputs` needs of it."""

    @property
    def shape(self) -> Sequence[int]: ...

    def __getitem__(self, index: tuple[int, int], /) -> Any: ...


def past_inputs(cache: StackedCache, names: Sequence[str]) -> dict[str, Any]:
    """A stacked cache (L, 2, b, h, P, e) as a ``kv_cache`` graph's per-layer past inputs,
    ``names`` in graph order (:func:`past_input_names`, a layout's ``inputs``):
    ``{prefix}.{l}.key`` = cache[l, 0], ``{prefix}.{l}.value`` = cache[l, 1].

    Views, not copies: for a C-contiguous cache each is one contiguous block, which ONNX
    Runtime's Python binding and ``torch.from_numpy`` read in place (docs/decisions.md,
    "One past input per layer", has the measurement).
    """
    layers = cache.shape[0]
    if len(names) != 2 * layers:
        raise ValueError(f"{len(names)} past inputs for a cache of {layers} layers")
    return {name: cache[i // 2, i % 2] for i, name in enumerate(names)}


class CacheLayout(_Frozen):
    """The KV cache of a ``kv_cache`` decoder: the past in as one (batch, heads, past_sequence,
    head_dim) input per layer and per key/value (``inputs``), only the new tokens' entries out,
    stacked (layers, 2, batch, heads, sequence, head_dim) (``output``). ``layout`` names the
    axes of the cache as a whole (the output, and the buffer a server keeps): past input
    ``inputs[2 l + kv]`` is its slice ``[l, kv]``."""

    input_prefix: str = Field(
        min_length=1,
        description="prefix of the per-layer past inputs' names, e.g. past_key_values",
    )
    inputs: list[str] = Field(
        min_length=2,
        description="per-layer past inputs, layer-major, key before value: "
        "past_key_values.{l}.key, past_key_values.{l}.value (past_input_names)",
    )
    output: Literal["new_key_values"] = Field(
        description="graph output holding only the new tokens' entries",
    )
    layout: list[str] = Field(
        min_length=1,
        description='axis names, e.g. ["layers","2","batch","heads","past_sequence","head_dim"]',
    )
    n_layers: int = Field(ge=1)
    n_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    dtype: str

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        return TensorSpec._known_dtype(value)

    @model_validator(mode="after")
    def _one_input_per_layer_and_kv(self) -> Self:
        expected = past_input_names(self.input_prefix, self.n_layers)
        if self.inputs != expected:
            raise ValueError(
                f"past inputs {self.inputs} for {self.n_layers} layers: expected one key and "
                f"one value input per layer, named {expected}"
            )
        return self


class GraphSignature(_Frozen):
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    generation_mode: GenerationMode | None = None
    cache: CacheLayout | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            names = [spec.name for spec in specs]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"duplicate {kind} names: {duplicates}")
        if self.generation_mode == "kv_cache" and self.cache is None:
            raise ValueError("generation_mode 'kv_cache' requires a cache layout")
        if self.cache is not None:
            if self.generation_mode != "kv_cache":
                raise ValueError(
                    "a cache layout is only meaningful with generation_mode 'kv_cache'"
                )
            graph_inputs = {spec.name for spec in self.inputs}
            missing = [name for name in self.cache.inputs if name not in graph_inputs]
            if missing:
                raise ValueError(f"cache inputs {missing} are not graph inputs")
            if self.cache.output not in {spec.name for spec in self.outputs}:
                raise ValueError(f"cache output {self.cache.output!r} is not a graph output")
        return self

    def input(self, name: str) -> TensorSpec:
        return _spec(self.inputs, name, "input")

    def output(self, name: str) -> TensorSpec:
        return _spec(self.outputs, name, "output")


def _spec(specs: list[TensorSpec], name: str, kind: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(f"no graph {kind} named {name!r}")


class ParityCase(_Frozen):
    """Exported graph vs reference on one (batch, length) input."""

    batch: int = Field(ge=1)
    length: int = Field(ge=1)
    max_abs_diff: float = Field(ge=0)
    of_bound: float | None = Field(
        default=None, ge=0, description="fp32: the worst output's share of the rule's bound"
    )
    cosine: float | None = Field(default=None, ge=-1.0, le=1.0)
    argmax_agreement: float | None = Field(default=None, ge=0.0, le=1.0)


class ParityReport(_Frozen):
    reference: str = Field(min_length=1, description='e.g. "eager fp32 PyTorch"')
    lengths: list[int] = Field(min_length=1)
    cases: list[ParityCase]
    max_abs_diff: float = Field(ge=0, description="worst case over all cases")
    tolerance: float | None = Field(
        default=None, gt=0, description="fp32: the rule's relative tolerance (see rule)"
    )
    rule: str | None = Field(default=None, description="the pass rule, as text")
    min_cosine: float | None = Field(default=None, ge=-1.0, le=1.0)
    argmax_agreement: float | None = Field(default=None, ge=0.0, le=1.0)
    passed: bool


class Provenance(_Frozen):
    source_checkpoint: str
    source_checkpoint_sha256: str = Field(pattern=SHA256_PATTERN)
    exporter_version: str
    created_at: datetime = Field(description="timezone-aware; stored in UTC")
    torch_version: str | None = None
    onnx_opset: int | None = Field(default=None, ge=1)

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("created_at must be timezone-aware (use datetime.now(UTC))")
        return value.astimezone(UTC)


class ExtrapolationReport(_Frozen):
    """Held-out loss at multiples of the trained length; decides how far max_context may go."""

    lengths: list[int] = Field(min_length=1)
    losses: list[float]
    ratios: list[float] = Field(description="loss / loss at the trained length (1x)")
    rule: str = Field(min_length=1, description="the rule that chose max_context, in words")
    max_context_override: int | None = Field(default=None, ge=1)
    text: str | None = Field(
        default=None, description="which text the losses were measured on (None: not recorded)"
    )

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        if not len(self.lengths) == len(self.losses) == len(self.ratios):
            raise ValueError(
                f"lengths, losses and ratios differ in length "
                f"({len(self.lengths)}, {len(self.losses)}, {len(self.ratios)})"
            )
        return self


class MemoryBoundReport(_Frozen):
    """How the exporter chose a max_context bounded by memory (exporters/memory_bound.py): the
    parity sweep probed at short lengths, a line fitted to its peaks, the longest candidate
    whose predicted peak fits the budget, verified there."""

    limit: int = Field(ge=1, description="the length the model allows (its position table)")
    budget_bytes: int = Field(ge=0)
    budget: str = Field(min_length=1, description="where the budget came from, in words")
    probe_lengths: list[int] = Field(min_length=2)
    probe_peak_bytes: list[int] = Field(description="each probe's peak above the baseline")
    fixed_bytes: float
    per_token_bytes: float = Field(ge=0)
    predicted_peak_bytes: int = Field(ge=0, description="at the chosen length")
    measured_peak_bytes: int | None = Field(
        default=None, ge=0, description="the parity sweep's own peak at the chosen length"
    )
    fits: bool = Field(description="False: even the floor was predicted past the budget")
    rule: str = Field(min_length=1)
    parity_failed_lengths: list[int] = Field(
        default_factory=list,
        description="lengths memory allowed where parity failed; max_context is then the "
        "longest shorter one that passed (halving, down to the floor)",
    )

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        if len(self.probe_lengths) != len(self.probe_peak_bytes):
            raise ValueError(
                f"{len(self.probe_lengths)} probe lengths but {len(self.probe_peak_bytes)} peaks"
            )
        return self


class Manifest(_Frozen):
    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(
        ge=UNASSIGNED_VERSION,
        description="≥ 1 once published; 0 (UNASSIGNED_VERSION) asks publish for the next one",
    )
    architecture: Architecture
    task: Task
    format: Format
    precision: Precision
    precision_reason: str | None = Field(
        default=None, description="why this precision: the exporter's default, or requested"
    )
    max_context: int = Field(ge=1, description="hard limit in tokens, enforced by the service")
    trained_context: int = Field(ge=1)
    config: dict[str, Any] = Field(description="the architecture config as saved")
    signature: GraphSignature
    files: dict[str, FileEntry] = Field(
        default_factory=dict,
        description="every file of the version except manifest.json; filled in by publish",
    )
    parity: ParityReport
    provenance: Provenance
    extrapolation: ExtrapolationReport | None = None
    memory_bound: MemoryBoundReport | None = None  # max_context chosen by memory (no override)
    tokenizer_file: str = "tokenizer.json"
    model_file: str

    @field_validator("schema_version")
    @classmethod
    def _current_schema(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(
                f"a Manifest object is always schema {SCHEMA_VERSION}; "
                f"older documents are migrated by Manifest.load"
            )
        return value

    @field_validator("tokenizer_file", "model_file")
    @classmethod
    def _plain_path(cls, value: str) -> str:
        return check_relative_path(value)

    @field_validator("files")
    @classmethod
    def _plain_paths(cls, value: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for path in value:
            check_relative_path(path)
        if MANIFEST_FILE in value:
            raise ValueError(f"{MANIFEST_FILE} cannot list itself")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        suffix = MODEL_FILE_SUFFIX[self.format]
        if not self.model_file.endswith(suffix):
            raise ValueError(
                f"format {self.format!r} stores its graph in a '*{suffix}' file, "
                f"got model_file {self.model_file!r}"
            )
        if (self.task == "generate") != (self.signature.generation_mode is not None):
            raise ValueError(
                "task 'generate' requires signature.generation_mode and task 'encode' forbids it"
            )
        if self.precision == "fp32" and self.parity.tolerance is None:
            raise ValueError("fp32 models record the parity tolerance they passed")
        if (
            self.precision != "fp32"
            and self.parity.min_cosine is None
            and self.parity.argmax_agreement is None
        ):
            raise ValueError(
                f"{self.precision} models record parity min_cosine and/or argmax_agreement"
            )
        # A length chosen by memory is a length parity ran at: the record cannot claim more.
        if self.memory_bound is not None and self.max_context > max(self.parity.lengths):
            raise ValueError(
                f"max_context {self.max_context} was chosen by memory but parity verified "
                f"lengths up to {max(self.parity.lengths)} only"
            )
        if self.files:
            missing = [f for f in (self.model_file, self.tokenizer_file) if f not in self.files]
            if missing:
                raise ValueError(f"files does not list {missing}")
        return self

    @property
    def total_size(self) -> int:
        """Bytes of every listed file (manifest.json excluded)."""
        return sum(entry.size for entry in self.files.values())

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    def dump(self, path: Path) -> None:
        """Write as JSON. Not atomic on its own: the repository publishes whole directories."""
        path.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def from_document(cls, document: Any, source: Path) -> Manifest:
        """Validate a parsed JSON document, migrating older schemas; ``source`` names errors."""
        if not isinstance(document, dict):
            raise ManifestError(source, f"expected a JSON object, got {type(document).__name__}")
        document = migrate(document, source)
        try:
            return cls.model_validate(document)
        except ValidationError as exc:
            raise ManifestError(source, f"invalid manifest: {exc}") from exc

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise ManifestError(path, "manifest file is missing") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(path, f"cannot read manifest: {exc}") from exc
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(path, f"invalid JSON: {exc}") from exc
        return cls.from_document(document, path)


class MigrationRefusedError(Exception):
    """Raised by a migration step: the document describes a graph this version cannot serve."""


def _kv_cache(document: Document) -> dict[str, Any] | None:
    signature = document.get("signature")
    if not isinstance(signature, dict) or signature.get("generation_mode") != "kv_cache":
        return None
    cache = signature.get("cache")
    return cache if isinstance(cache, dict) else None


def _to_new_entries_output(document: Document) -> Document:
    """1 -> 2. The first kv_cache graphs returned the whole present cache (past + new); a
    server reading that output as the new entries would corrupt every cache, so they are
    refused. Schema 1 stayed in use through both cache contract changes, so a schema-1 document
    may already follow schema 2 or 3: its cache fields (output name, per-layer inputs) say which
    contract its graph has, and such a document migrates unchanged."""
    cache = _kv_cache(document)
    if cache is not None and cache.get("output") != NEW_ENTRIES_OUTPUT:
        raise MigrationRefusedError(
            f"its kv_cache graph returns {cache.get('output')!r}, the whole cache (exported "
            f"under the contract of schema 1); this version of Longhaul needs graphs whose "
            f"cache output is {NEW_ENTRIES_OUTPUT!r}, the new tokens' entries only, and one past "
            f"input per layer and per key/value (docs/contracts.md)"
        )
    return document


def _to_per_layer_past(document: Document) -> Document:
    """2 -> 3. kv_cache graphs that took the past as one stacked input (ONNX Runtime copied it
    whole every step) cannot be fed the per-layer inputs the engine passes: refused. The others
    list their per-layer inputs; the cache's ``input`` (their prefix) becomes ``input_prefix``."""
    cache = _kv_cache(document)
    if cache is not None and not cache.get("inputs"):
        prefix = cache.get("input")
        raise MigrationRefusedError(
            f"its kv_cache graph takes the whole past as one input {prefix!r} (exported under "
            f"the contract of schema 2); this version of Longhaul needs one past input per "
            f"layer and per key/value ({prefix}.0.key, {prefix}.0.value, ...) "
            f"(docs/contracts.md)"
        )
    if cache is not None and "input" in cache:
        renamed = {("input_prefix" if k == "input" else k): v for k, v in cache.items()}
        document["signature"] = {**document["signature"], "cache": renamed}
    return document


# MIGRATIONS[v] upgrades a schema-v document to schema v + 1, or raises MigrationRefusedError;
# load() chains them up to SCHEMA_VERSION. Add an entry with each bump.
MIGRATIONS: dict[int, Callable[[Document], Document]] = {
    1: _to_new_entries_output,
    2: _to_per_layer_past,
}


def migrate(document: Document, source: Path) -> Document:
    """Upgrade ``document`` to :data:`SCHEMA_VERSION` one step at a time; raises
    :class:`OutdatedManifestError` when a step refuses it."""
    version = document.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ManifestError(source, f"schema_version must be an integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise ManifestError(
            source,
            f"schema_version {version} is newer than this model_store supports "
            f"({SCHEMA_VERSION}); upgrade Longhaul to read it",
        )
    while version < SCHEMA_VERSION:
        step = MIGRATIONS.get(version)
        if step is None:
            raise ManifestError(source, f"no migration from schema_version {version}")
        try:
            document = step(dict(document))
        except MigrationRefusedError as exc:
            fmt = document.get("format")
            raise OutdatedManifestError(
                source, str(exc), version, fmt if isinstance(fmt, str) else None
            ) from exc
        version += 1
        document["schema_version"] = version
    return document


def is_valid_name(name: str) -> bool:
    return re.fullmatch(NAME_PATTERN, name) is not None
