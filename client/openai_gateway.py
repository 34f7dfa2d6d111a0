"""OpenAI-compatible HTTP gateway in front of a BayLing Triton server.

Tools that speak the OpenAI API talk to BayLing through it: POST /v1/chat/completions and
POST /v1/completions (streamed as server-sent events ending with `data: [DONE]`, or not),
GET /v1/models and GET /health. It maps max_tokens (or max_completion_tokens), temperature,
top_p, stop, seed, presence_penalty and frequency_penalty (the CPU engine refuses non-zero
penalties), plus the extensions top_k, repetition_penalty, min_tokens and ignore_eos (as vLLM's). Unsupported
parameters (n > 1, logprobs, tools, response_format other than text, ...) answer 400 with an
OpenAI-style error naming the parameter. A client that disconnects mid-stream cancels the
generation on the server. With --api-key (or BAYLING_API_KEY), /v1 needs `Authorization: Bearer KEY`.
A request body over --max-request-bytes (8 MiB by default) answers 413 before more of it is read.

examples:
  bayling openai --port 9000 --url localhost:8001
  BAYLING_API_KEY=secret bayling openai --host 0.0.0.0 --port 9000 --url triton:8001
  bayling openai --url dns:///bayling-headless:8001     # every pod of a headless Service, per request
  bayling openai --url 10.0.0.5:8001,10.0.0.6:8001 --balance round_robin

  from openai import OpenAI
  client = OpenAI(base_url="http://localhost:9000/v1", api_key="secret")
  client.chat.completions.create(model="bayling", messages=[{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import time
import uuid

from bayling.client.library import BALANCE_POLICIES
from bayling.errors import BaylingError
from bayling.params import NO_END_ID, validate
from bayling.templates import shown

# BayLing request field -> the OpenAI parameter users wrote
OPENAI_PARAM = {"random_seed": "seed", "stop_words": "stop", "min_length": "min_tokens", "text_input": "prompt"}
UNSUPPORTED_ALWAYS = {"tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
                      "function_call": "function calling", "logit_bias": "logit_bias", "audio": "audio output",
                      "modalities": "output modalities", "prediction": "predicted outputs",
                      "web_search_options": "web search", "suffix": "a suffix (insertion)"}
# Request bodies above this get 413 before more is read: twice the server's MAX_MESSAGES_BYTES of
# conversation, since JSON clients may escape every non-ASCII character as \uXXXX (6 bytes, not 3).
MAX_REQUEST_BYTES = 8 * 2**20
INT32_MAX = 2**31 - 1        # top_k's tensor type; the shared validation sets no upper bound
STATUS_HTTP = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429,
               "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "CANCELLED": 499}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unsupported(param: str, what: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {what} is not supported by BayLing", param, code="unsupported_parameter")


def integer(body: dict, name: str) -> int | None:
    """An integer parameter that only the gateway reads (n, best_of), or None when not given."""
    value = body.get(name)
    if value is None:
        return None
    fraction = isinstance(value, float) and not value.is_integer()    # inf and nan too
    if isinstance(value, bool) or not isinstance(value, (int, float)) or fraction:
        raise OpenAIError(400, f"{name}: must be an integer, got {shown(value)}", name, code="invalid_value")
    return int(value)


def from_bayling_error(exc: BaylingError, given: dict | None = None) -> OpenAIError:
    """Client-side InvalidInput or the server's error -> an OpenAI error naming the parameter."""
    field = getattr(exc, "field", None)
    param = OPENAI_PARAM.get(field, field)
    if field == "max_tokens" and given and given.get("max_completion_tokens") is not None:
        param = "max_completion_tokens"
    message = getattr(exc, "message", None) or str(exc)
    if field:   # a request field is wrong, whatever transport status carried it
        return OpenAIError(400, message.replace(f"{field}: ", f"{param}: ", 1), param, code="invalid_value")
    status = STATUS_HTTP.get(getattr(exc, "status", ""), 500)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return OpenAIError(status, message, None, kind, code=getattr(exc, "status", None))


