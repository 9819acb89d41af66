"""The demo corpus: the Python standard library's own ``.py`` sources.

They are present wherever Python is, so training needs no download. The train / held-out split
is by file and deterministic: a file is held out when the first byte of the SHA-256 of its path
relative to the stdlib root falls below a threshold, so the split does not depend on listing
order or on which other files exist.
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Directories that are mostly data, vendored code or generated tables, not representative code.
_SKIPPED_DIRS = frozenset(
    {"site-packages", "__pycache__", "test", "tests", "idle_test", "encodings"}
)
HELD_OUT_PERCENT = 5


@dataclass(frozen=True)
class CorpusSplit:
    """Relative paths of the train and held-out files, both sorted."""

    root: Path
    train: tuple[Path, ...]
    held_out: tuple[Path, ...]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_held_out(relative: Path) -> bool:
    digest = hashlib.sha256(relative.as_posix().encode()).digest()
    return digest[0] < 256 * HELD_OUT_PERCENT // 100


@functools.cache
def split_corpus(root: Path | None = None) -> CorpusSplit:
    """Walk the stdlib once per process (the walk costs ~1.5 s)."""
    root = root or stdlib_root()
    files = sorted(
        p.relative_to(root)
        for p in root.rglob("*.py")
        if not _SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    if not files:
        raise FileNotFoundError(f"no .py sources found under {root}")
    held = tuple(f for f in files if _is_held_out(f))
    train = tuple(f for f in files if not _is_held_out(f))
    return CorpusSplit(root=root, train=train, held_out=held)


def read_texts(root: Path, files: tuple[Path, ...], max_bytes: int) -> Iterator[str]:
    """Yield file contents in order until ``max_bytes`` of text have been produced."""
    total = 0
    for rel in files:
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
        if total + len(text) > max_bytes and total > 0:
            return
        total += len(text)
        yield text
