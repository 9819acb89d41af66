"""Longhaul checkpoints: config.json + model.safetensors + tokenizer.json in one directory.

Weights are safetensors only (never pickle). Loading checks the config against the registry and
the weights against the model the config builds, and names every mismatch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from exporters.architectures import (
    architecture_of,
    build_model,
    config_from_dict,
    config_to_dict,
)

CHECKPOINT_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
REPORT_FILE = "train_report.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as it is; the message says why."""


@dataclass
class Checkpoint:
    path: Path
    architecture: str
    config: Any
    model: nn.Module
    tokenizer: Tokenizer
    trained_context: int
    extra: dict[str, Any]


def save_checkpoint(
    out_dir: Path,
    model: nn.Module,
    tokenizer: Tokenizer,
    trained_context: int,
    extra: dict[str, Any] | None = None,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config  # type: ignore[attr-defined]
    meta = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "architecture": architecture_of(config),
        "trained_context": trained_context,
        "config": config_to_dict(config),
        **(extra or {}),
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    # contiguous() because safetensors refuses views; shared tensors are cloned for the same reason.
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    tokenizer.save(str(out_dir / TOKENIZER_FILE))


def load_checkpoint(ckpt_dir: Path) -> Checkpoint:
    ckpt_dir = Path(ckpt_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        if not (ckpt_dir / name).is_file():
            raise CheckpointError(f"{ckpt_dir} is not a Longhaul checkpoint: {name} is missing")
    try:
        meta = json.loads((ckpt_dir / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{ckpt_dir / CONFIG_FILE} is not valid JSON: {exc}") from exc
    if meta.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{ckpt_dir / CONFIG_FILE}: format_version {meta.get('format_version')!r}, "
            f"expected {CHECKPOINT_FORMAT_VERSION}"
        )
    try:
        architecture = meta["architecture"]
        config = config_from_dict(architecture, meta["config"])
        trained_context = int(meta["trained_context"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt_dir / CONFIG_FILE}: invalid config: {exc}") from exc

    model = build_model(config)
    try:
        state = load_file(str(ckpt_dir / WEIGHTS_FILE))
        tokenizer = Tokenizer.from_file(str(ckpt_dir / TOKENIZER_FILE))
    except Exception as exc:  # safetensors and tokenizers raise their own exception types
        raise CheckpointError(f"{ckpt_dir}: cannot read the weights or tokenizer: {exc}") from exc
    check_state_dict(model, state, str(ckpt_dir / WEIGHTS_FILE))
    model.load_state_dict(state, strict=True)
    model.eval()
    extra = {
        k: v
        for k, v in meta.items()
        if k not in {"format_version", "architecture", "config", "trained_context"}
    }
    return Checkpoint(
        path=ckpt_dir,
        architecture=architecture,
        config=config,
        model=model,
        tokenizer=tokenizer,
        trained_context=trained_context,
        extra=extra,
    )


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    if shapes:
        problems.append(f"shape mismatch {shapes}")
    if problems:
        raise CheckpointError(
            f"weights in {source} do not match the config: " + "; ".join(problems)
        )


def directory_sha256(ckpt_dir: Path) -> str:
    """One digest over the checkpoint's files (name + content), for export provenance."""
    digest = hashlib.sha256()
    for name in sorted(p.name for p in Path(ckpt_dir).iterdir() if p.is_file()):
        digest.update(name.encode())
        with open(Path(ckpt_dir) / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
