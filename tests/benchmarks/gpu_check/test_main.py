"""``python3 -m benchmarks.gpu_check`` on a machine without a GPU: one line, exit 0, nothing
installed or written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import env


@pytest.mark.parametrize("hide", ["no-driver", "CUDA_VISIBLE_DEVICES"])
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path: Path, hide: str) -> None:
    child = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if hide == "no-driver":
        child["PATH"] = str(tmp_path)  # no nvidia-smi (the interpreter is called by full path)
    else:
        child["CUDA_VISIBLE_DEVICES"] = ""
    site, wheels = tmp_path / "site", tmp_path / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--site", str(site), "--wheels", str(wheels)],  # noqa: E501
        cwd=env.ROOT, env=child, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA GPU on this machine (")
    assert done.stderr == ""
    assert not site.exists()
