"""`bayling demo` (what `make chat` runs): serve the default engine, chat, stop the server."""

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.cpu_engine]


def test_demo_serves_chats_and_stops(default_engine):
    run = subprocess.run([sys.executable, "-m", "bayling.cli", "demo", "--temperature", "0"],
                         input="Name the capital of France.\n\n", capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout and "answer tokens" in run.stdout
    assert "BayLing is being served" in run.stderr
    grpc = run.stderr.split("gRPC", 1)[1].split()[0]
    leftover = subprocess.run(["pgrep", "-f", f"grpc-port={grpc.rsplit(':', 1)[1]}"], capture_output=True, text=True)
    assert leftover.stdout == "", "tritonserver still running after the chat ended"
