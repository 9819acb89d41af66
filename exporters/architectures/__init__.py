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


def _short_example(config: Any) -> int:
    return 8


def _three_chunks(config: ReformerConfig) -> int:
    """A length spanning three chunks of every layer, padded by a few slots.

    The exporter keeps a size symbolic only where the example's size is at least 2; a size the
    example has as 0 or 1 it may fix for good. A Reformer derives sizes from the length: the
    chunk count n, the padding, and n - 1 where the look-back shifts chunks by one. With an
    example inside one chunk and one hash round, the wrapped look-back's shifted part had size
    r·n − 1 = 0, and re-splitting r·n into (r, n) then fixed n = 1: the graph failed at every
    length past one chunk. Here n >= 3 and the padding lies between 2 and m − 2 for m >= 4.
    """
    m = config.pad_multiple
    return 2 * m + max(1, m // 2)


class Architecture(NamedTuple):
    config_class: type
    model_class: type[nn.Module]
    # True: max_context is measured (held-out loss at multiples of the trained length) because
    # the model extrapolates past its training length; False: the position table bounds it, or
    # else the longest length parity verified.
    extrapolates: bool = False
    # The config the exporter traces: the same function as the checkpoint's, export-safe.
    export_config: Callable[[Any], Any] = _same_config
    # Sequence length of the example the graph is exported with (every derived size >= 2).
    example_length: Callable[[Any], int] = _short_example


ARCHITECTURES: dict[str, Architecture] = {
    "linformer": Architecture(LinformerConfig, LinformerEncoder),
    "reformer": Architecture(
        ReformerConfig,
        ReformerModel,
        export_config=_unchunked_feed_forward,
        example_length=_three_chunks,
    ),
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
