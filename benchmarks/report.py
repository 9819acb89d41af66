"""``python -m benchmarks.report [RESULTS.json]``: docs/benchmarks.md and docs/img/bench-*.png,
regenerated from one results file (never from anything measured now).

    python -m benchmarks.report            # benchmarks/results/cpu-<N>core.json -> docs/
    python -m benchmarks.report --quick    # the --quick run's JSON -> benchmarks/results/scratch/
    python -m benchmarks.report RESULTS.json --out FILE.md --img-dir DIR
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import GIB, RESULTS, ROOT, SCRATCH, loglog_slope, read_json

ARCH_STYLE = {  # colour, marker: the baseline is black so it stands apart
    "vanilla": ("black", "o"),
    "linformer": ("tab:blue", "s"),
    "reformer": ("tab:orange", "^"),
    "shatter": ("tab:green", "D"),
    "alibi": ("tab:red", "v"),
}
ARCH_LABEL = {"vanilla": "full attention (baseline)"}


def _fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _ms(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "–"
    return f"{seconds * 1e3:,.0f}" if seconds >= 0.1 else f"{seconds * 1e3:,.1f}"


def _num(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


# ----------------------------------------------------------------------------- plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def plot_scaling(section: dict[str, Any], img_dir: Path) -> list[str]:
    plt = _plt()
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arch, s in section["series"].items():
        pts = s["points"]
        if not pts:
            continue
        colour, marker = ARCH_STYLE.get(arch, ("grey", "x"))
        label = ARCH_LABEL.get(arch, arch)
        if s.get("time_slope") is not None:
            label += f" (slope {s['time_slope']:.2f})"
        xs = [p["length"] for p in pts]
        axes[0].plot(xs, [p["median_s"] for p in pts], marker=marker, color=colour, label=label)
        mem_label = ARCH_LABEL.get(arch, arch)
        if s.get("memory_slope") is not None:
            mem_label += f" (slope {s['memory_slope']:.2f})"
        axes[1].plot(
            xs,
            [p["peak_rss_bytes"] / GIB for p in pts],
            marker=marker,
            color=colour,
            label=mem_label,
        )
        stop = s.get("stopped")
        if stop:  # say in the legend where and why the series ended
            cause = "memory" if "memory" in stop["reason"] else "time"
            for line in (axes[0].lines[-1], axes[1].lines[-1]):
                line.set_label(f"{line.get_label()}, {cause} cap at {_fmt_len(stop['length'])}")
    cap = section["plan"]["memory_cap_gib"]
    axes[1].axhline(cap, color="grey", linestyle="--", linewidth=1)
    axes[1].text(1024, cap * 1.05, f"memory cap {cap:.0f} GiB", fontsize=8, color="grey")
    for ax, ylabel, title in (
        (axes[0], "seconds per forward (median)", "Encode latency, batch 1, fp32 eager"),
        (axes[1], "peak RSS of the process (GiB)", "Peak memory (slope: activation memory)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        lengths = section["plan"]["lengths"]
        ax.set_xticks(lengths, [_fmt_len(n) for n in lengths])
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.legend(fontsize=7.5)
    fig.tight_layout()
    name = "bench-scaling.png"
    fig.savefig(img_dir / name)
    plt.close(fig)
    return [name]


def plot_backends(section: dict[str, Any], img_dir: Path) -> list[str]:
    plt = _plt()
    archs = list(section["archs"])
    paths = list(next(iter(section["archs"].values()))["paths"])
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(paths)
    for i, path in enumerate(paths):
        speedups = [
            section["archs"][a]["paths"][path]["tokens_per_s"]
            / section["archs"][a]["paths"]["eager-fp32"]["tokens_per_s"]
            for a in archs
        ]
        xs = [j + (i - (len(paths) - 1) / 2) * width for j in range(len(archs))]
        bars = ax.bar(xs, speedups, width, label=path)
        for bar, value in zip(bars, speedups, strict=True):
            ax.text(
                bar.get_x() + bar.get_width() / 2,
                value,
                f"{value:.1f}",
                ha="center",
                va="bottom",
                fontsize=6.5,
            )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(archs)), archs)
    ax.set_ylabel("throughput / eager fp32")
    plan = section["plan"]
    ax.set_title(
        f"Backends and precision, batch {plan['batch']} × {plan['length']} tokens "
        f"(higher is faster)"
    )
    ax.legend(fontsize=7.5, ncol=3)
    fig.tight_layout()
    name = "bench-backends.png"
    fig.savefig(img_dir / name)
    plt.close(fig)
    return [name]


def plot_serving(section: dict[str, Any], img_dir: Path) -> list[str]:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rows) in enumerate(section["servers"].items()):
        xs = [r["concurrency"] for r in rows]
        colour = "black" if label.startswith("naive") else colours[i % len(colours)]
        axes[0].plot(xs, [r["requests_per_s"] for r in rows], marker="o", color=colour, label=label)
        # One colour per server: p50 solid, p99 dashed.
        axes[1].plot(
            xs, [r["p50_s"] * 1e3 for r in rows], marker="o", color=colour, label=f"{label} p50"
        )
        axes[1].plot(
            xs,
            [r["p99_s"] * 1e3 for r in rows],
            "--",
            marker="x",
            color=colour,
            alpha=0.7,
            label=f"{label} p99",
        )
    axes[0].set_ylim(bottom=0)
    axes[0].set_ylabel("requests / s")
    axes[0].set_title("Throughput vs concurrency")
    axes[1].set_ylabel("latency (ms)")
    axes[1].set_yscale("log")
    axes[1].set_title("Latency vs concurrency")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_xticks(
            section["plan"]["concurrencies"], [str(c) for c in section["plan"]["concurrencies"]]
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    name = "bench-serving.png"
    fig.savefig(img_dir / name)
    plt.close(fig)
    return [name]


def plot_generation(section: dict[str, Any], img_dir: Path) -> list[str]:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    labels = list(section["levels"])
    streams = section["plan"]["streams"]
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        rows = section["levels"][label]
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(rows))]
        axes[0].bar(xs, [r["tokens_per_s"] for r in rows], width, label=label)
        axes[1].bar(xs, [r["ttft_p50_s"] * 1e3 for r in rows], width, label=label)
        axes[2].bar(xs, [r["itl_p50_s"] * 1e3 for r in rows], width, label=label)
    for ax, title in zip(
        axes,
        ("tokens / s (higher is better)", "TTFT p50 (ms)", "ITL p50 (ms per token)"),
        strict=True,
    ):
        ax.set_xticks(range(len(streams)), [f"{s} stream{'s' if s > 1 else ''}" for s in streams])
        ax.set_title(title)
        for container in ax.containers:
            ax.bar_label(
                container, fmt=lambda v: f"{v:.0f}" if v >= 100 else f"{v:.3g}", fontsize=6.5
            )
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    name = "bench-generation.png"
    fig.savefig(img_dir / name)
    plt.close(fig)
    return [name]


# ----------------------------------------------------------------------------- markdown


def _duration(data: dict[str, Any]) -> str:
    """Run time; for a merged file, the sum of its sections' own times (they ran separately)."""
    if not data.get("merged_from"):
        return f"{data.get('total_seconds', 0) / 60:.1f} min"
    return f"sections measured separately, {_section_minutes(data):.0f} min in all"


def _section_minutes(data: dict[str, Any]) -> float:
    return sum(data.get("section_seconds", {}).values()) / 60


def _provenance(data: dict[str, Any]) -> list[str]:
    """Which run each section comes from, when ``--merge`` mixed runs in one file."""
    if not data.get("merged_from"):
        return []
    parts = []
    for key, section in data["sections"].items():
        run = section.get("run")
        if run:
            dirty = " + uncommitted changes" if run["dirty"] else ""
            flags = run.get("cpu_flags")
            cpu = ", ".join(flags) if flags else "not recorded"
            parts.append(
                f"{key}: {run['date']} UTC, commit `{run['commit'][:12]}`{dirty}, load "
                f"average at start {run['load_average_at_start']}, CPU flags {cpu}"
            )
        else:
            parts.append(f"{key}: an earlier run (see this JSON file's git history)")
    return [
        "- Sections were re-run into one file (`python -m benchmarks --merge --sections ...`); "
        "each comes from: " + "; ".join(parts) + "."
    ]


