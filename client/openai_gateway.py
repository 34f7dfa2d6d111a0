"""OpenAI-compatible HTTP gateway in front of a BayLing Triton server.

Tools that speak the OpenAI API talk to BayLing through it: POST /v1/chat/completions and
POST /v1/completions (streamed as server-sent events ending with `data: [DONE]`, or not),
GET /v1/models and GET /health. Requests are OpenAI's typed models (client/openai_protocol.py),
validated once here with OpenAI's ranges. It serves max_tokens (or max_completion_tokens),
temperature, top_p, stop, seed, n (several sequences, sampled independently), presence_penalty,
frequency_penalty, logit_bias, logprobs and top_logprobs (chat; `logprobs` 0-5 for completions),
echo, best_of and several prompts (completions), stream_options.include_usage, plus the
extensions top_k, repetition_penalty, min_tokens and ignore_eos (as vLLM's). Wrong or unsupported
parameters (tools, response_format other than text, ...) answer 400 with an OpenAI-style error
naming the parameter. A client that disconnects mid-stream cancels the
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
import asyncio
import hmac
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from bayling.client.library import BALANCE_POLICIES
from bayling.errors import BaylingError
from bayling.params import NO_END_ID, UINT64_MAX, validate

try:
    from bayling.client import openai_protocol as proto
    from bayling.client.openai_protocol import OpenAIError
except ModuleNotFoundError:      # pydantic: `bayling openai` says what to install (main)
    proto = None
    OpenAIError = Exception      # noqa: N816

# BayLing request field -> the OpenAI parameter users wrote
OPENAI_PARAM = {"random_seed": "seed", "stop_words": "stop", "min_length": "min_tokens", "text_input": "prompt"}
COMPLETIONS_PARAM = {**OPENAI_PARAM, "top_logprobs": "logprobs"}
# Request bodies above this get 413 before more is read: twice the server's MAX_MESSAGES_BYTES of
# conversation, since JSON clients may escape every non-ASCII character as \uXXXX (6 bytes, not 3).
MAX_REQUEST_BYTES = 8 * 2**20
COMPLETIONS_MAX_TOKENS = 16      # OpenAI's default for /v1/completions
STATUS_HTTP = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429,
               "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "CANCELLED": 499}


def from_bayling_error(exc: BaylingError, request=None, chat: bool = True) -> "OpenAIError":
    """Client-side InvalidInput or the server's error -> an OpenAI error naming the parameter."""
    field = getattr(exc, "field", None)
    names = OPENAI_PARAM if chat else COMPLETIONS_PARAM
    param = names.get(field, field)
    if field == "max_tokens" and getattr(request, "max_completion_tokens", None) is not None:
        param = "max_completion_tokens"
    message = getattr(exc, "message", None) or str(exc)
    if field:   # a request field is wrong, whatever transport status carried it
        return OpenAIError(400, message.replace(f"{field}: ", f"{param}: ", 1), param, code="invalid_value")
    status = STATUS_HTTP.get(getattr(exc, "status", ""), 500)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return OpenAIError(status, message, None, kind, code=getattr(exc, "status", None))


def generation_params(request, default_max_tokens: int | None = None) -> dict:
    """A typed OpenAI request -> BayLing generation parameters (bayling.params names), checked with the
    server's own limits."""
    max_tokens = request.max_new_tokens()
    top_k = request.top_k
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    params = {
        "max_tokens": max_tokens if max_tokens is not None else default_max_tokens,
        "temperature": request.temperature, "top_p": request.top_p,
        # 0 means off: no tensor for it
        "presence_penalty": request.presence_penalty or None, "frequency_penalty": request.frequency_penalty or None,
        "top_k": 0 if top_k == -1 else top_k, "repetition_penalty": request.repetition_penalty,
        "random_seed": request.seed, "min_length": request.min_tokens, "stop_words": stop or None,
        "logit_bias": request.logit_bias or None,
    }
    if request.ignore_eos:
        params["end_id"] = NO_END_ID   # generate max_tokens tokens
    if request.wants_logprobs:
        params["logprobs"] = True
        params["top_logprobs"] = request.top_count or None
    params = {k: v for k, v in params.items() if v is not None}
    validate(params)   # before the messages are read: a wrong parameter is named whatever they hold
    return params


