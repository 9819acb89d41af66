"""Reading a foreign checkpoint directory: its JSON config, its weights and its special tokens.

Weights are read without executing anything from the checkpoint: safetensors (single file or
HF's sharded index), or a torch file loaded with ``weights_only=True`` (tensors only, no pickled
objects). Every tensor is converted to float32: Longhaul checkpoints are fp32 and reduced
precision is chosen at export time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Torch state dicts, in the order they are looked for (HF's legacy name, then plain torch.save).
TORCH_FILES = ("pytorch_model.bin", "model.pt", "model.pth")


class UnsupportedCheckpointError(ValueError):
    """The source checkpoint uses something Longhaul cannot reproduce; the message names it."""


def unsupported(option: str, value: object, expected: str) -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(
        f"unsupported config option {option}={value!r}: Longhaul supports {expected}"
    )


def required(config: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` the config sets (old configs spell some fields differently)."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    raise UnsupportedCheckpointError(f"{CONFIG_FILE} does not set {' or '.join(names)}")


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UnsupportedCheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise UnsupportedCheckpointError(f"{path} must hold a JSON object")
    return value


def _float32(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


def _read_safetensors(path: Path, into: dict[str, Tensor]) -> None:
    """Tensor by tensor, each converted as it is read: a half-precision file never sits in
    memory beside its float32 copy. Read (pread), not mapped: the imported model holds these
    tensors, and must not change with the source file."""
    with safe_open(str(path), framework="pt", backend="pread") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            into[name] = _float32(handle.get_tensor(name))


def load_weights(src: Path) -> dict[str, Tensor]:
    """The checkpoint's state dict, every floating tensor as float32."""
    state: dict[str, Tensor] = {}
    if (src / SAFETENSORS_FILE).is_file():
        _read_safetensors(src / SAFETENSORS_FILE, state)
    elif (src / SAFETENSORS_INDEX).is_file():
        shards = sorted(set(read_json(src / SAFETENSORS_INDEX)["weight_map"].values()))
        for shard in shards:
            _read_safetensors(src / shard, state)
    else:
        path = next((src / n for n in TORCH_FILES if (src / n).is_file()), None)
        if path is None:
            names = ", ".join((SAFETENSORS_FILE, SAFETENSORS_INDEX, *TORCH_FILES))
            raise FileNotFoundError(f"no weights in {src}: expected one of {names}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors come in many types; all mean the same here
            raise UnsupportedCheckpointError(
                f"{path} is not a plain state dict loadable with weights_only=True: {exc}"
            ) from exc
        if not isinstance(state, dict):
            raise UnsupportedCheckpointError(
                f"{path} holds a {type(state).__name__}, not a state dict"
            )
        for name in list(state):  # in place: each half tensor goes as its copy arrives
            state[name] = _float32(state[name])
    return state


@dataclass(frozen=True)
class SpecialTokens:
    eos_token_id: int | None
    pad_token_id: int


def special_tokens(src: Path, config: dict[str, Any], vocab_size: int) -> SpecialTokens:
    """eos/pad ids as ``transformers`` generation would use them: generation_config.json wins
    over config.json. A missing pad id becomes 0: pads are always masked, any id serves."""
    merged = dict(config)
    if (src / GENERATION_CONFIG_FILE).is_file():
        generation = read_json(src / GENERATION_CONFIG_FILE)
        merged.update({k: v for k, v in generation.items() if v is not None})
    eos = merged.get("eos_token_id")
    if isinstance(eos, list):
        # Several end tokens: Longhaul's configs record one. Refuse rather than stop on a guess.
        if len(eos) != 1:
            raise unsupported("eos_token_id", eos, "a single end-of-sequence id")
        eos = eos[0]
    pad = merged.get("pad_token_id")
    for name, value in (("eos_token_id", eos), ("pad_token_id", pad)):
        if value is not None and not 0 <= int(value) < vocab_size:
            raise UnsupportedCheckpointError(
                f"{name}={value} is outside the vocabulary ({vocab_size})"
            )
    return SpecialTokens(None if eos is None else int(eos), 0 if pad is None else int(pad))


class WeightMap:
    """Hands out the source tensors by name and checks at the end that every one was used.

    A tensor left over means the checkpoint has a part the mapping does not know about (a bias,
    a position table, an extra norm); importing without it would silently change the model.
    """

    def __init__(self, state: dict[str, Tensor], strip_prefix: str = "") -> None:
        self._state = {
            (k[len(strip_prefix) :] if strip_prefix and k.startswith(strip_prefix) else k): v
            for k, v in state.items()
        }
        self._used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._state

    def take(self, name: str) -> Tensor:
        if name not in self._state:
            raise UnsupportedCheckpointError(f"the checkpoint has no tensor {name!r}")
        self._used.add(name)
        return self._state[name]

    def ignore(self, names: Iterable[str]) -> None:
        """Tensors known to play no part in the forward pass."""
        self._used.update(n for n in names if n in self._state)

    def check_all_used(self) -> None:
        left = sorted(set(self._state) - self._used)
        if left:
            raise UnsupportedCheckpointError(
                f"the checkpoint has tensors Longhaul does not know how to use: {', '.join(left)}"
            )


@dataclass(frozen=True)
class ImportOptions:
    """What the user may choose at import; None = read from the source (or the default)."""

    trained_context: int | None = None  # every format: overrides the source config's length
    hash_seed: int | None = None  # hf-reformer: rotations for a config without hash_seed


@dataclass(frozen=True)
class Converted:
    """What an importer hands back: a Longhaul config and the state dict of the model it builds."""

    config: Any
    state_dict: dict[str, Tensor]
    trained_context: int  # the length the source model was trained at (export's reference point)
    notes: tuple[str, ...] = ()  # what the user should know about the conversion (CLI prints it)
    provenance: dict[str, Any] = field(default_factory=dict)  # recorded under imported_from
