"""Helpers of the client tests: server metrics, a terminal session, subprocesses on free ports."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
PROMPT = r"You\S*> "        # the chat prompt, with rich's colour codes around "You"
ROOT = Path(__file__).resolve().parent.parent


def plain(text: str) -> str:
    """Terminal output without colour and cursor codes."""
    return ANSI.sub("", text)


def metric(metrics_url: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric over the series that carry all `labels`."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def settled(read, pause: float = 1.5, timeout: float = 30) -> float:
    """A counter's value once it stopped changing for `pause` seconds."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(pause)
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError("the counter kept changing")


def bayling_process(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """`python -m bayling.cli ARGS` in the background, its output in a pipe."""
    return subprocess.Popen([sys.executable, "-m", "bayling.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}, **kwargs)


def stop_process(process: subprocess.Popen, timeout: float = 15) -> str:
    """Terminate (then kill) a process started by a test; returns what it printed."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.stdout.read() if process.stdout else ""


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class TcpForwarder:
    """Forwards a local port to `target` (host:port) once started: a server that comes up late."""

    def __init__(self, target: str, port: int):
        host, _, target_port = target.rpartition(":")
        self.target = (host, int(target_port))
        self.port = port
        self._listener: socket.socket | None = None

    def start(self) -> "TcpForwarder":
        import threading

        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        if self._listener:
            self._listener.close()


class Collector:
    """The emissions one engine request's sink receives."""

    def __init__(self):
        self.emissions, self.done = [], threading.Event()

    def __call__(self, emission):
        self.emissions.append(emission)
        if emission.final:
            self.done.set()

    @property
    def tokens(self):
        return [t for e in self.emissions for t in e.token_ids]

    def wait(self):
        assert self.done.wait(60), "no final response"
        return self
