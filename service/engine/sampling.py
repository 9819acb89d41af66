"""Per-sequence token sampling: temperature, top-k, top-p (nucleus), seeded generators.

Every sequence owns its own ``numpy.random.Generator`` and draws exactly one uniform number per
sampled token, so a seeded request produces the same tokens whatever else shares its batch (the
batch changes the order in which sequences are sampled, never what each one draws).

Order of operations follows Hugging Face ``generate`` and vLLM: temperature scales the logits,
top-k keeps the k largest, top-p keeps the smallest set of most probable tokens whose mass reaches
p, then one token is drawn from what is left. Temperature 0 means greedy (argmax), ignoring the
other knobs and the generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the sampler and the stopping rules (engine-side, wire-independent)."""

    max_new_tokens: int  # upper bound on generated tokens (EOS included)
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most probable tokens; None or 0 = no limit
    top_p: float | None = None  # nucleus mass in (0, 1]; None or 1 = no limit
    seed: int | None = None  # None = fresh OS entropy per request
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these
    # Log-probabilities (logprobs.py): None = not computed; k >= 0 = each generated token's
    # logprob and the k most probable tokens at its position.
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for every prompt token (implies ``echo``)
    echo: bool = False  # return the prompt (PromptEcho) on the first chunk

    def __post_init__(self) -> None:
        # The API validates with friendly messages; these guard engine callers (tests, benchmarks).
        # 0 new tokens: prefill only (scoring a prompt with prompt_logprobs), "length" at once.
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def echoes(self) -> bool:
        return self.echo or self.prompt_logprobs is not None

    def generator(self, choice: int = 0) -> np.random.Generator:
        """The random stream of choice ``choice`` of a request (n > 1 or best_of).

        Choice 0 draws from ``seed`` itself, so a request with one choice is unchanged; choice
        i >= 1 from ``SeedSequence(seed, spawn_key=(i,))``, numpy's independent child streams.
        A choice's tokens thus depend on the seed and its index only, not on n, best_of or the
        other prompts of a batch. Unseeded requests draw fresh OS entropy per choice.
        """
        if self.seed is None or choice == 0:
            return np.random.default_rng(self.seed)
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(choice,)))


def filter_logits(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Temperature, top-k and top-p applied to one row of logits.

    logits (v,) float -> (token_ids (n,) int64, probabilities (n,) float64 summing to 1). The
    surviving tokens come in id order when nothing is cut (no sort needed: O(v) per token), else
    in descending probability order with ties by ascending id. Either way the order, and so the
    token a given uniform draw selects, is deterministic.
    """
    # Shift before dividing: the largest logit becomes 0 and the rest are <= 0, so a tiny
    # temperature sends them to -inf (probability 0) instead of overflowing to inf - inf = NaN.
    shifted = logits.astype(np.float64)
    shifted -= shifted.max()
    with np.errstate(over="ignore"):  # overflow here is towards -inf, which is meant
        scaled = shifted / params.temperature  # (v,)
    vocab = scaled.shape[0]
    top_p = 1.0 if params.top_p is None else params.top_p
    if not (params.top_k and params.top_k < vocab) and top_p >= 1:
        probs = np.exp(scaled - scaled.max())
        return np.arange(vocab, dtype=np.int64), probs / probs.sum()
    # A stable sort of the negated logits orders by descending value, ascending id among ties.
    if params.top_k and params.top_k < vocab:
        # argpartition finds the k-th largest value in O(v); only the tokens at or above it are
        # sorted. argpartition breaks ties arbitrarily, so take every token tied with the k-th
        # value and let the stable sort keep the lowest ids.
        threshold = scaled[np.argpartition(-scaled, params.top_k - 1)[params.top_k - 1]]
        candidates = np.flatnonzero(scaled >= threshold)
        order = candidates[np.argsort(-scaled[candidates], kind="stable")][: params.top_k]
    else:
        order = np.argsort(-scaled, kind="stable")
    kept = scaled[order]
    probs = np.exp(kept - kept[0])  # kept[0] is the maximum: no overflow
    probs /= probs.sum()
    if top_p < 1:
        cumulative = np.cumsum(probs)
        # Smallest prefix whose mass reaches top_p; the most probable token always survives.
        n = int(np.searchsorted(cumulative, top_p, side="left")) + 1
        order, probs = order[:n], probs[:n]
        probs = probs / probs.sum()
    return order.astype(np.int64), probs


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from one row of logits (v,). Consumes exactly one draw unless greedy."""
    if params.greedy:
        return int(np.argmax(logits))
    ids, probs = filter_logits(logits, params)
    u = rng.random()
    # Inverse CDF; min() guards against the cumulative sum ending a hair below u after rounding.
    index = min(int(np.searchsorted(np.cumsum(probs), u, side="right")), len(ids) - 1)
    return int(ids[index])
