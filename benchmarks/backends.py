"""Section 2 — backends and precision at one realistic size (models.REALISTIC, batch × length).

Paths compared, per architecture, on the same randomly initialised weights and the same inputs:

* ``eager-fp32``   the model as a PyTorch user runs it (the baseline);
* ``eager-bf16``   the same module cast to bfloat16 (AMX on this CPU);
* ``torchscript-fp32`` / ``torchscript-bf16`` and ``onnx-fp32`` / ``onnx-int8``: the artifacts
  the exporter writes (``exporters.graphs.wrap`` + ``exporters.formats``), run through the
  service's own backends (``service.backends``), i.e. exactly what a served model executes.

Reported: throughput (tokens/s, median of repeated forward passes), accuracy against eager fp32
(cosine of each position's logits and of the mean-pooled hidden state, argmax agreement), and
MFU: matmul FLOPs (``torch.utils.flop_counter``, counted on the eager model) / time / the GEMM
peak of the compute dtype, measured in the same run with ``torch.matmul``.

The default CPU path is the fastest *servable* path (eager is not something the service runs)
whose minimum logits cosine is at least the exporter's reduced-precision floor
(``exporters.parity.MIN_COSINE``).
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import Timing, set_threads, time_calls
from benchmarks.models import REALISTIC, arch_config, build
from exporters.architectures import architecture_of, config_from_dict, get_architecture
from exporters.formats import check_dynamic_axes, export_onnx, export_torchscript, quantize_int8
from exporters.graphs import GraphSpec, graph_spec, wrap
from exporters.parity import MIN_COSINE

PATHS = (
    "eager-fp32",
    "eager-bf16",
    "torchscript-fp32",
    "torchscript-bf16",
    "onnx-fp32",
    "onnx-int8",
)
SERVABLE = {  # path -> (manifest format, manifest precision)
    "torchscript-fp32": ("torchscript", "fp32"),
    "torchscript-bf16": ("torchscript", "bf16"),
    "onnx-fp32": ("onnx", "fp32"),
    "onnx-int8": ("onnx", "int8"),
}
COMPUTE_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}
Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class BackendsPlan:
    archs: tuple[str, ...]
    batch: int
    length: int
    point_budget_s: float
    max_samples: int
    gemm_size: int
    threads: int


def plan(quick: bool, threads: int) -> BackendsPlan:
    if quick:
        return BackendsPlan(
            archs=("linformer",),
            batch=2,
            length=256,
            point_budget_s=1.0,
            max_samples=3,
            gemm_size=2048,
            threads=threads,
        )
    return BackendsPlan(
        archs=("linformer", "reformer", "shatter", "alibi"),
        batch=8,
        length=1024,
        point_budget_s=4.0,
        max_samples=7,
        gemm_size=4096,
        threads=threads,
    )


# ----------------------------------------------------------------------------- GEMM peak


def gemm_call(dtype: str, size: int) -> Callable[[], object]:
    """One square ``torch.matmul`` of ``dtype`` ("fp32" | "bf16"): 2·size³ FLOPs per call."""
    gen = torch.Generator().manual_seed(0)
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    a = torch.randn(size, size, generator=gen).to(torch_dtype)
    b = torch.randn(size, size, generator=gen).to(torch_dtype)
    return lambda: torch.matmul(a, b)


def gemm_peak(dtype: torch.dtype, size: int, budget_s: float) -> dict[str, Any]:
    """FLOP/s of one square ``torch.matmul`` (2·n³ FLOPs), the ceiling MFU is measured against."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    timing = time_calls(
        lambda: torch.matmul(a, b), warmup=2, min_samples=5, max_samples=30, budget_s=budget_s
    )
    flops = 2.0 * size**3
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "size": size,
        **timing.as_dict(),
        "median_flops": flops / timing.median,
        "best_flops": flops / min(timing.samples),
    }


# ----------------------------------------------------------------------------- inputs


