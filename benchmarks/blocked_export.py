"""Which attention form the exported graphs should hold: blocked or unblocked, measured.

For ALiBi (kv-cache graph) and Shatter (encode graph) at one small size, this exports the model
twice with the exporter's own code (``exporters.graphs.wrap`` + ``exporters.formats``), once
unblocked (``attention_block=0``) and once blocked (the eager default), to ONNX and TorchScript,
then checks whether each graph still computes the eager model at lengths other than the
example's (a blocked form's Python loop may be unrolled or specialised by the exporter), and
measures time and peak RSS of one forward at 1K–16K in a fresh process per point:

* the eager model, blocked (the reference the exports are checked against);
* each exported graph that stayed correct, with the whole sequence in one call;
* for ALiBi, the unblocked graph called the way the service and the parity check call it:
  prefill in chunks of 512 tokens on the growing cache.

    python -m benchmarks.blocked_export [--lengths 1024,2048,...] [--out FILE.json]

Not part of ``make bench`` (it answers a design question once; docs/decisions.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TypedDict

from benchmarks.common import GIB, machine_info, peak_rss_bytes, run_worker, set_threads, write_json


class _Size(TypedDict):
    """The size both architectures are measured at."""

    vocab_size: int
    d_model: int
    n_layers: int
    d_ff: int


class _AlibiSize(_Size):
    n_heads: int
    trained_context: int


class _ShatterSize(_Size):
    n_parts: int


SIZE: _Size = {"vocab_size": 512, "d_model": 64, "n_layers": 2, "d_ff": 256}
ALIBI: _AlibiSize = {**SIZE, "n_heads": 4, "trained_context": 1024}
SHATTER: _ShatterSize = {**SIZE, "n_parts": 4}
CHUNK = 512
MEMORY_CAP = 6 * GIB


def _config(arch: str, block: int) -> Any:
    from exporters.architectures.alibi import AlibiConfig
    from exporters.architectures.shatter import ShatterConfig

    if arch == "alibi":
        return AlibiConfig(**ALIBI, attention_block=block)
    return ShatterConfig(**SHATTER, attention_block=block)


def _model(arch: str, block: int) -> Any:
    import torch

    from exporters.architectures import build_model

    torch.manual_seed(0)
    return build_model(_config(arch, block)).eval()


def _inputs(arch: str, n: int, past: int = 0) -> tuple[Any, ...]:
    import torch

    ids = torch.randint(4, SIZE["vocab_size"], (1, n), generator=torch.Generator().manual_seed(n))
    if arch != "alibi":
        return ids, torch.ones_like(ids)
    config = _config(arch, 0)
    empty = torch.zeros(1, config.n_heads, past, config.head_dim)
    return ids, torch.ones(1, past + n, dtype=torch.long), *([empty] * (2 * config.n_layers))


def export_graphs(work: Path) -> dict[str, Any]:
    """Export every (form, format); record which ones stay correct away from the example."""
    import torch

    from exporters.formats import check_dynamic_axes, export_onnx, export_torchscript
    from exporters.graphs import graph_spec, wrap
    from exporters.runtime import OnnxRunner, TorchScriptRunner

    results: dict[str, Any] = {}
    for arch in ("alibi", "shatter"):
        reference = wrap(
            _model(arch, 256), graph_spec(_config(arch, 0).task, _config(arch, 0)), torch.float32
        )
        for form, block in (("unblocked", 0), ("blocked", 256)):
            # The exporter's example is 8 tokens long; a blocked form needs one past the block
            # to contain its loop at all, so it is traced at 600 tokens (3 blocks).
            spec = graph_spec(_config(arch, block).task, _config(arch, block))
            module = wrap(_model(arch, block), spec, torch.float32)
            example = _inputs(arch, 8 if block == 0 else 600, 3 if arch == "alibi" else 0)
            for fmt in ("onnx", "torchscript"):
                key = f"{arch}-{form}-{fmt}"
                path = work / f"{key}.{'onnx' if fmt == 'onnx' else 'ts'}"
                entry: dict[str, Any] = {"path": str(path)}
                started = time.perf_counter()
                try:
                    if fmt == "onnx":
                        export_onnx(module, spec, example, path)
                        check_dynamic_axes(path, spec)
                        runner: Any = OnnxRunner(path, spec.output_names)
                    else:
                        export_torchscript(module, example, path)
                        runner = TorchScriptRunner(path, spec.input_names, spec.output_names)
                except Exception as exc:
                    entry.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                    results[key] = entry
                    continue
                entry["export_s"] = round(time.perf_counter() - started, 2)
                diffs: dict[int, float | str | None] = {}
                for n in (100, 700, 1300):  # below, between and beyond the example's blocks
                    inputs = _inputs(arch, n)
                    with torch.no_grad():
                        want = reference(*inputs)[0].numpy()
                    feed = dict(zip(spec.input_names, (t.numpy() for t in inputs), strict=True))
                    try:
                        got = runner.run(feed)[spec.output_names[0]]
                        diffs[n] = float(abs(got - want).max()) if got.shape == want.shape else None
                    except Exception as exc:
                        diffs[n] = f"{type(exc).__name__}: {str(exc)[:200]}"
                entry["max_abs_diff_by_length"] = diffs
                entry["ok"] = all(isinstance(d, float) and d < 1e-4 for d in diffs.values())
                results[key] = entry
    return results


# ----------------------------------------------------------------------------- worker


def measure_point(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    from exporters.graphs import graph_spec
    from exporters.runtime import OnnxRunner, TorchScriptRunner

    set_threads(int(spec["threads"]))
    arch, n, path = spec["arch"], int(spec["length"]), spec["path"]
    config = _config(arch, 0)
    graph = graph_spec(config.task, config)
    if path == "eager":
        model = _model(arch, 256)

        def forward() -> None:
            with torch.inference_mode():
                model(*_inputs(arch, n)[:2])

    else:
        runner: Any = (
            OnnxRunner(Path(path), graph.output_names)
            if path.endswith(".onnx")
            else TorchScriptRunner(Path(path), graph.input_names, graph.output_names)
        )

        def feed(inputs: tuple[Any, ...]) -> dict[str, Any]:
            return dict(zip(graph.input_names, (t.numpy() for t in inputs), strict=True))

        def forward() -> None:
            if not spec["chunked"]:
                runner.run(feed(_inputs(arch, n)))
                return
            ids = _inputs(arch, n)[0].numpy()
            layers = 2 * config.n_layers
            past = [np.zeros((1, config.n_heads, 0, config.head_dim), np.float32)] * layers
            for start in range(0, n, CHUNK):
                end = min(start + CHUNK, n)
                inputs = {
                    "input_ids": ids[:, start:end],
                    "attention_mask": np.ones((1, end), np.int64),
                }
                out = runner.run({**inputs, **dict(zip(graph.input_names[2:], past, strict=True))})
                new = out["new_key_values"]  # (L, 2, 1, h, chunk, e)
                past = [
                    np.concatenate([past[i], new[i // 2, i % 2]], axis=2) for i in range(layers)
                ]

    started = time.perf_counter()
    forward()
    return {"seconds": round(time.perf_counter() - started, 3), "peak_rss_bytes": peak_rss_bytes()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/scratch/blocked_export.json")
    )
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure_point(json.loads(args.worker))))
        return 0
    lengths = [int(v) for v in args.lengths.split(",")]
    work = Path(tempfile.mkdtemp(prefix="longhaul-blocked-"))
    graphs = export_graphs(work)
    for key, entry in graphs.items():
        verdict = "ok" if entry["ok"] else "NOT USABLE"
        detail = entry.get("error") or entry.get("max_abs_diff_by_length")
        print(f"{key:<28} {verdict}  {detail}", flush=True)
    paths: list[tuple[str, str, str, bool]] = []
    for arch in ("alibi", "shatter"):
        paths.append((arch, "eager-blocked", "eager", False))
        for key, entry in graphs.items():
            if key.startswith(arch) and entry["ok"]:
                paths.append((arch, key.removeprefix(f"{arch}-"), entry["path"], False))
                if arch == "alibi" and "unblocked" in key:
                    paths.append(
                        (arch, key.removeprefix(f"{arch}-") + "-chunked", entry["path"], True)
                    )
    points: dict[str, list[dict[str, Any]]] = {}
    for arch, name, path, chunked in paths:
        series = points.setdefault(f"{arch}:{name}", [])
        for n in lengths:
            spec = {
                "arch": arch,
                "length": n,
                "path": path,
                "chunked": chunked,
                "threads": args.threads,
            }
            outcome = run_worker(
                "benchmarks.blocked_export", spec, timeout_s=1200, memory_cap_bytes=MEMORY_CAP
            )
            point = {"length": n, **(outcome.result or {"stop": outcome.reason})}
            series.append(point)
            shown = (
                f"{point['seconds']:8.2f} s  peak {point['peak_rss_bytes'] / GIB:5.2f} GiB"
                if "seconds" in point
                else point["stop"]
            )
            print(f"{arch:<8}{name:<34}{n:>7}  {shown}", flush=True)
            if "stop" in point:
                break
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "size": {"alibi": ALIBI, "shatter": SHATTER},
            "graphs": graphs,
            "points": points,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
