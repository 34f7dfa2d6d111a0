"""The output path: placeholders and stop strings, streamed or not, equal the original tools'
full-text processing (decode, replace the model-card placeholders, cut at the stop string)."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bayling.detokenizer import byte_runs, make_decode
from bayling.textstream import MODEL_CARD, PLACEHOLDERS, ReplaceChain, StopStringFinder, TextStream

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PIECES = ["[NAME]", "[名字]", "[机构]", "[INSTITUTE]", "[CREATE_TIME]", "[开发时间]", "\\n", "[NA", "[名", "\\", "[",
          "###", "##", "#", "NAME]", "名字]", "hello", "你好", "龘", " ", "\n", "STOP", "ST", "!", "[[", "\\\\n"]
fragments = st.lists(st.sampled_from(PIECES), max_size=25).map("".join)
chunkings = st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=50)


def chunks(text, sizes):
    out, i, k = [], 0, 0
    while i < len(text):
        out.append(text[i:i + sizes[k % len(sizes)]])
        i, k = i + sizes[k % len(sizes)], k + 1
    return out


def original_post_process(text: str) -> str:
    """ictnlp/BayLing inference.py post_process: sequential str.replace, then backslash-n."""
    for k, v in MODEL_CARD.items():
        text = text.replace(k, v)
    return text.replace("\\n", "\n")


@settings(max_examples=300, deadline=None)
@given(fragments, chunkings)
def test_streaming_placeholders_equal_the_original_replacement(text, sizes):
    chain = ReplaceChain(PLACEHOLDERS)
    out = [chain.feed(c) for c in chunks(text, sizes)] + [chain.flush()]
    assert "".join(out) == original_post_process(text) == chain.replace_all(text)
    for key in MODEL_CARD:
        assert all(key not in piece for piece in out)


@settings(max_examples=300, deadline=None)
@given(fragments, chunkings, st.lists(st.sampled_from(["###", "STOP", "\n\n", "[NAME]"]), max_size=3))
def test_stop_strings_cut_at_the_first_and_never_show_a_part(text, sizes, stops):
    finder = StopStringFinder(stops)
    out = []
    for c in chunks(text, sizes):
        out.append(finder.feed(c))
        if finder.stopped:
            break
    if not finder.stopped:
        out.append(finder.flush())
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert "".join(out) == (text[:min(hits)] if hits else text)
    assert finder.stopped == bool(hits)


def test_partial_placeholder_is_held_until_decided():
    r = ReplaceChain(PLACEHOLDERS)
    assert r.feed("I am [NA") == "I am "
    assert r.feed("ME], from [机") == "BayLing, from "
    assert r.feed("构].") == "中国科学院计算技术研究所自然语言处理研究组."
    assert r.feed("[NOTE]") == "[NOTE]"
    assert r.feed("a\\") == "a" and r.feed("nb") == "\nb"


def reference(tokenizer, ids, *, stop_ids=(), stops=(), placeholders=True):
    for i, t in enumerate(ids):
        if t in stop_ids:
            ids = ids[:i]
            break
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if placeholders:
        text = original_post_process(text)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(hits)] if hits else text


def run_stream(tokenizer, ids, sizes, **kw):
    stream = TextStream(make_decode(tokenizer), byte_runs=byte_runs(tokenizer), **kw)
    pieces, i, k = [], 0, 0
    while i < len(ids) and not stream.finished:
        n = sizes[k % len(sizes)]
        pieces.append(stream.add_tokens(ids[i:i + n]))
        i, k = i + n, k + 1
    pieces.append(stream.finish("length"))
    return pieces, stream


@SETTINGS
@given(fragments, chunkings)
def test_text_stream_equals_the_original_tools(llama_tokenizer, text, sizes):
    ids = llama_tokenizer.encode(text, add_special_tokens=False)
    pieces, stream = run_stream(llama_tokenizer, ids, sizes, stop_strings=["###"], placeholders=True, stop_token_ids=[2])
    assert "".join(pieces) == reference(llama_tokenizer, ids, stops=["###"])
    full = llama_tokenizer.decode(ids, skip_special_tokens=True)
    if "\ufffd" not in full:
        assert not any("\ufffd" in p for p in pieces)
    assert stream.finish_reason == ("stop" if "###" in original_post_process(full) else "length")


@SETTINGS
@given(fragments, chunkings)
def test_text_stream_byte_level_bpe(smol_tokenizer, text, sizes):
    ids = smol_tokenizer.encode(text, add_special_tokens=False)
    pieces, _ = run_stream(smol_tokenizer, ids, sizes, stop_strings=["STOP"])
    assert "".join(pieces) == reference(smol_tokenizer, ids, stops=["STOP"], placeholders=False)


def test_stop_token_ends_generation_and_is_not_counted(llama_tokenizer):
    ids = llama_tokenizer.encode("你好 world", add_special_tokens=False)
    pieces, stream = run_stream(llama_tokenizer, ids + [2] + ids, [1], stop_token_ids=[2])
    assert "".join(pieces) == "你好 world"
    assert stream.finish_reason == "stop" and stream.completion_tokens == len(ids)


def test_a_stop_string_completed_by_the_final_flush_still_stops(llama_tokenizer):
    ids = llama_tokenizer.encode("###!", add_special_tokens=False)  # "!" is a byte token: held to the end
    pieces, stream = run_stream(llama_tokenizer, ids, [1], stop_strings=["###"])
    assert "".join(pieces) == "" and stream.finish_reason == "stop"


@SETTINGS
@given(fragments, chunkings)
def test_text_reason_and_token_count_do_not_depend_on_how_ids_are_grouped(llama_tokenizer, text, sizes):
    """The relay merges tokens into bigger responses under load: the answer must not change."""
    ids = llama_tokenizer.encode(text, add_special_tokens=False) + [2]
    options = dict(stop_strings=["###", "STOP"], placeholders=True, stop_token_ids=[2])
    one_by_one, single = run_stream(llama_tokenizer, ids, [1], **options)
    grouped, merged = run_stream(llama_tokenizer, ids, sizes, **options)
    assert "".join(grouped) == "".join(one_by_one)
    assert (merged.finish_reason, merged.completion_tokens) == (single.finish_reason, single.completion_tokens)
