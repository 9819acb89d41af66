"""How long an export can afford to verify: the served length of a model bounded by memory.

A model whose only length limit is a position table is served, and so verified, at the table's
size unless ``--max-context`` says otherwise. HF's crime-and-punishment Reformer has 2^19
positions: parity there (a padded batch of two at 2^19 tokens, eager and ONNX Runtime) needs
more memory than a normal machine has. A serving tool that infers its limits from the memory it
has (TGI's max batch tokens, vLLM's KV blocks) measures, then takes the largest size that fits;
the exporter does the same for the parity sweep:

1. probe: the parity sweep at ``PROBE_LENGTHS`` (the same cases as at the longest length: one
   sequence and a padded batch of two), measuring each run's peak resident memory above what
   the process held before the first probe;
2. fit: peak = fixed + per_token * length through the probes (the costs are linear in length
   for chunked and blocked attention: docs/decisions.md, "Served length bounded by memory");
3. choose: the largest candidate (the limit itself, then powers of two below it, down to
   ``FLOOR``) whose predicted peak fits the budget: ``--memory-budget`` or, by default,
   ``DEFAULT_BUDGET_FRACTION`` of the memory available when the probes start;
4. verify there: parity runs at the chosen length, the manifest's max_context is that length
   (never more than parity verified) and ``MemoryBoundReport`` records the probes, the budget,
   the prediction and the measured peak.

Given the same budget and the same probe measurements the choice is the same; the probes of
one machine repeat to within a few MiB (docs/decisions.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Below this length nothing is probed: the exporter has always verified 4096 tokens
# (export.LONG_PARITY_LENGTH) and the probes would cost as much as the parity they size.
FLOOR = 4096
PROBE_LENGTHS = (1024, 4096)
DEFAULT_BUDGET_FRACTION = 0.75
GIB = 2**30
RULE = (
    "largest of the limit and the powers of two below it (down to {floor}) whose predicted "
    "parity peak, fixed + per_token * length fitted to the probes at {probes}, fits the budget"
)

_MEMINFO = Path("/proc/meminfo")
_CGROUP = Path("/sys/fs/cgroup")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class PeakFit:
    """A least-squares line through (length, peak bytes) probes; the slope is never negative
    (a probe's noise must not predict that longer is cheaper)."""

    lengths: tuple[int, ...]
    peaks: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.lengths) < 2 or len(set(self.lengths)) != len(self.lengths):
            raise ValueError(f"a fit needs two or more distinct lengths, got {self.lengths}")
        if len(self.peaks) != len(self.lengths):
            raise ValueError(f"{len(self.lengths)} lengths but {len(self.peaks)} peaks")

    @property
    def per_token(self) -> float:
        n = len(self.lengths)
        mean_l = sum(self.lengths) / n
        mean_p = sum(self.peaks) / n
        covariance = sum(
            (length - mean_l) * (peak - mean_p)
            for length, peak in zip(self.lengths, self.peaks, strict=True)
        )
        variance = sum((length - mean_l) ** 2 for length in self.lengths)
        return max(0.0, covariance / variance)

    @property
    def fixed(self) -> float:
        """The intercept; with a zero slope, the largest probe (a flat fit must cover it)."""
        if self.per_token == 0.0:
            return float(max(self.peaks))
        n = len(self.lengths)
        return sum(self.peaks) / n - self.per_token * sum(self.lengths) / n

    def predict(self, length: int) -> int:
        return max(0, round(self.fixed + self.per_token * length))


@dataclass(frozen=True)
class Choice:
    length: int
    predicted_peak: int
    fits: bool  # False: even FLOOR is predicted past the budget (verified there anyway)


def candidate_lengths(limit: int, floor: int = FLOOR) -> list[int]:
    """The lengths tried, longest first: the limit, then every power of two below it down to
    ``floor`` (the floor last, even when it is not a power of two)."""
    if limit <= floor:
        return [limit]
    out = [limit]
    power = 1 << (limit.bit_length() - 1)
    if power == limit:
        power //= 2
    while power > floor:
        out.append(power)
        power //= 2
    return [*out, floor]


def choose_length(limit: int, fit: PeakFit, budget: int, floor: int = FLOOR) -> Choice:
    """The longest candidate whose predicted peak fits ``budget`` bytes, else the floor."""
    candidates = candidate_lengths(limit, floor)
    for length in candidates:
        if fit.predict(length) <= budget:
            return Choice(length, fit.predict(length), True)
    return Choice(candidates[-1], fit.predict(candidates[-1]), False)


def _kib_field(text: str, name: str) -> int | None:
    match = re.search(rf"^{name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def available_memory(meminfo: Path = _MEMINFO, cgroup: Path = _CGROUP) -> tuple[int, str]:
    """Bytes this process can still take, and where the figure comes from: the kernel's
    MemAvailable, or less where a cgroup v2 limit (a container's) leaves less."""
    available = _kib_field(meminfo.read_text(), "MemAvailable")
    if available is None:
        raise RuntimeError(f"{meminfo} has no MemAvailable; pass --memory-budget")
    source = f"MemAvailable {available / GIB:.1f} GiB"
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        current = int((cgroup / "memory.current").read_text())
    except (OSError, ValueError):
        return available, source
    if limit != "max" and int(limit) - current < available:
        left = int(limit) - current
        return left, f"the cgroup's memory.max - memory.current {left / GIB:.1f} GiB"
    return available, source


def default_budget(fraction: float = DEFAULT_BUDGET_FRACTION) -> tuple[int, str]:
    available, source = available_memory()
    return int(available * fraction), f"{fraction} of {source}"


def _status_bytes(name: str) -> int:
    value = _kib_field(_STATUS.read_text(), name)
    if value is None:
        raise RuntimeError(f"{_STATUS} has no {name}")
    return value


def resident_bytes() -> int:
    return _status_bytes("VmRSS")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    return trim  # None off glibc (musl, macOS): nothing to release


def release_free_memory() -> bool:
    """Hand the allocator's free pages back to the kernel (glibc's ``malloc_trim``); False where
    the C library has no such call.

    glibc serves a large request from a freed heap chunk before it maps new memory, and a freed
    chunk inside the heap stays resident: a block that reuses one adds nothing to the resident
    set, so a peak measured from it reads near zero (a 96 MiB allocation measured 0 bytes after
    a fragmented heap). Released, those pages are faulted in again when reused and counted."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def settled_resident_bytes() -> int:
    """The resident set once the allocator's free pages are released: the baseline a peak is
    measured above."""
    release_free_memory()
    return resident_bytes()


def _reset_peak() -> bool:
    """Linux resets VmHWM to the current RSS when "5" is written to clear_refs."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def peak_above(
    baseline: int | None = None, interval_s: float = 0.005
) -> Iterator[Callable[[], int]]:
    """Measure the block's peak resident set in bytes above ``baseline`` (by default, the
    resident set at the block's start); the yielded function reads it after the block. Exact
    through VmHWM where the kernel lets it be reset; else a thread samples VmRSS every
    ``interval_s`` (and can miss a peak shorter than that). The block's start releases free
    memory, so a given ``baseline`` is taken with ``settled_resident_bytes``."""
    start = settled_resident_bytes()
    base = start if baseline is None else baseline
    peak = [0]
    stop = threading.Event()
    sampler = None
    if not _reset_peak():

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], resident_bytes())
                time.sleep(interval_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    try:
        yield lambda: max(0, peak[0] - base)
    finally:
        if sampler is None:
            peak[0] = _status_bytes("VmHWM")
        else:
            stop.set()
            sampler.join()
            peak[0] = max(peak[0], resident_bytes())


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"
