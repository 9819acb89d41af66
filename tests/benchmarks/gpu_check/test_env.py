"""The GPU check's machine preparation: GPU detection, runtime pins, the offline install plan,
and the install command itself (a real pip, a real wheel, no network)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks.gpu_check import env

SMI_OUTPUT = "NVIDIA H200, 143771, 580.159.03\n"


def fake_nvidia_smi(bin_dir: Path, output: str, rc: int = 0) -> Path:
    """A stand-in nvidia-smi printing ``output``: this tests the parsing, not a GPU."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\nexit {rc}\n")
    smi.chmod(0o755)
    return smi


def test_parse_nvidia_smi_rows() -> None:
    two = SMI_OUTPUT + "NVIDIA A100-SXM4-80GB, 81920, 550.54.15\n"
    assert env.parse_nvidia_smi(two) == [
        env.Gpu("NVIDIA H200", 143771, "580.159.03"),
        env.Gpu("NVIDIA A100-SXM4-80GB", 81920, "550.54.15"),
    ]
    assert env.parse_nvidia_smi("No devices were found\n") == []


def test_detect_reads_nvidia_smi_on_path(tmp_path: Path) -> None:
    fake_nvidia_smi(tmp_path / "bin", SMI_OUTPUT)
    gpus, source = env.detect_gpus({"PATH": str(tmp_path / "bin")})
    assert gpus == [env.Gpu("NVIDIA H200", 143771, "580.159.03")] and source == "nvidia-smi"


@pytest.mark.parametrize("visible", ["", "-1"])
def test_cuda_visible_devices_can_hide_every_gpu(tmp_path: Path, visible: str) -> None:
    fake_nvidia_smi(tmp_path / "bin", SMI_OUTPUT)
    gpus, source = env.detect_gpus({"PATH": str(tmp_path / "bin"), "CUDA_VISIBLE_DEVICES": visible})
    assert gpus == [] and "CUDA_VISIBLE_DEVICES" in source


def test_no_driver_and_no_device_are_no_gpu(tmp_path: Path) -> None:
    assert env.detect_gpus({"PATH": str(tmp_path)}) == (
        [],
        "no nvidia-smi on PATH: no NVIDIA driver",
    )
    fake_nvidia_smi(tmp_path / "bin", "No devices were found", rc=6)
    gpus, source = env.detect_gpus({"PATH": str(tmp_path / "bin")})
    assert gpus == [] and "No devices were found" in source


def test_runtime_pins_are_the_pyproject_dependencies() -> None:
    pins = env.runtime_pins()
    assert pins["torch"] == "2.13.0" and "fastapi" in pins and "pydantic-settings" in pins
    assert "pytest" not in pins  # dev extra: the check needs none of it


def test_a_loose_dependency_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = ["numpy>=2"]\n')
    with pytest.raises(ValueError, match="not an exact pin"):
        env.runtime_pins(tmp_path / "pyproject.toml")


def wheels(*names: str) -> list[Path]:
    return [Path(f"{n}-py3-none-any.whl") for n in names]


def test_plan_installs_only_what_the_machine_lacks_and_never_torch() -> None:
    pins = {"torch": "2.13.0", "numpy": "2.4.6", "fastapi": "0.165.0", "pydantic": "2.14.3"}
    installed = {"torch": "2.11.0", "numpy": "2.5.2", "typing-extensions": "4.15.0"}
    folder = wheels(
        "torch-2.13.0", "numpy-2.4.6", "fastapi-0.165.0", "pydantic-2.14.3",
        "starlette-0.50.0", "typing_extensions-4.15.0",
    )  # fmt: skip
    plan = env.plan_install(pins, installed, folder)
    assert [env.wheel_dist(w) for w in plan.install] == [
        ("fastapi", "0.165.0"), ("pydantic", "2.14.3"), ("starlette", "0.50.0"),
    ]  # fmt: skip
    assert plan.kept == {"numpy": ("2.5.2", "2.4.6")}
    assert plan.missing == []
    assert "keeping the machine's numpy 2.5.2 (pyproject pins 2.4.6)" in plan.describe()


def test_plan_names_pins_that_have_no_wheel() -> None:
    plan = env.plan_install(
        {"fastapi": "0.165.0", "uvicorn": "0.54.0"}, {}, wheels("fastapi-0.165.0")
    )
    assert plan.missing == ["uvicorn==0.54.0"]


def test_onnxruntime_gpu_wheel_replaces_the_cpu_build_on_the_path() -> None:
    pins = {"onnxruntime": "1.32.0"}
    folder = wheels("onnxruntime-1.32.0", "onnxruntime_gpu-1.31.1")
    plan = env.plan_install(pins, {}, folder)
    assert [env.wheel_dist(w)[0] for w in plan.install] == ["onnxruntime-gpu"]
    assert plan.missing == []
    # The machine's CPU onnxruntime stays installed; the GPU build goes first on the path.
    plan = env.plan_install(pins, {"onnxruntime": "1.30.0"}, folder)
    assert [env.wheel_dist(w)[0] for w in plan.install] == ["onnxruntime-gpu"]


def test_wheel_names_are_parsed_by_pep_427() -> None:
    name = "pydantic_core-2.41.5-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    assert env.wheel_dist(Path(name)) == ("pydantic-core", "2.41.5")
    with pytest.raises(ValueError):
        env.wheel_dist(Path("fastapi.tar.gz"))


def test_download_asks_for_cp312_linux_wheels_of_the_pins() -> None:
    reqs = env.requirements_to_download(env.runtime_pins(), ["fastapi", "Uvicorn"], "1.31.1")
    assert reqs[-1] == "onnxruntime-gpu==1.31.1"
    assert set(reqs[:-1]) == {
        f"fastapi=={env.runtime_pins()['fastapi']}",
        f"uvicorn=={env.runtime_pins()['uvicorn']}",
    }
    assert not any(
        r.startswith("torch==")
        for r in env.requirements_to_download(env.runtime_pins(), None, None)
    )
    cmd = env.download_command(Path("w"), reqs)
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in cmd
    with pytest.raises(ValueError, match="not runtime dependencies"):
        env.requirements_to_download(env.runtime_pins(), ["pytest"], None)


def make_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel holding module ``name`` (VERSION = version)."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        whl.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
        whl.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        whl.writestr(f"{info}/RECORD", "")
    return path


def test_install_puts_the_wheels_in_a_private_folder_without_the_network(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, "longhaul_probe", "1.2.3")
    plan = env.plan_install({"longhaul-probe": "1.2.3"}, env.installed_versions(), [wheel])
    assert plan.install == [wheel]
    site = tmp_path / "site"
    env.install(plan, site)
    out = subprocess.run(
        [sys.executable, "-c", "import longhaul_probe; print(longhaul_probe.VERSION)"],
        env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "1.2.3"
