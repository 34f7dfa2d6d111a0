"""Incremental detokenization: token ids in, only the new text out, one object per request.

A token does not always decode to text on its own: SentencePiece byte-fallback
tokens (``<0xE7>``) and byte-level BPE pieces carry parts of a multi-byte UTF-8
character, and SentencePiece drops the space (``▁``) that begins the first
token of a sequence. Decoding each streamed chunk alone therefore garbles
Chinese and glues English words together; re-decoding the whole output at
every step is correct but costs O(n) per token.

This keeps a small window of recent ids (as vLLM and TGI do): it decodes the
window with and without the newest ids and emits the difference, and holds
text back while it ends in an incomplete character (U+FFFD). The window starts
at the last token already emitted, so its decode carries the same leading-space
context as the full decode. Cost per token is O(window), not O(output).

SentencePiece's byte-fallback decoder decodes a run of byte tokens as a unit and
turns the whole run into U+FFFD if any byte in it is invalid, so text from a run
is final only once the run ends: while the newest visible id is a byte token, text
waits (special tokens are skipped before decoding, so they do not end a run).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

REPLACEMENT_CHAR = "\ufffd"

Decode = Callable[[Sequence[int]], str]


def make_decode(tokenizer) -> Decode:
    """Raw decode (special tokens skipped, no clean-up of spaces) for a Hugging Face tokenizer.

    Space clean-up, where the tokenizer asks for it, is a separate streaming stage
    (``bayling.textstream``), because it looks at characters on both sides of a chunk border.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode"):
        return lambda ids: backend.decode(list(ids), skip_special_tokens=True)
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class ByteRuns:
    """Which ids are byte-fallback tokens, and which the decode skips (special tokens)."""
    byte_ids: frozenset[int] = frozenset()
    skipped_ids: frozenset[int] = frozenset()


def byte_runs(tokenizer) -> ByteRuns:
    """SentencePiece byte-fallback tokens (``<0x00>`` ... ``<0xFF>``); none for byte-level BPE."""
    byte_ids = frozenset(i for tok, i in tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(tok))
    return ByteRuns(byte_ids, frozenset(tokenizer.all_special_ids) if byte_ids else frozenset())


class IncrementalDetokenizer:
    def __init__(self, decode: Decode, runs: ByteRuns = ByteRuns()):
        self._decode = decode
        self._runs = runs
        self._in_byte_run = False
        # Window of ids: [0, _read) were emitted by the last emission (context for the next
        # one, starting on a character boundary); [_read, end) are still pending.
        self._window: list[int] = []
        self._read = 0
        self._prefix_text = ""  # decode(window[:_read])

    def add(self, token_ids: Iterable[int]) -> str:
        """Feed new ids (one or many); return the text they complete, possibly ''."""
        new = [int(t) for t in token_ids]
        self._window.extend(new)
        if self._runs.byte_ids:
            for t in new:
                if t in self._runs.byte_ids:
                    self._in_byte_run = True
                elif t not in self._runs.skipped_ids:
                    self._in_byte_run = False
        if len(self._window) == self._read or self._in_byte_run:
            return ""
        text = self._decode(self._window)
        if text.endswith(REPLACEMENT_CHAR) or len(text) <= len(self._prefix_text):
            return ""  # an incomplete character, or nothing visible yet: wait for more ids
        return self._emit(text)

    def flush(self) -> str:
        """At the end: whatever is still pending, even an incomplete character."""
        if len(self._window) == self._read:
            return ""
        text = self._decode(self._window)
        return self._emit(text) if len(text) > len(self._prefix_text) else ""

    def _emit(self, text: str) -> str:
        new = text[len(self._prefix_text):]
        # The next window starts where this emission started: on a character boundary,
        # with the leading-space context that the full decode has there.
        self._window = self._window[self._read:]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        return new
