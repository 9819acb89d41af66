"""``python -m model_store``: list what a store holds, verify its checksums.

Exit codes: 0 all good, 1 a mismatch or an unreadable manifest, 2 usage errors (missing store,
unknown model). A version whose manifest schema is refused as outdated (its graph cannot be
served by this version; re-export it) is reported but is not an error: the store is intact.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from model_store.errors import (
    ManifestError,
    ModelNotFoundError,
    ModelStoreError,
    OutdatedManifestError,
    StoreNotFoundError,
)
from model_store.manifest import Manifest
from model_store.repository import ModelRepository, VerificationResult

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_USAGE = 2

LIST_COLUMNS = (
    "NAME",
    "VERSION",
    "ARCH",
    "TASK",
    "FORMAT",
    "PRECISION",
    "MAX_CONTEXT",
    "SIZE",
    "PARITY",
    "MAX_DIFF",
    "COSINE",
)


def human_size(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _row(manifest: Manifest) -> list[str]:
    parity = manifest.parity
    return [
        manifest.name,
        str(manifest.version),
        manifest.architecture,
        manifest.task,
        manifest.format,
        manifest.precision,
        str(manifest.max_context),
        human_size(manifest.total_size),
        "passed" if parity.passed else "FAILED",
        f"{parity.max_abs_diff:.2e}",
        "-" if parity.min_cosine is None else f"{parity.min_cosine:.5f}",
    ]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _cmd_list(repo: ModelRepository, args: argparse.Namespace) -> int:
    rows = [list(LIST_COLUMNS)]
    broken = 0
    names = [args.name] if args.name else repo.list_models()
    for name in names:
        for version in repo.list_versions(name):
            try:
                rows.append(_row(repo.load_manifest(name, version)))
            except OutdatedManifestError as exc:
                print(f"warning: {name}/{version} is outdated: {exc}", file=sys.stderr)
            except ManifestError as exc:
                broken += 1
                print(f"warning: {name}/{version}: {exc}", file=sys.stderr)
    if len(rows) == 1 and not broken:
        print(f"no models in {repo.root}")
        return EXIT_OK
    print(_table(rows))
    return EXIT_MISMATCH if broken else EXIT_OK


def _verification_lines(result: VerificationResult) -> list[str]:
    label = f"{result.name}/{result.version}"
    if result.ok:
        return [f"OK        {label}"]
    if result.outdated:
        return [f"OUTDATED  {label}  manifest.json: {result.error}"]
    if result.error is not None:
        return [f"MISMATCH  {label}  manifest.json: {result.error}"]
    lines = []
    for bad in result.mismatches:
        actual = (
            "actual missing"
            if bad.actual_sha256 is None
            else f"actual sha256={bad.actual_sha256} ({bad.actual_size} bytes)"
        )
        lines.append(
            f"MISMATCH  {label}  {bad.file}: expected sha256={bad.expected_sha256} "
            f"({bad.expected_size} bytes), {actual}"
        )
    lines.extend(
        f"MISMATCH  {label}  {extra}: not listed in the manifest (extra file)"
        for extra in result.extra_files
    )
    return lines


def _cmd_verify(repo: ModelRepository, args: argparse.Namespace) -> int:
    results = repo.verify_all(args.name)
    if not results:
        print(f"no models in {repo.root}")
        return EXIT_OK
    for result in results.values():
        print("\n".join(_verification_lines(result)))
    n_outdated = sum(result.outdated for result in results.values())
    n_bad = sum(not result.ok for result in results.values()) - n_outdated
    outdated = f", {n_outdated} OUTDATED (re-export to serve)" if n_outdated else ""
    print(
        f"verified {len(results)} version(s) in {repo.root}: "
        f"{len(results) - n_bad - n_outdated} OK, {n_bad} MISMATCH{outdated}"
    )
    return EXIT_MISMATCH if n_bad else EXIT_OK


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: what was wrong and where the help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m model_store", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command, func, help_text in (
        ("list", _cmd_list, "table of every model version in the store"),
        ("verify", _cmd_verify, "re-hash every file against its manifest"),
    ):
        p = sub.add_parser(command, help=help_text)
        p.add_argument("store", type=Path, metavar="STORE", help="model store directory")
        p.add_argument("--name", default=None, help="only this model")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        repo = ModelRepository(args.store)
        return int(args.func(repo, args))
    except (StoreNotFoundError, ModelNotFoundError) as exc:
        print(f"error: {exc}; check the store path and the model name", file=sys.stderr)
        return EXIT_USAGE
    except (ModelStoreError, OSError) as exc:
        print(f"error: {exc}; check the store's files and permissions", file=sys.stderr)
        return EXIT_USAGE
