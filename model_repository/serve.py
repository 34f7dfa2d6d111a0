"""Serve an engine folder with a real Triton Inference Server.

Renders the model repository for the engine into a run folder, starts `tritonserver` on
it, waits until every model is ready, prints the endpoints, and stops cleanly on Ctrl-C
or SIGTERM (in-flight requests finish first). CPU engines run on the `tritonserver` of
the nvidia-pytriton wheel; TensorRT-LLM engines on the one in NVIDIA's container.

examples:
  bayling serve --engine ~/.cache/bayling/engines/SmolLM2-135M-Instruct-int8
  bayling serve --engine /engines/bayling-13b-trt --http-port 8000 --grpc-port 8001 --metrics-port 8002
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bayling.errors import BaylingError
from bayling.manifest import read_manifest
from bayling.paths import cache_dir
from bayling.model_repository.front import DEFAULT_MAX_REQUEST_BYTES
from bayling.model_repository.render import RenderOptions, add_render_options, options_from, render_repository
from bayling.model_repository.server import TritonServer, container_launcher, free_port, pytriton_launcher


@dataclass
class ServeOptions:
    """What `bayling serve` runs; `bayling demo`, the benchmarks and the tests build one too.
    A port of 0 means a free port, chosen when the server starts."""
    engine: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    address: str = "127.0.0.1"          # where clients connect: 0.0.0.0 in a container or to serve a network
    run_dir: Path | None = None        # default: under ~/.cache/bayling/run
    log_file: Path | None = None       # default: the terminal
    ready_timeout: float = 1800
    triton_args: list[str] = field(default_factory=list)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES   # HTTP bodies above this are refused (413)
    render: RenderOptions = field(default_factory=RenderOptions)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServeOptions(Path())
    parser.add_argument("--engine", type=Path, required=True, metavar="ENGINE_DIR", help="engine folder from 'bayling build'")
    parser.add_argument("--http-port", type=int, default=d.http_port)
    parser.add_argument("--grpc-port", type=int, default=d.grpc_port)
    parser.add_argument("--metrics-port", type=int, default=d.metrics_port)
    parser.add_argument("--address", default=d.address, help=f"address to listen on (default {d.address})")
    parser.add_argument("--run-dir", type=Path, help="where to render the model repository (default: under ~/.cache/bayling/run)")
    parser.add_argument("--log-file", type=Path, help="write tritonserver's log here instead of the terminal")
    parser.add_argument("--ready-timeout", type=float, default=d.ready_timeout, help="seconds to wait for all models to load")
    parser.add_argument("--triton-arg", action="append", default=[], metavar="ARG",
                        help="extra tritonserver flag, repeatable (e.g. --triton-arg=--metrics-config=histogram_latencies=true)")
    parser.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes, metavar="N",
                        help=f"largest HTTP request body accepted (default {d.max_request_bytes}); larger ones get 413")
    add_render_options(parser)


def serve_options_from(args: argparse.Namespace) -> ServeOptions:
    if args.max_request_bytes < 1024:
        raise BaylingError(f"--max-request-bytes must be at least 1024, got {args.max_request_bytes}")
    return ServeOptions(args.engine, args.http_port, args.grpc_port, args.metrics_port, args.address, args.run_dir,
                        args.log_file, args.ready_timeout, list(args.triton_arg), args.max_request_bytes,
                        options_from(args))


def gpu_environment(manifest) -> dict[str, str]:
    """A tensor-parallel TensorRT-LLM engine runs in the backend's orchestrator mode: one
    tritonserver process, and the backend spawns one worker per GPU (TensorRT-LLM 1.2.1
    triton_backend/inflight_batcher_llm/src/model_instance_state.cc reads TRTLLM_ORCHESTRATOR, as
    tensorrtllm_backend v0.17.0's docs/llama_multi_instance.md describes), so no `mpirun` around Triton."""
    return {"TRTLLM_ORCHESTRATOR": "1"} if int(manifest.build.get("tp", 1)) > 1 else {}


def start_server(options: ServeOptions) -> TritonServer:
    engine = options.engine
    manifest = read_manifest(engine)
    ports = [p or free_port() for p in (options.http_port, options.grpc_port, options.metrics_port)]
    run_dir = options.run_dir or cache_dir() / "run" / f"{engine.resolve().name}-{ports[1]}"
    repo = render_repository(engine, run_dir / "model_repository", options.render)
    if manifest.engine in ("tensorrt_llm", "tensorrt_llm_llmapi"):   # both run in NVIDIA's container
        launcher = container_launcher()
        launcher.env.update(gpu_environment(manifest))
    else:
        launcher = pytriton_launcher(cache_dir())
    server = TritonServer(repo, launcher, *ports, options.address, options.log_file, list(options.triton_args),
                          options.max_request_bytes, max_concurrency=options.render.max_concurrency)
    print(f"starting tritonserver for {manifest.model_name} ({manifest.engine}) ...", file=sys.stderr, flush=True)
    return server.start(timeout=options.ready_timeout)


def endpoints(server: TritonServer) -> str:
    return (f"BayLing is being served\n"
            f"  gRPC     {server.grpc_url}   (models: bayling, ensemble, tensorrt_llm, tensorrt_llm_bls)\n"
            f"  HTTP     http://{server.http_url}   (e.g. POST /v2/models/bayling/generate)\n"
            f"  metrics  {server.metrics_url}\n"
            f"chat with it: bayling chat --url {server.grpc_url}")


def main(args: argparse.Namespace) -> int:
    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    server = start_server(serve_options_from(args))
    print(endpoints(server), flush=True)
    try:
        code = server.process.wait()
        server.stop()
        if server.failure:
            raise BaylingError(f"stopped the server: {server.failure}")
        print(f"tritonserver exited with code {code}", file=sys.stderr)
        return code or 1
    except KeyboardInterrupt:
        print("stopping tritonserver ...", file=sys.stderr, flush=True)
        return 0 if server.stop() in (0, None) else 1
