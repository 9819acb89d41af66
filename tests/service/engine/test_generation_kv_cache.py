"""KV cache accounting and the preallocated decode batch, on synthetic tensors and the real
graph."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from model_store import ModelRepository, past_input_names
from service.engine.kv_cache import (
    CacheShape,
    DecodeBatch,
    KVBudget,
    capacity_for,
    prefill_inputs,
)
from service.engine.models import LoadedModel, load_model
from service.settings import Settings
from tests.service.conftest import ServiceStore

SHAPE = CacheShape(n_layers=2, n_heads=3, head_dim=4)
NAMES = past_input_names("past", SHAPE.n_layers)
BIG = 10_000  # a reservation that never caps the buffer


def fake_cache(n: int, fill: float) -> np.ndarray:
    """(L, 2, 1, h, n, e) whose slot j holds fill + j, so misplaced slots are visible."""
    slots = fill + np.arange(n, dtype=np.float32)
    return np.broadcast_to(slots[None, None, None, None, :, None], (2, 2, 1, 3, n, 4)).copy()


def one_token(batch: DecodeBatch, fills: list[float]) -> np.ndarray:
    """New entries (L, 2, b, h, 1, e) for a decode step: row r's entry holds fills[r]."""
    values = np.asarray(fills, np.float32)[None, None, :, None, None, None]
    return np.broadcast_to(values, (2, 2, len(batch), 3, 1, 4)).copy()


def assert_free_slots_are_zero(batch: DecodeBatch) -> None:
    """Masked slots must stay finite (0 × a free slot's value is 0 only if it is finite)."""
    free = ~batch.mask.astype(bool)  # (b, C)
    assert np.all(np.moveaxis(batch.cache, (2, 4), (0, 1))[free] == 0)


def test_bytes_per_token_is_layers_2_heads_head_dim_float32() -> None:
    assert SHAPE.bytes_per_token == 2 * 2 * 3 * 4 * 4


def test_budget_counts_rows_times_the_longest_reservation() -> None:
    budget = KVBudget(SHAPE, capacity_bytes=10 * SHAPE.bytes_per_token)
    assert budget.footprint([3, 5]) == 2 * 5 * SHAPE.bytes_per_token  # rows x longest
    assert budget.fits([5, 5])
    assert not budget.fits([5, 5, 1])  # 3 rows x 5 > 10 tokens
    assert budget.fits_alone(10) and not budget.fits_alone(11)


def test_capacity_has_headroom_in_blocks_but_never_exceeds_the_limit() -> None:
    assert capacity_for(1, BIG) == 256
    assert capacity_for(240, BIG) == 256  # 1.0625 x 240 = 255
    assert capacity_for(241, BIG) == 512  # 1.0625 x 241 = 256.06
    assert capacity_for(4000, BIG) == 4352  # 4250, rounded up to a block
    assert capacity_for(241, 300) == 300  # the longest reservation caps it...
    assert capacity_for(241, 100) == 241  # ...but it always holds what is needed


def test_add_left_aligns_rows_and_keeps_every_row_intact() -> None:
    batch = DecodeBatch(SHAPE)
    batch.add(7, fake_cache(3, 100), limit=BIG)
    batch.add(8, fake_cache(5, 200), limit=BIG)
    batch.add(9, fake_cache(1, 300), limit=BIG)
    assert batch.ids == [7, 8, 9]
    assert batch.capacity == 256  # one allocation with headroom, not one per token
    assert batch.cache.shape == (2, 2, 3, 3, 256, 4)
    assert batch.mask[:, :6].tolist() == [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 0, 0, 0, 0, 0],
    ]
    assert batch.real_lengths() == [3, 5, 1]
    for seq_id, n, fill in ((7, 3, 100), (8, 5, 200), (9, 1, 300)):
        np.testing.assert_array_equal(batch.row(seq_id), fake_cache(n, fill))
    assert_free_slots_are_zero(batch)
    assert batch.nbytes == 3 * 256 * SHAPE.bytes_per_token  # what is really allocated
    with pytest.raises(ValueError, match="already"):
        batch.add(7, fake_cache(1, 0), limit=BIG)


