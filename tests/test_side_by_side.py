"""benchmarks/side_by_side.py's own arithmetic: the server CPU it charges (benchmarks/proc_tree.py), and its
round-by-round ratios."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))    # as when they run as scripts
import proc_tree  # noqa: E402
import side_by_side  # noqa: E402


def row(server: str, round_no: int, tok_s: float, ttft: float = 100.0, cpu: float = 10.0, engine: float | None = None):
    # a peer's engine is its whole server; bayling's is the tensorrt_llm stub, part of it
    engine = (8.0 if server == "bayling" else cpu) if engine is None else engine
    return side_by_side.Row(server, server, round_no, 16, tok_s, ttft, ttft, 0, cpu, engine)


def test_bayling_is_compared_with_the_best_peer_of_the_same_round():
    rows = [row("bayling", 1, 100), row("llama.cpp", 1, 125), row("vllm", 1, 80),
            row("bayling", 2, 110, ttft=300), row("llama.cpp", 2, 100), row("vllm", 2, 90),
            row("bayling", 3, 90, ttft=200, cpu=12, engine=8.5), row("llama.cpp", 3, 100), row("vllm", 3, 95)]
    table = side_by_side.medians(rows)
    bayling = next(line for line in table if line.startswith("| bayling |"))
    # medians: tok/s 100, TTFT 200 ms, CPU 10 ms a token, of which 2 outside the engine (2, 2, 3.5)
    assert bayling == "| bayling | 16 | 100.0 | 200.0 | 10.0 | 2.0 | 0.80, 1.10, 0.90 |"
    assert next(line for line in table if line.startswith("| vllm |")) == "| vllm | 16 | 90.0 | 100.0 | 10.0 | 0.0 | - |"


def test_the_cpu_of_a_server_s_child_processes_is_counted():
    child = subprocess.Popen([sys.executable, "-c", "import time\nwhile time.process_time() < 0.5: pass\n"
                              "print('busy', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "busy"
        assert child.pid in proc_tree.tree_pids([os.getpid()])
        assert proc_tree.tree_cpu_seconds([child.pid]) == pytest.approx(0.5, abs=0.2)
        assert proc_tree.tree_cpu_seconds([os.getpid()]) >= proc_tree.tree_cpu_seconds([child.pid])
    finally:
        child.kill()
        child.wait()


def test_the_engine_s_stub_is_found_by_the_model_it_serves(tmp_path):
    script = tmp_path / "tensorrt_llm" / "1" / "model.py"      # a stub's argument, as Triton starts it
    stub = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(script)])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 10
        while proc_tree.stub_model(stub.pid) is None and time.monotonic() < deadline:
            time.sleep(0.05)      # until the child has exec'd
        # rooted at the children themselves: the suite's own servers are children of this process too
        assert proc_tree.stub_pids([stub.pid, other.pid], "tensorrt_llm") == [stub.pid]
        assert proc_tree.stub_pids([stub.pid, other.pid], "bayling") == []
        assert stub.pid in proc_tree.stub_pids([os.getpid()], "tensorrt_llm")
        assert proc_tree.role(other.pid, os.getpid()) == "other"
        assert proc_tree.role(stub.pid, os.getpid()) == "tensorrt_llm"
    finally:
        for child in (stub, other):
            child.kill()
            child.wait()