def check_common(body: dict) -> None:
    """Refuse what BayLing cannot do, naming the parameter."""
    for name, what in UNSUPPORTED_ALWAYS.items():
        if body.get(name) not in (None, [], {}, "none", ""):
            raise unsupported(name, what)
    if integer(body, "n") not in (None, 1):
        raise unsupported("n", "more than one choice (n > 1)")
    if body.get("logprobs") not in (None, False):
        raise unsupported("logprobs", "returning log probabilities")
    if body.get("top_logprobs") is not None:
        raise unsupported("top_logprobs", "returning log probabilities")
    if integer(body, "best_of") not in (None, 1):
        raise unsupported("best_of", "best_of > 1")
    if body.get("echo"):
        raise unsupported("echo", "echoing the prompt")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise unsupported("response_format", "a response format other than text")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise OpenAIError(400, "stream: must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not body.get("stream")):
        raise OpenAIError(400, "stream_options: only allowed with stream true, as an object", "stream_options")


def generation_params(body: dict, default_max_tokens: int | None = None) -> dict:
    """OpenAI body -> BayLing generation parameters (bayling.params names)."""
    params: dict = {}
    max_tokens = body.get("max_completion_tokens")
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    params["max_tokens"] = max_tokens if max_tokens is not None else default_max_tokens
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "repetition_penalty"):
        params[name] = body.get(name)
    for name in ("presence_penalty", "frequency_penalty"):   # 0 means off: do not send it to an engine without them
        if params[name] == 0 and not isinstance(params[name], bool):
            params[name] = None
    params["random_seed"] = body.get("seed")
    params["min_length"] = body.get("min_tokens")
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise OpenAIError(400, "ignore_eos: must be true or false", "ignore_eos")
    if ignore_eos:
        params["end_id"] = NO_END_ID   # generate max_tokens tokens
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise OpenAIError(400, "stop: must be a string or a list of strings", "stop")
        params["stop_words"] = stop or None
    params = {k: v for k, v in params.items() if v is not None}
    top_k = params.get("top_k")
    if isinstance(top_k, (int, float)) and not isinstance(top_k, bool) and top_k > INT32_MAX:
        raise OpenAIError(400, f"top_k: must be at most {INT32_MAX}, got {shown(top_k)}", "top_k", code="invalid_value")
    validate(params)   # before the messages are read: a wrong parameter is named whatever they hold
    return params


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "messages: must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise OpenAIError(400, f"messages[{i}]: must be an object", "messages")
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise OpenAIError(400, f"messages[{i}]: role {shown(message.get('role'))} is not supported "
                                   "(system, developer, user, assistant)", "messages")
        content = message.get("content")
        if isinstance(content, list):       # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = shown(part.get("type")) if isinstance(part, dict) else shown(part)
                    raise OpenAIError(400, f"messages[{i}]: content part {kind} is not supported (text only)",
                                      "messages")
                if not isinstance(part.get("text"), str):
                    raise OpenAIError(400, f"messages[{i}]: a text part needs a string text", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise OpenAIError(400, f"messages[{i}]: content must be a string or text parts", "messages")
        out.append({"role": role, "content": content})
    return out


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise OpenAIError(400, "prompt: must be a string (one prompt; token ids and batches are not supported)",
                          "prompt")
    return prompt


def usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(url: str = "localhost:8001", protocol: str | None = None, *, api_key: str | None = None,
               model_id: str | None = None, timeout: float = 600, max_request_bytes: int = MAX_REQUEST_BYTES,
               balance: str = "least_requests"):
    """The Starlette application; `url` is the Triton server (gRPC host:port or http://host:port), or
    several (a comma-separated list, or dns:///name:port), requests spread over them by `balance`."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from bayling.client.aio import AsyncBayLingClient

    state: dict = {"client": None, "model": model_id, "created": int(time.time())}

    def client() -> AsyncBayLingClient:
        if state["client"] is None:        # made inside the server's event loop
            state["client"] = AsyncBayLingClient(url, protocol, timeout=timeout, retries=2, balance=balance)
        return state["client"]

    async def served_model() -> str:
        if not state["model"]:
            try:
                state["model"] = (await client().model_info()).model_name or "bayling"
            except BaylingError:
                return "bayling"
        return state["model"]

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())

    def error(exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def read_limited(request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to pass max_request_bytes: by its
        Content-Length before reading, or while reading a chunked one."""
        too_large = OpenAIError(413, f"the request body is larger than {max_request_bytes} bytes, the most accepted",
                                None, code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_request_bytes:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_request_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_body(request: Request) -> dict:
        if not authorized(request):
            raise OpenAIError(401, "Incorrect API key provided.", None, code="invalid_api_key")
        raw = await read_limited(request)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise OpenAIError(400, "the request body is not valid JSON") from None
        except RecursionError:
            raise OpenAIError(400, "the request body is not valid JSON: nested too deeply") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the request body must be a JSON object")
        if not isinstance(body.get("model"), str):
            raise OpenAIError(400, "model: is required (any name: BayLing serves one model)", "model")
        check_common(body)
        return body

    async def health(request: Request) -> JSONResponse:
        ready = await client().health()
        return JSONResponse({"status": "ok" if ready else "unavailable", "server_ready": ready,
                             "model": await served_model() if ready else None},
                            status_code=200 if ready else 503)

    async def models(request: Request) -> JSONResponse:
        if not authorized(request):
            return error(OpenAIError(401, "Incorrect API key provided.", None, code="invalid_api_key"))
        model = {"id": await served_model(), "object": "model", "created": state["created"], "owned_by": "bayling"}
        if request.path_params.get("model") not in (None, model["id"]):
            return error(OpenAIError(404, f"The model '{request.path_params['model']}' does not exist", "model",
                                     code="model_not_found"))
        return JSONResponse(model if "model" in request.path_params else {"object": "list", "data": [model]})

    async def generate(request: Request, chat: bool):
        body: dict = {}
        try:
            body = await read_body(request)
            params = generation_params(body, None if chat else 16)   # OpenAI's completions default: 16 tokens
            messages = chat_messages(body) if chat else None
            prompt = None if chat else completion_prompt(body)
            # checked here, before anything is streamed (the same limits as the server)
            if chat:
                stream = client().stream_chat(messages, **params)
            else:
                stream = client().stream_complete(prompt, **params)
            model = await served_model()
            # the first piece (or the server's refusal) before answering: errors become proper 4xx
            first = await first_piece(stream)
        except OpenAIError as exc:
            return error(exc)
        except BaylingError as exc:
            return error(from_bayling_error(exc, body))
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if not body.get("stream"):
            try:
                async for _ in stream:
                    pass
            except BaylingError as exc:
                return error(from_bayling_error(exc, body))
            finally:
                await stream.aclose()
            result = stream.result
            choice = ({"index": 0, "message": {"role": "assistant", "content": result.text},
                       "logprobs": None, "finish_reason": finish(result.finish_reason)} if chat else
                      {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish(result.finish_reason)})
            return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion",
                                 "created": created, "model": model, "choices": [choice], "usage": usage(result),
                                 "system_fingerprint": None})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(events(stream, first, chat, ident, created, model, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def events(stream, first, chat: bool, ident: str, created: int, model: str, include_usage: bool):
        """SSE chunks; if the client goes away, Starlette cancels this generator and `finally` cancels
        the request on the server."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if include_usage else {}

        def chunk(text: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant", "content": ""} if role else {"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            return sse({"id": ident, "object": kind, "created": created, "model": model, "choices": [choice],
                        "system_fingerprint": None, **extra})

        try:
            if chat:
                yield chunk(None, None, role=True)
            if first:
                yield chunk(first, None)
            try:
                async for piece in stream:
                    yield chunk(piece, None)
            except BaylingError as exc:
                yield sse(from_bayling_error(exc).body())
                yield sse("[DONE]")
                return
            result = stream.result
            yield chunk(None if chat else "", finish(result.finish_reason if result else "stop"))
            if include_usage and result:
                yield sse({"id": ident, "object": kind, "created": created, "model": model, "choices": [],
                           "system_fingerprint": None, "usage": usage(result)})
            yield sse("[DONE]")
        finally:
            await stream.aclose()       # a no-op when finished; cancels on the server otherwise

    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    async def completions(request: Request):
        return await generate(request, chat=False)

    async def shutdown() -> None:
        if state["client"] is not None:
            await state["client"].close()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        await shutdown()

    routes = [Route("/health", health, methods=["GET"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{model:path}", models, methods=["GET"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan)


async def first_piece(stream) -> str:
    """The stream's first text piece ("" if it ended without one); raises the server's refusal."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="localhost:8001",
                        help="Triton server: host:port of gRPC, or http://host:port; several: a comma-separated "
                             "list, or dns:///NAME:PORT for every address of NAME (a headless Service)")
    parser.add_argument("--balance", choices=BALANCE_POLICIES, default="least_requests",
                        help="how requests are spread over several servers (default least_requests: the fewest "
                             "in flight; round_robin: in turn)")
    parser.add_argument("--protocol", choices=("grpc", "http"))
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="port to listen on (default 9000)")
    parser.add_argument("--api-key", default=os.environ.get("BAYLING_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $BAYLING_API_KEY, else no key)")
    parser.add_argument("--model-id", help="model id to report (default: the server's model name)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request (default 600)")
    parser.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES, metavar="N",
                        help=f"largest request body accepted (default {MAX_REQUEST_BYTES}, 8 MiB); larger ones get 413")


def main(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ModuleNotFoundError:
        raise BaylingError("the gateway needs uvicorn and starlette: pip install 'bayling-deploy[client]'") from None
    from bayling.client.library import parse_targets

    parse_targets(args.url, args.protocol)      # a bad URL is a one-line error, before listening
    if args.max_request_bytes < 1024:
        raise BaylingError(f"--max-request-bytes must be at least 1024, got {args.max_request_bytes}")
    app = create_app(args.url, args.protocol, api_key=args.api_key, model_id=args.model_id, timeout=args.timeout,
                     max_request_bytes=args.max_request_bytes, balance=args.balance)
    print(f"OpenAI-compatible gateway: http://{args.host}:{args.port}/v1 -> {args.url}"
          f"{' (API key required)' if args.api_key else ''}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0

