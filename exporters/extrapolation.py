"""ALiBi length extrapolation, measured: held-out next-token loss at multiples of trained length.

The loss at each length is averaged over every position of non-overlapping windows cut from the
held-out split of the demo corpus, with the same number of tokens at every length so the
comparison is between lengths, not between amounts of text.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from exporters.architectures.common import EOS_ID
from exporters.corpus import read_texts, split_corpus

MULTIPLES = (1, 2, 4, 8)
TOLERANCE = 0.05  # a length qualifies while its loss stays within 5% of the 1x loss
RULE = (
    "longest measured length up to which every held-out loss stays within 5% of the loss at the "
    "trained length"
)


def held_out_stream(tokenizer: Tokenizer, n_tokens: int) -> np.ndarray:
    split = split_corpus()
    pieces: list[np.ndarray] = []
    total = 0
    for text in read_texts(split.root, split.held_out, max_bytes=1 << 30):
        ids = [*tokenizer.encode(text, add_special_tokens=False).ids, EOS_ID]
        pieces.append(np.asarray(ids, dtype=np.int64))
        total += len(ids)
        if total >= n_tokens:
            break
    stream = np.concatenate(pieces)
    if len(stream) < n_tokens:
        raise RuntimeError(f"held-out split has {len(stream)} tokens, need {n_tokens}")
    return stream[:n_tokens]


def loss_at_length(model: nn.Module, stream: np.ndarray, length: int, batch_size: int = 4) -> float:
    windows = torch.from_numpy(stream[: (len(stream) // (length + 1)) * (length + 1)])
    windows = windows.view(-1, length + 1)  # (n, length + 1)
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(batch_size):
            inputs, targets = chunk[:, :-1], chunk[:, 1:]
            logits, _ = model(inputs, torch.ones_like(inputs))
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += targets.numel()
    return total / count


def measure(
    model: nn.Module, tokenizer: Tokenizer, trained_context: int, progress: bool = True
) -> tuple[list[int], list[float], list[float], int]:
    """Returns (lengths, losses, ratios, chosen max_context)."""
    lengths = [m * trained_context for m in MULTIPLES]
    # Two windows of the longest length; the same token count at every length.
    stream = held_out_stream(tokenizer, 2 * (lengths[-1] + 1) * 2)
    # Constant tokens per forward (4 windows at 1x, 1 at 4x and beyond) bounds peak memory.
    losses = [
        loss_at_length(model, stream, n, batch_size=max(1, 4 * trained_context // n))
        for n in tqdm(lengths, desc="extrapolation", disable=not progress)
    ]
    ratios = [loss / losses[0] for loss in losses]
    # Stop at the first length that fails: a later pass after a failure would be luck, not a trend.
    chosen = lengths[0]
    for n, ratio in zip(lengths, ratios, strict=True):
        if ratio > 1 + TOLERANCE:
            break
        chosen = n
    return lengths, losses, ratios, chosen
