"""``export``: checkpoint -> verified graph -> atomically published model-store version.

Steps: load the checkpoint, choose the graph (encode, full-sequence or kv-cache), write it in the
requested format and precision, check its dynamic axes, run parity against the eager fp32 model,
and publish only when parity passes. The parity report is printed either way.
"""

from __future__ import annotations

import dataclasses
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from exporters import __version__
from exporters.architectures import (
    architecture_of,
    build_model,
    config_to_dict,
    get_architecture,
)
from exporters.checkpoint import (
    TOKENIZER_FILE,
    Checkpoint,
    directory_sha256,
    load_checkpoint,
    model_with_weights,
)
from exporters.formats import (
    ONNX_OPSET,
    ExportError,
    check_dynamic_axes,
    export_onnx,
    export_torchscript,
    quantize_int8,
    remove_onnx,
)
from exporters.graphs import GraphSpec, graph_spec, wrap
from exporters.parity import ParityError, Report, run_parity
from exporters.precision import AUTO, REQUESTED, export_auto
from exporters.runtime import OnnxRunner, Runner, TorchScriptRunner
from model_store import Manifest, ModelRepository, ModelVersion
from model_store.manifest import (
    NEW_ENTRIES_OUTPUT,
    PAST_INPUT_PREFIX,
    UNASSIGNED_VERSION,
    CacheLayout,
    ExtrapolationReport,
    GraphSignature,
    ParityCase,
    ParityReport,
    Provenance,
    TensorSpec,
)

MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
# Which precisions each format can produce here, and why the others are refused:
# ONNX Runtime's CPU EP has no bf16 kernels for most ops and spotty fp16 ones, so reduced
# precision ONNX means int8 dynamic quantization; torch runs bf16/fp16 natively, int8 it does not.
SUPPORTED_PRECISIONS = {"onnx": ("fp32", "int8"), "torchscript": ("fp32", "bf16", "fp16")}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Encoders and full-sequence decoders are verified at least this long (the long-context claim).
LONG_PARITY_LENGTH = 4096
SHORT_PARITY_LENGTH = 16


@dataclass(frozen=True)
class ExportRequest:
    checkpoint: Path
    store: Path
    name: str
    format: str
    precision: str = "fp32"  # or "auto": exporters.precision chooses (the CLI's default)
    version: int | None = None
    max_context: int | None = None  # override; recorded in the manifest
    progress: bool = True
    precision_reason: str | None = None  # recorded in the manifest; set by exporters.precision
    eval_text: Path | None = None  # ALiBi length curve on this file/directory, not the corpus
    skip_extrapolation: bool = False  # ALiBi: serve max_context unmeasured (needs max_context)
    # None: the config's own task. "encode" also publishes a causal LM's full-sequence graph as
    # an encoder (its hidden states, pooled by the service, on /v1/encode and /v1/embeddings).
    task: str | None = None


@dataclass(frozen=True)
class ExportResult:
    published: ModelVersion
    report: Report
    seconds: float

    def summary(self) -> str:
        manifest = self.published.manifest
        size = sum(entry.size for entry in manifest.files.values())
        if self.report.precision == "fp32":
            bar = (
                f"max|diff| {self.report.max_abs_diff:.2e} "
                f"({self.report.worst_ratio:.2f} of the rule's bound)"
            )
        else:
            bar = f"min cosine {self.report.min_cosine:.6f}"
        return (
            f"published {self.published.path} ({size / 1e6:.1f} MB, {manifest.precision}, "
            f"max_context {manifest.max_context}): {bar}, {self.seconds:.1f} s, "
            f"peak RSS {peak_rss_gib():.2f} GiB"
        )


