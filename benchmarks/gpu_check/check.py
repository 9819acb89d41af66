"""The GPU check proper; started by ``python3 -m benchmarks.gpu_check`` once the machine has a GPU
and the runtime dependencies are importable.

1. Build the tiny store (every architecture in ONNX and TorchScript, fp32) plus two
   reduced-precision exports, or use ``--store``.
2. GPU against CPU outputs of each model file at several lengths, through the service's own
   backends (``compare``).
3. Serve the store with ``python -m service`` on loopback; from outside, ``/v1/models`` must
   report where each model runs and why it fell back; encode throughput at 1 and 64 clients,
   generation tokens/s at 1 and 16 streams.
4. One summary table, and everything as JSON (``--out``). Exit 1 when a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import onnxruntime as ort
import torch
from tokenizers import Tokenizer

from benchmarks.common import SCRATCH, free_port, server_process, write_json
from benchmarks.gpu_check import compare, env
from benchmarks.loadgen import run_load, wait_ready
from model_store import ModelRepository
from service.backends import create_backend
from service.settings import Settings

ENCODE_CLIENTS = (1, 64)
GENERATE_STREAMS = (1, 16)
ENCODE_TOKENS = 512
NEW_TOKENS = 64
# Reduced precision on the GPU: one TorchScript fp16 encoder, one ONNX int8 encoder.
REDUCED = (("shatter", "torchscript", "fp16"), ("linformer", "onnx", "int8"))


def log(message: str) -> None:
    print(f"gpu-check: {message}", flush=True)


# ----------------------------------------------------------------------------- facts


def machine_facts(gpus: list[env.Gpu]) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    versions = {
        name: env.installed_versions().get(name)
        for name in ("torch", "onnxruntime", "onnxruntime-gpu", "numpy", "fastapi", "uvicorn")
    }
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "gpus": [asdict(g) for g in gpus],
        "torch_gpu": None
        if props is None
        else {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
        },
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_cuda_available": torch.cuda.is_available(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "versions": versions,
        "pins_differing": {
            n: {"installed": have, "pin": pin}
            for n, (have, pin) in env.plan_install(
                env.runtime_pins(), env.installed_versions(), []
            ).kept.items()
        },
    }


def gpu_memory_used_mib() -> list[int]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    return [int(v) for v in out.stdout.split() if v.isdigit()]


# ----------------------------------------------------------------------------- store


def build_store(workdir: Path) -> Path:
    from exporters.demo_store import build_demo_store
    from exporters.export import ExportRequest, export

    store, checkpoints = workdir / "store", workdir / "checkpoints"
    started = time.perf_counter()
    build_demo_store(checkpoints, store, lambda m: None, preset="tiny")
    repo = ModelRepository(store)
    for arch, fmt, precision in REDUCED:
        name = f"{arch}-{precision}" + ("-ts" if fmt == "torchscript" else "")
        if name not in repo.list_models():
            export(
                ExportRequest(
                    checkpoint=checkpoints / arch, store=store, name=name, format=fmt,
                    precision=precision, progress=False,
                )
            )  # fmt: skip
    log(f"store {store}: {len(repo.list_models())} models in {time.perf_counter() - started:.0f} s")
    return store


# ----------------------------------------------------------------------------- parity


def compare_all(store: Path) -> tuple[dict[str, compare.Comparison], dict[str, str]]:
    """Each model file: default (GPU-preferring) settings against CPU-only settings."""
    repo = ModelRepository(store)
    gpu_settings = Settings(store=store)
    cpu_settings = Settings(
        store=store, providers=["CPUExecutionProvider"], torchscript_device="cpu"
    )
    done: dict[str, compare.Comparison] = {}
    skipped: dict[str, str] = {}
    for name in repo.list_models():
        version = repo.resolve(name)
        gpu = create_backend(version, gpu_settings)
        try:
            if gpu.provider not in compare.GPU_PROVIDERS:
                skipped[name] = f"runs on {gpu.provider}"
                continue
            cpu = create_backend(version, cpu_settings)
            try:
                lengths = compare.lengths_for(version.manifest)
                done[name] = compare.compare_backends(name, version.manifest, gpu, cpu, lengths)
                log(f"{name}: {done[name].summary}")
            finally:
                cpu.close()
        except TypeError as exc:  # a cache dtype numpy cannot hold (bfloat16)
            skipped[name] = str(exc)
        finally:
            gpu.close()
            gc.collect()
    return done, skipped


# ----------------------------------------------------------------------------- load


def sample_text(tokenizer: Tokenizer, tokens: int) -> tuple[str, int]:
    """About ``tokens`` tokens of the standard library's own source (what the demos train on)."""
    source = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    ids = tokenizer.encode(source).ids[:tokens]
    text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text).ids)


async def generate_load(
    url: str, model: str, streams: int, max_seconds: float, max_requests: int
) -> dict[str, Any]:
    """``streams`` closed-loop clients asking for NEW_TOKENS greedy tokens each time."""
    body = {"model": model, "prompt": "def main(", "max_new_tokens": NEW_TOKENS, "temperature": 0}
    tokens, ok, errors, sent = 0, 0, 0, 0
    started = time.perf_counter()
    deadline = started + max_seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens, ok, errors, sent
        while sent < max_requests and time.perf_counter() < deadline:
            sent += 1
            response = await client.post(url, json=body)
            if response.status_code == 200:
                ok += 1
                tokens += int(response.json()["usage"]["completion_tokens"])
            else:
                errors += 1

    async with httpx.AsyncClient(timeout=120.0) as client:
        await asyncio.gather(*(worker(client) for _ in range(streams)))
    elapsed = time.perf_counter() - started
    return {
        "streams": streams, "requests": ok, "errors": errors, "tokens": tokens,
        "elapsed_s": round(elapsed, 3), "tokens_per_s": tokens / elapsed if elapsed else 0.0,
    }  # fmt: skip


