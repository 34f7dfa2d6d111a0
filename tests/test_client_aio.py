"""AsyncBayLingClient (tritonclient.grpc.aio, and httpx for HTTP) against the real server."""

from __future__ import annotations

import asyncio
import time

import pytest

from bayling.client import AsyncBayLingClient, BayLingClient, BayLingServerError
from bayling.errors import InvalidInput
from bayling.model_repository.server import free_port
from tests.client_helpers import metric, settled

pytestmark = pytest.mark.e2e
FRANCE = "Name the capital of France."
GREEDY = {"temperature": 0.0}


@pytest.fixture(params=["grpc", "http"])
def url(request, default_server):
    return default_server.grpc if request.param == "grpc" else f"http://{default_server.http}"


def run(coroutine):
    return asyncio.run(coroutine)


def test_chat_and_stream_agree_with_the_sync_client(url):
    request = dict(max_tokens=40, temperature=0.8, top_p=0.95, random_seed=5)

    async def main():
        async with AsyncBayLingClient(url) as client:
            whole = await client.chat("Write two sentences about rain.", **request)
            async with client.stream_chat("Write two sentences about rain.", **request) as stream:
                pieces = [piece async for piece in stream]
            return whole, pieces, stream.result

    whole, pieces, result = run(main())
    with BayLingClient(url) as sync:
        assert sync.chat("Write two sentences about rain.", **request) == whole
    assert len(pieces) > 3 and "".join(pieces) == whole.text and result == whole
    assert whole.finish_reason in ("stop", "length") and whole.completion_tokens <= 40


def test_many_concurrent_requests_on_one_client(url):
    async def main():
        async with AsyncBayLingClient(url) as client:
            return await asyncio.gather(*[client.chat(f"Count from {i}.", max_tokens=4 + i, min_length=4 + i, **GREEDY)
                                          for i in range(8)])

    results = run(main())
    assert [r.completion_tokens for r in results] == [4 + i for i in range(8)]
    assert all(r.finish_reason == "length" for r in results)


def test_leaving_a_stream_early_cancels_it_on_the_server(url, default_server):
    cancelled = lambda: metric(default_server.metrics, "bayling_requests_total", finish_reason="cancelled")  # noqa: E731
    generated = lambda: metric(default_server.metrics, "bayling_engine_generated_tokens_total")  # noqa: E731
    cancelled_before, generated_before = settled(cancelled), settled(generated)

    async def main():
        async with AsyncBayLingClient(url) as client:
            async with client.stream_chat("Tell me a very long story.", max_tokens=1500, min_length=1500,
                                          **GREEDY) as stream:
                async for _ in stream:
                    if len(stream.text) > 20:
                        break
            return stream

    stream = run(main())
    assert stream.result is None
    assert settled(generated) - generated_before < 300, "the engine kept generating after the stream was left"
    assert settled(cancelled) == cancelled_before + 1


def test_a_cancelled_task_cancels_the_request(url, default_server):
    """asyncio cancellation (a timeout around the call, a web client that left) reaches the server."""
    generated = lambda: metric(default_server.metrics, "bayling_engine_generated_tokens_total")  # noqa: E731
    before = settled(generated)

    async def main():
        async with AsyncBayLingClient(url) as client:
            with pytest.raises((asyncio.TimeoutError, TimeoutError)):
                await asyncio.wait_for(client.chat("Tell me a very long story.", max_tokens=1500, min_length=1500,
                                                   **GREEDY), timeout=1.0)

    run(main())
    assert settled(generated) - before < 300, "the engine kept generating after the task was cancelled"


def test_timeout_errors_and_info(url):
    async def main():
        async with AsyncBayLingClient(url, timeout=1.5, retries=0) as client:
            assert await client.health() is True
            info = await client.model_info()
            assert (info.model_name, info.engine, info.max_context) == ("SmolLM2-135M-Instruct", "llamacpp", 2048)
            started = time.monotonic()
            with pytest.raises(BayLingServerError) as slow:
                await client.chat("Tell me a long story.", max_tokens=1500, min_length=1500, **GREEDY)
            assert slow.value.status == "DEADLINE_EXCEEDED" and time.monotonic() - started < 10
            with pytest.raises(BayLingServerError) as refused:
                await client.chat("word " * 9000, max_tokens=8)
            assert refused.value.status == "INVALID_ARGUMENT" and refused.value.field == "messages"
            with pytest.raises(InvalidInput) as invalid:
                client.stream_chat(FRANCE, max_tokens=9000)       # checked at once (the context is known now)
            assert invalid.value.field == "max_tokens"
            with pytest.raises(InvalidInput):
                await client.chat(FRANCE, top_p=0)

    run(main())


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unreachable_server_and_retries(protocol):
    async def main():
        async with AsyncBayLingClient(f"127.0.0.1:{free_port()}", protocol, retries=2, backoff=0.2) as client:
            assert await client.health() is False
            started = time.monotonic()
            with pytest.raises(BayLingServerError) as caught:
                await client.chat(FRANCE, max_tokens=4)
            assert caught.value.status == "UNAVAILABLE"
            assert time.monotonic() - started >= 0.6                   # 0.2 + 0.4 s of backoff

    run(main())


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_several_servers_a_dead_one_is_skipped_and_a_dns_name_resolves(default_server, protocol):
    live = default_server.grpc if protocol == "grpc" else default_server.http
    dead = f"127.0.0.1:{free_port()}"
    urls = [dead, live] if protocol == "grpc" else [f"http://{dead}", f"http://{live}"]

    async def main():
        async with AsyncBayLingClient(",".join(urls), retries=0) as client:
            assert await client.health() is True
            answers = await asyncio.gather(*(client.chat(FRANCE, max_tokens=16, **GREEDY) for _ in range(4)))
            assert all("Paris" in a.text for a in answers)
            async with client.stream_chat(FRANCE, max_tokens=16, **GREEDY) as stream:
                assert "Paris" in "".join([piece async for piece in stream])
        port = live.rpartition(":")[2]
        async with AsyncBayLingClient(f"dns:///localhost:{port}", protocol, retries=0) as client:
            assert f"127.0.0.1:{port}" in await client.servers()
            assert "Paris" in (await client.chat(FRANCE, max_tokens=16, **GREEDY)).text

    run(main())
