"""``python -m exporters``: train, export and import models."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

ARCH_NAMES = ("linformer", "reformer", "alibi", "shatter")
# The keys of exporters.importers.IMPORTERS, spelled out so --help does not import torch.
IMPORT_FORMATS = ("hf-bloom", "hf-mpt", "hf-reformer", "lucidrains-linformer")


def _cmd_train(args: argparse.Namespace) -> int:
    from exporters.training import train

    report = train(args.arch, args.preset, args.out, steps=args.steps, seed=args.seed)
    print(json.dumps(report, indent=2))
    print(
        f"wrote {args.out} ({report['architecture']}/{report['preset']}, {report['steps']} steps, "
        f"{report['seconds']} s, held-out loss {report['held_out_loss']} vs unigram "
        f"{report['unigram_baseline_loss']}, ratio {report['ratio_to_unigram']})"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from exporters.export import ExportRequest, export
    from exporters.parity import ParityError, format_report

    request = ExportRequest(
        checkpoint=args.checkpoint,
        store=args.store,
        name=args.name,
        format=args.format,
        precision=args.precision,
        version=args.version,
        max_context=args.max_context,
        eval_text=args.eval_text,
        skip_extrapolation=args.skip_extrapolation,
        task=args.task,
        memory_budget=None if args.memory_budget is None else round(args.memory_budget * 2**30),
    )
    try:
        result = export(request)
    except ParityError as exc:
        print(format_report(exc.report))  # the table says where; main() prints the one line
        raise
    print(format_report(result.report))
    print(result.summary())
    print(f"precision {result.published.manifest.precision}: "
          f"{result.published.manifest.precision_reason}")  # fmt: skip
    return 0


def _cmd_demo_store(args: argparse.Namespace) -> int:
    from exporters.demo_store import build_demo_store
    from exporters.parity import ParityError, format_report
    from model_store import ModelRepository

    started = time.perf_counter()
    try:
        timings = build_demo_store(args.checkpoints, args.store, print, preset=args.preset)
    except ParityError as exc:
        print(format_report(exc.report))  # the table says where; main() prints the one line
        raise
    results = ModelRepository(args.store).verify_all()
    bad = [f"{name}/{version}" for (name, version), result in results.items() if not result.ok]
    for step, seconds in timings.items():
        print(f"{step:<32}{seconds:8.1f} s")
    print(
        f"demo store {args.store}: {len(results)} versions, "
        f"{'all verified' if not bad else 'FAILED: ' + ', '.join(bad)}, "
        f"{time.perf_counter() - started:.1f} s"
    )
    return 1 if bad else 0


def _cmd_import(args: argparse.Namespace) -> int:
    from exporters.importers import import_checkpoint

    result = import_checkpoint(
        args.source_format,
        args.src,
        args.out,
        tokenizer=args.tokenizer,
        trained_context=args.trained_context,
        hash_seed=args.hash_seed,
        byte_vocab_offset=args.byte_vocab_offset,
    )
    for note in result.notes:
        print(f"note: {note}")
    print(result.summary())
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: what was wrong and where the help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m exporters", description=__doc__)
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of a failure as well"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a demo or tiny model and write a checkpoint")
    p.add_argument("--arch", choices=ARCH_NAMES, required=True)
    p.add_argument("--preset", choices=("tiny", "demo"), required=True)
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="export a checkpoint, verify parity, publish to a store")
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (config.json + safetensors)")
    p.add_argument(
        "--format",
        choices=("onnx", "torchscript"),
        default="onnx",
        help="onnx (default): with --precision auto, the fastest accurate CPU path measured in "
        "docs/benchmarks.md section 2",
    )
    p.add_argument("--store", type=Path, required=True, help="model store root")
    p.add_argument("--name", required=True, help="model name in the store, e.g. alibi-demo")
    p.add_argument("--version", type=int, default=None, help="default: next free version")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16", "int8"),
        default="auto",
        help="auto (default): the fastest precision within the parity floor for the format "
        "(ONNX int8, else fp32; TorchScript fp32), see exporters/precision.py",
    )
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="override the measured/verified max_context (recorded in the manifest)",
    )
    p.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        metavar="GIB",
        help="without --max-context, a model limited only by its position table is verified "
        "and served at the longest length whose predicted parity peak fits this many GiB "
        "(default: 0.75 of the memory available), see exporters/memory_bound.py",
    )
    p.add_argument(
        "--eval-text",
        type=Path,
        default=None,
        metavar="FILE|DIR",
        help="ALiBi: measure the length curve on this text (a file, or every file under a "
        "directory) instead of the held-out standard-library text; recorded in the manifest",
    )
    p.add_argument(
        "--skip-extrapolation",
        action="store_true",
        help="ALiBi: do not measure the length curve (hours for large models on a few CPU "
        "cores); serve --max-context unmeasured",
    )
    p.add_argument(
        "--task",
        choices=("generate", "encode"),
        default=None,
        help="default: the model's own; encode publishes a causal LM for /v1/encode too",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "import", help="convert a checkpoint of another library into a Longhaul checkpoint"
    )
    p.add_argument("source_format", choices=IMPORT_FORMATS, help="what SRC holds")
    p.add_argument("src", type=Path, help="source directory (config.json + weights)")
    p.add_argument("--out", type=Path, required=True, help="Longhaul checkpoint directory to write")
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="HF tokenizers JSON to use when SRC has no tokenizer.json",
    )
    p.add_argument(
        "--trained-context",
        type=int,
        default=None,
        help="override the training length read from the source config",
    )
    p.add_argument(
        "--hash-seed",
        type=int,
        default=None,
        help="hf-reformer without hash_seed in its config: seed of the hashing rotations, fixed "
        "once at import (default 0; recorded in the checkpoint)",
    )
    p.add_argument(
        "--byte-vocab-offset",
        type=int,
        default=None,
        help="the vocabulary is UTF-8 bytes shifted by N ids (HF's enwik8: 2, detected when "
        "the source has no tokenizer file and 258 ids)",
    )
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("demo-store", help="train (once) and export the demo models to a store")
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    p.add_argument("--store", type=Path, default=Path("models"))
    p.add_argument("--preset", choices=("tiny", "demo"), default="demo")
    p.set_defaults(func=_cmd_demo_store)
    for command in sub.choices.values():  # --debug also after the command's name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    return parser


def _failure(exc: BaseException) -> tuple[str, str, int] | None:
    """(what failed, what to do, exit code) for the failures a user can meet; None for a bug."""
    from exporters.checkpoint import CheckpointError
    from exporters.formats import ExportError
    from exporters.importers.source import UnsupportedCheckpointError
    from exporters.parity import ParityError
    from model_store.errors import ManifestError, ModelStoreError, PublishError

    if isinstance(exc, ParityError):
        return str(exc), "the table above shows which case and output differ", 1
    if isinstance(exc, ExportError):
        return f"export failed: {exc}", "run again with --debug for the exporter's traceback", 1
    if isinstance(exc, UnsupportedCheckpointError):
        return str(exc), "that option cannot be reproduced; see the README's import section", 2
    if isinstance(exc, CheckpointError):
        return str(exc), "pass a directory written by 'train' or 'import'", 2
    if isinstance(exc, ManifestError | PublishError):
        return str(exc), "check the store with 'python -m model_store verify STORE'", 2
    if isinstance(exc, ModelStoreError):
        return str(exc), "check the store path and the model name", 2
    if isinstance(exc, FileExistsError):
        return str(exc), "choose another output or remove the existing one", 2
    if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        return str(exc), "check the path", 2
    if isinstance(exc, PermissionError):
        return str(exc), "check the file's permissions", 2
    if isinstance(exc, OSError):
        return f"cannot read or write a file: {exc}", "check the path and free disk space", 2
    if isinstance(exc, ValueError):
        return str(exc), "check the arguments (--help)", 2
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except Exception as exc:
        known = _failure(exc)
        if known is None or args.debug:
            raise
        what, todo, code = known
        print(f"error: {' '.join(what.split())}; {todo}", file=sys.stderr)
        return code
