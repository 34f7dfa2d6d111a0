"""Prompt tokenization: chat template -> token ids, with BayLing's invariants.

- BOS appears exactly once (the tokenizer adds it; a template that writes it is not doubled).
- The literal ``</s>`` that closes a BayLing assistant turn is the EOS token (id 2 for LLaMA),
  never the characters ``<``, ``/``, ``s``, ``>``: tokenizers split special tokens out of text.
- A conversation that does not fit the token budget loses its oldest whole turns (user and
  assistant together); the system text and the last user turn always stay.
- Stop and bad words become TensorRT-LLM's ``[2, N]`` word-list layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bayling.errors import InvalidInput
from bayling.templates import ChatTemplate, render_prompt

# Above this many content characters a token, a conversation is not tried whole before truncating;
# only a guess about speed (tokens are ~4 characters of English, ~1 of Chinese), never about the answer.
LIKELY_CHARS_PER_TOKEN = 8


def word_list(words_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """TensorRT-LLM's word list for one request: row 0 the ids of all words back to back
    (padded with 0), row 1 the cumulative end offsets (padded with -1); shape [2, N]."""
    flat = [int(t) for ids in words_ids if ids for t in ids]
    offsets = np.cumsum([len(ids) for ids in words_ids if ids]).tolist()
    n = max(1, len(flat), len(offsets)) if flat else 0
    out = np.zeros((2, n), dtype=np.int32)
    out[1, :] = -1
    out[0, :len(flat)] = flat
    out[1, :len(offsets)] = offsets
    return out


def parse_word_list(array: np.ndarray) -> list[list[int]]:
    """The inverse of `word_list`: the token sequences of each word."""
    array = np.asarray(array).reshape(2, -1)
    words, start = [], 0
    for end in array[1]:
        if end < 0:
            break
        words.append([int(t) for t in array[0, start:end]])
        start = int(end)
    return words


@dataclass
class EncodedPrompt:
    ids: list[int]
    dropped_turns: int = 0      # user+assistant pairs dropped to fit the budget


class PromptEncoder:
    def __init__(self, tokenizer, template: ChatTemplate):
        self.tokenizer = tokenizer
        self.template = template
        self.bos_id: int | None = tokenizer.bos_token_id
        self.bos_token: str = tokenizer.bos_token or ""
        self.eos_token: str = tokenizer.eos_token or ""
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.adds_bos = self.bos_id is not None and probe[:1] == [self.bos_id]

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a whole prompt, BOS once (when the tokenizer uses one)."""
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if self.adds_bos and len(ids) > 1 and ids[1] == self.bos_id and ids[0] == self.bos_id:
            ids = ids[1:]  # the template wrote BOS itself, and the tokenizer added another
        return ids

    def render(self, messages: list[dict]) -> str:
        return render_prompt(messages, self.template, bos_token=self.bos_token, eos_token=self.eos_token)

    def encode_messages(self, messages: list[dict], budget: int | None = None) -> EncodedPrompt:
        """Render and tokenize a validated conversation, dropping the oldest whole turns to fit `budget`.

        The result is that of dropping turns one at a time until the prompt fits, found in
        O(log turns) render-and-encode probes, since fewer kept turns never need more tokens.
        Every probe encodes the whole prompt it tries, so the answer is always an exact count."""
        system = messages[:1] if messages[0]["role"] == "system" else []
        turns = messages[len(system):]

        def encode(dropped: int) -> list[int]:
            return self.encode_text(self.render(system + turns[2 * dropped:]))

        low = -1    # dropping `low` turns is known not to fit (-1: nothing known yet)
        if budget is None or sum(len(m["content"]) for m in messages) <= budget * LIKELY_CHARS_PER_TOKEN:
            ids = encode(0)     # the common case, one encode: the whole conversation fits
            if budget is None or len(ids) <= budget:
                return EncodedPrompt(ids, 0)
            low = 0
        high = len(turns) // 2  # all dropped but the last user turn; from here on, dropping `high` fits
        high_ids = ids if low == high else encode(high)
        if len(high_ids) > budget:
            raise InvalidInput("messages", f"the prompt needs {len(high_ids)} tokens even with only the system text "
                                           f"and the last user turn, but {budget} are available (context length minus "
                                           "max_tokens)")
        # Keep 1, 2, 4, ... more turns until a probe does not fit, then bisect: a probe keeps at most
        # about twice the turns that fit, so a long history costs little more than its rendering.
        galloping, step = True, 1
        while high - low > 1:
            probe = max(high - step, low + 1) if galloping else (low + high) // 2
            probe_ids = encode(probe)
            if len(probe_ids) <= budget:
                high, high_ids, step = probe, probe_ids, step * 2
            else:
                low, galloping = probe, False
        return EncodedPrompt(high_ids, high)

    def encode_words(self, words: Sequence[str]) -> np.ndarray:
        """Stop or bad words as a [2, N] word list (tokenized without BOS)."""
        return word_list([self.tokenizer.encode(w, add_special_tokens=False) for w in words if w])
