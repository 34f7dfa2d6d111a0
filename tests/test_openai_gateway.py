"""`bayling openai` against the real stack, with the official `openai` package as the client."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from bayling.client.library import stream_error
from bayling.model_repository.server import free_port
from tests.client_helpers import bayling_process, metric, settled, stop_process, wait_until

pytestmark = pytest.mark.e2e
QUESTION = [{"role": "user", "content": "Name the capital of France."}]
MODEL = "SmolLM2-135M-Instruct"


def answers(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


def start_gateway(*args: str) -> tuple[object, str]:
    """`bayling openai ARGS` on a free port, once it answers /health (200, or 503 without a server)."""
    port = free_port()
    process = bayling_process("openai", "--port", str(port), *args)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is not None or answers(f"{base}/health"), 60, "the gateway")
    except BaseException:
        stop_process(process)
        raise
    assert process.poll() is None, stop_process(process)
    return process, base


@pytest.fixture(scope="module")
def gateway(default_server):
    process, base = start_gateway("--url", default_server.grpc)
    yield base
    stop_process(process)


@pytest.fixture(scope="module")
def oai(gateway):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_and_health(oai, gateway):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    assert oai.models.retrieve(MODEL).owned_by == "bayling"
    health = httpx.get(f"{gateway}/health").json()
    assert health == {"status": "ok", "server_ready": True, "model": MODEL}


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.95, "seed": 7}],
                         ids=["greedy", "seeded"])
def test_streamed_chat_chunks_join_to_the_non_streamed_answer(oai, sampling):
    whole = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, **sampling)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, stream=True,
                                              stream_options={"include_usage": True}, **sampling))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3, "the answer must come in pieces"
    assert "".join(pieces) == whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and whole.model == MODEL
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    if sampling["temperature"] == 0:
        assert "Paris" in whole.choices[0].message.content


def test_sse_stream_ends_with_done(gateway):
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", timeout=120,
                      json={"model": "any", "messages": QUESTION, "max_tokens": 8, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)   # no usage unless asked
    first = chunks[0]
    for c in chunks[1:]:        # every piece is the first chunk's shape, with its id, time and model
        assert c.keys() == first.keys() and c["choices"][0].keys() == first["choices"][0].keys()
        assert (c["id"], c["created"], c["model"], c["object"]) == (first["id"], first["created"], first["model"],
                                                                     "chat.completion.chunk")
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[:-1] == [None] * (len(chunks) - 1) and reasons[-1] in ("stop", "length")
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in chunks[1:-1])


@pytest.mark.parametrize("text", ["Paris", 'a "quoted"\nline\\', "巴黎是法国的首都", "", "\x00", "\u2028 🙂"])
def test_a_chunk_filled_in_is_the_chunk_rendered(text):
    from bayling.client import openai_protocol as proto
    from bayling.client.openai_gateway import filled_in, sse

    def render(piece: str) -> str:
        choice = proto.ChatChunkChoice(index=2, delta=proto.Delta(content=piece))
        return sse(proto.dump(proto.ChatCompletionChunk(id="chatcmpl-1", created=1, model=MODEL, choices=[choice]),
                              usage=False))

    assert filled_in(render)(text) == render(text)
    assert json.loads(filled_in(render)(text)[6:])["choices"][0]["delta"] == {"content": text}


def test_completions_streamed_and_not(oai):
    whole = oai.completions.create(model=MODEL, prompt="The capital of France is", temperature=0)
    assert whole.object == "text_completion"
    assert whole.usage.completion_tokens == 16 and whole.choices[0].finish_reason == "length"   # OpenAI's default
    assert "Paris" in whole.choices[0].text
    chunks = list(oai.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_max_tokens_stop_and_system_are_mapped(oai):
    short = oai.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_completion_tokens=3)
    assert (short.usage.completion_tokens, short.choices[0].finish_reason) == (3, "length")
    stopped = oai.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32, stop="Paris")
    assert stopped.choices[0].message.content == "The capital of France is "
    assert stopped.choices[0].finish_reason == "stop"
    system = [{"role": "developer", "content": [{"type": "text", "text": "Answer in one word."}]}] + QUESTION
    with_system = oai.chat.completions.create(model=MODEL, messages=system, temperature=0, max_tokens=8)
    plain = oai.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8)
    assert with_system.usage.prompt_tokens != plain.usage.prompt_tokens
    ended = oai.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=200)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens < 200
    fixed = oai.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=200,
                                        extra_body={"ignore_eos": True})      # vLLM's extension
    assert (fixed.usage.completion_tokens, fixed.choices[0].finish_reason) == (200, "length")


@pytest.mark.parametrize("extra, param", [
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"top_logprobs": 2}, "top_logprobs"),                  # without logprobs
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"five": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),         # outside the vocabulary (the server says so)
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 2.1}, "presence_penalty"),        # OpenAI's ranges
    ({"presence_penalty": -2.1}, "presence_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"temperature": 2.1}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 1.1}, "top_p"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
    ({"temperature": 500}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"extra_body": {"ignore_eos": "yes"}}, "ignore_eos"),
    ({"extra_body": {"min_tokens": -1}}, "min_tokens"),
])
def test_unsupported_or_invalid_parameters_answer_400_naming_them(oai, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=MODEL, messages=QUESTION, **{"max_tokens": 8, **extra})
    error = caught.value.body
    assert caught.value.status_code == 400
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"{param}: ")


@pytest.mark.parametrize("messages", [
    [{"role": "tool", "content": "42", "tool_call_id": "x"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
    [{"role": "assistant", "content": "Hi"}],
    [],
])
def test_bad_messages_answer_400(gateway, messages):
    response = httpx.post(f"{gateway}/v1/chat/completions", json={"model": "m", "messages": messages}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"


def test_streamed_request_errors_are_400_before_streaming(gateway):
    response = httpx.post(f"{gateway}/v1/chat/completions", timeout=30,
                          json={"model": "m", "messages": QUESTION, "stream": True, "presence_penalty": 2.5})
    assert response.status_code == 400 and response.json()["error"]["param"] == "presence_penalty"
    response = httpx.post(f"{gateway}/v1/chat/completions", timeout=30,      # an error from the server too
                          json={"model": "m", "messages": QUESTION, "stream": True, "n": 2,
                                "logit_bias": {"99999999": 1}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias"
    response = httpx.post(f"{gateway}/v1/chat/completions", content=b"{not json", timeout=30)
    assert response.status_code == 400 and "error" in response.json()


def test_a_client_that_disconnects_mid_stream_cancels_the_generation(gateway, default_server):
    cancelled = lambda: metric(default_server.metrics, "bayling_requests_total", finish_reason="cancelled")  # noqa: E731
    generated = lambda: metric(default_server.metrics, "bayling_engine_generated_tokens_total")  # noqa: E731
    cancelled_before, generated_before = settled(cancelled), settled(generated)
    body = {"model": "m", "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 1500, "min_tokens": 1500, "stream": True}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, timeout=120) as response:
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data: ")
            if received >= 6:
                break                                      # leaving the block closes the connection
    assert settled(generated) - generated_before < 300, "the engine kept generating after the client left"
    assert settled(cancelled) == cancelled_before + 1


def test_api_key_over_the_http_backend(default_server):
    process, base = start_gateway("--url", f"http://{default_server.http}", "--api-key", "s3cret")
    try:
        wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
        assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        answer = right.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, temperature=0)
        assert "Paris" in answer.choices[0].message.content
        assert httpx.get(f"{base}/health").status_code == 200          # health needs no key
    finally:
        stop_process(process)


def test_health_reports_an_unreachable_server():
    process, base = start_gateway("--url", "127.0.0.1:1")
    try:
        response = httpx.get(f"{base}/health", timeout=30)
        assert response.status_code == 503 and response.json()["server_ready"] is False
        failed = httpx.post(f"{base}/v1/chat/completions", json={"model": "m", "messages": QUESTION}, timeout=60)
        assert failed.status_code == 503 and failed.json()["error"]["type"] == "server_error"
    finally:
        stop_process(process)


def raw_exchange(base: str, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send a request head and some body parts over a plain socket, without finishing the body,
    and return what the gateway answers: a reply here proves it did not wait for the rest."""
    address = urlsplit(base)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        return sock.recv(65536)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if param:
        assert error["message"].startswith((f"{param}: ", f"{param}[", f"{param}."))   # messages[3]: ...
    return error


