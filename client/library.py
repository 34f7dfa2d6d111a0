"""BayLingClient: talk to the `bayling` model of a Triton server over gRPC or HTTP.

    from bayling.client import BayLingClient

    client = BayLingClient("localhost:8001")                      # gRPC (the default)
    answer = client.chat([{"role": "user", "content": "Hello!"}], max_tokens=64, temperature=0)
    print(answer.text, answer.finish_reason, answer.prompt_tokens, answer.completion_tokens)

    with client.stream_chat("Tell me a story.", max_tokens=256) as stream:
        for piece in stream:                                      # leaving early cancels on the server
            print(piece, end="", flush=True)
    print(stream.result)                                          # ChatResult, once the stream ended

gRPC uses Triton's streaming API (the model is decoupled: unary calls are refused); HTTP uses
Triton's `generate_stream` endpoint (server-sent events), also for whole answers, because closing
its connection is what cancels a request on the server. Parameters are checked before sending with
the server's own limits (`bayling.params.validate`, which raises `InvalidInput`); whatever the
server or the network refuses raises `BayLingServerError` with the server's message.
"""

from __future__ import annotations

import json
import queue
import random
import struct
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Iterator, Sequence

from bayling import contract
from bayling.errors import BaylingError, InvalidInput
from bayling.params import validate
from bayling.templates import validate_messages

MODEL = contract.ENTRY_MODEL
DEFAULT_TIMEOUT = 300.0


@dataclass
class ChatResult:
    text: str
    finish_reason: str          # stop, length or cancelled
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict] | None = None   # with logprobs=True: {token, logprob, bytes, top_logprobs} per token


@dataclass
class ModelInfo:
    model_name: str | None      # e.g. "BayLing-13B-v1.1" (None if the server does not say)
    engine: str | None          # "ctranslate2" (CPU) or "tensorrt_llm" (GPU)
    template: str | None        # "bayling", "bayling-3" or "hf"
    max_context: int | None     # tokens, prompt + completion
    triton_model: str = MODEL


class BayLingServerError(BaylingError):
    """The server (or the way to it) refused or failed a request.

    `status` is a gRPC status name (INVALID_ARGUMENT, UNAVAILABLE, DEADLINE_EXCEEDED, NOT_FOUND,
    INTERNAL, ...; HTTP statuses are mapped to these), `message` the server's own words, and
    `field` the request field the message starts with (``"max_tokens: must be ..."``), if any."""

    def __init__(self, status: str, message: str):
        super().__init__(message if status in ("INVALID_ARGUMENT", "INTERNAL") else f"{status}: {message}")
        self.status = status
        self.message = message
        self.field = field_named_in(message)


def field_named_in(message: str) -> str | None:
    """The request field a message starts with ("max_tokens: must be ..." -> "max_tokens"), if any."""
    head, sep, _ = message.partition(": ")
    return head if sep and head.replace("_", "").isalnum() and head.islower() else None


HTTP_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
               429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
               502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def http_error(code: int, body: str) -> BayLingServerError:
    try:
        message = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        message = body.strip() or f"HTTP {code}"
    return BayLingServerError(HTTP_STATUS.get(code, "UNKNOWN"), str(message))


def grpc_status_error(code, details: str) -> BayLingServerError:
    """From a grpc.StatusCode (or its string form "StatusCode.X")."""
    name = getattr(code, "name", None) or str(code).rsplit(".", 1)[-1]
    return BayLingServerError(name or "UNKNOWN", details or name)


def stream_error(code, details: str) -> BayLingServerError:
    """An error on a gRPC stream. Without a status it came in-band, as Triton sends a model's error on a
    stream by default; bad input then names its field first ("max_tokens: must be ..."). (Triton's
    `triton_grpc_error` header would give statuses, but tritonserver 2.51 can crash on a model's error
    response in that mode: docs/serving.md, "Limits and failure behaviour".)"""
    if code:
        return grpc_status_error(code, details)
    return BayLingServerError("INVALID_ARGUMENT" if field_named_in(details or "") else "INTERNAL", details)


