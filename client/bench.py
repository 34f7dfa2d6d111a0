"""Measure a BayLing server as its clients see it: time to first token (TTFT, mean and p50/p90/p99),
inter-token latency (ITL = (request latency - TTFT) / (output tokens - 1)), output tokens/s and
requests/s, over gRPC, HTTP and the OpenAI-compatible gateway side by side.

Two ways for requests to arrive:
  closed   --concurrency clients, each sending its next request as soon as its last one ended (a level
           is a concurrency); as aiperf's and genai-perf's --concurrency.
  poisson  requests arrive at random, --rate requests/s on average, whatever is running (a level is a
           rate); newcomers land in the middle of other answers, as in production.

Every request streams and generates exactly --max-tokens tokens (end_id -1, TensorRT-LLM's "no
end token"; the gateway's ignore_eos), so the protocols do the same work. --min-tokens and
--repetition-penalty send those parameters too (a CPU batch treats them differently). Each level runs
--requests requests (default: 2 x concurrency, at least 8) after one warm-up request. Without
--openai-url the benchmark starts a gateway (`bayling openai`, its own process) in front of --url.

examples:
  bayling bench --url localhost:8001 --http-url localhost:8000
  bayling bench --url localhost:8001 --protocols grpc --concurrency 4 --requests 32 --max-tokens 128 --min-tokens 128
  bayling bench --url localhost:8001 --protocols grpc,openai --arrival poisson --rate 1,2,4 --requests 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Awaitable, Callable

from bayling.errors import BaylingError

PROMPT = "Write a long story about a lighthouse keeper and the sea. Story number {i}:"
FILLER = ("The keeper climbs the stairs at dusk, trims the wick, polishes the lens and watches the ships pass "
          "the rocks while the gulls circle above the harbour and the fishermen mend their nets. ").split()
PROTOCOLS = ("grpc", "http", "openai")
ARRIVALS = ("closed", "poisson")


@dataclass(frozen=True)
class Workload:
    """What every request of a run asks for."""
    max_tokens: int = 64
    min_tokens: int = 0                       # min_length on the bayling model, min_tokens on the gateway
    repetition_penalty: float | None = None
    prompt_words: int = 0                     # extra words before the prompt (about 1.3 tokens each)

    def prompt(self, i: int) -> str:
        words = [FILLER[k % len(FILLER)] for k in range(self.prompt_words)]
        return " ".join([*words, PROMPT.format(i=i)])

    def bayling_params(self) -> dict:
        params: dict = {"max_tokens": self.max_tokens, "end_id": -1, "temperature": 0.0}
        if self.min_tokens:
            params["min_length"] = self.min_tokens
        if self.repetition_penalty is not None:
            params["repetition_penalty"] = self.repetition_penalty
        return params

    def openai_body(self, model: str, i: int) -> dict:
        body = {"model": model, "messages": [{"role": "user", "content": self.prompt(i)}],
                "max_tokens": self.max_tokens, "ignore_eos": True, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.min_tokens:
            body["min_tokens"] = self.min_tokens
        if self.repetition_penalty is not None:
            body["repetition_penalty"] = self.repetition_penalty
        return body


@dataclass(frozen=True)
class BenchOptions:
    url: str = "localhost:8001"
    http_url: str | None = None
    openai_url: str | None = None
    protocols: tuple[str, ...] = PROTOCOLS
    arrival: str = "closed"
    levels: tuple[float, ...] = (1, 4, 16)    # concurrencies (closed) or requests/s (poisson)
    requests: int | None = None
    workload: Workload = Workload()
    seed: int = 0                             # Poisson arrival times
    json_path: str | None = None
    markdown: bool = False

    def requests_at(self, level: float) -> int:
        return self.requests or max(8, int(2 * level))


@dataclass
class Sample:
    ttft: float          # seconds to the first text piece
    latency: float       # seconds to the end of the answer
    tokens: int          # output tokens


def percentile(values: list[float], p: int) -> float:
    """The p-th percentile, linearly interpolated (numpy's default): [1, 2, 3, 4] -> p50 2.5, p90 3.7."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Level:
    protocol: str
    arrival: str
    level: float                 # clients (closed) or requests/s (poisson)
    requests: int
    wall_s: float
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def load(self) -> str:
        return f"c={self.level:g}" if self.arrival == "closed" else f"{self.level:g}/s"

    @property
    def ttft_ms(self) -> float:
        return 1000 * statistics.mean(s.ttft for s in self.samples)

    def ttft_percentile_ms(self, p: int) -> float:
        return 1000 * percentile([s.ttft for s in self.samples], p)

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
        return {"protocol": self.protocol, "arrival": self.arrival, "level": self.level, "load": self.load,
                "requests": self.requests, "completed": len(self.samples), "errors": len(self.errors),
                "ttft_ms_mean": round(self.ttft_ms, 1) if done else None,
                **{f"ttft_ms_p{p}": round(self.ttft_percentile_ms(p), 1) if done else None for p in (50, 90, 99)},
                "itl_ms_mean": round(self.itl_ms, 2) if done else None,
                "latency_s_mean": round(self.latency_s, 3) if done else None,
                "output_tokens_per_s": round(self.output_tokens_per_s, 1) if done else None,
                "requests_per_s": round(self.requests_per_s, 3) if done else None}


# --- one streamed request per protocol -----------------------------------------------------------

async def bayling_request(client, workload: Workload, i: int) -> Sample:
    start = time.perf_counter()
    first = None
    async with client.stream_chat(workload.prompt(i), **workload.bayling_params()) as stream:
        async for _ in stream:
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    if stream.result is None:
        raise BaylingError("the stream ended without an answer")
    return Sample(ttft=(first or end) - start, latency=end - start, tokens=stream.result.completion_tokens)


async def openai_request(http, base: str, model: str, workload: Workload, i: int) -> Sample:
    """One streamed chat completion from any OpenAI-compatible server (this gateway, vLLM, llama.cpp)."""
    body = workload.openai_body(model, i)
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


Request = Callable[[int], Awaitable[Sample]]


async def _record(level: Level, request: Request, i: int) -> None:
    try:
        level.samples.append(await request(i))
    except Exception as exc:   # noqa: BLE001 - a benchmark reports failures and goes on
        level.errors.append(f"{type(exc).__name__}: {exc}")


async def run_closed(protocol: str, request: Request, concurrency: int, requests: int) -> Level:
    """`requests` requests from `concurrency` clients, each sending its next one when its last one ends."""
    level = Level(protocol, "closed", concurrency, requests, 0.0)
    counter = iter(range(requests))

    async def client():
        for i in counter:
            await _record(level, request, i)

    start = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    level.wall_s = time.perf_counter() - start
    return level


def poisson_starts(rate: float, requests: int, seed: int) -> list[float]:
    """Start times (s) of a Poisson process: exponential gaps of mean 1/rate, the first at 0."""
    rng = random.Random(seed)
    starts, t = [], 0.0
    for _ in range(requests):
        starts.append(t)
        t += rng.expovariate(rate)
    return starts


async def run_poisson(protocol: str, request: Request, rate: float, requests: int, seed: int = 0) -> Level:
    """`requests` requests arriving at `rate` per second on average, each on its own, whatever is running."""
    level = Level(protocol, "poisson", rate, requests, 0.0)
    start = time.perf_counter()

    async def arrive(i: int, at: float):
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        await _record(level, request, i)

    await asyncio.gather(*[arrive(i, at) for i, at in enumerate(poisson_starts(rate, requests, seed))])
    level.wall_s = time.perf_counter() - start
    return level


async def run_level(options: BenchOptions, protocol: str, request: Request, level: float) -> Level:
    n = options.requests_at(level)
    if options.arrival == "poisson":
        return await run_poisson(protocol, request, level, n, options.seed)
    return await run_closed(protocol, request, int(level), n)


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
    parser.add_argument("--arrival", choices=ARRIVALS, default="closed",
                        help="closed: --concurrency clients in a loop; poisson: --rate requests/s (default closed)")
    parser.add_argument("--concurrency", default="1,4,16", help="closed loop: comma-separated levels (default 1,4,16)")
    parser.add_argument("--rate", help="poisson: comma-separated requests/s, e.g. 1,2,4")
    parser.add_argument("--requests", type=int, help="requests per level (default: 2 x the level, at least 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default 64)")
    parser.add_argument("--min-tokens", type=int, default=0, help="also send min_length / min_tokens (default: not sent)")
    parser.add_argument("--repetition-penalty", type=float, help="also send repetition_penalty (default: not sent)")
    parser.add_argument("--prompt-words", type=int, default=0, help="words added before each prompt (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrival times (default 0)")
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")


def _numbers(text: str, flag: str, kind: type) -> tuple:
    try:
        values = tuple(kind(c) for c in text.split(","))
    except ValueError:
        raise BaylingError(f"{flag} must be numbers like 1,4,16, got {text!r}") from None
    if not values or min(values) <= 0:
        raise BaylingError(f"{flag} must be positive, got {text!r}")
    return values


def options_from(args: argparse.Namespace) -> BenchOptions:
    """The command line, checked once."""
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise BaylingError(f"unknown protocol(s): {', '.join(sorted(unknown))}")
    if "http" in protocols and not args.http_url:
        print("no --http-url: HTTP is not measured", file=sys.stderr)
        protocols.remove("http")
    if args.arrival == "poisson":
        if not args.rate:
            raise BaylingError("--arrival poisson needs --rate, e.g. --rate 1,2,4")
        levels = _numbers(args.rate, "--rate", float)
    else:
        levels = _numbers(args.concurrency, "--concurrency", int)
    if args.max_tokens < 2:
        raise BaylingError("--max-tokens must be at least 2 (ITL needs two tokens)")
    if not 0 <= args.min_tokens <= args.max_tokens:
        raise BaylingError(f"--min-tokens must be between 0 and --max-tokens, got {args.min_tokens}")
    workload = Workload(args.max_tokens, args.min_tokens, args.repetition_penalty, args.prompt_words)
    return BenchOptions(args.url, args.http_url, args.openai_url.rstrip("/") if args.openai_url else None,
                        tuple(protocols), args.arrival, levels, args.requests, workload, args.seed,
                        args.json_path, args.markdown)


async def measure(options: BenchOptions, openai_base: str | None, report) -> list[Level]:
    import httpx

    from bayling.client.aio import AsyncBayLingClient

    workload = options.workload
    results: list[Level] = []
    for protocol in options.protocols:
        if protocol == "openai":
            http = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256))
            model = (await http.get(f"{openai_base}/v1/models")).json()["data"][0]["id"]

            async def request(i, http=http, model=model):
                return await openai_request(http, openai_base, model, workload, i)

            close = http.aclose
        else:
            client = AsyncBayLingClient(options.url if protocol == "grpc" else f"http://{options.http_url}",
                                        timeout=600)

            async def request(i, client=client):
                return await bayling_request(client, workload, i)

            close = client.close
        try:
            await request(10_000)                                   # warm-up (connections, first batch)
            for level in options.levels:
                result = await run_level(options, protocol, request, level)
                results.append(result)
                report(result)
        finally:
            await close()
    return results