def peak_rss_gib() -> float:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _max_context(
    ckpt: Checkpoint, request: ExportRequest
) -> tuple[int, ExtrapolationReport | None]:
    config = ckpt.config
    hard = config.max_positions
    extrapolation = None
    extrapolates = get_architecture(ckpt.architecture).extrapolates
    if extrapolates and request.skip_extrapolation:
        if request.max_context is None or request.eval_text is not None:
            raise ValueError(
                "--skip-extrapolation needs --max-context N (nothing else chooses the served "
                "length) and no --eval-text"
            )
        default = request.max_context
    elif extrapolates:
        from exporters.extrapolation import RULE, measure

        curve = measure(
            ckpt.model, ckpt.tokenizer, ckpt.trained_context, request.progress, request.eval_text
        )
        extrapolation = ExtrapolationReport(
            lengths=curve.lengths,
            losses=[round(v, 5) for v in curve.losses],
            ratios=[round(v, 5) for v in curve.ratios],
            rule=RULE,
            max_context_override=request.max_context,
            text=curve.text,
        )
        default = curve.chosen
    elif request.eval_text is not None or request.skip_extrapolation:
        raise ValueError(
            f"--eval-text and --skip-extrapolation concern the ALiBi length curve; "
            f"{ckpt.architecture} has none"
        )
    else:
        # No measured limit: serve what parity verified (hard limit when the model has one).
        default = hard if hard is not None else max(LONG_PARITY_LENGTH, ckpt.trained_context)
    chosen_context = request.max_context or default
    if hard is not None and chosen_context > hard:
        raise ValueError(
            f"max_context {chosen_context} exceeds the model's hard limit n_max={hard}"
        )
    return chosen_context, extrapolation


def _exportable(ckpt: Checkpoint) -> Checkpoint:
    """The checkpoint with the config its architecture exports (the same function, export-safe
    settings) and the same weights."""
    config = get_architecture(ckpt.architecture).export_config(ckpt.config)
    if config != ckpt.config:
        model = model_with_weights(config, ckpt.model.state_dict(), str(ckpt.path))  # shared
        ckpt = dataclasses.replace(ckpt, config=config, model=model)
    return ckpt


def _graph_model(ckpt: Checkpoint) -> torch.nn.Module:
    """The model the graph is made from: attention unblocked (``attention_block=0``), same
    weights (shared, not copied). A loop over query blocks does not stay dynamic when exported
    (traced or torch.export'ed, its trip count is the example's); callers of the graphs bound
    the tokens per call instead (docs/decisions.md). The eager reference stays blocked."""
    if not getattr(ckpt.config, "attention_block", 0):
        return ckpt.model
    with torch.device("meta"):  # no second set of weights, not even briefly
        model = build_model(dataclasses.replace(ckpt.config, attention_block=0))
    model.load_state_dict(ckpt.model.state_dict(), assign=True)
    return model.eval()


def _task(ckpt: Checkpoint, requested: str | None) -> str:
    own = str(ckpt.config.task)
    if requested is None or requested == own:
        return own
    if requested == "encode":  # any model's hidden states can be pooled; only LMs generate
        return requested
    raise ValueError(f"a {own} model cannot be published as {requested!r} (choose encode)")


def parity_lengths(ckpt: Checkpoint, max_context: int) -> list[int]:
    """Short, trained and long: 2x trained (and max_context) for a model that extrapolates
    (ALiBi), >= 4096 for the others. Never past max_context: a model trained at 2^19 tokens but
    served at 64K is verified at the lengths it is served at."""
    trained = min(ckpt.trained_context, max_context)
    if get_architecture(ckpt.architecture).extrapolates:
        long = {2 * trained, max_context}
    else:
        long = {
            max(LONG_PARITY_LENGTH, max_context)
            if ckpt.config.max_positions is None
            else max_context
        }
    return sorted({SHORT_PARITY_LENGTH, trained, *long})


def _example(spec: GraphSpec, config: Any) -> tuple[torch.Tensor, ...]:
    """Example inputs with every dynamic size >= 2 (the exporter specialises sizes 0 and 1),
    including the sizes an architecture derives from the length (``example_length``)."""
    if spec.mode != "kv_cache":
        length = get_architecture(architecture_of(config)).example_length(config)
        ids = torch.randint(4, config.vocab_size, (2, length))
        return ids, torch.ones_like(ids)
    ids = torch.randint(4, config.vocab_size, (2, 8))
    # One (2, heads, 3, head_dim) tensor per past input; distinct tensors, so the trace cannot
    # tie the inputs together.
    past = tuple(torch.zeros(2, heads, 3, head_dim) for _, heads, _, head_dim in _past_shapes(spec))
    return ids, torch.ones(2, 11, dtype=torch.long), *past


