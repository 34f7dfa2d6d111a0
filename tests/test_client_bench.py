"""`bayling bench` against the real server: every protocol and level measured, numbers that add up."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_bench_reports_ttft_itl_and_throughput_for_grpc_http_and_the_gateway(default_server, tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "bayling.cli", "bench", "--url", default_server.grpc,
                           "--http-url", default_server.http, "--concurrency", "1,2", "--requests", "2",
                           "--max-tokens", "6", "--json", str(out), "--markdown"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["results"]
    assert [(r["protocol"], r["concurrency"]) for r in results] == \
           [(p, c) for p in ("grpc", "http", "openai") for c in (1, 2)]
    for r in results:
        assert r["completed"] == 2 and r["errors"] == 0
        assert 0 < r["ttft_ms_mean"] < 1000 * r["latency_s_mean"]
        assert 0 < r["itl_ms_mean"] < 1000 * r["latency_s_mean"]
        assert r["output_tokens_per_s"] > 0 and r["requests_per_s"] > 0
        # every request generated exactly --max-tokens tokens
        assert r["output_tokens_per_s"] == pytest.approx(6 * r["requests_per_s"], rel=0.01)
    table = done.stdout.strip().splitlines()
    assert table[0].startswith("| protocol | concurrency | requests | TTFT mean ms")
    assert len(table) == 2 + 6


def test_bench_refuses_bad_options():
    done = subprocess.run([sys.executable, "-m", "bayling.cli", "bench", "--protocols", "grpc,smoke"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "unknown protocol(s): smoke" in done.stderr
