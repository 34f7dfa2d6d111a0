"""Multi-turn chat with a running BayLing server in the terminal; answers stream as Markdown.

Commands inside the chat:
  /clear or q      clear the history (as the original chat.py's q)
  /system TEXT     set the system message (/system alone shows it, /system none removes it)
  /params          show the generation parameters; /params temperature=0.2 max_tokens=256 sets them
  /help            this list
  an empty line or Ctrl-D exits; Ctrl-C stops the current answer (and cancels it on the server)

examples:
  bayling chat --url localhost:8001
  bayling chat --url http://localhost:8000 --system "You are a helpful translator." --temperature 0.2
"""

from __future__ import annotations

import argparse
import json

from rich.live import Live
from rich.markdown import Markdown

from bayling.errors import BaylingError, InvalidInput
from bayling.params import validate

HELP = __doc__.split("\n\n")[1].split("\nexamples:")[0]
PROMPT = "[bold green]You[/]> "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="localhost:8001",
                        help="server: host:port of gRPC (default localhost:8001), or http://host:port; several: "
                             "a comma-separated list, or dns:///NAME:PORT (balanced per request)")
    parser.add_argument("--protocol", choices=("grpc", "http"), help="default: from the URL (grpc without a scheme)")
    parser.add_argument("--system", help="system message")
    parser.add_argument("--temperature", type=float, help="default: the model's (0.7 for BayLing; 0 is greedy)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--max-tokens", type=int, default=1024, help="tokens per answer (default 1024, as chat.py)")
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int, dest="random_seed", help="random seed for sampling")
    parser.add_argument("--stop", action="append", dest="stop_words", metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per answer (default 600)")


CLI_PARAMS = ("temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "random_seed", "stop_words")


def params_from_args(args: argparse.Namespace) -> dict:
    """The generation parameters given on the command line (those add_arguments defines)."""
    return {name: getattr(args, name) for name in CLI_PARAMS if getattr(args, name) is not None}


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from bayling.client.library import BayLingClient

    params = params_from_args(args)
    validate(params)
    with BayLingClient(args.url, args.protocol, timeout=args.timeout, retries=0) as client:
        run_chat(client, Console(), system=args.system, params=params)
    return 0


def parse_assignments(text: str) -> dict:
    """`temperature=0.2 stop_words=["\\n"] random_seed=none` -> values (JSON where it parses, else text)."""
    values = {}
    for item in text.split():
        name, sep, raw = item.partition("=")
        if not sep:
            raise InvalidInput(name, "write NAME=VALUE")
        if raw.lower() in ("none", "default"):
            values[name] = None
            continue
        try:
            values[name] = json.loads(raw)
        except json.JSONDecodeError:
            values[name] = raw
    return values


def run_chat(client, console, system: str | None = None, params: dict | None = None) -> None:
    """The chat loop, until an empty line or end of input. `client` is a BayLingClient."""
    params = dict(params or {})
    history: list[dict] = []
    try:
        info = client.model_info()
    except BaylingError as exc:
        raise BaylingError(f"cannot reach the server at {client.url}: {exc}") from None
    console.print(f"[bold]{info.model_name or 'BayLing'}[/] ({info.engine or 'unknown engine'}, "
                  f"{info.max_context or '?'} tokens of context) at {client.url}")
    console.print("[dim]An empty line or Ctrl-D exits, Ctrl-C stops an answer, /help lists the commands.[/]")
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            line = console.input(PROMPT)
        except EOFError:
            console.print()
            break
        except KeyboardInterrupt:
            console.print("\n[dim](an empty line or Ctrl-D exits)[/]")
            continue
        text = line.strip()
        if not text:
            break
        if text in ("q", "/clear"):
            history.clear()
            console.print("clear history...")
            continue
        if text.startswith("/"):
            system = command(text, console, system, params)
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": text})
        answer = answer_turn(client, console, messages, params)
        if answer:
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
    console.print("bye")


def command(text: str, console, system: str | None, params: dict) -> str | None:
    """Run a /command; returns the (possibly new) system message."""
    name, _, rest = text.partition(" ")
    rest = rest.strip()
    if name == "/system":
        if not rest:
            console.print(f"system: {system}" if system else "no system message", markup=False, highlight=False,
                          soft_wrap=True)
        elif rest.lower() == "none":
            system = None
            console.print("system message removed")
        else:
            system = rest
            console.print("system message set")
    elif name == "/params":
        if rest:
            try:
                changes = parse_assignments(rest)
                new = {k: v for k, v in {**params, **changes}.items() if v is not None}
                validate(new)
            except InvalidInput as exc:
                console.print(f"[red]error:[/] {exc}", markup=True, highlight=False)
                return system
            params.clear()
            params.update(new)
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(params.items())) or "none"
        console.print(f"params: {shown} [dim](the rest: the server's defaults)[/]", highlight=False)
    elif name == "/help":
        console.print(HELP, markup=False, highlight=False)
    else:
        console.print(f"[red]unknown command {name}[/]; /help lists them")
    return system


def answer_turn(client, console, messages: list[dict], params: dict) -> str:
    """Stream one answer to the terminal; returns it stripped ("" if it failed or was stopped empty).
    Ctrl-C at any moment stops the answer (and cancels it on the server), never the chat."""
    stream = None
    stopped = False
    try:
        stream = client.stream_chat(messages, **params)
        if console.is_terminal:
            with Live(Markdown(""), console=console, refresh_per_second=12, vertical_overflow="visible") as live:
                for _ in stream:
                    live.update(Markdown(stream.text))
        else:
            for piece in stream:
                console.file.write(piece)
                console.file.flush()
            console.file.write("\n")
    except KeyboardInterrupt:
        stopped = True
    except BaylingError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        stopped = None
    finally:
        if stream is not None:
            close_despite_ctrl_c(stream)
    if stopped is None or stream is None:
        return ""
    result = stream.result
    if stopped:
        console.print("[dim](stopped)[/]")
    elif result:
        hint = " (cut: raise it with /params max_tokens=N)" if result.finish_reason == "length" else ""
        console.print(f"[dim]({result.prompt_tokens} prompt + {result.completion_tokens} answer tokens, "
                      f"{result.finish_reason}{hint})[/]", highlight=False)
    return stream.text.strip()


def close_despite_ctrl_c(stream) -> None:
    """Close the stream (which cancels an unfinished answer on the server), even if Ctrl-C comes again."""
    while True:
        try:
            stream.close()
            return
        except KeyboardInterrupt:
            continue
