"""Token log-probabilities: what ``logprobs`` and ``echo`` return and ``best_of`` ranks by.

The distribution is the model's raw one, ``log_softmax(logits)`` at temperature 1 before top-k
and top-p (vLLM's default, and what loglikelihood harnesses score): a token's logprob does not
depend on the sampling knobs of the request that produced it.

Memory: logits are taken ``ROW_BLOCK`` positions at a time, so scoring a prefill chunk of t
positions over a vocabulary of v holds one (ROW_BLOCK, v) float32 array beside the graph's own
(t, v) output, and what is kept per position is k + 1 numbers. A prompt of any length is scored
chunk by chunk as it is prefilled, never as one (prompt, v) array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Positions per log-softmax block: 64 x 250,880 (BLOOM's vocabulary) x 4 bytes = 64 MB.
ROW_BLOCK = 64


@dataclass(frozen=True)
class Scores:
    """Per position of a block of logits: the target's logprob and the k most probable."""

    chosen: np.ndarray  # (t,) float64: logprob of each position's target token
    top_ids: np.ndarray  # (t, k) int64, most probable first (ties: lower id first)
    top_logprobs: np.ndarray  # (t, k) float64


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(t, v) -> (t, v) float32, the sum of exponentials accumulated in float64."""
    x = logits.astype(np.float32, copy=True)
    x -= x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x).sum(axis=-1, keepdims=True, dtype=np.float64))
    x -= lse.astype(np.float32)
    return x


def score(logits: np.ndarray, targets: np.ndarray, k: int) -> Scores:
    """``logits`` (t, v), ``targets`` (t,) token ids: the logprob of ``targets[i]`` under row i
    and the ``k`` most probable tokens of each row."""
    t, k = logits.shape[0], min(k, logits.shape[1])
    chosen = np.empty(t, np.float64)
    top_ids = np.empty((t, k), np.int64)
    top_lps = np.empty((t, k), np.float64)
    for start in range(0, t, ROW_BLOCK):
        end = min(start + ROW_BLOCK, t)
        lp = log_softmax(logits[start:end])  # (r, v)
        rows = np.arange(end - start)
        chosen[start:end] = lp[rows, targets[start:end]]
        if k:
            ids, values = _top(lp, k)
            top_ids[start:end], top_lps[start:end] = ids, values
    return Scores(chosen, top_ids, top_lps)


def _top(lp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest of each row of ``lp`` (r, v), ordered by descending value, then id."""
    part = np.argpartition(-lp, k - 1, axis=1)[:, :k]  # (r, k), unordered
    values = np.take_along_axis(lp, part, axis=1)
    order = np.lexsort((part, -values), axis=1)  # last key first: value, then id
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(values, order, axis=1)
