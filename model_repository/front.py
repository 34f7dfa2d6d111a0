"""The HTTP edge of `bayling serve`: a small proxy in front of Triton's HTTP endpoint.

Triton 2.51's HTTP frontend has faults this product cannot fix in the binary: a form-encoded body
of about 4.19 MB makes tritonserver segfault, and a value of the wrong JSON type in a `generate`
request gets a 500 "Unable to parse 'data'" instead of a 400. So Triton's HTTP port listens on
loopback only, and this front listens where clients connect:

- every request body is limited (`max_request_bytes`, 1 MiB by default: a BayLing context of
  2,048 tokens is about 8 KB of text) and refused with 413 before more is read;
- a `generate` / `generate_stream` body for one of this repository's models is checked against
  the tensor contract (JSON object, each known input of the right type and range) and refused with
  400 naming the field, as the models do;
- `/v2/health/ready` and `/v2/health/live` also answer for the supervisor (a dead model process,
  an engine that cannot generate);
- everything else, streams included, passes through; a client that leaves closes the upstream
  connection, which cancels the request in Triton.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

from bayling import contract
from bayling.errors import BaylingError, InvalidInput

DEFAULT_MAX_REQUEST_BYTES = 1 << 20
GENERATE_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/(generate|generate_stream)$")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
              "proxy-authenticate", "content-length", "host"}
INT_RANGES = {"INT32": (-2**31, 2**31 - 1), "INT64": (-2**63, 2**63 - 1), "UINT64": (0, 2**64 - 1)}
FP32_MAX = 3.4028234663852886e38


@dataclass
class FrontOptions:
    address: str
    port: int
    upstream: str                     # Triton's HTTP endpoint, host:port (on loopback)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


# --- what a generate body may hold -------------------------------------------------------------------

def check_generate_body(model: str, raw: bytes) -> None:
    """Raise InvalidInput (naming the field) unless `raw` is a JSON object whose known inputs have
    the contract's types. Unknown keys pass: Triton reads them as request parameters."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise InvalidInput("request body", "JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput("request body", f"is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise InvalidInput("request body", "must be a JSON object of input names and values")
    inputs = {t.name: t for t in contract.MODELS[model][0]}
    for name, value in body.items():
        if name in inputs:
            check_value(inputs[name], value)


def check_value(tensor: contract.Tensor, value) -> None:
    many = -1 in tensor.dims
    items = value if isinstance(value, list) and many else [value]
    if isinstance(value, list) and not many:
        raise InvalidInput(tensor.name, f"must be one value, not a list")
    for item in items:
        problem = _type_problem(tensor.dtype, item)
        if problem:
            raise InvalidInput(tensor.name, problem)


def _type_problem(dtype: str, item) -> str | None:
    kind = type(item).__name__
    if dtype == "STRING":
        return None if isinstance(item, str) else f"must be a string, got {kind}"
    if dtype == "BOOL":
        return None if isinstance(item, bool) else f"must be true or false, got {kind}"
    if isinstance(item, bool) or not isinstance(item, (int, float)):
        return f"must be a number, got {kind}"
    if dtype in INT_RANGES:
        low, high = INT_RANGES[dtype]
        if not isinstance(item, int):
            return f"must be an integer, got {item!r}"
        return None if low <= item <= high else f"must be between {low} and {high}, got {item}"
    if not math.isfinite(item) or abs(item) > FP32_MAX:
        return f"must be a finite 32-bit float, got {item!r}"
    return None


# --- the proxy --------------------------------------------------------------------------------------

def error_response(status: int, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


async def read_limited(request, limit: int) -> bytes:
    """The body, or InvalidInput-style 413 once it exceeds `limit` (checked before reading when declared)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def drain(request, most: int) -> None:
    """Read (and drop) the rest of a refused body, so that the client can read the answer instead of
    seeing its upload reset; a body beyond `most` bytes gets the connection closed instead."""
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > most:
                return
    except Exception:  # the stream was consumed already, or the client left
        return


class BodyTooLarge(BaylingError):
    def __init__(self, size: int, limit: int):
        super().__init__(f"request body: {size} bytes or more; at most {limit} are accepted")


def create_app(options: FrontOptions, health: Callable[[], tuple[bool, bool, str]]):
    """The Starlette app. `health()` says (ready, live, why not) for the supervisor."""
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    state: dict = {}

    def upstream() -> httpx.AsyncClient:
        if "client" not in state:       # made inside the server's event loop
            state["client"] = httpx.AsyncClient(base_url=f"http://{options.upstream}", timeout=None,
                                                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        return state["client"]

    async def proxy(request):
        try:
            body = await read_limited(request, options.max_request_bytes)
            match = GENERATE_PATH.match(request.url.path)
            if request.method == "POST" and match and match.group(1) in contract.MODELS:
                check_generate_body(match.group(1), body)
        except BodyTooLarge as exc:
            await drain(request, 16 * options.max_request_bytes)
            return error_response(413, str(exc))
        except InvalidInput as exc:
            return error_response(400, str(exc))
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        url = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            response = await upstream().send(upstream().build_request(request.method, url, headers=headers,
                                                                      content=body), stream=True)
        except httpx.HTTPError as exc:
            return error_response(503, f"the server is not reachable: {type(exc).__name__}")
        if request.url.path in ("/v2/health/ready", "/v2/health/live") and response.status_code == 200:
            ready, live, why = health()
            if not (ready if request.url.path.endswith("ready") else live):
                await response.aclose()
                return error_response(503, why)

        async def relay():
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:               # the client left (or the answer ended): let go of the upstream request
                await response.aclose()

        kept = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(relay(), status_code=response.status_code, headers=kept)

    async def shutdown() -> None:
        if "client" in state:
            await state["client"].aclose()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        await shutdown()

    methods = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]
    return Starlette(routes=[Route("/{path:path}", proxy, methods=methods)], lifespan=lifespan)


class Front:
    """The front's uvicorn server, in a thread of the `bayling serve` process."""

    def __init__(self, options: FrontOptions, health: Callable[[], tuple[bool, bool, str]]):
        import uvicorn

        self.options = options
        config = uvicorn.Config(create_app(options, health), host=options.address, port=options.port,
                                log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="http-front", daemon=True)

    def start(self, timeout: float = 30) -> "Front":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise BaylingError(f"the HTTP front could not listen on {self.options.address}:{self.options.port}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
