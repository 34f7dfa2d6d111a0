"""AsyncBayLingClient: the asyncio twin of BayLingClient (gRPC with `tritonclient.grpc.aio`, HTTP with httpx).

    import asyncio
    from bayling.client import AsyncBayLingClient

    async def main():
        async with AsyncBayLingClient("localhost:8001") as client:
            print((await client.chat("Hello!", max_tokens=32)).text)
            async with client.stream_chat("Tell me a story.", max_tokens=128) as stream:
                async for piece in stream:          # leaving early cancels on the server
                    print(piece, end="", flush=True)

    asyncio.run(main())
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator, Sequence

from bayling.client.library import (DEFAULT_TIMEOUT, MODEL, RESOLVE_EVERY, Balancer,
                                    BayLingServerError, ChatResult, Endpoint, ModelInfo, addresses_from_addrinfo,
                                    backoff_delays, final_result, grpc_channel_args, grpc_inputs, grpc_outputs,
                                    grpc_status_error, http_error, httpx_options, model_info_from_config,
                                    no_server_error, parse_targets, request_values, sse_event, stream_error)
from bayling.client.library import add_token_logprobs


class AsyncChatStream:
    """Text pieces of one streamed answer (`async for`); `result` once finished; `aclose()` cancels."""

    def __init__(self, responses: AsyncIterator[tuple[dict, bool]]):
        self._responses = responses
        self._pieces: list[str] = []
        self.logprobs: list[dict] | None = None     # token entries so far, when asked for
        self.result: ChatResult | None = None

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def __aiter__(self) -> "AsyncChatStream":
        return self

    async def __anext__(self) -> str:
        while True:
            outputs, final = await self._responses.__anext__()   # StopAsyncIteration ends it
            piece = outputs.get("text_output", "")
            if piece:
                self._pieces.append(piece)
            self.logprobs = add_token_logprobs(outputs, self.logprobs)
            if final:
                self.result = final_result(self.text, outputs, self.logprobs)
            if piece:
                return piece

    async def aclose(self) -> None:
        await self._responses.aclose()

    async def __aenter__(self) -> "AsyncChatStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class _AioGrpcTransport:
    def __init__(self, address: str):
        import grpc
        import tritonclient.grpc as grpcclient
        import tritonclient.grpc.aio as aio

        self._grpc, self._grpcclient = grpc, grpcclient
        self._client = aio.InferenceServerClient(address, channel_args=grpc_channel_args(grpcclient))

    async def responses(self, values: dict, timeout: float) -> AsyncIterator[tuple[dict, bool]]:
        request = {"model_name": MODEL, "inputs": grpc_inputs(self._grpcclient, values)}

        async def one_request():
            yield request

        call = self._client.stream_infer(one_request(), stream_timeout=timeout)
        finished = False
        try:
            async for result, error in call:
                if error is not None:
                    raise stream_error(error.status(), error.message())
                outputs, final = grpc_outputs(result)
                finished = finished or final
                yield outputs, final
                if final:
                    return
        except self._grpc.RpcError as exc:
            raise grpc_status_error(exc.code(), exc.details()) from None
        except self._grpcclient.InferenceServerException as exc:
            raise grpc_status_error(exc.status() or "UNAVAILABLE", exc.message()) from None
        finally:
            if not finished:
                call.cancel()                      # the caller left early: cancel on the server

    async def health(self, timeout: float) -> bool:
        try:
            return bool(await self._client.is_server_ready(client_timeout=timeout)
                        and await self._client.is_model_ready(MODEL, client_timeout=timeout))
        except self._grpcclient.InferenceServerException:
            return False

    async def model_config(self, timeout: float) -> dict:
        try:
            return (await self._client.get_model_config(MODEL, as_json=True, client_timeout=timeout))["config"]
        except self._grpcclient.InferenceServerException as exc:
            raise grpc_status_error(exc.status() or "UNAVAILABLE", exc.message()) from None

    async def close(self) -> None:
        await self._client.close()


class _AioHttpTransport:
    def __init__(self, address: str, timeout: float):
        import httpx

        self._httpx = httpx
        self.base = f"http://{address}"
        self._client = httpx.AsyncClient(**httpx_options(httpx, timeout))

    async def _call(self, awaitable):
        httpx = self._httpx
        try:
            return await awaitable
        except httpx.TimeoutException as exc:
            raise BayLingServerError("DEADLINE_EXCEEDED", f"{type(exc).__name__}: {exc}") from None
        except httpx.TransportError as exc:
            raise BayLingServerError("UNAVAILABLE", f"{self.base}: {type(exc).__name__}: {exc}") from None

    async def responses(self, values: dict, timeout: float) -> AsyncIterator[tuple[dict, bool]]:
        """Always generate_stream: only closing an SSE connection cancels on the server (see library.py)."""
        if not values.get("stream"):
            pieces: list[str] = []
            logprobs = None
            inner = self.responses({**values, "stream": True}, timeout)
            try:
                async for event, final in inner:
                    pieces.append(event.get("text_output", ""))
                    logprobs = add_token_logprobs(event, logprobs)
                    if final:
                        joined = {} if logprobs is None else {"token_logprobs": json.dumps(logprobs)}
                        yield {**event, "text_output": "".join(pieces), **joined}, True
            finally:
                await inner.aclose()
            return
        deadline = time.monotonic() + timeout
        request = self._client.build_request("POST", f"{self.base}/v2/models/{MODEL}/generate_stream",
                                             json=values, timeout=timeout)
        response = await self._call(self._client.send(request, stream=True))
        try:
            if response.status_code != 200:
                body = (await self._call(response.aread())).decode("utf-8", "replace")
                raise http_error(response.status_code, body.removeprefix("data: "))
            lines = response.aiter_lines()
            while True:
                try:
                    line = await self._call(lines.__anext__())
                except StopAsyncIteration:
                    return
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
            await response.aclose()              # closing the connection early cancels on the server

    async def health(self, timeout: float) -> bool:
        try:
            for path in ("/v2/health/ready", f"/v2/models/{MODEL}/ready"):
                if (await self._client.get(f"{self.base}{path}", timeout=timeout)).status_code != 200:
                    return False
            return True
        except self._httpx.HTTPError:
            return False

    async def model_config(self, timeout: float) -> dict:
        response = await self._call(self._client.get(f"{self.base}/v2/models/{MODEL}/config", timeout=timeout))
        if response.status_code != 200:
            raise http_error(response.status_code, response.text)
        return response.json()

    async def close(self) -> None:
        await self._client.aclose()


class AsyncBayLingClient:
    """The asyncio client; one instance serves many concurrent requests, over one server or several
    (`url` as for BayLingClient: host:port, a comma-separated list, or dns:///name:port)."""

    def __init__(self, url: str = "localhost:8001", protocol: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = 3, backoff: float = 0.5, validate_max_tokens: bool = True,
                 balance: str = "least_requests", resolve_every: float = RESOLVE_EVERY):
        self.targets = parse_targets(url, protocol)
        self.protocol, self.address = self.targets.protocol, str(self.targets)
        self.url = url
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._balancer = Balancer(balance)
        self._resolve_every = resolve_every
        self._next_resolve = 0.0
        self._resolving: asyncio.Lock | None = None       # made inside the running loop
        if not self.targets.dns_name:
            self._balancer.update(self.targets.addresses, self._transport)
        self._max_context: int | None = None
        self._check_context = validate_max_tokens

    def _transport(self, address: str):
        return _AioGrpcTransport(address) if self.protocol == "grpc" else _AioHttpTransport(address, self.timeout)

    # -- which server (the policy is library.Balancer's)

    async def _resolve(self, force: bool = False) -> None:
        if not self.targets.dns_name:
            return
        known = bool(self._balancer.endpoints)
        if known and time.monotonic() < self._next_resolve and not force:
            return
        self._resolving = self._resolving or asyncio.Lock()
        if known and self._resolving.locked():
            return                                          # another task is looking it up
        async with self._resolving:
            if known and time.monotonic() < self._next_resolve and not force:
                return
            import socket

            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    self.targets.dns_name, self.targets.dns_port, type=socket.SOCK_STREAM)
            except OSError:
                infos = None
            self._next_resolve = time.monotonic() + (self._resolve_every if infos else 1.0)
            if infos:
                for idle in self._balancer.update(addresses_from_addrinfo(infos, self.targets.dns_port),
                                                  self._transport):
                    await idle.transport.close()

    async def servers(self) -> list[str]:
        await self._resolve()
        return [e.address for e in self._balancer.all_endpoints()]

    async def _responses(self, values: dict) -> AsyncIterator[tuple[dict, bool]]:
        """As BayLingClient._responses: UNAVAILABLE before the first response tries the next server."""
        await self._resolve()
        tried: list[Endpoint] = []
        last: BayLingServerError = no_server_error(self.targets)
        while True:
            endpoint = self._balancer.pick(tried)
            if endpoint is None:
                raise last
            started = False
            responses = endpoint.transport.responses(values, self.timeout)
            try:
                async for item in responses:
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
                    await self._resolve(force=True)
            finally:
                try:
                    await responses.aclose()          # cancels on the server if the answer is not finished
                finally:
                    if self._balancer.finished(endpoint):
                        await endpoint.transport.close()

    async def _each_server(self, call):
        await self._resolve()
        tried: list[Endpoint] = []
        last: BayLingServerError = no_server_error(self.targets)
        while (endpoint := self._balancer.pick(tried)) is not None:
            try:
                return await call(endpoint.transport)
            except BayLingServerError as exc:
                if exc.status != "UNAVAILABLE":
                    raise
                last = exc
                tried.append(endpoint)
            finally:
                if self._balancer.finished(endpoint):
                    await endpoint.transport.close()
        raise last

    # -- generation

    async def chat(self, messages: str | Sequence[dict], **params) -> ChatResult:
        values = request_values(messages, params, stream=False, max_context=await self._context())
        return await self._complete(values)

    async def complete(self, prompt: str, **params) -> ChatResult:
        values = request_values(None, params, stream=False, max_context=await self._context(), text_input=prompt)
        return await self._complete(values)

    def stream_chat(self, messages: str | Sequence[dict], **params) -> AsyncChatStream:
        """The answer as it is generated: `async with client.stream_chat(...) as stream: async for piece in stream`.
        Parameters are checked now (InvalidInput); the request is sent at the first step."""
        return self._stream(messages, params, None)

    def stream_complete(self, prompt: str, **params) -> AsyncChatStream:
        return self._stream(None, params, prompt)

    def _stream(self, messages, params: dict, prompt: str | None) -> AsyncChatStream:
        request_values(messages, params, stream=True, max_context=self._max_context or None, text_input=prompt)

        async def responses():
            values = request_values(messages, params, stream=True, max_context=await self._context(),
                                    text_input=prompt)
            inner = self._responses(values)
            try:
                async for item in inner:
                    yield item
            finally:
                await inner.aclose()          # cancels on the server if the answer is not finished

        return AsyncChatStream(responses())

    async def _complete(self, values: dict) -> ChatResult:
        delays = backoff_delays(self.retries, self.backoff)
        while True:
            try:
                stream = AsyncChatStream(self._responses(values))
                try:
                    async for _ in stream:
                        pass
                finally:
                    await stream.aclose()
                if stream.result is None:
                    raise BayLingServerError("UNAVAILABLE", "the server closed the stream without an answer")
                return stream.result
            except BayLingServerError as exc:
                if exc.status != "UNAVAILABLE" or not delays:
                    raise
                await asyncio.sleep(delays.pop(0))

    # -- server

    async def health(self) -> bool:
        """True when a server (any of them) and its `bayling` model are ready; never raises."""
        async def ready(transport):
            if not await transport.health(min(self.timeout, 10.0)):
                raise BayLingServerError("UNAVAILABLE", "not ready")
            return True
        try:
            return await self._each_server(ready)
        except BayLingServerError:
            return False

    async def model_info(self) -> ModelInfo:
        delays = backoff_delays(self.retries, self.backoff)
        while True:
            try:
                return model_info_from_config(
                    await self._each_server(lambda t: t.model_config(min(self.timeout, 30.0))))
            except BayLingServerError as exc:
                if exc.status != "UNAVAILABLE" or not delays:
                    raise
                await asyncio.sleep(delays.pop(0))

    async def _context(self) -> int | None:
        if not self._check_context:
            return None
        if self._max_context is None:
            try:
                config = await self._each_server(lambda t: t.model_config(min(self.timeout, 10.0)))
                self._max_context = model_info_from_config(config).max_context or 0
            except BayLingServerError:
                return None
        return self._max_context or None

    async def close(self) -> None:
        for endpoint in self._balancer.all_endpoints():
            await endpoint.transport.close()

    async def __aenter__(self) -> "AsyncBayLingClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