def as_messages(messages: str | Sequence[dict]) -> list[dict]:
    """A string is one user turn; otherwise a list of {role, content}, checked as the server checks it."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return validate_messages(list(messages))


def request_values(messages: str | Sequence[dict] | None, params: dict, *, stream: bool,
                   max_context: int | None = None, text_input: str | None = None) -> dict:
    """The `bayling` model's inputs for one request; raises InvalidInput (with .field) before sending."""
    given = {k: v for k, v in params.items() if v is not None}
    validate(given, max_context=max_context)   # the server's limits; the server applies its own defaults
    values: dict = {}
    if text_input is not None:
        if not text_input.strip():
            raise InvalidInput("text_input", "is empty")
        values["text_input"] = text_input
    else:
        values["messages"] = json.dumps(as_messages(messages), ensure_ascii=False)
    for name, value in given.items():
        if name in ("stop_words", "bad_words"):
            value = [value] if isinstance(value, str) else list(value)
            if not value:
                continue
        if name == "logit_bias":
            if not value:
                continue
            value = json.dumps(value)          # the model takes {token_id: bias} as JSON
        values[name] = value
    values["stream"] = stream
    return values


def outputs_from_arrays(arrays: dict) -> dict:
    """Numpy outputs of one response -> plain values (text_output, finish_reason, token counts)."""
    out = {}
    for name, array in arrays.items():
        if array is None or not array.size:
            continue
        value = array.reshape(-1)[0]
        out[name] = value.decode("utf-8") if isinstance(value, bytes) else value.item()
    return out


class ChatStream:
    """Text pieces of one streamed answer. Iterate it; `result` is set once the server finished.
    `close()` (or leaving a `with` block, or breaking out and dropping it) cancels on the server."""

    def __init__(self, responses: Iterator[tuple[dict, bool]]):
        self._responses = responses
        self._pieces: list[str] = []
        self.logprobs: list[dict] | None = None     # token entries so far, when asked for
        self.result: ChatResult | None = None

    @property
    def text(self) -> str:
        """Everything received so far."""
        return "".join(self._pieces)

    def __iter__(self) -> "ChatStream":
        return self

    def __next__(self) -> str:
        while True:
            outputs, final = next(self._responses)          # StopIteration ends the iteration
            piece = outputs.get("text_output", "")
            if piece:
                self._pieces.append(piece)
            self.logprobs = add_token_logprobs(outputs, self.logprobs)
            if final:
                self.result = final_result(self.text, outputs, self.logprobs)
            if piece:
                return piece

    def close(self) -> None:
        self._responses.close()

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def final_result(text: str, outputs: dict, logprobs: list[dict] | None = None) -> ChatResult:
    return ChatResult(text=text, finish_reason=outputs.get("finish_reason") or "cancelled",
                      prompt_tokens=int(outputs.get("prompt_tokens", 0)),
                      completion_tokens=int(outputs.get("completion_tokens", 0)), logprobs=logprobs)


def add_token_logprobs(outputs: dict, into: list[dict] | None) -> list[dict] | None:
    """The response's `token_logprobs` (JSON) appended to `into`; None while none came."""
    given = outputs.get("token_logprobs")
    if given is None:
        return into
    into = [] if into is None else into
    into.extend(json.loads(given))
    return into


def parse_url(url: str, protocol: str | None) -> tuple[str, str]:
    """"host:port", "grpc://host:port" or "http://host:port" -> (protocol, host:port)."""
    scheme, sep, rest = url.partition("://")
    if sep:
        if scheme not in ("grpc", "http"):
            raise BaylingError(f"unsupported URL scheme {scheme!r} in {url!r}; use grpc:// or http://")
        if protocol and protocol != scheme:
            raise BaylingError(f"URL {url!r} does not match protocol {protocol!r}")
        return scheme, rest.rstrip("/")
    protocol = protocol or "grpc"
    if protocol not in ("grpc", "http"):
        raise BaylingError(f"protocol must be grpc or http, got {protocol!r}")
    return protocol, url.rstrip("/")


def model_info_from_config(config: dict) -> ModelInfo:
    """The `bayling` model config (JSON form) -> ModelInfo; missing parameters give None."""
    params = config.get("parameters") or {}

    def get(key):
        value = (params.get(key) or {}).get("string_value")
        return value or None

    max_context = get("max_context")
    return ModelInfo(model_name=get("model_name"), engine=get("engine"), template=get("template"),
                     max_context=int(max_context) if max_context and max_context.isdigit() else None,
                     triton_model=config.get("name") or MODEL)


