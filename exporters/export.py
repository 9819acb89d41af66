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
from exporters.memory_bound import (
    FLOOR,
    PROBE_LENGTHS,
    Choice,
    PeakFit,
    candidate_lengths,
    choose_length,
    default_budget,
    gib,
    peak_above,
    settled_resident_bytes,
)
from exporters.memory_bound import RULE as BOUND_RULE
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
    MemoryBoundReport,
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
    # Bytes the parity sweep may add when the exporter chooses max_context from the model's
    # limit (exporters/memory_bound.py); None: DEFAULT_BUDGET_FRACTION of the memory available.
    memory_budget: int | None = None


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
        bound = manifest.memory_bound
        limit = "" if bound is None else f" of {bound.limit}, bounded by memory"
        if bound is not None and bound.parity_failed_lengths:
            limit += f"; parity failed at {bound.parity_failed_lengths}"
        return (
            f"published {self.published.path} ({size / 1e6:.1f} MB, {manifest.precision}, "
            f"max_context {manifest.max_context}{limit}): {bar}, {self.seconds:.1f} s, "
            f"peak RSS {peak_rss_gib():.2f} GiB"
        )


def peak_rss_gib() -> float:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _max_context(
    ckpt: Checkpoint, request: ExportRequest
) -> tuple[int, ExtrapolationReport | None, bool]:
    """(max_context or the longest it may be, the ALiBi length curve, whether the length is
    still to be bounded by memory: chosen by default and longer than FLOOR)."""
    config = ckpt.config
    if request.memory_budget is not None and request.memory_budget <= 0:
        raise ValueError(f"--memory-budget must be positive, got {request.memory_budget} bytes")
    if request.memory_budget is not None and request.max_context is not None:
        raise ValueError(
            "--memory-budget bounds the max_context the exporter chooses; with --max-context N "
            "there is nothing to choose (drop one of them)"
        )
    hard = config.max_positions
    extrapolation = None
    extrapolates = get_architecture(ckpt.architecture).extrapolates
    if extrapolates and request.memory_budget is not None:
        raise ValueError(
            "--memory-budget bounds a length chosen from the model's limit; an ALiBi model's "
            "max_context comes from its measured length curve"
        )
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
    bounded = request.max_context is None and not extrapolates and chosen_context > FLOOR
    return chosen_context, extrapolation, bounded


@dataclass(frozen=True)
class MemoryBound:
    """The probes behind a max_context chosen by memory (exporters/memory_bound.py)."""

    limit: int
    baseline: int  # resident bytes before the first probe; peaks are measured above it
    budget: int
    budget_source: str
    fit: PeakFit
    choice: Choice

    @property
    def chosen(self) -> int:
        return self.choice.length

    def report(self, measured_peak: int | None, failed: list[int]) -> MemoryBoundReport:
        return MemoryBoundReport(
            parity_failed_lengths=failed,
            limit=self.limit,
            budget_bytes=self.budget,
            budget=self.budget_source,
            probe_lengths=list(self.fit.lengths),
            probe_peak_bytes=list(self.fit.peaks),
            fixed_bytes=round(self.fit.fixed),
            per_token_bytes=round(self.fit.per_token, 1),
            predicted_peak_bytes=self.choice.predicted_peak,
            measured_peak_bytes=measured_peak,
            fits=self.choice.fits,
            rule=BOUND_RULE.format(floor=FLOOR, probes=list(self.fit.lengths)),
        )


def describe_bound(bound: MemoryBound) -> str:
    """What was chosen, why, and how to verify longer."""
    fit, choice = bound.fit, bound.choice
    probes = ", ".join(
        f"{gib(peak)} at {length}" for length, peak in zip(fit.lengths, fit.peaks, strict=True)
    )
    why = (
        f"parity peaks measured {probes} tokens: {gib(fit.fixed)} + "
        f"{fit.per_token / 1024:.1f} KiB per token; budget {gib(bound.budget)} "
        f"({bound.budget_source})"
    )
    if choice.length == bound.limit:
        return (
            f"max_context {choice.length} (the model's limit): predicted peak "
            f"{gib(choice.predicted_peak)} fits ({why})"
        )
    head = (
        f"max_context {choice.length}, not the model's limit {bound.limit}: parity at "
        f"{bound.limit} is predicted to peak at {gib(bound.fit.predict(bound.limit))}, at "
        f"{choice.length} {gib(choice.predicted_peak)}"
    )
    if not choice.fits:
        head += f" (over the budget even there; {FLOOR} is the shortest length verified)"
    return (
        f"{head} ({why}). To serve longer, verify it where it fits: --max-context N, or "
        f"--memory-budget GIB on a machine with more memory"
    )


