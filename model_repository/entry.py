"""The `bayling` entry model's logic: a chat request in, exact text out, streamed or not.

Pre-processing (template, tokenization, truncation to the context), the call to the
engine model `tensorrt_llm` (CPU or GPU, the same tensors) and post-processing (the
incremental detokenizer, placeholders, stop strings) all happen in one model, per
request, with state: streamed pieces carry only new text, and joined they equal the
non-streamed answer. The Triton adapter supplies the engine call and the response sender.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from bayling import contract
from bayling.errors import InvalidInput
from bayling.params import PARAM_NAMES, GenerationParams, validate
from bayling.templates import parse_messages_json
from bayling.textstream import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP
from bayling.tokenization import word_list
from bayling.model_repository.engine_text import EngineText
from bayling.model_repository.relay import Outbox, Relay
from bayling.model_repository.token_logprobs import TokenTexts, entries
from bayling.model_repository.triton_io import bytes_array, scalar, text, texts

SCALAR_PARAMS = tuple(name for name in PARAM_NAMES if name not in ("stop_words", "bad_words", "logit_bias"))  # one tensor each
NOT_FROM_ENTRY = ("return_log_probs", "return_context_logits", "return_generation_logits")


@dataclass
class EntryRequest:
    prompt_ids: list[int]
    params: GenerationParams
    stream: bool
    return_prompt_ids: bool
    dropped_turns: int = 0


def generation_values(inputs: dict[str, np.ndarray]) -> dict:
    values = {name: scalar(inputs, name) for name in SCALAR_PARAMS}
    values["stop_words"] = texts(inputs, "stop_words")
    values["bad_words"] = texts(inputs, "bad_words")
    bias = text(inputs, "logit_bias")
    if bias:
        try:
            values["logit_bias"] = json.loads(bias)
        except ValueError:
            raise InvalidInput("logit_bias", "must be a JSON object {token_id: bias}") from None
    return values


def engine_sampling(params: GenerationParams) -> dict:
    """Sampling parameters as the engine reads them: greedy is top_k 1 (TensorRT-LLM's reading)."""
    if params.greedy:
        return {"top_k": 1, "top_p": 0.0, "temperature": 1.0}
    return {"top_k": params.top_k, "top_p": params.top_p, "temperature": params.temperature}


def output_token_ids(outputs: dict[str, np.ndarray]) -> list[int]:
    """The new ids of one engine response: output_ids [1, beam, n] cut to sequence_length [1, beam]."""
    ids = np.asarray(outputs["output_ids"]).reshape(-1)
    length = outputs.get("sequence_length")
    n = int(np.asarray(length).reshape(-1)[0]) if length is not None else len(ids)
    return [int(t) for t in ids[:n]]


class Entry:
    def __init__(self, text_ctx: EngineText, max_context: int | None = None):
        self.text = text_ctx
        self.max_context = max_context or text_ctx.manifest.max_context   # what the engine serves per request
        self.engine_decoupled = True    # false: tensorrt_llm answers each request in one response
        self.token_texts: TokenTexts | None = None    # made at the first request asking for logprobs

    def parse(self, inputs: dict[str, np.ndarray]) -> EntryRequest:
        for name in NOT_FROM_ENTRY:
            if scalar(inputs, name, False):
                raise InvalidInput(name, "is not served by the bayling model; use the ensemble model")
        if scalar(inputs, "exclude_input_in_output", True) is False:
            raise InvalidInput("exclude_input_in_output", "the bayling model returns only the completion")
        params = validate(generation_values(inputs), defaults=self.text.defaults, max_context=self.max_context)
        vocab = self.text.manifest.vocab_size
        outside = [t for t in params.logit_bias if t >= vocab]
        if outside:
            raise InvalidInput("logit_bias", f"has token ids outside the vocabulary of {vocab}: {outside[:5]}")
        for name in ("end_id", "pad_id"):
            token = getattr(params, name)
            if token is not None and token >= vocab:
                raise InvalidInput(name, f"must be below the vocabulary size {vocab}, got {token}")
        if params.top_k > vocab:
            raise InvalidInput("top_k", f"must be at most the vocabulary size {vocab}, got {params.top_k}")
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
        public = {"max_tokens": p.max_tokens, "end_id": m.eos_id if p.end_id is None else p.end_id,
                  "pad_id": m.pad_id if p.pad_id is None else p.pad_id, "stream": self.engine_streams(req),
                  "exclude_input_in_output": True, "repetition_penalty": p.repetition_penalty, **engine_sampling(p)}
        optional = {"min_length": p.min_length, "presence_penalty": p.presence_penalty,
                    "frequency_penalty": p.frequency_penalty}
        optional.update(logprobs=p.logprobs, top_logprobs=p.top_logprobs)
        public.update({k: v for k, v in optional.items() if v})   # off: no tensor (an engine may refuse it)
        if p.random_seed is not None:
            public["random_seed"] = p.random_seed
        inputs = {"input_ids": np.array([req.prompt_ids], dtype=np.int32),
                  "input_lengths": np.array([[len(req.prompt_ids)]], dtype=np.int32),
                  **contract.engine_scalars(public)}
        stop_ids = self.text.engine_stop_words(p.end_id, p.stop_words)
        if any(stop_ids):
            inputs["stop_words_list"] = word_list(stop_ids)[None]
        if p.bad_words:
            inputs["bad_words_list"] = self.text.encoder.encode_words(p.bad_words)[None]
        if p.logit_bias:
            bias = np.zeros((1, m.vocab_size), dtype=np.float32)
            for token, value in p.logit_bias.items():
                bias[0, token] = value
            inputs[contract.LOGIT_BIAS_TENSOR] = bias
        return inputs

    @staticmethod
    def engine_output_names(req: EntryRequest) -> list[str]:
        names = ["output_ids", "sequence_length"]
        if req.params.logprobs:
            names.append("output_log_probs")
        if req.params.top_logprobs:
            names.append("generation_logits")
        return names

    def engine_streams(self, req: EntryRequest) -> bool:
        """Streamed answers, and answers with stop strings (found in the text, so that they end generation
        at once), stream from the engine; any other answer comes from it in one response. A non-decoupled
        engine (bayling serve --decoupled false) always answers in one response."""
        return self.engine_decoupled and (req.stream or bool(req.params.stop_words or self.text.manifest.stop_strings))

    def outputs(self, piece: str, req: EntryRequest, completion_tokens: int, finish_reason: str = "",
                final: bool = False, logprobs: list[dict] | None = None) -> dict[str, np.ndarray]:
        out = {
            "text_output": bytes_array([piece]),
            "finish_reason": bytes_array([finish_reason]),
            "prompt_tokens": np.array([[len(req.prompt_ids)]], dtype=np.int32),
            "completion_tokens": np.array([[completion_tokens]], dtype=np.int32),
        }
        if logprobs is not None:
            out["token_logprobs"] = bytes_array([json.dumps(logprobs, ensure_ascii=False)])
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
        tokens = TokenLog(self, req) if req.params.logprobs else None
        if tokens is not None:
            answer.logprobs = tokens.entries
        for outputs in engine_responses:
            ids = output_token_ids(outputs)
            piece = stream.add_tokens(ids)
            if tokens is not None:
                tokens.add(ids, outputs)
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


class TokenLog:
    """The answer's tokens with their log probs (and alternatives), as OpenAI entries."""

    def __init__(self, entry: Entry, req: EntryRequest):
        if entry.token_texts is None:
            entry.token_texts = TokenTexts(entry.text.tokenizer)
        self._texts, self._top = entry.token_texts, req.params.top_logprobs
        self.entries: list[dict] = []

    def add(self, ids: list[int], outputs: dict[str, np.ndarray]) -> None:
        probs = outputs.get("output_log_probs")
        probs = [] if probs is None else np.asarray(probs).reshape(-1)[:len(ids)].tolist()
        logits = outputs.get("generation_logits")
        if logits is not None:
            logits = np.asarray(logits).reshape(-1, np.asarray(logits).shape[-1])[:len(ids)]
        self.entries += entries(self._texts, ids, probs, logits, self._top)


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
        self.logprobs: list[dict] = []      # the answer's token entries so far (when asked)
        self._marks: list[int] = []         # len(logprobs) at each piece
        self.box = Outbox(self._deliver, is_cancelled, on_cancel)
        relay.watch(self.box)

    @property
    def cancelled(self) -> bool:
        return self.box.cancelled

    def add(self, piece: str, completion_tokens: int) -> None:
        self._pieces.append(piece)
        self._counts.append(completion_tokens)
        self._marks.append(min(len(self.logprobs), completion_tokens))
        if self._req.stream:
            self.box.length = len(self._pieces)
            self._relay.wake(self.box)

    def finish(self, tail: str, completion_tokens: int, reason: str) -> None:
        self._pieces.append(tail)
        self._counts.append(completion_tokens)
        self._marks.append(min(len(self.logprobs), completion_tokens))
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
        logprobs = None
        if self._req.params.logprobs:
            first = self._marks[start - 1] if start else 0
            logprobs = self.logprobs[first:self._marks[end - 1]] if end else []
        self._send(self._entry.outputs(text, self._req, tokens, self._reason if final else "", final, logprobs),
                   final)
