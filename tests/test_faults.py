"""Faults: many long streams and their cancellation, a model process killed mid-stream. Each test
starts its own real server (they break or load it on purpose)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import tritonclient.grpc as grpcclient

from bayling.model_repository.render import RenderOptions
from bayling.model_repository.serve import ServeOptions, start_server
from bayling.model_repository.supervisor import stub_counts
from bayling.model_repository.server import free_port
from tests.client_helpers import metric, settled
from tests.triton_helpers import chat, grpc_inputs, grpc_stream

pytestmark = [pytest.mark.e2e, pytest.mark.cpu_engine]
LONG = chat("Tell me a very long story.", max_tokens=400, end_id=-1, stream=True, temperature=0.0)


class OpenStream:
    """One streamed request kept open: `first` is set at its first piece, `error` when it fails."""

    def __init__(self, url: str, values: dict):
        self.first, self.ended = threading.Event(), threading.Event()
        self.error = None
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=self._on_response, headers={"triton_grpc_error": "true"})
        self.client.async_stream_infer("bayling", grpc_inputs("bayling", values), enable_empty_final_response=True)

    def _on_response(self, result, error):
        if error is not None:
            self.error = error
            self.ended.set()
            return
        self.first.set()
        if result.get_response().parameters["triton_final_response"].bool_param:
            self.ended.set()

    closed = False

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            self.client.stop_stream(cancel_requests=True)
        finally:
            self.client.close()


def test_many_long_streams_make_progress_and_all_cancel(default_engine, tmp_path):
    """50 long streams wedged the Python backend's 32-thread pool: none got a first piece within 60 s,
    and every later request hung. The pool is now sized from --max-concurrency: its default, 64, holds."""
    server = start_server(ServeOptions(default_engine, 0, 0, 0, run_dir=tmp_path, log_file=tmp_path / "triton.log"))
    streams = []
    try:
        streams = [OpenStream(server.grpc_url, LONG) for _ in range(server.max_concurrency)]
        batch = 16                         # the CPU engine's batch: the first 16 start at once, the rest queue
        deadline = time.monotonic() + 45
        while sum(s.first.is_set() for s in streams) < batch and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sum(s.first.is_set() for s in streams) >= batch, "the streams made no progress"
        assert not any(s.error for s in streams)
        close_all(streams)
        generated = lambda: metric(server.metrics_url, "bayling_engine_generated_tokens_total")  # noqa: E731
        settled(generated)                                    # the engine stops for all of them
        ok = grpc_stream(server.grpc_url, chat("Say hi.", max_tokens=4, temperature=0.0), timeout=30)
        assert ok.error is None and ok.text
    finally:
        close_all(streams)
        server.stop()


def close_all(streams: list[OpenStream]) -> None:
    """Cancel every stream, without hanging on one that the server no longer answers."""
    threads = [threading.Thread(target=s.close, daemon=True) for s in streams if not s.closed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)


def serve_process(engine, tmp_path) -> tuple[subprocess.Popen, str]:
    grpc, http = free_port(), free_port()
    process = subprocess.Popen([sys.executable, "-m", "bayling.cli", "serve", "--engine", str(engine),
                                "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(free_port()),
                                "--run-dir", str(tmp_path / "run"), "--log-file", str(tmp_path / "triton.log")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2):
                return process, f"127.0.0.1:{grpc}"
        except OSError:
            assert process.poll() is None, process.communicate()[1]
            time.sleep(0.5)
    process.kill()
    raise AssertionError("bayling serve did not get ready")


def server_pid(serve: subprocess.Popen) -> int:
    children = open(f"/proc/{serve.pid}/task/{serve.pid}/children").read().split()
    return int(children[0])


@pytest.mark.parametrize("model", ["tensorrt_llm", "bayling"])
def test_a_killed_model_process_fails_clients_at_once_and_the_server_exits(default_engine, tmp_path, model):
    """A SIGKILLed stub left health at 200, clients hanging and every new request failing, for ever."""
    serve, url = serve_process(default_engine, tmp_path)
    streams = []
    try:
        streams = [OpenStream(url, LONG) for _ in range(8)]
        assert all(s.first.wait(60) for s in streams)
        triton = server_pid(serve)
        stubs = stub_pids(triton, model)
        assert stubs and stub_counts(triton)[model] == len(stubs)
        killed = time.monotonic()
        os.kill(stubs[0], signal.SIGKILL)
        for s in streams:
            if not s.ended.wait(15):
                serve.kill()
                pytest.fail(f"a client still waits 15 s after the model process died; bayling serve said: "
                            f"{serve.communicate()[1][-2000:]}")
            assert s.error is not None
        code = serve.wait(30)       # (raises if it does not exit)
        assert code != 0 and time.monotonic() - killed < 30
        assert f"a model process died: {model}" in serve.stderr.read()
    finally:
        close_all(streams)
        if serve.poll() is None:
            serve.kill()


def _is_stub_of(pid: int, parent: int, model: str = "") -> bool:
    """`pid` is a Python backend stub of tritonserver `parent` (of `model`, or of any model)."""
    try:
        stat = open(f"/proc/{pid}/stat", "rb").read().rsplit(b")", 1)[1].split()
        return int(stat[1]) == parent and f"{model}/1/model.py".encode() in open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return False


def test_python_models_are_found_with_their_instance_counts(default_engine, tmp_path):
    from bayling.model_repository.render import render_repository
    from bayling.model_repository.supervisor import python_models

    repo = render_repository(default_engine, tmp_path / "repo", RenderOptions(entry_instances=2))
    assert python_models(repo) == {"bayling": 2, "tensorrt_llm_bls": 2, "postprocessing": 1, "preprocessing": 1,
                                   "tensorrt_llm": 1}


def test_no_model_process_outlives_a_killed_tritonserver(default_engine, tmp_path):
    """A stub whose metrics thread was mid-call when tritonserver died never exited (the backend's own
    parent check deadlocked), keeping about 1 GB each: every stub now ends within seconds."""
    server = start_server(ServeOptions(default_engine, 0, 0, 0, run_dir=tmp_path, log_file=tmp_path / "triton.log"))
    streams = []
    try:
        streams = [OpenStream(server.grpc_url, LONG) for _ in range(8)]
        assert all(s.first.wait(60) for s in streams)
        server.supervisor.stop()                  # (it would kill the process group: leave it to the stubs)
        stubs = stub_pids(server.process.pid)
        assert len(stubs) == 5
        server.process.kill()                     # tritonserver alone, mid-stream
        server.process.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in stubs) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in stubs if _alive(p)], "model processes outlived tritonserver"
    finally:
        close_all(streams)
        server.stop()


def stub_pids(server: int, model: str = "") -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_stub_of(int(p), server, model)]


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat", "rb").read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_the_engine_probe_sets_readiness_and_a_long_failure_stops_the_server():
    """The probe's verdict, in its own thread: failing -> not ready (why given), working again -> ready,
    failing past dead_after_s -> fatal, the server killed once."""
    from bayling.model_repository.supervisor import Supervisor

    failing, killed = threading.Event(), []
    failing.set()

    def probe():
        if failing.is_set():
            raise RuntimeError("no token")

    supervisor = Supervisor(os.getpid(), {}, probe, lambda: killed.append(1),
                            interval_s=0.05, probe_every_s=0.05, dead_after_s=60).start()
    try:
        wait_for = lambda check: any(check() or time.sleep(0.05) for _ in range(100))  # noqa: E731
        assert wait_for(lambda: supervisor.health() == (False, True, "the engine cannot generate: no token"))
        failing.clear()
        assert wait_for(lambda: supervisor.health() == (True, True, ""))
        supervisor.dead_after_s = 0.2
        failing.set()
        assert wait_for(lambda: supervisor.verdict.fatal)
        assert supervisor.health()[:2] == (False, False) and killed == [1]
    finally:
        supervisor.stop()
