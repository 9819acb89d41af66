"""The architecture registry answers the exporter's per-architecture questions."""

from __future__ import annotations

import dataclasses

import pytest

from exporters.architectures import ARCHITECTURES, get_architecture
from exporters.architectures.reformer import ReformerConfig


def test_only_alibi_measures_its_max_context() -> None:
    assert {name for name, arch in ARCHITECTURES.items() if arch.extrapolates} == {"alibi"}


def test_reformer_exports_its_unchunked_feed_forward_and_nothing_else_changes() -> None:
    config = ReformerConfig(
        vocab_size=64, d_model=16, n_heads=2, n_layers=2, d_ff=32, chunk_length=4,
        n_buckets=4, ff_chunk_size=3,
    )  # fmt: skip
    exported = get_architecture("reformer").export_config(config)
    assert exported.ff_chunk_size == 0
    assert dataclasses.replace(exported, ff_chunk_size=3) == config


@pytest.mark.parametrize("name", ["linformer", "alibi", "shatter"])
def test_other_architectures_export_their_own_config(name: str) -> None:
    sentinel = object()
    assert get_architecture(name).export_config(sentinel) is sentinel
