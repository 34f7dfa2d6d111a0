"""Health that tells the truth: watch a running tritonserver's model processes and its engine.

Triton 2.51 does not notice when a Python model's stub process dies: health stays 200 while every
request to that model fails ("Stub process ... is not healthy") and in-flight clients hang. Nor do
its health endpoints ask whether the engine can still generate. So `bayling serve` runs this:

- every second, each Python model must still have all its stub processes (as many as its
  `instance_group` count; they are tritonserver's children). One missing is fatal: the server is
  killed at once, so that in-flight clients get an error instead of a hang, and `bayling serve`
  exits non-zero for Kubernetes or a supervisor to replace it;
- every `probe_every_s`, a one-token generation from `tensorrt_llm` over gRPC; while it fails, the
  server is not ready (the HTTP front answers 503 on /v2/health/ready); failing for `dead_after_s`,
  it is not live either, and that is fatal too.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    ready: bool = True
    live: bool = True
    why: str = ""
    fatal: str = ""                 # why the server was stopped, if it was


def python_models(repository: Path) -> dict[str, int]:
    """Python models of a rendered repository and their stub counts (instance_group counts)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    counts = {}
    for config_path in sorted(repository.glob("*/config.pbtxt")):
        config = text_format.Parse(config_path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
        if config.backend == "python":
            counts[config_path.parent.name] = sum(g.count or 1 for g in config.instance_group) or 1
    return counts


def stub_counts(server_pid: int) -> dict[str, int]:
    """Live stub processes of tritonserver `server_pid`, by model (from their command lines)."""
    counts: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[1]) != server_pid or fields[0] == b"Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for arg in args:
            if arg.endswith(b"/1/model.py"):
                model = Path(arg.decode()).parent.parent.name
                counts[model] = counts.get(model, 0) + 1
    return counts


def generation_probe(grpc_url: str, timeout: float) -> None:
    """One token from `tensorrt_llm` (token id 0, no end id); raises on an error or no answer in time."""
    import tritonclient.grpc as grpcclient

    from bayling import contract

    values = {"input_ids": [0], "input_lengths": 1, "request_output_len": 1, "end_id": -1, "streaming": False}
    inputs = []
    for name, array in contract.request_arrays(contract.ENGINE_MODEL, values).items():
        tensor = grpcclient.InferInput(name, list(array.shape), contract.tensor(contract.ENGINE_MODEL, name).wire_dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        client.start_stream(callback=lambda result, error: answers.put(error), stream_timeout=timeout)
        client.async_stream_infer(contract.ENGINE_MODEL, inputs)
        error = answers.get(timeout=timeout)
        if error is not None:
            raise RuntimeError(error.message() if hasattr(error, "message") else str(error))
    except queue.Empty:
        raise TimeoutError(f"the engine gave no token within {timeout:g} s") from None
    finally:
        try:
            client.stop_stream(cancel_requests=True)
        finally:
            client.close()


@dataclass
class Supervisor:
    server_pid: int
    models: dict[str, int]                          # Python model -> stub processes it must keep
    probe: Callable[[], None]                       # raises when the engine cannot generate
    kill: Callable[[], None]                        # stops the server at once
    interval_s: float = 1.0
    probe_every_s: float = 15.0
    dead_after_s: float = 300.0
    verdict: Verdict = field(default_factory=Verdict)

    def __post_init__(self):
        self._stop = threading.Event()
        self._fatal_once = threading.Lock()
        # Two threads: a probe may wait up to its timeout, and must not delay the check of the stubs.
        self._threads = [threading.Thread(target=self._watch_stubs, name="supervisor-stubs", daemon=True),
                         threading.Thread(target=self._watch_engine, name="supervisor-engine", daemon=True)]

    def start(self) -> "Supervisor":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._threads[0].join(10)

    def health(self) -> tuple[bool, bool, str]:
        v = self.verdict
        return v.ready, v.live, v.why

    def _watch_stubs(self) -> None:
        while not self._stop.wait(self.interval_s):
            missing = self.missing_stubs()
            if missing:
                self._fatal(missing)

    def _watch_engine(self) -> None:
        failing_since, wait = None, self.interval_s
        while not self._stop.wait(wait):
            wait = self.probe_every_s
            try:
                self.probe()
                failing_since, why = None, ""
            except Exception as exc:  # noqa: BLE001 - any failure means: cannot generate now
                failing_since, why = failing_since or time.monotonic(), f"the engine cannot generate: {exc}"
            if self._stop.is_set():   # stopped or fatal while probing: the verdict stays as it is
                return
            self.verdict.ready, self.verdict.why = not why, why
            if why:
                log.warning("%s", why)
                if time.monotonic() - failing_since > self.dead_after_s:
                    self._fatal(f"{why} (for {self.dead_after_s:.0f} s)")

    def missing_stubs(self) -> str:
        alive = stub_counts(self.server_pid)
        dead = [f"{model} ({alive.get(model, 0)} of {n} processes left)"
                for model, n in self.models.items() if alive.get(model, 0) < n]
        return "a model process died: " + ", ".join(dead) if dead else ""

    def _fatal(self, why: str) -> None:
        with self._fatal_once:
            if self._stop.is_set():
                return
            self._stop.set()
            self.verdict = Verdict(ready=False, live=False, why=why, fatal=why)
        log.error("stopping the server: %s", why)
        self.kill()
