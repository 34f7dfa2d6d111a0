"""A stand-in for TensorRT-LLM's LLM API (`tensorrt_llm.LLM`, `SamplingParams`), for machines without a GPU.

It honours the documented interface the engine uses (field and argument names from
build_engine/data/trtllm_1.2.1_options.json, "llm_api"): `LLM(**args)` refuses arguments the LLM API
does not have, `SamplingParams(**kw)` refuses fields it does not have, and
`generate_async(inputs, sampling_params, streaming)` returns an async iterator of outputs whose
`outputs[0].token_ids` are all the ids generated so far, with `finished`, `finish_reason` and
`abort()`. Behind it runs a real model: the Model Optimizer checkpoint that `bayling build --target
trtllm-llmapi` exported, dequantized (W8A16: int8 weight x per-channel scale; FP8: x per-tensor
scale) into a transformers LLaMA on the CPU, decoding step by step. So what the engine model is
tested against is that checkpoint's own output, not a script.

The real LLM API's batching, CUDA graphs and kernels are not imitated: each request decodes on its
own thread (tiny models only).
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path

from bayling.build_engine.trtllm_release import release_options

_API = release_options()["llm_api"]

# SamplingParams: exactly the documented fields (kw-only), defaults as documented where they matter.
_DEFAULTS = {"max_tokens": 32, "n": 1, "use_beam_search": False, "include_stop_str_in_output": False,
             "apply_batched_logits_processor": False, "return_context_logits": False,
             "return_generation_logits": False, "exclude_input_from_output": True, "return_encoder_output": False,
             "return_perf_metrics": False, "ignore_eos": False, "detokenize": True, "add_special_tokens": True,
             "skip_special_tokens": True, "spaces_between_special_tokens": True}
SamplingParams = make_dataclass("SamplingParams", [(n, object, field(default=_DEFAULTS.get(n))) for n in
                                                   _API["sampling_params"]], kw_only=True)


class KvCacheConfig(dict):
    def __init__(self, **kw):
        unknown = set(kw) - set(_API["kv_cache_config"])
        if unknown:
            raise TypeError(f"KvCacheConfig has no field(s) {sorted(unknown)}")
        super().__init__(**kw)


@dataclass
class CompletionOutput:
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput]
    finished: bool
    prompt_token_ids: list[int] = field(default_factory=list)


def _dequantized_llama(checkpoint: Path):
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    quant = json.loads((checkpoint / "hf_quant_config.json").read_text(encoding="utf-8"))["quantization"]
    if quant["quant_algo"] not in ("W8A16", "FP8"):
        raise ValueError(f"the stand-in loads W8A16 and FP8 checkpoints, not {quant['quant_algo']}")
    state = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        state.update(load_file(str(path)))
    weights = {}
    for name, tensor in state.items():
        if name.endswith("_scale") or name.endswith("_amax"):
            continue
        scale = state.get(name + "_scale") if name.endswith(".weight") else None
        if scale is not None:
            scale = scale.float()
            tensor = tensor.float() * (scale[:, None] if scale.dim() == 1 else scale)
        weights[name] = tensor.float()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    return model.float().eval(), quant


class _Result:
    """What generate_async returns: an async iterator of RequestOutput, abortable."""

    def __init__(self, loop: asyncio.AbstractEventLoop, streaming: bool):
        self._loop, self._streaming = loop, streaming
        self._queue: asyncio.Queue = asyncio.Queue()
        self.aborted = threading.Event()
        self.finished = False
        self.outputs: list[CompletionOutput] = [CompletionOutput()]

    def abort(self) -> None:
        self.aborted.set()

    def _push(self, output: RequestOutput | None) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, output)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            item = await self._queue.get()
            if item is None:
                raise StopAsyncIteration
            if self._streaming or item.finished:
                return item


class LLM:
    def __init__(self, **args):
        unknown = set(args) - set(_API["llm_args"])
        if unknown:
            raise TypeError(f"LLM has no argument(s) {sorted(unknown)}")
        self.args = args
        if args.get("backend") != "pytorch" or not args.get("skip_tokenizer_init"):
            raise ValueError("the engine runs the PyTorch backend without a tokenizer")
        self.model, self.quant = _dequantized_llama(Path(args["model"]))
        self.requests = 0
        self.aborted = 0

    def generate_async(self, inputs, sampling_params, streaming: bool = False) -> _Result:
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError("sampling_params must be a SamplingParams")
        if sampling_params.end_id is None:
            raise ValueError("tokenizer is required to reset end_id if it is None")
        ids = list(inputs["prompt_token_ids"] if isinstance(inputs, dict) else inputs)
        result = _Result(asyncio.get_running_loop(), streaming)
        self.requests += 1
        threading.Thread(target=self._decode, args=(ids, sampling_params, result), daemon=True).start()
        return result

    def _decode(self, prompt: list[int], sp, result: _Result) -> None:
        import torch

        generator = torch.Generator().manual_seed(int(sp.seed or 0))
        tokens, probs, reason = [], [], "length"
        for _ in range(sp.max_tokens):
            if result.aborted.is_set():
                reason = "cancelled"
                self.aborted += 1
                break
            with torch.no_grad():
                logits = self.model(torch.tensor([prompt + tokens])).logits[0, -1].float()
            if sp.bad_token_ids:
                logits[list(sp.bad_token_ids)] = float("-inf")
            if sp.min_tokens and len(tokens) < sp.min_tokens and not sp.ignore_eos:
                logits[sp.end_id] = float("-inf")
            log_probs = torch.log_softmax(logits, -1)
            if sp.top_k == 1 or (sp.temperature == 0):
                token = int(torch.argmax(logits))
            else:
                scaled = logits / float(sp.temperature or 1.0)
                if sp.top_k:
                    cut = torch.topk(scaled, int(sp.top_k)).values[-1]
                    scaled[scaled < cut] = float("-inf")
                token = int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator))
            if token == sp.end_id and not sp.ignore_eos:
                reason = "stop"
                break
            tokens.append(token)
            probs.append(float(log_probs[token]))
            if len(tokens) < sp.max_tokens:
                result._push(self._output(tokens, probs, sp, None))
        result.finished = True
        result._push(self._output(tokens, probs, sp, reason))
        result._push(None)

    @staticmethod
    def _output(tokens, probs, sp, reason) -> RequestOutput:
        completion = CompletionOutput(token_ids=list(tokens), logprobs=list(probs) if sp.logprobs else [],
                                      finish_reason=reason)
        return RequestOutput([completion], finished=reason is not None)

    def shutdown(self) -> None:
        pass


assert {f.name for f in fields(SamplingParams)} == set(_API["sampling_params"])
