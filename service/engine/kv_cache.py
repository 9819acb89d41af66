"""KV caches of ``kv_cache`` decoders: byte accounting and the left-padded decode batch.

Shape legend: L layers, b batch rows, h heads, P padded past length, n one sequence's real
length, e head width. The exported graph takes and returns ONE float32 cache tensor
(L, 2, b, h, P, e) (docs/contracts.md), so the running sequences' caches, each of its own length,
are kept as one tensor in which every row is LEFT-padded to the longest, with
``attention_mask`` 0 at the padded slots:

    row 0:  [0 0 0 k k k k k]      mask [0 0 0 1 1 1 1 1]
    row 1:  [k k k k k k k k]      mask [1 1 1 1 1 1 1 1]

This is sound for ALiBi because the model derives positions from the mask
(``positions = cumsum(mask) - 1`` in ``exporters/architectures/alibi.py``): padded slots neither
shift the distances i − j between real tokens nor get attended (masked before the softmax, so
their weight is exactly 0). The causal Reformer's cache (qk vectors and values) is sound the
same way: its positions and its bucket ranks count real tokens only. The newest token of every
row sits in the last column.

The batch tensor is kept between steps rather than gathered from per-sequence caches each step:
the graph's ``present_key_values`` output simply becomes the next step's input. It is re-padded
only when a sequence joins (after its prefill) or leaves, and leaving trims columns that became
padding in every row, so one long sequence leaving does not leave the others paying for its
length.

Memory is bounded on what is really allocated: the padded batch, i.e. rows × longest row. A
decode step briefly holds a second copy (the graph's output next to its input); the budget
(``settings.kv_cache_bytes``) bounds the resident cache, not that transient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model_store.manifest import CacheLayout

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class CacheShape:
    """The per-model constants of the cache layout (L, 2, b, h, P, e)."""

    n_layers: int
    n_heads: int
    head_dim: int

    @classmethod
    def from_layout(cls, layout: CacheLayout) -> CacheShape:
        return cls(layout.n_layers, layout.n_heads, layout.head_dim)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one cached token of one sequence takes: keys and values of every layer/head."""
        return self.n_layers * 2 * self.n_heads * self.head_dim * FLOAT32_BYTES

    def empty(self, batch: int = 1) -> np.ndarray:
        """(L, 2, b, h, 0, e): the cache a prefill starts from."""
        return np.zeros((self.n_layers, 2, batch, self.n_heads, 0, self.head_dim), np.float32)


class KVBudget:
    """Admission rule: would the padded batch still fit if a sequence of this length joined?

    ``lengths`` are the tokens each sequence may hold at its end (prompt + max_new_tokens), so
    a sequence admitted now can never run out of cache later: running sequences are never
    preempted or truncated. The padded footprint is rows × the longest row because that is what
    the left-padded batch tensor allocates.
    """

    def __init__(self, shape: CacheShape, capacity_bytes: int) -> None:
        self.shape = shape
        self.capacity_bytes = capacity_bytes

    def footprint(self, lengths: Sequence[int]) -> int:
        """Bytes of a padded batch holding sequences of these lengths."""
        return len(lengths) * max(lengths, default=0) * self.shape.bytes_per_token

    def fits(self, lengths: Sequence[int]) -> bool:
        return self.footprint(lengths) <= self.capacity_bytes

    def fits_alone(self, length: int) -> bool:
        """False means the request can never run, however long it waits."""
        return self.fits([length])


class DecodeBatch:
    """The running sequences' caches as one left-padded tensor, rows keyed by sequence id.

    Usage per decode step: ``inputs(tokens)`` -> backend -> ``advance(present)``.
    """

    def __init__(self, shape: CacheShape) -> None:
        self.shape = shape
        self.ids: list[int] = []  # sequence id of each row, in row order
        self.cache = shape.empty(0)  # (L, 2, b, h, P, e)
        self.mask = np.zeros((0, 0), np.int64)  # (b, P), 1 = real token

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def past_length(self) -> int:
        return int(self.cache.shape[4])

    @property
    def nbytes(self) -> int:
        return int(self.cache.nbytes)

    def real_lengths(self) -> list[int]:
        return [int(n) for n in self.mask.sum(axis=1)]

    def add(self, seq_id: int, cache: np.ndarray) -> None:
        """Append a row holding ``cache`` (L, 2, 1, h, n, e), re-padding to the new longest."""
        if seq_id in self.ids:
            raise ValueError(f"sequence {seq_id} is already in the batch")
        n = int(cache.shape[4])
        b, past = len(self.ids), self.past_length
        width = max(past, n)
        grown = np.zeros(
            (self.shape.n_layers, 2, b + 1, self.shape.n_heads, width, self.shape.head_dim),
            np.float32,
        )
        mask = np.zeros((b + 1, width), np.int64)
        # Right-aligned: the newest token of every row stays in the last column.
        grown[:, :, :b, :, width - past :] = self.cache
        mask[:b, width - past :] = self.mask
        grown[:, :, b, :, width - n :] = cache[:, :, 0]
        mask[b, width - n :] = 1
        self.cache, self.mask = grown, mask
        self.ids.append(seq_id)

    def remove(self, seq_ids: set[int]) -> None:
        """Drop these rows; then drop leading columns that are padding in every remaining row."""
        keep = [row for row, seq_id in enumerate(self.ids) if seq_id not in seq_ids]
        if len(keep) == len(self.ids):
            return
        self.ids = [self.ids[row] for row in keep]
        if not keep:
            self.cache, self.mask = self.shape.empty(0), np.zeros((0, 0), np.int64)
            return
        mask = self.mask[keep]
        start = int(np.argmax(mask.any(axis=0)))  # first column some row still uses
        # Fancy indexing copies, so the dropped rows' memory is really released.
        self.cache = np.ascontiguousarray(self.cache[:, :, keep, :, start:])
        self.mask = np.ascontiguousarray(mask[:, start:])

    def inputs(self, tokens: Sequence[int], cache_input: str) -> dict[str, np.ndarray]:
        """Graph inputs for one decode step: each row's next token (in row order)."""
        if len(tokens) != len(self.ids):
            raise ValueError(f"{len(tokens)} tokens for a batch of {len(self.ids)} rows")
        b = len(self.ids)
        return {
            "input_ids": np.asarray(tokens, np.int64).reshape(b, 1),
            "attention_mask": np.concatenate([self.mask, np.ones((b, 1), np.int64)], axis=1),
            cache_input: self.cache,
        }

    def advance(self, present: np.ndarray) -> None:
        """Adopt the graph's ``present_key_values`` (L, 2, b, h, P + 1, e) after a decode step."""
        expected = (*self.cache.shape[:4], self.past_length + 1, self.shape.head_dim)
        if present.shape != expected:
            raise ValueError(f"present cache has shape {present.shape}, expected {expected}")
        self.cache = present
        self.mask = np.concatenate([self.mask, np.ones((len(self.ids), 1), np.int64)], axis=1)

    def row(self, seq_id: int) -> np.ndarray:
        """The unpadded cache of one sequence, (L, 2, 1, h, n, e) (for tests and debugging)."""
        r = self.ids.index(seq_id)
        real = self.mask[r].astype(bool)
        return self.cache[:, :, r : r + 1][:, :, :, :, real]
