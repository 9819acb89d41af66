"""Tokenizers as HF ``tokenizers`` JSON, the one format the service reads.

* ``train_tokenizer``: the demo models' byte-level BPE, trained on the demo corpus. Encoders get
  a post-processor that prepends ``<cls>`` so ``cls`` pooling reads position 0; decoders add
  nothing (see docs/contracts.md).
* ``convert_sentencepiece``: an imported checkpoint's sentencepiece ``spiece.model``, converted
  by ``transformers``' own tokenizer class for the model (what ``AutoTokenizer`` loads) and then
  checked against ``sentencepiece`` itself, id for id, on a sample text.
* ``byte_tokenizer``: a vocabulary of raw UTF-8 bytes shifted by a few special ids (ids = byte +
  offset), as HF's ``google/reformer-enwik8``, which ships no tokenizer file at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from exporters.architectures.common import CLS_ID, CLS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(
            f"vocab_size must exceed the 256 byte symbols + specials, got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    # Special tokens are added first, in order, so their ids are fixed; check instead of assume.
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"special token {token} did not receive id {expected_id}")
    return tokenizer


def for_task(tokenizer: Tokenizer, task: str) -> Tokenizer:
    """A copy of ``tokenizer`` with the post-processor the task's models were trained with."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    if task == "encode":
        copy.post_processor = processors.TemplateProcessing(
            single=f"{CLS_TOKEN} $A", special_tokens=[(CLS_TOKEN, CLS_ID)]
        )
    elif task != "generate":
        raise ValueError(f"unknown task {task!r}")
    return copy


SENTENCEPIECE_FILE = "spiece.model"
# Checked at conversion, id for id against sentencepiece: words, punctuation, digits, runs of
# spaces, tabs and newlines (sentencepiece folds them), accents, other scripts, an emoji.
CONVERSION_CHECK_TEXT = (
    'A few months later, Raskolnikov said:  "Well?" -- it was 7:30 p.m. on 12/03/1866.\n'
    "\tNaïve café, façade, Ärger; Преступление и наказание; 罪と罰 😀  end  "
)


class TokenizerConversionError(ValueError):
    """A tokenizer could not be converted faithfully; the message says why."""


def convert_sentencepiece(model_dir: Path) -> Tokenizer:
    """``model_dir`` (config.json with ``model_type`` + spiece.model) -> the tokenizers JSON
    transformers builds from it, verified to give sentencepiece's own ids on
    CONVERSION_CHECK_TEXT.

    Needs ``transformers`` and ``sentencepiece`` (the ``dev`` extra pins both); imported here so
    that nothing else in exporters depends on them.
    """
    try:
        import sentencepiece
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise TokenizerConversionError(
            f"converting {model_dir / SENTENCEPIECE_FILE} needs transformers and sentencepiece "
            f"(pip install -e '.[dev]'): {exc}"
        ) from exc
    path = model_dir / SENTENCEPIECE_FILE
    try:
        reference = sentencepiece.SentencePieceProcessor(model_file=str(path))
        converted = AutoTokenizer.from_pretrained(str(model_dir)).backend_tokenizer
    except Exception as exc:  # both libraries raise their own types (protobuf, OSError, ...)
        raise TokenizerConversionError(f"cannot convert {path}: {exc}") from exc
    tokenizer = Tokenizer.from_str(converted.to_str())
    if _strips_whitespace(path) and tokenizer.normalizer is not None:
        # sentencepiece's remove_extra_whitespaces also drops leading and trailing whitespace;
        # transformers' conversion folds inner runs only, so "The answer is " would gain a
        # trailing "▁" sentencepiece never produces.
        tokenizer.normalizer = normalizers.Sequence([tokenizer.normalizer, normalizers.Strip()])
    expected = reference.encode(CONVERSION_CHECK_TEXT)
    got = tokenizer.encode(CONVERSION_CHECK_TEXT, add_special_tokens=False).ids
    if got != expected:
        first = next(
            i for i, (a, b) in enumerate(zip([*got, -1], [*expected, -1], strict=True)) if a != b
        )
        raise TokenizerConversionError(
            f"transformers' conversion of {path} disagrees with sentencepiece at token {first} "
            f"of the check text ({got[first : first + 5]} vs {expected[first : first + 5]}); "
            "pass --tokenizer with a tokenizers JSON instead"
        )
    return tokenizer


def _strips_whitespace(path: Path) -> bool:
    from sentencepiece import sentencepiece_model_pb2

    # protobuf's builder defines the message classes at import; the package ships no stub for them.
    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    proto.ParseFromString(path.read_bytes())
    return bool(proto.normalizer_spec.remove_extra_whitespaces)


def _byte_symbols() -> list[str]:
    """The printable character that stands for each byte 0..255 in byte-level tokenizers
    (GPT-2's table, which ``pre_tokenizers.ByteLevel`` maps text to): printable Latin-1 bytes
    stand for themselves, the other 68 for the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = iter(range(256, 256 + 256 - len(printable)))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def byte_tokenizer(offset: int, vocab_size: int) -> Tokenizer:
    """ids = UTF-8 byte + ``offset``; ids below ``offset`` are special (``<pad>`` first), and
    decoding skips them, as HF's enwik8 decode does. Any text round-trips exactly."""
    if offset < 1 or vocab_size < 256 + offset:
        raise ValueError(
            f"a byte vocabulary with offset {offset} needs offset >= 1 and a vocabulary of at "
            f"least {256 + offset} ids, the model has {vocab_size}"
        )
    specials = [PAD_TOKEN, *(f"<special_{i}>" for i in range(1, offset))]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({symbol: b + offset for b, symbol in enumerate(_byte_symbols())})
    # BPE without merges: every byte symbol is its own token. No regex split, no prefix space:
    # the bytes of the text, nothing more.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    if sorted(pre_tokenizers.ByteLevel.alphabet()) != sorted(_byte_symbols()):
        raise RuntimeError("tokenizers' byte-level alphabet is not GPT-2's byte table")
    return tokenizer
