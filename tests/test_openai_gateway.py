"""`bayling openai` against the real stack, with the official `openai` package as the client."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from bayling.model_repository.server import free_port
from tests.client_helpers import bayling_process, metric, settled, stop_process, wait_until

pytestmark = pytest.mark.e2e
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
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
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])   # no usage unless asked


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
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),        # the CPU engine refuses it, naming it
    ({"frequency_penalty": -0.5}, "frequency_penalty"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
    ({"temperature": 500}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"extra_body": {"ignore_eos": "yes"}}, "ignore_eos"),
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
                          json={"model": "m", "messages": QUESTION, "stream": True, "presence_penalty": 1.0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "presence_penalty"
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
        assert error["message"].startswith((f"{param}: ", f"{param}["))   # messages[3]: ...
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
