"""``python -m exporters import``: checkpoints of other libraries -> Longhaul checkpoints.

Each importer is one small module with ``convert(src, trained_context) -> Converted``: it reads
the source config, refuses options it cannot reproduce (naming them), and maps the weights onto
one of Longhaul's architectures. This module does the rest, the same for all: build the model
from the converted config, load the mapped weights strictly, attach the tokenizer and write a
checkpoint that ``python -m exporters export`` publishes like any other.

The imported model keeps its own vocabulary and token ids; its end-of-sequence and padding ids
are recorded in the config (``eos_token_id``, ``pad_token_id``), see docs/contracts.md.

The tokenizer, first found wins: ``--tokenizer FILE``; ``--byte-vocab-offset N`` (ids = UTF-8
byte + N); the source's ``tokenizer.json``; its sentencepiece ``spiece.model``, converted by the
HF libraries (exporters/tokenizer.py); no file at all and a vocabulary of 258 = 256 bytes + 2
specials, HF's enwik8 scheme, detected as ``--byte-vocab-offset 2`` (with a note saying so).
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from tokenizers import Tokenizer

from exporters.architectures import architecture_of
from exporters.checkpoint import load_checkpoint, model_with_weights, save_checkpoint
from exporters.importers import hf_bloom, hf_mpt, hf_reformer, lucidrains_linformer
from exporters.importers.source import (
    TOKENIZER_FILE,
    Converted,
    ImportOptions,
    UnsupportedCheckpointError,
)
from exporters.tokenizer import (
    SENTENCEPIECE_FILE,
    TokenizerConversionError,
    byte_tokenizer,
    convert_sentencepiece,
)


class Importer(NamedTuple):
    convert: Callable[[Path, ImportOptions], Converted]
    options: frozenset[str] = frozenset()  # ImportOptions fields it reads beyond trained_context


IMPORTERS: dict[str, Importer] = {
    "hf-bloom": Importer(hf_bloom.convert),
    "hf-mpt": Importer(hf_mpt.convert),
    "hf-reformer": Importer(hf_reformer.convert, frozenset({"hash_seed"})),
    "lucidrains-linformer": Importer(lucidrains_linformer.convert),
}
# HF's google/reformer-enwik8: 256 bytes + 2 special ids, and no tokenizer file.
DETECTED_BYTE_VOCAB = 258
DETECTED_BYTE_OFFSET = 2


@dataclass(frozen=True)
class ImportResult:
    out: Path
    source_format: str
    architecture: str
    config: Any
    trained_context: int
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        c = self.config
        return (
            f"imported {self.source_format} -> {self.out} ({self.architecture}, "
            f"{c.n_layers} layers, d_model {c.d_model}, vocab {c.vocab_size}, "
            f"eos {getattr(c, 'eos_token_id', None)}, trained_context {self.trained_context})"
        )


@dataclass(frozen=True)
class TokenizerSource:
    kind: str  # "file" | "sentencepiece" | "bytes" | "detect-bytes"
    path: Path | None = None
    byte_offset: int = 0


def _tokenizer_source(src: Path, explicit: Path | None, byte_offset: int | None) -> TokenizerSource:
    """Where the tokenizer will come from (module docstring), found before any weights load."""
    if explicit is not None and byte_offset is not None:
        raise ValueError("--tokenizer and --byte-vocab-offset exclude each other")
    if byte_offset is not None:
        return TokenizerSource("bytes", byte_offset=byte_offset)
    if explicit is not None:
        if not explicit.is_file():
            raise FileNotFoundError(f"no tokenizer: {explicit} does not exist")
        return TokenizerSource("file", explicit)
    if (src / TOKENIZER_FILE).is_file():
        return TokenizerSource("file", src / TOKENIZER_FILE)
    if (src / SENTENCEPIECE_FILE).is_file():
        return TokenizerSource("sentencepiece", src / SENTENCEPIECE_FILE)
    return TokenizerSource("detect-bytes", byte_offset=DETECTED_BYTE_OFFSET)


def _tokenizer(source: TokenizerSource, src: Path, vocab_size: int) -> tuple[Tokenizer, str | None]:
    """The tokenizer and, when it was not given as a file, a note saying how it was made."""
    if source.kind == "detect-bytes":
        if vocab_size != DETECTED_BYTE_VOCAB:
            raise FileNotFoundError(
                f"no tokenizer: {src} has no {TOKENIZER_FILE} or {SENTENCEPIECE_FILE}; pass "
                "--tokenizer FILE with the HF tokenizers JSON the model was trained with, or "
                "--byte-vocab-offset N for a byte-level vocabulary (ids = byte + N)"
            )
        tokenizer = byte_tokenizer(source.byte_offset, vocab_size)
        return tokenizer, (
            f"no tokenizer file and {vocab_size} = 256 + {source.byte_offset} ids: byte-level "
            f"vocabulary assumed (ids = UTF-8 byte + {source.byte_offset}, as HF's enwik8); "
            "pass --tokenizer or --byte-vocab-offset to choose otherwise"
        )
    if source.kind == "bytes":
        return byte_tokenizer(source.byte_offset, vocab_size), None
    assert source.path is not None
    if source.kind == "sentencepiece":
        try:
            tokenizer = convert_sentencepiece(source.path.parent)
        except TokenizerConversionError as exc:
            raise UnsupportedCheckpointError(str(exc)) from exc
        note = f"{source.path} converted to {TOKENIZER_FILE} (ids checked against sentencepiece)"
        return _fits(tokenizer, source.path, vocab_size), note
    try:
        tokenizer = Tokenizer.from_file(str(source.path))
    except Exception as exc:  # tokenizers raises its own exception types
        raise UnsupportedCheckpointError(
            f"{source.path} is not an HF tokenizers JSON: {exc}"
        ) from exc
    return _fits(tokenizer, source.path, vocab_size), None


def _fits(tokenizer: Tokenizer, path: Path, vocab_size: int) -> Tokenizer:
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise UnsupportedCheckpointError(
            f"tokenizer {path} has {size} tokens but the model's vocabulary is {vocab_size}: "
            "its ids would index past the embedding table"
        )
    return tokenizer


def import_checkpoint(
    source_format: str,
    src: Path,
    out: Path,
    tokenizer: Path | None = None,
    trained_context: int | None = None,
    hash_seed: int | None = None,
    byte_vocab_offset: int | None = None,
) -> ImportResult:
    """Convert ``src`` (a checkpoint directory of ``source_format``) into a Longhaul checkpoint
    at ``out``. ``trained_context`` overrides the length read from the source config;
    ``hash_seed`` seeds the hashing rotations of a Reformer whose config has none;
    ``byte_vocab_offset``: the vocabulary is UTF-8 bytes + this offset (module docstring)."""
    if source_format not in IMPORTERS:
        raise ValueError(f"unknown format {source_format!r}; known: {', '.join(IMPORTERS)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} already holds a checkpoint or other files; choose another --out"
        )
    if trained_context is not None and trained_context <= 0:
        raise ValueError(f"trained_context must be positive, got {trained_context}")
    if hash_seed is not None and hash_seed < 0:
        raise ValueError(f"hash_seed must be non-negative, got {hash_seed}")
    importer = IMPORTERS[source_format]
    options = ImportOptions(trained_context=trained_context, hash_seed=hash_seed)
    if hash_seed is not None and "hash_seed" not in importer.options:
        raise ValueError(f"--hash-seed applies to hf-reformer only, not {source_format}")
    tokenizer_source = _tokenizer_source(src, tokenizer, byte_vocab_offset)  # before the weights

    converted = importer.convert(src, options)
    # The model holds the converted tensors themselves (no second copy, no random init).
    model = model_with_weights(
        converted.config, converted.state_dict, f"the {source_format} mapping of {src}"
    )
    tok, tokenizer_note = _tokenizer(tokenizer_source, src, converted.config.vocab_size)
    notes = converted.notes + ((tokenizer_note,) if tokenizer_note else ())
    provenance = {"tokenizer": tokenizer_source.kind.replace("detect-", ""), **converted.provenance}
    if tokenizer_source.byte_offset:
        provenance["byte_vocab_offset"] = tokenizer_source.byte_offset
    extra = {"imported_from": {"format": source_format, "source": str(src.resolve()), **provenance}}
    # Written beside ``out`` and renamed into place: a failed import leaves no half checkpoint.
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: mkdtemp's 0700 would survive the rename, and a server running as
    # another user (a container's) could not read the checkpoint; mkdir follows the umask.
    staging = out.parent / f".{out.name}.importing-{secrets.token_hex(8)}"
    staging.mkdir()
    try:
        save_checkpoint(staging, model, tok, converted.trained_context, extra=extra)
        # The weights go before the check loads them again: one copy in memory at a time.
        del model
        converted.state_dict.clear()
        load_checkpoint(staging)  # what export will do first: fail here rather than there
        staging.replace(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ImportResult(
        out=out,
        source_format=source_format,
        architecture=architecture_of(converted.config),
        config=converted.config,
        trained_context=converted.trained_context,
        notes=notes,
    )


__all__ = ["IMPORTERS", "ImportResult", "UnsupportedCheckpointError", "import_checkpoint"]
