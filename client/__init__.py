"""Clients of a BayLing Triton server: the Python library (sync and asyncio), and the `bayling chat`,
`translate`, `openai`, `demo-ui` and `bench` commands built on it."""

from bayling.client.aio import AsyncBayLingClient, AsyncChatStream
from bayling.client.library import BayLingClient, BayLingServerError, ChatResult, ChatStream, ModelInfo

__all__ = ["AsyncBayLingClient", "AsyncChatStream", "BayLingClient", "BayLingServerError", "ChatResult",
           "ChatStream", "ModelInfo"]
