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
GRPC_ERROR_HEADERS = {"triton_grpc_error": "true"}   # errors as gRPC status codes, not in-band messages
DEFAULT_TIMEOUT = 300.0


@dataclass
class ChatResult:
    text: str
    finish_reason: str          # stop, length or cancelled
    prompt_tokens: int
    completion_tokens: int


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
        head, sep, _ = message.partition(": ")
        self.field = head if sep and head.replace("_", "").isalnum() and head.islower() else None


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
            if final:
                self.result = final_result(self.text, outputs)
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


def final_result(text: str, outputs: dict) -> ChatResult:
    return ChatResult(text=text, finish_reason=outputs.get("finish_reason") or "cancelled",
                      prompt_tokens=int(outputs.get("prompt_tokens", 0)),
                      completion_tokens=int(outputs.get("completion_tokens", 0)))


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
    return outputs_from_arrays({o.name: result.as_numpy(o.name) for o in response.outputs}), final


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
        self._control = grpcclient.InferenceServerClient(address)

    def responses(self, values: dict, timeout: float) -> Iterator[tuple[dict, bool]]:
        inputs = grpc_inputs(self._grpcclient, values)
        try:
            client = self._idle.get_nowait()
        except queue.Empty:
            client = self._grpcclient.InferenceServerClient(self.address)
        answers: queue.Queue = queue.Queue()
        finished = False
        try:
            client.start_stream(callback=lambda result, error: answers.put((result, error)),
                                stream_timeout=timeout, headers=GRPC_ERROR_HEADERS)
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
                raise grpc_status_error(error.status(), error.message()) from None
            while True:
                try:
                    result, error = answers.get(timeout=timeout + 5)
                except queue.Empty:
                    raise BayLingServerError("DEADLINE_EXCEEDED", f"no answer within {timeout:g} s") from None
                if error is not None:
                    raise grpc_status_error(error.status(), error.message())
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
            with closing(self.responses({**values, "stream": True}, timeout)) as events:
                for event, final in events:
                    pieces.append(event.get("text_output", ""))
                    if final:
                        yield {**event, "text_output": "".join(pieces)}, True
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
    """A client of one BayLing server; thread-safe (requests may run concurrently)."""

    def __init__(self, url: str = "localhost:8001", protocol: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = 3, backoff: float = 0.5, validate_max_tokens: bool = True):
        """`url` is host:port (or grpc://..., http://...); `timeout` bounds each request in seconds;
        non-streaming calls are retried `retries` times with exponential backoff when UNAVAILABLE."""
        self.protocol, self.address = parse_url(url, protocol)
        self.url = url
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._transport = (_GrpcTransport(self.address) if self.protocol == "grpc"
                           else _HttpTransport(self.address, timeout))
        self._max_context: int | None = None
        self._check_context = validate_max_tokens
        self._lock = threading.Lock()

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
        return ChatStream(self._transport.responses(values, self.timeout))

    def stream_complete(self, prompt: str, **params) -> ChatStream:
        values = request_values(None, params, stream=True, max_context=self._context(), text_input=prompt)
        return ChatStream(self._transport.responses(values, self.timeout))

    def _complete(self, values: dict) -> ChatResult:
        delays = backoff_delays(self.retries, self.backoff)
        while True:
            try:
                with ChatStream(self._transport.responses(values, self.timeout)) as stream:
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
        """True when the server and the `bayling` model are ready; never raises."""
        return self._transport.health(min(self.timeout, 10.0))

    def model_info(self) -> ModelInfo:
        """What the server says about the model: name, engine kind, template, context length."""
        delays = backoff_delays(self.retries, self.backoff)
        while True:
            try:
                return model_info_from_config(self._transport.model_config(min(self.timeout, 30.0)))
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
                        self._transport.model_config(min(self.timeout, 10.0))).max_context or 0
                except BayLingServerError:
                    return None              # unknown for now: the server still checks
            return self._max_context or None

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "BayLingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