def test_deeply_nested_json_answers_400(gateway):
    for body in (b"[" * 10_000 + b"]" * 10_000,
                 b'{"model": "m", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"):
        response = httpx.post(f"{gateway}/v1/chat/completions", content=body, timeout=30)
        assert "nested too deeply" in assert_openai_error(response, 400)["message"]


def test_a_body_over_the_limit_answers_413(gateway):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 20_000_000}]}).encode()
    response = httpx.post(f"{gateway}/v1/chat/completions", content=body, timeout=60)
    assert assert_openai_error(response, 413)["code"] == "request_too_large"
    chunked = httpx.post(f"{gateway}/v1/chat/completions", timeout=60,
                         content=(body[i:i + 2**20] for i in range(0, len(body), 2**20)))
    assert assert_openai_error(chunked, 413)["code"] == "request_too_large"


def test_a_body_over_the_limit_is_refused_before_it_is_read(gateway):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
    declared = raw_exchange(gateway, head + b"Content-Length: 200000000\r\n\r\n", [b'{"model": "m"'])
    assert declared.startswith(b"HTTP/1.1 413 ")
    chunk = b"x" * 2**20
    chunked = raw_exchange(gateway, head + b"Transfer-Encoding: chunked\r\n\r\n",
                           [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 9)     # 9 MiB, and more to come
    assert chunked.startswith(b"HTTP/1.1 413 ")


def test_max_request_bytes_option():
    process, base = start_gateway("--url", "127.0.0.1:1", "--max-request-bytes", "4096")
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}
        refused = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)
        assert "4096 bytes" in assert_openai_error(refused, 413)["message"]
        body["messages"][0]["content"] = "x" * 3000
        passed = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        assert passed.status_code == 503          # read and forwarded: this gateway has no server
    finally:
        stop_process(process)


