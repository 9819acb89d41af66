"""KV caches of ``kv_cache`` decoders: byte accounting and the preallocated decode batch.

Shape legend: L layers, b batch rows, h heads, C allocated slots per row, n one sequence's real
length, e head width. The exported graph takes the float32 past as one (b, h, P, e) input per
layer and per key/value (``past_key_values.{l}.key`` / ``.value``) and returns only the new
tokens' entries (L, 2, b, h, t, e) (docs/contracts.md), so the engine owns the cache. The
running sequences' caches live in one preallocated buffer (L, 2, b, h, C, e) in which every
row's real tokens are LEFT-aligned in slots [0, n_r) and the slots after them are free (zeros,
``attention_mask`` 0):

    row 0:  [k k k 0 0 0 0 0]      mask [1 1 1 0 0 0 0 0 | 1]
    row 1:  [k k k k k k 0 0]      mask [1 1 1 1 1 1 0 0 | 1]
                                               the new token ^

A decode step passes the whole buffer as per-layer views ``buffer[l, 0]``, ``buffer[l, 1]``
(each one contiguous block, read in place by ONNX Runtime and torch), its mask and a 1 for the
new token; the graph returns one entry per row, written in place at slot n_r. Nothing of size C
is copied per token (docs/decisions.md: the measurements behind returning only the new entries
and passing the past per layer).

This is sound because both models derive positions from the mask (``positions = cumsum(mask) -
1``): the free slots between a row's tokens and its new token shift neither ALiBi's distances
i − j nor the causal Reformer's positions and bucket ranks, and masked keys get weight exactly 0.
Free slots hold zeros (finite), so 0 × a free slot's value is 0.

Capacity: when a row would outgrow C, the buffer is reallocated once, with headroom, to
``round_up(1.0625 × needed, 256)`` slots (:func:`capacity_for`), so growth costs one copy per
~1/16 of length (amortised O(1) per token) and attention spans at most that much (or 256 slots)
more than the longest row. It is never larger than the longest reservation among its rows
(prompt + max_new_tokens, the most a row can ever hold), which is what keeps the budget below
true. Joining and leaving rows reallocate too (b changes); leaving also shrinks C when the long
rows are gone.

Memory is bounded on what is really allocated: rows × C × bytes per token (``nbytes``). Growth
briefly holds the old buffer next to the new one, and attention transposes one layer's keys at a
time inside the graph; the budget (``settings.kv_cache_bytes``) bounds the resident cache, not
those transients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model_store.manifest import CacheLayout, past_inputs

FLOAT32_BYTES = 4
# Growth policy of the decode buffer: room for 1/16 more tokens than needed, in whole blocks of
# 256 slots. Geometric, so a row growing to n tokens reallocates O(log n) times and each token
# pays for ~16 slot copies, against the C slots every decode step reads (and ONNX Runtime
# copies) anyway; a larger factor would make every step pay for more free slots. Measured,
# alibi-demo at 16k tokens: 13.0 ms per step with 1/16, 14.5 ms with 1/4 (docs/decisions.md).
GROWTH_FACTOR = 1.0625
CAPACITY_BLOCK = 256


def capacity_for(needed: int, limit: int) -> int:
    """Slots to allocate for ``needed``: round_up(1.0625 × needed, 256), but never more than
    ``limit`` (the most any row can hold) and never fewer than ``needed``."""
    headroom = math.ceil(needed * GROWTH_FACTOR / CAPACITY_BLOCK) * CAPACITY_BLOCK
    return max(needed, min(headroom, limit))


@dataclass(frozen=True)
class CacheShape:
    """The per-model constants of the cache layout (L, 2, b, h, C, e)."""

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

    def empty(self, batch: int = 1, slots: int = 0) -> np.ndarray:
        """(L, 2, b, h, slots, e) zeros: with 0 slots, the cache a prefill starts from."""
        return np.zeros((self.n_layers, 2, batch, self.n_heads, slots, self.head_dim), np.float32)


class KVBudget:
    """Admission rule: would every admitted sequence still fit if a sequence of this length joined?

    ``lengths`` are the tokens each sequence may hold at its end (prompt + max_new_tokens), so
    a sequence admitted now can never run out of cache later: running sequences are never
    preempted or truncated. The footprint is rows × the longest reservation because that bounds
    what is really allocated: the decode buffer's capacity never exceeds the longest
    reservation among its rows (:class:`DecodeBatch`), and a prefilling sequence holds its own
    cache of at most its prompt.
    """

    def __init__(self, shape: CacheShape, capacity_bytes: int) -> None:
        self.shape = shape
        self.capacity_bytes = capacity_bytes

    def footprint(self, lengths: Sequence[int]) -> int:
        """Bytes these sequences can ever need: rows × longest × bytes per token."""
        return len(lengths) * max(lengths, default=0) * self.shape.bytes_per_token

    def fits(self, lengths: Sequence[int]) -> bool:
        return self.footprint(lengths) <= self.capacity_bytes

    def fits_alone(self, length: int) -> bool:
        """False means the request can never run, however long it waits."""
        return self.fits([length])


def prefill_inputs(
    tokens: Sequence[int], cache: np.ndarray, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Graph inputs for one prefill chunk of one sequence: ``tokens`` (t new prompt tokens) on
    top of its cache so far, ``cache`` (L, 2, 1, h, n, e) with n = 0 for the first chunk, every
    slot real. The past goes in per layer as views of ``cache`` under ``names`` (the layout's
    ``inputs``), as in :meth:`DecodeBatch.inputs`."""
    total = int(cache.shape[4]) + len(tokens)
    return {
        "input_ids": np.asarray([tokens], np.int64),
        "attention_mask": np.ones((1, total), np.int64),
        **past_inputs(cache, names),
    }


