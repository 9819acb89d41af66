"""The user's first path, run as a user runs it: ``make serve`` in a checkout with no models/ or
checkpoints/ (so it builds the demo store), then one embeddings and one completions request
from outside, then SIGTERM and a clean exit. CI runs it after ``make test`` (.ci/run).

    python scripts/front_door.py [--ready-timeout SECONDS]

Prints how long each phase took; exits non-zero, saying which check failed, on any failure.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def server_pid(make_pid: int) -> int | None:
    """The ``python -m service`` process that ``make serve`` started."""
    for child in children(make_pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"service" in cmdline and b"-m" in cmdline:
            return child
    return None


class CheckFailedError(RuntimeError):
    """One of the front door's checks did not hold; the message says which."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailedError(what)


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CheckFailedError(f"make serve exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{base}/health/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise CheckFailedError(f"/health/ready not 200 within {timeout:.0f} s")


def check_embeddings(base: str) -> None:
    inputs = ["for i in range(10):", "import os\nprint(os.getcwd())"]
    r = httpx.post(
        f"{base}/v1/embeddings", json={"model": "linformer-demo", "input": inputs}, timeout=60
    )
    check(r.status_code == 200, f"/v1/embeddings answered {r.status_code}: {r.text[:300]}")
    body = r.json()
    data = body["data"]
    check(len(data) == len(inputs), f"{len(data)} embeddings for {len(inputs)} inputs")
    check([d["index"] for d in data] == [0, 1], "embeddings out of order")
    widths = {len(d["embedding"]) for d in data}
    check(len(widths) == 1 and widths.pop() > 0, f"embedding widths {widths}")
    for d in data:
        norm = math.sqrt(sum(v * v for v in d["embedding"]))
        check(abs(norm - 1.0) < 1e-3, f"embedding {d['index']} has norm {norm}, expected 1")
    check(body["usage"]["prompt_tokens"] > 0, "no prompt tokens counted")
    print(f"  /v1/embeddings: {len(data)} x {len(data[0]['embedding'])}, unit norm", flush=True)


def check_completions(base: str) -> None:
    request = {
        "model": "alibi-demo",
        "prompt": "def __init__(self",
        "max_tokens": 16,
        "temperature": 0,
    }
    r = httpx.post(f"{base}/v1/completions", json=request, timeout=120)
    check(r.status_code == 200, f"/v1/completions answered {r.status_code}: {r.text[:300]}")
    body = r.json()
    text = body["choices"][0]["text"]
    check(bool(text.strip()), f"empty completion: {body}")
    check(body["usage"]["completion_tokens"] > 0, "no completion tokens counted")
    print(f"  /v1/completions: {text!r}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ready-timeout", type=float, default=2400.0)
    args = parser.parse_args()
    for built in ("models", "checkpoints"):
        if (ROOT / built).exists():
            print(f"front door: {built}/ exists; this check starts from nothing", file=sys.stderr)
            return 2
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = ROOT / "front-door.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["make", "serve", f"PORT={port}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_ready(base, proc, args.ready_timeout)
            print(
                f"front door: ready after {time.monotonic() - started:.0f} s "
                f"(demo store built from nothing)",
                flush=True,
            )
            check_embeddings(base)
            check_completions(base)
            pid = server_pid(proc.pid)
            check(pid is not None, "cannot find the server process under make")
            assert pid is not None
            os.kill(pid, signal.SIGTERM)
            code = proc.wait(timeout=60)
            # uvicorn shuts down gracefully, then re-raises SIGTERM so the process ends "killed
            # by SIGTERM" as a service should; make reports that as its own error 2.
            check(code in (0, 2), f"make serve exited with {code} after SIGTERM")
            check(not Path(f"/proc/{pid}").exists(), "the server is still running after SIGTERM")
        except (CheckFailedError, httpx.HTTPError, subprocess.TimeoutExpired) as exc:
            proc.kill()
            proc.wait()
            tail = log_path.read_text(errors="replace").splitlines()[-40:]
            print("\n".join(tail), file=sys.stderr)
            print(f"front door FAILED: {exc}", file=sys.stderr)
            return 1
    text = log_path.read_text(errors="replace")
    if "Application shutdown complete." not in text or "Finished server process" not in text:
        print(text[-4000:], file=sys.stderr)
        print("front door FAILED: the server did not shut down gracefully", file=sys.stderr)
        return 1
    if "Traceback" in text:
        print(text[-4000:], file=sys.stderr)
        print("front door FAILED: a traceback in the server's log", file=sys.stderr)
        return 1
    print(f"front door: OK, clean shutdown, {time.monotonic() - started:.0f} s in all", flush=True)
    for line in text.splitlines():  # the demo store's reports and step timings
        timing = line.startswith(("train ", "export ")) and line.endswith(" s")
        if timing or line.startswith(("trained ", "demo store ")):
            print(f"  {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
