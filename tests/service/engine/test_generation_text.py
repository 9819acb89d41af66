"""Incremental detokenization and stop strings: what a stream may release, and when."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from model_store import ModelRepository
from service.engine.generation_text import (
    REPLACEMENT_CHAR,
    IncrementalDecoder,
    StopMatcher,
    TextTracker,
)
from tests.service.conftest import ServiceStore

TEXT = 'def héllo(x):\n    return "✓ ok" + x  # naïve'


@pytest.fixture(scope="module")
def tokenizer(service_store: ServiceStore) -> Tokenizer:
    version = ModelRepository(service_store.root).resolve("ali")
    return Tokenizer.from_file(str(Path(version.tokenizer_path)))


def test_incremental_decoding_never_splits_a_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(TEXT).ids
    # The fixture must exercise the hard case: some character spans several byte tokens.
    assert any(REPLACEMENT_CHAR in tokenizer.decode([i]) for i in ids)
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert all(REPLACEMENT_CHAR not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == TEXT


def test_incomplete_character_at_the_end_is_flushed(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a✓").ids
    decoder = IncrementalDecoder(tokenizer)
    released = "".join(decoder.push(i) for i in ids[:-1])
    assert released == "a"
    assert decoder.flush() == tokenizer.decode(ids[:-1])[1:]  # the partial bytes, as U+FFFD


def test_special_tokens_are_not_text(tokenizer: Tokenizer) -> None:
    decoder = IncrementalDecoder(tokenizer)
    ids = [0, *tokenizer.encode("ok").ids, 3]
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == "ok"


def test_stop_string_split_across_pieces_is_never_released() -> None:
    matcher = StopMatcher(("STOP",))
    released = [matcher.push(p) for p in ["abc S", "T", "O", "P tail"]]
    assert released == ["abc ", "", "", ""]
    assert matcher.stopped
    assert matcher.flush() == ""


def test_false_alarm_is_released_when_it_cannot_match() -> None:
    matcher = StopMatcher(("STOP",))
    assert matcher.push("xST") == "x"
    assert matcher.push("ORM") == "STORM"
    assert not matcher.stopped
    assert matcher.push("ST") == ""
    assert matcher.flush() == "ST"  # generation ended for another reason: held text is text


def test_earliest_of_several_stop_strings_wins() -> None:
    matcher = StopMatcher(("world", "lo w"))
    assert matcher.push("hello world") == "hel"
    assert matcher.stopped


def test_stop_at_the_very_start_releases_nothing() -> None:
    matcher = StopMatcher(("\n",))
    assert matcher.push("\nrest") == ""
    assert matcher.stopped


def test_overlapping_prefixes_hold_the_longest() -> None:
    matcher = StopMatcher(("aab",))
    assert matcher.push("xaa") == "x"  # "aa" could become "aab"
    assert matcher.push("a") == "a"  # "aaa": only the last "aa" can still match
    assert matcher.push("b") == ""
    assert matcher.stopped


def test_tracker_applies_stop_strings_to_decoded_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(TEXT).ids
    tracker = TextTracker(tokenizer, ("return",))
    out = ""
    for token in ids:
        out += tracker.push(token)
        if tracker.stopped:
            break
    assert tracker.stopped
    assert out + tracker.finish() == TEXT[: TEXT.index("return")]


def test_tracker_without_stop_reproduces_the_text(tokenizer: Tokenizer) -> None:
    tracker = TextTracker(tokenizer, ())
    ids = tokenizer.encode(TEXT).ids
    assert "".join(tracker.push(i) for i in ids) + tracker.finish() == TEXT
