"""Several real `bayling serve` instances of the default engine on loopback, one client: requests
spread per request (the library over gRPC and HTTP, the asyncio library through the OpenAI gateway),
a server killed mid-run costs only its own in-flight requests, and a server restarted on the same
ports takes traffic again. Each server's share is read from its own Triton metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from bayling.client import AsyncBayLingClient, BayLingClient, BayLingServerError
from bayling.client.library import MAX_DOWN_S
from bayling.model_repository.server import free_port
from tests.client_helpers import bayling_process, http_ok, metric, settled, stop_process, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.cpu_engine]
SHORT = dict(max_tokens=4, temperature=0.0)
REQUESTS = 64


@dataclass
class Server:
    """One `bayling serve` process on fixed ports (so that a restart comes back at the same address)."""
    engine: Path
    run_dir: Path
    http: int
    grpc: int
    metrics: int
    process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics}/metrics"

    def start(self) -> "Server":
        with open(self.run_dir / "serve.log", "ab") as log:
            self.process = self._popen(log)
        return self

    def _popen(self, log) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "bayling.cli", "serve", "--engine", str(self.engine), "--http-port", str(self.http),
             "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), "--run-dir", str(self.run_dir),
             "--log-file", str(self.run_dir / "tritonserver.log"),
             # two servers share these 2 cores: one engine thread each (llama.cpp's threads wait for each
             # other at every layer, so two engines of 2 threads on 2 cores stall each other)
             "--cpu-threads", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self) -> bool:
        """Serving, and its metrics answer (Triton starts its metrics service a little after gRPC)."""
        with BayLingClient(self.grpc_url, retries=0, validate_max_tokens=False) as c:
            return c.health() and http_ok(self.metrics_url)

    def successes(self) -> float:
        """Requests the `bayling` model answered, by Triton's own count (settled: it updates every 2 s)."""
        return settled(lambda: metric(self.metrics_url, "nv_inference_request_success", model="bayling"))

    def kill(self) -> None:
        """SIGKILL of tritonserver and its model processes (as the OOM killer or a lost node would):
        no graceful shutdown, its connections reset; `bayling serve` then exits too."""
        tasks = Path(f"/proc/{self.process.pid}/task")
        children = {int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()}
        triton = [c for c in children if b"tritonserver" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert triton, "no tritonserver under bayling serve"
        for pid in triton:
            os.killpg(pid, signal.SIGKILL)          # its own process group: the stubs too
        self.process.wait(30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)          # bayling serve stops tritonserver cleanly
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)


@pytest.fixture(scope="module")
def servers(default_engine, tmp_path_factory):
    started = []
    try:
        for i in range(2):
            run_dir = tmp_path_factory.mktemp(f"balanced-{i}")
            started.append(Server(default_engine, run_dir, free_port(), free_port(), free_port()).start())
        for s in started:
            wait_until(s.ready, 300, f"server on {s.grpc_url} ready", interval=1)
        yield started
    finally:
        for s in started:
            s.stop()


def shares(servers: list[Server], before: list[float]) -> list[float]:
    return [s.successes() - b for s, b in zip(servers, before)]


def assert_even(split: list[float], total: int) -> None:
    assert sum(split) == total, f"{split}: the servers answered {sum(split)} of {total} requests"
    even = total / len(split)
    assert all(abs(n - even) <= 0.2 * even for n in split), f"{split} is not within 20% of {even:g} each"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_library_spreads_concurrent_requests_over_all_servers(servers, protocol):
    url = ",".join(s.grpc_url if protocol == "grpc" else f"http://{s.http_url}" for s in servers)
    before = [s.successes() for s in servers]
    with BayLingClient(url) as client:
        assert client.servers() == [s.grpc_url if protocol == "grpc" else s.http_url for s in servers]
        with ThreadPoolExecutor(REQUESTS) as pool:
            answers = list(pool.map(lambda i: client.chat(f"Say the number {i}.", **SHORT), range(REQUESTS)))
    assert all(a.completion_tokens == 4 or a.finish_reason == "stop" for a in answers)
    assert_even(shares(servers, before), REQUESTS)


def test_the_openai_gateway_spreads_requests_over_all_servers(servers):
    from openai import AsyncOpenAI

    port = free_port()
    gateway = bayling_process("openai", "--port", str(port), "--url", ",".join(s.grpc_url for s in servers))
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 60, "the gateway")
        before = [s.successes() for s in servers]

        async def ask_all():
            client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            async with client:
                return await asyncio.gather(*(client.chat.completions.create(
                    model="bayling", messages=[{"role": "user", "content": f"Say the number {i}."}],
                    max_tokens=4, temperature=0) for i in range(REQUESTS)))

        answers = asyncio.run(ask_all())
        assert all(a.choices[0].message.content is not None for a in answers)
        assert_even(shares(servers, before), REQUESTS)
    finally:
        stop_process(gateway)


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.2)


