"""The Dockerfile: hadolint, its stages and runtime contract, and the scripts it ships.

No Docker engine here: the image is never built in tests. What is checked is what can be
checked without one — lint, structure, the pins it installs, and its helper scripts run for real.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.conftest import ROOT, Server, free_port, run, tool

DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"
REQUIREMENTS = ROOT / "deploy" / "docker" / "requirements.py"
SEED = ROOT / "deploy" / "docker" / "seed-store.sh"
UID = "10001"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {rest}"
            current = [(keyword, match[1])]
            found[match[2]] = current
        elif current:
            current.append((keyword, rest))
    return found


def test_hadolint_reports_nothing() -> None:
    result = run([tool("hadolint"), "--failure-threshold", "style", "-f", "json", "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout) == []


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint step can fail: an untagged base and an unpinned, unconfirmed apt-get."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nUSER app\n")
    result = run([tool("hadolint"), "-f", "json", str(bad)])
    assert result.returncode == 1
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3006", "DL3014", "DL3015"} <= codes


def test_runtime_targets_gpu_is_the_default() -> None:
    found = stages()
    assert {"cpu", "gpu", "store"} <= set(found)
    assert list(found)[-1] == "gpu", "the last stage is what a plain `docker build` produces"
    args = dict(
        re.fullmatch(r"(\w+)=(\S+)", rest).groups()  # type: ignore[union-attr]
        for keyword, rest in instructions()
        if keyword == "ARG" and "=" in rest and rest.split("=")[0] in ("CUDA_IMAGE", "PYTHON_IMAGE")
    )
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu22\.04", args["CUDA_IMAGE"])
    assert args["PYTHON_IMAGE"].startswith("python:3.11-")
    assert found["gpu"][0] == ("FROM", "gpu-base")
    assert found["gpu-base"][0] == ("FROM", "${CUDA_IMAGE}")
    assert found["cpu"][0] == ("FROM", "${PYTHON_IMAGE}")


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_runtime_stage_contract(target: str) -> None:
    stage = stages()[target]
    by_keyword: dict[str, list[str]] = {}
    for keyword, rest in stage:
        by_keyword.setdefault(keyword, []).append(rest)
    assert by_keyword["USER"] == [f"{UID}:{UID}"], "numeric non-root user (runAsNonRoot checks it)"
    assert any(f"--uid {UID}" in rest for rest in by_keyword["RUN"])
    (healthcheck,) = by_keyword["HEALTHCHECK"]
    assert '"python", "/usr/local/lib/longhaul/healthcheck.py"' in healthcheck
    assert any(
        "deploy/docker/healthcheck.py /usr/local/lib/longhaul/healthcheck.py" in c
        for c in by_keyword["COPY"]
    )
    assert any(
        c.startswith("--from=store --chown=10001:10001 /models /models") for c in by_keyword["COPY"]
    )
    env = " ".join(by_keyword["ENV"])
    assert "LONGHAUL_STORE=/models" in env and "LONGHAUL_HOST=0.0.0.0" in env
    assert by_keyword["ENTRYPOINT"] == ['["python", "-m", "service"]']
    assert by_keyword["EXPOSE"] == ["8000"]
    provider = "CUDAExecutionProvider" if target == "gpu" else "CPUExecutionProvider"
    assert f'LONGHAUL_PROVIDERS=\'["{provider}"' in env


def test_store_stage_builds_the_demo_store_like_make_models() -> None:
    runs = " ".join(rest for keyword, rest in stages()["store"] if keyword == "RUN")
    assert "python -m exporters demo-store" in runs and "--store /models" in runs
    assert "python -m model_store verify /models" in runs


def test_dockerignore_keeps_everything_the_dockerfile_copies() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allowlist: everything is excluded first"
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    sources = []
    for keyword, rest in instructions():
        if keyword == "COPY" and "--from=" not in rest:
            sources += [word for word in rest.split()[:-1] if not word.startswith("--")]
    assert "pyproject.toml" in sources and "service" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert any(source == a or source.startswith(a + "/") for a in allowed), source


def test_requirements_follow_pyproject(tmp_path: Path) -> None:
    import tomllib

    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for variant in ("cpu", "gpu"):
        out = tmp_path / variant
        cmd = [sys.executable, str(REQUIREMENTS), variant, str(out)]
        result = run([*cmd, "--pyproject", str(ROOT / "pyproject.toml")])
        assert result.returncode == 0, result.stderr
        torch = (out / "torch.txt").read_text().split()
        rest = (out / "requirements.txt").read_text().split()
        assert torch == [p for p in pins if p.startswith("torch==")]
        expected = {p for p in pins if not p.startswith("torch==")}
        if variant == "gpu":
            expected = {p for p in expected if not p.startswith("onnxruntime==")}
            expected.add("onnxruntime-gpu==1.31.1")
        assert set(rest) == expected


def test_requirements_refuse_a_loose_pin(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["torch==2.13.0", "onnxruntime>=1.30"]\n')
    result = run(
        [
            sys.executable,
            str(REQUIREMENTS),
            "cpu",
            str(tmp_path / "o"),
            "--pyproject",
            str(pyproject),
        ]
    )
    assert result.returncode != 0
    assert "'onnxruntime>=1.30' is not an exact pin" in result.stderr


# ------------------------------------------------------------------------------ healthcheck


def healthcheck(url: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, str(HEALTHCHECK), url], timeout=30)


def test_healthcheck_passes_on_a_ready_server(longhaul_server: Server) -> None:
    result = healthcheck(f"{longhaul_server.url}/health/ready")
    assert result.returncode == 0, result.stderr


def test_healthcheck_default_url_follows_longhaul_port(longhaul_server: Server) -> None:
    env = {"LONGHAUL_PORT": str(longhaul_server.port), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def answering_503() -> Iterator[str]:
    class NotReady(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotReady)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/health/ready"
    server.shutdown()
    server.server_close()


def test_healthcheck_fails_while_not_ready(answering_503: str) -> None:
    result = healthcheck(answering_503)
    assert result.returncode == 1
    assert "answered 503" in result.stderr


def test_healthcheck_fails_when_nothing_listens() -> None:
    result = healthcheck(f"http://127.0.0.1:{free_port()}/health/ready")
    assert result.returncode == 1
    assert "unhealthy" in result.stderr


# ------------------------------------------------------------------------------ seed-store


def make_store(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "manifest.json").write_text(json.dumps({"name": name}))


def test_seed_store_copies_into_an_empty_store(tmp_path: Path) -> None:
    src, dst = tmp_path / "image-models", tmp_path / "volume"
    make_store(src, ["alibi-demo", "linformer-demo"])
    dst.mkdir()
    result = run(["sh", str(SEED), str(src), str(dst)])
    assert result.returncode == 0, result.stderr
    assert "seeded 2 model(s)" in result.stdout
    assert sorted(p.name for p in dst.iterdir()) == ["alibi-demo", "linformer-demo"]
    manifest = json.loads((dst / "alibi-demo" / "1" / "manifest.json").read_text())
    assert manifest == {"name": "alibi-demo"}


def test_seed_store_leaves_a_used_store_alone(tmp_path: Path) -> None:
    src, dst = tmp_path / "image-models", tmp_path / "volume"
    make_store(src, ["alibi-demo"])
    make_store(dst, ["my-model"])
    result = run(["sh", str(SEED), str(src), str(dst)])
    assert result.returncode == 0, result.stderr
    assert "not empty" in result.stdout
    assert sorted(p.name for p in dst.iterdir()) == ["my-model"]


def test_seed_store_fails_on_a_missing_store(tmp_path: Path) -> None:
    src = tmp_path / "image-models"
    make_store(src, ["alibi-demo"])
    result = run(["sh", str(SEED), str(src), str(tmp_path / "missing")])
    assert result.returncode != 0