@pytest.mark.parametrize("param, value", [
    ("max_tokens", "[4, 5]"), ("max_tokens", '"8"'), ("max_tokens", "8.5"), ("max_tokens", "1e999"),
    ("max_completion_tokens", "[4]"), ("max_completion_tokens", "true"),
    ("temperature", '"hot"'), ("temperature", "1e999"), ("top_p", "[0.5]"), ("top_p", "{}"),
    ("seed", "-1"), ("seed", "1.5"), ("seed", '"7"'), ("seed", "1e999"),
    ("top_k", '"5"'), ("top_k", "2.5"), ("top_k", "1e30"), ("top_k", "100000000000000000000"),
    ("repetition_penalty", "[]"), ("min_tokens", "1.5"), ("presence_penalty", '"0"'), ("frequency_penalty", "false"),
    ("n", '"2"'), ("n", "1.5"), ("n", "[1]"), ("n", "true"), ("n", "1e999"), ("best_of", '"1"'),
])
def test_numeric_parameters_of_the_wrong_type_answer_400_naming_them(gateway, param, value):
    body = json.dumps({"model": "m", "messages": QUESTION, "max_tokens": 8})[:-1] + f', "{param}": {value}}}'
    response = httpx.post(f"{gateway}/v1/chat/completions", content=body.encode(), timeout=60)
    assert assert_openai_error(response, 400, param)["code"] == "invalid_value"


@pytest.mark.parametrize("body", [
    {"messages": [], "max_tokens": [4, 5]},                         # a bad parameter is named first
    {"messages": QUESTION, "max_tokens": [4, 5], "max_completion_tokens": None},
], ids=["with-bad-messages", "max_completion_tokens-null"])
def test_a_bad_max_tokens_is_named_not_the_messages(gateway, body):
    response = httpx.post(f"{gateway}/v1/chat/completions", json={"model": "m", **body}, timeout=60)
    assert_openai_error(response, 400, "max_tokens")


def test_text_parts_must_hold_strings(gateway):
    messages = [{"role": "user", "content": [{"type": "text", "text": [["nested"]]}]}]
    response = httpx.post(f"{gateway}/v1/chat/completions", json={"model": "m", "messages": messages}, timeout=60)
    assert_openai_error(response, 400, "messages")


# --- OpenAI features: logprobs, top_logprobs, echo, n, best_of, logit_bias, penalties

PROMPT = "The capital of France is"


def streamed_chat_logprobs(oai, **kw):
    chunks = list(oai.chat.completions.create(model=MODEL, messages=QUESTION, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    return text, entries


def test_chat_logprobs_and_top_logprobs_streamed_and_not(oai):
    whole = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, logprobs=True,
                                        top_logprobs=3)
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens
    assert "".join(e.token for e in entries) == whole.choices[0].message.content
    assert b"".join(bytes(e.bytes) for e in entries).decode() == whole.choices[0].message.content
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        ranked = [t.logprob for t in e.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        assert e.top_logprobs[0].token == e.token          # greedy: the chosen token is the most likely one
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-4)
    text, streamed = streamed_chat_logprobs(oai, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    assert text == whole.choices[0].message.content
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-4)
    # logprobs without alternatives come from the batched path; the same numbers
    plain = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, logprobs=True)
    assert [e.token for e in plain.choices[0].logprobs.content] == [e.token for e in entries]
    assert [e.logprob for e in plain.choices[0].logprobs.content] == pytest.approx([e.logprob for e in entries],
                                                                                  abs=0.05)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4).choices[0].logprobs is None


