"""The GPU check's judgments: one model's outputs on the GPU against the same file on the CPU,
what ``/v1/models`` says each model runs on, and the summary table.

Numbers are judged by the exporter's own parity rule (``exporters.parity``: its fp32 rule, its
cosine floor for reduced precision), never by a tolerance of this module's own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from exporters import parity
from model_store import Manifest
from service.backends import Backend

GPU_PROVIDERS = ("CUDAExecutionProvider", "torch-cuda")


# ----------------------------------------------------------------------------- numerics


def case_inputs(manifest: Manifest, length: int, seed: int) -> dict[str, np.ndarray]:
    """One unpadded row of ``length`` random ordinary tokens; kv-cache graphs get an empty past
    (a prefill: the graph returns the whole prompt's cache entries, which are compared too)."""
    gen = np.random.default_rng(seed)
    vocab = int(manifest.config["vocab_size"])
    ids = gen.integers(4, vocab, size=(1, length), dtype=np.int64)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    cache = manifest.signature.cache
    if cache is not None:
        dtype = np.dtype(cache.dtype)  # bfloat16 has no numpy dtype: TypeError, caller skips
        empty = np.zeros((1, cache.n_heads, 0, cache.head_dim), dtype=dtype)
        inputs.update({name: empty for name in cache.inputs})
    return inputs


def lengths_for(manifest: Manifest, wanted: tuple[int, ...] = (8, 128, 1024, 4096)) -> list[int]:
    """The wanted lengths the model accepts; its max_context when that is shorter than all."""
    fits = [n for n in wanted if n <= manifest.max_context]
    return fits or [manifest.max_context]


@dataclass
class Comparison:
    model: str
    precision: str
    gpu_provider: str
    cpu_provider: str
    passed: bool
    summary: str
    cases: list[dict[str, Any]] = field(default_factory=list)


def _cosine_and_argmax(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    """Mean cosine of each position's vector and argmax agreement, over (b, t, v) arrays."""
    r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    o = out.reshape(-1, out.shape[-1]).astype(np.float64)
    cos = (r * o).sum(-1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(o, axis=-1) + 1e-12)
    return float(cos.mean()), float((r.argmax(-1) == o.argmax(-1)).mean())


def judge(
    precision: str, cases: list[tuple[str, int, dict[str, np.ndarray], dict[str, np.ndarray]]]
) -> tuple[bool, str, list[parity.CaseResult]]:
    """``cases``: (name, length, reference outputs, outputs) with every position real. The
    verdict and its one-line summary are the exporter's (``parity.Report``)."""
    lengths = [c[1] for c in cases]
    report = parity.Report("CPU", precision, lengths, rule=parity.FP32_RULE)
    for name, length, ref, out in cases:
        diffs: dict[str, parity.OutputDiff] = {}
        for key, expected in ref.items():
            got = out[key]
            if got.shape != expected.shape:
                raise ValueError(
                    f"{name}: {key} is {got.shape} on the GPU, {expected.shape} on CPU"
                )
            expected64 = expected.astype(np.float64)
            diff = np.abs(expected64 - got.astype(np.float64))
            diffs[key] = parity.OutputDiff(
                float(diff.max()) if diff.size else 0.0,
                float(np.abs(expected64).max()) if diff.size else 0.0,
            )
        cosine, agree = _cosine_and_argmax(ref["logits"], out["logits"])
        report.cases.append(parity.CaseResult(1, length, name, diffs, cosine, agree))
    return report.passed, report.summary(), report.cases


def compare_backends(
    name: str, manifest: Manifest, gpu: Backend, cpu: Backend, lengths: list[int]
) -> Comparison:
    """The same inputs through both backends at each length, judged by the parity rule."""
    cases = []
    for i, length in enumerate(lengths):
        inputs = case_inputs(manifest, length, seed=i)
        cases.append((f"L{length}", length, cpu.run(inputs), gpu.run(inputs)))
    passed, summary, results = judge(manifest.precision, cases)
    return Comparison(
        name, manifest.precision, gpu.provider, cpu.provider, passed, summary,
        [asdict(r) for r in results],
    )  # fmt: skip


# ----------------------------------------------------------------------------- providers


@dataclass
class ProviderCheck:
    model: str
    format: str
    provider: str
    fallback: str | None
    on_gpu: bool
    ok: bool
    note: str


def check_provider(card: dict[str, Any], cuda_ep_offered: bool, torch_cuda: bool) -> ProviderCheck:
    """Is the model where this machine's runtimes say it can be? ``card`` is one entry of
    ``/v1/models``. Running on the CPU is right when the runtime offers no GPU (the card must
    then say why); running on the CPU although the runtime offers one is a failure."""
    provider, fallback, fmt = card["provider"], card.get("fallback"), card["format"]
    on_gpu = provider in GPU_PROVIDERS
    gpu_possible = cuda_ep_offered if fmt == "onnx" else torch_cuda
    if on_gpu:
        ok, note = fallback is None, "on the GPU" if fallback is None else "GPU, yet a fallback"
    elif gpu_possible:
        ok, note = False, f"on {provider} although the runtime offers a GPU: {fallback}"
    else:
        ok = bool(fallback)
        note = f"on {provider} as expected: {fallback}" if ok else "on CPU, no reason given"
    return ProviderCheck(card["id"], fmt, provider, fallback, on_gpu, ok, note)


# ----------------------------------------------------------------------------- summary


COLUMNS = (
    ("model", "model", 22),
    ("format", "fmt", 12),
    ("precision", "prec", 5),
    ("provider", "provider", 21),
    ("parity", "GPU vs CPU", 30),
    ("encode_1", "enc tok/s c1", 13),
    ("encode_64", "enc tok/s c64", 14),
    ("generate_1", "gen tok/s s1", 13),
    ("generate_16", "gen tok/s s16", 14),
)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of the summary rows; missing values print as ``-``."""
    lines = ["".join(f"{title:<{width}}" for _, title, width in COLUMNS)]
    for row in rows:
        cells = []
        for key, _, width in COLUMNS:
            text = _cell(row.get(key))
            cells.append(f"{text[: width - 1]:<{width}}")
        lines.append("".join(cells).rstrip())
    return "\n".join(lines)


def parity_cell(comparison: Comparison | None, reason: str | None) -> str:
    """``PASS 3.1e-06`` / ``PASS cos 0.99998`` / ``FAIL ...`` / why nothing was compared."""
    if comparison is None:
        return f"not compared: {reason}" if reason else "-"
    verdict = "PASS" if comparison.passed else "FAIL"
    if comparison.precision == "fp32":
        worst = max(o["max_abs_diff"] for c in comparison.cases for o in c["outputs"].values())
        return f"{verdict} max|d| {worst:.1e}"
    worst_cos = min(c["cosine"] for c in comparison.cases)
    return f"{verdict} cos {worst_cos:.5f}"
