"""The evidence behind the fp32 parity rule (exporters/parity.py, docs/decisions.md).

Measures exported-vs-eager differences of *correct* fp32 exports: every architecture, both
formats, demo checkpoints trained for 25%, 100% and 200% of the demo steps, several input seeds,
lengths from 16 up to each model's longest verified length. Each (case, output) row records the
largest |diff| and the largest |eager| over real positions, so any rule of the shape
``max|diff| <= rtol * max|ref| + atol`` can be judged against the table.

    python -m benchmarks.parity_rule                   # all of it (~1 h on 2 cores)
    python -m benchmarks.parity_rule --archs alibi --fractions 1 --seeds 0

Checkpoints are cached under benchmarks/results/scratch/parity/ (the 100% ones are the demo
store's own checkpoints/ when present); the table goes to benchmarks/results/parity_rule.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, SCRATCH, machine_info, write_json
from exporters.checkpoint import REPORT_FILE, load_checkpoint
from exporters.export import ExportRequest, _exportable, _write_graph
from exporters.graphs import graph_spec, wrap
from exporters.parity import FP32_RULE, run_parity
from exporters.training import get_preset, train

ARCHS = ("linformer", "reformer", "alibi", "shatter")
FRACTIONS = (0.25, 1.0, 2.0)
LENGTHS = (16, 64, 256, 1024, 4096)


def checkpoint(arch: str, fraction: float, demo_checkpoints: Path, log: Any) -> Path:
    steps = max(1, round(get_preset(arch, "demo").steps * fraction))
    demo = demo_checkpoints / arch
    demo_report = demo / REPORT_FILE
    demo_steps = json.loads(demo_report.read_text())["steps"] if demo_report.is_file() else None
    if fraction == 1.0 and demo_steps == steps:
        return demo
    out = SCRATCH / "parity" / f"{arch}-{round(fraction * 100)}pct"
    if not (out / REPORT_FILE).is_file():
        log(f"training {arch} for {steps} steps ({fraction:.0%} of the demo)")
        report = train(arch, "demo", out, steps=steps, seed=0, progress=False)
        log(f"  held-out {report['held_out_loss']} ({report['seconds']} s)")
    return out


def measure(ckpt_dir: Path, fmt: str, seeds: list[int], lengths: list[int]) -> list[dict[str, Any]]:
    ckpt = _exportable(load_checkpoint(ckpt_dir))
    spec = graph_spec(ckpt.config.task, ckpt.config)
    limit = ckpt.config.max_positions
    lengths = [n for n in lengths if limit is None or n <= limit]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="parity-rule-") as tmp:
        request = ExportRequest(
            checkpoint=ckpt_dir, store=Path(tmp), name="m", format=fmt, progress=False
        )
        _, runner = _write_graph(ckpt, spec, request, Path(tmp))
        reference = wrap(ckpt.model.float(), spec, torch.float32)
        for seed in seeds:
            report = run_parity(
                reference, runner, spec, ckpt.config, lengths, "fp32", progress=False, seed=seed
            )
            for case in report.cases:
                for output, diff in case.outputs.items():
                    rows.append(
                        {
                            "seed": seed,
                            "case": case.name,
                            "batch": case.batch,
                            "length": case.length,
                            "output": output,
                            "max_abs_diff": diff.max_abs_diff,
                            "peak": diff.peak,
                            "relative": diff.max_abs_diff / diff.peak if diff.peak else 0.0,
                        }
                    )
    return rows


def summarise(results: list[dict[str, Any]]) -> str:
    """One line per (arch, fraction, format): the worst relative difference and its case."""
    lines = [
        f"{'arch':<10}{'trained':>8}{'format':>13}{'max|diff|':>11}{'max rel':>10}"
        f"{'of bound':>10}  worst case"
    ]
    for r in results:
        worst = max(r["rows"], key=lambda row: row["max_abs_diff"] / FP32_RULE.bound(row["peak"]))
        top_abs = max(row["max_abs_diff"] for row in r["rows"])
        top_rel = max(row["relative"] for row in r["rows"])
        share = worst["max_abs_diff"] / FP32_RULE.bound(worst["peak"])
        lines.append(
            f"{r['arch']:<10}{r['fraction']:>8.0%}{r['format']:>13}{top_abs:>11.2e}"
            f"{top_rel:>10.2e}{share:>10.3f}  {worst['case']} {worst['output']} "
            f"(peak {worst['peak']:.3g}, seed {worst['seed']})"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    parser.add_argument("--formats", default="onnx,torchscript")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lengths", default=",".join(str(n) for n in LENGTHS))
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    parser.add_argument("--out", type=Path, default=RESULTS / "parity_rule.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    def log(message: str) -> None:
        print(message, flush=True)

    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    seeds = [int(s) for s in args.seeds.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    for arch in args.archs.split(","):
        for fraction in (float(f) for f in args.fractions.split(",")):
            ckpt = checkpoint(arch, fraction, args.checkpoints, log)
            for fmt in args.formats.split(","):
                t0 = time.perf_counter()
                rows = measure(ckpt, fmt, seeds, lengths)
                results.append({"arch": arch, "fraction": fraction, "format": fmt, "rows": rows})
                seconds = time.perf_counter() - t0
                log(f"{summarise(results[-1:]).splitlines()[1]}  [{seconds:.0f} s]")
    write_json(
        args.out,
        {
            "machine": machine_info(),
            "rule": FP32_RULE.describe(),
            "seconds": round(time.perf_counter() - started, 1),
            "results": results,
        },
    )
    print(summarise(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
