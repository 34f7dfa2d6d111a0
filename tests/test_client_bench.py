"""`bayling bench` against the real server: every protocol and level measured, numbers that add up."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bayling.client.bench import PROMPT, Workload, percentile, poisson_starts


@pytest.mark.e2e
def test_bench_reports_ttft_itl_and_throughput_for_grpc_http_and_the_gateway(default_server, tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "bayling.cli", "bench", "--url", default_server.grpc,
                           "--http-url", default_server.http, "--concurrency", "1,2", "--requests", "2",
                           "--max-tokens", "6", "--json", str(out), "--markdown"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["results"]
    assert [(r["protocol"], r["arrival"], r["level"]) for r in results] == \
           [(p, "closed", c) for p in ("grpc", "http", "openai") for c in (1, 2)]
    for r in results:
        assert r["completed"] == 2 and r["errors"] == 0
        assert 0 < r["ttft_ms_mean"] < 1000 * r["latency_s_mean"]
        assert 0 < r["ttft_ms_p50"] <= r["ttft_ms_p90"] <= r["ttft_ms_p99"] < 1000 * r["latency_s_mean"] * 2
        assert 0 < r["itl_ms_mean"] < 1000 * r["latency_s_mean"]
        assert r["output_tokens_per_s"] > 0 and r["requests_per_s"] > 0
        # every request generated exactly --max-tokens tokens
        assert r["output_tokens_per_s"] == pytest.approx(6 * r["requests_per_s"], rel=0.01)
    table = done.stdout.strip().splitlines()
    assert table[0].startswith("| protocol | load | requests | TTFT mean ms | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms")
    assert len(table) == 2 + 6


@pytest.mark.e2e
def test_bench_poisson_arrivals_with_min_tokens_and_a_repetition_penalty(default_server, tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "bayling.cli", "bench", "--url", default_server.grpc,
                           "--protocols", "grpc,openai", "--arrival", "poisson", "--rate", "20", "--requests", "5",
                           "--max-tokens", "5", "--min-tokens", "5", "--repetition-penalty", "1.1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["workload"] == {"max_tokens": 5, "min_tokens": 5, "repetition_penalty": 1.1, "prompt_words": 0}
    for r in report["results"]:
        assert (r["arrival"], r["load"], r["completed"], r["errors"]) == ("poisson", "20/s", 5, 0)
        assert r["output_tokens_per_s"] == pytest.approx(5 * r["requests_per_s"], rel=0.01)
    assert "20/s" in done.stdout


@pytest.mark.parametrize("argv, reason", [
    (["--protocols", "grpc,smoke"], "unknown protocol(s): smoke"),
    (["--arrival", "poisson"], "--arrival poisson needs --rate"),
    (["--arrival", "poisson", "--rate", "1,x"], "--rate must be numbers like 1,4,16, got '1,x'"),
    (["--concurrency", "0"], "--concurrency must be positive"),
    (["--max-tokens", "8", "--min-tokens", "9"], "--min-tokens must be between 0 and --max-tokens, got 9"),
])
def test_bench_refuses_bad_options(argv, reason):
    done = subprocess.run([sys.executable, "-m", "bayling.cli", "bench", *argv],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and reason in done.stderr, done.stderr


def test_percentiles_interpolate_and_poisson_gaps_have_the_asked_mean():
    assert [percentile([4.0, 1.0, 3.0, 2.0], p) for p in (0, 50, 90, 100)] == pytest.approx([1, 2.5, 3.7, 4])
    starts = poisson_starts(rate=4.0, requests=4001, seed=1)
    assert starts[0] == 0 and starts == sorted(starts)
    assert starts[-1] / 4000 == pytest.approx(0.25, rel=0.05)     # mean gap 1/rate
    assert poisson_starts(4.0, 10, seed=1) == starts[:10]          # the seed fixes the schedule


def test_workload_sends_min_tokens_and_repetition_penalty_only_when_asked():
    plain = Workload(max_tokens=16)
    assert plain.bayling_params() == {"max_tokens": 16, "end_id": -1, "temperature": 0.0}
    assert "min_tokens" not in plain.openai_body("m", 0) and "repetition_penalty" not in plain.openai_body("m", 0)
    both = Workload(max_tokens=16, min_tokens=16, repetition_penalty=1.1, prompt_words=40)
    assert both.bayling_params()["min_length"] == 16 and both.bayling_params()["repetition_penalty"] == 1.1
    body = both.openai_body("m", 3)
    assert body["min_tokens"] == 16 and body["ignore_eos"] is True
    assert len(body["messages"][0]["content"].split()) == 40 + len(PROMPT.format(i=3).split())
