"""Writing graphs to disk: ONNX (dynamo exporter), TorchScript (trace), ORT int8 quantization."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from exporters.graphs import GraphSpec

ONNX_OPSET = 18
# Weights beyond this go to ``<model>.data`` beside the graph (ONNX external data): a protobuf
# message cannot exceed 2 GiB, and torch's exporter switches at this same 1.5 GiB (which leaves
# room for the graph itself). Below it the model is one self-contained file.
EXTERNAL_DATA_BYTES = 3 << 29


class ExportError(RuntimeError):
    """The export produced no usable artifact; the message says which step failed."""


class FrozenAxisError(ExportError):
    """An axis declared dynamic came out of the exporter with a fixed size."""


def _dynamic_shapes(spec: GraphSpec) -> tuple[object, ...]:
    """Every named axis dynamic; torch.export infers the relations between them.

    Positional, shaped like the wrapper's parameters: a ``kv_cache`` graph takes its per-layer
    past inputs as ``*past_key_values`` (their number depends on the model), which torch.export
    sees as ONE tuple argument with no per-input names to key a dict by. The ONNX input names
    come from ``input_names``, in the same flattened order.

    Explicit named Dims fail on real relations in these models: Linformer's n_max check bounds
    the sequence, Reformer pads to a multiple of the chunk length (a derived size), ALiBi's mask
    is past + sequence long. ``Dim.DYNAMIC`` lets the exporter derive those ranges itself; the
    result is then checked by :func:`check_dynamic_axes` and by parity at several lengths.
    """
    shapes = [
        {i: torch.export.Dim.DYNAMIC for i, axis in enumerate(shape) if isinstance(axis, str)}
        for _, _, shape in spec.inputs
    ]
    if spec.mode == "kv_cache":  # (input_ids, attention_mask, *past_key_values)
        return (*shapes[:2], tuple(shapes[2:]))
    return tuple(shapes)


def export_onnx(
    module: nn.Module,
    spec: GraphSpec,
    example: tuple[Tensor, ...],
    path: Path,
    dynamic: bool = True,
) -> None:
    """Export with the dynamo exporter into ``path``, with its weights in ``data_file(path)``
    when they exceed :data:`EXTERNAL_DATA_BYTES` (:func:`onnx_files` lists what was written)."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    # The exporter logs registry notes (torchvision ops it skips) that concern no Longhaul model.
    onnx_logger.setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            example,
            dynamo=True,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=_dynamic_shapes(spec) if dynamic else None,
            opset_version=ONNX_OPSET,
            optimize=True,
            verbose=False,
        )
    onnx_logger.setLevel(level)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    # One self-contained file up to the limit (one path to load, one hash to check); a larger
    # model (a bloom-560m is 3.3 GB in fp32) keeps its weights in ``model.onnx.data`` beside
    # the graph, which the store lists and hashes and ONNX Runtime loads from the same directory.
    initializers = program.model.graph.initializers.values()
    weights = sum(v.const_value.nbytes for v in initializers if v.const_value is not None)
    program.save(str(path), external_data=weights > EXTERNAL_DATA_BYTES)


def data_file(path: Path) -> Path:
    """Where a graph at ``path`` keeps external weights (the name torch and ORT both write)."""
    return path.with_name(path.name + ".data")


