"""Byte-level BPE tokenizer trained with HF ``tokenizers`` on the demo corpus.

Encoders get a post-processor that prepends ``<cls>`` so ``cls`` pooling reads position 0;
decoders add nothing (see docs/contracts.md).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from exporters.architectures.common import CLS_ID, CLS_TOKEN, SPECIAL_TOKENS


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