def backoff_delays(retries: int, backoff: float, cap: float = 10.0) -> list[float]:
    """Exponential backoff with a little jitter: backoff, 2*backoff, 4*backoff ... (capped)."""
    return [min(cap, backoff * 2 ** i) * (1 + 0.1 * random.random()) for i in range(retries)]


# --- several servers: targets, endpoints and the balancing policy (no I/O; shared by both clients)

BALANCE_POLICIES = ("least_requests", "round_robin")
RESOLVE_EVERY = 10.0        # seconds between DNS lookups of a dns:/// target
DOWN_S, MAX_DOWN_S = 0.5, 5.0   # an address that answered UNAVAILABLE is skipped this long (doubling)


@dataclass(frozen=True)
class Targets:
    """Where the servers are: a fixed list of host:port, or one DNS name (`dns:///name:port`, e.g. a
    Kubernetes headless Service) that stands for every address it resolves to."""
    protocol: str
    addresses: tuple[str, ...] = ()
    dns_name: str | None = None
    dns_port: int | None = None

    def __str__(self) -> str:
        return f"dns:///{self.dns_name}:{self.dns_port}" if self.dns_name else ",".join(self.addresses)


def _host_port(text: str, url: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BaylingError(f"{url!r}: a server address is host:port, got {text!r}")
    return host, int(port)


def parse_targets(url: str, protocol: str | None) -> Targets:
    """"host:port", "http://host:port", a comma-separated list of those, or "dns:///name:port"
    (the gRPC name syntax: every address the name resolves to, looked up again every 10 s)."""
    if url.startswith("dns:"):
        name = url[4:].removeprefix("//").lstrip("/")   # dns:///name:port (no DNS authority) or dns:name:port
        host, port = _host_port(name.rstrip("/"), url)
        if "," in host:
            raise BaylingError(f"{url!r}: one dns:/// target names every server; do not list several")
        return Targets(protocol or "grpc", dns_name=host, dns_port=port)
    parts = [p.strip() for p in url.split(",")]
    if not all(parts):
        raise BaylingError(f"{url!r}: an empty server address in the list")
    parsed = [parse_url(p, protocol) for p in parts]
    protocols = {p for p, _ in parsed}
    if len(protocols) > 1:
        raise BaylingError(f"{url!r}: the servers of one client speak one protocol (grpc or http)")
    if len(parsed) > 1:
        for _, address in parsed:
            _host_port(address, url)
    return Targets(parsed[0][0], addresses=tuple(dict.fromkeys(a for _, a in parsed)))


def addresses_from_addrinfo(infos, port: int) -> list[str]:
    """socket.getaddrinfo results -> "ip:port" / "[ipv6]:port", in order, without repeats."""
    out = []
    for family, *_, sockaddr in infos:
        ip = sockaddr[0]
        out.append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    return list(dict.fromkeys(out))


@dataclass(eq=False)
class Endpoint:
    """One server address and what the client knows of it."""
    address: str
    transport: object = None
    in_flight: int = 0
    down_until: float = 0.0     # monotonic time before which it is not picked (unless all are down)
    failures: int = 0           # UNAVAILABLE answers in a row
    removed: bool = False       # no longer resolved: closed once idle


class Balancer:
    """Which server gets the next request: the fewest requests in flight (least_requests, ties in
    turn) or strictly in turn (round_robin), skipping for a while an address that answered
    UNAVAILABLE. Thread-safe; called once per request, not per token."""

    def __init__(self, policy: str = "least_requests"):
        if policy not in BALANCE_POLICIES:
            raise BaylingError(f"balance policy must be one of {', '.join(BALANCE_POLICIES)}, got {policy!r}")
        self.policy = policy
        self.endpoints: list[Endpoint] = []
        self._turn = 0
        self._lock = threading.Lock()

    def update(self, addresses, make_transport) -> list[Endpoint]:
        """Make the endpoints these addresses (kept ones keep their state); returns the dropped
        endpoints that are idle now (close their transports); busy ones are closed by `finished`."""
        with self._lock:
            by_address = {e.address: e for e in self.endpoints}
            kept = [by_address.pop(a, None) or Endpoint(a, make_transport(a)) for a in addresses]
            self.endpoints = kept
            for gone in by_address.values():
                gone.removed = True
            return [e for e in by_address.values() if e.in_flight == 0]

    def pick(self, tried=(), now: float | None = None) -> Endpoint | None:
        """The endpoint for a request that already failed on `tried` (None when every one was tried);
        counts it in flight."""
        now = time.monotonic() if now is None else now
        with self._lock:
            n = len(self.endpoints)
            order = [self.endpoints[(self._turn + i) % n] for i in range(n)] if n else []
            candidates = [e for e in order if e not in tried]
            if not candidates:
                return None
            up = [e for e in candidates if e.down_until <= now]
            if not up:                   # all marked down: the one that has been down the longest
                chosen = min(candidates, key=lambda e: e.down_until)
            elif self.policy == "least_requests":
                chosen = min(up, key=lambda e: e.in_flight)   # the first of equals: the next in turn
            else:
                chosen = up[0]
            self._turn = (self.endpoints.index(chosen) + 1) % n
            chosen.in_flight += 1
            return chosen

    def failed(self, endpoint: Endpoint, now: float | None = None) -> None:
        """It answered UNAVAILABLE (refused, reset, shutting down): skip it for a while."""
        now = time.monotonic() if now is None else now
        with self._lock:
            endpoint.down_until = now + min(MAX_DOWN_S, DOWN_S * 2 ** endpoint.failures)
            endpoint.failures += 1

    def succeeded(self, endpoint: Endpoint) -> None:
        with self._lock:
            endpoint.failures, endpoint.down_until = 0, 0.0

    def finished(self, endpoint: Endpoint) -> bool:
        """The request is over; True when the endpoint was dropped and is idle now (close it)."""
        with self._lock:
            endpoint.in_flight -= 1
            return endpoint.removed and endpoint.in_flight == 0

    def all_endpoints(self) -> list[Endpoint]:
        with self._lock:
            return list(self.endpoints)


def grpc_channel_args(grpcclient) -> list[tuple]:
    """tritonclient's own channel options, plus gRPC reconnection no slower than the balancer retries
    an address (gRPC's default backoff grows to 120 s: a restarted server would wait that long)."""
    keepalive = grpcclient.KeepAliveOptions()
    return [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            ("grpc.initial_reconnect_backoff_ms", int(DOWN_S * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(DOWN_S * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(MAX_DOWN_S * 1000))]


def no_server_error(targets: Targets) -> BayLingServerError:
    return BayLingServerError("UNAVAILABLE", f"{targets}: no server address (the name resolves to nothing)")


# --- the wire: shared by the sync and asyncio transports

def grpc_inputs(grpcclient, values: dict) -> list:
    """tritonclient InferInputs for one request to the entry model (`grpcclient`: tritonclient.grpc)."""
    inputs = []
    for name, array in contract.request_arrays(MODEL, values).items():
        tensor = grpcclient.InferInput(name, list(array.shape), contract.tensor(MODEL, name).wire_dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def grpc_outputs(result) -> tuple[dict, bool]:
    """(outputs, final) of one streamed gRPC InferResult."""
    response = result.get_response()
    final = response.parameters["triton_final_response"].bool_param
    outputs = outputs_from_raw(response.outputs, response.raw_output_contents)
    if outputs is None:
        outputs = outputs_from_arrays({o.name: result.as_numpy(o.name) for o in response.outputs})
    return outputs, final


_RAW_SCALARS = {"BOOL": struct.Struct("?"), "INT32": struct.Struct("<i"), "INT64": struct.Struct("<q"),
                "FP32": struct.Struct("<f")}


def outputs_from_raw(outputs, contents) -> dict | None:
    """As `outputs_from_arrays`, read straight from a response's raw tensors (no numpy per token): the
    first element of each non-empty one. A BYTES element is its 4-byte little-endian length, then
    the bytes: b"\\x02\\x00\\x00\\x00hi" -> "hi". None where it cannot (a type it does not read, such
    as FP16, or no raw contents): then read through numpy."""
    if len(contents) != len(outputs):
        return None
    out = {}
    for tensor, raw in zip(outputs, contents):
        if not raw:
            continue
        if tensor.datatype == "BYTES":
            out[tensor.name] = raw[4:4 + int.from_bytes(raw[:4], "little")].decode("utf-8")
        elif tensor.datatype in _RAW_SCALARS:
            out[tensor.name] = _RAW_SCALARS[tensor.datatype].unpack_from(raw)[0]
        else:
            return None
    return out


def sse_event(line: str) -> tuple[dict, bool] | None:
    """(event, final) of one line of Triton's generate_stream; None for a line that is not an event."""
    if not line.startswith("data:"):
        return None
    event = json.loads(line[5:])
    if "error" in event:
        raise BayLingServerError("INTERNAL", str(event["error"]))
    return event, bool(event.get("finish_reason"))


def httpx_options(httpx, timeout: float) -> dict:
    return {"timeout": httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            "limits": httpx.Limits(max_connections=256, max_keepalive_connections=64)}


# --- transports: each yields (outputs, final) for one request

class _GrpcTransport:
    def __init__(self, address: str):
        import tritonclient.grpc as grpcclient

        self._grpcclient = grpcclient
        self.address = address
        # One tritonclient client holds one stream at a time: keep idle ones for reuse.
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._channel_args = grpc_channel_args(grpcclient)
        self._control = grpcclient.InferenceServerClient(address, channel_args=self._channel_args)

    def responses(self, values: dict, timeout: float) -> Iterator[tuple[dict, bool]]:
        inputs = grpc_inputs(self._grpcclient, values)
        try:
            client = self._idle.get_nowait()
        except queue.Empty:
            client = self._grpcclient.InferenceServerClient(self.address, channel_args=self._channel_args)
        answers: queue.Queue = queue.Queue()
        finished = False
        try:
            client.start_stream(callback=lambda result, error: answers.put((result, error)),
                                stream_timeout=timeout)
            try:
                client.async_stream_infer(MODEL, inputs, enable_empty_final_response=True)
            except self._grpcclient.InferenceServerException:
                # the stream already failed (e.g. connection refused): its callback has the reason
                try:
                    result, error = answers.get(timeout=5)
                except queue.Empty:
                    raise
                if error is None:
                    raise
                raise stream_error(error.status(), error.message()) from None
            while True:
                try:
                    result, error = answers.get(timeout=timeout + 5)
                except queue.Empty:
                    raise BayLingServerError("DEADLINE_EXCEEDED", f"no answer within {timeout:g} s") from None
                if error is not None:
                    raise stream_error(error.status(), error.message())
                outputs, final = grpc_outputs(result)
                if final:
                    finished = True
                yield outputs, final
                if final:
                    return
        except self._grpcclient.InferenceServerException as exc:
            raise grpc_status_error(exc.status() or "UNAVAILABLE", exc.message()) from None
        finally:
            # not finished: the caller left early (or it failed): cancel the request on the server
            try:
                client.stop_stream(cancel_requests=not finished)
            finally:
                if finished:
                    self._idle.put(client)
                else:
                    client.close()

    def health(self, timeout: float) -> bool:
        try:
            return bool(self._control.is_server_ready(client_timeout=timeout)
                        and self._control.is_model_ready(MODEL, client_timeout=timeout))
        except self._grpcclient.InferenceServerException:
            return False

    def model_config(self, timeout: float) -> dict:
        try:
            return self._control.get_model_config(MODEL, as_json=True, client_timeout=timeout)["config"]
        except self._grpcclient.InferenceServerException as exc:
            raise grpc_status_error(exc.status() or "UNAVAILABLE", exc.message()) from None

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break
        self._control.close()


class _HttpTransport:
    def __init__(self, address: str, timeout: float):
        import httpx

        self._httpx = httpx
        self.base = f"http://{address}"
        self._client = httpx.Client(**httpx_options(httpx, timeout))

    def _call(self, fn):
        httpx = self._httpx
        try:
            return fn()
        except httpx.TimeoutException as exc:
            raise BayLingServerError("DEADLINE_EXCEEDED", f"{type(exc).__name__}: {exc}") from None
        except httpx.TransportError as exc:
            raise BayLingServerError("UNAVAILABLE", f"{self.base}: {type(exc).__name__}: {exc}") from None

    def responses(self, values: dict, timeout: float) -> Iterator[tuple[dict, bool]]:
        """Always Triton's generate_stream: closing an SSE connection is what cancels a request on the
        server (a non-streamed `generate` runs to its end when the client leaves). A non-streamed
        request is asked for streamed and answered as one final response (the pieces join exactly)."""
        if not values.get("stream"):
            pieces: list[str] = []
            logprobs = None
            with closing(self.responses({**values, "stream": True}, timeout)) as events:
                for event, final in events:
                    pieces.append(event.get("text_output", ""))
                    logprobs = add_token_logprobs(event, logprobs)
                    if final:
                        joined = {} if logprobs is None else {"token_logprobs": json.dumps(logprobs)}
                        yield {**event, "text_output": "".join(pieces), **joined}, True
            return
        deadline = time.monotonic() + timeout
        request = self._client.build_request("POST", f"{self.base}/v2/models/{MODEL}/generate_stream",
                                             json=values, timeout=timeout)
        response = self._call(lambda: self._client.send(request, stream=True))
        try:
            if response.status_code != 200:
                raise http_error(response.status_code, self._call(response.read).decode("utf-8", "replace")
                                 .removeprefix("data: "))
            lines = response.iter_lines()
            while True:
                line = self._call(lambda: next(lines, None))
                if line is None:
                    return                   # the server closed the stream without a final answer
                parsed = sse_event(line)
                if parsed is None:
                    continue
                event, final = parsed
                yield event, final
                if final:
                    return
                if time.monotonic() > deadline:
                    raise BayLingServerError("DEADLINE_EXCEEDED", f"no complete answer within {timeout:g} s")
        finally:
            response.close()                 # closing the connection early cancels on the server

    def health(self, timeout: float) -> bool:
        try:
            return all(self._client.get(f"{self.base}{path}", timeout=timeout).status_code == 200
                       for path in ("/v2/health/ready", f"/v2/models/{MODEL}/ready"))
        except self._httpx.HTTPError:
            return False

    def model_config(self, timeout: float) -> dict:
        response = self._call(lambda: self._client.get(f"{self.base}/v2/models/{MODEL}/config", timeout=timeout))
        if response.status_code != 200:
            raise http_error(response.status_code, response.text)
        return response.json()

    def close(self) -> None:
        self._client.close()


class BayLingClient:
    """A client of one BayLing server, or of several that serve the same model; thread-safe
    (requests may run concurrently)."""

    def __init__(self, url: str = "localhost:8001", protocol: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = 3, backoff: float = 0.5, validate_max_tokens: bool = True,
                 balance: str = "least_requests", resolve_every: float = RESOLVE_EVERY):
        """`url` is host:port (or grpc://..., http://...), a comma-separated list of them, or
        dns:///name:port (every address of the name, e.g. a headless Service; looked up again every
        `resolve_every` seconds). Requests are spread over the servers by `balance` ("least_requests":
        the fewest in flight; "round_robin"); one refused as UNAVAILABLE before its first response
        goes to another server. `timeout` bounds each request in seconds; non-streaming calls are
        retried `retries` more times with exponential backoff while every server is UNAVAILABLE."""
        self.targets = parse_targets(url, protocol)
        self.protocol, self.address = self.targets.protocol, str(self.targets)
        self.url = url
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._balancer = Balancer(balance)
        self._resolve_every = resolve_every
        self._next_resolve = 0.0
        self._resolving = threading.Lock()
        if not self.targets.dns_name:
            self._balancer.update(self.targets.addresses, self._transport)
        self._max_context: int | None = None
        self._check_context = validate_max_tokens
        self._lock = threading.Lock()

    def _transport(self, address: str):
        return _GrpcTransport(address) if self.protocol == "grpc" else _HttpTransport(address, self.timeout)

    # -- which server

    def _resolve(self, force: bool = False) -> None:
        """Look the dns:/// name up when due (by one thread; the others go on with what is known)."""
        if not self.targets.dns_name:
            return
        now = time.monotonic()
        known = bool(self._balancer.endpoints)
        if known and now < self._next_resolve and not force:
            return
        if not self._resolving.acquire(blocking=not known):
            return
        try:
            if known and time.monotonic() < self._next_resolve and not force:
                return
            import socket

            try:
                infos = socket.getaddrinfo(self.targets.dns_name, self.targets.dns_port, type=socket.SOCK_STREAM)
            except OSError:
                infos = None                      # keep what was known; retried at the next request
            self._next_resolve = time.monotonic() + (self._resolve_every if infos else 1.0)
            if infos:
                for idle in self._balancer.update(addresses_from_addrinfo(infos, self.targets.dns_port),
                                                  self._transport):
                    idle.transport.close()
        finally:
            self._resolving.release()

    def servers(self) -> list[str]:
        """The addresses requests are spread over now."""
        self._resolve()
        return [e.address for e in self._balancer.all_endpoints()]

    def _responses(self, values: dict) -> Iterator[tuple[dict, bool]]:
        """One request's responses from the server the balancer picks; UNAVAILABLE before the first
        response moves it to the next server (each is tried once), after it is the caller's error."""
        self._resolve()
        tried: list[Endpoint] = []
        last: BayLingServerError = no_server_error(self.targets)
        while True:
            endpoint = self._balancer.pick(tried)
            if endpoint is None:
                raise last
            started = False
            try:
                with closing(endpoint.transport.responses(values, self.timeout)) as responses:
                    for item in responses:
                        started = True
                        yield item
                self._balancer.succeeded(endpoint)
                return
            except BayLingServerError as exc:
                if exc.status != "UNAVAILABLE":
                    raise
                self._balancer.failed(endpoint)
                if started:
                    raise
                tried.append(endpoint)
                last = exc
                if len(tried) == 1:
                    self._resolve(force=True)                     # a pod may have gone: look again
            finally:
                if self._balancer.finished(endpoint):
                    endpoint.transport.close()

    def _each_server(self, call):
        """call(transport) on the servers in the balancer's order until one answers (health, config)."""
        self._resolve()
        tried: list[Endpoint] = []
        last: BayLingServerError = no_server_error(self.targets)
        while (endpoint := self._balancer.pick(tried)) is not None:
            try:
                return call(endpoint.transport)
            except BayLingServerError as exc:
                if exc.status != "UNAVAILABLE":
                    raise
                last = exc
                tried.append(endpoint)
            finally:
                if self._balancer.finished(endpoint):
                    endpoint.transport.close()
        raise last

    # -- generation

    def chat(self, messages: str | Sequence[dict], **params) -> ChatResult:
        """The whole answer to a conversation ([{role, content}, ...], or one user message as a string)."""
        values = request_values(messages, params, stream=False, max_context=self._context())
        return self._complete(values)

    def complete(self, prompt: str, **params) -> ChatResult:
        """Raw completion of `prompt` (no chat template)."""
        values = request_values(None, params, stream=False, max_context=self._context(), text_input=prompt)
        return self._complete(values)

    def stream_chat(self, messages: str | Sequence[dict], **params) -> ChatStream:
        """The answer as it is generated: iterate the returned ChatStream for text pieces."""
        values = request_values(messages, params, stream=True, max_context=self._context())
        return ChatStream(self._responses(values))

    def stream_complete(self, prompt: str, **params) -> ChatStream:
        values = request_values(None, params, stream=True, max_context=self._context(), text_input=prompt)
        return ChatStream(self._responses(values))

    def _complete(self, values: dict) -> ChatResult:
        delays = backoff_delays(self.retries, self.backoff)
        while True:
            try:
                with ChatStream(self._responses(values)) as stream:
                    for _ in stream:
                        pass
                    if stream.result is None:
                        raise BayLingServerError("UNAVAILABLE", "the server closed the stream without an answer")
                    return stream.result
            except BayLingServerError as exc:
                if exc.status != "UNAVAILABLE" or not delays:
                    raise
                time.sleep(delays.pop(0))

    # -- server

    def health(self) -> bool:
        """True when a server (any of them) and its `bayling` model are ready; never raises."""
        def ready(transport):
            if not transport.health(min(self.timeout, 10.0)):
                raise BayLingServerError("UNAVAILABLE", "not ready")
            return True
        try:
            return self._each_server(ready)
        except BayLingServerError:
            return False

    def model_info(self) -> ModelInfo:
        """What the server says about the model: name, engine kind, template, context length."""
        delays = backoff_delays(self.retries, self.backoff)
        while True:
            try:
                return model_info_from_config(self._each_server(lambda t: t.model_config(min(self.timeout, 30.0))))
            except BayLingServerError as exc:
                if exc.status != "UNAVAILABLE" or not delays:
                    raise
                time.sleep(delays.pop(0))

    def _context(self) -> int | None:
        """The server's context length, asked once (for max_tokens checks); None if unknown."""
        if not self._check_context:
            return None
        with self._lock:
            if self._max_context is None:
                try:
                    self._max_context = model_info_from_config(
                        self._each_server(lambda t: t.model_config(min(self.timeout, 10.0)))).max_context or 0
                except BayLingServerError:
                    return None              # unknown for now: the server still checks
            return self._max_context or None

    def close(self) -> None:
        for endpoint in self._balancer.all_endpoints():
            endpoint.transport.close()

    def __enter__(self) -> "BayLingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