def onnx_files(path: Path) -> list[Path]:
    """The files an ONNX model at ``path`` consists of: the graph, and the one external-data
    file it references if any (a reference to any other file is refused: the model must travel
    as these files)."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        onnx.external_data_helper.ExternalDataInfo(tensor).location
        for tensor in _tensors(model.graph)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
    }
    if not locations:
        return [path]
    if locations != {data_file(path).name}:
        raise ExportError(
            f"{path} keeps weights in {sorted(locations)}; expected only {data_file(path).name}"
        )
    return [path, data_file(path)]


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph stores: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            subgraphs = [attribute.g] if attribute.HasField("g") else []
            for subgraph in (*subgraphs, *attribute.graphs):
                yield from _tensors(subgraph)


def remove_onnx(path: Path) -> None:
    """Delete an ONNX model and its external-data file."""
    for file in onnx_files(path):
        file.unlink()


def check_dynamic_axes(path: Path, spec: GraphSpec) -> None:
    """Fail loudly when an axis the spec names (e.g. "sequence") has a fixed size in the graph.

    The dynamo exporter can specialise an axis silently (a size-1 example, a guard in the
    model); the resulting graph would reject every other length at serving time.
    """
    model = onnx.load(str(path), load_external_data=False)
    graph_inputs = {i.name: i for i in model.graph.input}
    for name, _, shape in spec.inputs:
        if name not in graph_inputs:
            raise ExportError(f"exported graph has no input named {name!r}")
        dims = graph_inputs[name].type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise ExportError(f"input {name!r} has rank {len(dims)}, expected {len(shape)}")
        for axis, (dim, expected) in enumerate(zip(dims, shape, strict=True)):
            if isinstance(expected, str) and dim.HasField("dim_value"):
                raise FrozenAxisError(
                    f"input {name!r} axis {axis} ({expected}) should be dynamic but the exported "
                    f"graph fixed it to {dim.dim_value}"
                )
    names = [o.name for o in model.graph.output]
    if names != spec.output_names:
        raise ExportError(f"exported graph outputs {names}, expected {spec.output_names}")


def _graphs(module: torch.jit.ScriptModule) -> list[torch._C.Graph]:
    """The graph of every method of ``module`` and of its submodules (a traced module keeps one
    graph per submodule's forward and calls them with prim::CallMethod)."""
    graphs: list[torch._C.Graph] = []
    for sub in module.modules():
        # Every submodule of a ScriptModule is one, with its C++ module as ``_c``; the stub of
        # nn.Module.__getattr__ types any attribute as Tensor | Module.
        handle: torch._C.ScriptModule = sub._c  # type: ignore[assignment]
        graphs.extend(handle._get_method(name).graph for name in handle._method_names())
    return graphs


def fixed_devices(module: torch.jit.ScriptModule) -> list[str]:
    """The devices written as constants into ``module``'s graphs (empty: device-generic)."""
    return [
        node.s("value")
        for graph in _graphs(module)
        # Graph has findAllNodes (torch/csrc/jit/python/python_ir.cpp); the stub lists it on Node.
        for node in graph.findAllNodes("prim::Constant")  # type: ignore[attr-defined]
        if node.output().type().kind() == "DeviceObjType"
    ]


def make_device_generic(module: torch.jit.ScriptModule) -> int:
    """Replace every device constant by the device of the method's first tensor input.

    Tracing records ``torch.arange(n, device=x.device)`` with the device it saw as a constant,
    and ``torch.jit.load(map_location=...)`` moves parameters, buffers and tensor constants but
    not those: a model traced on the CPU and loaded on a GPU would create its position indices
    on the CPU and fail at the first op that mixes them with activations. Every tensor a graph
    creates in Longhaul's architectures belongs on the activations' device, which is the device
    of its inputs, so ``prim::device(first input)`` is what the eager code meant. Returns the
    number of constants replaced; a method without a tensor input keeps its constants.
    """
    replaced = 0
    for graph in _graphs(module):
        tensors = [v for v in graph.inputs() if v.type().kind() == "TensorType"]
        if not tensors:
            continue
        # Graph has findAllNodes (torch/csrc/jit/python/python_ir.cpp); the stub lists it on Node.
        for node in list(graph.findAllNodes("prim::Constant")):  # type: ignore[attr-defined]
            constant = node.output()
            if constant.type().kind() != "DeviceObjType":
                continue
            device = graph.create("prim::device", [tensors[0]], 1)  # one output
            device.insertBefore(node)
            device.output().setType(constant.type())
            constant.replaceAllUsesWith(device.output())
            node.destroy()
            replaced += 1
    return replaced


def export_torchscript(module: nn.Module, example: tuple[Tensor, ...], path: Path) -> None:
    """Trace under no_grad; the saved file loads with torch.jit.load and no Longhaul code, on
    any device (:func:`make_device_generic`)."""
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing is deprecated upstream and warns about shape arithmetic it records; parity at
        # several lengths is what proves the trace generalises, so the warnings add nothing.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
    make_device_generic(traced)
    left = fixed_devices(traced)
    if left:
        raise ExportError(f"the traced graph still fixes tensors to device(s) {sorted(set(left))}")
    traced.save(str(path))


def quantize_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime dynamic quantization: int8 weights, activations quantized at run time.

    A source with external data (over :data:`EXTERNAL_DATA_BYTES`) is quantized into external
    data too, since the int8 graph may still be over the protobuf limit; when it is not over
    :data:`EXTERNAL_DATA_BYTES` (int8 weights are a quarter of fp32 ones: a bloom-560m's
    3.3 GB become 0.8 GB) its weights are folded back into one self-contained file.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = len(onnx_files(src)) > 1
    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QInt8, use_external_data_format=external
    )
    if external and data_file(dst).stat().st_size <= EXTERNAL_DATA_BYTES:
        model = onnx.load(str(dst))  # reads the external weights into the message
        onnx.external_data_helper.convert_model_from_external_data(model)
        onnx.save_model(model, str(dst))
        data_file(dst).unlink()
