"""A max_context bounded by memory: candidates, the peak fit, the choice, the measurement, and the
export path that probes, chooses and records (the parity sweep replaced by a known allocation)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from exporters import export as export_module
from exporters import memory_bound
from exporters.checkpoint import load_checkpoint
from exporters.export import (
    ExportRequest,
    _bound_by_memory,
    _max_context,
    _shorter_after_failure,
    describe_bound,
)
from exporters.memory_bound import (
    FLOOR,
    PeakFit,
    available_memory,
    candidate_lengths,
    choose_length,
    peak_above,
    settled_resident_bytes,
)
from exporters.parity import FP32_RULE, CaseResult, OutputDiff, ParityError, Report

MIB = 2**20


def test_candidates_are_the_limit_then_powers_of_two_down_to_the_floor() -> None:
    assert candidate_lengths(524288) == [524288, 262144, 131072, 65536, 32768, 16384, 8192, 4096]
    assert candidate_lengths(100_000) == [100_000, 65536, 32768, 16384, 8192, 4096]
    assert candidate_lengths(8192) == [8192, 4096]
    assert candidate_lengths(5000) == [5000, 4096]
    assert candidate_lengths(4096) == [4096] and candidate_lengths(512) == [512]


def test_the_fit_is_the_line_through_the_probes() -> None:
    fit = PeakFit((1024, 4096), (100 * MIB, 250 * MIB))
    assert fit.per_token == pytest.approx(150 * MIB / 3072)
    assert fit.predict(1024) == 100 * MIB and fit.predict(4096) == 250 * MIB
    assert fit.predict(65536) == pytest.approx(50 * MIB + 65536 * 150 * MIB / 3072, abs=1)
    # three probes: least squares, so an outlier in the middle pulls the intercept only
    three = PeakFit((1024, 2048, 4096), (100 * MIB, 180 * MIB, 250 * MIB))
    assert 0 < three.per_token < 150 * MIB / 1024


def test_a_noisy_probe_never_predicts_that_longer_is_cheaper() -> None:
    fit = PeakFit((1024, 4096), (300 * MIB, 290 * MIB))
    assert fit.per_token == 0.0
    assert fit.predict(524288) == 300 * MIB  # flat, at the larger probe


@pytest.mark.parametrize(
    ("lengths", "peaks"), [((1024,), (1,)), ((1024, 1024), (1, 2)), ((1024, 4096), (1,))]
)
def test_a_fit_needs_two_distinct_lengths_with_a_peak_each(
    lengths: tuple[int, ...], peaks: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError):
        PeakFit(lengths, peaks)


def test_the_longest_candidate_that_fits_is_chosen() -> None:
    fit = PeakFit((1024, 4096), (1024 * 1024, 4096 * 1024))  # 1 KiB per token, nothing fixed
    per_token = 1024
    choice = choose_length(524288, fit, budget=65536 * per_token)  # exactly 64K tokens
    assert (choice.length, choice.fits) == (65536, True)
    assert choice.predicted_peak == 65536 * per_token
    assert choose_length(524288, fit, budget=65536 * per_token - 1).length == 32768
    assert choose_length(524288, fit, budget=10**15).length == 524288
    # the same budget and probes, the same answer
    assert choose_length(524288, fit, 12345678) == choose_length(524288, fit, 12345678)


def test_nothing_fits_means_the_floor_and_says_so() -> None:
    fit = PeakFit((1024, 4096), (1 << 30, 2 << 30))
    choice = choose_length(524288, fit, budget=1)
    assert (choice.length, choice.fits) == (FLOOR, False)
    assert choice.predicted_peak == fit.predict(FLOOR)


def _meminfo(tmp_path: Path, available_kib: int | None) -> Path:
    path = tmp_path / "meminfo"
    lines = ["MemTotal:       24683584 kB", "MemFree:        19784468 kB"]
    if available_kib is not None:
        lines.append(f"MemAvailable:   {available_kib} kB")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_available_memory_is_memavailable_or_a_tighter_cgroup(tmp_path: Path) -> None:
    meminfo = _meminfo(tmp_path, 8 * 2**20)  # 8 GiB
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert available_memory(meminfo, cgroup) == (8 * 2**30, "MemAvailable 8.0 GiB")  # no files
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text(f"{2**30}\n")
    assert available_memory(meminfo, cgroup)[0] == 8 * 2**30  # unlimited
    (cgroup / "memory.max").write_text(f"{4 * 2**30}\n")
    got, source = available_memory(meminfo, cgroup)
    assert got == 3 * 2**30 and "cgroup" in source  # 4 GiB limit, 1 GiB used
    (cgroup / "memory.max").write_text(f"{64 * 2**30}\n")
    assert available_memory(meminfo, cgroup)[0] == 8 * 2**30  # the machine is tighter
    with pytest.raises(RuntimeError, match="--memory-budget"):
        available_memory(_meminfo(tmp_path, None), cgroup)


def _allocate(mib: int, hold_s: float = 0.0) -> None:
    block = np.ones(mib * MIB, dtype=np.uint8)  # ones: every page is touched
    time.sleep(hold_s)
    del block


def _fragment_the_heap() -> np.ndarray:
    """Leave 192 MiB freed but resident inside glibc's heap, as a parity probe's tensors do: a
    24 MiB block mapped and freed raises the mmap threshold, the 16 MiB blocks then come from
    the heap, and the returned 1 MiB block above them keeps free() from trimming them."""
    np.ones(24 * MIB, dtype=np.uint8)
    blocks = [np.ones(16 * MIB, dtype=np.uint8) for _ in range(12)]
    pin = np.ones(MIB, dtype=np.uint8)
    del blocks
    return pin


@pytest.mark.parametrize("exact", [True, False])
def test_peak_above_sees_a_freed_allocation(
    exact: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not exact:  # clear_refs refused: the sampling thread
        monkeypatch.setattr(memory_bound, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    elif not memory_bound._reset_peak():
        pytest.skip("this kernel does not let VmHWM be reset")
    baseline = settled_resident_bytes()
    with peak_above(baseline) as peak:
        _allocate(96, hold_s=0.1)
    assert 90 * MIB <= peak() <= 140 * MIB
    with peak_above(settled_resident_bytes()) as small:
        _allocate(8, hold_s=0.1)
    assert small() < 40 * MIB  # reset: the earlier peak is not counted again


@pytest.mark.parametrize("exact", [True, False])
def test_a_block_that_reuses_freed_heap_memory_is_still_measured(
    exact: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe after a probe: the first left freed, resident memory in the heap, the second
    is served from it and its peak must still count."""
    if not exact:
        monkeypatch.setattr(memory_bound, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    baseline = settled_resident_bytes()
    pin = _fragment_the_heap()
    with peak_above(baseline) as peak:
        _allocate(96, hold_s=0.1)
    del pin
    assert 90 * MIB <= peak() <= 140 * MIB


def _fake_parity(per_token: int, passed: bool = True) -> Any:
    """A parity sweep whose peak is known: ``per_token`` bytes per position of its length."""

    def run(reference: Any, runner: Any, spec: Any, config: Any, lengths: list[int], *a: Any):
        _allocate(per_token * max(lengths) // MIB, hold_s=0.02)
        return SimpleNamespace(passed=passed, summary=lambda: f"parity at {lengths}")

    return run


@pytest.fixture(scope="module")
def reformer_ckpt(tiny_checkpoint: Any) -> Any:
    return load_checkpoint(tiny_checkpoint("reformer"))


def test_the_export_probes_and_chooses_what_fits(
    reformer_ckpt: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 KiB per token: 16384 tokens peak at 128 MiB, 32768 at 256 MiB; a 192 MiB budget must
    choose 16384 out of a 2^19 limit."""
    monkeypatch.setattr(export_module, "run_parity", _fake_parity(8192))
    request = ExportRequest(
        checkpoint=tmp_path, store=tmp_path, name="m", format="onnx", memory_budget=192 * MIB
    )
    bound = _bound_by_memory(None, None, None, reformer_ckpt, 524288, request)  # type: ignore[arg-type]
    assert bound.chosen == 16384 and bound.choice.fits
    # What the allocator keeps of a freed probe counts too (glibc may hold the 1024 probe's
    # block on its heap during the next): at least the allocation, not much more.
    assert 0.9 * 8192 <= bound.fit.per_token <= 1.5 * 8192
    assert bound.budget_source == "--memory-budget"
    text = describe_bound(bound)
    assert "max_context 16384, not the model's limit 524288" in text and "--max-context N" in text
    report = bound.report(measured_peak=130 * MIB, failed=[])
    assert report.limit == 524288 and report.probe_lengths == [1024, 4096]
    assert report.predicted_peak_bytes <= report.budget_bytes


def test_the_default_budget_is_a_fraction_of_what_is_available(
    reformer_ckpt: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "run_parity", _fake_parity(8192))
    monkeypatch.setattr(
        export_module, "default_budget", lambda: (10**15, "0.75 of MemAvailable (test)")
    )
    request = ExportRequest(checkpoint=tmp_path, store=tmp_path, name="m", format="onnx")
    bound = _bound_by_memory(None, None, None, reformer_ckpt, 524288, request)  # type: ignore[arg-type]
    assert bound.chosen == 524288
    assert describe_bound(bound).startswith("max_context 524288 (the model's limit)")


def test_which_exports_are_bounded_by_memory(reformer_ckpt: Any, tmp_path: Path) -> None:
    ckpt = reformer_ckpt
    assert ckpt.config.max_positions is None  # sinusoidal: max(4096, trained), not probed

    def request(**kw: Any) -> ExportRequest:
        return ExportRequest(checkpoint=tmp_path, store=tmp_path, name="m", format="onnx", **kw)

    assert _max_context(ckpt, request())[2] is False  # 4096: the floor, nothing to bound
    table = dataclasses.replace(
        ckpt.config, position_embedding="learned", max_position_embeddings=65536
    )
    tabled = dataclasses.replace(ckpt, config=table)
    assert _max_context(tabled, request()) == (65536, None, True)  # probed in export()
    assert _max_context(tabled, request(memory_budget=MIB))[2] is True
    assert _max_context(tabled, request(max_context=65536))[2] is False  # explicit: as asked
    with pytest.raises(ValueError, match="nothing to choose"):
        _max_context(ckpt, request(max_context=8192, memory_budget=MIB))
    with pytest.raises(ValueError, match="positive"):
        _max_context(ckpt, request(memory_budget=0))


def test_a_probe_that_fails_parity_fails_the_export_before_the_long_sweep(
    reformer_ckpt: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "run_parity", _fake_parity(1024, passed=False))
    request = ExportRequest(
        checkpoint=tmp_path, store=tmp_path, name="m", format="onnx", memory_budget=MIB
    )
    with pytest.raises(ParityError, match=r"parity at \[1024\] \(memory probe\); nothing"):
        _bound_by_memory(None, None, None, reformer_ckpt, 524288, request)  # type: ignore[arg-type]


def _report(failing: dict[int, float], precision: str = "fp32", longest: int = 65536) -> Report:
    """A parity report with one case per length; ``failing`` maps a length to its diff ratio."""
    report = Report(reference="eager", precision=precision, lengths=[16, 4096, longest])
    for length in report.lengths:
        ratio = failing.get(length, 0.5)
        diff = OutputDiff(max_abs_diff=ratio * FP32_RULE.bound(1.0), peak=1.0)
        cosine = 0.5 if length in failing else 1.0
        report.cases.append(CaseResult(1, length, f"full@{length}", {"logits": diff}, cosine, 1.0))
    return report


def test_a_default_length_that_fails_only_at_its_longest_case_is_halved() -> None:
    assert _shorter_after_failure(_report({}), 65536) is None  # passed: nothing to do
    assert _shorter_after_failure(_report({65536: 3.0}), 65536) == 32768
    longer = _report({100_000: 3.0}, longest=100_000)
    assert _shorter_after_failure(longer, 100_000) == 65536  # the power of two below
    eight_k = _report({2 * FLOOR: 3.0}, longest=2 * FLOOR)
    assert _shorter_after_failure(eight_k, 2 * FLOOR) == FLOOR
    at_floor = _report({FLOOR: 3.0}, longest=FLOOR)
    assert _shorter_after_failure(at_floor, FLOOR) is None  # the floor: refused


def test_a_failure_no_shorter_length_mends_is_not_retried() -> None:
    # A short case failed too: the graph is wrong, not the long numerics.
    assert _shorter_after_failure(_report({4096: 2.0, 65536: 3.0}), 65536) is None
    # Reduced precision is judged by cosine over every case; its failure is not length's.
    assert _shorter_after_failure(_report({65536: 3.0}, precision="int8"), 65536) is None


def test_the_export_publishes_the_longest_default_length_that_passes(
    tiny_checkpoint: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real graph and store, parity replaced by one that fails past 8192 tokens at its
    longest case only: the limit 65536 fits the budget, fails, and is halved to 8192."""
    from exporters.architectures import build_model

    source = tiny_checkpoint("reformer")
    ckpt = load_checkpoint(source)
    config = dataclasses.replace(
        ckpt.config, position_embedding="learned", max_position_embeddings=65536
    )
    tabled = dataclasses.replace(ckpt, config=config, model=build_model(config).eval())
    asked: list[list[int]] = []

    def parity(reference: Any, runner: Any, spec: Any, cfg: Any, lengths: list[int], *a: Any):
        asked.append(list(lengths))
        longest = max(lengths)
        return _report({longest: 3.0} if longest > 8192 else {}, longest=longest)

    monkeypatch.setattr(export_module, "run_parity", parity)
    request = ExportRequest(
        checkpoint=source, store=tmp_path / "store", name="m", format="onnx",
        memory_budget=2**50, progress=False,
    )  # fmt: skip
    prepared = export_module.Prepared(tabled, 65536, None, "generate", memory_bound=True)
    result = export_module.export(request, prepared)
    manifest = result.published.manifest
    assert manifest.max_context == 8192 and max(manifest.parity.lengths) == 8192
    assert manifest.memory_bound is not None
    assert manifest.memory_bound.parity_failed_lengths == [65536, 32768, 16384]
    assert [max(lengths) for lengths in asked] == [1024, 4096, 65536, 32768, 16384, 8192]
    assert "parity failed at [65536, 32768, 16384]" in result.summary()
