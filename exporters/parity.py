"""Exported-vs-eager parity: the same inputs through both, compared at a stated tolerance.

fp32 exports must match within ``FP32_TOLERANCE`` (max |diff| over logits, hidden states and the
new cache entries returned, at real-token positions). Reduced-precision exports are compared
with the fp32 eager model by cosine similarity of each position's logits and by argmax
agreement, and are refused below ``MIN_COSINE``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from exporters.graphs import GraphSpec
from exporters.runtime import Runner
from model_store import past_inputs

FP32_TOLERANCE = 1e-4
MIN_COSINE = 0.99


class ParityError(RuntimeError):
    """The exported graph does not reproduce the eager model; nothing was published."""

    def __init__(self, report: Report, message: str) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Case:
    """One comparison: ``lengths`` holds each row's real length (padding makes them differ)."""

    name: str
    inputs: dict[str, np.ndarray]
    new_token_mask: np.ndarray  # (b, t) 1 where the output row is a real token
    cache_mask: np.ndarray | None = None  # (b, t) 1 where a returned new cache entry is real


@dataclass
class CaseResult:
    batch: int
    length: int
    name: str
    max_abs_diff: float
    cosine: float
    argmax_agreement: float


@dataclass
class Report:
    reference: str
    precision: str
    lengths: list[int]
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max(c.max_abs_diff for c in self.cases)

    @property
    def min_cosine(self) -> float:
        return min(c.cosine for c in self.cases)

    @property
    def argmax_agreement(self) -> float:
        return min(c.argmax_agreement for c in self.cases)

    @property
    def tolerance(self) -> float | None:
        return FP32_TOLERANCE if self.precision == "fp32" else None

    @property
    def passed(self) -> bool:
        if self.precision == "fp32":
            return self.max_abs_diff <= FP32_TOLERANCE
        return self.min_cosine >= MIN_COSINE

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        if self.precision == "fp32":
            bar = f"max|diff| {self.max_abs_diff:.2e} (tolerance {FP32_TOLERANCE:.0e})"
        else:
            bar = (
                f"min cosine {self.min_cosine:.5f} (floor {MIN_COSINE}), "
                f"argmax {self.argmax_agreement:.4f}"
            )
        return f"parity {verdict}: {bar} over {len(self.cases)} cases at lengths {self.lengths}"


def _ids(gen: np.random.Generator, vocab: int, batch: int, length: int) -> np.ndarray:
    # Ids from 4 up: ordinary tokens, none of the specials.
    return gen.integers(4, vocab, size=(batch, length), dtype=np.int64)


def _padded_mask(lengths: list[int], total: int, left: bool) -> np.ndarray:
    mask = np.zeros((len(lengths), total), dtype=np.int64)
    for row, n in enumerate(lengths):
        if left:
            mask[row, total - n :] = 1
        else:
            mask[row, :n] = 1
    return mask