def test_capacity_never_exceeds_the_longest_reservation() -> None:
    """What keeps KVBudget's promise: rows x C <= rows x the longest reservation."""
    batch = DecodeBatch(SHAPE)
    batch.add(1, fake_cache(3, 0), limit=10)
    assert batch.capacity == 10  # not 256: this row can never hold more than 10 tokens
    batch.add(2, fake_cache(6, 0), limit=20)
    assert batch.capacity == 10  # still room for every row's next token
    for _ in range(13):  # row 2 reaches 19 tokens (its limit is 20: prompt + max_new_tokens)
        batch.advance(one_token(batch, [1, 2]))
    assert batch.capacity == 20 and batch.real_lengths() == [16, 19]
    with pytest.raises(ValueError, match="exceeds its own limit"):
        batch.add(3, fake_cache(6, 0), limit=5)


def test_inputs_pass_the_whole_buffer_and_a_mask_with_the_new_token() -> None:
    batch = DecodeBatch(SHAPE)
    batch.add(1, fake_cache(2, 0), limit=8)
    batch.add(2, fake_cache(3, 0), limit=8)
    inputs = batch.inputs([11, 12], NAMES)
    assert inputs["input_ids"].tolist() == [[11], [12]]
    assert batch.capacity == 8
    assert inputs["attention_mask"].tolist() == [
        [1, 1, 0, 0, 0, 0, 0, 0, 1],  # free slots between the past and the new token
        [1, 1, 1, 0, 0, 0, 0, 0, 1],
    ]
    # The past per layer, as views of the buffer: no copy per step, and contiguous, so a runtime
    # reads them in place.
    assert list(inputs)[2:] == ["past.0.key", "past.0.value", "past.1.key", "past.1.value"]
    for i, name in enumerate(list(inputs)[2:]):
        view = inputs[name]
        assert np.shares_memory(view, batch.cache) and view.flags.c_contiguous
        np.testing.assert_array_equal(view, batch.cache[i // 2, i % 2])
    with pytest.raises(ValueError, match="2 rows"):
        batch.inputs([11], NAMES)


def test_prefill_inputs_pass_a_sequences_cache_per_layer_without_copying() -> None:
    cache = fake_cache(3, 0)
    inputs = prefill_inputs([7, 8], cache, NAMES)
    assert inputs["input_ids"].tolist() == [[7, 8]]
    assert inputs["attention_mask"].tolist() == [[1] * 5]  # 3 cached + 2 new, all real
    assert list(inputs)[2:] == ["past.0.key", "past.0.value", "past.1.key", "past.1.value"]
    assert all(
        inputs[n].base is cache and inputs[n].shape == (1, 3, 3, 4) for n in list(inputs)[2:]
    )
    first = prefill_inputs([7], SHAPE.empty(1), NAMES)  # the first chunk: an empty past
    assert first["attention_mask"].shape == (1, 1) and first["past.1.value"].shape == (1, 3, 0, 4)


def test_advance_writes_each_new_entry_in_place_at_the_rows_length() -> None:
    batch = DecodeBatch(SHAPE)
    batch.add(1, fake_cache(2, 10), limit=BIG)
    batch.add(2, fake_cache(4, 20), limit=BIG)
    buffer = batch.cache
    batch.advance(one_token(batch, [-1, -2]))
    assert np.shares_memory(batch.cache, buffer)  # in place: nothing reallocated
    assert batch.real_lengths() == [3, 5]
    np.testing.assert_array_equal(batch.row(1)[..., :2, :], fake_cache(2, 10))
    np.testing.assert_array_equal(batch.row(2)[..., :4, :], fake_cache(4, 20))
    assert np.all(batch.row(1)[..., 2, :] == -1) and np.all(batch.row(2)[..., 4, :] == -2)
    assert_free_slots_are_zero(batch)
    with pytest.raises(ValueError, match="expected"):
        batch.advance(np.zeros((2, 2, 2, 3, 2, 4), np.float32))  # two tokens, not one


def test_growth_copies_once_with_headroom_and_keeps_rows() -> None:
    batch = DecodeBatch(SHAPE)
    batch.add(1, fake_cache(250, 0), limit=BIG)
    batch.add(2, fake_cache(3, 1000), limit=BIG)
    assert batch.capacity == 512  # round_up(1.0625 x 251, 256)
    reallocations, buffer = 0, batch.cache
    for step in range(600):
        batch.advance(one_token(batch, [5000 + step, 6000 + step]))
        if not np.shares_memory(batch.cache, buffer):
            reallocations, buffer = reallocations + 1, batch.cache
    # 850 tokens: 512 -> 768 (at 513: round_up(1.0625 x 513, 256)) -> 1024 (at 769).
    assert reallocations == 2 and batch.capacity == 1024
    assert batch.real_lengths() == [850, 603]
    np.testing.assert_array_equal(batch.row(1)[..., :250, :], fake_cache(250, 0))
    np.testing.assert_array_equal(batch.row(2)[..., :3, :], fake_cache(3, 1000))
    expected = np.arange(600, dtype=np.float32)
    np.testing.assert_array_equal(batch.row(1)[0, 0, 0, 0, 250:, 0], 5000 + expected)
    np.testing.assert_array_equal(batch.row(2)[0, 0, 0, 0, 3:, 0], 6000 + expected)
    assert_free_slots_are_zero(batch)


def test_remove_keeps_other_rows_and_shrinks_when_the_long_rows_leave() -> None:
    batch = DecodeBatch(SHAPE)
    batch.add(1, fake_cache(2, 10), limit=BIG)
    batch.add(2, fake_cache(900, 20), limit=BIG)
    batch.add(3, fake_cache(4, 30), limit=BIG)
    assert batch.capacity == 1024  # round_up(1.0625 x 901, 256)
    batch.remove({2})  # the longest leaves: the others stop paying for its length
    assert batch.ids == [1, 3]
    assert batch.capacity == 256
    assert batch.nbytes == 2 * 256 * SHAPE.bytes_per_token
    assert batch.real_lengths() == [2, 4]
    np.testing.assert_array_equal(batch.row(1), fake_cache(2, 10))
    np.testing.assert_array_equal(batch.row(3), fake_cache(4, 30))
    assert_free_slots_are_zero(batch)
    batch.advance(one_token(batch, [7, 8]))  # rows still decode where they left off
    assert np.all(batch.row(1)[..., 2, :] == 7) and np.all(batch.row(3)[..., 4, :] == 8)
    batch.remove({99})  # unknown ids are ignored
    assert batch.ids == [1, 3]
    batch.remove({1, 3})
    assert len(batch) == 0 and batch.nbytes == 0 and batch.mask.shape == (0, 0)
    batch.add(4, fake_cache(3, 40), limit=BIG)  # an emptied batch takes rows again
    np.testing.assert_array_equal(batch.row(4), fake_cache(3, 40))


def test_remove_does_not_shrink_below_what_the_remaining_rows_use() -> None:
    batch = DecodeBatch(SHAPE)
    batch.add(1, fake_cache(600, 10), limit=BIG)
    batch.add(2, fake_cache(700, 20), limit=BIG)
    before = batch.capacity
    batch.remove({2})
    assert batch.capacity == min(before, capacity_for(601, BIG)) == 768
    np.testing.assert_array_equal(batch.row(1), fake_cache(600, 10))


def test_a_leaving_row_is_replaced_by_the_last_and_its_slots_zeroed_in_place() -> None:
    batch = DecodeBatch(SHAPE)
    for seq_id, n in ((1, 5), (2, 3), (3, 4)):
        batch.add(seq_id, fake_cache(n, 10 * seq_id), limit=BIG)
    buffer = batch.cache
    batch.remove({1})
    assert batch.ids == [3, 2]  # the last row took the hole: no other row was copied
    assert np.shares_memory(batch.cache, buffer)  # no reallocation
    np.testing.assert_array_equal(batch.row(3), fake_cache(4, 30))
    np.testing.assert_array_equal(batch.row(2), fake_cache(3, 20))
    assert_free_slots_are_zero(batch)
    batch.add(4, fake_cache(2, 40), limit=BIG)  # joins into the freed row, in place
    assert np.shares_memory(batch.cache, buffer) and batch.ids == [3, 2, 4]
    np.testing.assert_array_equal(batch.row(4), fake_cache(2, 40))
    assert_free_slots_are_zero(batch)


def test_rows_are_allocated_with_room_within_max_bytes() -> None:
    per_row = 256 * SHAPE.bytes_per_token  # one row of the first capacity block
    batch = DecodeBatch(SHAPE, max_bytes=5 * per_row)
    batch.add(1, fake_cache(3, 10), limit=BIG)
    assert batch.rows_allocated == 2  # room for one more join without a copy
    batch.add(2, fake_cache(3, 20), limit=BIG)
    buffer = batch.cache
    batch.add(3, fake_cache(3, 30), limit=BIG)
    assert batch.rows_allocated == 5  # twice 3 would exceed max_bytes: as many as it holds
    assert batch.nbytes <= 5 * per_row
    batch.add(4, fake_cache(3, 40), limit=BIG)
    assert np.shares_memory(batch.cache, buffer) is False  # 3 -> 4 rows copied once...
    buffer = batch.cache
    batch.add(5, fake_cache(3, 50), limit=BIG)
    assert np.shares_memory(batch.cache, buffer)  # ...and the 5th joined in place
    for seq_id in range(1, 6):
        np.testing.assert_array_equal(batch.row(seq_id), fake_cache(3, 10 * seq_id))
    assert_free_slots_are_zero(batch)
    batch.remove({1, 2, 3, 4})
    assert batch.rows_allocated == 2  # mostly idle rows are released
    np.testing.assert_array_equal(batch.row(5), fake_cache(3, 50))


# ----------------------------------------------------------------------- against the real graph


@pytest.fixture(scope="module")
def ali(service_store: ServiceStore) -> Iterator[LoadedModel]:
    settings = Settings(store=service_store.root, intra_op_threads=2)
    model = load_model(ModelRepository(service_store.root), "ali", None, settings)
    yield model
    model.close()


def prefill(model: LoadedModel, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(logits (t, v), cache (L, 2, 1, h, t, e)) of one sequence alone: with an empty past the
    graph's new entries are the whole prompt's cache."""
    cache = model.manifest.signature.cache
    assert cache is not None
    shape = CacheShape.from_layout(cache)
    out = model.backend.run(prefill_inputs(ids, shape.empty(1), cache.inputs))
    return out["logits"][0], out[cache.output]


def test_batched_decode_equals_each_sequence_alone(ali: LoadedModel) -> None:
    """Free slots are invisible: a row's logits and cache match the sequence run alone."""
    layout = ali.manifest.signature.cache
    assert layout is not None
    prompts = {1: [5, 9, 33, 70, 12, 8, 100], 2: [44, 2], 3: [300, 301, 302, 7]}
    next_token = {1: 17, 2: 250, 3: 4}
    batch = DecodeBatch(CacheShape.from_layout(layout))
    alone: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for seq_id, ids in prompts.items():
        _, cache = prefill(ali, ids)
        batch.add(seq_id, cache, limit=len(ids) + 8)
        logits, present = prefill(ali, [*ids, next_token[seq_id]])
        alone[seq_id] = (logits[-1], present)

    for step in range(2):  # the second step runs after the longest row left (shrunk buffer)
        tokens = [next_token[i] for i in batch.ids]
        out = ali.backend.run(batch.inputs(tokens, layout.inputs))
        batch.advance(out[layout.output])
        for row, seq_id in enumerate(batch.ids):
            logits, present = alone[seq_id]
            np.testing.assert_allclose(out["logits"][row, -1], logits, atol=1e-5)
            np.testing.assert_allclose(batch.row(seq_id), present, atol=1e-5)
        if step == 0:
            assert batch.capacity == 15  # capped by the longest reservation: 7 + 8 tokens
            batch.remove({1})
            assert batch.capacity == 12  # row 1 left: capped by row 3's 4 + 8 tokens
            for seq_id in batch.ids:
                prompts[seq_id].append(next_token[seq_id])
                next_token[seq_id] += 1
                logits, present = prefill(ali, [*prompts[seq_id], next_token[seq_id]])
                alone[seq_id] = (logits[-1], present)
