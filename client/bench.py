"""Measure a BayLing server as its clients see it: time to first token (TTFT), inter-token latency
(ITL = (request latency - TTFT) / (output tokens - 1)), output tokens/s and requests/s, at several
concurrency levels, over gRPC, HTTP and the OpenAI-compatible gateway side by side.

Every request streams and generates exactly --max-tokens tokens (end_id -1, TensorRT-LLM's "no
end token"; the gateway's ignore_eos), so the protocols do the same work. Each level runs --requests requests
(default: 2 x concurrency, at least 8) after one warm-up request. Without --openai-url the
benchmark starts a gateway (`bayling openai`, its own process) in front of --url.

examples:
  bayling bench --url localhost:8001 --http-url localhost:8000
  bayling bench --url localhost:8001 --http-url localhost:8000 --concurrency 1,4,16 --max-tokens 64 --json bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

from bayling.errors import BaylingError

PROMPT = "Write a long story about a lighthouse keeper and the sea. Story number {i}:"


@dataclass
class Sample:
    ttft: float          # seconds to the first text piece
    latency: float       # seconds to the end of the answer
    tokens: int          # output tokens


@dataclass
class Level:
    protocol: str
    concurrency: int
    requests: int
    wall_s: float
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ttft_ms(self) -> float:
        return 1000 * statistics.mean(s.ttft for s in self.samples)

    @property
    def ttft_p50_ms(self) -> float:
        return 1000 * statistics.median(s.ttft for s in self.samples)

    @property
    def itl_ms(self) -> float:
        values = [(s.latency - s.ttft) / (s.tokens - 1) for s in self.samples if s.tokens > 1]
        return 1000 * statistics.mean(values) if values else float("nan")

    @property
    def latency_s(self) -> float:
        return statistics.mean(s.latency for s in self.samples)

    @property
    def output_tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return len(self.samples) / self.wall_s

    def summary(self) -> dict:
        done = bool(self.samples)
        return {"protocol": self.protocol, "concurrency": self.concurrency, "requests": self.requests,
                "completed": len(self.samples), "errors": len(self.errors),
                "ttft_ms_mean": round(self.ttft_ms, 1) if done else None,
                "ttft_ms_p50": round(self.ttft_p50_ms, 1) if done else None,
                "itl_ms_mean": round(self.itl_ms, 2) if done else None,
                "latency_s_mean": round(self.latency_s, 3) if done else None,
                "output_tokens_per_s": round(self.output_tokens_per_s, 1) if done else None,
                "requests_per_s": round(self.requests_per_s, 3) if done else None}


# --- one streamed request per protocol -----------------------------------------------------------

async def bayling_request(client, i: int, max_tokens: int) -> Sample:
    start = time.perf_counter()
    first = None
    async with client.stream_chat(PROMPT.format(i=i), max_tokens=max_tokens, end_id=-1,
                                  temperature=0.0) as stream:
        async for _ in stream:
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    if stream.result is None:
        raise BaylingError("the stream ended without an answer")
    return Sample(ttft=(first or end) - start, latency=end - start, tokens=stream.result.completion_tokens)


async def openai_request(http, base: str, model: str, i: int, max_tokens: int) -> Sample:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT.format(i=i)}], "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = None
    async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise BaylingError(f"gateway answered {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise BaylingError(chunk["error"].get("message", "gateway error"))
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    if tokens is None:
        raise BaylingError("the gateway sent no usage")
    return Sample(ttft=(first or end) - start, latency=end - start, tokens=tokens)


async def run_level(protocol: str, request, concurrency: int, requests: int) -> Level:
    """`requests` requests, `concurrency` at a time; `request(i)` returns a Sample."""
    level = Level(protocol, concurrency, requests, 0.0)
    counter = iter(range(requests))

    async def worker():
        for i in counter:
            try:
                level.samples.append(await request(i))
            except Exception as exc:   # noqa: BLE001 - a benchmark reports failures and goes on
                level.errors.append(f"{type(exc).__name__}: {exc}")

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    level.wall_s = time.perf_counter() - start
    return level


# --- the gateway process ------------------------------------------------------------------------

def start_gateway(url: str):
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "bayling.cli", "openai", "--url", url, "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BaylingError("the OpenAI gateway did not start")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return process, base
        except OSError:
            time.sleep(0.3)
    process.terminate()
    raise BaylingError("the OpenAI gateway did not answer within 60 s")


# --- the command --------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="localhost:8001", help="gRPC host:port of the server (default localhost:8001)")
    parser.add_argument("--http-url", help="HTTP host:port of the same server (default: HTTP not measured)")
    parser.add_argument("--openai-url", help="a running gateway, e.g. http://localhost:9000 (default: start one)")
    parser.add_argument("--protocols", default="grpc,http,openai", help="which to measure (default grpc,http,openai)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default 1,4,16)")
    parser.add_argument("--requests", type=int, help="requests per level (default: 2 x concurrency, at least 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default 64)")
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")


async def measure(args: argparse.Namespace, protocols: list[str], levels: list[int], openai_base: str | None,
                  report) -> list[Level]:
    import httpx

    from bayling.client.aio import AsyncBayLingClient

    results: list[Level] = []
    for protocol in protocols:
        if protocol == "openai":
            http = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64))
            model = (await http.get(f"{openai_base}/v1/models")).json()["data"][0]["id"]

            async def request(i, http=http, model=model):
                return await openai_request(http, openai_base, model, i, args.max_tokens)

            close = http.aclose
        else:
            client = AsyncBayLingClient(args.url if protocol == "grpc" else f"http://{args.http_url}", timeout=600)

            async def request(i, client=client):
                return await bayling_request(client, i, args.max_tokens)

            close = client.close
        try:
            await request(10_000)                                   # warm-up (connections, first batch)
            for concurrency in levels:
                n = args.requests or max(8, 2 * concurrency)
                level = await run_level(protocol, request, concurrency, n)
                results.append(level)
                report(level)
        finally:
            await close()
    return results


COLUMNS = ("protocol", "concurrency", "requests", "TTFT mean ms", "TTFT p50 ms", "ITL mean ms", "latency mean s",
           "output tok/s", "req/s", "errors")


def rows(results: list[Level]) -> list[list[str]]:
    out = []
    for level in results:
        s = level.summary()
        out.append([s["protocol"], str(s["concurrency"]), str(s["requests"]),
                    *(f"{s[k]}" if s[k] is not None else "-" for k in
                      ("ttft_ms_mean", "ttft_ms_p50", "itl_ms_mean", "latency_s_mean", "output_tokens_per_s",
                       "requests_per_s")), str(s["errors"])])
    return out


def table(results: list[Level], max_tokens: int):
    from rich.table import Table

    t = Table(title=f"BayLing streaming benchmark ({max_tokens} output tokens per request)")
    for name in COLUMNS:
        t.add_column(name, justify="left" if name == "protocol" else "right")
    for row in rows(results):
        t.add_row(*row)
    return t


def markdown(results: list[Level]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows(results)])


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    unknown = set(protocols) - {"grpc", "http", "openai"}
    if unknown:
        raise BaylingError(f"unknown protocol(s): {', '.join(sorted(unknown))}")
    if "http" in protocols and not args.http_url:
        print("no --http-url: HTTP is not measured", file=sys.stderr)
        protocols.remove("http")
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise BaylingError(f"--concurrency must be numbers like 1,4,16, got {args.concurrency!r}") from None
    if args.max_tokens < 2:
        raise BaylingError("--max-tokens must be at least 2 (ITL needs two tokens)")
    console = Console(stderr=True)
    gateway = None
    openai_base = args.openai_url.rstrip("/") if args.openai_url else None
    if "openai" in protocols and not openai_base:
        gateway, openai_base = start_gateway(args.url)
    try:
        def report(level: Level) -> None:
            s = level.summary()
            console.print(f"{s['protocol']:>6} c={s['concurrency']:<3} {s['completed']}/{s['requests']} ok, "
                          f"TTFT {s['ttft_ms_mean']} ms, ITL {s['itl_ms_mean']} ms, "
                          f"{s['output_tokens_per_s']} tok/s, {s['requests_per_s']} req/s", highlight=False)
            for error in level.errors[:3]:
                console.print(f"  error: {error}", highlight=False, markup=False)

        results = asyncio.run(measure(args, protocols, levels, openai_base, report))
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
    if args.markdown:
        print(markdown(results))
    else:
        out = Console()
        if not out.is_terminal:
            out = Console(width=140)
        out.print(table(results, args.max_tokens))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump({"max_tokens": args.max_tokens, "results": [r.summary() for r in results],
                       "samples": {f"{r.protocol}@{r.concurrency}": [asdict(s) for s in r.samples] for r in results}},
                      f, indent=2)
    return 1 if any(r.errors for r in results) else 0
