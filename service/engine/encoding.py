"""Encode semantics, independent of HTTP and of batching: tokenize, fit into max_context, pool.

* ``pooling``: ``mean`` over real tokens (the encoder's ``<cls>`` included, padding excluded),
  ``cls`` = position 0 (encoder tokenizers prepend ``<cls>``), ``none`` = one vector per token.
* Longer than ``manifest.max_context``: an error by default (``ContextLengthExceeded``);
  ``truncate`` keeps the first max_context tokens; ``chunk`` splits the input into windows of
  max_context tokens (each with the tokenizer's special prefix, e.g. ``<cls>``) that overlap by
  :data:`CHUNK_OVERLAP_FRACTION` of max_context. The last window is aligned to the end of the
  input, so every window is full length (no padding when they batch together). Window vectors
  are combined by a mean weighted by each window's token count, then normalised.
* Token-id inputs (OpenAI ``input: [[int]]``) are used exactly as given: no prefix is added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from service.engine.errors import ContextLengthExceeded, InvalidInput
from service.engine.models import LoadedModel

Pooling = Literal["mean", "cls", "none"]
#: Consecutive chunk windows share max_context // 8 tokens, so no token sits only at a window edge.
CHUNK_OVERLAP_FRACTION = 8


@dataclass(frozen=True)
class EncodeParams:
    pooling: Pooling = "mean"
    normalize: bool = True
    truncate: bool = False
    chunk: bool = False
    #: Wire name of the input field, so errors point at the caller's own field ("inputs"/"input").
    param: str = "inputs"


@dataclass(frozen=True)
class PreparedInput:
    windows: list[np.ndarray]  # each (t,) int64 with t <= max_context
    prompt_tokens: int  # tokens of the input that reach the model (after truncation)
    truncated_tokens: int


@dataclass(frozen=True)
class EncodeOutput:
    embeddings: list[np.ndarray]  # per input: (d,) pooled, or (t, d) for pooling "none"
    prompt_tokens: int
    truncated_tokens: int
    chunks: int  # sequences run through the model (windows; 1 per unchunked input)
    queue_seconds: float = 0.0  # the longest wait of one of its sequences for a batch


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Start offsets of windows of ``window`` tokens covering ``length`` tokens.

    Consecutive windows overlap by at least ``overlap``; the last one ends exactly at ``length``.
    """
    if length <= window:
        return [0]
    stride = max(1, window - overlap)
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def _fit(
    prefix: list[int], content: list[int], max_context: int, params: EncodeParams, param: str
) -> PreparedInput:
    total = len(prefix) + len(content)
    if total == 0:
        raise InvalidInput("input produces no tokens", param=param)
    if total <= max_context:
        return PreparedInput([np.asarray(prefix + content, dtype=np.int64)], total, 0)
    if params.chunk:
        width = max_context - len(prefix)
        if width <= 0:
            raise InvalidInput(f"max_context {max_context} leaves no room for content", param=param)
        starts = window_starts(len(content), width, max_context // CHUNK_OVERLAP_FRACTION)
        windows = [np.asarray(prefix + content[s : s + width], dtype=np.int64) for s in starts]
        return PreparedInput(windows, total, 0)
    if params.truncate:
        kept = (prefix + content)[:max_context]
        return PreparedInput([np.asarray(kept, dtype=np.int64)], max_context, total - max_context)
    raise ContextLengthExceeded(
        total, max_context, param=param, hint="; send truncate: true or chunk: true to accept it"
    )


def prepare(
    model: LoadedModel, inputs: list[str] | list[list[int]], params: EncodeParams
) -> list[PreparedInput]:
    """Token ids for every input, fitted to max_context. Blocking (tokenizer): run off the loop."""
    max_context = model.manifest.max_context
    if params.chunk and params.pooling == "none":
        raise InvalidInput("chunk needs pooling 'mean' or 'cls' (per-token vectors of overlapping "
                           "windows have no single answer)", param="pooling")  # fmt: skip
    texts = [item for item in inputs if isinstance(item, str)]
    id_lists = [item for item in inputs if not isinstance(item, str)]
    if texts and id_lists:
        raise InvalidInput("inputs must be all strings or all token-id lists", param=params.param)
    prepared = []
    if texts:
        # The special prefix the post-processor adds (e.g. <cls>): encode() of "" yields only it.
        prefix = model.tokenizer.encode("").ids
        encodings = model.tokenizer.encode_batch(texts, add_special_tokens=False)
        for i, encoding in enumerate(encodings):
            prepared.append(_fit(prefix, encoding.ids, max_context, params, f"{params.param}[{i}]"))
        return prepared
    vocab = int(model.manifest.config.get("vocab_size", model.tokenizer.get_vocab_size()))
    for i, ids in enumerate(id_lists):
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidInput(
                f"token ids must be in [0, {vocab}); got {bad[:5]}", param=f"{params.param}[{i}]"
            )
        prepared.append(_fit([], list(ids), max_context, params, f"{params.param}[{i}]"))
    return prepared


def pool(hidden: np.ndarray, pooling: Pooling) -> np.ndarray:
    """(t, d) hidden states of the real tokens of one sequence -> (d,) or (t, d)."""
    if pooling == "mean":
        return hidden.mean(axis=0)
    if pooling == "cls":
        return hidden[0].copy()
    return hidden.copy()


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    # An all-zero vector has no direction: leave it zero rather than divide by 0.
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def combine(
    prepared: list[PreparedInput], vectors: list[np.ndarray], params: EncodeParams
) -> EncodeOutput:
    """Fold window results back into one result per input, then normalise."""
    embeddings = []
    offset = 0
    for item in prepared:
        parts = vectors[offset : offset + len(item.windows)]
        offset += len(item.windows)
        if len(parts) == 1:
            vector = parts[0]
        else:
            weights = np.asarray([len(w) for w in item.windows], dtype=np.float64)
            vector = (np.stack(parts) * weights[:, None]).sum(axis=0) / weights.sum()
            vector = vector.astype(np.float32)
        embeddings.append(l2_normalize(vector) if params.normalize else vector)
    return EncodeOutput(
        embeddings=embeddings,
        prompt_tokens=sum(item.prompt_tokens for item in prepared),
        truncated_tokens=sum(item.truncated_tokens for item in prepared),
        chunks=len(vectors),
    )
