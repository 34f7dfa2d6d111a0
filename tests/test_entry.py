"""The `bayling` entry model's logic, driven by a stand-in for the engine model (the real pair
runs in tests/test_e2e_serving.py)."""

import json
import threading
import time

import numpy as np
import pytest

from bayling.contract import request_arrays
from bayling.errors import InvalidInput
from bayling.model_repository.engine_text import load_engine_text
from bayling.model_repository.entry import Answer, Entry
from bayling.model_repository.relay import Relay


@pytest.fixture(scope="module")
def entry(scripted_engine):
    return Entry(load_engine_text(scripted_engine))


def inputs(**values):
    return request_arrays("bayling", values)


@pytest.fixture(scope="module")
def relay():
    r = Relay(poll_s=0.005)
    yield r
    r.stop()


def drive(entry, request, ids, relay, cancel_after=None, token_s=0.0):
    """Run one request through the real Answer and Relay; `cancel_after` pieces, the client leaves."""
    sent, stops, done = [], [], threading.Event()

    def send(outputs, final):
        sent.append((outputs, final))
        if final:
            done.set()

    def responses():  # as an engine: it ends (with what it made) once told to stop
        for t in ids:
            if stops:
                return
            time.sleep(token_s)
            yield {"output_ids": np.array([[[t]]], np.int32), "sequence_length": np.array([[1]], np.int32)}

    answer = Answer(entry, request, relay, send, lambda: cancel_after is not None and len(sent) >= cancel_after,
                    on_cancel=lambda: stops.append("relay"))
    reason = entry.generate(request, responses(), lambda: stops.append(1), answer)
    assert done.wait(10)
    return reason, sent, stops


def text_of(sent):
    return "".join(o["text_output"][0, 0].decode() for o, _ in sent if o is not None)


def test_placeholders_and_stop_strings_in_one_pass(entry, llama_tokenizer, relay):
    ids = llama_tokenizer.encode("I am [NAME]. ### Instruction: more", add_special_tokens=False)
    request = entry.parse(inputs(messages=json.dumps([{"role": "user", "content": "hi"}]), stream=True,
                                 stop_words=["###"], max_tokens=50))
    reason, sent, stops = drive(entry, request, ids, relay)
    assert text_of(sent) == "I am BayLing. "
    assert reason == "stop" and stops == [1]  # the engine is told to stop
    final = sent[-1][0]
    assert sent[-1][1] and final["finish_reason"][0, 0] == b"stop"


def test_not_streaming_answers_once(entry, llama_tokenizer, relay):
    ids = llama_tokenizer.encode("你好，世界", add_special_tokens=False)
    request = entry.parse(inputs(text_input="x", max_tokens=len(ids)))
    reason, sent, _ = drive(entry, request, ids, relay)
    assert len(sent) == 1 and sent[0][1] and text_of(sent) == "你好，世界" and reason == "length"


def test_cancelled_request_stops_the_engine_and_just_closes(entry, llama_tokenizer, relay):
    ids = llama_tokenizer.encode("one two three four five six seven eight nine ten", add_special_tokens=False)
    request = entry.parse(inputs(text_input="x", stream=True, max_tokens=50))
    reason, sent, stops = drive(entry, request, ids, relay, cancel_after=2, token_s=0.02)
    assert reason == "cancelled" and 1 in stops   # the request thread stops the engine (so may the relay)
    assert sent[-1] == (None, True) and len(sent) < len(ids)


def test_request_errors_name_the_field(entry):
    with pytest.raises(InvalidInput, match="^messages: give either"):
        entry.parse(inputs(text_input="a", messages="[]"))
    with pytest.raises(InvalidInput, match="^messages: a request needs"):
        entry.parse(inputs(max_tokens=3))
    with pytest.raises(InvalidInput, match="^text_input: the prompt is"):
        entry.parse(inputs(text_input="hello " * 300, max_tokens=16))
    with pytest.raises(InvalidInput, match="^return_log_probs:"):
        entry.parse(inputs(text_input="a", return_log_probs=True))


def test_engine_inputs_follow_the_contract(entry):
    request = entry.parse(inputs(text_input="hello", max_tokens=7, temperature=0.0, stop_words=["world"],
                                 random_seed=3))
    engine = entry.engine_inputs(request)
    assert engine["runtime_top_k"][0, 0] == 1  # greedy, as TensorRT-LLM reads it
    assert engine["request_output_len"][0, 0] == 7 and engine["input_ids"].shape == (1, len(request.prompt_ids))
    assert engine["stop_words_list"].shape[:2] == (1, 2)
    # TensorRT-LLM 1.x's name (the pinned GPU backend reads only it; the CPU engine reads either)
    assert engine["seed"].dtype == np.uint64 and "random_seed" not in engine


