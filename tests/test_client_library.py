"""BayLingClient against the real server, over gRPC and HTTP: answers, streaming, cancellation,
timeouts, retries, errors, health and model info."""

from __future__ import annotations

import threading
import time

import pytest

from bayling.client import BayLingClient, BayLingServerError, ChatResult
from bayling.client.library import parse_url
from bayling.errors import BaylingError, InvalidInput
from bayling.model_repository.server import free_port
from tests.client_helpers import TcpForwarder, metric, settled

pytestmark = pytest.mark.e2e
GREEDY = {"temperature": 0.0}
FRANCE = "Name the capital of France."


@pytest.fixture(params=["grpc", "http"])
def client(request, default_server):
    url = default_server.grpc if request.param == "grpc" else f"http://{default_server.http}"
    with BayLingClient(url) as c:
        yield c


def test_chat_returns_text_finish_reason_and_token_counts(client):
    answer = client.chat([{"role": "user", "content": FRANCE}], max_tokens=32, **GREEDY)
    assert isinstance(answer, ChatResult)
    assert "Paris" in answer.text and answer.finish_reason == "stop"
    assert answer.prompt_tokens > 5 and 0 < answer.completion_tokens <= 32
    assert client.chat(FRANCE, max_tokens=32, **GREEDY) == answer          # a string is one user turn


def test_stream_chat_yields_pieces_that_join_to_the_whole_answer(client):
    request = dict(max_tokens=48, temperature=0.8, top_p=0.95, random_seed=11)
    whole = client.chat("Write two sentences about the sea.", **request)
    with client.stream_chat("Write two sentences about the sea.", **request) as stream:
        pieces = list(stream)
    assert len(pieces) > 3 and all(pieces)
    assert "".join(pieces) == whole.text == stream.text
    assert stream.result == whole


def test_multi_turn_and_system_messages(client):
    turns = [{"role": "system", "content": "You are a geography teacher."},
             {"role": "user", "content": FRANCE}, {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "And of Germany?"}]
    answer = client.chat(turns, max_tokens=24, **GREEDY)
    assert "Berlin" in answer.text
    assert answer.prompt_tokens > client.chat(FRANCE, max_tokens=1).prompt_tokens


def test_max_tokens_and_stop_words(client):
    short = client.chat(FRANCE, max_tokens=3)
    assert (short.completion_tokens, short.finish_reason) == (3, "length")
    stopped = client.chat(FRANCE, max_tokens=32, stop_words=["Paris"], **GREEDY)
    assert (stopped.text, stopped.finish_reason) == ("The capital of France is ", "stop")


def test_raw_completion(client):
    result = client.complete("The capital of France is", max_tokens=8, **GREEDY)
    assert "Paris" in result.text and result.completion_tokens <= 8
    assert "".join(client.stream_complete("The capital of France is", max_tokens=8, **GREEDY)) == result.text


def test_closing_a_stream_early_cancels_it_on_the_server(client, default_server):
    cancelled = lambda: metric(default_server.metrics, "bayling_requests_total", finish_reason="cancelled")  # noqa: E731
    generated = lambda: metric(default_server.metrics, "bayling_engine_generated_tokens_total")  # noqa: E731
    cancelled_before, generated_before = settled(cancelled), settled(generated)
    with client.stream_chat("Tell me a very long story.", max_tokens=1500, min_length=1500, **GREEDY) as stream:
        for i, _ in enumerate(stream):
            if i == 5:
                break
    assert stream.result is None
    assert settled(generated) - generated_before < 300, "the engine kept generating after the stream was closed"
    assert settled(cancelled) == cancelled_before + 1
    assert "Paris" in client.chat(FRANCE, max_tokens=16, **GREEDY).text    # the client is still usable


def test_a_request_that_takes_too_long_times_out_and_stops_on_the_server(default_server, client):
    slow = BayLingClient(client.url, timeout=1.5, retries=0)
    generated = lambda: metric(default_server.metrics, "bayling_engine_generated_tokens_total")  # noqa: E731
    before = settled(generated)
    started = time.monotonic()
    with pytest.raises(BayLingServerError) as caught:
        slow.chat("Tell me a very long story.", max_tokens=1500, min_length=1500, **GREEDY)
    assert caught.value.status == "DEADLINE_EXCEEDED"
    assert time.monotonic() - started < 10
    assert settled(generated) - before < 300, "the engine kept generating after the timeout"
    slow.close()


