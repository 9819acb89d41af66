"""Section 7 — overload: each engine driven past its queue limit, on a real server over loopback.

A real ``python -m service`` subprocess on a free 127.0.0.1 port serves a tiny encoder and a tiny
decoder with small, explicit limits (``LONGHAUL_MAX_QUEUE_REQUESTS``,
``LONGHAUL_MAX_WAITING_SEQUENCES``, ``LONGHAUL_MAX_BATCH_SIZE``, ``LONGHAUL_MAX_NUM_SEQS``). For
each engine in turn, first one client sends a few requests alone (the solo latency the bound is
scaled from), then ``clients`` closed-loop clients, far more than the queue and the running
slots hold, send for a fixed ``seconds``. A client that gets 429 waits ``retry_pause_s`` (less
than the server's ``Retry-After``: an impatient client, so the excess keeps arriving) and sends
again. Measured per engine: every status, whether each 429 carried ``Retry-After``, the latency
of admitted (200) requests, the server's RSS sampled through the run, and the server's own
``longhaul_requests_rejected_total{reason="queue_full"}`` against the 429s the clients saw.

The bound on admitted latency follows from the limits, not from a speed goal: an admitted
request waits behind at most ``queue_limit`` queued requests and the ones running, each served
in about the solo time, so p99 <= slack x (queue_limit / slots + 1) x solo p99 (+ a floor for
scheduling noise on a shared machine). Without the queue limit a closed loop of ``clients``
would wait ~clients / slots solo times instead.

``run_engine`` and ``serve`` are also what tests/service/test_overload.py runs (shorter).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import ROOT, free_port, percentile
from benchmarks.loadgen import require_loopback, wait_ready

MIB = 1024 * 1024


@dataclass(frozen=True)
class OverloadPlan:
    seconds: float  # drive time per engine
    clients: int  # concurrent closed-loop clients per engine
    queue_limit: int  # LONGHAUL_MAX_QUEUE_REQUESTS and LONGHAUL_MAX_WAITING_SEQUENCES
    slots: int  # LONGHAUL_MAX_BATCH_SIZE (encode) and LONGHAUL_MAX_NUM_SEQS (generate)
    retry_pause_s: float  # how long a client waits after a 429
    solo_requests: int  # one client alone, before the overload, per engine
    max_new_tokens: int  # per generate request (greedy)
    slack: float = 3.0  # on the queueing bound of admitted p99
    floor_s: float = 1.0  # added to it: scheduling noise of a shared machine


def plan(quick: bool) -> OverloadPlan:
    if quick:
        return OverloadPlan(3.0, 32, 2, 2, 0.1, 8, 16)
    return OverloadPlan(10.0, 32, 2, 2, 0.1, 16, 16)


def server_env(plan: OverloadPlan, models: list[str]) -> dict[str, str]:
    """The settings of the overloaded server (everything else default)."""
    return {
        "LONGHAUL_MODELS": json.dumps(models),
        "LONGHAUL_MAX_QUEUE_REQUESTS": str(plan.queue_limit),
        "LONGHAUL_MAX_WAITING_SEQUENCES": str(plan.queue_limit),
        "LONGHAUL_MAX_BATCH_SIZE": str(plan.slots),
        "LONGHAUL_MAX_NUM_SEQS": str(plan.slots),
        "LONGHAUL_RETRY_AFTER_SECONDS": "1",
        "LONGHAUL_CALIBRATION_SECONDS": "0",
        "LONGHAUL_INTRA_OP_THREADS": "1",
        "LONGHAUL_LOG_LEVEL": "warning",
    }


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]

    def rss_bytes(self) -> int:
        """Resident set size of the server process now (0 once it is gone)."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return 0
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0


