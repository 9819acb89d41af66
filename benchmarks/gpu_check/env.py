"""What the GPU check needs from the machine, with the standard library alone.

It runs before any of Longhaul's dependencies are importable: on a GPU machine whose Python and
CUDA build of torch are not the pinned ones, and that may have no internet. It finds the GPUs
(``nvidia-smi``), reads the runtime pins from ``pyproject.toml``, and installs from a folder of
wheels the pinned distributions the machine lacks, into a private folder put first on
``PYTHONPATH``, so nothing the machine has (torch above all) is replaced.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
# The machine's own build stays: its torch is the one that matches its CUDA driver.
NEVER_INSTALL = frozenset({"torch"})
# Linux x86-64 wheels for CPython 3.12, the GPU image's Python (pip matches each tag exactly).
WHEEL_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mib: int
    driver: str


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """``nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[1].isdigit():
            gpus.append(Gpu(parts[0], int(parts[1]), parts[2]))
    return gpus


def detect_gpus(environ: dict[str, str] | None = None) -> tuple[list[Gpu], str]:
    """The CUDA GPUs this process may use, and in words where that answer came from."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return [], f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi is None:
        return [], "no nvidia-smi on PATH: no NVIDIA driver"
    query = "--query-gpu=name,memory.total,driver_version"
    try:
        out = subprocess.run(
            [smi, query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"nvidia-smi failed: {exc}"
    gpus = parse_nvidia_smi(out.stdout)
    if not gpus:
        detail = (out.stderr or out.stdout).strip().splitlines()
        return [], f"nvidia-smi lists no GPU ({detail[-1] if detail else f'exit {out.returncode}'})"
    return gpus, "nvidia-smi"


def normalize(name: str) -> str:
    """PEP 503 name: ``Pydantic_Settings`` and ``pydantic-settings`` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_pins(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """``[project].dependencies`` as {normalized name: pinned version} (every pin is exact)."""
    pins = {}
    for spec in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        name, sep, version = spec.partition("==")
        if not sep:
            raise ValueError(f"{pyproject}: dependency {spec!r} is not an exact pin")
        pins[normalize(name)] = version.strip()
    return pins


def installed_versions() -> dict[str, str]:
    """Every distribution this interpreter sees, {normalized name: version}."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


def wheel_dist(path: Path) -> tuple[str, str]:
    """(normalized name, version) from a wheel's file name (PEP 427)."""
    parts = path.name[: -len(".whl")].split("-")
    if not path.name.endswith(".whl") or len(parts) < 5:
        raise ValueError(f"{path.name} is not a wheel file name")
    return normalize(parts[0]), parts[1]


@dataclass
class InstallPlan:
    install: list[Path] = field(default_factory=list)  # wheels of distributions not installed
    kept: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (installed, pin)
    missing: list[str] = field(default_factory=list)  # pins neither installed nor in the folder

    def describe(self) -> list[str]:
        lines = []
        if self.install:
            names = ", ".join(f"{n} {v}" for n, v in map(wheel_dist, self.install))
            lines.append(f"installing {len(self.install)} wheels the machine lacks: {names}")
        for name, (have, pin) in sorted(self.kept.items()):
            lines.append(f"keeping the machine's {name} {have} (pyproject pins {pin})")
        return lines


def plan_install(
    pins: dict[str, str], installed: dict[str, str], wheels: list[Path]
) -> InstallPlan:
    """Which wheels to install: every one whose distribution the machine does not have. Pins the
    machine has at another version are kept as they are (and reported); the machine's torch is
    never touched."""
    plan = InstallPlan()
    by_name: dict[str, Path] = {}
    for wheel in sorted(wheels):
        name, _ = wheel_dist(wheel)
        if name not in installed and name not in NEVER_INSTALL:
            by_name.setdefault(name, wheel)
    if "onnxruntime-gpu" in by_name:
        # Both install the module ``onnxruntime``; the GPU build, first on the path, is the one
        # wanted, and the CPU build beside it in the same folder would overwrite its files.
        by_name.pop("onnxruntime", None)
    plan.install = list(by_name.values())
    for name, pin in pins.items():
        if name in NEVER_INSTALL or (name == "onnxruntime" and "onnxruntime-gpu" in by_name):
            continue
        if name in installed:
            if installed[name] != pin:
                plan.kept[name] = (installed[name], pin)
        elif name not in by_name:
            plan.missing.append(f"{name}=={pin}")
    return plan


def install(plan: InstallPlan, site: Path, python: str = sys.executable) -> None:
    """``pip install --no-index --no-deps --target site`` the planned wheels (no network)."""
    if not plan.install:
        return
    site.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--disable-pip-version-check", "--upgrade", "--target", str(site)]
    subprocess.run([*cmd, *map(str, plan.install)], check=True)


def download_command(
    dest: Path, requirements: list[str], python: str = sys.executable
) -> list[str]:
    """``pip download`` of ``requirements`` and everything they need, as Linux x86-64 wheels
    for CPython 3.12, into ``dest``: run where there is a package index, carry ``dest``."""
    cmd = [python, "-m", "pip", "download", "--only-binary=:all:", "--python-version", "3.12"]
    cmd += ["--implementation", "cp", "--disable-pip-version-check", "--dest", str(dest)]
    for platform in WHEEL_PLATFORMS:
        cmd += ["--platform", platform]
    return [*cmd, *requirements]


def requirements_to_download(
    pins: dict[str, str], only: list[str] | None, onnxruntime_gpu: str | None
) -> list[str]:
    """The pins to fetch (all but torch, or ``only`` those), plus onnxruntime-gpu if asked."""
    wanted = {normalize(n) for n in only} if only else set(pins) - NEVER_INSTALL
    unknown = wanted - set(pins)
    if unknown:
        raise ValueError(f"not runtime dependencies in pyproject.toml: {sorted(unknown)}")
    reqs = [f"{name}=={pins[name]}" for name in sorted(wanted)]
    if onnxruntime_gpu:
        reqs.append(f"onnxruntime-gpu=={onnxruntime_gpu}")
    return reqs
