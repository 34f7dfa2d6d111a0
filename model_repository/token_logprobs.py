"""Per-token log probabilities as OpenAI shows them: {token, logprob, bytes, top_logprobs}.

The `bayling` model sends them with its text (output `token_logprobs`, a JSON list per response),
so that clients and the OpenAI gateway need no tokenizer. A token's `bytes` are its exact UTF-8
bytes, also for a token that holds part of a character (byte-level BPE pieces, SentencePiece
byte-fallback tokens), whose `token` then shows U+FFFD as OpenAI does. `top_logprobs` come from
the engine's generation logits (log-softmax, the most likely first).
"""

from __future__ import annotations

import re

import numpy as np

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for the 256 bytes (GPT-2's bytes_to_unicode), reversed."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


class TokenTexts:
    """Token id -> (text, bytes), computed once per id."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_decoder = _gpt2_byte_decoder()

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._compute(token_id)
        return hit

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        piece = self._tokenizer.convert_ids_to_tokens(token_id) or ""
        byte = _BYTE_TOKEN.fullmatch(piece)
        if byte:                                           # SentencePiece byte fallback
            raw = bytes([int(byte.group(1), 16)])
        elif piece and all(c in self._byte_decoder for c in piece):   # byte-level BPE
            raw = bytes(self._byte_decoder[c] for c in piece)
        else:                                              # SentencePiece piece (▁ is a space)
            raw = piece.replace("\u2581", " ").encode("utf-8")
        return raw.decode("utf-8", errors="replace"), list(raw)


def top_alternatives(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely token ids of one step's logits and their log probs, most likely first."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max()
    log_probs = logits - top - np.log(np.exp(logits - top).sum())
    ids = np.argpartition(-log_probs, k - 1)[:k]
    ids = ids[np.argsort(-log_probs[ids], kind="stable")]
    return ids, log_probs[ids]


def entries(texts: TokenTexts, token_ids: list[int], log_probs: list[float], logits: list | None,
            top_k: int) -> list[dict]:
    """One OpenAI logprob entry per token."""
    out = []
    for i, token_id in enumerate(token_ids):
        text, raw = texts(token_id)
        entry = {"token": text, "logprob": float(log_probs[i]) if i < len(log_probs) else 0.0, "bytes": raw,
                 "top_logprobs": []}
        if top_k and logits is not None and i < len(logits):
            ids, values = top_alternatives(logits[i], top_k)
            entry["top_logprobs"] = [{"token": texts(int(t))[0], "logprob": float(v), "bytes": texts(int(t))[1]}
                                     for t, v in zip(ids, values)]
        out.append(entry)
    return out