def make_inputs(spec: GraphSpec, config: Any, batch: int, length: int) -> dict[str, np.ndarray]:
    """Every token real (no padding): the throughput of full batches. Decoders: a prefill."""
    gen = np.random.default_rng(0)
    ids = gen.integers(4, config.vocab_size, size=(batch, length), dtype=np.int64)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if spec.mode == "kv_cache":
        layers, _, _, heads, _, head_dim = spec.inputs[2][2]
        inputs["past_key_values"] = np.zeros(
            (int(layers), 2, batch, int(heads), 0, int(head_dim)), dtype=np.float32
        )
    return inputs


def export_example(spec: GraphSpec, config: Any) -> tuple[torch.Tensor, ...]:
    """As exporters.export does: every dynamic size >= 2 so the exporter keeps it symbolic."""
    if spec.mode != "kv_cache":
        length = get_architecture(architecture_of(config)).example_length(config)
        ids = torch.randint(4, config.vocab_size, (2, length))
        return ids, torch.ones_like(ids)
    ids = torch.randint(4, config.vocab_size, (2, 8))
    layers, _, _, heads, _, head_dim = spec.inputs[2][2]
    past = torch.zeros(int(layers), 2, 2, int(heads), 3, int(head_dim))
    return ids, torch.ones(2, 11, dtype=torch.long), past


def matmul_flops(module: torch.nn.Module, inputs: dict[str, np.ndarray]) -> int:
    """Matmul FLOPs of one forward (what MFU counts; softmax, norms and gathers are not)."""
    args = [torch.from_numpy(v) for v in inputs.values()]
    # no_grad, not inference_mode: the counter's module tracker needs autograd metadata.
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- paths


def eager_runner(module: torch.nn.Module, output_names: list[str]) -> Run:
    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(v) for v in inputs.values()]
        with torch.inference_mode():
            outputs = module(*args)
        return {n: o.float().numpy() for n, o in zip(output_names, outputs, strict=True)}

    return run


def build_paths(
    model: torch.nn.Module, spec: GraphSpec, config: Any, workdir: Path, log: Callable[[str], None]
) -> tuple[dict[str, Run], dict[str, float]]:
    """Every path's run function, and the seconds each artifact took to write."""
    from service.backends.onnx import OnnxBackend
    from service.backends.torchscript import TorchScriptBackend

    workdir.mkdir(parents=True, exist_ok=True)
    example = export_example(spec, config)
    bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()
    fp32_graph = wrap(model, spec, torch.float32)
    bf16_graph = wrap(bf16, spec, torch.bfloat16)
    runs: dict[str, Run] = {
        "eager-fp32": eager_runner(fp32_graph, spec.output_names),
        "eager-bf16": eager_runner(bf16_graph, spec.output_names),
    }
    seconds: dict[str, float] = {}
    for precision, graph in (("fp32", fp32_graph), ("bf16", bf16_graph)):
        path = workdir / f"model-{precision}.ts"
        started = time.perf_counter()
        export_torchscript(graph, example, path)
        seconds[f"torchscript-{precision}"] = time.perf_counter() - started
        backend = TorchScriptBackend(path, spec.input_names, spec.output_names)
        runs[f"torchscript-{precision}"] = backend.run
        log(f"    wrote {path.name} in {seconds[f'torchscript-{precision}']:.1f} s")
    onnx_path = workdir / "model-fp32.onnx"
    started = time.perf_counter()
    export_onnx(fp32_graph, spec, example, onnx_path)
    check_dynamic_axes(onnx_path, spec)
    seconds["onnx-fp32"] = time.perf_counter() - started
    log(f"    wrote {onnx_path.name} in {seconds['onnx-fp32']:.1f} s")
    int8_path = workdir / "model-int8.onnx"
    started = time.perf_counter()
    # ORT's quantizer logs a "consider pre-processing" hint on the root logger at every call.
    logging.disable(logging.WARNING)
    try:
        quantize_int8(onnx_path, int8_path)
    finally:
        logging.disable(logging.NOTSET)
    seconds["onnx-int8"] = time.perf_counter() - started
    log(f"    wrote {int8_path.name} in {seconds['onnx-int8']:.1f} s")
    for name, path in (("onnx-fp32", onnx_path), ("onnx-int8", int8_path)):
        runs[name] = OnnxBackend(path, ["CPUExecutionProvider"]).run
    return runs, seconds


