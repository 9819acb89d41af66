"""Encode semantics: windows, truncation, chunking, pooling, normalisation (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.encoding import (
    CHUNK_OVERLAP_FRACTION,
    EncodeParams,
    PreparedInput,
    combine,
    l2_normalize,
    pool,
    prepare,
    window_starts,
)
from service.engine.errors import ContextLengthExceeded, InvalidInput
from service.engine.models import LoadedModel
from tests.service.engine.conftest import with_max_context

LONG_TEXT = "def function_number_{i}(argument):\n    return argument * {i}\n"


@pytest.mark.parametrize("length", [1, 31, 32, 33, 64, 100, 1000])
@pytest.mark.parametrize(("window", "overlap"), [(32, 4), (32, 0), (10, 9), (5, 20)])
def test_windows_cover_everything_with_the_stated_overlap(
    length: int, window: int, overlap: int
) -> None:
    starts = window_starts(length, window, overlap)
    ends = [min(s + window, length) for s in starts]
    assert starts[0] == 0 and ends[-1] == length
    assert starts == sorted(set(starts))
    for (s1, e1), s2 in zip(zip(starts, ends, strict=True), starts[1:], strict=False):
        assert s2 <= e1 - min(overlap, window - 1)  # consecutive windows overlap (no gap)
        assert e1 - s1 == window  # every window is full length when the input is longer
    if length <= window:
        assert starts == [0]


def long_text(lines: int) -> str:
    return "".join(LONG_TEXT.format(i=i) for i in range(lines))


def test_short_input_gets_the_cls_prefix(fake_model: LoadedModel) -> None:
    (item,) = prepare(fake_model, ["hello"], EncodeParams())
    expected = fake_model.tokenizer.encode("hello").ids
    assert item.windows[0].tolist() == expected and expected[0] == 3  # <cls>
    assert (item.prompt_tokens, item.truncated_tokens) == (len(expected), 0)


def test_too_long_is_an_error_naming_the_input(fake_model: LoadedModel) -> None:
    model = with_max_context(fake_model, 32)
    with pytest.raises(ContextLengthExceeded, match="maximum context is 32") as info:
        prepare(model, ["ok", long_text(10)], EncodeParams(param="input"))
    assert info.value.param == "input[1]"


def test_truncate_keeps_the_head(fake_model: LoadedModel) -> None:
    model = with_max_context(fake_model, 32)
    full = fake_model.tokenizer.encode(long_text(10)).ids
    (item,) = prepare(model, [long_text(10)], EncodeParams(truncate=True))
    assert item.windows[0].tolist() == full[:32]
    assert (item.prompt_tokens, item.truncated_tokens) == (32, len(full) - 32)


def test_chunk_windows_each_start_with_cls_and_cover_the_input(fake_model: LoadedModel) -> None:
    model = with_max_context(fake_model, 32)
    content = fake_model.tokenizer.encode(long_text(10), add_special_tokens=False).ids
    (item,) = prepare(model, [long_text(10)], EncodeParams(chunk=True))
    assert len(item.windows) > 2
    assert all(w[0] == 3 and len(w) == 32 for w in item.windows)
    starts = window_starts(len(content), 31, 32 // CHUNK_OVERLAP_FRACTION)
    assert [w[1:].tolist() for w in item.windows] == [content[s : s + 31] for s in starts]
    assert item.prompt_tokens == len(content) + 1 and item.truncated_tokens == 0


def test_token_ids_are_used_as_given_and_checked_against_the_vocabulary(
    fake_model: LoadedModel,
) -> None:
    (item,) = prepare(fake_model, [[5, 6, 7]], EncodeParams())
    assert item.windows[0].tolist() == [5, 6, 7]
    vocab = fake_model.manifest.config["vocab_size"]
    with pytest.raises(InvalidInput, match=f"0, {vocab}") as info:
        prepare(fake_model, [[1], [5, vocab]], EncodeParams(param="input"))
    assert info.value.param == "input[1]"


def test_chunk_with_per_token_output_is_refused(fake_model: LoadedModel) -> None:
    with pytest.raises(InvalidInput, match="chunk"):
        prepare(fake_model, ["x"], EncodeParams(chunk=True, pooling="none"))


def test_pooling() -> None:
    hidden = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(pool(hidden, "mean"), [4, 5, 6, 7])
    np.testing.assert_array_equal(pool(hidden, "cls"), [0, 1, 2, 3])
    np.testing.assert_array_equal(pool(hidden, "none"), hidden)


def test_normalize_leaves_zero_vectors_alone() -> None:
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_chunk_vectors_are_weighted_by_window_length() -> None:
    windows = [np.zeros(3, np.int64), np.zeros(1, np.int64)]
    prepared = [PreparedInput(windows, prompt_tokens=4, truncated_tokens=0)]
    vectors = [np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)]
    out = combine(prepared, vectors, EncodeParams(chunk=True, normalize=False))
    np.testing.assert_allclose(out.embeddings[0], [0.75, 0.25])
    assert (out.chunks, out.prompt_tokens) == (2, 4)