@contextlib.contextmanager
def serve(
    store: Path, env: dict[str, str], log_path: Path, timeout_s: float = 300.0
) -> Iterator[Server]:
    """``python -m service`` on a free loopback port; yields once /health/ready is 200, always
    terminates it (then kills) on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    require_loopback(url)
    command = [sys.executable, "-m", "service", "--store", str(store), "--port", str(port)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_ready(f"{url}/health/ready", timeout_s, lambda: process.poll() is None)
            yield Server(url, process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class EngineRun:
    """What one engine's overload produced, as the clients and the server saw it."""

    statuses: Counter[str] = field(default_factory=Counter)
    admitted_latencies_s: list[float] = field(default_factory=list)
    solo_latencies_s: list[float] = field(default_factory=list)
    rejected_without_retry_after: int = 0
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes)
    server_rejected: float = 0.0  # the server's own queue_full count over the run
    elapsed_s: float = 0.0

    @property
    def admitted(self) -> int:
        return self.statuses["200"]

    @property
    def rejected(self) -> int:
        return self.statuses["429"]

    def bound_s(self, plan: OverloadPlan) -> float:
        """The admitted p99 the limits allow (module docstring)."""
        solo = percentile(self.solo_latencies_s, 99)
        return plan.slack * (plan.queue_limit / plan.slots + 1) * solo + plan.floor_s

    def rss_growth_bytes(self) -> int:
        """RSS at the end minus RSS after the first quarter of the run (allocator warm-up)."""
        if len(self.rss_samples) < 2:
            return 0
        settle = self.elapsed_s / 4
        after = [rss for t, rss in self.rss_samples if t >= settle] or [self.rss_samples[-1][1]]
        return self.rss_samples[-1][1] - after[0]

    def summary(self, plan: OverloadPlan) -> dict[str, Any]:
        rss = [b for _, b in self.rss_samples]
        return {
            "statuses": dict(self.statuses),
            "sent": sum(self.statuses.values()),
            "admitted": self.admitted,
            "rejected": self.rejected,
            "rejected_share": self.rejected / max(1, sum(self.statuses.values())),
            "rejected_without_retry_after": self.rejected_without_retry_after,
            "server_rejected": self.server_rejected,
            "admitted_per_s": self.admitted / self.elapsed_s if self.elapsed_s else 0.0,
            "elapsed_s": round(self.elapsed_s, 3),
            "solo_p50_s": percentile(self.solo_latencies_s, 50),
            "solo_p99_s": percentile(self.solo_latencies_s, 99),
            "admitted_p50_s": percentile(self.admitted_latencies_s, 50),
            "admitted_p99_s": percentile(self.admitted_latencies_s, 99),
            "admitted_max_s": max(self.admitted_latencies_s, default=float("nan")),
            "p99_bound_s": self.bound_s(plan),
            "rss_first_mib": rss[0] / MIB if rss else None,
            "rss_last_mib": rss[-1] / MIB if rss else None,
            "rss_max_mib": max(rss) / MIB if rss else None,
            "rss_growth_mib": self.rss_growth_bytes() / MIB,
        }


def rejected_count(metrics_text: str, model: str) -> float:
    """``longhaul_requests_rejected_total{model, reason="queue_full"}`` from a /metrics page."""
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "longhaul_requests_rejected":
            continue
        for sample in family.samples:
            wanted = {"model": model, "reason": "queue_full"}
            if sample.name.endswith("_total") and sample.labels == wanted:
                return float(sample.value)
    return 0.0


