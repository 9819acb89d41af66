"""Section 3 — serving: Longhaul's ``/v1/encode`` against a naive FastAPI + eager PyTorch server.

One randomly initialised encoder (models.REALISTIC size) is saved as a checkpoint, exported and
published with the real exporter (``exporters.export``, parity included) into a scratch store,
and served by a real ``python -m service`` subprocess on a free loopback port. The same
checkpoint is served by ``benchmarks/naive_server.py``. A closed-loop load generator
(``loadgen.py``) then sends the same request mix at each concurrency, alternating between the
servers level by level so that background load drifts hit all of them alike.

Longhaul variants: the CPU default chosen in section 2 (format + precision) with the default
settings, the same model with batching off (``LONGHAUL_MAX_BATCH_SIZE=1``) and with the earlier
deadline batching (``LONGHAUL_BATCH_POLICY=deadline``), and, when the default is not fp32 (full
runs), ONNX fp32 too, which separates what batching buys from what precision buys. Padding
ratio and batch size come from Longhaul's own ``/metrics`` (difference before/after each level).

Two models at once: one Longhaul process serves the encoder and a decoder (a random BLOOM
imported with ``exporters import hf-bloom``, section 4's model); each level runs c encode clients
and a few generate clients at the same time, for the same batching variants, plus one whose two
models each take every core (``LONGHAUL_INTRA_OP_THREADS`` = cores, the runtimes' own default)
instead of sharing the thread budget.

Servers are started one after another, each waiting for the previous to be ready, so that the
warm-up calibration of one is not timed while another loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import cpu_seconds, free_port, server_process, write_json
from benchmarks.loadgen import LoadResult, run_load, wait_ready
from benchmarks.models import REALISTIC, arch_config, build

# The exporter's default (exporters/precision.py), served when section 2 did not run.
DEFAULT_SERVING = ("onnx", "int8")


@dataclass(frozen=True)
class ServingPlan:
    arch: str
    concurrencies: tuple[int, ...]
    max_requests: int  # per level and server
    max_seconds: float  # per level and server, split over ``rounds``
    min_tokens: int  # request lengths are log-uniform in [min_tokens, max_tokens]
    max_tokens: int
    n_bodies: int
    n_max: int
    with_fp32_variant: bool
    with_unbatched_control: bool  # also Longhaul with LONGHAUL_MAX_BATCH_SIZE=1
    with_two_models: bool = True  # the encoder + a decoder in one process, loaded at once
    generate_clients: int = 2  # closed-loop generate clients beside each encode level
    generate_tokens: int = 32  # max_new_tokens per generate request (greedy)
    # Each level is measured in this many rounds, servers taking turns within every round, so
    # drifting background load hits all of them alike (one 15 s turn each let a load change
    # between turns move a ratio by 10% or more).
    rounds: int = 3


def plan(quick: bool) -> ServingPlan:
    if quick:
        return ServingPlan(
            arch="linformer",
            concurrencies=(1, 4, 16, 64),
            max_requests=64,
            max_seconds=4.0,
            min_tokens=32,
            max_tokens=256,
            n_bodies=64,
            n_max=1024,
            with_fp32_variant=False,
            with_unbatched_control=True,
        )
    return ServingPlan(
        arch="linformer",
        concurrencies=(1, 4, 16, 64),
        max_requests=2000,
        max_seconds=15.0,
        min_tokens=32,
        max_tokens=512,
        n_bodies=512,
        n_max=2048,
        with_fp32_variant=True,
        with_unbatched_control=True,
    )


# ----------------------------------------------------------------------------- model + store


def make_tokenizer(vocab_size: int) -> Any:
    from exporters.corpus import read_texts, split_corpus
    from exporters.tokenizer import train_tokenizer

    split = split_corpus()
    # 400 kB of text learns the merges in a few seconds; the weights are random anyway.
    return train_tokenizer(read_texts(split.root, split.train, 400_000), vocab_size)


def prepare_checkpoint(workdir: Path, arch: str, n_max: int) -> Path:
    from exporters.checkpoint import save_checkpoint
    from exporters.tokenizer import for_task

    ckpt = workdir / f"{arch}-checkpoint"
    if (ckpt / "model.safetensors").is_file():
        return ckpt
    base = make_tokenizer(REALISTIC.vocab_size)
    config = arch_config(arch, REALISTIC, n_max=n_max)
    config["vocab_size"] = base.get_vocab_size()
    model = build(arch, config)
    save_checkpoint(ckpt, model, for_task(base, "encode"), trained_context=512)
    return ckpt


def publish(ckpt: Path, store: Path, name: str, fmt: str, precision: str) -> dict[str, Any]:
    from exporters.export import ExportRequest, export

    # ORT's int8 quantizer logs a "consider pre-processing" hint on the root logger every call.
    logging.disable(logging.WARNING)
    try:
        result = export(
            ExportRequest(
                checkpoint=ckpt,
                store=store,
                name=name,
                format=fmt,
                precision=precision,
                progress=False,
            )
        )
    finally:
        logging.disable(logging.NOTSET)
    return {
        "name": name,
        "format": fmt,
        "precision": precision,
        "version": result.published.version,
        "export_s": round(result.seconds, 1),
        "parity": result.report.summary(),
    }


def reuse(ckpt: Path, store: Path, name: str, fmt: str, precision: str) -> dict[str, Any] | None:
    """The published newest version of ``name`` when it is this checkpoint in this format and
    precision (an earlier run's export, reused to save minutes); None otherwise."""
    from exporters.checkpoint import directory_sha256
    from model_store import ModelRepository

    if not store.is_dir():  # a fresh clone: nothing exported yet
        return None
    repo = ModelRepository(store)
    if name not in repo.list_models():
        return None
    manifest = repo.load_manifest(name)
    same = (
        manifest.provenance.source_checkpoint_sha256 == directory_sha256(ckpt)
        and (manifest.format, manifest.precision) == (fmt, precision)
        and manifest.parity.passed
    )
    if not same:
        return None
    parity = manifest.parity
    detail = (
        f"max|diff| {parity.max_abs_diff:.2e} (tolerance {parity.tolerance:g})"
        if parity.tolerance is not None
        else f"min cosine {parity.min_cosine:.5f}"
    )
    return {
        "name": name, "format": fmt, "precision": precision, "version": manifest.version,
        "export_s": 0.0,
        "parity": f"parity PASS: {detail} at lengths {parity.lengths} (reused version)",
    }  # fmt: skip


def request_bodies(ckpt: Path, p: ServingPlan) -> list[tuple[str, int]]:
    """Texts cut from held-out stdlib sources at log-uniform token lengths, with their lengths
    as the encoder tokenizer counts them (``<cls>`` included)."""
    from tokenizers import Tokenizer

    from exporters.corpus import read_texts, split_corpus

    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    split = split_corpus()
    lines = [
        line
        for text in read_texts(split.root, split.held_out, 2_000_000)
        for line in text.splitlines(keepends=True)
    ]
    rng = random.Random(0)
    bodies: list[tuple[str, int]] = []
    start = 0
    while len(bodies) < p.n_bodies:
        target = round(p.min_tokens * (p.max_tokens / p.min_tokens) ** rng.random())
        text, tokens = "", 0
        while tokens < target:
            text += lines[start % len(lines)]
            start += 1
            tokens = len(tokenizer.encode(text).ids)
        if tokens <= p.n_max:
            bodies.append((text, tokens))
    return bodies


# ----------------------------------------------------------------------------- metrics


def scrape(base_url: str, model: str | None = None) -> dict[str, float]:
    """Longhaul's batch histograms of ``model`` (summed over models when None):
    {metric_sum/count: value}. With two models served, the decoder's steps are batches too,
    so the encoder's figures must be picked by label."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    wanted = (
        "longhaul_inference_duration_seconds",
        "longhaul_batch_padding_ratio",
        "longhaul_batch_size",
        "longhaul_queue_duration_seconds",
    )
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        for sample in family.samples:
            if model is not None and sample.labels.get("model") not in (None, model):
                continue
            if sample.name.endswith(("_sum", "_count")):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def _sum(after: dict[str, float], before: dict[str, float], metric: str) -> float:
    return after.get(f"{metric}_sum", 0.0) - before.get(f"{metric}_sum", 0.0)


def _mean(after: dict[str, float], before: dict[str, float], metric: str) -> float | None:
    count = after.get(f"{metric}_count", 0.0) - before.get(f"{metric}_count", 0.0)
    total = after.get(f"{metric}_sum", 0.0) - before.get(f"{metric}_sum", 0.0)
    return total / count if count else None


# ----------------------------------------------------------------------------- run


@dataclass
class Target:
    """One server process and the model it is asked for."""

    label: str
    model: str
    cmd: list[str]
    env: dict[str, str]
    ready_path: str
    longhaul: bool
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


#: Batching variants of one model: (label suffix, settings). The default comes first.
BATCHING_VARIANTS: tuple[tuple[str, dict[str, str]], ...] = (
    ("", {}),
    (", batching off", {"LONGHAUL_MAX_BATCH_SIZE": "1"}),
    (", old batching", {"LONGHAUL_BATCH_POLICY": "deadline"}),
)
OFF_SUFFIX = ", batching off"
OLD_SUFFIX = ", old batching"


def _targets(
    p: ServingPlan, store: Path, ckpt: Path, variants: list[tuple[str, str]]
) -> list[Target]:
    """A Longhaul process per variant, Longhaul's default model with batching off and with the
    earlier deadline batching (the controls that show what the batching policy does on this
    machine), and the naive server."""
    quiet = {"LONGHAUL_LOG_LEVEL": "info"}  # the start-up log records the calibration
    targets = [
        Target(
            label,
            name,
            ["-m", "service", "--store", str(store)],
            {**quiet, "LONGHAUL_MODELS": f'["{name}"]'},
            "/health/ready",
            True,
        )
        for label, name in variants
    ]
    if p.with_unbatched_control:
        label, name = variants[0]
        for suffix, env in BATCHING_VARIANTS[1:]:
            targets.append(
                Target(
                    f"{label}{suffix}",
                    name,
                    ["-m", "service", "--store", str(store)],
                    {**quiet, "LONGHAUL_MODELS": f'["{name}"]', **env},
                    "/health/ready",
                    True,
                )
            )
    targets.append(
        Target(
            "naive eager-fp32",
            "naive",
            ["-m", "benchmarks.naive_server", "--checkpoint", str(ckpt)],
            {},
            "/health",
            False,
        )
    )
    for target in targets:
        target.port = free_port()
        target.cmd = [sys.executable, *target.cmd, "--port", str(target.port)]
    return targets


def _running(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def _start_one_by_one(
    stack: contextlib.ExitStack, targets: list[Target], workdir: Path, tag: str
) -> list[subprocess.Popen[bytes]]:
    """Start each server and wait until it is ready before starting the next: a warm-up
    calibration timed while another server loads would measure the other server too."""
    procs = []
    for i, target in enumerate(targets):
        proc = stack.enter_context(
            server_process(target.cmd, target.env, workdir / f"server-{tag}{i}.log")
        )
        wait_ready(target.base_url + target.ready_path, 600, functools.partial(_running, proc))
        procs.append(proc)
    return procs


def _calibration(target: Target) -> dict[str, Any] | None:
    """What the server reports about its batch time model and threads (/v1/models)."""
    if not target.longhaul:
        return None
    cards = httpx.get(f"{target.base_url}/v1/models", timeout=10).json()["data"]
    return {c["id"]: {"threads": c.get("threads"), "batching": c.get("batching")} for c in cards}


@dataclass
class _Level:
    """One server's measurements at one concurrency, accumulated over the rounds."""

    load: LoadResult | None = None
    side: LoadResult | None = None
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    before: dict[str, Any] | None = None  # /metrics before the first round

    def add(self, load: LoadResult, side: LoadResult | None) -> None:
        self.load = load if self.load is None else self.load.merge(load)
        if side is not None:
            self.side = side if self.side is None else self.side.merge(side)


def _encode_round(
    target: Target,
    proc: subprocess.Popen[bytes],
    bodies: list[tuple[str, int]],
    c: int,
    p: ServingPlan,
    level: _Level,
    side_load: Callable[[float], Coroutine[Any, Any, LoadResult]] | None = None,
) -> None:
    """One round of one level: c closed-loop encode clients (and, with ``side_load``, generate
    clients at the same time) for max_seconds / rounds, added to ``level``."""
    payload = [({"model": target.model, "inputs": t}, n) for t, n in bodies]
    if level.before is None:
        level.before = scrape(target.base_url, target.model) if target.longhaul else {}
    seconds = p.max_seconds / p.rounds
    requests = max(1, p.max_requests // p.rounds)
    # CPU seconds of the server and of this (load generator) process: on 2 shared cores the
    # client's own cost is part of the picture.
    server_cpu, client_cpu = cpu_seconds(proc.pid), cpu_seconds(os.getpid())

    async def both() -> tuple[LoadResult, LoadResult | None]:
        encode = run_load(f"{target.base_url}/v1/encode", payload, c, requests, seconds)
        if side_load is None:
            return await encode, None
        done = await asyncio.gather(encode, side_load(seconds))
        return done[0], done[1]

    load, side = asyncio.run(both())
    level.add(load, side)
    level.server_cpu_s += cpu_seconds(proc.pid) - server_cpu
    level.client_cpu_s += cpu_seconds(os.getpid()) - client_cpu


def _level_row(target: Target, level: _Level) -> dict[str, Any]:
    """Throughput, latency, CPU seconds and Longhaul's batch metrics of one server's level."""
    assert level.load is not None
    row = level.load.summary()
    row["server_cpu_s"] = round(level.server_cpu_s, 2)
    row["client_cpu_s"] = round(level.client_cpu_s, 2)
    if target.longhaul:
        after, before = scrape(target.base_url, target.model), level.before or {}
        row["padding_ratio"] = _mean(after, before, "longhaul_batch_padding_ratio")
        row["mean_batch_size"] = _mean(after, before, "longhaul_batch_size")
        row["mean_queue_s"] = _mean(after, before, "longhaul_queue_duration_seconds")
        row["inference_s"] = _sum(after, before, "longhaul_inference_duration_seconds")
    if level.side is not None:
        summary = level.side.summary()
        row["generate"] = {
            k: summary[k] for k in ("ok", "requests_per_s", "tokens_per_s", "p50_s", "p99_s")
        } | {"errors": summary["errors"]}
    return row


def _measure_levels(
    targets: list[Target],
    procs: list[subprocess.Popen[bytes]],
    bodies: list[tuple[str, int]],
    p: ServingPlan,
    results: dict[str, list[dict[str, Any]]],
    log: Callable[[str], None],
    side_load: Callable[[Target], Callable[[float], Coroutine[Any, Any, LoadResult]]] | None = None,
) -> None:
    """Every level in ``p.rounds`` rounds; within a round each server takes its turn."""
    for c in p.concurrencies:
        levels = [_Level() for _ in targets]
        for _ in range(p.rounds):
            for target, proc, level in zip(targets, procs, levels, strict=True):
                side = side_load(target) if side_load else None
                _encode_round(target, proc, bodies, c, p, level, side)
        for target, level in zip(targets, levels, strict=True):
            row = _level_row(target, level)
            row["rounds"] = p.rounds
            results[target.label].append(row)
            _log_row(log, c, target.label, row)


def _log_row(log: Callable[[str], None], c: int, label: str, row: dict[str, Any]) -> None:
    gen = row.get("generate")
    log(
        f"  c={c:<3} {label:<44}{row['requests_per_s']:7.1f} req/s  "
        f"p50 {row['p50_s'] * 1e3:6.0f} ms  p99 {row['p99_s'] * 1e3:6.0f} ms"
        + (
            f"  padding {row['padding_ratio']:.2f} batch {row['mean_batch_size']:.1f}"
            if row.get("padding_ratio") is not None
            else ""
        )
        + (f"  generate {gen['tokens_per_s']:.0f} tok/s" if gen else "")
        + (f"  errors {row['errors']}" if row["errors"] else "")
    )


def _two_model_targets(p: ServingPlan, store: Path, encoder: str, decoder: str) -> list[Target]:
    cores = str(len(os.sched_getaffinity(0)))
    variants = [
        *BATCHING_VARIANTS,
        (", threads unshared", {"LONGHAUL_INTRA_OP_THREADS": cores}),
    ]
    targets = []
    for suffix, env in variants:
        target = Target(
            f"longhaul 2 models{suffix}",
            encoder,
            [sys.executable, "-m", "service", "--store", str(store)],
            {"LONGHAUL_LOG_LEVEL": "info", "LONGHAUL_MODELS": f'["{encoder}", "{decoder}"]', **env},
            "/health/ready",
            True,
            port=free_port(),
        )
        target.cmd = [*target.cmd, "--port", str(target.port)]
        targets.append(target)
    return targets


def publish_decoder(workdir: Path, store: Path, fmt: str, precision: str) -> dict[str, Any]:
    """Section 4's random BLOOM, imported and exported into the serving store as "decoder"."""
    from benchmarks.generation_vs_hf import make_bloom

    _, ckpt = make_bloom(workdir, trained_context=256)
    kept = reuse(ckpt, store, "decoder", fmt, precision)
    if kept is not None:
        return kept
    if (store / "decoder").is_dir():
        shutil.rmtree(store / "decoder")
    return publish(ckpt, store, "decoder", fmt, precision)


def run(
    p: ServingPlan,
    workdir: Path,
    choice: tuple[str, str] | None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = prepare_checkpoint(workdir, p.arch, p.n_max)
    store = workdir / "store"
    fmt, precision = choice or DEFAULT_SERVING
    exports = [(f"longhaul {fmt}-{precision}", "encoder-default", fmt, precision)]
    if p.with_fp32_variant and (fmt, precision) != ("onnx", "fp32"):
        exports.append(("longhaul onnx-fp32", "encoder-onnx-fp32", "onnx", "fp32"))
    published = []
    for _, name, f, prec in exports:
        kept = reuse(ckpt, store, name, f, prec)
        if kept is None and (store / name).is_dir():
            shutil.rmtree(store / name)  # a stale scratch version from an earlier run
        published.append(kept or publish(ckpt, store, name, f, prec))
        log(f"  published {name} ({f} {prec}) in {published[-1]['export_s']} s")

    bodies = request_bodies(ckpt, p)
    targets = _targets(p, store, ckpt, [(label, name) for label, name, _, _ in exports])
    results: dict[str, list[dict[str, Any]]] = {t.label: [] for t in targets}
    calibration: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        procs = _start_one_by_one(stack, targets, workdir, "")
        for target in targets:  # warm-up, not measured: first requests allocate and JIT
            calibration[target.label] = _calibration(target)
            warm = [({"model": target.model, "inputs": t}, n) for t, n in bodies[:16]]
            asyncio.run(run_load(f"{target.base_url}/v1/encode", warm, 4, 16, 60))
        _measure_levels(targets, procs, bodies, p, results, log)

    write_json(workdir / "single-model.json", {"servers": results, "calibration": calibration})
    two_models: dict[str, list[dict[str, Any]]] = {}
    from benchmarks.generation_vs_hf import available

    missing = available() if p.with_two_models else None
    if missing:
        log(f"  two models at once: skipped ({missing})")
    if p.with_two_models and not missing:
        from benchmarks.generation_vs_hf import prompts

        published.append(publish_decoder(workdir, store, fmt, precision))
        log(f"  published decoder ({fmt} {precision}) in {published[-1]['export_s']} s")

        texts = prompts(workdir / "hf-bloom" / "tokenizer.json", 16, 64)
        generate = [
            ({"model": "decoder", "prompt": t, "max_new_tokens": p.generate_tokens,
              "temperature": 0}, p.generate_tokens)
            for t in texts
        ]  # fmt: skip
        pair = _two_model_targets(p, store, "encoder-default", "decoder")
        two_models = {t.label: [] for t in pair}
        with contextlib.ExitStack() as stack:
            procs = _start_one_by_one(stack, pair, workdir, "pair-")
            for target in pair:
                calibration[target.label] = _calibration(target)
                warm = [({"model": target.model, "inputs": t}, n) for t, n in bodies[:16]]
                asyncio.run(run_load(f"{target.base_url}/v1/encode", warm, 4, 16, 60))

            def side(target: Target) -> Callable[[float], Coroutine[Any, Any, LoadResult]]:
                url = f"{target.base_url}/v1/generate"

                def load(seconds: float) -> Coroutine[Any, Any, LoadResult]:
                    # Bounded by time like the encode side (request count is not the limit).
                    return run_load(url, generate, p.generate_clients, 10**6, seconds)

                return load

            _measure_levels(pair, procs, bodies, p, two_models, log, side)
    from service.settings import Settings

    defaults = Settings()
    return {
        "plan": asdict(p),
        "size": asdict(REALISTIC),
        "published": published,
        "request_tokens": [n for _, n in bodies],
        "longhaul_settings": {
            "batch_policy": defaults.batch_policy,
            "batch_cost_budget": defaults.batch_cost_budget,
            "max_batch_size": defaults.max_batch_size,
            "max_wait_ms": defaults.max_wait_ms,
            "calibration_seconds": defaults.calibration_seconds,
            "thread_budget": defaults.thread_budget or len(os.sched_getaffinity(0)),
            "max_queue_requests": defaults.max_queue_requests,
        },
        "servers": results,
        "two_models": two_models,
        "calibration": calibration,
        "load_generator": "closed loop, httpx AsyncClient in the benchmark process (same cores)",
    }
