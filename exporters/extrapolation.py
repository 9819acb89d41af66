"""ALiBi length extrapolation, measured: next-token loss at multiples of the trained length.

The loss at each length is averaged over every position of non-overlapping windows cut from one
token stream, with the same number of tokens at every length so the comparison is between
lengths, not between amounts of text. The stream is the held-out split of the demo corpus (the
Python standard library's sources), or text the user gives (``export --eval-text FILE|DIR``),
tokenised with the model's own tokenizer.

Memory stays linear in the length: the model runs its blocked attention (``attention_block``),
one window at a time beyond the trained length, and the LM head is applied ``LOGIT_ROWS`` tokens
at a time, so no (window, vocabulary) logits tensor exists (16 GiB for a 250K-token vocabulary
at 16K tokens).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn
from tqdm import tqdm

from exporters.architectures.common import EOS_ID
from exporters.corpus import read_texts, split_corpus

MULTIPLES = (1, 2, 4, 8)
TOLERANCE = 0.05  # a length qualifies while its loss stays within 5% of the 1x loss
RULE = (
    "longest measured length up to which every held-out loss stays within 5% of the loss at the "
    "trained length"
)
WINDOWS_AT_LONGEST = 4  # the stream holds this many windows of the longest length
LOGIT_ROWS = 512  # tokens per LM-head slice: (512, v) logits at a time
DEFAULT_TEXT = "held-out Python standard library sources (demo corpus split)"
LONG_SWEEP_S = 600.0  # a sweep predicted to take longer than this says how to skip it


@dataclass(frozen=True)
class Curve:
    lengths: list[int]
    losses: list[float]
    ratios: list[float]
    chosen: int  # the max_context the rule picks
    text: str  # which text was measured on, in words
    tokens: int  # tokens scored at each length


def held_out_stream(tokenizer: Tokenizer, n_tokens: int) -> np.ndarray:
    split = split_corpus()
    stream = _stream(tokenizer, read_texts(split.root, split.held_out, max_bytes=1 << 30), n_tokens)
    if len(stream) < n_tokens:
        raise RuntimeError(f"held-out split has {len(stream)} tokens, need {n_tokens}")
    return stream


def text_files(path: Path) -> list[Path]:
    """A file, or every file under a directory (sorted, hidden ones skipped)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--eval-text {path}: no such file or directory")
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise ValueError(f"--eval-text {path}: the directory holds no files")
    return files


def user_stream(tokenizer: Tokenizer, path: Path, n_tokens: int, min_tokens: int) -> np.ndarray:
    """The user's text as one token stream (documents separated by EOS), at most ``n_tokens``;
    a clear error when it holds fewer than ``min_tokens`` (one window of the longest length)."""

    def texts() -> Iterator[str]:
        for file in text_files(path):
            # Undecodable bytes become U+FFFD rather than an error: the text is only measured.
            yield file.read_text(encoding="utf-8", errors="replace")

    stream = _stream(tokenizer, texts(), n_tokens)
    if len(stream) < min_tokens:
        raise ValueError(
            f"--eval-text {path} has {len(stream)} tokens; the sweep to {min_tokens - 1} tokens "
            f"needs at least {min_tokens} (one window), {n_tokens} for the full comparison"
        )
    return stream


def _stream(tokenizer: Tokenizer, texts: Iterator[str], n_tokens: int) -> np.ndarray:
    pieces: list[np.ndarray] = []
    total = 0
    for text in texts:
        ids = [*tokenizer.encode(text, add_special_tokens=False).ids, EOS_ID]
        pieces.append(np.asarray(ids, dtype=np.int64))
        total += len(ids)
        if total >= n_tokens:
            break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return stream[:n_tokens]


def _summed_loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
    """Summed next-token cross-entropy without materialising (b, t, v) logits where the model
    offers its hidden states (the ALiBi decoder); other models go through forward."""
    mask = torch.ones_like(inputs)
    hidden_states = getattr(model, "hidden_states", None)
    if hidden_states is None:
        logits, _ = model(inputs, mask)
        return float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
    hidden = hidden_states(inputs, mask).flatten(0, 1)  # (b·t, d)
    targets = targets.flatten()
    total = 0.0
    for start in range(0, hidden.shape[0], LOGIT_ROWS):
        logits = model.head(hidden[start : start + LOGIT_ROWS])  # type: ignore[operator]
        part = targets[start : start + LOGIT_ROWS]
        total += float(F.cross_entropy(logits, part, reduction="sum"))
    return total


