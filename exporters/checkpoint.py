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
    save_file(_unshared(model.state_dict()), str(out_dir / WEIGHTS_FILE))
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

    try:
        # Read into memory the process owns (pread), not mapped: the model keeps these tensors
        # (model_with_weights), and a mapped checkpoint rewritten or truncated meanwhile (a
        # retrain into the same directory) would change the weights or fault on access.
        state = load_file(str(ckpt_dir / WEIGHTS_FILE), backend="pread")
        tokenizer = Tokenizer.from_file(str(ckpt_dir / TOKENIZER_FILE))
    except Exception as exc:  # safetensors and tokenizers raise their own exception types
        raise CheckpointError(f"{ckpt_dir}: cannot read the weights or tokenizer: {exc}") from exc
    model = model_with_weights(config, state, str(ckpt_dir / WEIGHTS_FILE))
    del state
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


def model_with_weights(config: Any, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """The model ``config`` builds, in eval mode, holding the tensors of ``state`` themselves.

    Built on the meta device and given the tensors with ``assign=True``: the weights exist once
    in memory and no random initialisation runs (a bloom-560m's 816M parameters take minutes to
    draw, and a built model plus a loaded state dict is twice the model). Every tensor the model
    holds must come from ``state``: architectures keep no tensor outside their state dict (a
    non-persistent buffer would stay on the meta device, which is checked). A tensor of another
    floating dtype is converted, as ``load_state_dict``'s copy would convert it.
    """
    with torch.device("meta"):
        model = build_model(config)
    check_state_dict(model, state, source)
    expected = model.state_dict()
    # Contiguous as a copy into a built model would be (an importer may hand over a transpose).
    state = {
        k: (v.to(expected[k].dtype) if v.is_floating_point() else v).contiguous()
        for k, v in state.items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    # Parameters, buffers and plain tensor attributes (which build_model made on meta too).
    attributes = [
        (f"{prefix}.{key}" if prefix else key, value)
        for prefix, module in model.named_modules()
        for key, value in vars(module).items()
        if isinstance(value, torch.Tensor)
    ]
    tensors = (*model.named_parameters(), *model.named_buffers(), *attributes)
    left = sorted({name for name, tensor in tensors if tensor.is_meta})
    if left:  # a programming error in an architecture, not a bad checkpoint
        raise RuntimeError(f"{type(model).__name__} holds tensors outside its state dict: {left}")
    return model.eval()


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as safetensors writes it: contiguous tensors, none sharing memory with another
    (it refuses both). Only what needs it is copied: a tied or assigned-twice tensor (an
    imported BLOOM's head is its embedding), a view."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        if not tensor.is_contiguous() or _storage(tensor) in seen:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(_storage(tensor))
        out[name] = tensor
    return out


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


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
