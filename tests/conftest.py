"""Shared fixtures: tiny trained checkpoints, built once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Tests compare numbers at 1e-5; keep thread count fixed so results do not depend on the host.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: architecture name -> directory of a tiny checkpoint trained for a few steps."""
    from exporters.training import train

    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{arch}")
            train(arch, "tiny", out, steps=5, seed=0, progress=False)
            cache[arch] = out
        return cache[arch]

    return make
