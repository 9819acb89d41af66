"""Shared plumbing: machine facts, timing, statistics, worker subprocesses, JSON.

Every section records raw samples next to the medians it reports, so a reader can recompute
anything from ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SCRATCH = RESULTS / "scratch"  # gitignored: quick runs and intermediate artifacts
GIB = 1024**3
MIB = 1024**2


# ----------------------------------------------------------------------------- machine


def _cpu_model() -> tuple[str, list[str]]:
    model = platform.processor() or "unknown"
    flags: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
                flags = [f for f in value.split() if f in wanted]
    return model, flags


def _memory_total() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_revision() -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, memory, library versions, load at the start."""
    import torch

    model, flags = _cpu_model()
    return {
        "cpu": model,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "memory_gib": round(_memory_total() / GIB, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            p: _version(p)
            for p in (
                "torch",
                "onnxruntime",
                "onnx",
                "numpy",
                "transformers",
                "fastapi",
                "uvicorn",
                "httpx",
                "tokenizers",
                "matplotlib",
            )
        },
        "git": git_revision(),
        "env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE")
            if k in os.environ
        },
        "load_average_at_start": load_average(),
    }


# ----------------------------------------------------------------------------- statistics


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]), no interpolation: p99 of 50 samples is the max."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return float(ordered[rank - 1])


@dataclass
class Timing:
    """Wall-clock seconds of repeated calls; ``warmup`` runs are kept apart from ``samples``."""

    warmup: list[float] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return median(self.samples)

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "samples_s": [round(s, 6) for s in self.samples],
            "warmup_s": [round(s, 6) for s in self.warmup],
        }


def time_calls(
    fn: Callable[[], object],
    warmup: int = 1,
    min_samples: int = 3,
    max_samples: int = 10,
    budget_s: float = 10.0,
) -> Timing:
    """Run ``fn`` ``warmup`` times, then until ``max_samples`` or until ``budget_s`` is spent
    after at least ``min_samples``. A slow call therefore gets few samples, a fast one many."""
    timing = Timing()
    for _ in range(warmup):
        started = time.perf_counter()
        fn()
        timing.warmup.append(time.perf_counter() - started)
    spent = 0.0
    while len(timing.samples) < max_samples and (
        len(timing.samples) < min_samples or spent < budget_s
    ):
        started = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - started
        timing.samples.append(elapsed)
        spent += elapsed
    return timing


# ----------------------------------------------------------------------------- memory


def rss_bytes(pid: int | str = "self") -> int:
    """Current resident set size of a process (VmRSS), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_bytes() -> int:
    """High-water mark of this process's RSS (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- subprocesses


@dataclass
class WorkerResult:
    ok: bool
    result: dict[str, Any] | None
    reason: str | None  # why it failed: "memory cap", "time cap", "error: ..."
    wall_s: float
    max_rss_seen: int  # the parent's own samples of the child's RSS (enforcement, not reporting)


def run_worker(
    module: str,
    spec: dict[str, Any],
    timeout_s: float,
    memory_cap_bytes: int,
    poll_s: float = 0.05,
) -> WorkerResult:
    """``python -m <module> --worker '<json>'`` in a fresh process; its last stdout line is JSON.

    A fresh process per point is what makes the peak RSS of one point independent of the
    others (allocators keep freed memory). The parent polls the child's RSS and kills it past
    ``memory_cap_bytes`` (before the machine starts swapping or the OOM killer picks a victim),
    and past ``timeout_s``.
    """
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    max_rss, reason = 0, None
    while proc.poll() is None:
        rss = rss_bytes(proc.pid)
        max_rss = max(max_rss, rss)
        if rss > memory_cap_bytes:
            reason = f"memory cap: RSS passed {memory_cap_bytes / GIB:.1f} GiB"
        elif time.perf_counter() - started > timeout_s:
            reason = f"time cap: still running after {timeout_s:.0f} s"
        if reason:
            proc.kill()
            break
        time.sleep(poll_s)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    if reason:
        return WorkerResult(False, None, reason, wall, max_rss)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        if proc.returncode in (-9, 137):
            tail = "killed (out of memory?)"
        return WorkerResult(False, None, f"error: {tail}", wall, max_rss)
    return WorkerResult(True, json.loads(lines[-1]), None, wall, max_rss)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server_process(
    cmd: list[str], env: dict[str, str] | None = None, log_path: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server subprocess; always terminate it (then kill) on exit."""
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_path:
            log.close()  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- JSON


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def set_threads(threads: int) -> None:
    """Intra-op threads for torch in this process (the machine's cores unless told otherwise)."""
    import torch

    torch.set_num_threads(threads)


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x): the exponent p in y ∝ x^p."""
    import math

    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    mx = sum(p[0] for p in pairs) / len(pairs)
    my = sum(p[1] for p in pairs) / len(pairs)
    var = sum((p[0] - mx) ** 2 for p in pairs)
    if var == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pairs) / var