def test_completion_logprobs_and_echo(oai):
    whole = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == whole.choices[0].text and lp.tokens[0] == " Paris"
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert all(len(top) == 2 and top[token] == pytest.approx(p, abs=1e-4)
               for top, token, p in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))
    chunks = list(oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                         stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
    assert oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logprobs=0).choices[0].logprobs is None
    echoed = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + whole.choices[0].text
    chunks = list(oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                         stream=True))
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + whole.choices[0].text


def test_n_choices_are_sampled_independently_and_repeat_with_a_seed(oai):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Write a word."}], max_tokens=12, temperature=1.0,
              n=4, seed=11)
    first = oai.chat.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in first.choices]
    assert len(set(texts)) > 1, "n sequences must be sampled independently"
    assert [c.message.content for c in oai.chat.completions.create(**kw).choices] == texts
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    by_index = {}
    for c in chunks:
        for choice in c.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + (choice.delta.content or "")
    assert [by_index[i] for i in range(4)] == texts
    finals = [ch.index for c in chunks for ch in c.choices if ch.finish_reason]
    assert sorted(finals) == [0, 1, 2, 3] and chunks[-1].usage == first.usage


def test_completions_several_prompts_and_best_of(oai):
    both = oai.completions.create(model=MODEL, prompt=[PROMPT, "One, two, three,"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    alone = oai.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=4, temperature=0)
    assert both.choices[0].text == both.choices[1].text != both.choices[2].text == alone.choices[0].text
    best = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, best_of=3, seed=4)
    candidates = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, n=3, seed=4,
                                        logprobs=1)
    mean = {c.text: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in candidates.choices}
    assert len(best.choices) == 1 and best.choices[0].text == max(mean, key=mean.get)
    assert best.choices[0].logprobs is None and best.usage.completion_tokens == candidates.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=MODEL, prompt=PROMPT, n=2, best_of=1)
    assert caught.value.body["param"] == "best_of"


def test_logit_bias_forces_and_bans_tokens(oai, smol_tokenizer):
    paris = smol_tokenizer.encode(" Paris", add_special_tokens=False)[0]
    plain = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1)
    assert plain.choices[0].logprobs.tokens[0] == " Paris"
    banned = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1,
                                    logit_bias={str(paris): -100})
    assert banned.choices[0].logprobs.tokens[0] != " Paris"
    forced = smol_tokenizer.encode(" Lyon", add_special_tokens=False)[0]
    chosen = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                    logit_bias={str(forced): 100})
    assert chosen.choices[0].text.startswith(" Lyon" * 3)
    # the log probs reported are the model's own, before the bias
    lp = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1,
                                logit_bias={str(forced): 100}).choices[0].logprobs
    assert lp.tokens == [" Lyon"] and lp.token_logprobs[0] < -1


def test_presence_and_frequency_penalties_change_a_repetitive_answer(oai):
    ask = [{"role": "user", "content": "Repeat the word cat twenty times."}]
    plain = oai.chat.completions.create(model=MODEL, messages=ask, max_tokens=40, temperature=0)
    penalised = oai.chat.completions.create(model=MODEL, messages=ask, max_tokens=40, temperature=0,
                                            presence_penalty=2, frequency_penalty=2)
    assert plain.choices[0].message.content.lower().count("cat") > penalised.choices[0].message.content.lower().count("cat")
    streamed = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model=MODEL, messages=ask, max_tokens=40, temperature=0, presence_penalty=2, frequency_penalty=2, stream=True)
        if c.choices)
    assert streamed == penalised.choices[0].message.content
    negative = oai.chat.completions.create(model=MODEL, messages=ask, max_tokens=40, temperature=0,
                                           frequency_penalty=-2)
    assert negative.choices[0].message.content != penalised.choices[0].message.content


def test_a_validation_error_names_the_field_path(gateway):
    body = {"model": "m", "messages": QUESTION, "stream": True, "stream_options": {"include_usage": "yes"}}
    response = httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=30)
    assert assert_openai_error(response, 400, "stream_options")["message"].startswith("stream_options.include_usage: ")
    response = httpx.post(f"{gateway}/v1/completions", json={"model": "m", "prompt": PROMPT, "logprobs": 6}, timeout=30)
    assert "less than or equal to 5" in assert_openai_error(response, 400, "logprobs")["message"]
    response = httpx.post(f"{gateway}/v1/completions", json={"model": "m", "prompt": [1, 2]}, timeout=30)
    assert_openai_error(response, 400, "prompt")
    response = httpx.post(f"{gateway}/v1/completions", json={"model": "m"}, timeout=30)
    assert assert_openai_error(response, 400, "prompt")["code"] == "missing_required_parameter"


