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
true. Rows are allocated with room for more (R >= b, within ``max_bytes``): a sequence joins
into a free row and a leaving one is replaced by the last row, so neither copies the buffer;
leaving shrinks C when the long rows are gone, and R when most rows stand free.

Memory is bounded on what is really allocated: rows × C × bytes per token (``nbytes``). Growth
briefly holds the old buffer next to the new one, and attention transposes one layer's keys at a
time inside the graph; the budget (``settings.kv_cache_bytes``) bounds the resident cache, not
those transients. The free rows are sized from the budget left beside the prefills running at
the time; a prefill admitted later may briefly hold its own cache beside the free row it will
take, at most one prompt's cache per such prefill.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
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

    The buffer holds R >= b rows: the b running rows first (in ``ids`` order), then free rows
    of zeros. Joining takes a free row in place and leaving moves the last row into the hole,
    so neither copies the other rows; only a join with no free row (or a row outgrowing C)
    reallocates, and then with room for about as many rows again, but never more than
    ``max_bytes`` holds (the KV budget, so what is allocated stays within it). Profiled before
    (docs/benchmarks.md §6): reallocating on every join and leave cost a 16-stream decode run
    about a fifth of its time.
    """

    def __init__(self, shape: CacheShape, max_bytes: int | None = None) -> None:
        self.shape = shape
        self.max_bytes = max_bytes  # None: exactly the rows needed at each reallocation
        self.ids: list[int] = []  # sequence id of each row, in row order
        self.limits: list[int] = []  # the most tokens each row may ever hold (its reservation)
        self.lengths = np.zeros(0, np.int64)  # (b,) real tokens of each row, in slots [0, n)
        self._buffer = shape.empty(0)  # (L, 2, R, h, C, e), rows [b, R) free (zeros)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def cache(self) -> np.ndarray:
        """(L, 2, b, h, C, e): the running rows' part of the buffer (a view)."""
        return self._buffer[:, :, : len(self.ids)]

    @property
    def capacity(self) -> int:
        """C: slots allocated per row (what a decode step's attention spans, plus the new one)."""
        return int(self._buffer.shape[4])

    @property
    def rows_allocated(self) -> int:
        """R: rows the buffer holds, running and free."""
        return int(self._buffer.shape[2])

    @property
    def nbytes(self) -> int:
        return int(self._buffer.nbytes)

    @property
    def mask(self) -> np.ndarray:
        """(b, C) int64: 1 at each row's real slots [0, n_r), 0 at its free ones."""
        return (np.arange(self.capacity) < self.lengths[:, None]).astype(np.int64)

    def real_lengths(self) -> list[int]:
        return [int(n) for n in self.lengths]

    def _rows_for(self, needed: int, slots: int) -> int:
        """Rows to allocate for ``needed`` running rows of ``slots`` slots: twice as many, as
        far as ``max_bytes`` allows, never fewer than needed."""
        if self.max_bytes is None:
            return needed
        per_row = slots * self.shape.bytes_per_token
        affordable = self.max_bytes // per_row if per_row else 2 * needed
        return max(needed, min(2 * needed, affordable))

    def _reallocate(self, rows: int, slots: int) -> None:
        """Copy the running rows into a new buffer of ``rows`` x ``slots`` (the one copy)."""
        b = len(self.ids)
        buffer = self.shape.empty(self._rows_for(rows, slots), slots)
        used = min(int(self.lengths.max(initial=0)), slots)  # past this: zeros in every row
        buffer[:, :, :b, :, :used] = self._buffer[:, :, :b, :, :used]
        self._buffer = buffer

    def add(self, seq_id: int, cache: np.ndarray, limit: int) -> None:
        """Append a row holding ``cache`` (L, 2, 1, h, n, e); ``limit`` is the most tokens the
        sequence can ever hold (prompt + max_new_tokens), which caps the buffer's growth."""
        if seq_id in self.ids:
            raise ValueError(f"sequence {seq_id} is already in the batch")
        n = int(cache.shape[4])
        if n > limit:
            raise ValueError(f"a row of {n} tokens exceeds its own limit of {limit}")
        b = len(self.ids)
        limits = [*self.limits, limit]
        # Room for the row's next token too, so its first decode step does not grow the buffer.
        needed = min(max(int(self.lengths.max(initial=0)), n) + 1, max(limits))
        if needed > self.capacity:
            self._reallocate(b + 1, capacity_for(needed, max(limits)))
        elif b == self.rows_allocated:
            self._reallocate(b + 1, self.capacity)
        self._buffer[:, :, b, :, :n] = cache[:, :, 0]  # a free row: zeros after slot n
        self.ids, self.limits = [*self.ids, seq_id], limits
        self.lengths = np.append(self.lengths, n)

    def remove(self, seq_ids: Collection[int]) -> None:
        """Drop these rows: the last row moves into each hole, the vacated row is zeroed.
        Shrink C when the remaining rows need less than it holds (every step attends over C)."""
        leaving = sorted((row for row, s in enumerate(self.ids) if s in seq_ids), reverse=True)
        if not leaving:
            return
        for row in leaving:  # highest first, so ``last`` is never a row still to remove
            last = len(self.ids) - 1
            n_row, n_last = int(self.lengths[row]), int(self.lengths[last])
            if row != last:
                tail = max(n_row, n_last)
                self._buffer[:, :, row, :, :tail] = self._buffer[:, :, last, :, :tail]
                self.ids[row], self.limits[row] = self.ids[last], self.limits[last]
                self.lengths[row] = self.lengths[last]
            self._buffer[:, :, last, :, : max(n_row, n_last)] = 0
            self.ids.pop()
            self.limits.pop()
            self.lengths = self.lengths[:last]
        if not self.ids:
            self._buffer = self.shape.empty(0)
            return
        used, longest = int(self.lengths.max()), max(self.limits)
        slots = capacity_for(min(used + 1, longest), longest)
        # Free rows are kept for the next joins, but not once most of them stand idle.
        if slots < self.capacity or self.rows_allocated > 4 * len(self.ids):
            self._reallocate(len(self.ids), slots)

    def inputs(self, tokens: Sequence[int], names: Sequence[str]) -> dict[str, np.ndarray]:
        """Graph inputs for one decode step: each row's next token (in row order), the running
        rows of the buffer as the past, per layer (under ``names``, the layout's ``inputs``:
        views ``{prefix}.{l}.key`` = buffer[l, 0, :b], contiguous, no copy), and its mask
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
            self._reallocate(len(self.ids), capacity_for(needed, max(needed, *self.limits)))
        rows = np.arange(len(self.ids))
        # Advanced indices split by a slice put the row axis first: (b, L, 2, h, e).
        self._buffer[:, :, rows, :, self.lengths] = np.moveaxis(new[:, :, :, :, 0], 2, 0)
        self.lengths = self.lengths + 1

    def row(self, seq_id: int) -> np.ndarray:
        """The real cache of one sequence, (L, 2, 1, h, n, e) (for tests and debugging)."""
        r = self.ids.index(seq_id)
        return self._buffer[:, :, r : r + 1, :, : int(self.lengths[r])]