def _past_shapes(spec: GraphSpec) -> list[tuple[str | int, ...]]:
    """Shapes of the per-layer past inputs (everything after input_ids and attention_mask)."""
    return [shape for _, _, shape in spec.inputs[2:]]


def _signature(spec: GraphSpec) -> GraphSignature:
    """The manifest's view of ``spec``; a kv_cache graph's layout takes its dtype from the
    graph's cache output (float32 at every precision: docs/decisions.md, "Export")."""
    cache = None
    if spec.mode == "kv_cache":
        _, dtype, (layers, _, _, heads, _, head_dim) = spec.outputs[1]
        cache = CacheLayout(
            input_prefix=PAST_INPUT_PREFIX,
            inputs=spec.input_names[2:],
            output=NEW_ENTRIES_OUTPUT,
            layout=["layers", "2", "batch", "heads", "past_sequence", "head_dim"],
            n_layers=int(layers),
            n_heads=int(heads),
            head_dim=int(head_dim),
            dtype=dtype,
        )
    return GraphSignature(
        inputs=[TensorSpec(name=n, dtype=d, shape=list(s)) for n, d, s in spec.inputs],
        outputs=[TensorSpec(name=n, dtype=d, shape=list(s)) for n, d, s in spec.outputs],
        generation_mode=None if spec.mode == "encode" else spec.mode,  # type: ignore[arg-type]
        cache=cache,
    )


def _parity_report(report: Report) -> ParityReport:
    reduced = report.precision != "fp32"
    return ParityReport(
        reference=report.reference,
        lengths=report.lengths,
        cases=[
            ParityCase(
                batch=c.batch,
                length=c.length,
                max_abs_diff=c.max_abs_diff,
                of_bound=None if reduced else round(c.worst_ratio(report.rule), 4),
                cosine=min(1.0, c.cosine) if reduced else None,
                argmax_agreement=c.argmax_agreement if reduced else None,
            )
            for c in report.cases
        ],
        max_abs_diff=report.max_abs_diff,
        tolerance=None if reduced else report.rule.rtol,
        rule=report.rule_text,
        min_cosine=min(1.0, report.min_cosine),
        argmax_agreement=report.argmax_agreement,
        passed=report.passed,
    )


def build_manifest(
    request: ExportRequest,
    ckpt: Checkpoint,
    spec: GraphSpec,
    report: Report,
    max_context: int,
    extrapolation: ExtrapolationReport | None,
    model_file: str,
) -> Manifest:
    """The manifest of a graph that passed parity; ``publish`` fills in version and checksums."""
    return Manifest(
        name=request.name,
        version=request.version or UNASSIGNED_VERSION,
        architecture=ckpt.architecture,  # type: ignore[arg-type]
        task="encode" if spec.mode == "encode" else "generate",  # --task encode: a pooled LM
        format=request.format,  # type: ignore[arg-type]
        precision=request.precision,  # type: ignore[arg-type]
        precision_reason=request.precision_reason or REQUESTED,
        max_context=max_context,
        trained_context=ckpt.trained_context,
        config=config_to_dict(ckpt.config),
        signature=_signature(spec),
        parity=_parity_report(report),
        provenance=Provenance(
            source_checkpoint=str(Path(request.checkpoint).resolve()),
            source_checkpoint_sha256=directory_sha256(request.checkpoint),
            exporter_version=__version__,
            created_at=datetime.now(UTC),
            torch_version=torch.__version__,
            onnx_opset=ONNX_OPSET if request.format == "onnx" else None,
        ),
        extrapolation=extrapolation,
        model_file=model_file,
    )