async def run_engine(
    server: Server, path: str, body: dict[str, Any], model: str, plan: OverloadPlan
) -> EngineRun:
    """Solo requests, then ``plan.clients`` closed-loop clients for ``plan.seconds``."""
    run = EngineRun()
    url = f"{server.url}{path}"
    # Idle connections expire on the client first: uvicorn closes them after 5 s, and a client
    # that reuses one at that instant gets a connection reset, not an answer.
    limits = httpx.Limits(
        max_connections=plan.clients, max_keepalive_connections=plan.clients, keepalive_expiry=2.0
    )
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as client:
        for _ in range(plan.solo_requests):
            sent = time.perf_counter()
            response = await client.post(url, json=body)
            response.raise_for_status()
            run.solo_latencies_s.append(time.perf_counter() - sent)
        before = rejected_count((await client.get(f"{server.url}/metrics")).text, model)
        started = time.perf_counter()
        deadline = started + plan.seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                try:
                    response = await client.post(url, json=body)
                except httpx.HTTPError as exc:
                    run.statuses[f"error: {type(exc).__name__}"] += 1
                    continue
                status = str(response.status_code)
                run.statuses[status] += 1
                if status == "200":
                    run.admitted_latencies_s.append(time.perf_counter() - sent)
                elif status == "429":
                    if not response.headers.get("retry-after", "").isdigit():
                        run.rejected_without_retry_after += 1
                    await asyncio.sleep(plan.retry_pause_s)

        async def sample_rss() -> None:
            while time.perf_counter() < deadline:
                run.rss_samples.append((time.perf_counter() - started, server.rss_bytes()))
                await asyncio.sleep(0.1)

        await asyncio.gather(sample_rss(), *(worker() for _ in range(plan.clients)))
        run.elapsed_s = time.perf_counter() - started
        run.rss_samples.append((run.elapsed_s, server.rss_bytes()))
        after = rejected_count((await client.get(f"{server.url}/metrics")).text, model)
        run.server_rejected = after - before
    return run


ENCODE_TEXT = "def load(path):\n    with open(path) as f:\n        return json.load(f)\n" * 3
GENERATE_PROMPT = "class Config:\n    def __init__(self, path):\n        self.path = path\n"


def bodies(encoder: str, decoder: str, plan: OverloadPlan) -> dict[str, tuple[str, dict[str, Any]]]:
    """engine -> (route, body): one fixed request per engine, so every admitted one costs alike."""
    return {
        "encode": ("/v1/encode", {"model": encoder, "inputs": ENCODE_TEXT, "truncate": True}),
        "generate": ("/v1/generate", {
            "model": decoder, "prompt": GENERATE_PROMPT, "max_new_tokens": plan.max_new_tokens,
            "temperature": 0,
        }),
    }  # fmt: skip


def build_store(work: Path, log: Callable[[str], None]) -> Path:
    """A tiny Linformer encoder and ALiBi decoder (5 training steps each), exported to ONNX."""
    from exporters.export import ExportRequest, export
    from exporters.training import train

    store = work / "store"
    if (store / "enc").is_dir() and (store / "dec").is_dir():
        return store
    for name, arch in (("enc", "linformer"), ("dec", "alibi")):
        checkpoint = work / f"ckpt-{arch}"
        if not (checkpoint / "config.json").is_file():
            train(arch, "tiny", checkpoint, steps=5, seed=0, progress=False)
        export(ExportRequest(checkpoint=checkpoint, store=store, name=name, format="onnx",
                             progress=False))  # fmt: skip
        log(f"  built {name} ({arch})")
    return store


def section(quick: bool, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    p = plan(quick)
    store = build_store(work, log)
    results: dict[str, Any] = {"plan": p.__dict__, "engines": {}}
    with serve(store, server_env(p, ["enc", "dec"]), work / "server.log") as server:
        for engine, (path, body) in bodies("enc", "dec", p).items():
            model = body["model"]
            run = asyncio.run(run_engine(server, path, body, model, p))
            summary = run.summary(p)
            results["engines"][engine] = summary
            log(
                f"  {engine}: {summary['sent']} sent in {summary['elapsed_s']:.1f} s by "
                f"{p.clients} clients: {summary['admitted']} x 200, {summary['rejected']} x 429 "
                f"(server counted {summary['server_rejected']:.0f}), other "
                f"{ {k: v for k, v in summary['statuses'].items() if k not in ('200', '429')} }; "
                f"admitted p99 {summary['admitted_p99_s']:.3f} s (bound "
                f"{summary['p99_bound_s']:.3f} s, solo p99 {summary['solo_p99_s']:.3f} s); RSS "
                f"{summary['rss_first_mib']:.0f} -> {summary['rss_last_mib']:.0f} MiB"
            )
    return results
