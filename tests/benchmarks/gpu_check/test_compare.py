"""The GPU check's judgments on CPU outputs: the parity rule applied to two runtimes' outputs,
the provider report read from model cards, and the summary table. No GPU result is made up:
where a GPU would run, two CPU runtimes of the same checkpoint stand in for "two devices"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from benchmarks.gpu_check import compare
from exporters import parity
from exporters.export import ExportRequest, export
from model_store import ModelRepository
from service.backends import create_backend
from service.settings import Settings


def outputs(gen: np.random.Generator, length: int) -> dict[str, np.ndarray]:
    return {"logits": gen.standard_normal((1, length, 16)).astype(np.float32)}


def test_identical_fp32_outputs_pass_the_parity_rule() -> None:
    gen = np.random.default_rng(0)
    cases = [(f"L{n}", n, out, dict(out)) for n in (8, 64) for out in [outputs(gen, n)]]
    passed, summary, results = compare.judge("fp32", cases)
    assert passed and summary.startswith("parity PASS") and [r.length for r in results] == [8, 64]
    assert all(r.max_abs_diff == 0.0 and r.argmax_agreement == 1.0 for r in results)


def test_an_fp32_difference_beyond_the_parity_rule_fails() -> None:
    gen = np.random.default_rng(1)
    ref = outputs(gen, 32)
    off = {"logits": ref["logits"].copy()}
    off["logits"][0, 5, 3] += 50 * parity.FP32_RULE.bound(float(np.abs(ref["logits"]).max()))
    passed, summary, results = compare.judge("fp32", [("L32", 32, ref, off)])
    assert not passed and summary.startswith("parity FAIL")
    assert results[0].worst_ratio() > 1


def test_reduced_precision_is_judged_by_cosine_not_by_max_diff() -> None:
    gen = np.random.default_rng(2)
    ref = outputs(gen, 64)
    near = {"logits": ref["logits"] + 0.01 * gen.standard_normal(ref["logits"].shape)}
    passed, summary, results = compare.judge("fp16", [("L64", 64, ref, near)])
    assert results[0].worst_ratio() > 1  # would fail the fp32 rule
    assert passed and "cosine" in summary and results[0].cosine >= parity.MIN_COSINE
    noise = {"logits": gen.standard_normal(ref["logits"].shape).astype(np.float32)}
    assert not compare.judge("int8", [("L64", 64, ref, noise)])[0]


def test_a_shape_mismatch_is_an_error() -> None:
    gen = np.random.default_rng(3)
    with pytest.raises(ValueError, match="logits"):
        compare.judge("fp32", [("L8", 8, outputs(gen, 8), outputs(gen, 9))])


def card(fmt: str, provider: str, fallback: str | None) -> dict[str, object]:
    return {"id": "m", "format": fmt, "provider": provider, "fallback": fallback}


def test_provider_report_is_judged_against_what_the_runtimes_offer() -> None:
    ok = compare.check_provider(card("onnx", "CUDAExecutionProvider", None), True, True)
    assert ok.ok and ok.on_gpu
    cpu_build = compare.check_provider(
        card("onnx", "CPUExecutionProvider", "not in this ONNX Runtime build"), False, True
    )
    assert cpu_build.ok and not cpu_build.on_gpu and "as expected" in cpu_build.note
    broken = compare.check_provider(
        card("onnx", "CPUExecutionProvider", "could not use it"), True, True
    )
    assert not broken.ok and "although the runtime offers a GPU" in broken.note
    ts = compare.check_provider(
        card("torchscript", "torch-cpu", "creates tensors on cpu"), True, True
    )
    assert not ts.ok
    assert not compare.check_provider(card("torchscript", "torch-cpu", None), False, False).ok


def test_summary_table_has_one_line_per_model_and_dashes_for_gaps() -> None:
    rows = [
        {"model": "alibi-demo", "format": "onnx", "precision": "fp32",
         "provider": "CUDAExecutionProvider", "parity": "PASS max|d| 2.1e-06",
         "generate_1": 412.3, "generate_16": 5120.0},
        {"model": "shatter-demo", "format": "torchscript", "precision": "fp16",
         "provider": "torch-cuda", "parity": "PASS cos 0.99990", "encode_1": 12.25},
    ]  # fmt: skip
    lines = compare.format_table(rows).splitlines()
    assert len(lines) == 3 and lines[0].startswith("model")
    assert "5,120" in lines[1] and "412" in lines[1] and " - " in lines[1]
    assert "12.2" in lines[2]


@pytest.fixture(scope="module")
def two_runtimes(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Callable[[str], Path]
) -> Path:
    """The tiny ALiBi decoder (kv-cache graph) exported as ONNX and as TorchScript."""
    store = tmp_path_factory.mktemp("gpu-check-store")
    for fmt in ("onnx", "torchscript"):
        export(
            ExportRequest(
                checkpoint=tiny_checkpoint("alibi"), store=store, name=f"ali-{fmt}", format=fmt,
                max_context=256, progress=False,
            )
        )  # fmt: skip
    return store


@pytest.mark.slow
def test_two_runtimes_of_one_checkpoint_agree_by_the_parity_rule(two_runtimes: Path) -> None:
    # The same comparison the check makes between GPU and CPU, here ONNX Runtime CPU against
    # TorchScript CPU: prefill at several lengths, logits and the new cache entries compared.
    repo = ModelRepository(two_runtimes)
    settings = Settings(
        store=two_runtimes, providers=["CPUExecutionProvider"], torchscript_device="cpu"
    )
    onnx_version, ts_version = repo.resolve("ali-onnx"), repo.resolve("ali-torchscript")
    a = create_backend(onnx_version, settings)
    b = create_backend(ts_version, settings)
    lengths = compare.lengths_for(onnx_version.manifest)
    assert lengths == [8, 128]  # the check's lengths that fit max_context 256
    result = compare.compare_backends("ali", onnx_version.manifest, a, b, lengths)
    assert result.passed, result.summary
    assert (result.gpu_provider, result.cpu_provider) == ("CPUExecutionProvider", "torch-cpu")
    assert [c["length"] for c in result.cases] == [8, 128]
    assert compare.parity_cell(result, None).startswith("PASS max|d| ")
    inputs = compare.case_inputs(onnx_version.manifest, 8, seed=0)
    assert inputs["past_key_values.0.key"].shape[2] == 0  # a prefill: empty past


@pytest.mark.slow
def test_default_settings_on_this_machine_report_why_not_the_gpu(two_runtimes: Path) -> None:
    # Whatever this machine offers, each card is consistent with its runtimes.
    import onnxruntime as ort
    import torch

    repo = ModelRepository(two_runtimes)
    for name in ("ali-onnx", "ali-torchscript"):
        version = repo.resolve(name)
        backend = create_backend(version, Settings(store=two_runtimes))
        verdict = compare.check_provider(
            {"id": name, "format": version.manifest.format, "provider": backend.provider,
             "fallback": backend.fallback},
            "CUDAExecutionProvider" in ort.get_available_providers(),
            torch.cuda.is_available(),
        )  # fmt: skip
        assert verdict.ok, verdict.note
        backend.close()
