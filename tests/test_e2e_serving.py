"""End to end: a real tritonserver serving real INT8 engines, over gRPC and HTTP.

`default_server` serves the embedded SmolLM2 model (or the server given with --grpc-url/--http-url);
`scripted_server` serves a tiny BayLing-templated LLaMA built by the tests whose greedy answer
is known exactly (tests/models.py), with placeholders and byte-fallback Chinese in it.
"""

import json
import threading
import time

import pytest

from bayling.client.library import stream_error
from tests.conftest import SCRIPT_SHOWN
from tests.triton_helpers import chat, final_value, grpc_stream, http_generate, metric

pytestmark = pytest.mark.e2e
GREEDY = {"temperature": 0.0}


def test_chat_answer_over_grpc(default_server):
    result = grpc_stream(default_server.grpc, chat("Name the capital of France.", max_tokens=32, **GREEDY))
    assert result.error is None
    assert "Paris" in result.text
    assert final_value(result, "finish_reason") == "stop"
    assert final_value(result, "prompt_tokens") > 5 and 0 < final_value(result, "completion_tokens") <= 32


def test_chat_answer_over_http(default_server):
    status, body = http_generate(default_server.http, chat("Name the capital of France.", max_tokens=32, **GREEDY))
    assert status == 200, body
    assert "Paris" in body["text_output"] and body["finish_reason"] == "stop"


def test_streamed_pieces_join_to_the_non_streamed_text_for_the_same_seed(default_server):
    request = chat("Write two sentences about the sea.", max_tokens=48, temperature=0.8, top_p=0.95, random_seed=7)
    streamed = grpc_stream(default_server.grpc, {**request, "stream": True})
    whole = grpc_stream(default_server.grpc, {**request, "stream": False})
    assert streamed.error is None and whole.error is None
    assert len(streamed.pieces) > 3 and len(whole.pieces) == 1
    assert streamed.text == whole.text
    status, events = http_generate(default_server.http, {**request, "stream": True}, stream=True)
    assert status == 200 and "".join(e["text_output"] for e in events) == whole.text


def test_chinese_streamed_token_by_token_equals_the_non_streamed_answer(default_server):
    request = chat("请用中文介绍一下北京，两句话。", max_tokens=60, **GREEDY)
    streamed = grpc_stream(default_server.grpc, {**request, "stream": True})
    whole = grpc_stream(default_server.grpc, request)
    assert streamed.text == whole.text
    assert any("\u4e00" <= ch <= "\u9fff" for ch in whole.text)
    # no piece splits a character; only an answer cut by max_tokens inside one ends with U+FFFD, as whole does
    assert not any("\ufffd" in piece for piece in streamed.pieces[:-1])


@pytest.mark.cpu_engine
def test_greedy_output_equals_llama_cpp_in_process(default_server):
    from transformers import AutoTokenizer

    from tests.engine_reference import greedy_reference

    result = grpc_stream(default_server.grpc, chat("Name three colors.", max_tokens=40, return_prompt_ids=True, **GREEDY))
    prompt_ids = result.final["prompt_ids"].reshape(-1).tolist()
    engine = default_server.engine
    tokenizer = AutoTokenizer.from_pretrained(str(engine / "tokenizer"))
    expected, _ = greedy_reference(engine, prompt_ids, 40, end_id=tokenizer.eos_token_id)
    assert result.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert final_value(result, "completion_tokens") == len(expected)


def test_max_tokens_is_honoured(default_server):
    result = grpc_stream(default_server.grpc, chat("Tell me a long story about a dragon.", max_tokens=5, **GREEDY))
    assert final_value(result, "completion_tokens") == 5
    assert final_value(result, "finish_reason") == "length"


def test_stop_strings_are_honoured_and_never_shown(default_server):
    request = chat("Name the capital of France.", max_tokens=32, stop_words=["Paris"], stream=True, **GREEDY)
    result = grpc_stream(default_server.grpc, request)
    assert result.text == "The capital of France is "
    assert final_value(result, "finish_reason") == "stop"
    assert not any("P" in piece for piece in result.pieces)