def test_server_errors_carry_the_servers_message_and_field(client):
    with pytest.raises(BayLingServerError) as caught:
        client.chat("word " * 9000, max_tokens=16)                   # more than the context holds
    assert caught.value.status == "INVALID_ARGUMENT" and caught.value.field == "messages"
    assert caught.value.message.startswith("messages: the prompt needs")
    with pytest.raises(BayLingServerError) as caught:                # only the engine knows its vocabulary
        client.chat(FRANCE, max_tokens=4, top_k=10**6, temperature=0.7)
    assert caught.value.status == "INVALID_ARGUMENT" and caught.value.field in ("top_k", "runtime_top_k")
    assert "vocabulary" in caught.value.message
    with pytest.raises(BayLingServerError) as caught:
        list(client.stream_chat("word " * 9000, max_tokens=16))
    assert caught.value.field == "messages"


def test_parameters_are_checked_before_sending_with_the_servers_limits(client, default_server):
    requests = lambda: metric(default_server.metrics, "bayling_requests_total")  # noqa: E731
    before = settled(requests)
    for params, field in [({"max_tokens": -3}, "max_tokens"), ({"max_tokens": 9000}, "max_tokens"),
                          ({"temperature": -1}, "temperature"), ({"top_p": 1.5}, "top_p"),
                          ({"random_seed": -1}, "random_seed"), ({"min_length": 50, "max_tokens": 10}, "min_length"),
                          ({"stop_words": [""]}, "stop_words"), ({"best_of": 2}, "best_of")]:
        with pytest.raises(InvalidInput) as caught:
            client.chat(FRANCE, **params)
        assert caught.value.field == field, params
    assert "must be between 1 and 2048" in str(pytest.raises(InvalidInput, client.chat, FRANCE, max_tokens=9000).value)
    with pytest.raises(InvalidInput) as caught:
        client.stream_chat([{"role": "assistant", "content": "hi"}])
    assert caught.value.field == "messages"
    assert settled(requests) == before, "nothing may reach the server"


def test_health_and_model_info(client):
    assert client.health() is True
    info = client.model_info()
    assert (info.model_name, info.engine, info.template, info.max_context) == \
           ("SmolLM2-135M-Instruct", "llamacpp", "hf", 2048)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unreachable_server(protocol):
    dead = BayLingClient(f"127.0.0.1:{free_port()}", protocol, retries=0)
    assert dead.health() is False
    with pytest.raises(BayLingServerError) as caught:
        dead.model_info()
    assert caught.value.status == "UNAVAILABLE"
    with pytest.raises(BayLingServerError) as caught:
        dead.chat(FRANCE, max_tokens=4)
    assert caught.value.status == "UNAVAILABLE"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_non_streaming_calls_retry_with_backoff_while_the_server_is_unavailable(default_server, protocol):
    port = free_port()
    target = default_server.grpc if protocol == "grpc" else default_server.http
    late = TcpForwarder(target, port)
    timer = threading.Timer(1.2, late.start)                         # the server "comes up" after 1.2 s
    retrying = BayLingClient(f"127.0.0.1:{port}", protocol, retries=5, backoff=0.4, validate_max_tokens=False)
    started = time.monotonic()
    timer.start()
    try:
        answer = retrying.chat(FRANCE, max_tokens=16, **GREEDY)
        assert "Paris" in answer.text
        assert time.monotonic() - started >= 1.2                     # it waited for the server
    finally:
        timer.cancel()
        late.stop()
        retrying.close()
    no_retry = BayLingClient(f"127.0.0.1:{free_port()}", protocol, retries=0, validate_max_tokens=False)
    with pytest.raises(BayLingServerError):
        list(no_retry.stream_chat(FRANCE, max_tokens=4))             # streams are not retried


def test_one_client_serves_concurrent_threads(client):
    results: dict[int, ChatResult] = {}

    def ask(i: int) -> None:
        results[i] = client.chat(f"Count from {i}.", max_tokens=4 + i, min_length=4 + i, **GREEDY)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(8))
    assert all(r.completion_tokens == 4 + i and r.finish_reason == "length" for i, r in results.items())


