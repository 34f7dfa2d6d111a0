"""Streaming detokenization: pieces joined equal the full decode; no U+FFFD that the full text lacks."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bayling.detokenizer import IncrementalDetokenizer, byte_runs, make_decode

ALPHABET = "abcdefgh ABC,.!?'\n  你好世界百聆翻译龘鱻𠀋🚀éß—“”。，"
texts = st.text(alphabet=ALPHABET, min_size=0, max_size=60)
chunkings = st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=80)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def stream(tokenizer, ids, sizes):
    detok = IncrementalDetokenizer(make_decode(tokenizer), byte_runs(tokenizer))
    pieces, i, k = [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)]
        pieces.append(detok.add(ids[i:i + n]))
        i, k = i + n, k + 1
    pieces.append(detok.flush())
    return pieces


def check(tokenizer, ids, sizes):
    full = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    pieces = stream(tokenizer, ids, sizes)
    assert "".join(pieces) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in p for p in pieces)


@SETTINGS
@given(texts, chunkings)
def test_sentencepiece_byte_fallback_round_trip(llama_tokenizer, text, sizes):
    check(llama_tokenizer, llama_tokenizer.encode(text, add_special_tokens=False), sizes)


@SETTINGS
@given(texts, chunkings)
def test_byte_level_bpe_round_trip(smol_tokenizer, text, sizes):
    check(smol_tokenizer, smol_tokenizer.encode(text, add_special_tokens=False), sizes)


@SETTINGS
@given(st.lists(st.integers(min_value=0, max_value=599), max_size=60), chunkings)
def test_random_ids_including_broken_bytes(llama_tokenizer, ids, sizes):
    """Any id sequence, even invalid UTF-8 byte runs: joined pieces equal the full decode."""
    check(llama_tokenizer, ids, sizes)


def test_token_by_token_chinese_never_shows_half_a_character(llama_tokenizer):
    text = "龘鱻𠀋，你好世界！"  # mostly byte-fallback tokens
    ids = llama_tokenizer.encode(text, add_special_tokens=False)
    assert any(t.startswith("<0x") for t in llama_tokenizer.convert_ids_to_tokens(ids))
    pieces = stream(llama_tokenizer, ids, [1])
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # a run of byte tokens is released when it ends (here at "，"), never half of it
    assert [p for p in pieces if p][0] == "龘鱻𠀋，"
    assert len(byte_runs(llama_tokenizer).byte_ids) == 256


def test_spaces_between_english_words_survive_streaming(llama_tokenizer, smol_tokenizer):
    for tok in (llama_tokenizer, smol_tokenizer):
        text = "The quick brown fox jumps over the lazy dog."
        pieces = stream(tok, tok.encode(text, add_special_tokens=False), [1])
        assert "".join(pieces) == text
        assert " quick" in pieces or any(p.startswith(" ") for p in pieces[1:])


def test_window_stays_bounded(llama_tokenizer):
    ids = llama_tokenizer.encode("hello world 你好 " * 200, add_special_tokens=False)
    detok = IncrementalDetokenizer(make_decode(llama_tokenizer), byte_runs(llama_tokenizer))
    widest = 0
    for t in ids:
        detok.add([t])
        widest = max(widest, len(detok._window))
    assert widest <= 8
