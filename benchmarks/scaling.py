"""Section 1 — scaling: encode latency and peak memory against sequence length.

Every architecture (and the full-attention baseline) at one common size (models.SCALING), batch
1, every token real, eager fp32 PyTorch: the comparison is of architectures, so all of them run
the same way. Each (architecture, length) point runs in a fresh subprocess, so its peak RSS
(``ru_maxrss``) belongs to that point alone; the parent watches the child's RSS and kills it at
the memory cap.

A series stops at the first length that is over a cap (measured), or that is predicted to be
over one from the growth between the last two points (so a doomed 32K full-attention point does
not spend minutes allocating before it is killed); the JSON records which and why.

Outside the capped series, ``single_points`` are measured once each (one forward, a long time
cap): the ALiBi prefill at 64K tokens, which the blocked attention keeps in linear memory but
whose time stays quadratic.

Worker: ``python -m benchmarks.scaling --worker '{"arch": ..., "length": ..., ...}'``.
Re-measure some architectures only: ``python -m benchmarks.scaling --archs alibi,shatter --merge
benchmarks/results/cpu-2core.json`` (replaces those series and the single points in the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    GIB,
    git_revision,
    load_average,
    loglog_slope,
    median,
    peak_rss_bytes,
    read_json,
    rss_bytes,
    run_worker,
    set_threads,
    time_calls,
    write_json,
)
from benchmarks.models import ARCHS, SCALING, arch_config, build


@dataclass(frozen=True)
class ScalingPlan:
    archs: tuple[str, ...]
    lengths: tuple[int, ...]
    time_cap_s: float  # one forward pass slower than this ends the series
    memory_cap_bytes: int  # peak RSS above this ends the series (the child is killed there)
    point_budget_s: float  # measuring time per point after the warm-up forward
    max_samples: int
    threads: int
    # (arch, length) measured once after the series, with single_time_cap_s as the time cap
    single_points: tuple[tuple[str, int], ...] = ()
    single_time_cap_s: float = 3600.0


def plan(quick: bool, threads: int) -> ScalingPlan:
    if quick:
        return ScalingPlan(
            archs=ARCHS,
            lengths=(1024, 2048, 4096),
            time_cap_s=20.0,
            memory_cap_bytes=6 * GIB,
            point_budget_s=2.0,
            max_samples=3,
            threads=threads,
        )
    # 12 GiB is half the 24 GiB machine: room for the OS and the parent, no swap on these hosts.
    return ScalingPlan(
        archs=ARCHS,
        lengths=tuple(1024 * 2**i for i in range(7)),
        time_cap_s=60.0,
        memory_cap_bytes=12 * GIB,
        point_budget_s=5.0,
        max_samples=5,
        threads=threads,
        single_points=(("alibi", 65536),),
    )


# ----------------------------------------------------------------------------- worker


def measure_point(spec: dict[str, Any]) -> dict[str, Any]:
    """In the worker: build the model, time forward passes at one length, report peak RSS."""
    import torch

    set_threads(int(spec["threads"]))
    rss_import = rss_bytes()
    config = spec["config"]
    model = build(spec["arch"], config)
    rss_model = rss_bytes()
    n = int(spec["length"])
    ids = torch.randint(4, config["vocab_size"], (1, n), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def forward() -> None:
        with torch.inference_mode():
            model(ids, mask)

    started = time.perf_counter()
    forward()  # warm-up: first-touch page faults, allocator growth, oneDNN kernel selection
    warm = time.perf_counter() - started
    if warm > spec["time_cap_s"]:
        # One forward already exceeds the cap: report it rather than spend the cap again.
        samples, cold = [warm], True
    else:
        timing = time_calls(
            forward,
            warmup=0,
            min_samples=1,
            max_samples=spec["max_samples"],
            budget_s=spec["point_budget_s"],
        )
        samples, cold = timing.samples, False
    return {
        "arch": spec["arch"],
        "length": n,
        "samples_s": [round(s, 6) for s in samples],
        "warmup_s": round(warm, 6),
        "median_s": median(samples),
        "cold_only": cold,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_import_bytes": rss_import,
        "rss_after_build_bytes": rss_model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_s": n / min(samples),
    }


# ----------------------------------------------------------------------------- parent


def _activation(point: dict[str, Any]) -> float:
    return float(max(1, point["peak_rss_bytes"] - point["rss_after_build_bytes"]))


def _predicted_over_cap(
    points: list[dict[str, Any]], next_length: int, p: ScalingPlan
) -> str | None:
    """From the growth between the last two measured points, is the next one over a cap?"""
    if len(points) < 2:
        return None
    a, b = points[-2], points[-1]
    scale = math.log(next_length / b["length"]) / math.log(b["length"] / a["length"])
    # Growth exponents clamped to [1, 2.5]: noise at short lengths must neither shrink the
    # prediction below linear nor blow it past quadratic-plus-overheads.
    t_growth = min(max(b["median_s"] / a["median_s"], 2.0**1), 2.0**2.5) ** scale
    m_growth = min(max(_activation(b) / _activation(a), 2.0**1), 2.0**2.5) ** scale
    t_next = b["median_s"] * t_growth
    m_next = b["rss_after_build_bytes"] + _activation(b) * m_growth
    if m_next > p.memory_cap_bytes:
        return (
            f"not run: predicted peak RSS {m_next / GIB:.1f} GiB > {p.memory_cap_bytes / GIB:.0f} "
            f"GiB cap (growth {b['length']}→{next_length} extrapolated from "
            f"{a['length']}→{b['length']})"
        )
    if t_next > p.time_cap_s:
        return (
            f"not run: predicted {t_next:.0f} s per forward > {p.time_cap_s:.0f} s cap "
            f"(extrapolated from {a['length']}→{b['length']})"
        )
    return None


def _measure(arch: str, n: int, config: dict[str, Any], p: ScalingPlan) -> dict[str, Any]:
    """One point in a fresh worker; returns the point, or {"stop": reason} when it failed."""
    spec = {
        "arch": arch,
        "length": n,
        "config": config,
        "threads": p.threads,
        "time_cap_s": p.time_cap_s,
        "point_budget_s": p.point_budget_s,
        "max_samples": p.max_samples,
    }
    # Warm-up + samples + interpreter start; a forward over the cap is reported, not re-run,
    # so 2× the cap plus a minute is the longest a healthy point can take.
    outcome = run_worker(
        "benchmarks.scaling",
        spec,
        timeout_s=2 * p.time_cap_s + 60,
        memory_cap_bytes=p.memory_cap_bytes,
    )
    if not outcome.ok or outcome.result is None:
        return {"stop": outcome.reason}
    point = outcome.result
    point["worker_wall_s"] = round(outcome.wall_s, 2)
    return point


def run(p: ScalingPlan, log: Any = print) -> dict[str, Any]:
    load_start = load_average()
    configs = {arch: arch_config(arch, SCALING) for arch in p.archs}
    points: dict[str, list[dict[str, Any]]] = {arch: [] for arch in p.archs}
    stops: dict[str, dict[str, Any]] = {}
    # Length-major: every architecture runs at one length before any runs at the next, so the
    # points compared with each other are measured minutes apart, not a quarter of an hour.
    for n in p.lengths:
        for arch in p.archs:
            if arch in stops:
                continue
            reason = _predicted_over_cap(points[arch], n, p)
            if reason:
                stops[arch] = {"length": n, "reason": reason, "measured": False}
                log(f"  {arch:<10}{n:>7}  {reason}")
                continue
            point = _measure(arch, n, configs[arch], p)
            if "stop" in point:
                stops[arch] = {"length": n, "reason": point["stop"], "measured": True}
                log(f"  {arch:<10}{n:>7}  stopped: {point['stop']}")
                continue
            points[arch].append(point)
            log(
                f"  {arch:<10}{n:>7}  {point['median_s'] * 1e3:10.1f} ms  "
                f"peak {point['peak_rss_bytes'] / GIB:6.2f} GiB"
            )
            if point["median_s"] > p.time_cap_s:
                stops[arch] = {
                    "length": n,
                    "reason": f"time cap: {point['median_s']:.0f} s per forward > "
                    f"{p.time_cap_s:.0f} s (this point is recorded, longer ones are not run)",
                    "measured": True,
                }
    series: dict[str, Any] = {}
    for arch in p.archs:
        pts = points[arch]
        lengths = [pt["length"] for pt in pts]
        times = [pt["median_s"] for pt in pts]
        series[arch] = {
            "config": configs[arch],
            "points": pts,
            "stopped": stops.get(arch),
            "time_slope": loglog_slope(lengths, times),
            "time_slope_longest3": loglog_slope(lengths[-3:], times[-3:]),
            "memory_slope": loglog_slope(lengths, [_activation(pt) for pt in pts]),
            "memory_slope_longest3": loglog_slope(
                lengths[-3:], [_activation(pt) for pt in pts[-3:]]
            ),
        }
    singles = []
    for arch, n in p.single_points:
        if arch not in p.archs:
            continue
        once = ScalingPlan(
            archs=(arch,),
            lengths=(n,),
            time_cap_s=p.single_time_cap_s,
            memory_cap_bytes=p.memory_cap_bytes,
            point_budget_s=0.0,
            max_samples=1,
            threads=p.threads,
        )
        point = _measure(arch, n, configs[arch], once)
        singles.append(point if "stop" in point else {**point, "arch": arch})
        if "stop" in point:
            log(f"  {arch:<10}{n:>7}  once: stopped: {point['stop']}")
        else:
            log(
                f"  {arch:<10}{n:>7}  once: {point['warmup_s']:.1f} s, "
                f"peak {point['peak_rss_bytes'] / GIB:.2f} GiB"
            )
    return {
        "plan": {**asdict(p), "memory_cap_gib": p.memory_cap_bytes / GIB},
        "size": asdict(SCALING),
        "dtype": "float32",
        "backend": "eager PyTorch, torch.inference_mode, batch 1, no padding",
        "series": series,
        "single_points": singles,
        "load_average_start": load_start,
    }


def merge(results: Path, section: dict[str, Any]) -> None:
    """Replace the re-measured series (and single points) in a results file's scaling section."""
    data = read_json(results)
    old = data["sections"]["scaling"]
    old["series"].update(section["series"])
    # Single points not re-measured this time (--no-single-points, other archs) stay.
    measured = {(point.get("arch"), point.get("length")) for point in section["single_points"]}
    kept = [
        point
        for point in old.get("single_points", [])
        if (point.get("arch"), point.get("length")) not in measured
    ]
    old["single_points"] = kept + section["single_points"]
    old.setdefault("remeasured", []).append(
        {
            "archs": sorted(section["series"]),
            "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "threads": section["plan"]["threads"],
            "time_cap_s": section["plan"]["time_cap_s"],
            "load_average_start": section["load_average_start"],
            "load_average_end": load_average(),
            "commit": git_revision(),
        }
    )
    write_json(results, data)  # the results files' own format, so a merge diffs only its change


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", help="JSON spec of one point (internal)")
    parser.add_argument("--archs", help="comma-separated architectures to re-measure")
    parser.add_argument("--merge", type=Path, help="results JSON whose scaling section to update")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--single-points",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the plan's single points (the 64K ALiBi prefill)",
    )
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure_point(json.loads(args.worker))))
        return 0
    if args.archs and args.merge:
        full = plan(quick=False, threads=args.threads)
        archs = tuple(a for a in args.archs.split(",") if a)
        unknown = sorted(set(archs) - set(ARCHS))
        if unknown:
            parser.error(f"unknown architectures {unknown}; known: {', '.join(ARCHS)}")
        singles = full.single_points if args.single_points else ()
        replaced = dataclasses.replace(full, archs=archs, single_points=singles)
        section = run(replaced, lambda line: print(line, flush=True))
        merge(args.merge, section)
        return 0
    parser.error(
        "run the scaling section through `python -m benchmarks --sections scaling`, "
        "or re-measure some architectures with --archs A,B --merge RESULTS.json"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