def test_outputs_read_from_the_raw_tensors_are_those_tritonclient_reads():
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import serialize_byte_tensor

    from bayling.client.library import grpc_outputs, outputs_from_arrays

    arrays = {"text_output": np.array(["héllo 你好"], dtype=object), "finish_reason": np.array([""], dtype=object),
              "prompt_tokens": np.array([12], np.int32), "completion_tokens": np.array([-3], np.int32),
              "prompt_ids": np.array([], np.int32), "flag": np.array([True])}
    response = service_pb2.ModelInferResponse()
    response.parameters["triton_final_response"].bool_param = True
    for name, array in arrays.items():
        tensor = response.outputs.add(name=name, shape=array.shape)
        tensor.datatype = {"object": "BYTES", "int32": "INT32", "bool": "BOOL"}[str(array.dtype)]
        response.raw_output_contents.append(serialize_byte_tensor(array).item() if array.dtype == object
                                            else array.tobytes())
    result = grpcclient.InferResult(response)
    expected = outputs_from_arrays({o.name: result.as_numpy(o.name) for o in response.outputs})
    assert expected == {"text_output": "héllo 你好", "finish_reason": "", "prompt_tokens": 12,
                        "completion_tokens": -3, "flag": True}
    outputs, final = grpc_outputs(result)
    assert final and outputs == expected
    assert [type(v) for v in outputs.values()] == [type(v) for v in expected.values()]
    half = response.outputs.add(name="half", shape=[1], datatype="FP16")   # no raw reading: tritonclient's
    response.raw_output_contents.append(np.array([0.5], np.float16).tobytes())
    assert grpc_outputs(grpcclient.InferResult(response))[0] == {**expected, "half": 0.5}


def test_urls():
    assert parse_url("localhost:8001", None) == ("grpc", "localhost:8001")
    assert parse_url("http://h:8000/", None) == ("http", "h:8000")
    assert parse_url("grpc://h:8001", "grpc") == ("grpc", "h:8001")
    assert parse_url("h:8000", "http") == ("http", "h:8000")
    for url, protocol in [("https://h", None), ("http://h:1", "grpc"), ("h:1", "websocket")]:
        with pytest.raises(BaylingError):
            parse_url(url, protocol)


# --- several servers ---------------------------------------------------------------------------------------------
def test_several_servers_are_a_list_or_a_dns_name():
    from bayling.client.library import parse_targets

    assert parse_targets("localhost:8001", None).addresses == ("localhost:8001",)
    listed = parse_targets("10.0.0.5:8001, 10.0.0.6:8001,10.0.0.5:8001", None)
    assert (listed.protocol, listed.addresses) == ("grpc", ("10.0.0.5:8001", "10.0.0.6:8001"))
    http = parse_targets("http://a:8000,http://b:8000", None)
    assert (http.protocol, http.addresses, str(http)) == ("http", ("a:8000", "b:8000"), "a:8000,b:8000")
    dns = parse_targets("dns:///bayling-headless.llm.svc:8001", None)
    assert (dns.protocol, dns.dns_name, dns.dns_port, str(dns)) == \
           ("grpc", "bayling-headless.llm.svc", 8001, "dns:///bayling-headless.llm.svc:8001")
    assert parse_targets("dns:///svc:8000", "http").protocol == "http"
    for url, protocol in [("a:1,http://b:2", None), ("a:1,,b:2", None), ("a:1,b", None), ("dns:///svc", None),
                          ("dns:///a:1,b:2", None), ("a:1,b:99999", None), ("grpc://a:1,b:2", "http")]:
        with pytest.raises(BaylingError):
            parse_targets(url, protocol)
    with pytest.raises(BaylingError, match="balance"):
        BayLingClient("a:1,b:2", balance="random")


