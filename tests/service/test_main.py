"""The two ways a user starts the server: ``python -m service`` and ``uvicorn --factory``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import ServiceStore, free_port


def serve(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args],
        env={**os.environ, "LONGHAUL_MODELS": '["lin"]', "LONGHAUL_INTRA_OP_THREADS": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_and_encode(process: subprocess.Popen[str], url: str) -> dict[str, object]:
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[0]
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        response = httpx.post(f"{url}/v1/encode", json={"model": "lin", "inputs": "x = 1"})
        assert response.status_code == 200, response.text
        body: dict[str, object] = response.json()
        return body
    finally:
        process.send_signal(signal.SIGINT)  # graceful: lifespan shutdown stops the engines
        output = process.communicate(timeout=60)[0]
        assert process.returncode == 0, output


def test_python_dash_m_service(service_store: ServiceStore) -> None:
    port = free_port()
    process = serve(["-m", "service", "--store", str(service_store.root), "--port", str(port)], {})
    body = wait_and_encode(process, f"http://127.0.0.1:{port}")
    assert body["model"] == "lin"


def test_uvicorn_factory_reads_settings_from_the_environment(service_store: ServiceStore) -> None:
    port = free_port()
    process = serve(
        ["-m", "uvicorn", "--factory", "service.app:create_app", "--port", str(port)],
        {"LONGHAUL_STORE": str(service_store.root)},
    )
    wait_and_encode(process, f"http://127.0.0.1:{port}")


def test_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--store", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "model store not found" in result.stderr


@pytest.mark.parametrize("module", ["service.app", "service.api.errors", "service.engine.registry"])
def test_service_never_imports_exporters(module: str) -> None:
    code = f"import sys, {module}; assert not any(m.startswith('exporters') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
