"""Section 6 — the decode step: its roofline, the measured step (graph and engine), and where the
time goes; then what that buys streams.

    python -m benchmarks.decode_step [--quick] [--out PATH]
    python -m benchmarks --merge --sections step          # into the results file

On the BLOOM-config model of section 4 (random ``BloomForCausalLM`` d 512, 6 layers, 8 heads,
imported with ``python -m exporters import hf-bloom``), exported ONNX int8 and fp32:

1. machine peaks, measured in this run with the runtime that serves: read bandwidth (a reduction
   over 256 MB, torch, every intra-op thread) and GEMM throughput of each compute dtype (ONNX
   Runtime ``MatMul`` fp32 and ``DynamicQuantizeMatMul`` int8, 1024³);
2. the floor of one decode step of b rows over a past of P tokens: bytes it must read (weights +
   b × the rows' KV cache) over the bandwidth, and matmul FLOPs (weight products in the graph's
   dtype, attention over the past in fp32) over the GEMM peak; the floor is the larger;
3. the graph alone: ``backend.run`` on exactly the inputs a decode step passes, rows interleaved,
   median; and ONNX Runtime's profiler at 16 rows, time by operator type;
4. the engine around it: an in-process :class:`GenerationEngine` with 16 streams of 128-token
   prompts, 128 greedy tokens each; every decode step's wall time against its graph time, and
   cProfile of the worker thread for the rest; 16 streams against 1 stream (requests in turn);
   ``transformers`` ``generate()`` bf16, one static batch of 16, on the same weights;
5. the ALiBi demo model (the engine section's): 1 vs 16 streams, and ITL at 4096 vs 256 context.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import itertools
import json
import logging
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, machine_info, median, percentile, write_json
from benchmarks.models import REALISTIC
from model_store import ModelRepository
from service.backends.base import Backend
from service.engine.generation import GenerationEngine
from service.engine.kv_cache import DecodeBatch
from service.engine.models import LoadedModel, load_model
from service.engine.sampling import SamplingParams
from service.metrics import Metrics
from service.settings import Settings

FIRST_REGULAR_ID = 4


@dataclass(frozen=True)
class StepPlan:
    rows: tuple[int, ...] = (1, 4, 16)
    past: int = 200  # past tokens of every row for the graph-alone step
    graph_repeats: int = 40
    profile_steps: int = 20
    prompt: int = 128
    new: int = 128
    single_requests: int = 2  # 1 stream: these many requests one after another
    precisions: tuple[str, ...] = ("int8", "fp32")
    hf_dtype: str = "bfloat16"
    demo_contexts: tuple[int, ...] = (256, 4096)
    demo_new: int = 48


QUICK = StepPlan(graph_repeats=8, profile_steps=5, new=32, single_requests=1, demo_new=16,
                 demo_contexts=(256, 1024), precisions=("int8",))  # fmt: skip


# ----------------------------------------------------------------------------- machine peaks


def read_bandwidth(threads: int) -> float:
    """Bytes/s a multi-threaded reduction reads from a 256 MB array (far beyond any cache)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(64 * 1024 * 1024, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(7):
        started = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - started)
    return x.numel() * 4 / min(times)


