"""Pinned requirements for a container image, read from pyproject.toml (the one source of pins).

    python deploy/docker/requirements.py {cpu,gpu} OUTDIR [--onnxruntime-gpu VERSION]

writes ``OUTDIR/torch.txt`` (torch alone: it is installed first, from the PyTorch index that
matches the image) and ``OUTDIR/requirements.txt`` (everything else). The gpu variant swaps
``onnxruntime`` for ``onnxruntime-gpu``: both install the same ``onnxruntime`` module, so only one
may be present.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!-]+)$")
# The newest onnxruntime-gpu on PyPI (1.32.0 was not published for GPU); CUDA 13 + cuDNN 9.
DEFAULT_ORT_GPU = "1.31.1"


def pins(pyproject: Path) -> dict[str, str]:
    """Runtime dependencies as {name: version}; anything but an exact pin is refused."""
    project = tomllib.loads(pyproject.read_text())["project"]
    out: dict[str, str] = {}
    for requirement in project["dependencies"]:
        match = PIN.match(requirement.replace(" ", ""))
        if match is None:
            raise ValueError(f"{pyproject}: {requirement!r} is not an exact pin (name==version)")
        out[match["name"].lower()] = match["version"]
    return out


def variant(deps: dict[str, str], name: str, ort_gpu: str) -> tuple[list[str], list[str]]:
    """(torch lines, other lines) for the cpu or gpu image."""
    if "torch" not in deps or "onnxruntime" not in deps:
        raise ValueError("pyproject.toml must pin torch and onnxruntime")
    rest = {k: v for k, v in deps.items() if k != "torch"}
    if name == "gpu":
        del rest["onnxruntime"]
        rest["onnxruntime-gpu"] = ort_gpu
    return [f"torch=={deps['torch']}"], [f"{k}=={v}" for k, v in sorted(rest.items())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=("cpu", "gpu"))
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--onnxruntime-gpu", default=DEFAULT_ORT_GPU, metavar="VERSION")
    args = parser.parse_args(argv)
    torch_lines, other_lines = variant(pins(args.pyproject), args.variant, args.onnxruntime_gpu)
    args.outdir.mkdir(parents=True, exist_ok=True)
    (args.outdir / "torch.txt").write_text("\n".join(torch_lines) + "\n")
    (args.outdir / "requirements.txt").write_text("\n".join(other_lines) + "\n")
    sys.stdout.write(
        f"{args.variant}: {len(torch_lines) + len(other_lines)} pins -> {args.outdir}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