def _write_graph(
    ckpt: Checkpoint, spec: GraphSpec, request: ExportRequest, staging: Path
) -> tuple[Path, Runner]:
    model_path = staging / MODEL_FILES[request.format]
    dtype = TORCH_DTYPES.get(request.precision, torch.float32)
    model = _graph_model(ckpt)
    model = model.to(dtype) if request.format == "torchscript" else model
    module = wrap(model, spec, dtype)
    example = _example(spec, ckpt.config)
    if request.format == "onnx":
        fp32_path = staging / "fp32.onnx" if request.precision == "int8" else model_path
        export_onnx(module, spec, example, fp32_path)
        check_dynamic_axes(fp32_path, spec)
        if request.precision == "int8":
            quantize_int8(fp32_path, model_path)
            remove_onnx(fp32_path)  # and its external data: staging is what gets published
            check_dynamic_axes(model_path, spec)
        return model_path, OnnxRunner(model_path, spec.output_names)
    export_torchscript(module, example, model_path)
    ckpt.model.float()  # the eager reference stays fp32
    return model_path, TorchScriptRunner(model_path, spec.input_names, spec.output_names)


@dataclass(frozen=True)
class Prepared:
    """What every precision attempt of one export shares: the checkpoint, the served length and
    the ALiBi length curve behind it. Measured once, so the ``auto`` fallback to fp32 does not
    repeat the extrapolation sweep (at a trained length of 2048 it scores 16K-token windows)."""

    ckpt: Checkpoint
    max_context: int
    extrapolation: ExtrapolationReport | None
    task: str


def _check_precision(request: ExportRequest, precision: str) -> None:
    if request.format not in SUPPORTED_PRECISIONS:
        raise ValueError(f"unknown format {request.format!r}; expected onnx or torchscript")
    if precision != AUTO and precision not in SUPPORTED_PRECISIONS[request.format]:
        raise ValueError(
            f"precision {precision} is not supported for {request.format}; "
            f"choose one of {', '.join(SUPPORTED_PRECISIONS[request.format])}"
        )


def prepare(request: ExportRequest) -> Prepared:
    """Load the checkpoint, refuse an existing version, choose max_context (for ALiBi: run the
    extrapolation sweep)."""
    _check_precision(request, request.precision)
    ckpt = _exportable(load_checkpoint(request.checkpoint))
    repo = ModelRepository(request.store, create=True)
    existing = repo.list_versions(request.name) if request.name in repo.list_models() else []
    if request.version is not None and request.version in existing:
        raise FileExistsError(
            f"{request.name} version {request.version} already exists in {request.store}"
        )
    max_context, extrapolation = _max_context(ckpt, request)
    return Prepared(ckpt, max_context, extrapolation, _task(ckpt, request.task))


def export(request: ExportRequest, prepared: Prepared | None = None) -> ExportResult:
    """Export ``request``; ``prepared`` (from :func:`prepare` of the same request) skips the
    loading and the sweep."""
    if request.precision == AUTO:
        return export_auto(request)
    started = time.perf_counter()
    _check_precision(request, request.precision)
    prepared = prepared or prepare(request)
    ckpt, max_context = prepared.ckpt, prepared.max_context
    repo = ModelRepository(request.store, create=True)

    steps = tqdm(total=3, desc=f"export {request.name}", disable=not request.progress)
    spec = graph_spec(prepared.task, ckpt.config)
    lengths = parity_lengths(ckpt, max_context)

    with tempfile.TemporaryDirectory(prefix="longhaul-export-") as tmp:
        staging = Path(tmp)
        model_path, runner = _write_graph(ckpt, spec, request, staging)
        shutil.copy(request.checkpoint / TOKENIZER_FILE, staging / TOKENIZER_FILE)
        steps.update()

        reference = wrap(ckpt.model.float(), spec, torch.float32)
        report = run_parity(
            reference, runner, spec, ckpt.config, lengths, request.precision, request.progress
        )
        del runner  # the session's arena goes before the next attempt builds its own
        steps.update()
        if not report.passed:
            steps.close()
            raise ParityError(report, f"{request.name}: {report.summary()}; nothing was published")

        manifest = build_manifest(
            request, ckpt, spec, report, max_context, prepared.extrapolation, model_path.name
        )
        published = repo.publish(staging, manifest)
        steps.update()
        steps.close()
    return ExportResult(published=published, report=report, seconds=time.perf_counter() - started)


__all__ = ["ExportError", "ExportRequest", "ExportResult", "ParityError", "export"]