def _machine(data: dict[str, Any]) -> list[str]:
    m = data["machine"]
    v = m["versions"]
    lines = [
        "## Machine and run",
        "",
        f"- **{data['name']}** ({data['mode']} run, {_duration(data)}): "
        f"{m['cpu']}, {m['cores']} cores ({', '.join(m['cpu_flags']) or 'no AVX flags read'}), "
        f"{m['memory_gib']} GiB, {m['platform']}, Python {m['python']}, "
        f"torch threads {m['torch_threads']}"
        + (
            " (the latest run's machine; each section's CPU flags are below)."
            if data.get("merged_from")
            else "."
        ),
        f"- torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}, "
        f"transformers {v.get('transformers') or 'not installed'}, numpy {v.get('numpy')}.",
        f"- Load average (1/5/15 min) at start {m['load_average_at_start']}, at end "
        f"{m.get('load_average_at_end', '–')}; per section: "
        + ", ".join(
            f"{k} {s.get('load_average_after', '–')[0] if s.get('load_average_after') else '–'}"
            f" after {data['section_seconds'].get(k, 0):.0f} s"
            for k, s in data["sections"].items()
        )
        + ". A load average above the core count means other work shared the CPU: the ratios "
        "within a section (measured back to back) stay meaningful, absolute numbers do not.",
        *_provenance(data),
        f"- Source: commit `{m['git']['commit'][:12]}`"
        + (" plus uncommitted changes" if m["git"]["dirty"] else "")
        + ".",
        "",
    ]
    return lines


def _scaling_md(section: dict[str, Any], images: list[str], img_rel: str) -> list[str]:
    plan, size = section["plan"], section["size"]
    lengths = plan["lengths"]
    lines = [
        "## 1. Scaling with sequence length",
        "",
        f"Every architecture at one size — d_model {size['d_model']}, {size['n_layers']} layers, "
        f"{size['n_heads']} heads (Shatter: {size['n_heads']} partitions of its single head), "
        f"d_ff {size['d_ff']}, vocabulary {size['vocab_size']} — randomly initialised, batch 1, "
        "no padding, fp32 eager PyTorch under `torch.inference_mode` (the same runtime for "
        "every model, so the figure compares architectures, not backends). Linformer: k 256, "
        "n_max 65536, key-value sharing; Reformer: bidirectional, chunk 64, 32 buckets, "
        "2 hash rounds; ALiBi: a full causal forward (prefill).",
        "",
        "The baseline (`benchmarks/baseline.py`) is a plain pre-LN transformer encoder of the "
        "same width and depth with **explicit softmax attention** (`softmax(q kᵀ/√e) v`, the "
        "n × n score matrix materialised), not `scaled_dot_product_attention`: on CPU SDPA "
        "picks a flash-style kernel that never stores the score matrix, which would hide the "
        "quadratic memory that efficient attention exists to remove (its time stays "
        "quadratic). Explicit attention is also what the Longhaul models compute, so kernels "
        "are alike and only the architecture differs.",
        "",
        f"Each point is a fresh subprocess (peak RSS = `ru_maxrss` of that process, model "
        f"weights included): one warm-up forward, then up to {plan['max_samples']} timed ones "
        f"within {plan['point_budget_s']:.0f} s; the median is plotted. A series stops at the "
        f"first length whose forward takes over **{plan['time_cap_s']:.0f} s** or whose RSS "
        f"passes **{plan['memory_cap_gib']:.0f} GiB** (the child is killed there), or that is "
        "predicted to, from the growth between the two previous points (not run).",
        "",
    ]
    lines += [f"![scaling]({img_rel}/{name})" for name in images] + [""]
    header = "| architecture | " + " | ".join(_fmt_len(n) for n in lengths)
    header += " | time slope (all / longest 3) | memory slope (all / longest 3) | stopped |"
    lines += [
        "Median seconds per forward, then peak RSS in GiB:",
        "",
        header,
        "|" + "---|" * (len(lengths) + 4),
    ]
    for arch, s in section["series"].items():
        by_len = {p["length"]: p for p in s["points"]}
        cells = []
        for n in lengths:
            p = by_len.get(n)
            cells.append(f"{p['median_s']:.3g} s / {p['peak_rss_bytes'] / GIB:.2f}" if p else "–")
        stop = s.get("stopped")
        stop_text = f"{_fmt_len(stop['length'])}: {stop['reason']}" if stop else "no"
        lines.append(
            f"| {ARCH_LABEL.get(arch, arch)} | "
            + " | ".join(cells)
            + f" | {_num(s['time_slope'])} / {_num(s['time_slope_longest3'])} | "
            f"{_num(s['memory_slope'])} / {_num(s.get('memory_slope_longest3'))} | {stop_text} |"
        )
    lines += [
        "",
        "Slopes are least-squares fits of log(time) and log(activation memory = peak RSS − "
        "RSS after building the model) against log(length): 1 is linear, 2 quadratic. The fit "
        "over all lengths is pulled down by fixed costs at short lengths (projections, "
        "feed-forward and LM head are linear in n for every model); the longest three points "
        "show the asymptotic regime.",
        "",
        *_remeasured(section),
        *_scaling_findings(section),
    ]
    return lines


def _remeasured(section: dict[str, Any]) -> list[str]:
    """Series re-measured later (``python -m benchmarks.scaling --archs ... --merge``), and the
    single points measured outside the capped series."""
    lines = []
    later: set[str] = set()  # a series re-measured again later is described by the later run
    runs = []
    for r in reversed(section.get("remeasured", [])):
        runs.append((r, [a for a in r["archs"] if a not in later]))
        later.update(r["archs"])
    for r, current in reversed(runs):
        if not current:
            continue
        archs = ", ".join(ARCH_LABEL.get(a, a) for a in current)
        commit = r.get("commit", {}).get("commit", "")[:12]
        rows, were, its = ("Rows", "were", "their") if len(current) > 1 else ("Row", "was", "its")
        lines.append(
            f"{rows} {archs} {were} re-measured on {r['at']} (commit `{commit}`, "
            f"blocked attention, {r['threads']} torch thread(s), load average "
            f"{r['load_average_start']} at start, {r['load_average_end']} at end): {its} memory "
            f"is comparable with the other rows, {its} times only with other re-measured rows "
            "when the load average exceeds the core count."
        )
    for point in section.get("single_points", []):
        if "stop" in point:
            lines.append(f"- {point.get('arch', '?')} once: stopped: {point['stop']}")
            continue
        label = ARCH_LABEL.get(point["arch"], point["arch"])
        lines.append(
            f"- Measured once, outside the capped series: {label} "
            f"at {_fmt_len(point['length'])} tokens, one forward: {point['warmup_s']:.0f} s, "
            f"peak RSS {point['peak_rss_bytes'] / GIB:.2f} GiB."
        )
    singles = [p for p in section.get("single_points", []) if "stop" not in p]
    for arch in sorted({p["arch"] for p in singles}):
        pts = {p["length"]: p for p in section["series"].get(arch, {}).get("points", [])}
        pts.update({p["length"]: p for p in singles if p["arch"] == arch})
        longest = [pts[n] for n in sorted(pts)[-3:]]
        slope = loglog_slope(
            [p["length"] for p in longest],
            [max(1, p["peak_rss_bytes"] - p["rss_after_build_bytes"]) for p in longest],
        )
        lengths = ", ".join(_fmt_len(p["length"]) for p in longest)
        lines.append(
            f"- {ARCH_LABEL.get(arch, arch)}: activation-memory slope over its longest three "
            f"measured lengths ({lengths}, series and single points together): {_num(slope)}."
        )
    return [*lines, ""] if lines else lines


