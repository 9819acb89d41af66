"""``python -m exporters import``: checkpoints of other libraries -> Longhaul checkpoints.

Each importer is one small module with ``convert(src, trained_context) -> Converted``: it reads
the source config, refuses options it cannot reproduce (naming them), and maps the weights onto
one of Longhaul's architectures. This module does the rest, the same for all: build the model
from the converted config, load the mapped weights strictly, attach the tokenizer and write a
checkpoint that ``python -m exporters export`` publishes like any other.

The imported model keeps its own vocabulary and token ids; its end-of-sequence and padding ids
are recorded in the config (``eos_token_id``, ``pad_token_id``), see docs/contracts.md.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from exporters.architectures import architecture_of, build_model
from exporters.checkpoint import check_state_dict, load_checkpoint, save_checkpoint
from exporters.importers import hf_bloom, hf_mpt, hf_reformer, lucidrains_linformer
from exporters.importers.source import TOKENIZER_FILE, Converted, UnsupportedCheckpointError

IMPORTERS: dict[str, Callable[[Path, int | None], Converted]] = {
    "hf-bloom": hf_bloom.convert,
    "hf-mpt": hf_mpt.convert,
    "hf-reformer": hf_reformer.convert,
    "lucidrains-linformer": lucidrains_linformer.convert,
}


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


def _tokenizer_path(src: Path, explicit: Path | None) -> Path:
    path = explicit or src / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer: {path} does not exist; pass --tokenizer FILE with the HF tokenizers "
            "JSON the model was trained with (the service needs it to serve text)"
        )
    return path


def _load_tokenizer(path: Path, vocab_size: int) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own exception types
        raise UnsupportedCheckpointError(f"{path} is not an HF tokenizers JSON: {exc}") from exc
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
) -> ImportResult:
    """Convert ``src`` (a checkpoint directory of ``source_format``) into a Longhaul checkpoint
    at ``out``. ``trained_context`` overrides the length read from the source config."""
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
    tokenizer_path = _tokenizer_path(src, tokenizer)  # before reading gigabytes of weights

    converted = IMPORTERS[source_format](src, trained_context)
    model = build_model(converted.config)
    check_state_dict(model, converted.state_dict, f"the {source_format} mapping of {src}")
    model.load_state_dict(converted.state_dict, strict=True)
    tok = _load_tokenizer(tokenizer_path, converted.config.vocab_size)
    extra = {"imported_from": {"format": source_format, "source": str(src.resolve())}}
    # Written beside ``out`` and renamed into place: a failed import leaves no half checkpoint.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing-", dir=out.parent))
    try:
        save_checkpoint(staging, model.eval(), tok, converted.trained_context, extra=extra)
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
        notes=converted.notes,
    )


__all__ = ["IMPORTERS", "ImportResult", "UnsupportedCheckpointError", "import_checkpoint"]
