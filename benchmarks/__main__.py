"""``python -m benchmarks``: run the benchmark sections in one process tree on this machine and
write ``benchmarks/results/<name>.json``; ``python -m benchmarks.report`` turns it into
docs/benchmarks.md and plots (``make bench`` runs both).

    python -m benchmarks                     # full run (~30 min on 2 cores)
    python -m benchmarks --quick             # smoke run (a few minutes) -> results/scratch/
    python -m benchmarks --sections scaling,backends

Sections run in this order because later ones use earlier results: serving and generation
serve the CPU default path that the backends section chose (``--path`` overrides it). The
engine section (continuous batching in process, on the ALiBi demo model) and the step section
(decode-step roofline and breakdown, benchmarks/decode_step.py), the prefix section (a long
shared document, benchmarks/prefix_cache.py), the overload section (each engine past its
queue limit on a real server, benchmarks/overload.py) and the scoring section (echo +
max_tokens 0 on 4K-token texts, benchmarks/scoring.py) stand alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    SCRATCH,
    load_average,
    machine_info,
    read_json,
    write_json,
)

SECTIONS = (
    "scaling",
    "backends",
    "serving",
    "generation",
    "engine",
    "step",
    "prefix",
    "overload",
    "scoring",
)


def _path(value: str) -> tuple[str, str]:
    fmt, _, precision = value.partition("-")
    if fmt not in ("onnx", "torchscript") or not precision:
        raise argparse.ArgumentTypeError(f"expected FORMAT-PRECISION (onnx-fp32, ...), got {value}")
    return fmt, precision


def _run_section(
    section: str,
    quick: bool,
    threads: int,
    work: Path,
    choice: tuple[str, str] | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    if section == "scaling":
        from benchmarks import scaling

        return scaling.run(scaling.plan(quick, threads), log)
    if section == "backends":
        from benchmarks import backends

        result = backends.run(backends.plan(quick, threads), work / "backends", log)
        log(f"  CPU default path: {result['choice'].get('path')}")
        return result
    if section == "serving":
        from benchmarks import serving

        return serving.run(serving.plan(quick), work / "serving", choice, log)
    if section == "engine":
        from benchmarks import generation

        return generation.section(quick, threads, work / "engine", log)
    if section == "scoring":
        from benchmarks import scoring

        return scoring.section(quick, threads, work / "scoring", log)
    if section == "prefix":
        from benchmarks import prefix_cache

        return prefix_cache.section(quick, threads, work / "prefix", log)
    if section == "overload":
        from benchmarks import overload

        return overload.section(quick, work / "overload", log)
    if section == "step":
        from benchmarks import decode_step

        return decode_step.section(quick, threads, work / "step", log)
    from benchmarks import generation_vs_hf

    return generation_vs_hf.run(generation_vs_hf.plan(quick), work / "generation", choice, log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run (a few minutes)")
    parser.add_argument("--name", default=None, help="results file name (default: cpu-<N>core)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="intra-op threads for torch (default: every core)",
    )
    parser.add_argument(
        "--path",
        type=_path,
        default=None,
        help="serve this FORMAT-PRECISION instead of section 2's choice",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace only the sections run here in an existing results file (the others, and "
        "the CPU default they were served with, are kept)",
    )
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")

    name = args.name or f"cpu-{os.cpu_count()}core"
    # Quick runs are smoke tests: they never overwrite the published results.
    out = (SCRATCH / f"{name}-quick.json") if args.quick else (RESULTS / f"{name}.json")
    work = SCRATCH / ("work-quick" if args.quick else "work")
    started = time.perf_counter()
    data: dict[str, Any] = {
        "name": name,
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(),
        "sections": {},
        "section_seconds": {},
    }
    choice: tuple[str, str] | None = args.path
    if args.merge and out.is_file():
        previous = read_json(out)
        kept = {k: v for k, v in previous["sections"].items() if k not in sections}
        data["sections"] = kept
        data["section_seconds"] = {
            k: v for k, v in previous["section_seconds"].items() if k in kept
        }
        data["merged_from"] = {
            "machine": previous["machine"],
            "sections": sorted(kept),
            "total_seconds": previous.get("total_seconds"),
        }
        served = previous["sections"].get("serving", {}).get("published", [])
        if choice is None and served:  # keep serving what the kept sections were served with
            choice = (served[0]["format"], served[0]["precision"])
    busy = data["machine"]["load_average_at_start"][0]
    if busy > 0.5 * (os.cpu_count() or 1):
        # Other work on the cores makes OpenMP threads wait on each other (measured here: a
        # 2-thread torch decode step 15x slower with the other core taken): numbers will be off.
        print(
            f"warning: load average {busy} on {os.cpu_count()} cores: the machine is busy, "
            "absolute numbers will be pessimistic and noisy",
            flush=True,
        )

    def log(line: str) -> None:
        print(line, flush=True)

    for section in SECTIONS:
        if section not in sections:
            continue
        t0 = time.perf_counter()
        started_load = load_average()
        log(f"== {section} (load average {started_load})")
        try:
            result = _run_section(section, args.quick, args.threads, work, choice, log)
        except Exception as exc:  # one broken section must not cost the others' numbers
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
        if section == "backends" and choice is None and result.get("choice", {}).get("path"):
            choice = (result["choice"]["format"], result["choice"]["precision"])
        result["load_average_after"] = load_average()
        # Where this section's numbers come from: with --merge, sections of one file may come
        # from different runs and commits.
        result["run"] = {
            "commit": data["machine"]["git"]["commit"],
            "dirty": data["machine"]["git"]["dirty"],
            "load_average_at_start": started_load,
            "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            # The project's machines differ in vector units (AVX2 only, or AVX-512 with VNNI
            # and bf16), which moves int8 and bf16 figures most: each section says its own.
            "cpu_flags": data["machine"]["cpu_flags"],
        }
        data["sections"][section] = result
        data["section_seconds"][section] = round(time.perf_counter() - t0, 1)
        data["total_seconds"] = round(time.perf_counter() - started, 1)
        write_json(out, data)  # after every section: a later failure keeps what was measured

    data["machine"]["load_average_at_end"] = load_average()
    data["total_seconds"] = round(time.perf_counter() - started, 1)
    write_json(out, data)
    from benchmarks.report import summary_table

    print()
    print(summary_table(data))
    print(
        f"\nwrote {out} in {data['total_seconds']:.0f} s; next: python -m benchmarks.report {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