def gemm_peaks(threads: int, n: int = 1024) -> dict[str, float]:
    """FLOP/s of ONNX Runtime's fp32 MatMul and int8 DynamicQuantizeMatMul at n³ (best of 5)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    graphs = {
        "fp32": helper.make_graph(
            [helper.make_node("MatMul", ["A", "B"], ["Y"])], "mm",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])],
            [numpy_helper.from_array(a, "B")],
        ),
        "int8": helper.make_graph(
            [helper.make_node("DynamicQuantizeMatMul", ["A", "B", "s", "z"], ["Y"],
                              domain="com.microsoft")],
            "qmm",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])],
            [
                numpy_helper.from_array(rng.integers(-127, 127, (n, n), dtype=np.int8), "B"),
                numpy_helper.from_array(np.array([0.01], np.float32), "s"),
                numpy_helper.from_array(np.array([0], np.int8), "z"),
            ],
        ),
    }  # fmt: skip
    peaks = {}
    for dtype, graph in graphs.items():
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
        session.run(None, {"A": a})
        best = min(_timed(functools.partial(session.run, None, {"A": a})) for _ in range(5))
        peaks[dtype] = 2 * n**3 / best
    return peaks


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# ----------------------------------------------------------------------------- roofline


def step_floor(
    config: dict[str, Any], weight_bytes: int, rows: int, past: int, peaks: dict[str, float],
    bandwidth: float, precision: str,
) -> dict[str, float]:  # fmt: skip
    """Bytes and FLOPs one decode step of ``rows`` rows over ``past`` tokens cannot avoid."""
    d, layers = int(config["d_model"]), int(config["n_layers"])
    d_ff = int(config.get("d_ff", 4 * d))
    vocab = int(config["vocab_size"])
    kv_bytes = rows * past * layers * 2 * d * 4  # float32 keys and values read once
    weight_flops = rows * 2 * (layers * (4 * d * d + 2 * d * d_ff) + d * vocab)
    attention_flops = rows * layers * 2 * 2 * past * d  # q·K over the past, then weights·V
    weight_peak = peaks["int8"] if precision == "int8" else peaks["fp32"]
    memory_s = (weight_bytes + kv_bytes) / bandwidth
    compute_s = weight_flops / weight_peak + attention_flops / peaks["fp32"]
    return {
        "weight_bytes": weight_bytes,
        "kv_bytes": kv_bytes,
        "weight_flops": weight_flops,
        "attention_flops": attention_flops,
        "memory_s": memory_s,
        "compute_s": compute_s,
        "floor_s": max(memory_s, compute_s),
    }


def weight_bytes(model_path: Path) -> int:
    """Bytes of the graph's initializers (model.onnx + model.onnx.data)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model_path), load_external_data=True).graph
    return int(sum(numpy_helper.to_array(t).nbytes for t in graph.initializer))


def decode_inputs(model: LoadedModel, rows: int, past: int) -> dict[str, np.ndarray]:
    """Exactly what a decode step passes: a DecodeBatch of ``rows`` rows holding ``past`` tokens."""
    from service.engine.kv_cache import CacheShape

    layout = model.manifest.signature.cache
    assert layout is not None
    shape = CacheShape.from_layout(layout)
    batch = DecodeBatch(shape)
    rng = np.random.default_rng(0)
    for r in range(rows):
        cache = rng.standard_normal(
            (shape.n_layers, 2, 1, shape.n_heads, past, shape.head_dim), dtype=np.float32
        )
        batch.add(r, cache, past + 64)
    return batch.inputs([FIRST_REGULAR_ID] * rows, list(layout.inputs))


def graph_steps(model: LoadedModel, plan: StepPlan) -> dict[int, float]:
    """Median seconds of ``backend.run`` per decode step, row counts interleaved."""
    feeds = {b: decode_inputs(model, b, plan.past) for b in plan.rows}
    samples: dict[int, list[float]] = {b: [] for b in plan.rows}
    for b in plan.rows:
        model.backend.run(feeds[b])
    for _ in range(plan.graph_repeats):
        for b in plan.rows:
            samples[b].append(_timed(functools.partial(model.backend.run, feeds[b])))
    return {b: median(s) for b, s in samples.items()}


