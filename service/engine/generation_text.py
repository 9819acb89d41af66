"""Generated token ids -> text pieces safe to stream: incremental decoding and stop strings.

Two problems, one class each:

* Byte-level BPE tokens are bytes, not characters: one character (``é``, ``✓``) can span several
  tokens, and decoding a prefix then shows U+FFFD. :class:`IncrementalDecoder` (the approach of
  TGI and vLLM) decodes a short window of recent tokens and only releases text once it no longer
  ends in an incomplete character.
* Stop strings are matched on decoded text and must not reach the client, not even partly.
  :class:`StopMatcher` holds back the longest tail of the text that could still grow into a stop
  string, so streamed text never has to be taken back.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    """Feeds token ids one at a time; returns the newly completed text of each."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        # Text of ids[prefix:read] has been released; decoding from ``prefix`` (a few tokens back,
        # not from 0) keeps each step O(1) while giving the decoder context for spacing rules.
        self._prefix = 0
        self._read = 0
        self.released = 0  # characters released so far: where the next token's text starts

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT_CHAR):
            self._prefix, self._read = self._read, len(self._ids)
            self.released += len(after) - len(before)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held at the end (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        self.released += len(after) - len(before)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


class StopMatcher:
    """Accumulates decoded text; releases what can no longer be part of a stop string.

    Invariant: every position of the text from which a stop string could still start is held.
    So the first occurrence of a stop string always begins inside the held text, and text once
    released is final.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = stop
        self._held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add text; return the part now safe to release. Sets ``stopped`` on a match."""
        if self.stopped:
            return ""
        self._held += piece
        if not self._stop:
            released, self._held = self._held, ""
            return released
        hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            released, self._held = self._held[: min(hits)], ""
            return released
        keep = self._partial_suffix(self._held)
        released = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return released

    def flush(self) -> str:
        """At the end of generation (length or EOS) the held tail is ordinary text."""
        released, self._held = ("" if self.stopped else self._held), ""
        return released

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


class TextTracker:
    """Token ids in, releasable text out, with stop strings applied. One per sequence."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self._decoder = IncrementalDecoder(tokenizer)
        self._matcher = StopMatcher(stop)

    @property
    def decoded_chars(self) -> int:
        """Characters decoded so far, stop strings ignored: the next token's text offset."""
        return self._decoder.released

    @property
    def stopped(self) -> bool:
        """True once a stop string appeared; the caller ends the sequence with reason "stop"."""
        return self._matcher.stopped

    def push(self, token_id: int) -> str:
        return self._matcher.push(self._decoder.push(token_id))

    def finish(self) -> str:
        """Text still held when generation ends for another reason (length, EOS, stop)."""
        if self._matcher.stopped:
            return ""
        # The decoder's tail may itself complete a stop string, hence through the matcher.
        text = self._matcher.push(self._decoder.flush())
        return text + self._matcher.flush()


def decode_with_offsets(tokenizer: Tokenizer, ids: Sequence[int]) -> tuple[str, list[int]]:
    """The text of ``ids`` and the character offset in it at which each token's text starts
    (a token that ends inside a multi-byte character starts where that character does)."""
    decoder = IncrementalDecoder(tokenizer)
    pieces: list[str] = []
    offsets: list[int] = []
    for token_id in ids:
        offsets.append(decoder.released)
        pieces.append(decoder.push(token_id))
    pieces.append(decoder.flush())
    return "".join(pieces), offsets


class TokenTexts:
    """Token id -> the token's own text, as ``logprobs`` show it; cached, since a token's text
    does not depend on its context.

    A byte-level BPE token that is only part of a UTF-8 character has no text of its own: it is
    shown as OpenAI shows it, ``bytes:`` followed by its bytes as ``\\xNN`` escapes. Special
    tokens show their name (``<eos>``).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._text(token_id)
        return text

    def _text(self, token_id: int) -> str:
        text: str = self._tokenizer.decode([token_id], skip_special_tokens=False)
        if REPLACEMENT_CHAR not in text or not self._byte_level:
            return text
        symbols = self._tokenizer.id_to_token(token_id) or ""
        table = _byte_symbol_table()
        if not symbols or any(c not in table for c in symbols):
            return text
        raw = bytes(table[c] for c in symbols)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


_BYTE_SYMBOLS: dict[str, int] = {}


def _byte_symbol_table() -> dict[str, int]:
    """Byte-level BPE's printable symbol -> the byte it stands for (GPT-2's table: printable
    Latin-1 bytes stand for themselves, the others are shifted past U+0100 in byte order)."""
    if not _BYTE_SYMBOLS:
        printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
        shifted = 0
        for byte in range(256):
            if byte in printable:
                _BYTE_SYMBOLS[chr(byte)] = byte
            else:
                _BYTE_SYMBOLS[chr(256 + shifted)] = byte
                shifted += 1
    return _BYTE_SYMBOLS
