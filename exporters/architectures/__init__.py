"""Registry of Longhaul architectures: name -> config class, model class, and what the exporter
must know about each (how its ``max_context`` is chosen, which config it traces)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

from torch import nn

from exporters.architectures.alibi import AlibiConfig, AlibiLM
from exporters.architectures.linformer import LinformerConfig, LinformerEncoder
from exporters.architectures.reformer import ReformerConfig, ReformerModel
from exporters.architectures.shatter import ShatterConfig, ShatterEncoder


def _same_config(config: Any) -> Any:
    return config


def _unchunked_feed_forward(config: ReformerConfig) -> ReformerConfig:
    """The Reformer's chunked feed-forward cannot be exported with a dynamic sequence axis; the
    unchunked one computes the same function with the same weights."""
    return dataclasses.replace(config, ff_chunk_size=0)


class Architecture(NamedTuple):
    config_class: type
    model_class: type[nn.Module]
    # True: max_context is measured (held-out loss at multiples of the trained length) because
    # the model extrapolates past its training length; False: the position table bounds it, or
    # else the longest length parity verified.
    extrapolates: bool = False
    # The config the exporter traces: the same function as the checkpoint's, export-safe.
    export_config: Callable[[Any], Any] = _same_config


ARCHITECTURES: dict[str, Architecture] = {
    "linformer": Architecture(LinformerConfig, LinformerEncoder),
    "reformer": Architecture(ReformerConfig, ReformerModel, export_config=_unchunked_feed_forward),
    "alibi": Architecture(AlibiConfig, AlibiLM, extrapolates=True),
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
