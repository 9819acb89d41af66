"""Exported-vs-eager parity: the same inputs through both, compared by a stated rule.

fp32 exports are judged per output (logits, hidden states, the new cache entries) and per case by
:data:`FP32_RULE`: the largest |exported - eager| over real-token positions must stay within a
bound scaled by that output's own magnitude (its largest |eager| value there), so the bar follows
the values being compared rather than one absolute number for every model and length. The rule
and the measurements that chose it are in docs/decisions.md ("The fp32 parity rule").

Reduced-precision exports are compared with the fp32 eager model by cosine similarity of each
position's logits and by argmax agreement, and are refused below ``MIN_COSINE``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from exporters.graphs import GraphSpec
from exporters.runtime import Runner
from model_store import past_inputs
from model_store.manifest import NEW_ENTRIES_OUTPUT

MIN_COSINE = 0.99
# kv-cache prompts longer than this run as chunked prefill (each chunk on the cache of the ones
# before, as the service runs them: its default prefill_chunk_tokens), on both sides, so neither
# holds a (prompt × prompt) score tensor nor (prompt × vocabulary) logits. Large vocabularies
# get shorter chunks: at most LOGITS_PER_CHUNK logits per chunk (256 MiB in fp32).
PREFILL_CHUNK = 512
LOGITS_PER_CHUNK = 1 << 26
# Outputs are compared in blocks of at most this many values (64 MiB in float64).
COMPARE_BLOCK_VALUES = 1 << 23


@dataclass(frozen=True)
class Fp32Rule:
    """``max|a - b| <= rtol * max|ref| + atol`` per output and case, over real positions.

    ``rtol`` carries the rule (rounding error is relative to the size of the values summed);
    ``atol`` only keeps an output that is all but zero from demanding an exact match.
    """

    rtol: float
    atol: float

    def bound(self, peak: float) -> float:
        return self.rtol * peak + self.atol

    def describe(self) -> str:
        return (
            f"per output: max|exported - eager| <= {self.rtol:.0e} * max|eager| + {self.atol:.0e}"
            " over real positions"
        )


FP32_RULE = Fp32Rule(rtol=6e-5, atol=1e-6)


class ParityError(RuntimeError):
    """The exported graph does not reproduce the eager model; nothing was published."""

    def __init__(self, report: Report, message: str) -> None:
        super().__init__(message)
        self.report = report


CaseKind = Literal["full", "prefill", "decode"]


@dataclass
class Case:
    """One comparison. ``kind``: a whole sequence, a kv-cache prefill from an empty past, or one
    decode step on top of the eager model's prefill cache (built by :func:`_prepare_decode`)."""

    name: str
    kind: CaseKind
    inputs: dict[str, np.ndarray]
    new_token_mask: np.ndarray  # (b, t) 1 where the output row is a real token
    cache_mask: np.ndarray | None = None  # (b, t) 1 where a returned new cache entry is real


@dataclass(frozen=True)
class OutputDiff:
    """One output of one case: the largest difference and the largest reference magnitude,
    both over real positions."""

    max_abs_diff: float
    peak: float

    def merge(self, other: OutputDiff | None) -> OutputDiff:
        """The same output over two parts of one case (chunks of a long prompt)."""
        if other is None:
            return self
        return OutputDiff(max(self.max_abs_diff, other.max_abs_diff), max(self.peak, other.peak))

    def ratio(self, rule: Fp32Rule) -> float:
        """How much of the rule's bound the difference uses (> 1 fails)."""
        return self.max_abs_diff / rule.bound(self.peak)


@dataclass
class CaseResult:
    batch: int
    length: int
    name: str
    outputs: dict[str, OutputDiff]
    cosine: float
    argmax_agreement: float

    @property
    def max_abs_diff(self) -> float:
        return max(o.max_abs_diff for o in self.outputs.values())

    def worst_ratio(self, rule: Fp32Rule = FP32_RULE) -> float:
        return max(o.ratio(rule) for o in self.outputs.values())


