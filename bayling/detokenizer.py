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
"""

from __future__ import annotations

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


class IncrementalDetokenizer:
    def __init__(self, decode: Decode):
        self._decode = decode
        # Window of ids: [0, _read) were emitted by the last emission (context for the next
        # one, starting on a character boundary); [_read, end) are still pending.
        self._window: list[int] = []
        self._read = 0
        self._prefix_text = ""  # decode(window[:_read])

    def add(self, token_ids: Iterable[int]) -> str:
        """Feed new ids (one or many); return the text they complete, possibly ''."""
        self._window.extend(int(t) for t in token_ids)
        if len(self._window) == self._read:
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