def measure(base: str, store: Path, cards: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    repo = ModelRepository(store)
    out: dict[str, Any] = {}
    for card in cards:
        name = card["id"]
        points: dict[str, Any] = {}
        if card["task"] == "encode":
            tokenizer = Tokenizer.from_file(str(repo.resolve(name).tokenizer_path))
            text, n = sample_text(tokenizer, min(ENCODE_TOKENS, card["max_context"]))
            bodies = [({"model": name, "inputs": text, "truncate": True}, n)]
            for clients in ENCODE_CLIENTS:
                result = asyncio.run(
                    run_load(f"{base}/v1/encode", bodies, clients, 100 * clients, seconds)
                )
                summary = result.summary()
                summary.pop("latencies_s")
                points[f"encode_{clients}"] = summary
        else:
            for streams in GENERATE_STREAMS:
                points[f"generate_{streams}"] = asyncio.run(
                    generate_load(f"{base}/v1/generate", name, streams, seconds, 20 * streams)
                )
        out[name] = points
        log(f"{name}: " + ", ".join(f"{k} {_rate(v):,.0f} tok/s" for k, v in points.items()))
    return out


def _rate(point: dict[str, Any]) -> float:
    return float(point["tokens_per_s"])


def serve_and_measure(store: Path, workdir: Path, seconds: float) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "service", "--store", str(store), "--port", str(port)]
    with server_process(cmd, {"LONGHAUL_LOG_LEVEL": "warning"}, workdir / "server.log") as proc:
        started = time.perf_counter()
        wait_ready(f"{base}/health/ready", 600, lambda: proc.poll() is None)
        ready_s = time.perf_counter() - started
        cards = httpx.get(f"{base}/v1/models", timeout=30).json()["data"]
        memory_loaded = gpu_memory_used_mib()
        load = measure(base, store, cards, seconds)
        memory_after = gpu_memory_used_mib()
    return {
        "ready_s": round(ready_s, 1),
        "cards": cards,
        "load": load,
        "gpu_memory_used_mib": {"after_load": memory_loaded, "after_traffic": memory_after},
    }


# ----------------------------------------------------------------------------- summary


def summarize(
    served: dict[str, Any],
    comparisons: dict[str, compare.Comparison],
    skipped: dict[str, str],
) -> tuple[list[dict[str, Any]], list[compare.ProviderCheck]]:
    cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    checks = [
        compare.check_provider(c, cuda_ep, torch.cuda.is_available()) for c in served["cards"]
    ]
    rows = []
    for card, chk in zip(served["cards"], checks, strict=True):
        name = card["id"]
        row: dict[str, Any] = {
            "model": name,
            "format": card["format"],
            "precision": card["precision"],
            "provider": card["provider"],
            "fallback": card.get("fallback"),
            "provider_ok": chk.ok,
            "parity": compare.parity_cell(comparisons.get(name), skipped.get(name)),
        }
        for key, point in served["load"].get(name, {}).items():
            row[key] = _rate(point)
        rows.append(row)
    return rows, checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check")
    parser.add_argument("--store", type=Path, help="serve this store (default: build one)")
    parser.add_argument("--workdir", type=Path, default=SCRATCH / "gpu-check")
    parser.add_argument("--out", type=Path, default=SCRATCH / "gpu-check.json")
    parser.add_argument("--seconds", type=float, default=6.0, help="per load point")
    parser.add_argument(
        "--build-only", action="store_true", help="build the store in --workdir, then stop"
    )
    args = parser.parse_args(argv)
    if args.build_only:
        args.workdir.mkdir(parents=True, exist_ok=True)
        build_store(args.workdir)
        return 0

    gpus, source = env.detect_gpus()
    facts = machine_facts(gpus)
    log(f"{', '.join(f'{g.name} ({g.memory_mib} MiB)' for g in gpus) or source}; "
        f"torch {facts['torch']} CUDA {facts['torch_cuda']} (available: "
        f"{facts['torch_cuda_available']}); onnxruntime {facts['onnxruntime']} "
        f"{facts['onnxruntime_providers']}")  # fmt: skip
    args.workdir.mkdir(parents=True, exist_ok=True)
    store = args.store or build_store(args.workdir)
    comparisons, skipped = compare_all(store)
    served = serve_and_measure(store, args.workdir, args.seconds)
    rows, checks = summarize(served, comparisons, skipped)
    failures = [f"{c.model}: {c.note}" for c in checks if not c.ok]
    failures += [f"{n}: {c.summary}" for n, c in comparisons.items() if not c.passed]
    failures += [
        f"{name} {key}: {point['errors']} failed requests"
        for name, points in served["load"].items()
        for key, point in points.items()
        if point["errors"]
    ]
    result = {
        "machine": facts,
        "store": str(store),
        "summary": rows,
        "providers": [asdict(c) for c in checks],
        "parity": {n: asdict(c) for n, c in comparisons.items()},
        "parity_skipped": skipped,
        "served": served,
        "failures": failures,
    }
    write_json(args.out, result)
    print(compare.format_table(rows))
    for row in rows:
        if row["fallback"]:
            log(f"{row['model']} fell back: {row['fallback']}")
    for failure in failures:
        log(f"FAIL {failure}")
    log(f"{'FAILED' if failures else 'passed'}: {len(rows)} models; JSON in {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
