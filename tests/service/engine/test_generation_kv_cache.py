"""KV cache accounting and the left-padded decode batch, on synthetic tensors and the real graph."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from model_store import ModelRepository
from service.engine.kv_cache import CacheShape, DecodeBatch, KVBudget
from service.engine.models import LoadedModel, load_model
from service.settings import Settings
from tests.service.conftest import ServiceStore

SHAPE = CacheShape(n_layers=2, n_heads=3, head_dim=4)


def fake_cache(n: int, fill: float) -> np.ndarray:
    """(L, 2, 1, h, n, e) whose slot j holds fill + j, so misplaced slots are visible."""
    slots = fill + np.arange(n, dtype=np.float32)
    return np.broadcast_to(slots[None, None, None, None, :, None], (2, 2, 1, 3, n, 4)).copy()


def test_bytes_per_token_is_layers_2_heads_head_dim_float32() -> None:
    assert SHAPE.bytes_per_token == 2 * 2 * 3 * 4 * 4


def test_budget_counts_the_padded_batch() -> None:
    budget = KVBudget(SHAPE, capacity_bytes=10 * SHAPE.bytes_per_token)
    assert budget.footprint([3, 5]) == 2 * 5 * SHAPE.bytes_per_token  # rows x longest
    assert budget.fits([5, 5])
    assert not budget.fits([5, 5, 1])  # 3 rows x 5 > 10 tokens
    assert budget.fits_alone(10) and not budget.fits_alone(11)


def test_add_left_pads_and_keeps_every_row_intact() -> None:
    batch = DecodeBatch(SHAPE)
    batch.add(7, fake_cache(3, 100))
    batch.add(8, fake_cache(5, 200))
    batch.add(9, fake_cache(1, 300))
    assert batch.ids == [7, 8, 9]
    assert batch.cache.shape == (2, 2, 3, 3, 5, 4)
    assert batch.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]
    assert batch.real_lengths() == [3, 5, 1]
    for seq_id, n, fill in ((7, 3, 100), (8, 5, 200), (9, 1, 300)):
        np.testing.assert_array_equal(batch.row(seq_id), fake_cache(n, fill))
    assert np.all(batch.cache[:, :, 0, :, :2] == 0)  # padding is zeros (and masked)
    assert batch.nbytes == 3 * 5 * SHAPE.bytes_per_token


def test_remove_trims_columns_no_row_uses() -> None:
    batch = DecodeBatch(SHAPE)
    batch.add(1, fake_cache(2, 10))
    batch.add(2, fake_cache(6, 20))
    batch.add(3, fake_cache(4, 30))
    batch.remove({2})  # the longest leaves: the others should stop paying for its length
    assert batch.ids == [1, 3]
    assert batch.past_length == 4
    assert batch.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    np.testing.assert_array_equal(batch.row(1), fake_cache(2, 10))
    np.testing.assert_array_equal(batch.row(3), fake_cache(4, 30))
    batch.remove({1, 3, 99})  # unknown ids are ignored
    assert len(batch) == 0 and batch.nbytes == 0 and batch.mask.shape == (0, 0)


def test_inputs_and_advance_append_one_real_column() -> None:
    batch = DecodeBatch(SHAPE)
    batch.add(1, fake_cache(2, 0))
    batch.add(2, fake_cache(3, 0))
    inputs = batch.inputs([11, 12], "past")
    assert inputs["input_ids"].tolist() == [[11], [12]]
    assert inputs["attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert inputs["past"] is batch.cache
    present = np.zeros((2, 2, 2, 3, 4, 4), np.float32)
    batch.advance(present)
    assert batch.real_lengths() == [3, 4]
    with pytest.raises(ValueError, match="expected"):
        batch.advance(present)  # still P + 1 = 4, but the batch now expects 5
    with pytest.raises(ValueError, match="already"):
        batch.add(1, fake_cache(1, 0))


# ----------------------------------------------------------------------- against the real graph


@pytest.fixture(scope="module")
def ali(service_store: ServiceStore) -> Iterator[LoadedModel]:
    settings = Settings(store=service_store.root, intra_op_threads=2)
    model = load_model(ModelRepository(service_store.root), "ali", None, settings)
    yield model
    model.close()


def prefill(model: LoadedModel, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(logits (t, v), cache (L, 2, 1, h, t, e)) of one sequence alone."""
    cache = model.manifest.signature.cache
    assert cache is not None
    shape = CacheShape.from_layout(cache)
    out = model.backend.run(
        {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, len(ids)), np.int64),
            cache.input: shape.empty(1),
        }
    )
    return out["logits"][0], out[cache.output]


def test_batched_decode_equals_each_sequence_alone(ali: LoadedModel) -> None:
    """Left padding is invisible: a row's logits and new cache match the sequence run alone."""
    layout = ali.manifest.signature.cache
    assert layout is not None
    prompts = {1: [5, 9, 33, 70, 12, 8, 100], 2: [44, 2], 3: [300, 301, 302, 7]}
    next_token = {1: 17, 2: 250, 3: 4}
    batch = DecodeBatch(CacheShape.from_layout(layout))
    alone: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for seq_id, ids in prompts.items():
        _, cache = prefill(ali, ids)
        batch.add(seq_id, cache)
        logits, present = prefill(ali, [*ids, next_token[seq_id]])
        alone[seq_id] = (logits[-1], present)

    for step in range(2):  # the second step runs after the longest row left (trimmed batch)
        tokens = [next_token[i] for i in batch.ids]
        out = ali.backend.run(batch.inputs(tokens, layout.input))
        batch.advance(out[layout.output])
        for row, seq_id in enumerate(batch.ids):
            logits, present = alone[seq_id]
            np.testing.assert_allclose(out["logits"][row, -1], logits, atol=1e-5)
            np.testing.assert_allclose(batch.row(seq_id), present, atol=1e-5)
        if step == 0:
            batch.remove({1})
            assert batch.past_length == 5  # 4 prompt tokens + 1 decoded: row 3 is now longest
            for seq_id in batch.ids:
                prompts[seq_id].append(next_token[seq_id])
                next_token[seq_id] += 1
                logits, present = prefill(ali, [*prompts[seq_id], next_token[seq_id]])
                alone[seq_id] = (logits[-1], present)