@dataclass
class Report:
    reference: str
    precision: str
    lengths: list[int]
    cases: list[CaseResult] = field(default_factory=list)
    rule: Fp32Rule = FP32_RULE

    @property
    def max_abs_diff(self) -> float:
        return max(c.max_abs_diff for c in self.cases)

    @property
    def worst_ratio(self) -> float:
        return max(c.worst_ratio(self.rule) for c in self.cases)

    @property
    def min_cosine(self) -> float:
        return min(c.cosine for c in self.cases)

    @property
    def argmax_agreement(self) -> float:
        return min(c.argmax_agreement for c in self.cases)

    @property
    def rule_text(self) -> str:
        if self.precision == "fp32":
            return self.rule.describe()
        return f"logits: mean cosine per case >= {MIN_COSINE} (argmax agreement reported)"

    @property
    def passed(self) -> bool:
        if self.precision == "fp32":
            return self.worst_ratio <= 1.0
        return self.min_cosine >= MIN_COSINE

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        if self.precision == "fp32":
            worst = max(self.cases, key=lambda c: c.worst_ratio(self.rule))
            name, diff = max(worst.outputs.items(), key=lambda kv: kv[1].ratio(self.rule))
            bar = (
                f"worst {worst.name} {name}: max|diff| {diff.max_abs_diff:.2e} against a bound "
                f"of {self.rule.bound(diff.peak):.2e} (max|eager| {diff.peak:.3g}; "
                f"{diff.ratio(self.rule):.2f} of the bound; rule: {self.rule.describe()})"
            )
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
            cases.append(Case(name, "full", {"input_ids": ids, "attention_mask": mask}, mask))
            continue
        layers, heads, head_dim = spec.cache_dims
        empty = np.zeros((layers, 2, len(row_lengths), heads, 0, head_dim), dtype=np.float32)
        inputs = {
            "input_ids": ids,
            "attention_mask": mask,
            **past_inputs(empty, spec.input_names[2:]),
        }
        cases.append(Case(f"{name}-prefill", "prefill", inputs, mask, mask))
        cases.append(Case(f"{name}-decode", "decode", dict(inputs), mask, mask))
    return cases