@dataclass
class Job:
    """One sequence to generate: choice `index` of prompt `prompt_index`."""
    index: int
    prompt_index: int
    params: dict


def jobs_for(request, n_prompts: int, params: dict) -> list[Job]:
    """n sequences per prompt (best_of for completions), sampled independently: with a seed, sequence j
    uses seed + j, so that the choices differ and the answer repeats."""
    count = getattr(request, "best_of", None) or request.choices_per_prompt
    jobs = []
    for p in range(n_prompts):
        for j in range(count):
            job_params = dict(params)
            if "random_seed" in params and j:
                job_params["random_seed"] = (params["random_seed"] + j) % (UINT64_MAX + 1)
            jobs.append(Job(p * count + j, p, job_params))
    return jobs


def mean_logprob(result) -> float:
    entries = result.logprobs or []
    return sum(e["logprob"] for e in entries) / len(entries) if entries else float("-inf")


def usage(results: list, jobs: list[Job]) -> "proto.Usage":
    """Each prompt's tokens once, every generated sequence's tokens."""
    prompts: dict[int, int] = {}
    for job, result in zip(jobs, results):
        prompts.setdefault(job.prompt_index, result.prompt_tokens)
    prompt_tokens = sum(prompts.values())
    completion_tokens = sum(r.completion_tokens for r in results)
    return proto.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       total_tokens=prompt_tokens + completion_tokens)


def finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


_MARK = "\x00text\x00"


def filled_in(render: Callable[[str], str]) -> Callable[[str], str]:
    """`render(text)` without building models per token: render once with a marker for the text, then
    put each text in its place as a JSON string. filled_in(render)('a "b"') == render('a "b"')."""
    head, found, tail = render(_MARK).partition(json.dumps(_MARK, ensure_ascii=False))
    if not found:
        return render
    return lambda text: f"{head}{json.dumps(text, ensure_ascii=False)}{tail}"


def create_app(url: str = "localhost:8001", protocol: str | None = None, *, api_key: str | None = None,
               model_id: str | None = None, timeout: float = 600, max_request_bytes: int = MAX_REQUEST_BYTES,
               balance: str = "least_requests", completions_max_tokens: int = COMPLETIONS_MAX_TOKENS):
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

    def error(exc) -> JSONResponse:
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

    async def read_body(request: Request):
        if not authorized(request):
            raise OpenAIError(401, "Incorrect API key provided.", None, code="invalid_api_key")
        raw = await read_limited(request)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise OpenAIError(400, "the request body is not valid JSON") from None
        except RecursionError:
            raise OpenAIError(400, "the request body is not valid JSON: nested too deeply") from None

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

    def open_stream(chat: bool, prompt, params: dict):
        return client().stream_chat(prompt, **params) if chat else client().stream_complete(prompt, **params)

    async def generate(request: Request, chat: bool):
        req, streams = None, []
        try:
            req = proto.parse(proto.ChatCompletionRequest if chat else proto.CompletionRequest,
                              await read_body(request))
            params = generation_params(req, None if chat else completions_max_tokens)
            prompts = [req.conversation] if chat else req.prompts()
            if not chat and (req.best_of or 1) > req.choices_per_prompt:
                params["logprobs"] = True          # best_of ranks the sequences by their mean log prob
            jobs = jobs_for(req, len(prompts), params)
            # checked here, before anything is streamed (the same limits as the server)
            streams = [open_stream(chat, prompts[job.prompt_index], job.params) for job in jobs]
            model = await served_model()
            # the first piece (or the server's refusal) of each before answering: errors become proper 4xx
            firsts = await asyncio.gather(*(first_piece(s) for s in streams), return_exceptions=True)
            failed = [f for f in firsts if isinstance(f, BaseException)]
            if failed:
                raise failed[0]
        except OpenAIError as exc:
            await close_all(streams)
            return error(exc)
        except BaylingError as exc:
            await close_all(streams)
            return error(from_bayling_error(exc, req, chat))
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if not req.stream:
            try:
                results = await asyncio.gather(*(run_to_end(s) for s in streams))
            except BaylingError as exc:
                return error(from_bayling_error(exc, req, chat))
            finally:
                await close_all(streams)
            return JSONResponse(whole_answer(req, chat, prompts, jobs, results, ident, created, model))
        return StreamingResponse(events(req, chat, prompts, jobs, streams, firsts, ident, created, model),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

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


_RUNNING: set = set()   # strong references to the pump tasks (a task only weakly held may vanish mid-run)


def spawn(coro) -> asyncio.Task:
    task = asyncio.create_task(coro)
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)
    return task


