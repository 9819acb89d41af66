"""Service fixtures: one model store exported once per session, apps over it, a live server.

The store (``service_store``) holds real tiny models in both formats:

* ``lin`` — Linformer encoder, ONNX, max_context 128 (short, so truncate/chunk tests stay fast)
* ``sha`` — Shatter encoder, TorchScript
* ``ali`` — ALiBi decoder (task generate), ONNX kv-cache graph

Tests that change the store work on ``store_copy`` (a per-test copy); everything else shares it.
``live_server`` runs uvicorn on a free loopback port for clients that need a real socket (the
official ``openai`` client); generation tests reuse it for /v1/completions.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

ENCODE_MODELS = ("lin", "sha")
LIN_MAX_CONTEXT = 128
T = TypeVar("T")


@dataclass(frozen=True)
class ServiceStore:
    root: Path
    checkpoints: dict[str, Path]  # model name -> the checkpoint it was exported from


@pytest.fixture(scope="session")
def service_store(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Callable[[str], Path]
) -> ServiceStore:
    from exporters.export import ExportRequest, export

    root = tmp_path_factory.mktemp("service-store")
    plan = [
        ("lin", "linformer", "onnx", LIN_MAX_CONTEXT),
        ("sha", "shatter", "torchscript", None),
        ("ali", "alibi", "onnx", None),
    ]
    checkpoints = {}
    for name, arch, fmt, max_context in plan:
        checkpoints[name] = tiny_checkpoint(arch)
        export(
            ExportRequest(
                checkpoint=checkpoints[name], store=root, name=name, format=fmt,
                max_context=max_context, progress=False,
            )
        )  # fmt: skip
    return ServiceStore(root, checkpoints)


@pytest.fixture
def store_copy(service_store: ServiceStore, tmp_path: Path) -> ServiceStore:
    """A private copy of the session store, for tests that add, corrupt or remove versions."""
    root = tmp_path / "store"
    shutil.copytree(service_store.root, root)
    return ServiceStore(root, service_store.checkpoints)


def make_settings(store: Path, **overrides: Any) -> Settings:
    """Settings for tests: only the encode models unless told otherwise; 2 threads, fixed."""
    values: dict[str, Any] = {
        "store": store,
        "models": list(ENCODE_MODELS),
        "intra_op_threads": 2,
        "max_wait_ms": 2.0,
    }
    values.update(overrides)
    return Settings(**values)


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/health/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"app not ready after {timeout} s: {client.get('/health/ready').json()}")


@pytest.fixture(scope="module")
def client(service_store: ServiceStore) -> Iterator[TestClient]:
    """A ready app over the shared store (lin + sha), shared by a test module. Read-only use."""
    with TestClient(create_app(make_settings(service_store.root))) as test_client:
        wait_ready(test_client)
        yield test_client


@asynccontextmanager
async def running_app(app: FastAPI, timeout: float = 60.0) -> AsyncIterator[httpx.AsyncClient]:
    """Lifespan + an in-process async client, for tests that need real concurrency."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            deadline = time.monotonic() + timeout
            while (await http.get("/health/ready")).status_code != 200:
                if time.monotonic() > deadline:
                    raise AssertionError("app not ready")
                await asyncio.sleep(0.02)
            yield http


def run(coro: Awaitable[T]) -> T:
    """Run one coroutine to completion (no async test plugin needed)."""

    async def main() -> T:
        return await coro

    return asyncio.run(main())


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds (a gauge, a queue, an engine's stats): tests order
    events on the state they need, never on how long something usually takes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout} s")
        await asyncio.sleep(0.001)


# ------------------------------------------------------------------------------ live server


@dataclass
class LiveServer:
    url: str  # e.g. http://127.0.0.1:PORT
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_live_server(settings: Settings, timeout: float = 120.0) -> LiveServer:
    """uvicorn in a thread on a free loopback port; returns once /health/ready is 200."""
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return LiveServer(url, app, server, thread)
        except httpx.TransportError:
            pass
        if not thread.is_alive():
            raise AssertionError("uvicorn exited during start-up")
        time.sleep(0.05)
    server.should_exit = True
    raise AssertionError(f"live server on {url} not ready after {timeout} s")


@pytest.fixture(scope="session")
def live_server(service_store: ServiceStore) -> Iterator[LiveServer]:
    """One real server for the session over every model in the store, encode and generate."""
    server = start_live_server(make_settings(service_store.root, models=[]))
    yield server
    server.stop()


# ------------------------------------------------------------------------------ references


class EagerReference:
    """The eager PyTorch model a store entry was exported from: the numbers to match."""

    def __init__(self, checkpoint: Path) -> None:
        from exporters.checkpoint import load_checkpoint

        self.ckpt = load_checkpoint(checkpoint)

    def token_ids(self, text: str) -> list[int]:
        ids: list[int] = self.ckpt.tokenizer.encode(text).ids  # special prefix included
        return ids

    def hidden(self, ids: list[int]) -> np.ndarray:
        """(t, d) final hidden states of one unpadded sequence."""
        with torch.no_grad():
            x = torch.tensor([ids], dtype=torch.long)
            _, hidden = self.ckpt.model(x, torch.ones_like(x))
        out: np.ndarray = hidden[0].float().numpy()
        return out

    def embed(self, ids: list[int], pooling: str = "mean", normalize: bool = True) -> np.ndarray:
        hidden = self.hidden(ids)
        vector = {"mean": hidden.mean(axis=0), "cls": hidden[0], "none": hidden}[pooling]
        if normalize:
            vector = vector / np.linalg.norm(vector, axis=-1, keepdims=True)
        return vector


@pytest.fixture(scope="session")
def eager(service_store: ServiceStore) -> Callable[[str], EagerReference]:
    cache: dict[str, EagerReference] = {}

    def get(name: str) -> EagerReference:
        if name not in cache:
            cache[name] = EagerReference(service_store.checkpoints[name])
        return cache[name]

    return get