def test_openai_options_become_nvidia_s_engine_tensors(entry):
    request = entry.parse(inputs(text_input="a", presence_penalty=0.5, frequency_penalty=-1.0, logprobs=True,
                                 top_logprobs=3, logit_bias=json.dumps({"5": 10, "7": -100})))
    engine = entry.engine_inputs(request)
    assert engine["presence_penalty"][0, 0] == 0.5 and engine["frequency_penalty"][0, 0] == -1.0
    assert engine["return_log_probs"][0, 0] and engine["return_generation_logits"][0, 0]
    bias = engine["embedding_bias"]
    assert bias.shape == (1, entry.text.manifest.vocab_size) and bias.dtype == np.float32
    assert (bias[0, 5], bias[0, 7], np.count_nonzero(bias)) == (10, -100, 2)
    assert entry.engine_output_names(request) == ["output_ids", "sequence_length", "output_log_probs",
                                                  "generation_logits"]
    plain = entry.engine_inputs(entry.parse(inputs(text_input="a")))
    assert not {"return_log_probs", "return_generation_logits", "embedding_bias", "presence_penalty"} & set(plain)


@pytest.mark.parametrize("values, message", [
    ({"top_logprobs": 2}, "^top_logprobs: can only be used when `logprobs` is True"),
    ({"logprobs": True, "top_logprobs": 21}, "^top_logprobs: must be between 0 and 20"),
    ({"logit_bias": "{\"x\": 1}"}, "^logit_bias: keys must be token ids"),
    ({"logit_bias": "{\"1\": 101}"}, "^logit_bias: biases must be numbers between -100 and 100"),
    ({"logit_bias": "{\"999999\": 1}"}, "^logit_bias: has token ids outside the vocabulary"),
    ({"logit_bias": "[1"}, "^logit_bias: must be a JSON object"),
    ({"presence_penalty": 2.5}, "^presence_penalty: must be between -2 and 2"),
])
def test_openai_options_out_of_range_name_the_field(entry, values, message):
    with pytest.raises(InvalidInput, match=message):
        entry.parse(inputs(text_input="a", **values))


def test_token_logprobs_cover_the_text_of_each_response(entry, llama_tokenizer, relay):
    ids = llama_tokenizer.encode("I am here. ### more words", add_special_tokens=False)
    vocab = entry.text.manifest.vocab_size
    request = entry.parse(inputs(text_input="x", stream=True, max_tokens=50, stop_words=["###"], logprobs=True,
                                 top_logprobs=2))
    sent, done = [], threading.Event()

    def responses():
        for i, t in enumerate(ids):
            logits = np.zeros((1, 1, 1, vocab), np.float32)
            logits[0, 0, 0, t] = 5.0
            yield {"output_ids": np.array([[[t]]], np.int32), "sequence_length": np.array([[1]], np.int32),
                   "output_log_probs": np.array([[[-0.1 * i]]], np.float32), "generation_logits": logits}

    answer = Answer(entry, request, relay, lambda o, final: (sent.append(o), final and done.set()))
    assert entry.generate(request, responses(), lambda: None, answer) == "stop"
    assert done.wait(10)
    tokens = [e for o in sent for e in json.loads(o["token_logprobs"][0, 0])]
    completion = sent[-1]["completion_tokens"][0, 0]
    assert len(tokens) == completion and [e["logprob"] for e in tokens] == pytest.approx([-0.1 * i for i in range(completion)])
    assert "".join(e["token"] for e in tokens).lstrip().startswith("I am here.")   # SentencePiece: "▁I" is " I"
    assert all(bytes(e["bytes"]).decode() == e["token"] for e in tokens)
    assert all(len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["token"] == e["token"] for e in tokens)


def test_end_and_pad_ids_are_the_model_s_unless_given(entry):
    m = entry.text.manifest
    default = entry.engine_inputs(entry.parse(inputs(text_input="hello", max_tokens=7)))
    assert (default["end_id"][0, 0], default["pad_id"][0, 0]) == (m.eos_id, m.pad_id)
    given = entry.engine_inputs(entry.parse(inputs(text_input="hello", max_tokens=7, end_id=5, pad_id=6)))
    assert (given["end_id"][0, 0], given["pad_id"][0, 0]) == (5, 6)
    for name in ("end_id", "pad_id"):
        with pytest.raises(InvalidInput, match=f"^{name}: must be below the vocabulary size {m.vocab_size}"):
            entry.parse(inputs(text_input="a", **{name: m.vocab_size}))


def test_end_id_minus_one_runs_past_the_end_token_to_max_tokens(entry, llama_tokenizer, relay):
    eos = entry.text.manifest.eos_id
    ids = llama_tokenizer.encode("one two", add_special_tokens=False)
    ids = ids + [eos] + ids
    normal = entry.parse(inputs(text_input="x", max_tokens=len(ids)))
    reason, sent, _ = drive(entry, normal, ids, relay)
    assert reason == "stop" and text_of(sent) == "one two"
    no_end = entry.parse(inputs(text_input="x", max_tokens=len(ids), end_id=-1))
    assert no_end.params.end_id == -1 and entry.engine_inputs(no_end)["end_id"][0, 0] == -1
    assert "stop_words_list" not in entry.engine_inputs(no_end)  # nor the template's stop tokens
    reason, sent, _ = drive(entry, no_end, ids, relay)
    assert reason == "length" and text_of(sent).startswith("one two") and len(text_of(sent)) > len("one two")