def accuracy(
    reference: dict[str, np.ndarray], got: dict[str, np.ndarray], pooled: bool
) -> dict[str, float]:
    """Cosine of each position's logits (mean, min), argmax agreement, and for encoders the
    cosine of the mean-pooled hidden state (what /v1/encode returns)."""
    r = reference["logits"].reshape(-1, reference["logits"].shape[-1]).astype(np.float64)
    o = got["logits"].reshape(-1, got["logits"].shape[-1]).astype(np.float64)
    cos = (r * o).sum(-1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(o, axis=-1) + 1e-12)
    result = {
        "logits_cosine_mean": float(cos.mean()),
        "logits_cosine_min": float(cos.min()),
        "argmax_agreement": float((r.argmax(-1) == o.argmax(-1)).mean()),
        "max_abs_diff_logits": float(np.abs(r - o).max()),
    }
    if pooled:
        a = reference["hidden"].mean(axis=1).astype(np.float64)  # (b, d)
        b = got["hidden"].mean(axis=1).astype(np.float64)
        pc = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
        result["pooled_cosine_min"] = float(pc.min())
    return result


def time_interleaved(calls: dict[str, Callable[[], object]], p: BackendsPlan) -> dict[str, Timing]:
    """Round-robin timing: every round runs each path once, so a change in background load
    hits all paths alike and their ratios survive it (sequential blocks would not).

    Warm-ups first: 3 for TorchScript (its profiling executor optimises the graph only after
    its first runs), 1 for the others (allocation, kernel choice).
    """
    timings = {name: Timing() for name in calls}
    for name, call in calls.items():
        for _ in range(3 if name.startswith("torchscript") else 1):
            started = time.perf_counter()
            call()
            timings[name].warmup.append(time.perf_counter() - started)
    spent, rounds = 0.0, 0
    budget = p.point_budget_s * len(calls)
    while rounds < p.max_samples and (rounds < 3 or spent < budget):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            elapsed = time.perf_counter() - started
            timings[name].samples.append(elapsed)
            spent += elapsed
        rounds += 1
    return timings


