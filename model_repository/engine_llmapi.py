"""The engine-free GPU engine behind the `tensorrt_llm` model: TensorRT-LLM's LLM API (PyTorch
backend) over a Model Optimizer checkpoint, speaking the same contract as the other two engines.

The Triton adapter (templates/tensorrt_llm_llmapi/1/model.py) turns each request into the same
`EngineRequest` as the CPU engine (`engine_io.engine_request`) and each `Emission` back into
`output_ids` / `sequence_length` (`engine_io.engine_outputs`), so the ensemble, the `bayling` model,
the clients and the chart see one engine model whichever engine runs.

Written against the LLM API of TensorRT-LLM 1.2 as its sources document it (build_engine/data/
trtllm_1.2.1_options.json, "llmapi_model"; tensorrt_llm/sampling_params.py; tensorrt_llm/llmapi/
llm.py):

* `LLM(model=DIR, backend="pytorch", skip_tokenizer_init=True, max_batch_size=..., max_num_tokens=...,
  max_seq_len=..., kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=..., max_tokens=...,
  enable_block_reuse=...), enable_chunked_prefill=..., tensor_parallel_size=...)`;
* `llm.generate_async(inputs, sampling_params, streaming=True)` returns a result that is an async
  iterator of `RequestOutput`s: `.outputs[0].token_ids` (all generated ids so far),
  `.outputs[0].logprobs`, `.outputs[0].finish_reason`, `.finished`; `.abort()` cancels it;
* `SamplingParams(end_id, pad_id, max_tokens, bad_token_ids, stop_token_ids, top_k, top_p, seed,
  temperature, min_tokens, repetition_penalty, presence_penalty, frequency_penalty, logprobs,
  ignore_eos, detokenize, ...)`; `top_k=1` is greedy; `top_p=0` is refused by the backend; without
  a tokenizer (skip_tokenizer_init) `end_id` must be given.

Requests are always streamed from the LLM API: stop words of several tokens are matched here on the
ids (the LLM API takes stop *strings*, which need its tokenizer, or single stop token ids), and the
request is aborted at the match, as the CPU engine does. Responses leave from a `Relay` thread, so
the event loop that drives the LLM API never waits for Triton's IPC.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bayling.errors import BaylingError, InvalidInput
from bayling.params import NO_END_ID
from bayling.model_repository.engine_ct2 import Emission, EngineRequest, Sink, ends_with_stop_word, validate_ids
from bayling.model_repository.relay import Outbox, Relay

log = logging.getLogger(__name__)

DEFAULT_FACTORY = "tensorrt_llm:LLM"
SAMPLING_PARAMS = "tensorrt_llm:SamplingParams"
KV_CACHE_CONFIG = "tensorrt_llm.llmapi:KvCacheConfig"
SETTINGS_FILE = "llm_api.json"       # beside the checkpoint: the LLM API arguments the planner chose


def import_object(spec: str) -> Any:
    """'package.module:attribute' -> the attribute (how the LLM class and its helpers are named)."""
    module, _, attribute = spec.partition(":")
    if not module or not attribute:
        raise BaylingError(f"{spec!r} is not 'module:attribute'")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise BaylingError(f"cannot load {spec}: {exc}") from None


@dataclass
class LlmApiSettings:
    """What `bayling build --target trtllm-llmapi` wrote to llm_api.json: the LLM API arguments."""
    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    kv_cache_config: dict[str, Any]
    max_beam_width: int = 1
    enable_chunked_prefill: bool = False
    tensor_parallel_size: int = 1
    factory: str = DEFAULT_FACTORY
    extra: dict[str, Any] = field(default_factory=dict)   # any other LLM argument, passed as is

    @classmethod
    def read(cls, checkpoint_dir: Path) -> "LlmApiSettings":
        path = Path(checkpoint_dir) / SETTINGS_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise BaylingError(f"{path}: not the LLM API settings of a trtllm-llmapi build ({exc})") from None

    def llm_kwargs(self, checkpoint_dir: Path, kv_cache_config_cls: Callable | None = None) -> dict[str, Any]:
        """The keyword arguments of `LLM(...)` for this checkpoint."""
        kv = dict(self.kv_cache_config)
        return {"model": str(checkpoint_dir), "backend": "pytorch", "skip_tokenizer_init": True,
                "tensor_parallel_size": self.tensor_parallel_size, "max_batch_size": self.max_batch_size,
                "max_num_tokens": self.max_num_tokens, "max_seq_len": self.max_seq_len,
                "max_beam_width": self.max_beam_width, "enable_chunked_prefill": self.enable_chunked_prefill,
                "kv_cache_config": kv_cache_config_cls(**kv) if kv_cache_config_cls else kv, **self.extra}


def load_llm(checkpoint_dir: Path, settings: LlmApiSettings):
    """The LLM object and the SamplingParams class (on the GPU, inside the pinned container). Another
    factory 'module:LLM' takes SamplingParams and KvCacheConfig from its own module."""
    module = settings.factory.partition(":")[0]
    llm_cls = import_object(settings.factory)
    sampling_cls = import_object(SAMPLING_PARAMS if settings.factory == DEFAULT_FACTORY else f"{module}:SamplingParams")
    kv_cls = import_object(KV_CACHE_CONFIG if settings.factory == DEFAULT_FACTORY else f"{module}:KvCacheConfig")
    return llm_cls(**settings.llm_kwargs(checkpoint_dir, kv_cls)), sampling_cls


def sampling_kwargs(request: EngineRequest, default_end_id: int) -> dict[str, Any]:
    """SamplingParams keyword arguments for one request. Stop words are matched by the engine (on
    ids, any length); bad words must be single tokens (the LLM API's `bad_token_ids`)."""
    kw: dict[str, Any] = {"max_tokens": request.max_new_tokens, "detokenize": False}
    end_id = default_end_id if request.end_id is None else request.end_id
    if end_id == NO_END_ID:
        kw.update(end_id=default_end_id, ignore_eos=True)
    else:
        kw["end_id"] = end_id
    if request.greedy:
        kw["top_k"] = 1
    else:
        kw["temperature"] = request.temperature
        if request.top_k:
            kw["top_k"] = request.top_k
        if 0 < request.top_p < 1:
            kw["top_p"] = request.top_p
        if request.random_seed is not None:
            kw["seed"] = int(request.random_seed)
    if request.repetition_penalty != 1.0:
        kw["repetition_penalty"] = request.repetition_penalty
    for name in ("presence_penalty", "frequency_penalty"):     # documented SamplingParams fields too
        if getattr(request, name, 0.0):
            kw[name] = getattr(request, name)
    if getattr(request, "beam_width", 1) != 1:
        raise InvalidInput("beam_width", "the LLM API engine samples one sequence per request; use 1")
    if getattr(request, "length_penalty", 1.0) != 1.0:
        raise InvalidInput("len_penalty", "applies to beam search, which the LLM API engine does not run")
    bias = getattr(request, "embedding_bias", None)
    if bias is not None and bias.size and bias.any():
        raise InvalidInput("embedding_bias", "is not supported by the LLM API engine")
    if getattr(request, "return_generation_logits", False):
        raise InvalidInput("return_generation_logits", "generation logits are not available from the LLM API engine")
    if request.min_length:
        kw["min_tokens"] = request.min_length
    if request.bad_words:
        if any(len(w) != 1 for w in request.bad_words):
            raise InvalidInput("bad_words_list", "the LLM API engine takes bad words of one token only")
        kw["bad_token_ids"] = [w[0] for w in request.bad_words]
    if request.return_log_probs:
        kw["logprobs"] = 1
    return kw


def refuse_batched(inputs: dict) -> None:
    """One sequence per Triton request (the ensemble and the `bayling` model send one); a request
    carrying several prompts, or asking for several sequences, is refused by name instead of merged."""
    ids = inputs.get("input_ids")
    if ids is not None and ids.ndim > 1 and ids.shape[0] > 1:
        raise InvalidInput("input_ids", f"the LLM API engine takes one prompt per request, got {ids.shape[0]}")
    n = inputs.get("num_return_sequences")
    if n is not None and n.size and int(n.reshape(-1)[0]) > 1:
        raise InvalidInput("num_return_sequences", "the LLM API engine returns one sequence per request; use 1")


def token_log_probs(completion, start: int, end: int) -> list[float]:
    """Log probs of the generated tokens [start, end): the LLM API gives a float per token, or
    (newer) a {token id: Logprob} dict per token holding the sampled one."""
    probs = getattr(completion, "logprobs", None) or []
    out = []
    for i in range(start, end):
        p = probs[i] if i < len(probs) else 0.0
        if isinstance(p, dict):
            token = completion.token_ids[i]
            p = p.get(token, next(iter(p.values()), 0.0)) if p else 0.0
        out.append(float(getattr(p, "logprob", p)))
    return out


@dataclass(eq=False)
class _Active:
    request: EngineRequest
    sink: Sink
    box: Outbox = None
    generated: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    result: Any = None                # the LLM API's result, for abort()
    started: bool = False             # the LLM API has produced its first token (it is scheduled)
    error: Exception | None = None
    done: bool = False
    stop_requested: bool = False

    @property
    def cancelled(self) -> bool:
        return self.stop_requested or self.box.cancelled


class LlmApiEngine:
    """The same interface as `Ct2Engine` (validate, submit, stop, shutdown) over an LLM API object."""

    def __init__(self, llm, sampling_params: Callable[..., Any], *, vocab_size: int, default_end_id: int,
                 cancel_poll_s: float = 0.05, one_token_per_response: bool = False):
        self.llm = llm
        self.sampling_params = sampling_params
        self.vocab_size = vocab_size
        self.default_end_id = default_end_id
        self.one_token_per_response = one_token_per_response
        self.generated_tokens = 0
        # Requests in the engine, and those the LLM API has scheduled (made a token for): what the C++
        # backend reports as nv_trt_llm_request_metrics active / scheduled. Changed on the loop thread only.
        self.active = 0
        self.scheduled = 0
        self.kv_tokens = 0            # prompt + generated tokens of the requests in the engine (their KV cache)
        self._by_id: dict[str, _Active] = {}
        self._lock = threading.Lock()
        self.relay = Relay(poll_s=cancel_poll_s, name="llmapi-relay")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llmapi-loop", daemon=True)
        self._thread.start()

    # --- the adapter's side
    def validate(self, request: EngineRequest) -> None:
        validate_ids(request, self.vocab_size)
        sampling_kwargs(request, self.default_end_id)       # refuses what the LLM API cannot take

    def submit(self, request: EngineRequest, sink: Sink, is_cancelled: Callable[[], bool] = lambda: False) -> None:
        self.validate(request)
        params = self.sampling_params(**sampling_kwargs(request, self.default_end_id))
        active = _Active(request, sink)
        active.box = Outbox(lambda start, end, final: self._deliver(active, start, end, final), is_cancelled,
                            on_cancel=lambda: self._abort_soon(active))
        self.relay.watch(active.box)
        with self._lock:
            if request.request_id:
                self._by_id[request.request_id] = active
        asyncio.run_coroutine_threadsafe(self._generate(active, params), self._loop)

    def stop(self, request_id: str) -> None:
        """TensorRT-LLM's `stop` input: end the request with this id (it gets its final response)."""
        with self._lock:
            active = self._by_id.get(request_id)
        if active is not None:
            active.stop_requested = True
            self._abort_soon(active)

    def shutdown(self) -> None:
        with self._lock:
            pending = list(self._by_id.values())
        for active in pending:
            active.stop_requested = True
            self._abort_soon(active)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self.relay.stop()
        shutdown = getattr(self.llm, "shutdown", None)
        if callable(shutdown):
            shutdown()

    # --- the event loop's side
    def _abort_soon(self, active: _Active) -> None:
        self._loop.call_soon_threadsafe(self._abort, active)

    @staticmethod
    def _abort(active: _Active) -> None:
        if active.result is not None and not active.done:
            active.result.abort()

    async def _generate(self, active: _Active, params) -> None:
        request = active.request
        self.active += 1
        self.kv_tokens += len(request.input_ids)
        try:
            active.result = self.llm.generate_async({"prompt_token_ids": list(request.input_ids)}, params,
                                                    streaming=True)
            if active.cancelled:
                active.result.abort()
            async for output in active.result:
                completion = output.outputs[0]
                if self._take(active, completion):
                    active.result.abort()
                    break
                if output.finished:
                    break
            self._finish(active)
        except asyncio.CancelledError:
            self._finish(active)
        except Exception as exc:   # keep serving: fail this request, not the model
            log.exception("LLM API generation failed")
            self._finish(active, error=exc)

    def _take(self, active: _Active, completion) -> bool:
        """Append what the LLM API made since the last output; True when the request must end here."""
        request = active.request
        ids = completion.token_ids
        start = len(active.generated)
        end_ids = self._end_ids(request)
        ended = False
        for i in range(start, len(ids)):
            if ids[i] in end_ids:          # the end token is not part of the answer (as TensorRT-LLM)
                ended = True
                break
            active.generated.append(ids[i])
            if len(active.generated) >= request.max_new_tokens or ends_with_stop_word(active.generated, active.request.stop_words):
                ended = True
                break
        n = len(active.generated)
        self.generated_tokens += n - start
        self.kv_tokens += n - start
        if not active.started:
            active.started = True
            self.scheduled += 1
        if request.return_log_probs:
            active.log_probs.extend(token_log_probs(completion, start, n))
        else:
            active.log_probs.extend([0.0] * (n - start))
        if ended or active.cancelled:
            return True
        if request.streaming and n > start:
            active.box.length = n
            self.relay.wake(active.box)
        return False

    def _end_ids(self, request: EngineRequest) -> tuple[int, ...]:
        end_id = self.default_end_id if request.end_id is None else request.end_id
        return () if end_id == NO_END_ID else (end_id,)

    def _deliver(self, active: _Active, start: int, end: int, final: bool) -> None:
        """In the relay thread: one response with the tokens [start, end) (or one per token)."""
        try:
            if self.one_token_per_response and active.request.streaming:
                for i in range(start, end - 1 if final else end):
                    active.sink(Emission(active.generated[i:i + 1], active.log_probs[i:i + 1], False))
                start = max(start, end - 1) if final else end
                if not final:
                    return
            active.sink(Emission(active.generated[start:end], active.log_probs[start:end], final,
                                 active.error if final else None))
        except Exception:  # typically the client went away: stop generating for it
            active.stop_requested = True
            self._abort_soon(active)
            raise

    def _finish(self, active: _Active, error: Exception | None = None) -> None:
        if active.done:
            return
        self.active -= 1
        self.scheduled -= active.started
        self.kv_tokens -= len(active.request.input_ids) + len(active.generated)
        active.error = error
        active.done = True
        active.box.length = len(active.generated)
        active.box.final = True
        self.relay.wake(active.box)
        with self._lock:
            if self._by_id.get(active.request.request_id) is active:
                del self._by_id[active.request.request_id]