# --- the same options on the `bayling` model, with tritonclient

def test_the_bayling_model_answers_with_token_logprobs(default_server):
    from tests.triton_helpers import chat, final_value, grpc_stream, http_generate

    result = grpc_stream(default_server.grpc, chat("Name the capital of France.", max_tokens=8, temperature=0.0,
                                                   logprobs=True, top_logprobs=2))
    assert result.error is None
    entries = json.loads(final_value(result, "token_logprobs"))
    assert len(entries) == final_value(result, "completion_tokens") > 3
    assert "".join(e["token"] for e in entries) == result.text
    assert all(set(e) == {"token", "logprob", "bytes", "top_logprobs"} and len(e["top_logprobs"]) == 2
               for e in entries)
    plain = grpc_stream(default_server.grpc, chat("Name the capital of France.", max_tokens=8, temperature=0.0))
    assert plain.text == result.text and "token_logprobs" not in plain.final
    status, events = http_generate(default_server.http, chat("Name the capital of France.", max_tokens=8,
                                                             temperature=0.0, logprobs=True, stream=True),
                                   stream=True)
    assert status == 200
    streamed = [e for event in events if event.get("token_logprobs") for e in json.loads(event["token_logprobs"])]
    assert [e["token"] for e in streamed] == [e["token"] for e in entries]


@pytest.mark.parametrize("values, field", [
    ({"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logit_bias": '{"99999999": 1}'}, "logit_bias"),
    ({"logit_bias": "not json"}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
])
def test_the_bayling_model_refuses_bad_options_naming_them(default_server, values, field):
    from tests.triton_helpers import chat, grpc_stream

    result = grpc_stream(default_server.grpc, chat("hi", max_tokens=4, **values))
    assert result.error is not None
    assert stream_error(result.error.status(), result.error.message()).status == "INVALID_ARGUMENT"
    assert result.error.message().startswith(f"{field}: ")
    assert grpc_stream(default_server.grpc, chat("hi", max_tokens=2)).error is None   # it keeps serving


def test_the_engine_model_takes_nvidia_s_bias_and_penalty_tensors(default_server, smol_tokenizer):
    """tensorrt_llm with NVIDIA's names: embedding_bias (vocab-sized FP32) and the OpenAI penalties on CPU."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    ids = smol_tokenizer.encode(PROMPT, add_special_tokens=False)
    lyon = smol_tokenizer.encode(" Lyon", add_special_tokens=False)[0]
    bias = np.zeros((1, len(smol_tokenizer)), np.float32)
    bias[0, lyon] = 100.0
    values = {"input_ids": np.array([ids], np.int32), "input_lengths": np.array([[len(ids)]], np.int32),
              "request_output_len": np.array([[3]], np.int32), "runtime_top_k": np.array([[1]], np.int32),
              "embedding_bias": bias, "presence_penalty": np.array([[0.5]], np.float32),
              "return_generation_logits": np.array([[True]]), "return_log_probs": np.array([[True]])}
    client = grpcclient.InferenceServerClient(default_server.grpc)
    answers: list = []
    client.start_stream(callback=lambda result, error: answers.append((result, error)))
    inputs = []
    for name, array in values.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "BOOL" if array.dtype == bool else
                                       {np.int32: "INT32", np.float32: "FP32"}[array.dtype.type])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client.async_stream_infer("tensorrt_llm", inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in (
        "output_ids", "output_log_probs", "generation_logits")])
    wait_until(lambda: answers, 60, "the engine's answer")
    client.stop_stream()
    client.close()
    result, error = answers[0]
    assert error is None
    assert result.as_numpy("output_ids").reshape(-1).tolist() == [lyon] * 3
    logits = result.as_numpy("generation_logits")
    assert logits.shape == (1, 1, 3, len(smol_tokenizer))
    assert result.as_numpy("output_log_probs").shape == (1, 1, 3)


def test_completions_max_tokens_option(default_server):
    process, base = start_gateway("--url", default_server.grpc, "--completions-max-tokens", "3")
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0)
        assert (answer.usage.completion_tokens, answer.choices[0].finish_reason) == (3, "length")
    finally:
        stop_process(process)
    refused = bayling_process("openai", "--completions-max-tokens", "0")
    assert refused.wait(60) != 0 and "--completions-max-tokens must be at least 1" in stop_process(refused)