def _scaling_findings(section: dict[str, Any]) -> list[str]:
    """Each architecture against the baseline at the longest length both reached."""
    series = section["series"]
    base = {p["length"]: p for p in series.get("vanilla", {}).get("points", [])}
    lines = ["What this run shows:", ""]
    if base:
        reach = max(base)
        stop = series["vanilla"].get("stopped")
        lines.append(
            f"- Full attention reached {_fmt_len(reach)}"
            + (f"; {_fmt_len(stop['length'])} was {stop['reason']}." if stop else ".")
        )
    for arch, s in series.items():
        if arch == "vanilla" or not s["points"]:
            continue
        own = {p["length"]: p for p in s["points"]}
        common = sorted(set(own) & set(base))
        text = f"- {arch} reached {_fmt_len(max(own))}"
        remeasured = any(arch in r["archs"] for r in section.get("remeasured", []))
        if remeasured and common:  # another load, another thread count: no speed ratio
            n = common[-1]
            text += (
                f"; at {_fmt_len(n)} {own[n]['peak_rss_bytes'] / GIB:.2f} GiB peak RSS against "
                f"the baseline's {base[n]['peak_rss_bytes'] / GIB:.2f} GiB (re-measured: times "
                "not comparable)"
            )
        elif common:
            n = common[-1]
            speed = base[n]["median_s"] / own[n]["median_s"]
            act_base = base[n]["peak_rss_bytes"] - base[n]["rss_after_build_bytes"]
            act_own = own[n]["peak_rss_bytes"] - own[n]["rss_after_build_bytes"]
            text += (
                f"; at {_fmt_len(n)} it ran {speed:.2g}× the baseline's speed with "
                f"{own[n]['peak_rss_bytes'] / GIB:.2f} GiB peak RSS against "
                f"{base[n]['peak_rss_bytes'] / GIB:.2f} GiB (activation memory "
                f"{act_own / max(act_base, 1):.2g}× the baseline's)"
            )
        stop = s.get("stopped")
        text += f"; stopped at {_fmt_len(stop['length'])}: {stop['reason']}." if stop else "."
        lines.append(text)
    return [*lines, ""]


def _warmups(section: dict[str, Any]) -> str:
    """How many warm-up forwards each path had in this run (read back from the samples)."""
    counts: dict[str, int] = {}
    for arch in section["archs"].values():
        for path, r in arch["paths"].items():
            counts[path] = len(r.get("warmup_s", []))
    ts = {n for p, n in counts.items() if p.startswith("torchscript")}
    other = {n for p, n in counts.items() if not p.startswith("torchscript")}
    if ts == other:
        return f"{'/'.join(map(str, sorted(ts)))} warm-up forwards each"
    return (
        f"{'/'.join(map(str, sorted(ts)))} warm-ups for TorchScript, whose profiling executor "
        f"optimises only after its first runs, {'/'.join(map(str, sorted(other)))} for the others"
    )


