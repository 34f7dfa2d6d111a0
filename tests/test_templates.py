"""Chat templates render byte-for-byte the prompts of BayLing's original tools (../shared/BAYLING.md)."""

import pytest

from bayling.errors import InvalidInput
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
