"""The OpenAI API's request and response shapes, as the gateway (`bayling openai`) serves them.

Requests are validated once, at the edge, with OpenAI's ranges (temperature 0-2, top_p 0-1,
presence/frequency penalties -2..2, n >= 1, top_logprobs 0-20, completions logprobs 0-5, logit
bias -100..100, ...); whatever is wrong answers 400 with ``{"error": {..., "param": "<field>"}}``
naming the first wrong field, as OpenAI does. Types are strict (``"8"`` is not a number), because
OpenAI's are. Responses are built from the models below, so every choice, chunk and usage block
has OpenAI's fields.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from bayling.params import INT32_MAX, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, UINT64_MAX
from bayling.templates import shown

MAX_N = 128                       # OpenAI's limit on n (and on n x prompts here)
MAX_COMPLETION_LOGPROBS = 5       # the completions API's limit on `logprobs`
# Parameters BayLing does not serve: a request using them gets 400 naming them.
UNSUPPORTED = {"tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
               "function_call": "function calling", "audio": "audio output", "modalities": "output modalities",
               "prediction": "predicted outputs", "web_search_options": "web search", "suffix": "a suffix (insertion)"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unsupported(param: str, what: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {what} is not supported by BayLing", param, code="unsupported_parameter")


def invalid(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param, code="invalid_value")


def _finite(low: float, high: float):
    return Field(None, ge=low, le=high, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool | None = None


class _Request(BaseModel):
    """What chat and completions requests share (OpenAI's, then vLLM's extensions)."""
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = _finite(0, 2)
    top_p: float | None = _finite(0, 1)
    presence_penalty: float | None = _finite(-2, 2)
    frequency_penalty: float | None = _finite(-2, 2)
    n: int | None = Field(None, ge=1, le=MAX_N)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: Any = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)      # -1 or 0: off
    repetition_penalty: float | None = Field(None, allow_inf_nan=False)
    min_tokens: int | None = Field(None, ge=0, le=INT32_MAX)
    ignore_eos: bool | None = None
    # refused (see UNSUPPORTED)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    def check(self) -> None:
        """What one field's type and range cannot say."""
        for name, what in UNSUPPORTED.items():
            if getattr(self, name, None) not in (None, [], {}, "none", ""):
                raise unsupported(name, what)
        if self.response_format is not None and (not isinstance(self.response_format, dict)
                                                 or self.response_format.get("type") != "text"):
            raise unsupported("response_format", "a response format other than text")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options", "`stream_options` can only be used when `stream` is True")
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise invalid("logit_bias", f"keys must be token ids, got {key!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise invalid("logit_bias", f"biases must be between -100 and 100, got {bias} for {key}")
        if self.best_of is not None and self.best_of < self.choices_per_prompt:
            raise invalid("best_of", f"must be at least n ({self.choices_per_prompt}), got {self.best_of}")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(_Request):
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    messages: list[Any]          # last: a wrong parameter is named before the messages are read
    _conversation: list[dict] = PrivateAttr(default_factory=list)

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs", "`top_logprobs` can only be used when `logprobs` is True")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "best_of > 1 in chat (it is a completions parameter)")
        self._conversation = conversation(self.messages)

    @property
    def conversation(self) -> list[dict]:
        """The messages as BayLing's {role, content} turns (developer is system; text parts joined)."""
        return self._conversation

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)

    @property
    def top_count(self) -> int:
        return self.top_logprobs or 0


class CompletionRequest(_Request):
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]   # last, as messages

    def check(self) -> None:
        super().check()
        if self.echo and self.wants_logprobs:
            raise unsupported("echo", "echo with logprobs (log probabilities of the prompt's tokens)")
        if self.best_of not in (None, self.choices_per_prompt) and self.stream:
            raise invalid("best_of", "cannot be streamed when it is larger than n")
        if len(self.prompts()) * (self.best_of or self.choices_per_prompt) > MAX_N:
            raise invalid("n", f"prompts x choices must be at most {MAX_N}")

    def prompts(self) -> list[str]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, str) for p in prompt):
            return list(prompt)
        raise OpenAIError(400, "prompt: must be a string or a list of strings (token ids are not supported)",
                          "prompt", code="invalid_value")

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)        # 0 asks for none (as Triton's OpenAI frontend reads it)

    @property
    def top_count(self) -> int:
        return self.logprobs or 0


def conversation(messages: list) -> list[dict]:
    if not messages:
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


def parse(model: type[_Request], body: Any) -> _Request:
    """The request, or OpenAIError naming the first wrong field."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    request.check()
    return request


def from_validation_error(exc: ValidationError) -> OpenAIError:
    error = exc.errors(include_url=False)[0]
    loc = [str(part) for part in error["loc"]]
    param = loc[0] if loc else None
    if error["type"] == "missing":
        hint = " (any name: BayLing serves one model)" if param == "model" else ""
        return OpenAIError(400, f"{param}: is required{hint}", param, code="missing_required_parameter")
    where = param + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:]) if param else "request"
    message = error["msg"]
    if param in ("messages", "prompt") and loc[1:]:
        message = message.lower()
    return OpenAIError(400, f"{where}: {message}", param, code="invalid_value")


# --- responses

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A whole completion, and (object `text_completion` too) each streamed chunk of one."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


def dump(response: BaseModel, *, usage: bool = True) -> dict:
    """JSON-ready dict; a Delta keeps only what it carries (OpenAI's chunks omit the rest)."""
    data = response.model_dump(exclude={"usage"} if not usage else None)
    for choice in data.get("choices", ()):
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return data


def chat_logprobs(entries: list[dict], top: int) -> ChatLogprobs:
    return ChatLogprobs(content=[TokenLogprob(token=e["token"], logprob=e["logprob"], bytes=e.get("bytes"),
                                              top_logprobs=[TopLogprob(**t) for t in e.get("top_logprobs", [])[:top]])
                                 for e in entries])


def completion_logprobs(entries: list[dict], top: int, offset: int) -> CompletionLogprobs:
    """Legacy completions' logprobs; `offset` is where the first token's text starts in the choice's text."""
    out = CompletionLogprobs()
    for e in entries:
        out.tokens.append(e["token"])
        out.token_logprobs.append(e["logprob"])
        out.top_logprobs.append({t["token"]: t["logprob"] for t in e.get("top_logprobs", [])[:top]})
        out.text_offset.append(offset)
        offset += len(e["token"])
    return out
