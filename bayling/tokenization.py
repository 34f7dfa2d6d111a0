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
        """Render and tokenize a validated conversation, dropping the oldest whole turns to fit `budget`."""
        system = messages[:1] if messages[0]["role"] == "system" else []
        turns = messages[len(system):]
        dropped = 0
        while True:
            ids = self.encode_text(self.render(system + turns))
            if budget is None or len(ids) <= budget:
                return EncodedPrompt(ids, dropped)
            if len(turns) <= 1:
                raise InvalidInput("messages", f"the prompt needs {len(ids)} tokens even with only the system text and "
                                               f"the last user turn, but {budget} are available (context length minus max_tokens)")
            turns = turns[2:]  # the oldest user turn and the assistant reply to it
            dropped += 1

    def encode_words(self, words: Sequence[str]) -> np.ndarray:
        """Stop or bad words as a [2, N] word list (tokenized without BOS)."""
        return word_list([self.tokenizer.encode(w, add_special_tokens=False) for w in words if w])