@pytest.mark.cpu_engine
def test_cancelling_a_stream_stops_generation_on_the_server(default_server):
    name = "bayling_engine_generated_tokens_total"
    before = metric(default_server.metrics, name)
    request = chat("Tell me a very long story.", max_tokens=1500, min_length=1500, stream=True, **GREEDY)
    result = grpc_stream(default_server.grpc, request, read_pieces=5)
    assert len(result.pieces) >= 5 and not result.final
    time.sleep(2)  # the engine notices within a few tokens
    settled = metric(default_server.metrics, name)
    time.sleep(2)
    # (the supervisor's generation probe may add its one token meanwhile; the story would add about 100)
    assert metric(default_server.metrics, name) - settled <= 1, "the engine kept generating after the client left"
    assert settled - before < 200  # far from the 1500 tokens asked for
    assert metric(default_server.metrics, 'bayling_requests_total{finish_reason="cancelled"}') >= 1


def test_sixteen_concurrent_streams_all_finish_correctly(default_server):
    results = {}

    def run(i):
        n = 6 + i  # each stream asks for its own length: answers cannot be mixed up unnoticed
        results[i] = (n, grpc_stream(default_server.grpc, chat(f"Count slowly from {i} upwards.", max_tokens=n,
                                                                min_length=n, stream=True, **GREEDY)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 16
    for n, result in results.values():
        assert result.error is None
        assert final_value(result, "completion_tokens") == n
        assert final_value(result, "finish_reason") == "length"
        assert result.text.strip()


def test_ensemble_keeps_nvidia_s_interface(default_server):
    status, body = http_generate(default_server.http, {"text_input": "The capital of France is", "max_tokens": 8,
                                                       "top_k": 1}, model="ensemble")
    assert status == 200, body
    assert "Paris" in body["text_output"]
    result = grpc_stream(default_server.grpc, {"text_input": "The capital of France is", "max_tokens": 8, "top_k": 1,
                                               "stream": True}, model="ensemble")
    assert result.error is None and len(result.pieces) >= 2


BAD_INPUTS = [
    ({"messages": "[]"}, "messages"),
    ({"messages": json.dumps([{"role": "wizard", "content": "hi"}])}, "messages"),
    ({"messages": '[{"role": "user", "content": "hi"'}, "messages"),
    (chat("hi", max_tokens=-3), "max_tokens"),
    (chat("hi", max_tokens=10**8), "max_tokens"),
    (chat("hi", temperature=-0.5), "temperature"),
    (chat("hi", top_p=0.0), "top_p"),
    (chat("hi", top_p=1.5), "top_p"),
    (chat("hi " * 9000, max_tokens=16), "messages"),
    (chat("hi", top_k=10**6, temperature=1.0), "top_k"),        # above the vocabulary: CTranslate2 failed INTERNAL
]


@pytest.mark.parametrize("values, field", BAD_INPUTS + [
    ({"messages": b'[{"role": "user", "content": "\xff\xfe"}]'}, "messages"),
    ({"text_input": b"caf\xe9"}, "text_input"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_is_invalid_argument_over_grpc_and_the_server_keeps_serving(default_server, values, field):
    result = grpc_stream(default_server.grpc, values)
    assert result.error is not None, "a bad request was accepted"
    assert stream_error(result.error.status(), result.error.message()).status == "INVALID_ARGUMENT"
    assert result.error.message().startswith(f"{field}:"), result.error.message()
    ok = grpc_stream(default_server.grpc, chat("Say hi.", max_tokens=4, **GREEDY))
    assert ok.error is None and ok.text


@pytest.mark.parametrize("values, field", BAD_INPUTS)
def test_bad_input_is_http_400_naming_the_field(default_server, values, field):
    status, body = http_generate(default_server.http, values)
    assert status == 400
    assert body["error"].startswith(f"{field}:"), body


def test_scripted_model_shows_placeholders_replaced_and_chinese_whole(scripted_server):
    request = chat("你好", max_tokens=40, stream=True, **GREEDY)
    streamed = grpc_stream(scripted_server.grpc, request)
    whole = grpc_stream(scripted_server.grpc, {**request, "stream": False})
    assert whole.text == SCRIPT_SHOWN
    assert streamed.text == SCRIPT_SHOWN
    assert final_value(whole, "finish_reason") == "stop"
    assert not any("[" in p or "\ufffd" in p for p in streamed.pieces)  # no partial placeholder, no half character


def test_end_id_minus_one_generates_max_tokens_past_the_end_token(scripted_server):
    """TensorRT-LLM's "no end id" (what benchmarks use for fixed-length answers) on the CPU engine."""
    request = chat("你好", max_tokens=40, **GREEDY)
    normal = grpc_stream(scripted_server.grpc, request)
    no_end = grpc_stream(scripted_server.grpc, {**request, "end_id": -1})
    assert no_end.error is None and normal.error is None
    assert final_value(normal, "finish_reason") == "stop" and final_value(normal, "completion_tokens") < 40
    assert final_value(no_end, "finish_reason") == "length" and final_value(no_end, "completion_tokens") == 40
    assert no_end.text.startswith(SCRIPT_SHOWN) and len(no_end.text) > len(SCRIPT_SHOWN)
    from bayling.templates import builtin_template, render_prompt

    prompt = {"text_input": render_prompt([{"role": "user", "content": "你好"}], builtin_template("bayling")),
              "max_tokens": 40, "top_k": 1}
    normal_status, normal_body = http_generate(scripted_server.http, prompt, model="ensemble")
    no_end_status, no_end_body = http_generate(scripted_server.http, {**prompt, "end_id": -1}, model="ensemble")
    assert (normal_status, no_end_status) == (200, 200)
    assert normal_body["text_output"] == SCRIPT_SHOWN                     # the ensemble reads end_id the same way
    assert no_end_body["text_output"].startswith(SCRIPT_SHOWN) and no_end_body["text_output"] != SCRIPT_SHOWN


def test_long_conversations_drop_whole_old_turns(scripted_server):
    messages = []
    for i in range(30):
        messages += [{"role": "user", "content": f"问题 {i} " + "你好 " * 4}, {"role": "assistant", "content": "好的 " * 4}]
    messages.append({"role": "user", "content": "最后一个问题"})
    result = grpc_stream(scripted_server.grpc, {"messages": json.dumps(messages, ensure_ascii=False),
                                                "max_tokens": 32, "return_prompt_ids": True, **GREEDY})
    assert result.error is None
    assert result.text == SCRIPT_SHOWN
    assert final_value(result, "prompt_tokens") <= 256 - 32  # the tiny model's context


@pytest.mark.cpu_engine
def test_bayling_serve_prints_endpoints_and_stops_cleanly_on_sigterm(default_engine, tmp_path):
    import signal
    import subprocess
    import sys

    from bayling.model_repository.server import free_port

    ports = [str(free_port()) for _ in range(3)]
    serve = subprocess.Popen([sys.executable, "-m", "bayling.cli", "serve", "--engine", str(default_engine),
                              "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2],
                              "--address", "127.0.0.1", "--run-dir", str(tmp_path / "run"),
                              "--log-file", str(tmp_path / "triton.log")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = serve.stdout.readline()
        assert first.startswith("BayLing is being served"), serve.stderr.read() if serve.poll() is not None else first
        ok = grpc_stream(f"127.0.0.1:{ports[1]}", chat("Say hi.", max_tokens=4, **GREEDY))
        assert ok.error is None and ok.text
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
    leftover = subprocess.run(["pgrep", "-f", f"grpc-port={ports[1]}"], capture_output=True, text=True)
    assert leftover.stdout == ""


def test_sixty_four_streams_at_once_get_exact_answers_and_finish_reasons(scripted_server):
    """Under load the relay merges pieces into fewer responses: every answer must stay exact."""
    cases = {"plain": ({}, SCRIPT_SHOWN, "stop"),
             "stop string": ({"stop_words": ["来自"]}, SCRIPT_SHOWN.split("来自")[0], "stop"),
             "no end id": ({"end_id": -1, "max_tokens": 120}, None, "length")}
    results = {}

    def run(i):
        name = list(cases)[i % len(cases)]
        extra = cases[name][0]
        request = chat("你好", **{"max_tokens": 40, **extra}, stream=True, **GREEDY)
        results[i] = (name, grpc_stream(scripted_server.grpc, request), grpc_stream(scripted_server.grpc,
                                                                                     {**request, "stream": False}))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 64
    for name, streamed, whole in results.values():
        _, expected, reason = cases[name]
        assert streamed.error is None and whole.error is None, name
        assert streamed.text == whole.text, name
        if expected is not None:
            assert whole.text == expected, name
        assert final_value(streamed, "finish_reason") == final_value(whole, "finish_reason") == reason, name
        assert final_value(streamed, "completion_tokens") == final_value(whole, "completion_tokens"), name
    no_end = [r for r in results.values() if r[0] == "no end id"]
    assert all(final_value(s, "completion_tokens") == 120 for _, s, _ in no_end)


def test_a_64_bit_seed_samples_reproducibly_and_breaks_nothing(default_server):
    """TensorRT-LLM's random_seed is UINT64; CTranslate2's is 32-bit (a seed >= 2**32 used to leave the CPU
    engine without a generator, failing every later request)."""
    request = chat("Write a line about the sea.", max_tokens=12, temperature=1.0, random_seed=2**40)
    first, again = grpc_stream(default_server.grpc, request), grpc_stream(default_server.grpc, request)
    assert first.error is None and again.error is None and first.text == again.text
    top = grpc_stream(default_server.grpc, {**request, "random_seed": 2**64 - 1})
    assert top.error is None and top.text
    ok = grpc_stream(default_server.grpc, chat("Say hi.", max_tokens=4, **GREEDY))
    assert ok.error is None and ok.text


def post_raw(url: str, path: str, data: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://{url}{path}", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_huge_form_body_is_refused_and_the_server_keeps_serving(default_server):
    """curl -d sends form encoding: a body of about 4.19 MB of it made tritonserver 2.51 segfault."""
    status, body = post_raw(default_server.http, "/v2/models/bayling/generate", b"a" * 4_300_000,
                            "application/x-www-form-urlencoded")
    assert status == 413 and body["error"].startswith("request body:")
    status, body = http_generate(default_server.http, chat("Say hi.", max_tokens=4, **GREEDY))
    assert status == 200 and body["text_output"]
    assert grpc_stream(default_server.grpc, chat("Say hi.", max_tokens=4, **GREEDY)).error is None


@pytest.mark.parametrize("raw, field", [
    (b'{"text_input": "hi", "max_tokens": "8"}', "max_tokens"),
    (b'{"text_input": "hi", "max_tokens": 4.5}', "max_tokens"),
    (b'{"text_input": "hi", "max_tokens": [4, 5]}', "max_tokens"),
    (b'{"text_input": "hi", "temperature": 1e999}', "temperature"),
    (b'{"text_input": "hi", "random_seed": -1}', "random_seed"),
    (b'{"text_input": "hi", "stream": "yes"}', "stream"),
    (b'{"text_input": "hi", "max_tokens": 8', "request body"),
    (b'{"messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "request body"),
    (b'["text_input", "hi"]', "request body"),
])
def test_mistyped_http_values_are_400_naming_the_field(default_server, raw, field):
    """Triton's own HTTP frontend answered these with 500 "Unable to parse 'data'"."""
    for model in ("bayling", "ensemble"):
        status, body = post_raw(default_server.http, f"/v2/models/{model}/generate", raw)
        assert status == 400 and body["error"].startswith(f"{field}:"), (model, body)


def test_ten_thousand_turns_are_cut_quickly_and_the_server_keeps_serving(scripted_server):
    """Dropping old turns re-tokenized the whole conversation per dropped turn: 10,000 turns took minutes."""
    messages = []
    for i in range(4_999):
        messages += [{"role": "user", "content": f"问题 {i}"}, {"role": "assistant", "content": "好的"}]
    messages.append({"role": "user", "content": "你好"})
    started = time.monotonic()
    result = grpc_stream(scripted_server.grpc, {"messages": json.dumps(messages, ensure_ascii=False),
                                                "max_tokens": 40, **GREEDY})
    assert result.error is None and result.text == SCRIPT_SHOWN
    assert time.monotonic() - started < 30
    ok = grpc_stream(scripted_server.grpc, chat("你好", max_tokens=40, **GREEDY))
    assert ok.error is None and ok.text == SCRIPT_SHOWN