def _backends_md(section: dict[str, Any], images: list[str], img_rel: str) -> list[str]:
    plan, size, peaks = section["plan"], section["size"], section["gemm_peak"]
    lines = [
        "## 2. Backends and precision",
        "",
        f"One realistic size — d_model {size['d_model']}, {size['n_layers']} layers, "
        f"{size['n_heads']} heads (Shatter: {size['n_heads']} partitions), d_ff {size['d_ff']}, "
        f"vocabulary {size['vocab_size']} — at batch {plan['batch']} × {plan['length']} tokens "
        "(no padding; ALiBi runs its kv-cache graph as a prefill with an empty cache). The "
        "exported paths are produced with the exporter's own code (`exporters.graphs.wrap`, "
        "`exporters.formats.export_onnx` / `export_torchscript` / `quantize_int8`) and run "
        "through the service's backends (`service.backends`), so they are what a served model "
        "executes. Accuracy is against eager fp32 on the same inputs: cosine of every "
        "position's logits (mean and min), argmax agreement, and for encoders the cosine of "
        "the mean-pooled hidden state (what `/v1/encode` returns).",
        "",
        f"GEMM peak measured in the same run (`torch.matmul`, {plan['gemm_size']}² square, "
        f"median) at the start of the section: **fp32 {peaks['fp32']['median_flops'] / 1e9:,.0f} "
        f"GFLOP/s**, **bf16 {peaks['bf16']['median_flops'] / 1e9:,.0f} GFLOP/s** (best sample "
        f"{peaks['fp32']['best_flops'] / 1e9:,.0f} / {peaks['bf16']['best_flops'] / 1e9:,.0f})"
        + (
            "; MFU uses the peak re-measured inside each architecture's timing rounds (given "
            "with each table), so model and peak see the same background load"
            if any("gemm_peak_flops" in a for a in section["archs"].values())
            else "; MFU uses this peak, so on a machine whose load changed during the section it "
            "can exceed 100%"
        )
        + ". MFU = matmul FLOPs of the model (counted with `torch.utils.flop_counter` on the "
        "eager model; softmax, norms and gathers are not counted) / median time / the peak of "
        "the compute dtype. No int8 GEMM peak is measured, so int8 rows have no MFU. Paths are "
        f"timed round-robin (one forward of each path per round, after {_warmups(section)}), "
        "so a change in background load hits every path alike.",
        "",
    ]
    lines += [f"![backends]({img_rel}/{name})" for name in images] + [""]
    for arch, a in section["archs"].items():
        in_rounds = a.get("gemm_peak_flops")
        peak_text = (
            f"; GEMM peak in its rounds fp32 {in_rounds['fp32'] / 1e9:,.0f}, bf16 "
            f"{in_rounds['bf16'] / 1e9:,.0f} GFLOP/s"
            if in_rounds
            else ""
        )
        lines += [
            f"**{arch}** ({a['matmul_flops'] / 1e9:,.0f} GFLOP of matmuls per batch{peak_text}):",
            "",
            "| path | tokens/s | × eager fp32 | MFU | logits cosine mean / min | argmax "
            "agreement | pooled cosine min | export s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        base = a["paths"]["eager-fp32"]["tokens_per_s"]
        for path, r in a["paths"].items():
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "–"
            lines.append(
                f"| {path} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f} | {mfu} | "
                f"{r['logits_cosine_mean']:.5f} / {r['logits_cosine_min']:.5f} | "
                f"{r['argmax_agreement']:.4f} | {_num(r.get('pooled_cosine_min'), 5)} | "
                f"{_num(r.get('export_s'), 1)} |"
            )
        lines.append("")
    choice = section["choice"]
    if choice.get("path"):
        speed = choice["geomean_speedup_vs_eager_fp32"]
        lines += [
            "### The CPU default",
            "",
            f"**Fastest accurate servable path: `{choice['path']}`** (manifest `format: "
            f"{choice['format']}`, `precision: {choice['precision']}`). Rule: among the paths "
            f"the service can serve, those with {choice['accuracy_floor']} on every "
            "architecture, the highest geometric-mean speed-up over eager fp32 ("
            + ", ".join(f"{k} {v:.2f}×" for k, v in speed.items())
            + "). Per architecture, the fastest accurate path was: "
            + ", ".join(f"{k} {v}" for k, v in choice["per_arch_fastest_accurate"].items())
            + ".",
            "",
            "Where it is carried: the exporter writes `format`/`precision` into every "
            "manifest already, so the choice is a default of the exporter (`python -m exporters "
            "export --format/--precision`, `ExportRequest`, and the demo store's CPU model), "
            "recorded per model in `manifest.json`; the service needs no setting, it serves what "
            "the manifest says.",
            "",
            "Caveat on argmax agreement: the models are randomly initialised, so their logits "
            "have small top-1 margins and reduced precision flips more argmaxes than it would "
            "on a trained model; the cosine floor (the exporter's own parity rule for reduced "
            "precision) is what the choice uses.",
            "",
        ]
    else:
        lines += [f"No default chosen: {choice.get('reason')}.", ""]
    return lines


def _serving_table(servers: dict[str, list[dict[str, Any]]], concurrencies: list[int]) -> list[str]:
    two = any(r.get("generate") for rows in servers.values() for r in rows)
    head = (
        "| concurrency | server | req/s | tokens/s | p50 ms | p99 ms | padding ratio | mean batch "
        "| CPU s server / client |"
        + (" generate tokens/s | generate p99 ms |" if two else "")
        + " errors |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for i, c in enumerate(concurrencies):
        for label, rows in servers.items():
            if i >= len(rows):
                continue
            r = rows[i]
            gen = r.get("generate") or {}
            errors = sum(r["errors"].values()) + sum((gen.get("errors") or {}).values())
            lines.append(
                f"| {c} | {label} | {r['requests_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                f"{_ms(r['p50_s'])} | {_ms(r['p99_s'])} | {_num(r.get('padding_ratio'))} | "
                f"{_num(r.get('mean_batch_size'), 1)} | {_num(r.get('server_cpu_s'), 1)} / "
                f"{_num(r.get('client_cpu_s'), 1)} |"
                + (
                    f" {_num(gen.get('tokens_per_s'), 0)} | {_ms(gen.get('p99_s'))} |"
                    if two
                    else ""
                )
                + f" {errors or ''} |"
            )
    return lines


def _calibration_md(section: dict[str, Any]) -> list[str]:
    """One line per served model: what its warm-up measured (from /v1/models)."""
    lines = []
    for label, models in (section.get("calibration") or {}).items():
        for model, info in (models or {}).items():
            batching = info.get("batching")
            if not batching:
                continue
            c = batching["coefficients"]
            shapes = ", ".join(f"{s['batch']}×{s['length']}" for s in batching["samples"])
            lines.append(
                f"- {label} / `{model}` ({info.get('threads')} threads): {batching['source']} "
                f"in {batching['seconds_spent']:.1f} s — fixed {c['fixed'] * 1e3:.2f} ms, per "
                f"sequence {c['per_sequence'] * 1e3:.3f} ms, per token {c['per_token'] * 1e6:.1f} "
                f"µs, per attention unit {c['per_attention']:.3g} s; max relative error "
                f"{_num(batching.get('max_relative_error'))} over {shapes or 'no shapes'}."
            )
    return lines


def _serving_md(section: dict[str, Any], images: list[str], img_rel: str) -> list[str]:
    plan, settings = section["plan"], section["longhaul_settings"]
    tokens = section["request_tokens"]
    lines = [
        "## 3. Serving",
        "",
        f"One {plan['arch']} encoder (section 2's size, random weights) exported and published "
        "with the real exporter into a scratch store and served by `python -m service` "
        f"(defaults: batch policy `{settings.get('batch_policy', 'deadline')}`, calibration "
        f"{settings.get('calibration_seconds', 0):g} s, batch cost budget "
        f"{settings['batch_cost_budget']:g}, max batch {settings['max_batch_size']}, max wait "
        f"{settings['max_wait_ms']:g} ms, thread budget {settings.get('thread_budget', '–')}). "
        "Controls, same model and process settings otherwise: **batching off** "
        "(`LONGHAUL_MAX_BATCH_SIZE=1`) and **old batching** (`LONGHAUL_BATCH_POLICY=deadline`: "
        "a batch grows to the cost budget by closest length and waits up to max wait when not "
        "full, the rule before the throughput policy). The peer is `benchmarks/naive_server.py` "
        "— FastAPI + eager fp32 PyTorch on the same checkpoint, one request per forward, a "
        "plain `def` route in FastAPI's thread pool, same tokenizer, mean pooling and "
        "normalisation.",
        "",
        f"Load: closed loop, each of c clients sends its next request when the previous "
        f"answered, until {plan['max_requests']} requests or {plan['max_seconds']:.0f} s per "
        f"level and server; {len(tokens)} request texts cut from held-out stdlib sources, "
        f"{min(tokens)}–{max(tokens)} tokens (median {sorted(tokens)[len(tokens) // 2]}), "
        "one text per request. Servers alternate level by level, so drifting background load "
        "hits all alike; they are started one after another, so no warm-up calibration is "
        "timed while another server loads. The load generator shares the cores with the "
        "servers (loopback only). Padding ratio and mean batch size come from Longhaul's "
        "`/metrics` (difference over the level).",
        "",
    ]
    for p in section["published"]:
        lines.append(f"- `{p['name']}`: {p['format']} {p['precision']}; {p['parity']}.")
    lines += [""] + [f"![serving]({img_rel}/{name})" for name in images] + [""]
    lines += _serving_table(section["servers"], plan["concurrencies"])
    lines += ["", *_serving_findings(section["servers"], plan["concurrencies"])]
    if section.get("two_models"):
        lines += [
            "### Two models loaded and under load at once",
            "",
            "One Longhaul process serves the encoder and `decoder` (section 4's random BLOOM, "
            "imported with `python -m exporters import hf-bloom`); at each level c clients "
            f"encode while {plan.get('generate_clients')} closed-loop clients generate "
            f"{plan.get('generate_tokens')} greedy tokens each (non-streaming `/v1/generate`). "
            "The two models share the thread budget (each gets budget // 2 intra-op threads); "
            "`threads unshared` gives each model every core, as the runtimes do by default.",
            "",
            *_serving_table(section["two_models"], plan["concurrencies"]),
            "",
            *_serving_findings(section["two_models"], plan["concurrencies"]),
        ]
    calibration = _calibration_md(section)
    if calibration:
        lines += [
            "Batch time models measured at warm-up (`/v1/models` → `batching`; the fit "
            "t = fixed + per_sequence·b + per_token·b·n + per_attention·b·cost(n)):",
            "",
            *calibration,
            "",
        ]
    return lines


def _serving_findings(
    servers: dict[str, list[dict[str, Any]]], concurrencies: list[int]
) -> list[str]:
    labels = list(servers)
    default = labels[0]
    naive = next((k for k in labels if k.startswith("naive")), None)
    # "max batch 1" is how earlier result files named batching off.
    off = next((k for k in labels if k.endswith((", batching off", "max batch 1"))), None)
    old = next((k for k in labels if k.endswith(", old batching")), None)
    unshared = next((k for k in labels if k.endswith(", threads unshared")), None)
    lines = ["What this run shows:", ""]
    for i, c in enumerate(concurrencies):
        row = servers[default][i]
        parts = []
        for name, other_label in (
            ("batching off", off), ("old batching", old), ("threads unshared", unshared),
            ("the naive server", naive),
        ):  # fmt: skip
            if other_label is None or i >= len(servers[other_label]):
                continue
            other = servers[other_label][i]
            part = (
                f"{row['requests_per_s'] / other['requests_per_s']:.2f}× {name}'s throughput "
                f"at {row['p99_s'] / other['p99_s']:.2f}× its p99"
            )
            gen, other_gen = row.get("generate"), other.get("generate")
            if gen and other_gen and other_gen.get("tokens_per_s"):
                part += f" (generate {gen['tokens_per_s'] / other_gen['tokens_per_s']:.2f}×)"
            parts.append(part)
        lines.append(
            f"- c = {c}: {default} (padding ratio {_num(row.get('padding_ratio'))}, mean batch "
            f"{_num(row.get('mean_batch_size'), 1)}) did " + "; ".join(parts) + "."
        )
    if off and old:
        worst = min(
            servers[default][i]["requests_per_s"]
            / max(servers[off][i]["requests_per_s"], servers[old][i]["requests_per_s"])
            for i in range(len(servers[default]))
        )
        lines.append(
            f"- Against the better of batching off and old batching at each level, the default's "
            f"lowest throughput ratio is {worst:.2f}×."
        )
    return [*lines, ""]


def _generation_md(section: dict[str, Any], images: list[str], img_rel: str) -> list[str]:
    lines = ["## 4. Generation", ""]
    if section.get("skipped"):
        return [*lines, f"Not run: {section['skipped']}.", ""]
    plan, size, path = section["plan"], section["size"], section["path"]
    lines += [
        f"A randomly initialised `BloomForCausalLM` (d {size['d_model']}, {size['n_layers']} "
        f"layers, {size['n_heads']} heads) saved with `save_pretrained`, imported with "
        "`python -m exporters import hf-bloom`, exported as "
        f"{path['format']} {path['precision']} ({section['parity']}) and served by "
        "`python -m service`; the peer is `transformers` `generate()` on the same HF "
        f"directory. Greedy, {plan['prompt_tokens']}-token prompts, up to "
        f"{plan['max_new_tokens']} new tokens. 1 stream = {plan['single_requests']} requests "
        "one after another; 16 streams = 16 requests at once (HF: one left-padded batch of 16, "
        "which is what `generate()` offers for concurrent prompts). TTFT = send → first token "
        "event; ITL = a stream's decode time / its tokens after the first (Longhaul: measured "
        "by the client over SSE, the server's own histogram means alongside). The engine "
        "alone, in process (1/4/16 streams, long contexts, chunked-prefill interference), is "
        "measured by `python -m benchmarks.generation`.",
        "",
    ]
    lines += [f"![generation]({img_rel}/{name})" for name in images] + [""]
    lines += [
        "| system | streams | tokens/s | TTFT p50 ms | TTFT max ms | ITL p50 ms | server "
        "TTFT / ITL mean ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, rows in section["levels"].items():
        for r in rows:
            server = (
                f"{_ms(r.get('server_ttft_mean_s'))} / {_ms(r.get('server_itl_mean_s'))}"
                if "server_ttft_mean_s" in r
                else "–"
            )
            lines.append(
                f"| {label} | {r['streams']} | {r['tokens_per_s']:.1f} | {_ms(r['ttft_p50_s'])} | "
                f"{_ms(r['ttft_max_s'])} | {_ms(r['itl_p50_s'])} | {server} |"
            )
    labels = list(section["levels"])
    ours, peers = labels[0], [k for k in labels[1:]]
    lines += ["", "What this run shows:", ""]
    for peer in peers:
        for a, b in zip(section["levels"][ours], section["levels"][peer], strict=False):
            ratio = a["tokens_per_s"] / b["tokens_per_s"]
            lines.append(
                f"- {a['streams']} stream(s): Longhaul {ratio:.2g}× "
                f"the tokens/s of {peer}, TTFT p50 {_ms(a['ttft_p50_s'])} vs "
                f"{_ms(b['ttft_p50_s'])} ms."
            )
    slower = [
        (peer, a, b)
        for peer in peers
        for a, b in zip(section["levels"][ours], section["levels"][peer], strict=False)
        if a["streams"] > 1 and a["tokens_per_s"] < b["tokens_per_s"]
    ]
    if slower:
        peer, a, b = slower[-1]
        lines.append(
            f"- At {a['streams']} streams the peer's single static batch wins: every row "
            "decodes in lockstep in one `generate()` call, and its per-token step "
            f"({_ms(b['itl_p50_s'])} ms ITL p50 for {peer}) is cheaper than Longhaul's "
            f"continuous-batching step ({_ms(a['itl_p50_s'])} ms). All 16 requests are sent "
            "at once here, the case a static batch is best at; requests arriving at different "
            "times would wait for a running static batch to finish, which this run does not "
            "measure. The step cost is reported to the generation owners."
        )
    same = section.get("greedy_text_identical_at_1_stream", {})
    if same:
        lines += [
            "",
            "Greedy texts identical to Longhaul's at 1 stream: "
            + ", ".join(f"{k}: {v}" for k, v in same.items())
            + " (identical greedy text shows both sides run the same weights; reduced precision "
            "may diverge after a few tokens).",
        ]
    return [*lines, ""]


def _engine_rows(section: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """Throughput, context and interference lines shared by the markdown and the terminal."""
    tput = [r for r in section["throughput"] if "skipped" not in r]
    single = tput[0]["tokens_per_s"] if tput else float("nan")
    throughput = [
        f"| {r['streams']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / single:.1f}× | "
        f"{_ms(r['itl_p50_s'])} | {_ms(r['itl_p99_s'])} |"
        for r in tput
    ]
    ctx = [r for r in section["context"] if "skipped" not in r]
    base = ctx[0]["itl_p50_s"] if ctx else float("nan")
    context = [
        f"| {r['context']:,} | {_ms(r['ttft_s'])} | {_ms(r['itl_p50_s'])} | "
        f"{_ms(r['itl_p99_s'])} | {r['itl_p50_s'] / base:.2f} |"
        for r in ctx
    ]
    interference = [
        f"| {r['long_prompt_tokens']:,} | {r['prefill']} ({r['prefill_chunk_tokens']}) | "
        f"{r['long_prompt_ttft_s']:.2f} | {_ms(r['itl_before_p50_s'])} / "
        f"{_ms(r['itl_before_p99_s'])} | {_ms(r['itl_during_p50_s'])} / "
        f"{_ms(r['itl_during_p99_s'])} | {_ms(r['itl_during_max_s'])} |"
        for r in section["interference"]
    ]
    return throughput, context, interference


def _engine_md(section: dict[str, Any], images: list[str], img_rel: str) -> list[str]:
    model = section["model"]
    cfg = model["config"]
    throughput, context, interference = _engine_rows(section)
    lines = [
        "## 5. Generation engine",
        "",
        f"The ALiBi demo model (`{section['checkpoint']}`: d {cfg['d_model']}, "
        f"{cfg['n_layers']} layers, {cfg['n_heads']} heads, trained on "
        f"{cfg['trained_context']}-token windows) exported as {model['format']} "
        f"{model['precision']} ({section['parity']}), driven in process by "
        "`python -m benchmarks.generation` (the engine behind `/v1/generate`, no HTTP), "
        f"{section['settings']['intra_op_threads']} intra-op thread(s). Random-token prompts, "
        "greedy decoding; ITL is measured where the asyncio consumer receives each token. "
        f"The store verified max_context {model['verified_max_context']:,} (held-out loss "
        f"within 5% of the trained length); this run lifts it to {model['max_context']:,} in "
        "memory, since it measures time, not quality (an ALiBi graph runs at any length).",
        "",
        "| streams | tokens/s | × 1 stream | ITL p50 ms | ITL p99 ms |",
        "|---|---|---|---|---|",
        *throughput,
        "",
        "One stream at a given context (prompt of that many tokens, then "
        f"{section['plan']['context_new']} new tokens):",
        "",
        "| context | TTFT ms | ITL p50 ms | ITL p99 ms | ITL p50 / first row |",
        "|---|---|---|---|---|",
        *context,
        "",
        f"{section['plan']['streams']} streams decoding while one long prompt arrives "
        "(chunk = `LONGHAUL_PREFILL_CHUNK_TOKENS`; one piece = the whole prompt in one step):",
        "",
        "| long prompt | prefill (chunk) | its TTFT s | streams' ITL p50 / p99 ms before | "
        "during | max during |",
        "|---|---|---|---|---|---|",
        *interference,
        "",
        *_engine_findings(section),
    ]
    return [*lines, ""]


def _engine_findings(section: dict[str, Any]) -> list[str]:
    """Why the ratios are what they are: a decode step reads the weights and every cached key
    and value once, so its time follows (weight bytes + cache bytes) once overheads are small."""
    cfg = section["model"]["config"]
    d, layers, vocab = cfg["d_model"], cfg["n_layers"], cfg["vocab_size"]
    # Attention and feed-forward matrices plus the embedding and LM head, fp32.
    weights = 4 * (layers * (4 * d * d + 2 * d * cfg["d_ff"]) + 2 * vocab * d)
    per_token = layers * 2 * d * 4  # keys and values of every layer, fp32
    lines = ["What this run shows:", ""]
    ctx = {r["context"]: r for r in section["context"] if "skipped" not in r}
    if 4096 in ctx and min(ctx) in ctx:
        ratio = ctx[4096]["itl_p50_s"] / ctx[min(ctx)]["itl_p50_s"]
        lines.append(
            f"- ITL at 4,096 vs {min(ctx):,} tokens: {ratio:.2f}x. "
            f"A step reads the weights (~{weights / 1e6:.1f} MB) and the stream's cache "
            f"({per_token:,} B per token: {4096 * per_token / 1e6:.1f} MB at 4,096 tokens, "
            f"{4096 * per_token / weights:.1f}x the weights), so for a model this narrow the "
            "cache, not the weights, sets the step time at long context; a ratio near 1 needs "
            "weights that dwarf the cache (wide models), which the demo model is not."
        )
    tput = [r for r in section["throughput"] if "skipped" not in r]
    if len(tput) > 1:
        last = tput[-1]
        tokens = section["plan"]["throughput_prompt"] + section["plan"]["throughput_new"]
        lines.append(
            f"- {last['streams']} streams: {last['tokens_per_s'] / tput[0]['tokens_per_s']:.1f}x "
            f"one stream's tokens/s. Their caches at up to {tokens} tokens each "
            f"({last['streams'] * tokens * per_token / 1e6:.1f} MB) outweigh the weights too, and "
            "the wall time includes their prefills."
        )
    longest = max(r["long_prompt_tokens"] for r in section["interference"])
    rows = {r["prefill"]: r for r in section["interference"] if r["long_prompt_tokens"] == longest}
    bounded, unbounded = rows.get("chunked"), rows.get("chunked, no pair budget")
    if bounded and unbounded:
        lines.append(
            f"- A {bounded['long_prompt_tokens']:,}-token prompt: with chunks bounded in "
            f"attention pairs (`LONGHAUL_PREFILL_CHUNK_PAIRS`) the running streams' ITL p99 "
            f"during its prefill is {_ms(bounded['itl_during_p99_s'])} ms against "
            f"{_ms(unbounded['itl_during_p99_s'])} ms with 512-token chunks whatever the past; "
            f"its own TTFT is {bounded['long_prompt_ttft_s']:.1f} s against "
            f"{unbounded['long_prompt_ttft_s']:.1f} s."
        )
    return lines


def write_report(results: Path, out: Path, img_dir: Path) -> None:
    data = read_json(results)
    img_dir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    img_rel = os.path.relpath(img_dir, out.parent)
    try:
        source = results.resolve().relative_to(ROOT)
    except ValueError:
        source = results
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python -m benchmarks.report` from `{source}` — do not edit by hand; "
        "rerun `make bench` (its sections below took "
        f"{_section_minutes(data):.0f} minutes on 2 shared cores; `python -m benchmarks "
        "--quick` is a few-minute smoke run that writes only to `benchmarks/results/scratch/`).",
        "",
        "Every comparison is made in one run on one machine, peer and Longhaul back to back, "
        "so the ratios hold on a noisy machine even when absolute numbers drift. Raw samples "
        "are in the JSON. These are figures, not assertions: no test checks them.",
        "",
        *_machine(data),
    ]
    sections = data["sections"]
    writers = {
        "scaling": (plot_scaling, _scaling_md),
        "backends": (plot_backends, _backends_md),
        "serving": (plot_serving, _serving_md),
        "generation": (plot_generation, _generation_md),
        "engine": (lambda section, img_dir: [], _engine_md),
        "step": (lambda section, img_dir: [], _step_md),
        "prefix": (lambda section, img_dir: [], _prefix_md),
        "overload": (lambda section, img_dir: [], _overload_md),
        "scoring": (lambda section, img_dir: [], _scoring_md),
    }
    for key, (plot, md) in writers.items():
        if key not in sections:
            continue
        section = sections[key]
        if section.get("error"):
            title = key.capitalize()
            lines += [
                f"## {title}",
                "",
                f"This section failed in this run: `{section['error']}`.",
                "",
            ]
            continue
        images = [] if section.get("skipped") else plot(section, img_dir)
        lines += md(section, images, img_rel)
    reformer_long = results.parent / "reformer_long.json"  # its own run, not a make bench section
    if reformer_long.is_file():
        lines += _reformer_long_md(read_json(reformer_long))
    out.write_text("\n".join(lines).rstrip() + "\n")


# ----------------------------------------------------------------------------- 10. Reformer 16K/64K


def _reformer_long_md(data: dict[str, Any]) -> list[str]:
    m = data["machine"]
    build = data.get("build", {})
    built = ", ".join(
        f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s" for k, v in build.items()
    )
    lines = [
        "## 10. HF's crime-and-punishment Reformer at 16K and 64K tokens",
        "",
        "google/reformer-crime-and-punishment's configuration (`ReformerModelWithLMHead`, random "
        "weights at a trained scale, a 320-piece sentencepiece vocabulary), imported with default "
        f"options, exported in fp32 at max_context {data['max_context']:,} as the LM and as "
        "`--task encode`, served by `python -m service` (`python -m benchmarks.reformer_long`, "
        f"its own run: {m['cores']} cores, load average {m['load_average_at_start']} at start, "
        f"{data.get('load_average_at_end', '–')} at end; {built or 'store given'}). TTFT is the "
        "first token's event of a streamed `/v1/completions`; decode tokens/s the rest of its "
        f"{data['rows'][0].get('completion_tokens', 4) if data['rows'] else 4} tokens; peak RSS "
        "the server's VmHWM after the request.",
        "",
        "| prompt tokens | TTFT s | decode tokens/s | s per new token | /v1/encode s | "
        "peak RSS MiB (completion / encode) |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if r.get("skipped"):
            lines.append(f"| {r['target_tokens']:,} | not served: {r['skipped']} | | | | |")
            continue
        per_token = 1 / r["decode_tokens_per_s"] if r["decode_tokens_per_s"] else float("nan")
        lines.append(
            f"| {r['prompt_tokens']:,} | {r['ttft_s']:.1f} | {r['decode_tokens_per_s']:.3f} | "
            f"{per_token:.1f} | {r['encode_s']:.1f} | {r['peak_rss_mib_after_completion']:,} / "
            f"{r['peak_rss_mib_after_encode']:,} (idle {r['idle_rss_mib']:,}) |"
        )
    if any(r.get("skipped") for r in data["rows"]):
        lines += [
            "",
            f"Nothing past {data['max_context']:,} tokens is served: a version is published at "
            "the length its parity sweep passed, and this model's sweep fails past 16K on ties "
            "in its LSH hashing at float32 rounding, not on memory or a service limit "
            '(docs/decisions.md, "Served length bounded by memory").',
        ]
    steps = data.get("graph_steps", [])
    if steps:
        lines += [
            "",
            "The imported Reformer has no kv-cache graph (HF's chunking lets a later token move an "
            "earlier one's chunk), so each new token is a forward of the whole sequence. That "
            "forward, timed on the exported LM graph itself (ONNX Runtime, batch 1, warm, a child "
            "process per length):",
            "",
            "| length | forward s (cold, warm) | = seconds per new token | peak RSS MiB |",
            "|---|---|---|---|",
        ]
        for st in steps:
            cold, warm = st["forward_s"][0], st["forward_s"][-1]
            lines.append(
                f"| {st['length']:,} | {cold:.1f}, {warm:.1f} | {warm:.1f} | "
                f"{st['peak_rss_mib']:,} |"
            )
        longest = max(steps, key=lambda st: st["length"])
        warm = longest["forward_s"][-1]
        lines += [
            "",
            f"At {longest['length']:,} tokens a completion costs one such forward per token: "
            f"{1 / warm:.3f} tokens/s, 100 new tokens about {100 * warm / 60:.0f} minutes on "
            "these cores.",
        ]
        forward = {st["length"]: st["forward_s"][-1] for st in steps}
        for r in data["rows"]:
            if not r.get("skipped") and r["target_tokens"] in forward:
                lines[-1] += (
                    f" Served at {r['target_tokens']:,}, TTFT was "
                    f"{r['ttft_s'] / forward[r['target_tokens']]:.1f}x one forward of the graph "
                    "(it also tokenises the prompt; the two were measured minutes apart, under "
                    "different load) and a decode step "
                    f"{1 / r['decode_tokens_per_s'] / forward[r['target_tokens']]:.2f}x."
                )
    return [*lines, ""]


# ----------------------------------------------------------------------------- scoring


def _scoring_md(section: dict[str, Any], images: list[str], img_rel: str) -> list[str]:
    if section.get("skipped"):
        return ["## 9. Scoring throughput", "", f"Skipped: {section['skipped']}.", ""]
    plan = section["plan"]
    lines = [
        "## 9. Scoring throughput (echo + max_tokens 0)",
        "",
        f"{plan['texts']} texts of {plan['length']:,} tokens (the standard library's sources) "
        f"scored on `{section['model']}` (manifest max_context {section['manifest_max_context']:,}"
        f", lifted in memory), `logprobs: 1`, prefill chunks of {section['prefill_chunk_tokens']}"
        f" tokens, {section['threads']} threads, median of {plan['repeats']} interleaved rounds "
        "(`python -m benchmarks --sections scoring`, benchmarks/scoring.py), prefix caching off "
        "(scored prompts bypass it; the unscored ones would find each other cached). Prefill "
        "only = the same prompts with no scores; http = `POST /v1/completions` through the app, "
        "JSON included.",
        "",
        "| row | seconds | tokens/s | vs prefill only |",
        "|---|---|---|---|",
    ]
    for r in section["rows"]:
        lines.append(
            f"| {r['row']} | {r['median_s']:.2f} | {r['tokens_per_s']:,.0f} | "
            f"{r['vs_prefill_only']:.2f}x |"
        )
    return [*lines, ""]


# ----------------------------------------------------------------------------- 7. prefix caching


def _prefix_md(section: dict[str, Any], images: list[str], img_rel: str) -> list[str]:
    from benchmarks.prefix_cache import markdown  # the engine imports only when reported

    return markdown(section, images, img_rel)


# ----------------------------------------------------------------------------- 8. overload


def _overload_rows(section: dict[str, Any]) -> list[str]:
    rows = []
    for engine, r in section["engines"].items():
        other = sum(v for k, v in r["statuses"].items() if k not in ("200", "429"))
        rows.append(
            f"| {engine} | {r['sent']} | {r['admitted']} | {r['rejected']} "
            f"({r['rejected_without_retry_after']} without Retry-After; server counted "
            f"{r['server_rejected']:.0f}) | {other} | {_ms(r['solo_p99_s'])} | "
            f"{_ms(r['admitted_p50_s'])} | {_ms(r['admitted_p99_s'])} | {_ms(r['p99_bound_s'])} | "
            f"{r['rss_first_mib']:.0f} → {r['rss_last_mib']:.0f} (max {r['rss_max_mib']:.0f}) |"
        )
    return rows


def _overload_md(section: dict[str, Any], images: list[str], img_rel: str) -> list[str]:
    p = section["plan"]
    return [
        "## 8. Overload: each engine past its queue limit",
        "",
        f"A real `python -m service` on loopback with queue limits of {p['queue_limit']} "
        f"(`LONGHAUL_MAX_QUEUE_REQUESTS`, `LONGHAUL_MAX_WAITING_SEQUENCES`) and "
        f"{p['slots']} slots (`LONGHAUL_MAX_BATCH_SIZE`, `LONGHAUL_MAX_NUM_SEQS`), tiny models; "
        f"{p['clients']} closed-loop clients per engine for {p['seconds']:g} s, each waiting "
        f"{p['retry_pause_s']:g} s after a 429 (benchmarks/overload.py). The p99 bound is "
        f"{p['slack']:g} × (queue limit / slots + 1) × solo p99 + {p['floor_s']:g} s; RSS is "
        "the server's, first and last sample of the run.",
        "",
        "| engine | sent | 200 | 429 | other | solo p99 | admitted p50 | p99 | p99 bound | "
        "RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *_overload_rows(section),
        "",
    ]


# ----------------------------------------------------------------------------- 6. decode step


def _step_precision_rows(section: dict[str, Any]) -> list[str]:
    rows = []
    for precision, r in section["bloom"].items():
        for b, floor in r["floor"].items():
            graph = r["graph_step_s"][b]
            rows.append(
                f"| {precision} | {b} | {floor['weight_bytes'] / 1e6:.1f} | "
                f"{floor['kv_bytes'] / 1e6:.1f} | {_num(floor['memory_s'] * 1e3)} | "
                f"{_num(floor['compute_s'] * 1e3)} | {_num(floor['floor_s'] * 1e3)} | "
                f"{_num(graph * 1e3)} | {graph / floor['floor_s']:.1f}x |"
            )
    return rows


def _step_engine_rows(section: dict[str, Any]) -> list[str]:
    rows = []
    for precision, r in section["bloom"].items():
        floor = r["floor"]["16"]["floor_s"]
        variants = [(precision, r["engine"]["16"])]
        if "no_spinning" in r["engine"]:
            variants.append((f"{precision}, ORT threads sleep", r["engine"]["no_spinning"]["16"]))
        for label, e16 in variants:
            rows.append(
                f"| {label} | {_num(e16['step_p50_s'] * 1e3)} | "
                f"{_num(e16['graph_p50_s'] * 1e3)} | "
                f"{_num((e16['step_p50_s'] - e16['graph_p50_s']) * 1e3)} | "
                f"{e16['step_p50_s'] / floor:.1f}x |"
            )
    return rows


def _step_stream_rows(section: dict[str, Any]) -> list[str]:
    hf = section["hf"]["tokens_per_s"]
    runs = []
    for precision, r in section["bloom"].items():
        runs.append((f"bloom {precision}", r["engine"]))
        if "no_spinning" in r["engine"]:
            runs.append((f"bloom {precision}, ORT threads sleep", r["engine"]["no_spinning"]))
    if "demo" in section:
        runs.append(("alibi-demo fp32", section["demo"]))
    rows = []
    for label, e in runs:
        one, many = e["1"], e["16"]
        vs_hf = f"{many['tokens_per_s'] / hf:.2f}x" if label.startswith("bloom") else "–"
        rows.append(
            f"| {label} | {one['tokens_per_s']:,.0f} | {many['tokens_per_s']:,.0f} | "
            f"{many['tokens_per_s'] / one['tokens_per_s']:.1f}x | {vs_hf} | "
            f"{_ms(one['itl_p50_s'])} | {_ms(many['itl_p50_s'])} | "
            f"{many['itl_p50_s'] / one['itl_p50_s']:.1f}x |"
        )
    return rows


def _step_md(section: dict[str, Any], images: list[str], img_rel: str) -> list[str]:
    plan, size = section["plan"], section["size"]
    bw, peaks = section["bandwidth_bytes_per_s"], section["gemm_flops_per_s"]
    lines = [
        "## 6. Decode step: roofline and where the time goes",
        "",
        f"The BLOOM-config model of section 4 (random `BloomForCausalLM`, d {size['d_model']}, "
        f"{size['n_layers']} layers, {size['n_heads']} heads, imported with `python -m exporters "
        "import hf-bloom`), exported ONNX per precision, measured by `python -m benchmarks "
        "--sections step` (benchmarks/decode_step.py). Peaks measured in the same run: read "
        f"bandwidth {bw / 1e9:.1f} GB/s (a reduction over 256 MB), GEMM {peaks['fp32'] / 1e9:.0f}"
        f" GFLOP/s fp32 (ONNX Runtime `MatMul`) and {peaks['int8'] / 1e9:.0f} GFLOP/s int8 "
        "(`DynamicQuantizeMatMul`), 1024³. The floor of a step of b rows over a past of "
        f"{plan['past']} tokens is the larger of (weights + b × that past's fp32 keys and values) "
        "/ bandwidth and (weight-product FLOPs / the weights' GEMM peak + attention FLOPs / the "
        "fp32 peak). Graph = `backend.run` on exactly the decode step's inputs, median of "
        f"{plan['graph_repeats']}, row counts interleaved.",
        "",
        "| precision | rows | weights MB | KV MB | memory floor ms | compute floor ms | floor ms "
        "| graph ms | graph / floor |",
        "|---|---|---|---|---|---|---|---|---|",
        *_step_precision_rows(section),
        "",
        f"In the engine: 16 streams of {plan['prompt']}-token prompts, {plan['new']} greedy tokens "
        "each, in process; a step = the wall time between consecutive 16-row decode calls "
        "(p50), the graph = the backend call inside it:",
        "",
        "| precision | 16-row step ms | graph ms | engine ms | step / floor |",
        "|---|---|---|---|---|",
        *_step_engine_rows(section),
        "",
    ]
    for precision, r in section["bloom"].items():
        prof = r["ort_profile_16"]
        total = sum(op["us_per_step"] for op in prof["ops"]) or 1.0
        lines += [
            f"ONNX Runtime's profiler, {precision}, 16 rows (operators over "
            f"{prof['model_run_us'] / 1e3:.2f} ms per run):",
            "",
            "| operator | nodes | ms per step | share |",
            "|---|---|---|---|",
            *[
                f"| `{op['op']}` | {op['nodes']} | {op['us_per_step'] / 1e3:.3f} | "
                f"{op['us_per_step'] / total:.0%} |"
                for op in prof["ops"][:8]
            ],
            "",
        ]
    first = next(iter(section["bloom"]))
    profile = section["bloom"][first]["engine"]["16"].get("engine_profile", [])
    if profile:
        lines += [
            f"The engine's worker thread under cProfile ({first}, 16 streams; cumulative ms per "
            "16-row decode step, graph included in `Clock.run`):",
            "",
            "| function | calls | cumulative ms / step | own ms / step |",
            "|---|---|---|---|",
            *[
                f"| `{row['function']}` | {row['calls']} | {row['cum_ms_per_step']:.3f} | "
                f"{row['own_ms_per_step']:.3f} |"
                for row in profile[:12]
            ],
            "",
        ]
    lines += [
        f"Streams (in process; 1 stream = {plan['single_requests']} request(s) one after "
        f"another; transformers `generate()` {section['hf']['dtype']}, one static batch of 16 on "
        f"the same weights: {section['hf']['tokens_per_s']:,.0f} tok/s):",
        "",
        "| model | 1 stream tok/s | 16 streams tok/s | 16 / 1 | 16 streams / HF | ITL p50 ms 1 "
        "| ITL p50 ms 16 | ITL 16 / 1 |",
        "|---|---|---|---|---|---|---|---|",
        *_step_stream_rows(section),
        "",
    ]
    if "demo" in section:
        ctx = section["demo"]["contexts"]
        first_ctx = next(iter(ctx))
        lines += [
            f"alibi-demo, one stream, {plan['demo_new']} tokens after a prompt of the context:",
            "",
            "| context | ITL p50 ms | step p50 ms | graph p50 ms | ITL / first |",
            "|---|---|---|---|---|",
            *[
                f"| {int(c):,} | {_ms(v['itl_p50_s'])} | {_ms(v['step_p50_s'])} | "
                f"{_ms(v['graph_p50_s'])} | {v['itl_p50_s'] / ctx[first_ctx]['itl_p50_s']:.2f}x |"
                for c, v in ctx.items()
            ],
            "",
        ]
    return lines + _step_findings(section)


def _step_findings(section: dict[str, Any]) -> list[str]:
    """What the roofline says about the stream goals: the floor's own 16-row/1-row ratio caps
    the tokens/s ratio a perfect engine could reach, before any measurement."""
    out = ["What this run shows:", ""]
    for precision, data in section.get("bloom", {}).items():
        floor = data.get("floor", {})
        if "1" not in floor or "16" not in floor:
            continue
        f1, f16 = floor["1"], floor["16"]
        cap = 16 * f1["floor_s"] / f16["floor_s"]
        bound = "memory" if f16["memory_s"] >= f16["compute_s"] else "compute"
        engine = data.get("engine", {}).get("16", {})
        step, graph = engine.get("step_p50_s"), engine.get("graph_p50_s")
        line = (
            f"- {precision}: a 16-row step's floor is {f16['floor_s'] / f1['floor_s']:.1f}× a "
            f"1-row step's ({bound}-bound at 16 rows, which read {f16['kv_bytes'] / 1e6:.0f} MB "
            f"of fp32 keys and values and {f16['weight_bytes'] / 1e6:.0f} MB of weights), so at "
            f"the roofline 16 streams give at most {cap:.1f}× the tokens/s of one stream."
        )
        if step and graph:
            line += (
                f" Measured, the engine adds {(step - graph) * 1e3:.1f} ms "
                f"({(step - graph) / step:.0%}) to the {graph * 1e3:.1f} ms graph of a 16-row step."
            )
        out.append(line)
    out.append("")
    return out


# ----------------------------------------------------------------------------- terminal


def summary_table(data: dict[str, Any]) -> str:
    """The few numbers worth a glance, as plain text (printed at the end of ``make bench``)."""
    out = [
        f"{data['name']} ({data['mode']}), load average at start "
        f"{data['machine']['load_average_at_start']}"
    ]
    s = {k: v for k, v in data["sections"].items() if not v.get("error")}
    for key, section in data["sections"].items():
        if section.get("error"):
            out.append(f"\n{key}: FAILED ({section['error']})")
    if "scaling" in s:
        out.append("\nscaling (fp32 eager, batch 1): longest length measured, time slope")
        for arch, series in s["scaling"]["series"].items():
            pts = series["points"]
            last = pts[-1] if pts else None
            where = (
                (
                    f"{_fmt_len(last['length'])} in {last['median_s']:.2f} s, "
                    f"{last['peak_rss_bytes'] / GIB:.2f} GiB"
                )
                if last
                else "nothing measured"
            )
            out.append(
                f"  {arch:<10} {where:<34} slope {_num(series['time_slope'])}"
                f" (longest 3: {_num(series['time_slope_longest3'])})"
            )
    if "backends" in s:
        b = s["backends"]
        out.append(
            f"\nbackends (batch {b['plan']['batch']} x {b['plan']['length']}): tokens/s "
            "(min logits cosine)"
        )
        for arch, a in b["archs"].items():
            cells = "  ".join(
                f"{p} {r['tokens_per_s']:,.0f} ({r['logits_cosine_min']:.4f})"
                for p, r in a["paths"].items()
            )
            out.append(f"  {arch:<10} {cells}")
        out.append(f"  CPU default: {b['choice'].get('path')}")
    if "serving" in s:
        out.append("\nserving /v1/encode: req/s (p99 ms) by concurrency")
        serving = s["serving"]
        for label, rows in {**serving["servers"], **serving.get("two_models", {})}.items():
            cells = "  ".join(
                f"c{r['concurrency']} {r['requests_per_s']:.1f} ({_ms(r['p99_s'])})" for r in rows
            )
            out.append(f"  {label:<44} {cells}")
    if "generation" in s:
        g = s["generation"]
        if g.get("skipped"):
            out.append(f"\ngeneration: skipped ({g['skipped']})")
        else:
            out.append("\ngeneration: tokens/s, TTFT p50 ms by streams")
            for label, rows in g["levels"].items():
                cells = "  ".join(
                    f"{r['streams']}x {r['tokens_per_s']:.1f} tok/s TTFT {_ms(r['ttft_p50_s'])}"
                    for r in rows
                )
                out.append(f"  {label:<34} {cells}")
    if "overload" in s:
        out.append(
            "\noverload: | engine | sent | 200 | 429 | other | solo p99 | p50 | p99 | bound | RSS |"
        )
        out += [f"  {row}" for row in _overload_rows(s["overload"])]
    if "engine" in s:
        throughput, context, interference = _engine_rows(s["engine"])
        out.append("\nengine: | streams | tok/s | × 1 | ITL p50 | p99 |")
        out += [f"  {row}" for row in throughput]
        out.append("engine: | context | TTFT ms | ITL p50 | p99 | ratio |")
        out += [f"  {row}" for row in context]
        out.append("engine: | long prompt | prefill | TTFT s | ITL before | during | max |")
        out += [f"  {row}" for row in interference]
    if "prefix" in s and not s["prefix"].get("error"):
        f, o = s["prefix"]["follow_ups"], s["prefix"]["overhead"]
        out.append(
            f"\nprefix: {f['document_tokens']}-token document, TTFT first "
            f"{_ms(f['first_ttft_s'])} ms, follow-ups median {_ms(f['follow_up_ttft_median_s'])} "
            f"ms ({f['speedup_median']:.0f}x lower); nothing shared: tok/s on/off "
            f"{o['ratio_median']:.3f}"
        )
        for row in s["prefix"]["shared"]:
            out.append(f"  {row['run']:<28} {row['tokens_per_s']:.1f} tok/s")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("results", type=Path, nargs="?", help="default: the latest full run")
    parser.add_argument("--out", type=Path, default=None, help="default: docs/benchmarks.md")
    parser.add_argument("--img-dir", type=Path, default=None, help="default: docs/img")
    parser.add_argument(
        "--quick", action="store_true", help="report the quick run, into benchmarks/results/scratch"
    )
    args = parser.parse_args(argv)
    # Quick (smoke) results never reach docs/: their report goes beside them, gitignored.
    name = f"cpu-{os.cpu_count()}core"
    if args.quick:
        args.results = args.results or SCRATCH / f"{name}-quick.json"
        args.out = args.out or SCRATCH / "benchmarks.md"
        args.img_dir = args.img_dir or SCRATCH / "img"
    args.results = args.results or RESULTS / f"{name}.json"
    args.out = args.out or ROOT / "docs" / "benchmarks.md"
    args.img_dir = args.img_dir or ROOT / "docs" / "img"
    if not args.results.is_file():
        parser.error(f"{args.results} does not exist; run `python -m benchmarks` first")
    write_report(args.results, args.out, args.img_dir)
    print(summary_table(read_json(args.results)))
    print(f"\nwrote {args.out} and plots in {args.img_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
