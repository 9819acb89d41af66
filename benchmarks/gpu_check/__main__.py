"""Launcher: no GPU -> one line, exit 0; else prepare the environment and run the check.

    python3 -m benchmarks.gpu_check [--wheels DIR] [--site DIR] [check options...]
    python3 -m benchmarks.gpu_check download [--dest DIR] [--only NAME ...] [--onnxruntime-gpu V]

Standard library only: this runs before Longhaul's dependencies can be imported.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_check import env

DEFAULT_WHEELS = env.ROOT / "wheels" / "gpu"
DEFAULT_SITE = env.ROOT / ".gpu-site"


def download(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check download")
    parser.add_argument("--dest", type=Path, default=DEFAULT_WHEELS)
    parser.add_argument(
        "--only", nargs="+", default=None, help="just these runtime pins (and what they need)"
    )
    parser.add_argument("--onnxruntime-gpu", default=None, metavar="VERSION")
    args = parser.parse_args(argv)
    reqs = env.requirements_to_download(env.runtime_pins(), args.only, args.onnxruntime_gpu)
    args.dest.mkdir(parents=True, exist_ok=True)
    rc = subprocess.run(env.download_command(args.dest, reqs), check=False).returncode
    if rc == 0:
        wheels = sorted(args.dest.glob("*.whl"))
        size = sum(w.stat().st_size for w in wheels) / 2**20
        print(f"gpu-check: {len(wheels)} wheels ({size:.0f} MiB) in {args.dest}; carry that folder")
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["download"]:
        return download(argv[1:])
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", add_help=False)
    parser.add_argument("--wheels", type=Path, default=DEFAULT_WHEELS)
    parser.add_argument("--site", type=Path, default=DEFAULT_SITE)
    args, check_args = parser.parse_known_args(argv)
    gpus, source = env.detect_gpus()
    if not gpus:
        print(f"gpu-check: no CUDA GPU on this machine ({source}); nothing to check")
        return 0
    wheels = sorted(args.wheels.glob("*.whl")) if args.wheels.is_dir() else []
    plan = env.plan_install(env.runtime_pins(), env.installed_versions(), wheels)
    if plan.missing:
        print(
            f"gpu-check: the machine lacks {', '.join(plan.missing)} and {args.wheels} has no "
            "wheel for them; where a package index is reachable run `make gpu-wheels` "
            "(README, GPU) and bring that folder here",
            file=sys.stderr,
        )
        return 2
    for line in plan.describe():
        print(f"gpu-check: {line}", flush=True)
    env.install(plan, args.site)
    path = [str(args.site), str(env.ROOT), os.environ.get("PYTHONPATH", "")]
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    cmd = [sys.executable, "-m", "benchmarks.gpu_check.check", *check_args]
    return subprocess.run(cmd, cwd=env.ROOT, env=child_env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
