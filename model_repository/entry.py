"""The `bayling` entry model's logic: a chat request in, exact text out, streamed or not.

Pre-processing (template, tokenization, truncation to the context), the call to the
engine model `tensorrt_llm` (CPU or GPU, the same tensors) and post-processing (the
incremental detokenizer, placeholders, stop strings) all happen in one model, per
request, with state: streamed pieces carry only new text, and joined they equal the
non-streamed answer. The Triton adapter supplies the engine call and the response sender.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from bayling.errors import InvalidInput
from bayling.params import GenerationParams, validate
from bayling.templates import parse_messages_json
from bayling.textstream import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP
from bayling.tokenization import word_list
from bayling.model_repository.engine_text import EngineText
from bayling.model_repository.relay import Outbox, Relay
from bayling.model_repository.triton_io import bytes_array, scalar, text, texts

# public tensor name -> GenerationParams field
PARAM_TENSORS = {
    "max_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
    "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "min_length": "min_length", "length_penalty": "length_penalty",
    "beam_width": "beam_width", "random_seed": "random_seed", "end_id": "end_id", "pad_id": "pad_id",
}
NOT_FROM_ENTRY = ("return_log_probs", "return_context_logits", "return_generation_logits")


@dataclass
class EntryRequest:
    prompt_ids: list[int]
    params: GenerationParams
    stream: bool
    return_prompt_ids: bool
    dropped_turns: int = 0


def generation_values(inputs: dict[str, np.ndarray]) -> dict:
    values = {field: scalar(inputs, name) for name, field in PARAM_TENSORS.items()}
    values["stop_words"] = texts(inputs, "stop_words")
    values["bad_words"] = texts(inputs, "bad_words")
    return values


def engine_sampling(params: GenerationParams) -> dict[str, np.ndarray]:
    """Sampling tensors for `tensorrt_llm`; greedy is top_k 1, as TensorRT-LLM reads it."""
    def one(value, dtype):
        return np.array([[value]], dtype=dtype)

    if params.greedy:
        return {"runtime_top_k": one(1, np.int32), "runtime_top_p": one(0.0, np.float32),
                "temperature": one(1.0, np.float32)}
    return {"runtime_top_k": one(params.top_k, np.int32), "runtime_top_p": one(params.top_p, np.float32),
            "temperature": one(params.temperature, np.float32)}


def output_token_ids(outputs: dict[str, np.ndarray]) -> list[int]:
    """The new ids of one engine response: output_ids [1, beam, n] cut to sequence_length [1, beam]."""
    ids = np.asarray(outputs["output_ids"]).reshape(-1)
    length = outputs.get("sequence_length")
    n = int(np.asarray(length).reshape(-1)[0]) if length is not None else len(ids)
    return [int(t) for t in ids[:n]]


class Entry:
    def __init__(self, text_ctx: EngineText):
        self.text = text_ctx
        self.max_context = text_ctx.manifest.max_context

    def parse(self, inputs: dict[str, np.ndarray]) -> EntryRequest:
        for name in NOT_FROM_ENTRY:
            if scalar(inputs, name, False):
                raise InvalidInput(name, "is not served by the bayling model; use the ensemble model")
        if scalar(inputs, "exclude_input_in_output", True) is False:
            raise InvalidInput("exclude_input_in_output", "the bayling model returns only the completion")
        params = validate(generation_values(inputs), defaults=self.text.defaults, max_context=self.max_context)
        if self.text.manifest.engine == "ctranslate2":
            for name in ("presence_penalty", "frequency_penalty"):
                if getattr(params, name):
                    raise InvalidInput(name, "is not supported by the CPU engine (CTranslate2); leave it at 0")
        for name in ("end_id", "pad_id"):
            token = getattr(params, name)
            if token is not None and token >= self.text.manifest.vocab_size:
                raise InvalidInput(name, f"must be below the vocabulary size {self.text.manifest.vocab_size}, got {token}")
        raw_messages = inputs.get("messages")
        prompt_text = text(inputs, "text_input")
        if raw_messages is not None and prompt_text is not None:
            raise InvalidInput("messages", "give either messages or text_input, not both")
        budget = self.max_context - params.max_tokens
        dropped = 0
        if raw_messages is not None:
            messages = parse_messages_json(scalar(inputs, "messages"))
            encoded = self.text.encoder.encode_messages(messages, budget)
            ids, dropped = encoded.ids, encoded.dropped_turns
        elif prompt_text is not None:
            if not prompt_text.strip():
                raise InvalidInput("text_input", "is empty")
            ids = self.text.encoder.encode_text(prompt_text)
            if len(ids) > budget:
                raise InvalidInput("text_input", f"the prompt is {len(ids)} tokens; with max_tokens {params.max_tokens} "
                                                 f"it does not fit the context of {self.max_context} tokens")
        else:
            raise InvalidInput("messages", "a request needs messages (a JSON conversation) or text_input")
        return EntryRequest(ids, params, bool(scalar(inputs, "stream", False)),
                            bool(scalar(inputs, "return_prompt_ids", False)), dropped)

    def engine_inputs(self, req: EntryRequest) -> dict[str, np.ndarray]:
        m, p = self.text.manifest, req.params
        inputs = {
            "input_ids": np.array([req.prompt_ids], dtype=np.int32),
            "input_lengths": np.array([[len(req.prompt_ids)]], dtype=np.int32),
            "request_output_len": np.array([[p.max_tokens]], dtype=np.int32),
            "end_id": np.array([[m.eos_id if p.end_id is None else p.end_id]], dtype=np.int32),
            "pad_id": np.array([[m.pad_id if p.pad_id is None else p.pad_id]], dtype=np.int32),
            "streaming": np.array([[self.engine_streams(req)]]),
            "exclude_input_in_output": np.array([[True]]),
            "repetition_penalty": np.array([[p.repetition_penalty]], dtype=np.float32),
            **engine_sampling(p),
        }
        stop_ids = self.text.engine_stop_words(p.end_id, p.stop_words)
        if any(stop_ids):
            inputs["stop_words_list"] = word_list(stop_ids)[None]
        if p.bad_words:
            inputs["bad_words_list"] = self.text.encoder.encode_words(p.bad_words)[None]
        if p.min_length:
            inputs["min_length"] = np.array([[p.min_length]], dtype=np.int32)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(p, name):
                inputs[name] = np.array([[getattr(p, name)]], dtype=np.float32)
        if p.random_seed is not None:
            inputs["random_seed"] = np.array([[p.random_seed]], dtype=np.uint64)
        return inputs

    def engine_streams(self, req: EntryRequest) -> bool:
        """Streamed answers, and answers with stop strings (found in the text, so that they end generation
        at once), stream from the engine; any other answer comes from it in one response."""
        return req.stream or bool(req.params.stop_words or self.text.manifest.stop_strings)

    def outputs(self, piece: str, req: EntryRequest, completion_tokens: int, finish_reason: str = "",
                final: bool = False) -> dict[str, np.ndarray]:
        out = {
            "text_output": bytes_array([piece]),
            "finish_reason": bytes_array([finish_reason]),
            "prompt_tokens": np.array([[len(req.prompt_ids)]], dtype=np.int32),
            "completion_tokens": np.array([[completion_tokens]], dtype=np.int32),
        }
        if final and req.return_prompt_ids:
            out["prompt_ids"] = np.array([req.prompt_ids], dtype=np.int32)
        return out

    def generate(self, req: EntryRequest, engine_responses: Iterable[dict[str, np.ndarray]],
                 stop_engine: Callable[[], None], answer: "Answer") -> str:
        """Drive one request to its end; returns the finish reason.

        `engine_responses` yields the engine's responses (one or many tokens each); `stop_engine` asks
        the engine to end this request early (stop string, cancellation); `answer` takes the text.
        """
        stream = self.text.text_stream(req.params.stop_words, end_id=req.params.end_id)
        engine_stopped = False
        for outputs in engine_responses:
            piece = stream.add_tokens(output_token_ids(outputs))
            if piece:
                answer.add(piece, stream.completion_tokens)
            if (stream.finished or answer.cancelled) and not engine_stopped:
                stop_engine()
                engine_stopped = True
        if answer.cancelled and not stream.finished:
            stream.finish(FINISH_CANCELLED)
            answer.finish("", stream.completion_tokens, FINISH_CANCELLED)
            return FINISH_CANCELLED
        reason = stream.finish_reason or (FINISH_LENGTH if stream.completion_tokens >= req.params.max_tokens else FINISH_STOP)
        answer.finish(stream.finish(reason), stream.completion_tokens, reason)
        return reason


Send = Callable[[dict[str, np.ndarray] | Exception | None, bool], None]   # (outputs, an error or None; final)


class Answer:
    """One request's text on its way to the client through a `Relay`: streamed pieces that pile up
    while the relay is busy leave as one response (joined, they are the same text); a non-streamed
    answer leaves once, at the end. A cancelled request only gets its stream closed."""

    def __init__(self, entry: Entry, req: EntryRequest, relay: Relay, send: Send,
                 is_cancelled: Callable[[], bool] = lambda: False, on_cancel: Callable[[], None] | None = None):
        self._entry, self._req, self._relay, self._send = entry, req, relay, send
        self._pieces: list[str] = []
        self._counts: list[int] = []      # completion tokens after each piece
        self._reason = ""
        self._error: Exception | None = None
        self.box = Outbox(self._deliver, is_cancelled, on_cancel)
        relay.watch(self.box)

    @property
    def cancelled(self) -> bool:
        return self.box.cancelled

    def add(self, piece: str, completion_tokens: int) -> None:
        self._pieces.append(piece)
        self._counts.append(completion_tokens)
        if self._req.stream:
            self.box.length = len(self._pieces)
            self._relay.wake(self.box)

    def finish(self, tail: str, completion_tokens: int, reason: str) -> None:
        self._pieces.append(tail)
        self._counts.append(completion_tokens)
        self._reason = reason
        self.box.length = len(self._pieces)
        self.box.final = True
        self._relay.wake(self.box)

    def fail(self, error: Exception) -> None:
        """End with an error response, after whatever was already streamed."""
        self._error = error
        self.box.final = True
        self._relay.wake(self.box)

    def _deliver(self, start: int, end: int, final: bool) -> None:
        if final and self._error is not None:
            self._send(self._error, True)
            return
        if final and self._reason == FINISH_CANCELLED:
            self._send(None, True)    # nobody listens any more; only close the request
            return
        text = "".join(self._pieces[start:end])
        tokens = self._counts[end - 1] if end else 0
        self._send(self._entry.outputs(text, self._req, tokens, self._reason if final else "", final), final)
