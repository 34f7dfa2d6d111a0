"""Start the Streamlit demo page (chat and translation) for a running BayLing server.

The page streams answers from the server, has a sidebar with temperature, top_p, max tokens,
the system text, the server status and a clear-chat button, and a translation tab. It is
client/streamlit_app.py; `streamlit run` starts it as well (pass its options after `--`).

examples:
  bayling demo-ui --url localhost:8001
  bayling demo-ui --url http://gpu-box:8000 --port 8080 --address 0.0.0.0
  streamlit run client/streamlit_app.py -- --url localhost:8001
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from bayling.errors import BaylingError

APP = Path(__file__).with_name("streamlit_app.py")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="localhost:8001",
                        help="server: host:port of gRPC, or http://host:port; several: a comma-separated list, "
                             "or dns:///NAME:PORT (balanced per request)")
    parser.add_argument("--protocol", choices=("grpc", "http"))
    parser.add_argument("--port", type=int, default=8501, help="port of the page (default 8501)")
    parser.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--open-browser", action="store_true", help="open the page in a browser")


def streamlit_command(args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "streamlit", "run", str(APP),
               "--server.port", str(args.port), "--server.address", args.address,
               "--server.headless", "false" if args.open_browser else "true",
               "--browser.gatherUsageStats", "false", "--global.developmentMode", "false",
               "--client.toolbarMode", "viewer",
               "--", "--url", args.url]
    if args.protocol:
        command += ["--protocol", args.protocol]
    return command


def main(args: argparse.Namespace) -> int:
    try:
        import streamlit  # noqa: F401
    except ModuleNotFoundError:
        raise BaylingError("the demo page needs streamlit: pip install 'bayling-deploy[client]'") from None
    print(f"BayLing demo page: http://{args.address}:{args.port}  (server {args.url}; Ctrl-C stops)",
          file=sys.stderr, flush=True)
    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)   # stopping this command stops the page too
    process = subprocess.Popen(streamlit_command(args))
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait(30)
        return 0