def build_cases(spec: GraphSpec, config: object, lengths: list[int], seed: int = 0) -> list[Case]:
    """Batch-1 cases at every length plus a padded batch of two at the middle length.

    For kv-cache graphs every length is also followed by a one-token decode step on top of the
    cache the eager model produced, so both prefill (empty past: the graph returns the whole
    prompt's entries) and decode (one token's entries) are checked.
    """
    gen = np.random.default_rng(seed)
    vocab = config.vocab_size  # type: ignore[attr-defined]
    left = spec.mode != "encode"  # decoders pad on the left (docs/contracts.md)
    mid = lengths[len(lengths) // 2]
    shapes = [(f"b1xL{n}", [n]) for n in lengths] + [(f"b2xL{mid}-padded", [mid, max(1, mid // 2)])]
    cases: list[Case] = []
    for name, row_lengths in shapes:
        total = max(row_lengths)
        ids = _ids(gen, vocab, len(row_lengths), total)
        mask = _padded_mask(row_lengths, total, left)
        if spec.mode != "kv_cache":
            cases.append(Case(name, {"input_ids": ids, "attention_mask": mask}, mask))
            continue
        layers, _, _, heads, _, head_dim = spec.outputs[1][2]
        empty = np.zeros((layers, 2, len(row_lengths), heads, 0, head_dim), dtype=np.float32)
        inputs = {
            "input_ids": ids,
            "attention_mask": mask,
            **past_inputs(empty, spec.input_names[2:]),
        }
        cases.append(Case(f"{name}-prefill", inputs, mask, mask))
        cases.append(Case(f"{name}-decode", dict(inputs), mask, mask))
    return cases


def _as_torch(inputs: dict[str, np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(v) for v in inputs.values()]


def _prepare_decode(
    reference: nn.Module, spec: GraphSpec, case: Case, vocab: int, gen: np.random.Generator
) -> Case:
    """Turn a '-decode' case into one new token on top of the eager model's prefill cache.

    The cache is laid out as the service's decode batch holds it (service/engine/kv_cache.py):
    each row's real tokens first, its padding slots after them, then the new token, so a
    padded row checks padding between the past and the new token, not only on the left.
    """
    with torch.no_grad():
        _, prefill = reference(*_as_torch(case.inputs))  # empty past: the whole prompt's entries
    cache = prefill.numpy()  # (L, 2, b, h, P, e)
    past = np.zeros_like(cache)
    prompt_mask = case.inputs["attention_mask"]
    past_mask = np.zeros_like(prompt_mask)
    for row, real in enumerate(prompt_mask.astype(bool)):
        n = int(real.sum())
        past[:, :, row, :, :n] = cache[:, :, row][:, :, :, real]  # (L, 2, h, n, e)
        past_mask[row, :n] = 1
    batch = case.inputs["input_ids"].shape[0]
    ids = _ids(gen, vocab, batch, 1)
    ones = np.ones((batch, 1), dtype=np.int64)
    mask = np.concatenate([past_mask, ones], axis=1)
    inputs = {"input_ids": ids, "attention_mask": mask, **past_inputs(past, spec.input_names[2:])}
    return Case(case.name, inputs, ones, ones)


def _compare(ref: np.ndarray, out: np.ndarray, mask: np.ndarray, axis_of_tokens: int) -> float:
    """Max |diff| over real positions; cache entries carry tokens on axis 4."""
    diff = np.abs(ref.astype(np.float64) - out.astype(np.float64))
    if axis_of_tokens == 1:  # (b, t, ...)
        keep = mask.astype(bool)
        return float(diff[keep].max()) if keep.any() else 0.0
    # (layers, 2, b, h, t, e): bring (b, t) to the front.
    moved = np.moveaxis(diff, (2, 4), (0, 1))
    return float(moved[mask.astype(bool)].max())


def _cosine_and_argmax(ref: np.ndarray, out: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    keep = mask.astype(bool)
    r = ref[keep].astype(np.float64)  # (n, v)
    o = out[keep].astype(np.float64)
    cos = (r * o).sum(-1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(o, axis=-1) + 1e-12)
    agree = (r.argmax(-1) == o.argmax(-1)).mean()
    return float(cos.mean()), float(agree)


def run_parity(
    reference: nn.Module,
    runner: Runner,
    spec: GraphSpec,
    config: object,
    lengths: list[int],
    precision: str,
    progress: bool = True,
) -> Report:
    """``reference`` is the fp32 eager graph module (same wrapper as exported)."""
    report = Report(
        reference=f"eager fp32 PyTorch {torch.__version__} vs {runner.provider}",
        precision=precision,
        lengths=lengths,
    )
    gen = np.random.default_rng(1)
    for case in tqdm(build_cases(spec, config, lengths), desc="parity", disable=not progress):
        if case.name.endswith("-decode"):
            case = _prepare_decode(reference, spec, case, config.vocab_size, gen)  # type: ignore[attr-defined]
        with torch.no_grad():
            expected = [t.numpy() for t in reference(*_as_torch(case.inputs))]
        got = runner.run(case.inputs)
        diffs = []
        for (name, _, _), ref in zip(spec.outputs, expected, strict=True):
            if ref.shape != got[name].shape:
                raise ParityError(
                    report,
                    f"{case.name}: {name} has shape {got[name].shape} in the exported graph, "
                    f"{ref.shape} in the eager model",
                )
            is_cache = name == "new_key_values"
            mask = case.cache_mask if is_cache else case.new_token_mask
            diffs.append(_compare(ref, got[name], mask, 4 if is_cache else 1))
        cosine, agree = _cosine_and_argmax(expected[0], got["logits"], case.new_token_mask)
        batch = case.inputs["input_ids"].shape[0]
        report.cases.append(
            CaseResult(
                batch,
                int(case.inputs["attention_mask"].shape[1]),
                case.name,
                max(diffs),
                cosine,
                agree,
            )
        )
    return report


def format_report(report: Report) -> str:
    """The parity table the CLI prints, one line per case, then the verdict."""
    lines = [f"{'case':<28}{'batch':>6}{'len':>7}{'max|diff|':>12}{'cosine':>10}{'argmax':>8}"]
    for c in report.cases:
        lines.append(
            f"{c.name:<28}{c.batch:>6}{c.length:>7}{c.max_abs_diff:>12.2e}"
            f"{c.cosine:>10.6f}{c.argmax_agreement:>8.4f}"
        )
    lines.append(report.summary())
    return "\n".join(lines)
