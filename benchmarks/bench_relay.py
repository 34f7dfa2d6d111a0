"""Relay capacity of every serving path: tokens/s carried and server CPU per streamed token.

A nearly free engine stands in for a GPU: a tiny random 2-layer LLaMA (the tests' model builder,
context 2048) built once to a CTranslate2 INT8 engine under the benchmark cache. With it, what
limits the figures is the serving stack, not generation. Every request generates exactly
--tokens tokens (end_id -1, TensorRT-LLM's "no end token"; the gateway's ignore_eos), greedy.

Paths, all against one real tritonserver (and one gateway process) in one run:
  bayling-stream   gRPC stream to `bayling`, stream=true (one response per piece of text)
  bayling-whole    gRPC stream to `bayling`, stream=false (one response per request)
  ensemble-stream  gRPC stream to `ensemble` (preprocessing -> tensorrt_llm -> postprocessing)
  engine-stream    gRPC stream to `tensorrt_llm` directly (token ids)
  openai-stream    HTTP SSE to the OpenAI gateway (`bayling openai`, its own process) -> bayling

Per level (streams requests in flight, closed loop: a stream starts its next request when one
ends): tokens/s relayed, server CPU µs per token (tritonserver and its stubs, summed over the
process tree from /proc), the gateway's own CPU µs per token, and responses per request (how
many messages carried the tokens). The client is a lean gRPC/HTTP asyncio client in this process.

    .venv/bin/python benchmarks/bench_relay.py                          # tiny engine, 1/16/64 x 256
    .venv/bin/python benchmarks/bench_relay.py --engine default --tokens 64 --streams 1,16
    .venv/bin/python benchmarks/bench_relay.py --serve-arg=--entry-instances=1   # compare a setting
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from proc_tree import tree_cpu_by_role, tree_cpu_seconds

PROMPT = "Write a long story about a lighthouse keeper and the sea."
PATHS = ("bayling-stream", "bayling-whole", "ensemble-stream", "engine-stream", "openai-stream")


# --- the engines ------------------------------------------------------------------------------------

def tiny_engine(cache: Path) -> Path:
    """The tiny random LLaMA as a CTranslate2 INT8 engine, built once (a few seconds)."""
    engine = cache / "bench" / "tiny-llama-2048-int8"
    if (engine / "manifest.json").is_file():
        return engine
    import subprocess

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from tests.models import save_random_llama, train_llama_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_llama_tokenizer(Path(tmp) / "tokenizer")
        model = save_random_llama(Path(tmp) / "tiny-llama", tokenizer, context=2048)
        subprocess.run([sys.executable, "-m", "bayling.cli", "build", "--model", str(model), "--output", str(engine),
                        "--template", "bayling", "--name", "tiny-llama", "--target", "cpu-ct2"], check=True)
    return engine


def engine_dir(name: str) -> Path:
    from bayling.paths import cache_dir, default_engine_dir

    if name == "tiny":
        return tiny_engine(cache_dir())
    if name == "default":
        engine = default_engine_dir("cpu-ct2")   # the relay was measured on the CTranslate2 engine
        if not (engine / "manifest.json").is_file():
            import subprocess

            subprocess.run([sys.executable, "-m", "bayling.cli", "build", "--default", "--target", "cpu-ct2"],
                           check=True)
        return engine
    return Path(name)


def cpu_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


# --- one request per path, over a lean asyncio client ----------------------------------------------

def _raw(array: np.ndarray) -> bytes:
    if array.dtype == np.object_:
        from tritonclient.utils import serialize_byte_tensor

        return serialize_byte_tensor(array).item()
    return array.tobytes()


def infer_request(model: str, arrays: dict[str, np.ndarray], request_id: str):
    from tritonclient.grpc import service_pb2

    from bayling import contract

    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype=contract.tensor(model, name).wire_dtype, shape=array.shape)
        request.raw_input_contents.append(_raw(array))
    return request


def output_array(response, name: str, dtype) -> np.ndarray | None:
    for i, output in enumerate(response.outputs):
        if output.name == name:
            return np.frombuffer(response.raw_output_contents[i], dtype=dtype)
    return None


@dataclass
class Done:
    tokens: int
    responses: int   # messages that carried the answer (final included)


async def grpc_request(stub, model: str, arrays: dict[str, np.ndarray], request_id: str, count) -> Done:
    """One streamed request; `count(response) -> tokens` reads each response."""
    call = stub.ModelStreamInfer()
    await call.write(infer_request(model, arrays, request_id))
    await call.done_writing()
    tokens = responses = 0
    async for message in call:
        if message.error_message:
            raise RuntimeError(f"{model}: {message.error_message}")
        response = message.infer_response
        responses += 1
        tokens += count(response)
        if response.parameters["triton_final_response"].bool_param:
            return Done(tokens, responses)
    raise RuntimeError(f"{model}: the stream ended without a final response")


def bayling_tokens(response) -> int:
    final = response.parameters["triton_final_response"].bool_param
    counts = output_array(response, "completion_tokens", np.int32) if final else None
    return int(counts[0]) if counts is not None and counts.size else 0


def engine_tokens(response) -> int:
    lengths = output_array(response, "sequence_length", np.int32)
    return int(lengths[0]) if lengths is not None and lengths.size else 0


class Paths:
    """The request of each path; `tokens` per request, fixed length."""

    def __init__(self, grpc_url: str, gateway: str | None, prompt_ids: list[int], tokens: int):
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        from bayling import contract

        options = [("grpc.max_receive_message_length", 64 << 20)]
        self.channel = grpc.aio.insecure_channel(grpc_url, options=options)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.tokens = tokens
        messages = json.dumps([{"role": "user", "content": PROMPT}])
        common = {"max_tokens": tokens, "end_id": -1, "temperature": 0.0}
        self.arrays = {
            "bayling-stream": contract.request_arrays("bayling", {"messages": messages, **common, "stream": True}),
            "bayling-whole": contract.request_arrays("bayling", {"messages": messages, **common, "stream": False}),
            "ensemble-stream": contract.request_arrays("ensemble", {"text_input": PROMPT, "max_tokens": tokens,
                                                                    "end_id": -1, "top_k": 1, "stream": True}),
            "engine-stream": contract.request_arrays("tensorrt_llm", {
                "input_ids": prompt_ids, "input_lengths": len(prompt_ids), "request_output_len": tokens,
                "end_id": -1, "runtime_top_k": 1, "streaming": True}),
        }
        self.gateway = gateway
        self.http = None
        self.serial = 0

    async def request(self, path: str) -> Done:
        self.serial += 1
        rid = f"{path}-{self.serial}"
        if path.startswith("bayling"):
            return await grpc_request(self.stub, "bayling", self.arrays[path], rid, bayling_tokens)
        if path == "ensemble-stream":
            done = await grpc_request(self.stub, "ensemble", self.arrays[path], rid, lambda r: 0)
            return Done(self.tokens, done.responses)      # fixed length: end_id -1
        if path == "engine-stream":
            return await grpc_request(self.stub, "tensorrt_llm", self.arrays[path], rid, engine_tokens)
        return await self.openai_request()

    async def openai_request(self) -> Done:
        import httpx

        if self.http is None:
            self.http = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256,
                                                                           max_keepalive_connections=256))
        body = {"model": "bayling", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": self.tokens,
                "ignore_eos": True, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
        tokens = responses = 0
        async with self.http.stream("POST", f"{self.gateway}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"gateway: {response.status_code} {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                responses += 1
                if '"usage": {' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        return Done(tokens, responses)

    async def close(self):
        await self.channel.close()
        if self.http is not None:
            await self.http.aclose()


# --- a level: N streams, closed loop ----------------------------------------------------------------

@dataclass
class Row:
    path: str
    streams: int
    requests: int
    tokens: int
    seconds: float
    server_cpu: dict[str, float]      # seconds by role: total, tritonserver, bayling, tensorrt_llm, ...
    gateway_cpu_s: float
    responses: int

    @property
    def server_cpu_s(self) -> float:
        return self.server_cpu["total"]

    def us_per_token(self, *roles: str) -> float:
        return 1e6 * sum(self.server_cpu.get(r, 0.0) for r in roles) / self.tokens

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def server_us_per_token(self) -> float:
        return 1e6 * self.server_cpu_s / self.tokens

    @property
    def gateway_us_per_token(self) -> float:
        return 1e6 * self.gateway_cpu_s / self.tokens

    def cells(self) -> list[str]:
        gateway = f"{self.gateway_us_per_token:.0f}" if self.path == "openai-stream" else "-"
        return [self.path, str(self.streams), str(self.requests), str(self.tokens), f"{self.seconds:.2f}",
                f"{self.tokens_per_s:,.0f}", f"{self.server_us_per_token:.0f}",
                f"{self.us_per_token('tritonserver'):.0f}", f"{self.us_per_token(*TEXT_MODELS):.0f}",
                f"{self.us_per_token('tensorrt_llm'):.0f}", gateway, f"{self.responses / self.requests:.1f}"]


TEXT_MODELS = ("bayling", "preprocessing", "postprocessing")
COLUMNS = ("path", "streams", "requests", "tokens", "seconds", "tokens/s", "server CPU µs/token",
           "of which tritonserver", "text models", "engine model", "gateway CPU µs/token", "responses/request")


async def run_level(paths: Paths, path: str, streams: int, requests: int, server_pid: int,
                    gateway_pid: int | None) -> Row:
    queue = iter(range(requests))
    done: list[Done] = []

    async def stream():
        for _ in queue:
            done.append(await paths.request(path))

    cpu0 = tree_cpu_by_role(server_pid)
    gw0 = tree_cpu_seconds([gateway_pid]) if gateway_pid else 0.0
    start = time.perf_counter()
    await asyncio.gather(*(stream() for _ in range(streams)))
    seconds = time.perf_counter() - start
    server = cpu_delta(tree_cpu_by_role(server_pid), cpu0)
    gateway = (tree_cpu_seconds([gateway_pid]) - gw0) if gateway_pid else 0.0
    tokens = sum(d.tokens for d in done)
    expected = requests * paths.tokens
    if tokens != expected:
        raise RuntimeError(f"{path} at {streams} streams relayed {tokens} tokens, expected {expected}")
    return Row(path, streams, requests, tokens, seconds, server, gateway, sum(d.responses for d in done))


async def measure(paths: Paths, names: list[str], levels: list[int], per_stream: int, minimum: int,
                  server_pid: int, gateway_pid: int | None, report) -> list[Row]:
    rows = []
    for name in names:
        await paths.request(name)                                   # warm-up
        for streams in levels:
            row = await run_level(paths, name, streams, max(minimum, per_stream * streams), server_pid, gateway_pid)
            rows.append(row)
            report(row)
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row.cells()) + " |" for row in rows])


def in_process_tokens_per_s(engine: Path, prompt_ids: list[int], tokens: int, batch: int) -> float:
    """CTranslate2 alone, same thread setting as the served engine model: the engine's own ceiling."""
    import ctranslate2

    from bayling.manifest import read_manifest
    from bayling.model_repository.render import cpu_threads_for

    generator = ctranslate2.Generator(str(engine / "ctranslate2"), device="cpu", compute_type="default",
                                      intra_threads=cpu_threads_for(read_manifest(engine), None))
    vocab = json.loads((engine / "ctranslate2" / "vocabulary.json").read_text(encoding="utf-8"))
    start_tokens = [[vocab[t] for t in prompt_ids]] * batch
    options = dict(max_length=tokens, sampling_topk=1, include_prompt_in_result=False, end_token=[])
    generator.generate_batch(start_tokens[:1], **{**options, "max_length": 4})
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        generator.generate_batch(start_tokens, **options)
        runs.append(time.perf_counter() - start)
    del generator
    return batch * tokens / statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="tiny", help="tiny (default), default (the embedded model) or ENGINE_DIR")
    parser.add_argument("--tokens", type=int, default=256, help="tokens generated per request (default 256)")
    parser.add_argument("--streams", default="1,16,64", help="concurrency levels (default 1,16,64)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"which paths (default: all of {', '.join(PATHS)})")
    parser.add_argument("--per-stream", type=int, default=4, help="requests per stream at each level (default 4)")
    parser.add_argument("--min-requests", type=int, default=16, help="requests per level at least (default 16)")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="a `bayling serve` option for the server, repeatable (e.g. --serve-arg=--entry-instances=2)")
    parser.add_argument("--url", help="measure this running server (gRPC host:port) instead of starting one")
    parser.add_argument("--server-pid", type=int, help="with --url: the tritonserver process, for its CPU time")
    parser.add_argument("--openai-url", help="with --url: a running gateway (http://host:port)")
    parser.add_argument("--gateway-pid", type=int, help="with --openai-url: the gateway process")
    parser.add_argument("--json", dest="json_path", help="also write the rows here")
    args = parser.parse_args()
    names = [p for p in args.paths.split(",") if p]
    unknown = set(names) - set(PATHS)
    if unknown:
        raise SystemExit(f"bench_relay: unknown path(s): {', '.join(sorted(unknown))}")
    if args.url and not args.server_pid:
        raise SystemExit("bench_relay: --url needs --server-pid (the server's CPU time is what is measured)")
    if "openai-stream" in names and args.url and not (args.openai_url and args.gateway_pid):
        raise SystemExit("bench_relay: with --url, the openai-stream path needs --openai-url and --gateway-pid")
    levels = [int(s) for s in args.streams.split(",")]

    from bayling.model_repository.engine_text import load_engine_text

    engine = engine_dir(args.engine)
    text = load_engine_text(engine)
    prompt_ids = text.encoder.encode_messages([{"role": "user", "content": PROMPT}]).ids
    print(f"engine {engine} ({text.manifest.model_name}), {args.tokens} tokens per request, "
          f"{os.cpu_count()} cores", flush=True)
    ceiling = {b: in_process_tokens_per_s(engine, prompt_ids, args.tokens, b) for b in sorted({1, *levels} - {64})}
    print("CTranslate2 in-process (the engine alone): "
          + ", ".join(f"batch {b}: {v:,.0f} tokens/s" for b, v in ceiling.items()), flush=True)

    def report(row: Row) -> None:
        print("  ".join(f"{c}: {v}" for c, v in zip(COLUMNS, row.cells())), flush=True)

    async def go(target: Target):
        paths = Paths(target.grpc_url, target.gateway_url, prompt_ids, args.tokens)
        try:
            return await measure(paths, names, levels, args.per_stream, args.min_requests, target.server_pid,
                                 target.gateway_pid, report)
        finally:
            await paths.close()

    with serving(args, engine, "openai-stream" in names) as target:
        rows = asyncio.run(go(target))
    print(f"\nserver: {target.description}")
    print(markdown(rows))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({
            "engine": str(engine), "tokens": args.tokens, "cores": os.cpu_count(), "server": target.description,
            "in_process_tokens_per_s": ceiling,
            "rows": [{**asdict(row), "tokens_per_s": row.tokens_per_s, "server_us_per_token": row.server_us_per_token,
                      "gateway_us_per_token": row.gateway_us_per_token} for row in rows]}, indent=2))


