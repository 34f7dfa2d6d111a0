"""Prompt tokenization: BOS once, `</s>` as the EOS id, word lists, whole-turn truncation."""

import numpy as np
import pytest

from bayling.errors import InvalidInput
from bayling.templates import builtin_template, tokenizer_template
from bayling.tokenization import PromptEncoder, parse_word_list, word_list


def two_turns():
    return [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "How are you?"}]


def test_bos_once_and_eos_between_turns(llama_tokenizer):
    encoder = PromptEncoder(llama_tokenizer, builtin_template("bayling"))
    ids = encoder.encode_messages(two_turns()).ids
    assert ids[0] == 1 and ids.count(1) == 1
    assert ids.count(2) == 1  # the one `</s>` closing the assistant turn
    tokens = llama_tokenizer.convert_ids_to_tokens(ids)
    assert "</s>" in tokens
    text = "".join(tokens)
    assert "</" not in text.replace("</s>", "")  # never spelled out as characters


def test_a_template_that_writes_bos_itself_is_not_doubled(llama_tokenizer):
    template = tokenizer_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    ids = PromptEncoder(llama_tokenizer, template).encode_messages([{"role": "user", "content": "hi"}]).ids
    assert ids.count(1) == 1 and ids[0] == 1


def test_tokenizer_without_bos_gets_none(smol_tokenizer):
    encoder = PromptEncoder(smol_tokenizer, tokenizer_template(smol_tokenizer.chat_template))
    ids = encoder.encode_messages([{"role": "user", "content": "hi"}]).ids
    assert not encoder.adds_bos
    assert ids == smol_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True,
                                                     add_generation_prompt=True)["input_ids"]


def test_word_list_layout_matches_tensorrt_llm():
    array = word_list([[5, 6], [7], [8, 9, 10]])
    assert array.dtype == np.int32 and array.shape == (2, 6)
    assert array[0].tolist() == [5, 6, 7, 8, 9, 10]
    assert array[1].tolist() == [2, 3, 6, -1, -1, -1]
    assert parse_word_list(array) == [[5, 6], [7], [8, 9, 10]]
    assert word_list([]).shape == (2, 0)


def test_truncation_drops_oldest_whole_turns(llama_tokenizer):
    encoder = PromptEncoder(llama_tokenizer, builtin_template("bayling"))
    messages = [{"role": "system", "content": "SYSTEM TEXT"}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
    messages.append({"role": "user", "content": "last question"})
    full = encoder.encode_messages(messages)
    assert full.dropped_turns == 0
    budget = len(full.ids) - 10
    cut = encoder.encode_messages(messages, budget)
    assert len(cut.ids) <= budget and cut.dropped_turns >= 1
    text = llama_tokenizer.decode(cut.ids)
    assert "SYSTEM TEXT" in text and "last question" in text
    assert "question 0" not in text and "answer 0" not in text
    # kept turns are whole: every kept question has its answer
    for i in range(cut.dropped_turns, 6):
        assert f"question {i}" in text and f"answer {i}" in text


def test_truncation_refuses_when_system_and_last_turn_do_not_fit(llama_tokenizer):
    encoder = PromptEncoder(llama_tokenizer, builtin_template("bayling"))
    with pytest.raises(InvalidInput) as info:
        encoder.encode_messages([{"role": "user", "content": "long " * 50}], budget=20)
    assert info.value.field == "messages"
