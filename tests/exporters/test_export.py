"""Export round trips: checkpoint -> graph -> store -> loaded back -> same numbers as eager."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporters import parity as parity_module
from exporters.checkpoint import load_checkpoint
from exporters.cli import main as exporters_main
from exporters.export import ExportRequest, _example, export, parity_lengths
from exporters.formats import (
    FrozenAxisError,
    check_dynamic_axes,
    export_onnx,
    export_torchscript,
    fixed_devices,
)
from exporters.graphs import graph_spec, wrap
from exporters.parity import ParityError
from exporters.runtime import OnnxRunner, TorchScriptRunner
from model_store import ModelRepository, past_inputs
from model_store.cli import main as store_main

ARCHS = ("linformer", "reformer", "alibi", "shatter")
FORMATS = ("onnx", "torchscript")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint) -> Path:
    """Every architecture in both formats, exported once for this module."""
    root = tmp_path_factory.mktemp("store")
    for arch in ARCHS:
        for fmt in FORMATS:
            request = ExportRequest(
                checkpoint=tiny_checkpoint(arch),
                store=root,
                name=f"{arch}-{fmt}",
                format=fmt,
                progress=False,
            )
            export(request)
    return root


def _export(
    checkpoint: Path,
    store: Path,
    fmt: str,
    precision: str = "fp32",
    max_context: int | None = None,
):
    """One quiet export into ``store`` (the model name does not matter to these tests)."""
    request = ExportRequest(
        checkpoint=checkpoint,
        store=store,
        name="m",
        format=fmt,
        precision=precision,
        max_context=max_context,
        progress=False,
    )
    return export(request)


def _runner(version):
    manifest = version.manifest
    names_in = [t.name for t in manifest.signature.inputs]
    names_out = [t.name for t in manifest.signature.outputs]
    if manifest.format == "onnx":
        return OnnxRunner(version.model_path, names_out)
    return TorchScriptRunner(version.model_path, names_in, names_out)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_through_the_store_matches_eager(store, tiny_checkpoint, arch, fmt) -> None:
    repo = ModelRepository(store)
    version = repo.resolve(f"{arch}-{fmt}", "latest")
    assert repo.verify(version.name, version.version).ok
    manifest = version.manifest
    ckpt = load_checkpoint(tiny_checkpoint(arch))
    assert manifest.architecture == arch and manifest.format == fmt
    assert manifest.parity.passed and manifest.parity.max_abs_diff <= 1e-4
    assert manifest.parity.rule == parity_module.FP32_RULE.describe()
    assert manifest.parity.tolerance == parity_module.FP32_RULE.rtol
    assert all(c.of_bound is not None and c.of_bound <= 1 for c in manifest.parity.cases)
    lengths = parity_lengths(ckpt, manifest.max_context)
    assert manifest.parity.lengths == lengths
    long = min(2 * ckpt.trained_context, manifest.max_context) if arch == "alibi" else 4096
    assert max(lengths) >= long

    # Independently of the exporter's own parity run: fresh inputs, loaded from the store.
    runner = _runner(version)
    spec = graph_spec(ckpt.config.task, ckpt.config)
    reference = wrap(ckpt.model, spec, torch.float32)
    gen = np.random.default_rng(42)
    for length in (3, ckpt.trained_context, long):
        ids = gen.integers(4, ckpt.config.vocab_size, size=(2, length), dtype=np.int64)
        mask = np.ones_like(ids)
        mask[1, : length // 3] = 0 if spec.mode != "encode" else 1
        if spec.mode == "encode":
            mask[1, length - length // 3 :] = 0
        inputs = {"input_ids": ids, "attention_mask": mask}
        if spec.mode == "kv_cache":
            layers, _, _, heads, _, head_dim = spec.outputs[1][2]
            empty = np.zeros((layers, 2, 2, heads, 0, head_dim), np.float32)
            inputs.update(past_inputs(empty, spec.input_names[2:]))
        got = runner.run(inputs)
        with torch.no_grad():
            expected = reference(*[torch.from_numpy(v) for v in inputs.values()])
        real = mask.astype(bool)
        diff = np.abs(got["logits"] - expected[0].numpy())[real].max()
        assert diff <= 1e-4, f"{arch}/{fmt} at length {length}: max|diff| {diff}"


@pytest.mark.parametrize("arch", ARCHS)
def test_torchscript_export_fixes_no_device(store, arch) -> None:
    # Traced on the CPU, the graphs create position indices with device constants; a file that
    # kept them would fail on a GPU at the first op mixing them with activations.
    version = ModelRepository(store).resolve(f"{arch}-torchscript", "latest")
    assert fixed_devices(torch.jit.load(str(version.model_path))) == []


class _Positions(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(x.shape[1], device=x.device).to(x.dtype)


def test_device_constants_follow_the_input_after_export(tmp_path) -> None:
    with torch.no_grad():
        traced = torch.jit.trace(_Positions(), (torch.zeros(1, 3),))
    assert fixed_devices(traced) == ["cpu"]  # what plain tracing records
    path = tmp_path / "m.ts"
    export_torchscript(_Positions(), (torch.zeros(1, 3),), path)
    loaded = torch.jit.load(str(path))
    assert fixed_devices(loaded) == []
    assert "prim.device" in loaded.code
    # Same numbers at another length than the traced one.
    x = torch.randn(2, 7)
    torch.testing.assert_close(loaded(x), _Positions()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["alibi-onnx", "reformer-onnx", "reformer-torchscript"])
def test_kv_cache_graph_decodes_one_token_on_a_prefilled_cache(
    store, tiny_checkpoint, name
) -> None:
    version = ModelRepository(store).resolve(name)
    assert version.manifest.signature.generation_mode == "kv_cache"
    assert version.manifest.signature.cache is not None
    ckpt = load_checkpoint(tiny_checkpoint(version.manifest.architecture))
    runner = _runner(version)
    names = version.manifest.signature.cache.inputs  # the per-layer past inputs
    ids = torch.randint(4, ckpt.config.vocab_size, (1, 40))
    cache = ckpt.model.empty_cache(1, torch.float32, torch.device("cpu")).numpy()
    out = runner.run(
        {
            "input_ids": ids[:, :-1].numpy(),
            "attention_mask": np.ones((1, 39), np.int64),
            **past_inputs(cache, names),
        }
    )
    step = runner.run(
        {
            "input_ids": ids[:, -1:].numpy(),
            "attention_mask": np.ones((1, 40), np.int64),
            # empty past: the whole prompt's entries
            **past_inputs(out["new_key_values"], names),
        }
    )
    with torch.no_grad():
        full, _ = ckpt.model(ids, torch.ones_like(ids))
    np.testing.assert_allclose(step["logits"][0, -1], full[0, -1].numpy(), atol=1e-4)


@pytest.mark.parametrize("name", ["alibi-onnx", "reformer-onnx"])
def test_kv_cache_graph_takes_the_past_per_layer_with_dynamic_axes(store, name) -> None:
    """One (batch, heads, past_sequence, head_dim) input per layer and per key/value, named
    as the manifest says, with batch (the input_ids' symbol) and past length symbolic, and none
    of them split or gathered: that copy is what per-layer inputs remove. (The exporter may
    give each input's past length its own symbol: nothing in a Reformer ties them.)"""
    version = ModelRepository(store).resolve(name)
    cache = version.manifest.signature.cache
    assert cache is not None
    graph = onnx.load(str(version.model_path)).graph
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in graph.input
    }
    past = [n for n in dims if n.startswith("past_key_values")]
    expected = [f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}" for i in range(4)]
    assert cache.n_layers == 2 and past == cache.inputs == expected
    batch, _ = dims["input_ids"]
    for n in past:
        b, heads, length, width = dims[n]
        assert b == batch and isinstance(length, str) and length != batch
        assert (heads, width) == (cache.n_heads, cache.head_dim)
    copies = {node.op_type for node in graph.node if set(node.input) & set(past)}
    assert not copies & {"Split", "Gather", "Slice"}, copies


@pytest.mark.parametrize("fmt", FORMATS)
def test_causal_reformer_manifest_says_kv_cache_generation(store, tiny_checkpoint, fmt) -> None:
    manifest = ModelRepository(store).resolve(f"reformer-{fmt}").manifest
    config = load_checkpoint(tiny_checkpoint("reformer")).config
    assert manifest.task == "generate" and not config.hf_compatible
    assert manifest.signature.generation_mode == "kv_cache"
    cache = manifest.signature.cache
    assert cache is not None
    assert (cache.n_layers, cache.n_heads, cache.head_dim) == (
        config.n_layers, config.n_heads, config.head_dim,
    )  # fmt: skip


def test_hf_compatible_reformer_gets_the_full_sequence_graph(tiny_checkpoint) -> None:
    """HF's causal rule lets a later token move an earlier one's chunk: no exact cache."""
    config = load_checkpoint(tiny_checkpoint("reformer")).config
    hf = dataclasses.replace(config, hf_compatible=True)
    assert graph_spec("generate", hf).mode == "full_sequence"
    assert graph_spec("generate", config).mode == "kv_cache"
    assert graph_spec("encode", dataclasses.replace(config, causal=False)).mode == "encode"


@pytest.mark.parametrize(
    ("chunk", "local_chunk", "layers"),
    [(64, 64, ("local", "lsh")), (256, 128, ("local", "lsh")), (16, 64, ()), (4, 4, ())],
)
def test_reformer_example_spans_three_chunks_of_every_layer(
    tiny_checkpoint, chunk: int, local_chunk: int, layers: tuple[str, ...]
) -> None:
    """The exporter may fix a size the example has as 0 or 1: with the example inside one
    chunk and one hash round, HF's wrapped look-back fixed the chunk count to 1 and the graph
    failed past one chunk (test_hf_reformer_published.py exports that configuration). So the
    example has >= 3 chunks of every layer (n - 1 >= 2) and padding of at least 2 slots."""
    config = dataclasses.replace(
        load_checkpoint(tiny_checkpoint("reformer")).config, chunk_length=chunk,
        local_chunk_length=local_chunk, attn_layers=layers, n_layers=len(layers) or 2,
        n_hashes=1, hf_compatible=True,
    )  # fmt: skip
    ids, mask = _example(graph_spec("generate", config), config)
    t = ids.shape[1]
    padded = t + (-t) % config.pad_multiple
    assert mask.shape == ids.shape and padded - t >= 2
    for c in config.chunk_lengths:
        assert padded // c >= 3


def test_alibi_extrapolation_curve_sets_max_context(store, tiny_checkpoint) -> None:
    manifest = ModelRepository(store).resolve("alibi-onnx").manifest
    curve = manifest.extrapolation
    assert curve is not None
    trained = manifest.trained_context
    assert curve.lengths == [trained, 2 * trained, 4 * trained, 8 * trained]
    assert curve.ratios[0] == 1.0
    ok = [n for n, r in zip(curve.lengths, curve.ratios, strict=True) if r <= 1.05]
    assert manifest.max_context in ok and manifest.max_context >= trained
    assert curve.max_context_override is None


def test_max_context_override_is_recorded(tmp_path, tiny_checkpoint) -> None:
    result = _export(tiny_checkpoint("alibi"), tmp_path, "onnx", max_context=100)
    manifest = result.published.manifest
    assert manifest.max_context == 100
    assert manifest.extrapolation is not None
    assert manifest.extrapolation.max_context_override == 100
    assert 100 in manifest.parity.lengths


def test_int8_onnx_reports_cosine_and_argmax(tmp_path, tiny_checkpoint) -> None:
    result = _export(tiny_checkpoint("shatter"), tmp_path, "onnx", precision="int8")
    parity = result.published.manifest.parity
    assert parity.tolerance is None
    assert parity.min_cosine is not None and parity.min_cosine >= 0.99
    assert parity.argmax_agreement is not None and parity.argmax_agreement > 0.5
    # Really quantized: the matmuls run as integer kernels.
    ops = {node.op_type for node in onnx.load(str(result.published.model_path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops


def test_bf16_torchscript_passes_the_cosine_floor(tmp_path, tiny_checkpoint) -> None:
    result = _export(tiny_checkpoint("linformer"), tmp_path, "torchscript", precision="bf16")
    parity = result.published.manifest.parity
    assert result.published.manifest.precision == "bf16"
    assert parity.min_cosine is not None and parity.min_cosine >= 0.99


def test_failed_parity_publishes_nothing(tmp_path, tiny_checkpoint, monkeypatch) -> None:
    # ORT's kernels differ from eager by ~1e-7 of the values: a 1e-12 relative bound must fail.
    monkeypatch.setattr(parity_module, "FP32_RULE", parity_module.Fp32Rule(rtol=1e-12, atol=1e-15))
    with pytest.raises(ParityError, match="nothing was published") as exc:
        _export(tiny_checkpoint("linformer"), tmp_path, "onnx")
    assert not exc.value.report.passed
    assert ModelRepository(tmp_path).list_models() == []
    assert [p.name for p in tmp_path.iterdir()] == []


def test_below_cosine_floor_is_refused(tmp_path, tiny_checkpoint, monkeypatch) -> None:
    monkeypatch.setattr(parity_module, "MIN_COSINE", 1.000001)
    with pytest.raises(ParityError):
        _export(tiny_checkpoint("shatter"), tmp_path, "onnx", precision="int8")
    assert ModelRepository(tmp_path).list_models() == []


def test_a_frozen_sequence_axis_is_detected(tmp_path, tiny_checkpoint) -> None:
    ckpt = load_checkpoint(tiny_checkpoint("shatter"))
    spec = graph_spec("encode", ckpt.config)
    ids = torch.randint(4, ckpt.config.vocab_size, (2, 8))
    path = tmp_path / "static.onnx"
    export_onnx(
        wrap(ckpt.model, spec, torch.float32),
        spec,
        (ids, torch.ones_like(ids)),
        path,
        dynamic=False,
    )
    with pytest.raises(FrozenAxisError, match=r"input 'input_ids' axis 0 \(batch\)"):
        check_dynamic_axes(path, spec)
    # And the real export keeps both axes symbolic.
    dynamic = tmp_path / "dynamic.onnx"
    export_onnx(wrap(ckpt.model, spec, torch.float32), spec, (ids, torch.ones_like(ids)), dynamic)
    check_dynamic_axes(dynamic, spec)
    dims = onnx.load(str(dynamic)).graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in dims)


def test_unsupported_precision_is_a_clear_error(tmp_path, tiny_checkpoint) -> None:
    with pytest.raises(ValueError, match="precision bf16 is not supported for onnx"):
        _export(tiny_checkpoint("shatter"), tmp_path, "onnx", precision="bf16")


def test_cli_export_then_tamper_makes_verify_fail_naming_the_file(
    tmp_path, tiny_checkpoint, capsys
) -> None:
    store_dir = tmp_path / "store"
    code = exporters_main(
        [
            "export",
            str(tiny_checkpoint("shatter")),
            "--format",
            "torchscript",
            "--store",
            str(store_dir),
            "--name",
            "shatter-demo-ts",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "parity PASS" in out and "published" in out
    assert store_main(["verify", str(store_dir)]) == 0
    capsys.readouterr()

    model_file = store_dir / "shatter-demo-ts" / "1" / "model.ts"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    assert store_main(["verify", str(store_dir)]) != 0
    out = capsys.readouterr().out
    assert "model.ts" in out
    manifest = json.loads((model_file.parent / "manifest.json").read_text())
    assert manifest["files"]["model.ts"]["sha256"] in out


def test_cli_export_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys) -> None:
    code = exporters_main(
        [
            "export",
            str(tmp_path / "nope"),
            "--format",
            "onnx",
            "--store",
            str(tmp_path),
            "--name",
            "x",
        ]
    )
    assert code == 2
    assert "is not a Longhaul checkpoint" in capsys.readouterr().err
