"""BayLing's translation prompts and the BLEU used by the quality check."""

import pytest

from bayling.translation import bleu_tokens, corpus_bleu, translation_prompt


def test_prompts_are_the_original_script_s():
    assert translation_prompt("Hello.", "zh", "zh") == "提供这句话的中文翻译：Hello."
    assert translation_prompt("你好。", "en", "en") == "Provide the English translation for this sentence: 你好。"
    assert translation_prompt("你好。", "Spanish", "en") == "Provide the Spanish translation for this sentence: 你好。"
    with pytest.raises(ValueError):
        translation_prompt("x", "en", "de")


def test_bleu():
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    assert corpus_bleu(["今天天气很好"], ["今天天气很好"]) == pytest.approx(100)
    assert bleu_tokens("今天 weather, 3 cats!") == ["今", "天", "weather", ",", "3", "cats", "!"]
    partial = corpus_bleu(["the cat sat on a mat today"], ["the cat sat on the mat"])
    assert 0 < partial < 100
    assert corpus_bleu(["completely different words here"], ["the cat sat on the mat"]) == 0.0