def test_a_killed_server_costs_only_its_started_streams_and_a_restarted_one_takes_traffic_again(servers):
    """Long streams on both servers, then SIGKILL of one's tritonserver: its streams that had started
    fail at once as UNAVAILABLE (their text cannot go on elsewhere), its requests still waiting for a
    first response move to the survivor, the survivor's streams go on; new requests all go to the
    survivor; restarted on the same ports, it gets half again. Each server's load is read from its own
    gauges (the CPU engine's, which the endpoint picker balances on). The asyncio client: a stream can
    be cancelled from outside, whether it streams or waits."""
    survivor, victim = servers
    gauge = lambda s, name: metric(s.metrics_url, name)  # noqa: E731

    async def scenario():
        client = AsyncBayLingClient(",".join(s.grpc_url for s in servers), retries=3, backoff=0.2)
        pieces = [0] * 8
        errors: dict[int, BayLingServerError] = {}

        async def drain(i: int) -> None:
            try:
                async with client.stream_chat(f"Tell me a long story about the number {i}.", max_tokens=2000,
                                              min_length=2000, temperature=0.0) as stream:
                    async for _ in stream:
                        pieces[i] += 1
            except BayLingServerError as exc:
                errors[i] = exc

        tasks = [asyncio.create_task(drain(i)) for i in range(len(pieces))]
        try:
            # 4 on each server (the fewest in flight), all in its engine, some generating
            await wait_for(lambda: [gauge(s, "bayling_requests_in_flight") for s in servers] == [4, 4], 120,
                           "4 requests on each server")
            await wait_for(lambda: all(gauge(s, "bayling_engine_waiting_requests")
                                       + gauge(s, "bayling_engine_running_requests") == 4 for s in servers), 60,
                           "the engines to hold the 4 requests each")

            def every_running_request_streams() -> bool:
                # a stream with pieces runs in its engine (none ends: min_length), so once as many streams
                # have pieces as the engines run, every running request has sent text, the victim's too
                running = [gauge(s, "bayling_engine_running_requests") for s in servers]
                return min(running) >= 1 and sum(map(bool, pieces)) >= sum(running)

            await wait_for(every_running_request_streams, 120, "streaming on both servers")
            assert all(gauge(s, "bayling_engine_kv_cache_utilization") > 0 for s in servers)
            assert all(0 < gauge(s, "bayling_engine_batch_occupancy") <= 1 for s in servers)
            victim.kill()
            at_kill = list(pieces)
            await wait_for(lambda: len(errors) >= 1, 30, "the victim's streams to fail")
            await asyncio.sleep(3)
            # only started streams failed, as UNAVAILABLE; every other request is now on the survivor
            assert 1 <= len(errors) <= 4, {i: str(e) for i, e in errors.items()}
            assert all(e.status == "UNAVAILABLE" for e in errors.values()), [str(e) for e in errors.values()]
            assert all(at_kill[i] > 0 for i in errors)
            alive = [i for i in range(len(pieces)) if i not in errors]
            assert not any(tasks[i].done() for i in alive)
            await wait_for(lambda: gauge(survivor, "bayling_requests_in_flight") == len(alive), 30,
                           "the moved requests on the survivor")
            streaming = [i for i in alive if at_kill[i]]
            await wait_for(lambda: all(pieces[i] > at_kill[i] for i in streaming), 60, "the survivor's streams")
            for i in alive:
                tasks[i].cancel()                                 # cancels them on the survivor
            await asyncio.gather(*tasks, return_exceptions=True)
            await wait_for(lambda: gauge(survivor, "bayling_requests_in_flight") == 0, 60, "the cancelled streams")

            # new requests all go to the survivor, none fails (the dead address is skipped, or retried elsewhere)
            before = await asyncio.to_thread(survivor.successes)
            answers = await asyncio.gather(*(client.chat(f"Say the number {i}.", **SHORT) for i in range(16)))
            assert all(a.completion_tokens for a in answers)
            assert await asyncio.to_thread(survivor.successes) - before == 16

            # the same ports again: the restarted server gets its share once it is ready
            victim.start()
            await wait_for(victim.ready, 300, "the restarted server")
            back = await asyncio.to_thread(victim.successes)
            started = time.monotonic()
            while await asyncio.to_thread(metric, victim.metrics_url, "nv_inference_request_success",
                                          model="bayling") == back:
                await client.chat("Say hi.", **SHORT)              # the client tries it again after its skip
                assert time.monotonic() - started < 4 * MAX_DOWN_S + 10, "the restarted server got no request"
                await asyncio.sleep(0.5)
            before = [await asyncio.to_thread(s.successes) for s in servers]
            await asyncio.gather(*(client.chat(f"Say the number {i}.", **SHORT) for i in range(REQUESTS)))
            assert_even(await asyncio.to_thread(shares, servers, before), REQUESTS)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()

    asyncio.run(scenario())
