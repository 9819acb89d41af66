import pytest

from exporters.architectures.common import CLS_ID, SPECIAL_TOKENS
from exporters.corpus import read_texts, split_corpus
from exporters.tokenizer import for_task, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    split = split_corpus()
    return train_tokenizer(read_texts(split.root, split.train, 200_000), vocab_size=400)


def test_special_tokens_have_fixed_ids(tokenizer) -> None:
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.get_vocab_size() == 400


def test_byte_level_round_trip_including_unseen_characters(tokenizer) -> None:
    text = "def f(x):\n    return x ** 2  # naïve → ∑ 😀\n"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    # Merges compress code: fewer tokens than bytes.
    assert len(ids) < len(text.encode())


def test_encoder_tokenizer_prepends_cls_decoder_does_not(tokenizer) -> None:
    enc = for_task(tokenizer, "encode").encode("import os").ids
    dec = for_task(tokenizer, "generate").encode("import os").ids
    assert enc[0] == CLS_ID
    assert enc[1:] == dec
    with pytest.raises(ValueError, match="unknown task"):
        for_task(tokenizer, "classify")


def test_vocab_too_small_is_rejected() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)