def _as_torch(inputs: dict[str, np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(v) for v in inputs.values()]


def _prepare_decode(
    cache: np.ndarray, spec: GraphSpec, case: Case, vocab: int, gen: np.random.Generator
) -> Case:
    """Turn a '-decode' case into one new token on top of the eager model's prefill cache
    ``cache`` (L, 2, b, h, P, e): the whole prompt's entries, from its '-prefill' case.

    The cache is laid out as the service's decode batch holds it (service/engine/kv_cache.py):
    each row's real tokens first, its padding slots after them, then the new token, so a
    padded row checks padding between the past and the new token, not only on the left.
    """
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
    return Case(case.name, "decode", inputs, ones, ones)


def _token_blocks(keep: np.ndarray, features: int) -> Iterator[tuple[int, slice, np.ndarray]]:
    """(row, token slice, real-token selector) blocks of at most ``COMPARE_BLOCK_VALUES``
    values, skipping blocks without a real token."""
    step = max(1, COMPARE_BLOCK_VALUES // max(1, features))
    for row in range(keep.shape[0]):
        for start in range(0, keep.shape[1], step):
            tokens = slice(start, start + step)
            if keep[row, tokens].any():
                yield row, tokens, keep[row, tokens]


def _compare(ref: np.ndarray, out: np.ndarray, mask: np.ndarray, axis_of_tokens: int) -> OutputDiff:
    """Max |diff| and max |ref| over real positions; cache entries carry tokens on axis 4.

    Compared in float64 block by block: whole-output float64 copies cost 24 bytes per value
    (3x the fp32 outputs themselves, 8 GB for a batch of two at 2^19 tokens and 320 logits)."""
    if axis_of_tokens != 1:  # (layers, 2, b, h, t, e): bring (b, t) to the front (views).
        ref = np.moveaxis(ref, (2, 4), (0, 1))
        out = np.moveaxis(out, (2, 4), (0, 1))
    keep = mask.astype(bool)
    if not keep.any():
        return OutputDiff(0.0, 0.0)
    diffs, peaks = [], []
    for row, tokens, real in _token_blocks(keep, int(np.prod(ref.shape[2:]))):
        r = ref[row, tokens][real].astype(np.float64)
        diffs.append(np.abs(r - out[row, tokens][real].astype(np.float64)).max())
        peaks.append(np.abs(r).max())
    # np.max, not max(): a NaN anywhere must reach the verdict (it fails every bound).
    return OutputDiff(float(np.max(diffs)), float(np.max(peaks)))


def _cosine_and_argmax(ref: np.ndarray, out: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean cosine and argmax agreement of the logits over real positions, block by block."""
    keep = mask.astype(bool)
    cosine_sum, agree_sum, count = 0.0, 0, 0
    for row, tokens, real in _token_blocks(keep, ref.shape[-1]):
        r = ref[row, tokens][real].astype(np.float64)  # (n, v)
        o = out[row, tokens][real].astype(np.float64)
        norms = np.linalg.norm(r, axis=-1) * np.linalg.norm(o, axis=-1) + 1e-12
        cosine_sum += float(((r * o).sum(-1) / norms).sum())
        agree_sum += int((r.argmax(-1) == o.argmax(-1)).sum())
        count += r.shape[0]
    if not count:  # no real position: nothing agrees or disagrees (the mean of nothing)
        return float("nan"), float("nan")
    return cosine_sum / count, agree_sum / count


def prefill_chunk(batch: int, vocab: int) -> int:
    """Tokens per chunk of a long kv-cache prompt (see PREFILL_CHUNK)."""
    return max(16, min(PREFILL_CHUNK, LOGITS_PER_CHUNK // (batch * vocab)))


def _chunked_prefill(
    reference: nn.Module, runner: Runner, spec: GraphSpec, case: Case, chunk: int
) -> tuple[dict[str, OutputDiff], float, float, np.ndarray]:
    """A '-prefill' case run chunk by chunk on both sides, each on its own growing cache.

    Returns (each output's difference over the whole prompt, mean cosine and argmax agreement
    over real tokens, the reference's whole-prompt cache (L, 2, b, h, t, e) for the decode
    case)."""
    ids, mask = case.inputs["input_ids"], case.inputs["attention_mask"]
    layers, heads, head_dim = spec.cache_dims
    # Both caches allocated once at the prompt's length and filled chunk by chunk; the past of a
    # chunk is a view (concatenating would hold two copies of the cache at every step).
    shape = (layers, 2, ids.shape[0], heads, ids.shape[1], head_dim)
    ref_cache, got_cache = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    diffs: dict[str, OutputDiff] = {}
    cosine_sum = agree_sum = real_total = 0.0
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        new_mask = case.new_token_mask[:, start:end]
        outputs = []
        for cache in (ref_cache, got_cache):
            inputs = {"input_ids": ids[:, start:end], "attention_mask": mask[:, :end]}
            past = cache[..., :start, :]
            outputs.append({**inputs, **past_inputs(past, spec.input_names[2:])})
        with torch.no_grad():
            expected = [t.numpy() for t in reference(*_as_torch(outputs[0]))]
        got = runner.run(outputs[1])
        for (name, _, _), ref in zip(spec.outputs, expected, strict=True):
            if ref.shape != got[name].shape:
                raise ValueError(
                    f"{case.name}: {name} has shape {got[name].shape} in the exported graph, "
                    f"{ref.shape} in the eager model"
                )
            axis = 4 if name == NEW_ENTRIES_OUTPUT else 1
            diffs[name] = _compare(ref, got[name], new_mask, axis).merge(diffs.get(name))
        real = float(new_mask.sum())
        if real:
            cosine, agree = _cosine_and_argmax(expected[0], got["logits"], new_mask)
            cosine_sum, agree_sum, real_total = (
                cosine_sum + cosine * real,
                agree_sum + agree * real,
                real_total + real,
            )
        ref_cache[..., start:end, :] = expected[1]
        got_cache[..., start:end, :] = got[NEW_ENTRIES_OUTPUT]
    return diffs, cosine_sum / real_total, agree_sum / real_total, ref_cache


def run_parity(
    reference: nn.Module,
    runner: Runner,
    spec: GraphSpec,
    config: object,
    lengths: list[int],
    precision: str,
    progress: bool = True,
    seed: int = 0,
) -> Report:
    """``reference`` is the fp32 eager graph module (same wrapper as exported); ``seed`` draws
    the case inputs."""
    report = Report(
        reference=f"eager fp32 PyTorch {torch.__version__} vs {runner.provider}",
        precision=precision,
        lengths=lengths,
        rule=FP32_RULE,
    )
    gen = np.random.default_rng(seed + 1)
    vocab = config.vocab_size  # type: ignore[attr-defined]
    prefill_cache = np.zeros(0, dtype=np.float32)  # the last prefill case's reference cache
    bar = tqdm(build_cases(spec, config, lengths, seed), desc="parity", disable=not progress)
    for case in bar:
        batch, total = case.inputs["input_ids"].shape
        bar.set_postfix_str(f"{case.name}: batch {batch}, length {total}")
        if case.kind == "decode":
            case = _prepare_decode(prefill_cache, spec, case, vocab, gen)
        chunk = prefill_chunk(batch, vocab)
        if case.kind == "prefill" and total > chunk:
            try:
                chunked, cosine, agree, prefill_cache = _chunked_prefill(
                    reference, runner, spec, case, chunk
                )
            except ValueError as exc:
                raise ParityError(report, str(exc)) from None
            report.cases.append(CaseResult(batch, total, case.name, chunked, cosine, agree))
            continue
        with torch.no_grad():
            expected = [t.numpy() for t in reference(*_as_torch(case.inputs))]
        got = runner.run(case.inputs)
        outputs: dict[str, OutputDiff] = {}
        for (name, _, _), ref in zip(spec.outputs, expected, strict=True):
            if ref.shape != got[name].shape:
                raise ParityError(
                    report,
                    f"{case.name}: {name} has shape {got[name].shape} in the exported graph, "
                    f"{ref.shape} in the eager model",
                )
            if name == NEW_ENTRIES_OUTPUT:
                assert case.cache_mask is not None
                outputs[name] = _compare(ref, got[name], case.cache_mask, 4)
            else:
                outputs[name] = _compare(ref, got[name], case.new_token_mask, 1)
        if case.kind == "prefill":
            prefill_cache = expected[1]  # empty past: the whole prompt's entries
        cosine, agree = _cosine_and_argmax(expected[0], got["logits"], case.new_token_mask)
        report.cases.append(
            CaseResult(
                batch=case.inputs["input_ids"].shape[0],
                length=int(case.inputs["attention_mask"].shape[1]),
                name=case.name,
                outputs=outputs,
                cosine=cosine,
                argmax_agreement=agree,
            )
        )
    return report


def format_report(report: Report) -> str:
    """The parity table the CLI prints, one line per case, then the verdict."""
    header = f"{'case':<28}{'batch':>6}{'len':>7}{'max|diff|':>12}{'of bound':>10}"
    lines = [f"{header}{'cosine':>10}{'argmax':>8}"]
    for c in report.cases:
        lines.append(
            f"{c.name:<28}{c.batch:>6}{c.length:>7}{c.max_abs_diff:>12.2e}"
            f"{c.worst_ratio(report.rule):>10.3f}{c.cosine:>10.6f}{c.argmax_agreement:>8.4f}"
        )
    lines.append(report.summary())
    return "\n".join(lines)
