"""ONNX models over protobuf's 2 GiB limit keep their weights in ``model.onnx.data``: the export
writes it, the store lists, hashes and verifies it, the service loads the graph with it.

A tiny model is pushed over the limit by lowering it (``EXTERNAL_DATA_BYTES``), so the path a
bloom-560m takes in fp32 (3.3 GB) runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from exporters import formats
from exporters.checkpoint import load_checkpoint
from exporters.export import ExportRequest, export
from exporters.formats import ExportError, onnx_files
from exporters.graphs import graph_spec, wrap
from model_store import ModelRepository
from service.backends import BackendError, create_backend
from service.settings import Settings

ARCH = "shatter"  # no length sweep: the cheapest export; the files do not depend on it


def _export(checkpoint: Path, store: Path, precision: str):
    request = ExportRequest(
        checkpoint=checkpoint,
        store=store,
        name="big",
        format="onnx",
        precision=precision,
        progress=False,
    )
    return export(request).published


def _weights_bytes(checkpoint: Path) -> int:
    return sum(p.numel() * 4 for p in load_checkpoint(checkpoint).model.parameters())


def _files(version) -> set[str]:
    return {p.name for p in version.path.iterdir()}


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_weights_over_the_limit_are_published_verified_and_served_as_external_data(
    tmp_path: Path, tiny_checkpoint, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    monkeypatch.setattr(formats, "EXTERNAL_DATA_BYTES", 0)  # every model is over
    checkpoint = tiny_checkpoint(ARCH)
    version = _export(checkpoint, tmp_path, precision)
    repo = ModelRepository(tmp_path)

    # The graph, its weights and the tokenizer; nothing of an intermediate fp32 graph.
    assert _files(version) == {"manifest.json", "model.onnx", "model.onnx.data", "tokenizer.json"}
    assert set(version.manifest.files) == {"model.onnx", "model.onnx.data", "tokenizer.json"}
    assert onnx_files(version.model_path) == [version.model_path, version.path / "model.onnx.data"]
    data = version.path / "model.onnx.data"
    assert version.manifest.files["model.onnx.data"].size == data.stat().st_size
    assert data.stat().st_size > 0
    assert repo.verify("big").ok

    # The service's backend loads the graph with its external weights: eager's numbers.
    ckpt = load_checkpoint(checkpoint)
    spec = graph_spec(ckpt.config.task, ckpt.config)
    ids = np.random.default_rng(0).integers(4, ckpt.config.vocab_size, size=(1, 24))
    mask = np.ones_like(ids)
    backend = create_backend(version, Settings(store=tmp_path, intra_op_threads=1))
    got = backend.run({"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        want = wrap(ckpt.model, spec, torch.float32)(torch.from_numpy(ids), torch.from_numpy(mask))
    out, ref = got[spec.output_names[0]].ravel(), want[0].numpy().ravel()
    if precision == "fp32":
        np.testing.assert_allclose(out, ref, atol=1e-4)
    else:  # int8 weights: the parity floor's measure
        assert out @ ref / (np.linalg.norm(out) * np.linalg.norm(ref)) > 0.99

    # A changed or missing weights file fails verification, naming it; the backend refuses it
    # with a clear error rather than serving without weights.
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    result = repo.verify("big")
    assert [m.file for m in result.mismatches] == ["model.onnx.data"]
    data.unlink()
    assert [m.file for m in repo.verify("big").mismatches if m.missing] == ["model.onnx.data"]
    with pytest.raises(BackendError, match=r"model\.onnx"):
        create_backend(version, Settings(store=tmp_path, intra_op_threads=1))


def test_int8_under_the_limit_is_one_file_again(
    tmp_path: Path, tiny_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fp32 over the limit, int8 (a quarter of the weights) under it: bloom-560m's case.
    checkpoint = tiny_checkpoint(ARCH)
    monkeypatch.setattr(formats, "EXTERNAL_DATA_BYTES", _weights_bytes(checkpoint) // 2)
    version = _export(checkpoint, tmp_path, "int8")
    assert _files(version) == {"manifest.json", "model.onnx", "tokenizer.json"}
    assert onnx_files(version.model_path) == [version.model_path]
    ops = {node.op_type for node in onnx.load(str(version.model_path)).graph.node}
    assert "MatMulInteger" in ops
    assert ModelRepository(tmp_path).verify("big").ok


def test_weights_in_any_other_file_are_refused(tmp_path: Path) -> None:
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [weight],
    )
    path = tmp_path / "model.onnx"
    onnx.save_model(
        helper.make_model(graph), str(path), save_as_external_data=True, location="weights.bin"
    )
    with pytest.raises(ExportError, match=r"weights\.bin.*expected only model\.onnx\.data"):
        onnx_files(path)
