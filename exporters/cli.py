"""``python -m exporters``: train, export and import models."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from model_store.errors import ModelStoreError

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
    from exporters.formats import ExportError
    from exporters.parity import ParityError, format_report

    request = ExportRequest(
        checkpoint=args.checkpoint,
        store=args.store,
        name=args.name,
        format=args.format,
        precision=args.precision,
        version=args.version,
        max_context=args.max_context,
        task=args.task,
    )
    try:
        result = export(request)
    except ParityError as exc:
        print(format_report(exc.report))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ExportError as exc:
        print(f"error: export failed: {exc}", file=sys.stderr)
        return 1
    print(format_report(result.report))
    print(result.summary())
    return 0


def _cmd_demo_store(args: argparse.Namespace) -> int:
    from exporters.demo_store import build_demo_store
    from model_store import ModelRepository

    started = time.perf_counter()
    timings = build_demo_store(args.checkpoints, args.store, print, preset=args.preset)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m exporters", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a demo or tiny model and write a checkpoint")
    p.add_argument("--arch", choices=ARCH_NAMES, required=True)
    p.add_argument("--preset", choices=("tiny", "demo"), required=True)
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="export a checkpoint, verify parity, publish to a store")
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--format", choices=("onnx", "torchscript"), required=True)
    p.add_argument("--store", type=Path, required=True, help="model store root")
    p.add_argument("--name", required=True, help="model name in the store, e.g. alibi-demo")
    p.add_argument("--version", type=int, default=None, help="default: next free version")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "int8"), default="fp32")
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="override the measured/verified max_context (recorded in the manifest)",
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, FileExistsError, ModelStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
