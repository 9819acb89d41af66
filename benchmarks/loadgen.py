"""A bounded, closed-loop HTTP load generator for loopback servers.

``concurrency`` workers each send one request, wait for its answer, then send the next, until
``max_requests`` have been sent or ``max_seconds`` have passed (whichever first); requests in
flight then finish (bounded by the client timeout). Nothing runs unbounded, and the target must
be a loopback address (this machine only).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx

from benchmarks.common import percentile


@dataclass
class LoadResult:
    concurrency: int
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    tokens: int = 0  # input tokens of the successful requests (as the client counted them)
    elapsed_s: float = 0.0

    def merge(self, other: LoadResult) -> LoadResult:
        """This result and ``other`` (another round at the same concurrency) as one."""
        errors = dict(self.errors)
        for key, n in other.errors.items():
            errors[key] = errors.get(key, 0) + n
        return LoadResult(
            self.concurrency,
            self.sent + other.sent,
            self.ok + other.ok,
            errors,
            [*self.latencies_s, *other.latencies_s],
            self.tokens + other.tokens,
            self.elapsed_s + other.elapsed_s,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 4),
            "requests_per_s": self.ok / self.elapsed_s if self.elapsed_s else 0.0,
            "tokens_per_s": self.tokens / self.elapsed_s if self.elapsed_s else 0.0,
            "p50_s": percentile(self.latencies_s, 50),
            "p90_s": percentile(self.latencies_s, 90),
            "p99_s": percentile(self.latencies_s, 99),
            "latencies_s": [round(v, 5) for v in self.latencies_s],
        }


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"load tests only target this machine (loopback); got {url!r}")


async def run_load(
    url: str,
    bodies: list[tuple[dict[str, Any], int]],
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    timeout_s: float = 120.0,
    check: Callable[[httpx.Response], bool] | None = None,
) -> LoadResult:
    """POST ``bodies`` (cycled; each with its token count) to ``url`` from ``concurrency``
    closed-loop workers. Latency is from send to the full response body."""
    require_loopback(url)
    result = LoadResult(concurrency)
    next_index = 0
    started = time.perf_counter()
    deadline = started + max_seconds
    last_done = started
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index, last_done
        while next_index < max_requests and time.perf_counter() < deadline:
            body, tokens = bodies[next_index % len(bodies)]
            next_index += 1
            result.sent += 1
            sent = time.perf_counter()
            try:
                response = await client.post(url, json=body)
                good = response.status_code == 200 and (check is None or check(response))
                key = "ok" if good else f"http {response.status_code}"
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            done = time.perf_counter()
            if key == "ok":
                result.ok += 1
                result.tokens += tokens
                result.latencies_s.append(done - sent)
                last_done = max(last_done, done)
            else:
                result.errors[key] = result.errors.get(key, 0) + 1

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    # Throughput over the time the answers took: from the first send to the last good answer.
    result.elapsed_s = last_done - started
    return result


def wait_ready(url: str, timeout_s: float, alive: Callable[[], bool]) -> None:
    """Poll ``url`` until it answers 200; fail early if the server process died."""
    require_loopback(url)
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if not alive():
            raise RuntimeError(f"server behind {url} exited before it was ready")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")
