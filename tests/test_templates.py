"""Chat templates render byte-for-byte the prompts of BayLing's original tools (../shared/BAYLING.md)."""

import json
import time

import pytest

from bayling.errors import InvalidInput
from bayling.params import MAX_MESSAGES, MAX_MESSAGES_BYTES
from bayling.templates import builtin_template, parse_messages_json, render_prompt, tokenizer_template, validate_messages

SYSTEM = ("I am an intelligent language assistant developed by the NLP Group of ICT/CAS.\n"
          "Below is a dialog consisting of instructions and responses. Write a response that completes the request.\n")


def conv(*texts, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(texts):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return messages


def bayling(messages):
    return render_prompt(messages, builtin_template("bayling"))


def bayling3(messages):
    return render_prompt(messages, builtin_template("bayling-3"))


def test_bayling_one_turn_english():
    assert bayling(conv("Hello!")) == SYSTEM + "\n### Instruction:\nHello!\n### Response:\n"


def test_bayling_two_turns_matches_the_documented_example():
    expected = (SYSTEM + "\n"
                "### Instruction:\nHello!\n"
                "### Response:\nHi!</s>\n"
                "### Instruction:\nHow are you?\n"
                "### Response:\n")
    assert bayling(conv("Hello!", "Hi!", "How are you?")) == expected


def test_bayling_two_turns_chinese():
    expected = (SYSTEM + "\n"
                "### Instruction:\n你好！\n"
                "### Response:\n你好，有什么可以帮你？</s>\n"
                "### Instruction:\n把“今天天气很好”翻译成英文。\n"
                "### Response:\n")
    assert bayling(conv("你好！", "你好，有什么可以帮你？", "把“今天天气很好”翻译成英文。")) == expected


def test_bayling_five_turns_strips_earlier_replies():
    texts = ["Q1", " A1 \n", "Q2", "A2", "问题三", "回答三", "Q4", "A4", "Q5"]
    expected = SYSTEM + "\n"
    for q, a in zip(texts[0::2], texts[1::2]):
        expected += f"### Instruction:\n{q}\n### Response:\n{a.strip()}</s>\n"
    expected += "### Instruction:\nQ5\n### Response:\n"
    assert bayling(conv(*texts)) == expected


def test_bayling_custom_system_replaces_default_text():
    assert bayling(conv("Hi", system="You translate.")) == "You translate.\n### Instruction:\nHi\n### Response:\n"
    assert bayling(conv("你好", system="你是翻译助手。\n")) == "你是翻译助手。\n\n### Instruction:\n你好\n### Response:\n"


HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"
DEFAULT3 = HEADER.format("system") + "I am BayLing developed by the NLP Group of ICT/CAS.<|eot_id|>"


def test_bayling3_one_turn():
    assert bayling3(conv("Hello!")) == DEFAULT3 + HEADER.format("user") + "Hello!<|eot_id|>" + HEADER.format("assistant")


def test_bayling3_two_turns_chinese_with_custom_system():
    expected = (HEADER.format("system") + "你是百聆。<|eot_id|>"
                + HEADER.format("user") + "你好<|eot_id|>"
                + HEADER.format("assistant") + "你好！<|eot_id|>"
                + HEADER.format("user") + "今天星期几？<|eot_id|>"
                + HEADER.format("assistant"))
    assert bayling3(conv(" 你好 ", "你好！\n", "今天星期几？", system="你是百聆。")) == expected


def test_bayling3_five_turns():
    texts = [f"u{i}" if i % 2 == 0 else f"a{i}" for i in range(9)]
    expected = DEFAULT3
    for i, t in enumerate(texts):
        expected += HEADER.format("user" if i % 2 == 0 else "assistant") + t + "<|eot_id|>"
    assert bayling3(conv(*texts)) == expected + HEADER.format("assistant")


def test_huggingface_apply_chat_template_gives_the_same_prompt(llama_tokenizer):
    """The template is written once: transformers renders it identically."""
    for name in ("bayling", "bayling-3"):
        template = builtin_template(name)
        for messages in (conv("Hello!"), conv("你好", "嗨", "再见", system="S")):
            ours = render_prompt(messages, template)
            theirs = llama_tokenizer.apply_chat_template(messages, chat_template=template.source, tokenize=False,
                                                         add_generation_prompt=True)
            assert theirs == ours


def test_tokenizer_template_renders_the_tokenizers_own(smol_tokenizer):
    template = tokenizer_template(smol_tokenizer.chat_template)
    messages = conv("What is the capital of France?")
    assert render_prompt(messages, template) == smol_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert not template.placeholders


@pytest.mark.parametrize("messages, fragment", [
    ([], "non-empty"),
    ("hello", "non-empty"),
    ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "'assistant' was expected"),
    ([{"role": "user", "content": "   "}], "empty content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "must end with a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system message may only come first"),
    ([{"role": "system", "content": "s"}], "no user turn"),
    ([{"role": "user", "content": 3}], "string content"),
])
def test_bad_conversations_are_refused_naming_messages(messages, fragment):
    with pytest.raises(InvalidInput) as info:
        validate_messages(messages)
    assert info.value.field == "messages"
    assert fragment in str(info.value)


def test_messages_json_errors_name_the_field():
    with pytest.raises(InvalidInput, match="messages: is not valid JSON"):
        parse_messages_json(b"[{")
    with pytest.raises(InvalidInput, match="messages: is not valid UTF-8"):
        parse_messages_json(b'[{"role": "user", "content": "\xff"}]')
    assert parse_messages_json('[{"role": "user", "content": "你好"}]') == [{"role": "user", "content": "你好"}]


def alternating(count: int) -> list[dict]:
    """A valid conversation of `count` messages (count odd: user first and last; even: a system first)."""
    messages = [{"role": "system", "content": "S"}] if count % 2 == 0 else []
    while len(messages) < count:
        messages.append({"role": "user" if (len(messages) - count) % 2 else "assistant", "content": "x"})
    return messages


def test_deeply_nested_json_is_invalid_input_not_a_recursion_error():
    for raw in (b"[" * 10_000 + b"]" * 10_000, "[" * 10_000 + "]" * 10_000,
                b'[{"role": "user", "content": ' + b"[" * 10_000 + b"]" * 10_000 + b"}]"):
        with pytest.raises(InvalidInput, match="^messages: is nested too deeply"):
            parse_messages_json(raw)


def test_a_value_with_a_role_nested_deeply_is_not_recursed_into():
    role: list = []
    for _ in range(100_000):
        role = [role]
    with pytest.raises(InvalidInput, match="^messages: item 0 has unknown role of type list"):
        validate_messages([{"role": role, "content": "x"}])
    with pytest.raises(InvalidInput, match=r"^messages: item 0 has unknown role 'u{40}'\.\.\."):
        validate_messages([{"role": "u" * 10**6, "content": "x"}])


def test_json_numbers_beyond_python_s_limits_are_invalid_input():
    with pytest.raises(InvalidInput, match="^messages: is not valid JSON"):
        parse_messages_json('[{"role": "user", "content": "x", "n": ' + "9" * 5000 + "}]")


def test_lone_surrogates_are_refused_naming_messages():
    with pytest.raises(InvalidInput, match="^messages: item 0 \\(user\\) has a lone surrogate"):
        parse_messages_json(b'[{"role": "user", "content": "ab\\ud800"}]')


def test_message_count_is_limited():
    assert len(validate_messages(alternating(MAX_MESSAGES))) == MAX_MESSAGES
    with pytest.raises(InvalidInput, match=f"^messages: has {MAX_MESSAGES + 1} items; at most {MAX_MESSAGES}"):
        validate_messages(alternating(MAX_MESSAGES + 1))


def test_oversized_messages_json_is_refused_before_it_is_decoded(monkeypatch):
    raw = json.dumps([{"role": "user", "content": "x" * (20 * 2**20)}]).encode()   # the fault battery's 20 MiB
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("decoded a body over the limit"))
    start = time.process_time()
    with pytest.raises(InvalidInput, match=f"^messages: is {len(raw)} bytes of JSON; at most {MAX_MESSAGES_BYTES}"):
        parse_messages_json(raw)
    assert time.process_time() - start < 0.5


def test_content_size_is_limited_in_utf8_bytes():
    messages = [{"role": "user", "content": "x" * (MAX_MESSAGES_BYTES - 3)}, {"role": "assistant", "content": "你"},
                {"role": "user", "content": "?"}]
    with pytest.raises(InvalidInput, match=f"^messages: has more than {MAX_MESSAGES_BYTES} bytes of content"):
        validate_messages(messages)    # one byte too many: 你 is 3 bytes of UTF-8
    messages[1]["content"] = "y"
    assert len(validate_messages(messages)) == 3