COLUMNS = ("protocol", "load", "requests", "TTFT mean ms", "TTFT p50 ms", "TTFT p90 ms", "TTFT p99 ms",
           "ITL mean ms", "latency mean s", "output tok/s", "req/s", "errors")
FIGURES = ("ttft_ms_mean", "ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99", "itl_ms_mean", "latency_s_mean",
           "output_tokens_per_s", "requests_per_s")


def rows(results: list[Level]) -> list[list[str]]:
    out = []
    for level in results:
        s = level.summary()
        out.append([s["protocol"], s["load"], str(s["requests"]),
                    *(f"{s[k]}" if s[k] is not None else "-" for k in FIGURES), str(s["errors"])])
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


def report_line(console, level: Level) -> None:
    s = level.summary()
    console.print(f"{s['protocol']:>6} {s['load']:<7} {s['completed']}/{s['requests']} ok, "
                  f"TTFT {s['ttft_ms_mean']} ms (p50 {s['ttft_ms_p50']}, p99 {s['ttft_ms_p99']}), "
                  f"ITL {s['itl_ms_mean']} ms, {s['output_tokens_per_s']} tok/s, {s['requests_per_s']} req/s",
                  highlight=False)
    for error in level.errors[:3]:
        console.print(f"  error: {error}", highlight=False, markup=False)


def print_results(options: BenchOptions, results: list[Level]) -> None:
    from rich.console import Console

    if options.markdown:
        print(markdown(results))
    else:
        out = Console()
        if not out.is_terminal:
            out = Console(width=160)
        out.print(table(results, options.workload.max_tokens))
    if options.json_path:
        with open(options.json_path, "w", encoding="utf-8") as f:
            json.dump({"workload": asdict(options.workload), "arrival": options.arrival,
                       "results": [r.summary() for r in results],
                       "samples": {f"{r.protocol}@{r.load}": [asdict(s) for s in r.samples] for r in results}},
                      f, indent=2)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    options = options_from(args)
    console = Console(stderr=True)
    gateway = None
    openai_base = options.openai_url
    if "openai" in options.protocols and not openai_base:
        gateway, openai_base = start_gateway(options.url)
    try:
        results = asyncio.run(measure(options, openai_base, lambda level: report_line(console, level)))
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
    print_results(options, results)
    return 1 if any(r.errors for r in results) else 0