async def run_to_end(stream):
    async for _ in stream:
        pass
    if stream.result is None:
        raise BaylingError("the server closed the stream without an answer")
    return stream.result


async def close_all(streams) -> None:
    for stream in streams:
        await stream.aclose()       # a no-op when finished; cancels on the server otherwise


def whole_answer(req, chat: bool, prompts: list, jobs: list[Job], results: list, ident: str, created: int,
                 model: str) -> dict:
    """The non-streamed response; with best_of, the n sequences of each prompt with the highest mean log prob."""
    chosen = list(zip(jobs, results))
    n = req.choices_per_prompt
    if not chat and (req.best_of or n) > n:
        by_prompt: dict[int, list] = {}
        for job, result in chosen:
            by_prompt.setdefault(job.prompt_index, []).append((job, result))
        chosen = [pair for p in sorted(by_prompt) for pair in
                  sorted(by_prompt[p], key=lambda pair: -mean_logprob(pair[1]))[:n]]
    top = req.top_count
    choices = []
    for index, (job, result) in enumerate(chosen):
        reason = finish(result.finish_reason)
        if chat:
            logprobs = proto.chat_logprobs(result.logprobs or [], top) if req.wants_logprobs else None
            choices.append(proto.ChatChoice(index=index, message=proto.AssistantMessage(content=result.text),
                                            logprobs=logprobs, finish_reason=reason))
        else:
            prefix = prompts[job.prompt_index] if req.echo else ""
            logprobs = (proto.completion_logprobs(result.logprobs or [], top, len(prefix))
                        if req.wants_logprobs else None)
            choices.append(proto.CompletionChoice(index=index, text=prefix + result.text, logprobs=logprobs,
                                                  finish_reason=reason))
    kind = proto.ChatCompletion if chat else proto.Completion
    return proto.dump(kind(id=ident, created=created, model=model, choices=choices, usage=usage(results, jobs)))


