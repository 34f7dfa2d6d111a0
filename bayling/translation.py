"""Translation prompts of BayLing's original batch script (ictnlp/BayLing scripts/translate.py),
and corpus BLEU for checking translations."""

from __future__ import annotations

import math
import re
from collections import Counter

LANGUAGE_NAMES = {  # how the instruction names the target language, in each instruction language
    "zh": {"zh": "中文", "en": "英文", "de": "德文", "fr": "法文", "ja": "日文", "ru": "俄文"},
    "en": {"zh": "Chinese", "en": "English", "de": "German", "fr": "French", "ja": "Japanese", "ru": "Russian"},
}


def translation_prompt(sentence: str, target_lang: str, instruction_lang: str = "zh") -> str:
    """`target_lang` is a code from LANGUAGE_NAMES or a language name as the user writes it."""
    if instruction_lang not in LANGUAGE_NAMES:
        raise ValueError(f"instruction language must be zh or en, got {instruction_lang!r}")
    name = LANGUAGE_NAMES[instruction_lang].get(target_lang, target_lang)
    if instruction_lang == "zh":
        return f"提供这句话的{name}翻译：{sentence}"
    return f"Provide the {name} translation for this sentence: {sentence}"


def bleu_tokens(text: str) -> list[str]:
    """Characters for CJK, words and punctuation otherwise (as sacrebleu's zh tokenizer does)."""
    return re.findall(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W\d_]+|\d+|[^\w\s]", text.lower())


def corpus_bleu(hypotheses: list[str], references: list[str], max_n: int = 4) -> float:
    """Corpus BLEU-4 (0-100), one reference per segment, brevity penalty as in Papineni et al."""
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = bleu_tokens(hyp), bleu_tokens(ref)
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, max_n + 1):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * brevity * math.exp(log_precision)