def measure_arch(
    arch: str, p: BackendsPlan, workdir: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    config_dict = arch_config(arch, REALISTIC, n_max=max(4096, p.length))
    config = config_from_dict(arch, config_dict)
    model = build(arch, config_dict)
    spec = graph_spec(config.task, config)
    inputs = make_inputs(spec, config, p.batch, p.length)
    # FLOPs are linear in the batch (rows never interact), so count one row and scale.
    one_row = {k: v[:1] if k != "past_key_values" else v[:, :, :1] for k, v in inputs.items()}
    flops = matmul_flops(wrap(model, spec, torch.float32), one_row) * p.batch
    runs, export_seconds = build_paths(model, spec, config, workdir / arch, log)
    tokens = p.batch * p.length
    reference = runs["eager-fp32"](inputs)
    outputs = {name: runs[name](inputs) for name in PATHS}
    calls: dict[str, Callable[[], object]] = {
        name: functools.partial(runs[name], inputs) for name in PATHS
    }
    # The GEMM peak joins the same rounds, so MFU compares model and peak under the same
    # background load (a peak measured minutes earlier on a shared machine can be far off).
    gemms = {dtype: gemm_call(dtype, p.gemm_size) for dtype in ("fp32", "bf16")}
    calls.update({f"gemm-{dtype}": call for dtype, call in gemms.items()})
    timings = time_interleaved(calls, p)
    gemm_flops = 2.0 * p.gemm_size**3
    arch_peaks = {dtype: gemm_flops / timings[f"gemm-{dtype}"].median for dtype in gemms}
    log(
        "    GEMM peak in the same rounds: "
        + ", ".join(f"{d} {v / 1e9:,.0f} GFLOP/s" for d, v in arch_peaks.items())
    )
    results: dict[str, Any] = {}
    for name in PATHS:
        timing = timings[name]
        precision = name.rsplit("-", 1)[1]
        achieved = flops / timing.median
        peak = arch_peaks.get(precision)
        results[name] = {
            **timing.as_dict(),
            "tokens_per_s": tokens / timing.median,
            "achieved_flops": achieved,
            "mfu": achieved / peak if peak else None,
            "mfu_peak": f"{precision} torch.matmul" if peak else None,
            "export_s": export_seconds.get(name),
            **accuracy(reference, outputs[name], pooled="hidden" in outputs[name]),
        }
        r = results[name]
        log(
            f"    {name:<18}{r['tokens_per_s']:10.0f} tok/s  "
            f"cos min {r['logits_cosine_min']:.5f}  argmax {r['argmax_agreement']:.4f}"
            + (f"  MFU {r['mfu']:.1%}" if r["mfu"] is not None else "")
        )
    return {
        "config": config_dict,
        "graph_mode": spec.mode,
        "matmul_flops": flops,
        "gemm_peak_flops": arch_peaks,
        "gemm_samples_s": {d: timings[f"gemm-{d}"].as_dict() for d in gemms},
        "paths": results,
    }


def choose_default(per_arch: dict[str, Any]) -> dict[str, Any]:
    """Fastest accurate servable path: geometric-mean speed-up over eager fp32 across the
    architectures, among paths accurate (min logits cosine ≥ MIN_COSINE) on every one."""
    candidates = {}
    for path in SERVABLE:
        rows = [arch["paths"][path] for arch in per_arch.values()]
        if not all(r["logits_cosine_min"] >= MIN_COSINE for r in rows):
            continue
        speedups = [
            arch["paths"][path]["tokens_per_s"] / arch["paths"]["eager-fp32"]["tokens_per_s"]
            for arch in per_arch.values()
        ]
        candidates[path] = float(np.exp(np.mean(np.log(speedups))))
    if not candidates:
        return {"path": None, "reason": "no servable path met the accuracy floor"}
    best = max(candidates, key=lambda k: candidates[k])
    fmt, precision = SERVABLE[best]
    return {
        "path": best,
        "format": fmt,
        "precision": precision,
        "geomean_speedup_vs_eager_fp32": candidates,
        "accuracy_floor": f"min logits cosine >= {MIN_COSINE} (exporters.parity.MIN_COSINE)",
        "per_arch_fastest_accurate": {
            arch: _fastest_accurate(data["paths"]) for arch, data in per_arch.items()
        },
    }


def _fastest_accurate(paths: dict[str, Any]) -> str | None:
    """One architecture's fastest servable path among those accurate on it, or None."""
    accurate = (p for p in SERVABLE if paths[p]["logits_cosine_min"] >= MIN_COSINE)
    return max(accurate, key=lambda p: paths[p]["tokens_per_s"], default=None)


def run(p: BackendsPlan, workdir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    set_threads(p.threads)
    torch.manual_seed(0)
    peaks_raw = {
        "fp32": gemm_peak(torch.float32, p.gemm_size, p.point_budget_s),
        "bf16": gemm_peak(torch.bfloat16, p.gemm_size, p.point_budget_s),
    }
    for k, v in peaks_raw.items():
        log(
            f"  GEMM peak {k}: {v['median_flops'] / 1e9:.0f} GFLOP/s (median), "
            f"{v['best_flops'] / 1e9:.0f} best"
        )
    per_arch = {}
    for arch in p.archs:
        log(f"  {arch}:")
        per_arch[arch] = measure_arch(arch, p, workdir, log)
    return {
        "plan": asdict(p),
        "size": asdict(REALISTIC),
        "gemm_peak": peaks_raw,
        "int8_peak": "not measured: int8 MFU is not reported",
        "archs": per_arch,
        "choice": choose_default(per_arch),
    }