async def events(req, chat: bool, prompts: list, jobs: list[Job], streams: list, firsts: list, ident: str,
                 created: int, model: str):
    """SSE chunks of every choice, as they come; if the client goes away, Starlette cancels this generator
    and `finally` cancels the requests on the server."""
    include_usage, top = req.include_usage, req.top_count
    queue: asyncio.Queue = asyncio.Queue()
    echo = not chat and req.echo
    offsets = [len(prompts[job.prompt_index]) if echo else 0 for job in jobs]   # completions' text_offset

    async def pump(k: int, stream, first: str) -> None:
        sent = 0

        def new_logprobs() -> list[dict]:
            nonlocal sent
            entries = (stream.logprobs or [])[sent:]
            sent += len(entries)
            return entries
        try:
            await queue.put((k, "piece", first, new_logprobs()))
            async for piece in stream:
                await queue.put((k, "piece", piece, new_logprobs()))
            await queue.put((k, "end", stream.result, new_logprobs()))
        except BaylingError as exc:
            await queue.put((k, "error", exc, []))
        finally:
            await stream.aclose()       # cancels on the server unless it finished

    def chunk(k: int, text: str | None, entries: list[dict], reason: str | None = None, role: bool = False) -> str:
        if chat:
            logprobs = proto.chat_logprobs(entries, top) if req.wants_logprobs and (entries or text) else None
            delta = proto.Delta(role="assistant", content="") if role else proto.Delta(content=text)
            choice = proto.ChatChunkChoice(index=k, delta=delta, logprobs=logprobs, finish_reason=reason)
            data = proto.ChatCompletionChunk(id=ident, created=created, model=model, choices=[choice])
        else:
            logprobs = None
            if req.wants_logprobs and (entries or text):
                logprobs = proto.completion_logprobs(entries, top, offsets[k])
                offsets[k] += sum(len(e["token"]) for e in entries)
            choice = proto.CompletionChoice(index=k, text=text or "", logprobs=logprobs, finish_reason=reason)
            data = proto.Completion(id=ident, created=created, model=model, choices=[choice])
        return sse(proto.dump(data, usage=include_usage))

    # Most events are a piece of text without logprobs: each choice's chunk is rendered once, then filled in.
    plain_chunks: dict[int, Callable[[str], str]] = {} if req.wants_logprobs else {
        job.index: filled_in(lambda text, k=job.index: chunk(k, text, [])) for job in jobs}

    tasks = [spawn(pump(job.index, s, f)) for job, s, f in zip(jobs, streams, firsts)]
    try:
        for job in jobs:
            if chat:
                yield chunk(job.index, None, [], role=True)
            elif echo:
                yield chunk(job.index, prompts[job.prompt_index], [])
        results: dict[int, object] = {}
        while len(results) < len(jobs):
            k, kind, value, entries = await queue.get()
            if kind == "piece":
                if value or entries:
                    yield plain_chunks[k](value) if plain_chunks else chunk(k, value, entries)
            elif kind == "end":
                results[k] = value
                yield chunk(k, None if chat else "", entries, finish(value.finish_reason if value else "stop"))
            else:
                yield sse(from_bayling_error(value, req, chat).body())
                yield sse("[DONE]")
                return
        if include_usage:
            total = usage([results[job.index] for job in jobs], jobs)
            kind = proto.ChatCompletionChunk if chat else proto.Completion
            yield sse(proto.dump(kind(id=ident, created=created, model=model, choices=[], usage=total)))
        yield sse("[DONE]")
    finally:
        # No await here: a disconnect cancels this generator's scope, and each await would be cancelled
        # again. Each pump, cancelled, closes its stream (which cancels the request on the server).
        for task in tasks:
            task.cancel()


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
    parser.add_argument("--completions-max-tokens", type=int, default=COMPLETIONS_MAX_TOKENS, metavar="N",
                        help=f"max_tokens of a completion that gives none (default {COMPLETIONS_MAX_TOKENS}, "
                             "OpenAI's; chat completions default to the model's)")
    parser.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES, metavar="N",
                        help=f"largest request body accepted (default {MAX_REQUEST_BYTES}, 8 MiB); larger ones get 413")


def main(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ModuleNotFoundError:
        raise BaylingError("the gateway needs uvicorn and starlette: pip install 'bayling-deploy[client]'") from None
    if proto is None:
        raise BaylingError("the gateway needs pydantic 2: pip install 'bayling-deploy[client]'")
    from bayling.client.library import parse_targets

    parse_targets(args.url, args.protocol)      # a bad URL is a one-line error, before listening
    if args.completions_max_tokens < 1:
        raise BaylingError(f"--completions-max-tokens must be at least 1, got {args.completions_max_tokens}")
    if args.max_request_bytes < 1024:
        raise BaylingError(f"--max-request-bytes must be at least 1024, got {args.max_request_bytes}")
    app = create_app(args.url, args.protocol, api_key=args.api_key, model_id=args.model_id, timeout=args.timeout,
                     max_request_bytes=args.max_request_bytes, balance=args.balance,
                     completions_max_tokens=args.completions_max_tokens)
    print(f"OpenAI-compatible gateway: http://{args.host}:{args.port}/v1 -> {args.url}"
          f"{' (API key required)' if args.api_key else ''}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0