def ort_profile(
    model_path: Path, feed: dict[str, np.ndarray], threads: int, steps: int
) -> dict[str, Any]:
    """ONNX Runtime's profiler over ``steps`` runs: microseconds per step by operator type."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(model_path), options, ["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        inputs = {n: feed[n] for n in names}
        session.run(None, inputs)
        for _ in range(steps):
            session.run(None, inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    counts: dict[str, int] = {}
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        op = event.get("args", {}).get("op_name", "?")
        by_op[op] = by_op.get(op, 0.0) + float(event["dur"])
        counts[op] = counts.get(op, 0) + 1
    n = steps + 1
    total = sum(float(e["dur"]) for e in runs) / max(len(runs), 1)
    ops = sorted(by_op, key=lambda op: -by_op[op])
    return {
        "model_run_us": total,
        "ops": [{"op": op, "us_per_step": by_op[op] / n, "nodes": counts[op] // n} for op in ops],
    }


# ----------------------------------------------------------------------------- engine


class Clock(Backend):
    """Wraps the backend: records (input rows, input length, seconds) of every call."""

    provider = "clock"

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.calls: list[tuple[int, int, float, float]] = []  # rows, tokens, start, seconds

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        out = self.inner.run(inputs)
        b, t = inputs["input_ids"].shape
        self.calls.append((b, t, started, time.perf_counter() - started))
        return out


def prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(i) for i in rng.integers(FIRST_REGULAR_ID, vocab, length)] for _ in range(n)]


async def _streams(
    model: LoadedModel, settings: Settings, batch: list[list[int]], new: int, profile: bool
) -> dict[str, Any]:
    """All of ``batch`` at once through one engine: tok/s, ITL, and the decode steps."""
    clock = Clock(model.backend)
    timed = LoadedModel(model.name, model.version, model.manifest, model.tokenizer, clock)
    engine = GenerationEngine(timed, settings, Metrics())
    await engine.start()
    await engine.warmup()
    clock.calls.clear()
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        step = engine.scheduler._step

        def profiled_step() -> None:
            profiler.enable()
            try:
                step()
            finally:
                profiler.disable()

        engine.scheduler._step = profiled_step  # type: ignore[method-assign]
    params = SamplingParams(max_new_tokens=new, temperature=0)
    started = time.perf_counter()
    streams = [await engine.submit(p, params) for p in batch]
    arrivals: list[list[float]] = [[] for _ in streams]

    async def follow(i: int) -> int:
        n = 0
        async for chunk in streams[i]:
            arrivals[i].append(time.perf_counter())
            n += len(chunk.token_ids)
        return n

    tokens = sum(await asyncio.gather(*(follow(i) for i in range(len(streams)))))
    wall = time.perf_counter() - started
    await engine.stop()
    itl = [b - a for times in arrivals for a, b in itertools.pairwise(times)]
    full = [c for c in clock.calls if c[1] == 1 and c[0] == len(batch)]  # decode steps, all rows
    step_walls = [b[2] - a[2] for a, b in itertools.pairwise(full)]
    graph = [c[3] for c in full[1:]]
    out: dict[str, Any] = {
        "streams": len(batch),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
        "full_decode_steps": len(full),
        "step_p50_s": percentile(step_walls, 50),
        "graph_p50_s": percentile(graph, 50),
    }
    if profiler is not None:
        out["engine_profile"] = _profile_rows(profiler, len(full))
    return out


def _profile_rows(profiler: cProfile.Profile, steps: int, top: int = 14) -> list[dict[str, Any]]:
    """The worker's own functions by cumulative time per decode step (the graph call excluded
    from none: ``Clock.run`` is the graph)."""
    stats = pstats.Stats(profiler)
    rows: list[dict[str, Any]] = []
    table: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    per_step = 1e3 / max(steps, 1)
    for (file, _, name), (_, calls, tottime, cumtime, _) in table.items():
        if "service/engine" not in file and "benchmarks/decode_step" not in file:
            continue
        rows.append({"function": f"{Path(file).name}:{name}", "calls": calls,
                     "cum_ms_per_step": cumtime * per_step,
                     "own_ms_per_step": tottime * per_step})  # fmt: skip
    rows.sort(key=lambda r: -r["cum_ms_per_step"])
    return rows[:top]


def engine_levels(
    model: LoadedModel, threads: int, plan: StepPlan, spinning: bool = True
) -> dict[str, Any]:
    vocab = int(model.manifest.config["vocab_size"])
    settings = Settings(intra_op_threads=threads, max_num_seqs=16, drain_timeout_seconds=60,
                        intra_op_spinning=spinning)  # fmt: skip
    batch = prompts(vocab, 16, plan.prompt)
    one: list[dict[str, Any]] = []
    for i in range(plan.single_requests):
        one.append(asyncio.run(_streams(model, settings, batch[i : i + 1], plan.new, False)))
    single = {
        "streams": 1,
        "tokens_per_s": sum(r["tokens"] for r in one) / sum(r["wall_s"] for r in one),
        "itl_p50_s": median([r["itl_p50_s"] for r in one]),
        "step_p50_s": median([r["step_p50_s"] for r in one]),
        "graph_p50_s": median([r["graph_p50_s"] for r in one]),
    }
    sixteen = asyncio.run(_streams(model, settings, batch, plan.new, True))
    return {"1": single, "16": sixteen}


def hf_static_batch(src: Path, vocab: int, plan: StepPlan, threads: int) -> dict[str, Any]:
    """``generate()`` on one left-padded batch of 16 (the same token ids as the engine's)."""
    import torch
    from transformers import BloomForCausalLM

    torch.set_num_threads(threads)
    model = BloomForCausalLM.from_pretrained(src, dtype=getattr(torch, plan.hf_dtype)).eval()
    ids = torch.tensor(prompts(vocab, 16, plan.prompt), dtype=torch.long)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model.generate(input_ids=ids[:1, :8], attention_mask=mask[:1, :8], max_new_tokens=4,
                       do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
        started = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=plan.new,
                             min_new_tokens=plan.new, do_sample=False, pad_token_id=0,
                             eos_token_id=None)  # fmt: skip
        wall = time.perf_counter() - started
    tokens = int((out.shape[1] - ids.shape[1]) * ids.shape[0])
    return {"dtype": plan.hf_dtype, "streams": 16, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall}  # fmt: skip


# ----------------------------------------------------------------------------- demo model


def demo_model(workdir: Path, threads: int, log: Callable[[str], None]) -> LoadedModel:
    """The ALiBi demo model of the engine section (benchmarks/generation.py, ``demo_store``:
    ``make models``' checkpoint, else trained once for every section), its context opened to
    16K for the longest ITL measurement."""
    from benchmarks.generation import demo_store

    store, _, _ = demo_store(workdir, log)
    model = load_model(ModelRepository(store), "alibi-demo", None,
                       Settings(store=store, intra_op_threads=threads))  # fmt: skip
    model.manifest = model.manifest.model_copy(update={"max_context": 16384})
    return model


def demo_levels(model: LoadedModel, threads: int, plan: StepPlan) -> dict[str, Any]:
    vocab = int(model.manifest.config["vocab_size"])
    settings = Settings(intra_op_threads=threads, max_num_seqs=16, drain_timeout_seconds=60)
    batch = prompts(vocab, 16, plan.prompt)
    single = asyncio.run(_streams(model, settings, batch[:1], plan.new, False))
    sixteen = asyncio.run(_streams(model, settings, batch, plan.new, False))
    contexts = {}
    for ctx in plan.demo_contexts:
        row = asyncio.run(_streams(model, settings, prompts(vocab, 1, ctx), plan.demo_new, False))
        contexts[str(ctx)] = {
            k: row[k] for k in ("itl_p50_s", "itl_p99_s", "step_p50_s", "graph_p50_s")
        }
    return {"1": single, "16": sixteen, "contexts": contexts}


# ----------------------------------------------------------------------------- section


def section(
    quick: bool, threads: int, workdir: Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    from benchmarks.generation_vs_hf import make_bloom
    from exporters.export import ExportRequest, export

    plan = QUICK if quick else StepPlan()
    workdir.mkdir(parents=True, exist_ok=True)
    src, ckpt = make_bloom(workdir, 256)
    bandwidth = read_bandwidth(threads)
    peaks = gemm_peaks(threads)
    log(f"  read bandwidth {bandwidth / 1e9:.1f} GB/s; GEMM fp32 {peaks['fp32'] / 1e9:.0f}, "
        f"int8 {peaks['int8'] / 1e9:.0f} GFLOP/s")  # fmt: skip
    results: dict[str, Any] = {
        "plan": asdict(plan),
        "size": asdict(REALISTIC),
        "bandwidth_bytes_per_s": bandwidth,
        "gemm_flops_per_s": peaks,
        "bloom": {},
    }
    store = workdir / "store"
    vocab = 0
    for precision in plan.precisions:
        name = f"bloom-{precision}"
        if not (store / name).is_dir():  # exported once per work dir (checksums verify reuse)
            logging.disable(logging.WARNING)
            try:
                export(ExportRequest(checkpoint=ckpt, store=store, name=name, format="onnx",
                                     precision=precision, progress=False))  # fmt: skip
            finally:
                logging.disable(logging.NOTSET)
        model = load_model(ModelRepository(store), name, None,
                           Settings(store=store, intra_op_threads=threads))  # fmt: skip
        vocab = int(model.manifest.config["vocab_size"])
        model_path = ModelRepository(store).resolve(name, None).model_path
        wbytes = weight_bytes(model_path)
        graph = graph_steps(model, plan)
        floors = {
            str(b): step_floor(
                model.manifest.config, wbytes, b, plan.past, peaks, bandwidth, precision
            )
            for b in plan.rows
        }
        profile = ort_profile(model_path, decode_inputs(model, max(plan.rows), plan.past),
                              threads, plan.profile_steps)  # fmt: skip
        levels = engine_levels(model, threads, plan)
        model.close()
        if precision == plan.precisions[0]:
            # The same engine with ONNX Runtime's idle threads sleeping instead of spinning
            # (LONGHAUL_INTRA_OP_SPINNING=false), back to back with the default.
            quiet = load_model(ModelRepository(store), name, None, Settings(
                store=store, intra_op_threads=threads, intra_op_spinning=False))  # fmt: skip
            levels["no_spinning"] = engine_levels(quiet, threads, plan, spinning=False)
            quiet.close()
        results["bloom"][precision] = {
            "weight_bytes": wbytes,
            "graph_step_s": {str(b): s for b, s in graph.items()},
            "floor": floors,
            "ort_profile_16": profile,
            "engine": levels,
        }
        s16 = levels["16"]
        graph_ms = ", ".join(f"{graph[b] * 1e3:.2f}" for b in plan.rows)
        floor_ms = ", ".join(f"{floors[str(b)]['floor_s'] * 1e3:.2f}" for b in plan.rows)
        log(f"  {name}: graph 1/4/16 rows {graph_ms} ms (floor {floor_ms}); engine 16 streams "
            f"{s16['tokens_per_s']:.0f} tok/s vs 1 stream {levels['1']['tokens_per_s']:.0f}; "
            f"16-row step {s16['step_p50_s'] * 1e3:.2f} ms, "
            f"graph {s16['graph_p50_s'] * 1e3:.2f} ms")  # fmt: skip
    results["hf"] = hf_static_batch(src, vocab, plan, threads)
    hf_rate = results["hf"]["tokens_per_s"]
    log(f"  transformers generate() {plan.hf_dtype} batch 16: {hf_rate:.0f} tok/s")
    demo = demo_model(workdir, threads, log)
    results["demo"] = demo_levels(demo, threads, plan)
    demo.close()
    d = results["demo"]
    itl = [round(v["itl_p50_s"] * 1e3, 2) for v in d["contexts"].values()]
    rates = (d["16"]["tokens_per_s"], d["1"]["tokens_per_s"])
    log(
        f"  alibi-demo: 16 streams {rates[0]:.0f} vs 1 {rates[1]:.0f} tok/s; "
        f"ITL by context {itl} ms"
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "scratch" / "decode_step.json")
    args = parser.parse_args(argv)
    results = {
        "machine": machine_info(),
        **section(args.quick, args.threads, RESULTS / "scratch" / "work" / "step"),
    }
    write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
