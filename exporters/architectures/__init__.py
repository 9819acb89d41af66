"""Registry of Longhaul architectures: name -> (config class, model class)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from torch import nn

from exporters.architectures.alibi import AlibiConfig, AlibiLM
from exporters.architectures.linformer import LinformerConfig, LinformerEncoder
from exporters.architectures.reformer import ReformerConfig, ReformerModel
from exporters.architectures.shatter import ShatterConfig, ShatterEncoder


class Architecture(NamedTuple):
    config_class: type
    model_class: type[nn.Module]


ARCHITECTURES: dict[str, Architecture] = {
    "linformer": Architecture(LinformerConfig, LinformerEncoder),
    "reformer": Architecture(ReformerConfig, ReformerModel),
    "alibi": Architecture(AlibiConfig, AlibiLM),
    "shatter": Architecture(ShatterConfig, ShatterEncoder),
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {name!r}; known: {known}") from None


def config_from_dict(name: str, values: dict[str, Any]) -> Any:
    """Build an architecture's config from saved JSON, naming any field it does not know."""
    config_class = get_architecture(name).config_class
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{name} config has unknown field(s): {', '.join(unknown)}")
    return config_class(**values)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def architecture_of(config: Any) -> str:
    for name, arch in ARCHITECTURES.items():
        if isinstance(config, arch.config_class):
            return name
    raise TypeError(f"{type(config).__name__} is not a registered architecture config")


def build_model(config: Any) -> nn.Module:
    return ARCHITECTURES[architecture_of(config)].model_class(config)