def test_the_balancer_picks_the_fewest_in_flight_in_turn_and_skips_a_failed_address_for_a_while():
    from bayling.client.library import DOWN_S, MAX_DOWN_S, Balancer

    def balancer(policy="least_requests", addresses=("a", "b", "c")):
        made = []
        b = Balancer(policy)
        b.update(list(addresses), lambda address: made.append(address) or address)
        assert made == list(addresses)                             # one transport per address
        return b

    least = balancer()
    assert [least.pick(now=0).address for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    a, b, c = least.endpoints
    least.finished(a)
    least.finished(a)                                             # in flight: a 0, b 2, c 2
    assert [least.pick(now=0).address for _ in range(3)] == ["a", "a", "b"]   # then a 2, b 3, c 2: ties in turn

    # UNAVAILABLE: skipped for DOWN_S, doubling up to MAX_DOWN_S; a success clears it
    down = balancer()
    a, b, c = down.endpoints
    down.failed(a, now=10)
    assert a.down_until == 10 + DOWN_S
    assert {down.pick(now=10).address for _ in range(4)} == {"b", "c"}
    assert down.pick(now=10 + DOWN_S).address == "a"             # fewest in flight once it is back
    for _ in range(10):
        down.failed(a, now=20)
    assert a.down_until == 20 + MAX_DOWN_S
    down.succeeded(a)
    assert (a.failures, a.down_until) == (0, 0.0)
    # every address down: the one down the longest is tried; all tried: None
    for endpoint, t in ((a, 30), (b, 31), (c, 32)):
        down.failed(endpoint, now=t)
    assert down.pick(now=32).address == "a"
    assert down.pick(tried=[a], now=32).address == "b"
    assert down.pick(tried=[a, b, c], now=32) is None

    # a dropped address keeps its requests and is closed once idle; kept ones keep their state
    moving = balancer()
    a, b, c = moving.endpoints
    for _ in range(3):
        moving.pick(now=0)                                        # one on each
    moving.finished(c)
    idle = moving.update(["b", "d"], lambda address: address)
    assert idle == [c] and [e.address for e in moving.endpoints] == ["b", "d"] and b.in_flight == 1
    assert a.removed and moving.finished(a) is True               # its last request ended: close it
    assert moving.finished(b) is False

    rr = balancer("round_robin", ("a", "b"))
    first = rr.pick(now=0)
    assert first.address == "a"
    assert [rr.pick(now=0).address for _ in range(4)] == ["b", "a", "b", "a"]   # in turn, whatever is in flight


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_dead_address_in_the_list_costs_nothing_requests_move_to_the_live_server(default_server, protocol):
    live = default_server.grpc if protocol == "grpc" else default_server.http
    dead = f"127.0.0.1:{free_port()}"
    urls = [dead, live] if protocol == "grpc" else [f"http://{dead}", f"http://{live}"]
    with BayLingClient(",".join(urls), retries=0) as client:
        assert client.health() is True                             # one ready server is enough
        assert client.model_info().engine == "llamacpp"
        for _ in range(4):                                         # streamed ones too: refused before any response
            assert "Paris" in client.chat(FRANCE, max_tokens=16, **GREEDY).text
            assert "Paris" in "".join(client.stream_chat(FRANCE, max_tokens=16, **GREEDY))
    with BayLingClient(",".join([dead, f"127.0.0.1:{free_port()}"]), protocol, retries=0) as client:
        assert client.health() is False
        with pytest.raises(BayLingServerError) as caught:
            client.chat(FRANCE, max_tokens=4)
        assert caught.value.status == "UNAVAILABLE"


def test_a_dns_name_stands_for_every_address_it_resolves_to(default_server):
    port = default_server.grpc.rpartition(":")[2]
    with BayLingClient(f"dns:///localhost:{port}", retries=0) as client:
        servers = client.servers()
        assert f"127.0.0.1:{port}" in servers                     # ::1 too where localhost has it (then refused: skipped)
        answers = [client.chat(FRANCE, max_tokens=16, **GREEDY).text for _ in range(3)]
        assert all("Paris" in a for a in answers)
    with BayLingClient("dns:///no-such-host.invalid:8001", retries=0) as nowhere:
        with pytest.raises(BayLingServerError) as caught:
            nowhere.chat(FRANCE, max_tokens=4)
        assert caught.value.status == "UNAVAILABLE" and "no-such-host.invalid" in str(caught.value)


def test_many_refused_requests_at_once_leave_the_server_serving(default_server):
    """With Triton's `triton_grpc_error` stream mode, a burst of refusals from the models crashed
    tritonserver 2.51 within seconds (signal 11). The client reads errors in-band: same statuses, and the
    server lives on."""
    too_long = "word " * 5000                             # past the context: the server refuses it by name
    failures: list[BayLingServerError] = []

    def refused_ten():
        with BayLingClient(default_server.grpc, retries=0) as c:
            for _ in range(10):
                with pytest.raises(BayLingServerError) as failure:
                    c.chat(too_long, max_tokens=4)
                failures.append(failure.value)

    threads = [threading.Thread(target=refused_ten) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(failures) == 60
    assert {(f.status, f.field) for f in failures} == {("INVALID_ARGUMENT", "messages")}
    with BayLingClient(default_server.grpc) as c:
        assert c.chat(FRANCE, max_tokens=8, **GREEDY).text