def _shorter_after_failure(report: Report, max_context: int) -> int | None:
    """The next length to verify after a default-length parity failure, or None: stop (it
    passed, or a case shorter than max_context failed too, which no shorter length mends).

    Long-context numerics can fail where short ones pass for a reason that is the model's,
    not the graph's: in a hashing model (Reformer) a query whose two best bucket scores differ
    by one float32 step lands in either bucket by rounding alone, and at 32K tokens the eager
    fp32 model already differs from its own float64 run (docs/decisions.md, "Served length
    bounded by memory"). A length the user did not ask for is then halved, down to FLOOR,
    rather than refused; an explicit --max-context is verified as asked or refused."""
    if report.passed or max_context <= FLOOR:
        return None
    failing = [case for case in report.cases if case.worst_ratio(report.rule) > 1.0]
    if report.precision != "fp32" or any(case.length < max_context for case in failing):
        return None
    return candidate_lengths(max_context)[1]  # the next shorter length the bound would try


def _bound_by_memory(
    reference: torch.nn.Module,
    runner: Runner,
    spec: GraphSpec,
    ckpt: Checkpoint,
    limit: int,
    request: ExportRequest,
) -> MemoryBound:
    """Probe the parity sweep at PROBE_LENGTHS, fit its peak, choose the length that fits.

    A probe is a parity sweep in its own right: a graph that fails one fails here, before the
    long sweep (an int8 attempt that misses the floor costs the probe, not hours at 2^17)."""
    baseline = settled_resident_bytes()
    if request.memory_budget is None:
        budget, source = default_budget()
    else:
        budget, source = request.memory_budget, "--memory-budget"
    if request.progress:
        tqdm.write(
            f"max_context: no --max-context, the model allows {limit}; probing the parity "
            f"sweep's memory at {list(PROBE_LENGTHS)} tokens"
        )
    peaks = []
    for length in PROBE_LENGTHS:
        with peak_above(baseline) as peak:
            probe = run_parity(
                reference, runner, spec, ckpt.config, [length], request.precision, False
            )
        if not probe.passed:
            raise ParityError(
                probe, f"{request.name}: {probe.summary()} (memory probe); nothing was published"
            )
        peaks.append(peak())
    fit = PeakFit(PROBE_LENGTHS, tuple(peaks))
    return MemoryBound(limit, baseline, budget, source, fit, choose_length(limit, fit, budget))


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
    """Short, trained and long: 2x trained (up to max_context) and max_context for a model that
    extrapolates (ALiBi), >= 4096 for the others. Never past max_context: a model trained at
    2^19 tokens but served at 64K is verified at the lengths it is served at."""
    trained = min(ckpt.trained_context, max_context)
    if get_architecture(ckpt.architecture).extrapolates:
        long = {min(2 * trained, max_context), max_context}
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
    past = tuple(
        torch.zeros(2, int(heads), 3, int(head_dim)) for _, heads, _, head_dim in _past_shapes(spec)
    )
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
    memory_bound: MemoryBoundReport | None = None,
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
        memory_bound=memory_bound,
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
    max_context: int  # when memory_bound: the longest it may be (the model's limit)
    extrapolation: ExtrapolationReport | None
    task: str
    memory_bound: bool = False  # export() probes each graph and bounds max_context by memory


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
    max_context, extrapolation, bounded = _max_context(ckpt, request)
    return Prepared(ckpt, max_context, extrapolation, _task(ckpt, request.task), bounded)


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

    with tempfile.TemporaryDirectory(prefix="longhaul-export-") as tmp:
        staging = Path(tmp)
        model_path, runner = _write_graph(ckpt, spec, request, staging)
        shutil.copy(request.checkpoint / TOKENIZER_FILE, staging / TOKENIZER_FILE)
        steps.update()

        reference = wrap(ckpt.model.float(), spec, torch.float32)
        bound = None
        if prepared.memory_bound:
            bound = _bound_by_memory(reference, runner, spec, ckpt, max_context, request)
            max_context = bound.chosen
            if request.progress:
                tqdm.write(describe_bound(bound))
        failed: list[int] = []
        while True:
            lengths = parity_lengths(ckpt, max_context)
            with peak_above(bound.baseline if bound else None) as parity_peak:
                report = run_parity(
                    reference, runner, spec, ckpt.config, lengths, request.precision,
                    request.progress,
                )  # fmt: skip
            shorter = _shorter_after_failure(report, max_context) if bound is not None else None
            if shorter is None:
                break
            failed.append(max_context)
            if request.progress:
                tqdm.write(
                    f"max_context: {report.summary()}. The length was chosen by default, so "
                    f"it is published only as long as parity verifies it: trying {shorter}"
                )
            max_context = shorter
        del runner  # the session's arena goes before the next attempt builds its own
        steps.update()
        if not report.passed:
            steps.close()
            raise ParityError(report, f"{request.name}: {report.summary()}; nothing was published")

        memory_report = None
        if bound is not None:
            memory_report = bound.report(parity_peak(), failed)
            if request.progress:
                tqdm.write(
                    f"parity at {max_context} tokens peaked at {gib(parity_peak())} above the "
                    f"baseline (predicted {gib(bound.choice.predicted_peak)})"
                )
        manifest = build_manifest(
            request, ckpt, spec, report, max_context, prepared.extrapolation, model_path.name,
            memory_report,
        )  # fmt: skip
        published = repo.publish(staging, manifest)
        steps.update()
        steps.close()
    return ExportResult(published=published, report=report, seconds=time.perf_counter() - started)


__all__ = ["ExportError", "ExportRequest", "ExportResult", "ParityError", "export"]