def loss_at_length(
    model: nn.Module,
    stream: np.ndarray,
    length: int,
    batch_size: int = 4,
    bar: tqdm | None = None,
    first_forward: Callable[[float, int], None] | None = None,
) -> float:
    """Mean next-token loss over the windows of ``length``; ``first_forward`` is told the
    seconds and tokens of the first forward pass (the sweep's time estimate)."""
    windows = torch.from_numpy(stream[: (len(stream) // (length + 1)) * (length + 1)])
    windows = windows.view(-1, length + 1)  # (n, length + 1)
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(batch_size):
            inputs, targets = chunk[:, :-1], chunk[:, 1:]
            started = time.perf_counter()
            total += _summed_loss(model, inputs, targets)
            count += targets.numel()
            if first_forward is not None and count == targets.numel():
                first_forward(time.perf_counter() - started, targets.numel())
            if bar is not None:
                bar.update(targets.numel())
    return total / count


def sweep_seconds(
    first_s: float, first_tokens: int, lengths: list[int], per_length: list[int]
) -> tuple[float, float]:
    """(low, high) estimate of the whole sweep from its first forward pass (``first_tokens``
    tokens at ``lengths[0]`` in ``first_s``): the per-token cost stays flat where projections
    dominate (low) and grows with the length where attention does (high)."""
    per_token = first_s / first_tokens
    low = per_token * sum(per_length)
    high = per_token * sum(t * n / lengths[0] for n, t in zip(lengths, per_length, strict=True))
    return low, high


def skip_hint(trained_context: int) -> str:
    """The flags that skip the sweep, spelled out with the length that needs no measurement."""
    return (
        f"to skip it, stop this export (Ctrl-C) and rerun it with --max-context "
        f"{trained_context} --skip-extrapolation: the trained length, served unmeasured "
        "(a longer N you have measured yourself works too; parity still runs at it), or run "
        "the export where there are more cores"
    )


def _warn_if_long(
    first_s: float, first_tokens: int, lengths: list[int], per_length: list[int], bar: tqdm
) -> None:
    low, high = sweep_seconds(first_s, first_tokens, lengths, per_length)
    if high > LONG_SWEEP_S:
        bar.write(
            f"extrapolation: measuring the loss at {lengths} tokens will take about "
            f"{_duration(low)}-{_duration(high)} at this speed (from its first "
            f"{first_tokens} tokens, {first_s:.0f} s); {skip_hint(lengths[0])}"
        )


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def measure(
    model: nn.Module,
    tokenizer: Tokenizer,
    trained_context: int,
    progress: bool = True,
    eval_text: Path | None = None,
) -> Curve:
    """The loss curve at MULTIPLES of the trained length and the max_context RULE picks."""
    lengths = [m * trained_context for m in MULTIPLES]
    n_tokens = WINDOWS_AT_LONGEST * (lengths[-1] + 1)
    if eval_text is None:
        stream, text = held_out_stream(tokenizer, n_tokens), DEFAULT_TEXT
    else:
        stream = user_stream(tokenizer, eval_text, n_tokens, lengths[-1] + 1)
        text = f"user text {eval_text}"
    per_length = [(len(stream) // (n + 1)) * n for n in lengths]
    losses = []
    with tqdm(
        total=sum(per_length), desc="extrapolation", unit="tok", unit_scale=True,
        disable=not progress,
    ) as bar:  # fmt: skip
        for n in lengths:
            bar.set_postfix_str(f"length {n} of {lengths}")
            # Constant tokens per forward (4 windows at 1x, 1 at 4x and beyond) bounds memory.
            batch = max(1, 4 * trained_context // n)
            # Warned after the first forward pass, not the first length: on 2 cores a
            # bloom-560m's first length alone takes most of an hour.
            warn = (
                (lambda s, t: _warn_if_long(s, t, lengths, per_length, bar))
                if n == lengths[0]
                else None
            )
            losses.append(loss_at_length(model, stream, n, batch, bar, warn))
    ratios = [loss / losses[0] for loss in losses]
    # Stop at the first length that fails: a later pass after a failure would be luck, not a trend.
    chosen = lengths[0]
    for n, ratio in zip(lengths, ratios, strict=True):
        if ratio > 1 + TOLERANCE:
            break
        chosen = n
    return Curve(lengths, losses, ratios, chosen, text, min(per_length))