class DecodeBatch:
    """The running sequences' caches as one preallocated buffer, rows keyed by sequence id.

    Usage per decode step: ``inputs(tokens)`` -> backend -> ``advance(new entries)``.
    """

    def __init__(self, shape: CacheShape) -> None:
        self.shape = shape
        self.ids: list[int] = []  # sequence id of each row, in row order
        self.limits: list[int] = []  # the most tokens each row may ever hold (its reservation)
        self.lengths = np.zeros(0, np.int64)  # (b,) real tokens of each row, in slots [0, n)
        self.cache = shape.empty(0)  # (L, 2, b, h, C, e)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def capacity(self) -> int:
        """C: slots allocated per row (what a decode step's attention spans, plus the new one)."""
        return int(self.cache.shape[4])

    @property
    def nbytes(self) -> int:
        return int(self.cache.nbytes)

    @property
    def mask(self) -> np.ndarray:
        """(b, C) int64: 1 at each row's real slots [0, n_r), 0 at its free ones."""
        return (np.arange(self.capacity) < self.lengths[:, None]).astype(np.int64)

    def real_lengths(self) -> list[int]:
        return [int(n) for n in self.lengths]

    def add(self, seq_id: int, cache: np.ndarray, limit: int) -> None:
        """Append a row holding ``cache`` (L, 2, 1, h, n, e); ``limit`` is the most tokens the
        sequence can ever hold (prompt + max_new_tokens), which caps the buffer's growth."""
        if seq_id in self.ids:
            raise ValueError(f"sequence {seq_id} is already in the batch")
        n = int(cache.shape[4])
        if n > limit:
            raise ValueError(f"a row of {n} tokens exceeds its own limit of {limit}")
        ids, limits = [*self.ids, seq_id], [*self.limits, limit]
        lengths = np.append(self.lengths, n)
        # Room for the row's next token too, so its first decode step does not grow the buffer.
        needed = min(int(lengths.max()) + 1, max(limits))
        slots = self.capacity if needed <= self.capacity else capacity_for(needed, max(limits))
        buffer = self.shape.empty(len(ids), slots)
        used = int(self.lengths.max(initial=0))  # slots past this are zeros in every old row
        buffer[:, :, :-1, :, :used] = self.cache[:, :, :, :, :used]
        buffer[:, :, -1, :, :n] = cache[:, :, 0]
        self.cache, self.ids, self.limits, self.lengths = buffer, ids, limits, lengths

    def remove(self, seq_ids: set[int]) -> None:
        """Drop these rows; shrink C when the remaining rows need much less than it holds."""
        keep = [row for row, seq_id in enumerate(self.ids) if seq_id not in seq_ids]
        if len(keep) == len(self.ids):
            return
        self.ids = [self.ids[row] for row in keep]
        self.limits = [self.limits[row] for row in keep]
        self.lengths = self.lengths[keep]
        if not keep:
            self.cache = self.shape.empty(0)
            return
        used = int(self.lengths.max())
        # The copy happens anyway (rows leave), so shrinking to what the remaining rows would
        # be given if they grew now costs nothing extra and releases the long rows' slots.
        slots = min(self.capacity, capacity_for(min(used + 1, max(self.limits)), max(self.limits)))
        buffer = self.shape.empty(len(keep), slots)
        buffer[:, :, :, :, :used] = self.cache[:, :, keep, :, :used]
        self.cache = buffer

    def inputs(self, tokens: Sequence[int], names: Sequence[str]) -> dict[str, np.ndarray]:
        """Graph inputs for one decode step: each row's next token (in row order), the whole
        buffer as the past, per layer (under ``names``, the layout's ``inputs``: views
        ``{prefix}.{l}.key`` = buffer[l, 0], no copy), and its mask
        followed by a 1 for the new token."""
        if len(tokens) != len(self.ids):
            raise ValueError(f"{len(tokens)} tokens for a batch of {len(self.ids)} rows")
        b = len(self.ids)
        return {
            "input_ids": np.asarray(tokens, np.int64).reshape(b, 1),
            "attention_mask": np.concatenate([self.mask, np.ones((b, 1), np.int64)], axis=1),
            **past_inputs(self.cache, names),
        }

    def advance(self, new: np.ndarray) -> None:
        """Write the graph's ``new_key_values`` (L, 2, b, h, 1, e) in place at each row's slot
        n_r, growing the buffer first when a row has no free slot left."""
        expected = (*self.cache.shape[:4], 1, self.shape.head_dim)
        if new.shape != expected:
            raise ValueError(f"new cache entries have shape {new.shape}, expected {expected}")
        needed = int(self.lengths.max()) + 1
        if needed > self.capacity:
            self._grow(capacity_for(needed, max(needed, *self.limits)))
        rows = np.arange(len(self.ids))
        # Advanced indices split by a slice put the row axis first: (b, L, 2, h, e).
        self.cache[:, :, rows, :, self.lengths] = np.moveaxis(new[:, :, :, :, 0], 2, 0)
        self.lengths = self.lengths + 1

    def _grow(self, slots: int) -> None:
        """One copy into a buffer of ``slots`` slots per row (amortised by capacity_for)."""
        buffer = self.shape.empty(len(self.ids), slots)
        used = int(self.lengths.max())
        buffer[:, :, :, :, :used] = self.cache[:, :, :, :, :used]
        self.cache = buffer

    def row(self, seq_id: int) -> np.ndarray:
        """The real cache of one sequence, (L, 2, 1, h, n, e) (for tests and debugging)."""
        r = self.ids.index(seq_id)
        return self.cache[:, :, r : r + 1, :, : int(self.lengths[r])]
