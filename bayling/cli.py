"""The ``bayling`` command: one entry point, one subcommand per job.

Each subcommand lives in its stage as a module with ``add_arguments(parser)``
and ``main(args) -> int``; it is imported only when it runs, so ``bayling
--help`` stays instant and a missing optional dependency only affects the
subcommand that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bayling import __version__
from bayling.errors import BaylingError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "build": ("bayling.build_engine.build", "compile a Hugging Face checkpoint into an INT8 engine (CPU or TensorRT-LLM)"),
    "merge": ("bayling.build_engine.merge_cli", "apply (or make, or verify) a BayLing weight difference"),
    "serve": ("bayling.model_repository.serve", "render the Triton model repository for an engine and run tritonserver"),
    "render": ("bayling.model_repository.render", "render the Triton model repository for an engine, without serving"),
    "demo": ("bayling.demo", "build the embedded default engine if needed, serve it and chat in the terminal"),
    "chat": ("bayling.client.chat_cli", "multi-turn terminal chat with a running server"),
    "translate": ("bayling.client.translate_cli", "translate a file line by line through a running server"),
    "openai": ("bayling.client.openai_gateway", "OpenAI-compatible HTTP gateway in front of the Triton server"),
    "demo-ui": ("bayling.client.demo_ui", "start the Streamlit chat demo"),
    "bench": ("bayling.client.bench", "measure TTFT, inter-token latency and throughput against a server"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayling",
        description="BayLing on Triton Inference Server: build engines, serve them, talk to them.",
        epilog="Run 'bayling COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"bayling {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] not in COMMANDS:
        args = top.parse_args(argv)  # prints help, the version, or a usage error
        top.print_help()
        return 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        print(f"bayling {name}: error: this command needs '{exc.name}', which is not installed", file=sys.stderr)
        return 1
    parser = argparse.ArgumentParser(
        prog=f"bayling {name}",
        description=(module.__doc__ or help_text).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.main(args) or 0)
    except BaylingError as exc:
        print(f"bayling {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bayling {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
