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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from bayling.client import BayLingClient, BayLingServerError
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
        log = open(self.run_dir / "serve.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bayling.cli", "serve", "--engine", str(self.engine), "--http-port", str(self.http),
             "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), "--run-dir", str(self.run_dir),
             "--log-file", str(self.run_dir / "tritonserver.log")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def ready(self) -> bool:
        with BayLingClient(self.grpc_url, retries=0, validate_max_tokens=False) as c:
            return c.health()

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
            self.process.send_signal(signal.SIGINT)
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


def test_a_killed_server_costs_only_its_in_flight_requests_and_a_restarted_one_takes_traffic_again(servers):
    survivor, victim = servers
    client = BayLingClient(",".join(s.grpc_url for s in servers), retries=3, backoff=0.2)
    long = dict(max_tokens=2000, min_length=2000, temperature=0.0)     # still running when we look
    streams = [client.stream_chat(f"Tell me a long story about the number {i}.", **long) for i in range(8)]
    pieces = [0] * len(streams)
    started = [threading.Event() for _ in streams]
    errors: dict[int, BayLingServerError] = {}
    enough = threading.Event()

    def drain(i: int) -> None:
        try:
            with streams[i]:                                      # leaving it cancels on the server
                for _ in streams[i]:
                    pieces[i] += 1
                    started[i].set()
                    if enough.is_set():
                        break
        except BayLingServerError as exc:
            errors[i] = exc
        finally:
            started[i].set()

    pool = ThreadPoolExecutor(len(streams))
    try:
        drained = [pool.submit(drain, i) for i in range(len(streams))]
        # 4 on each server (the fewest in flight); kill once most are streaming (a late one may wait
        # for a batch: it is in flight all the same)
        wait_until(lambda: sum(e.is_set() for e in started) >= 6, 120, "the streams to start")
        assert not errors
        victim.kill()
        at_kill = list(pieces)
        # the victim's streams fail cleanly (UNAVAILABLE, at once); the survivor's go on streaming
        wait_until(lambda: len(errors) >= len(streams) // 2, 30, "the victim's streams to fail")
        time.sleep(3)
        assert len(errors) == len(streams) // 2, {i: str(e) for i, e in errors.items()}
        assert all(e.status == "UNAVAILABLE" for e in errors.values()), [str(e) for e in errors.values()]
        alive = [i for i in range(len(streams)) if i not in errors]
        assert all(pieces[i] > at_kill[i] for i in alive if at_kill[i]), "a survivor's stream stalled"
        assert not any(drained[i].done() for i in alive)

        enough.set()                                              # the survivor's streams are cancelled
        for f in drained:
            f.result(timeout=180)
        assert len(errors) == len(streams) // 2

        # new requests all go to the survivor, none fails (the dead address is skipped, or retried elsewhere)
        before = survivor.successes()
        with ThreadPoolExecutor(16) as many:
            answers = list(many.map(lambda i: client.chat(f"Say the number {i}.", **SHORT), range(16)))
        assert all(a.completion_tokens for a in answers)
        assert survivor.successes() - before == 16

        # the same ports again: the restarted server gets its share once it is ready
        victim.start()
        wait_until(victim.ready, 300, "the restarted server", interval=1)
        time.sleep(MAX_DOWN_S + 0.5)                              # past the longest skip of a failed address
        before = [s.successes() for s in servers]
        with ThreadPoolExecutor(REQUESTS) as many:
            list(many.map(lambda i: client.chat(f"Say the number {i}.", **SHORT), range(REQUESTS)))
        assert_even(shares(servers, before), REQUESTS)
    finally:
        enough.set()
        pool.shutdown(wait=True)
        client.close()
