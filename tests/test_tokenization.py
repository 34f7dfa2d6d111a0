"""Prompt tokenization: BOS once, `</s>` as the EOS id, word lists, whole-turn truncation."""

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def drop_oldest_until_it_fits(encoder: PromptEncoder, messages: list[dict], budget: int) -> tuple[list[int], int]:
    """The reference: the original algorithm, one oldest user+assistant pair dropped per full
    render and encode; returns (ids, dropped), or raises InvalidInput with the shortest prompt's size."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(head):]
    for dropped in range(len(rest) // 2 + 1):
        ids = encoder.encode_text(encoder.render(head + rest[2 * dropped:]))
        if len(ids) <= budget:
            return ids, dropped
    raise InvalidInput("messages", f"the prompt needs {len(ids)} tokens")


# Pieces that the template writes too, so that BPE merges across message boundaries vary.
PIECES = ["a", "b", " ", "\n", "你好", "。", "#", "###", "</s>", "<s>", "Instruction", "Response", ":", "1", "aaaa"]
contents = st.lists(st.sampled_from(PIECES), max_size=10).map(lambda pieces: "x" + "".join(pieces))
NUMBERED = "{% for m in messages %}{{ loop.index }}{{ m['role'][0] }}:{{ m['content'] }}{% endfor %}"


@settings(max_examples=300, deadline=None)
@given(template=st.sampled_from(["bayling", "bayling-3", "numbered"]), system=st.none() | contents,
       texts=st.integers(0, 15).flatmap(lambda pairs: st.lists(contents, min_size=2 * pairs + 1,
                                                               max_size=2 * pairs + 1)),
       share=st.floats(0.0, 1.2))
def test_truncation_equals_dropping_one_turn_at_a_time(llama_tokenizer, template, system, texts, share):
    chat_template = tokenizer_template(NUMBERED) if template == "numbered" else builtin_template(template)
    encoder = PromptEncoder(llama_tokenizer, chat_template)
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]
    budget = max(1, round(len(encoder.encode_messages(messages).ids) * share))
    try:
        expected = drop_oldest_until_it_fits(encoder, messages, budget)
    except InvalidInput as refusal:
        with pytest.raises(InvalidInput) as info:
            encoder.encode_messages(messages, budget)
        assert str(info.value).startswith(str(refusal))
        return
    encoded = encoder.encode_messages(messages, budget)
    assert (encoded.ids, encoded.dropped_turns) == expected


class CpuBoundTokenizer:
    """A tokenizer that fails the test once the process has spent `seconds` of CPU since it was made,
    so that a slow algorithm fails within the bound instead of after minutes."""

    def __init__(self, tokenizer, seconds: float):
        self._tokenizer, self._deadline = tokenizer, time.process_time() + seconds

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        assert time.process_time() < self._deadline, "truncation ran past its CPU-time bound"
        return self._tokenizer(*args, **kwargs)


@pytest.mark.parametrize("share", [0.02, 0.7], ids=["keeps-few", "keeps-most"])
def test_ten_thousand_messages_are_truncated_within_a_cpu_time_bound(llama_tokenizer, share):
    """The original algorithm re-encoded the conversation per dropped turn: ~9 minutes for this one."""
    messages = [{"role": "system", "content": "SYSTEM TEXT"}]
    for i in range(4999):
        messages += [{"role": "user", "content": f"question {i} about the weather"},
                     {"role": "assistant", "content": f"answer {i}: sunny"}]
    messages.append({"role": "user", "content": "last question"})
    assert len(messages) == 10_000
    plain = PromptEncoder(llama_tokenizer, builtin_template("bayling"))
    budget = round(len(plain.encode_messages(messages).ids) * share)
    bound = 5.0   # seconds of CPU; this takes well under one
    start = time.process_time()
    encoded = PromptEncoder(CpuBoundTokenizer(llama_tokenizer, bound), builtin_template("bayling")).encode_messages(
        messages, budget)
    assert time.process_time() - start < bound
    # exactly the cut of dropping one turn at a time: this fits, one turn more does not
    kept = messages[:1] + messages[1 + 2 * encoded.dropped_turns:]
    assert encoded.ids == plain.encode_text(plain.render(kept)) and len(encoded.ids) <= budget
    one_more = messages[:1] + messages[1 + 2 * (encoded.dropped_turns - 1):]
    assert len(plain.encode_text(plain.render(one_more))) > budget