@dataclass
class Target:
    grpc_url: str
    server_pid: int
    gateway_url: str | None
    gateway_pid: int | None
    description: str


@contextmanager
def serving(args: argparse.Namespace, engine: Path, gateway: bool):
    """The server to measure: the one given with --url, or a fresh one (and a gateway) on `engine`."""
    if args.url:
        yield Target(args.url, args.server_pid, args.openai_url, args.gateway_pid, f"running at {args.url}")
        return
    from bayling.client.bench import start_gateway

    with tempfile.TemporaryDirectory() as tmp:
        server, options = start_server(engine, Path(tmp), args.serve_arg)
        process = None
        try:
            base = None
            if gateway:
                process, base = start_gateway(server.grpc_url)
            yield Target(server.grpc_url, server.process.pid, base, process.pid if process else None, str(options))
        finally:
            if process is not None:
                process.terminate()
                process.wait(30)
            server.stop()


def start_server(engine: Path, tmp: Path, serve_args: list[str]):
    """A real tritonserver on the engine, as `bayling serve --engine ENGINE SERVE_ARGS` runs it (on free
    loopback ports)."""
    from dataclasses import replace

    from bayling.model_repository.serve import add_arguments, serve_options_from, start_server as start

    parser = argparse.ArgumentParser(prog="bench_relay --serve-arg")
    add_arguments(parser)
    options = serve_options_from(parser.parse_args(["--engine", str(engine), *serve_args]))
    options = replace(options, http_port=0, grpc_port=0, metrics_port=0, address="127.0.0.1", run_dir=tmp,
                      log_file=tmp / "tritonserver.log", ready_timeout=300)
    return start(options), options.render


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
