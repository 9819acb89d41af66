"""Randomly initialised models at one common width and depth, for every benchmark.

Speed and memory do not depend on trained weights, so no training is needed. Every Longhaul
architecture and the full-attention baseline get the same d_model, layers, heads (Shatter: the
same number of partitions instead), feed-forward width and vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.baseline import VanillaConfig, VanillaEncoder
from exporters.architectures import build_model, config_from_dict

ARCHS = ("vanilla", "linformer", "reformer", "shatter", "alibi")
LONGHAUL_ARCHS = ARCHS[1:]
ENCODER_ARCHS = ("linformer", "reformer", "shatter")


@dataclass(frozen=True)
class Size:
    """One model size shared by every architecture."""

    d_model: int
    n_layers: int
    n_heads: int  # Shatter has one head and uses this many partitions instead
    d_ff: int
    vocab_size: int


# Section 1 (scaling): small enough that 64K tokens fit in memory for the linear models.
SCALING = Size(d_model=256, n_layers=4, n_heads=4, d_ff=1024, vocab_size=1024)
# Section 2 (backends): a realistic small encoder (BERT-small-like width).
REALISTIC = Size(d_model=512, n_layers=6, n_heads=8, d_ff=2048, vocab_size=2048)

LINFORMER_N_MAX = 65536  # the longest scaling point; E/F are (k, n_max)
LINFORMER_K = 256
REFORMER_CHUNK = 64
REFORMER_BUCKETS = 32
REFORMER_HASHES = 2


def arch_config(arch: str, size: Size, n_max: int = LINFORMER_N_MAX) -> dict[str, Any]:
    """Config fields for ``arch`` at ``size`` (the JSON the results record)."""
    common = {"vocab_size": size.vocab_size, "d_model": size.d_model, "n_layers": size.n_layers}
    common["d_ff"] = size.d_ff
    if arch == "vanilla":
        return {**common, "n_heads": size.n_heads}
    if arch == "linformer":
        # key-value sharing as the demo preset: same compute as "none", half the E/F memory.
        return {
            **common,
            "n_heads": size.n_heads,
            "k": LINFORMER_K,
            "n_max": n_max,
            "sharing": "key-value",
        }
    if arch == "reformer":
        # The bidirectional encoder: the scaling figures are encode latency.
        return {
            **common,
            "n_heads": size.n_heads,
            "chunk_length": REFORMER_CHUNK,
            "n_buckets": REFORMER_BUCKETS,
            "n_hashes": REFORMER_HASHES,
            "causal": False,
        }
    if arch == "shatter":
        return {**common, "n_parts": size.n_heads}
    if arch == "alibi":
        return {**common, "n_heads": size.n_heads, "trained_context": 1024}
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")


def build(arch: str, config: dict[str, Any], seed: int = 0) -> nn.Module:
    """A randomly initialised model in eval mode (same seed, same weights)."""
    torch.manual_seed(seed)
    if arch == "vanilla":
        model: nn.Module = VanillaEncoder(VanillaConfig(**config))
    else:
        model = build_model(config_from_dict(arch, config))
    return model.eval()
