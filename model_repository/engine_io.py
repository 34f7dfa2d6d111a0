"""The CPU `tensorrt_llm` model's request and response tensors, as TensorRT-LLM's backend
reads and writes them (tensorrtllm_backend v0.17.0, inflight_batcher_llm)."""

from __future__ import annotations

import numpy as np

from bayling.errors import InvalidInput
from bayling.tokenization import parse_word_list
from bayling.model_repository.engine_beam import MAX_BEAM_WIDTH
from bayling.model_repository.engine_ct2 import EngineRequest, Emission
from bayling.model_repository.triton_io import scalar

UNSUPPORTED_ON_CPU = {
    "return_context_logits": "context logits",
}


def is_stop_request(inputs: dict[str, np.ndarray]) -> bool:
    return bool(scalar(inputs, "stop", False))


def engine_request(inputs: dict[str, np.ndarray], request_id: str, exclude_input_default: bool = True) -> tuple[EngineRequest, bool]:
    """The request, and whether the output should repeat the input ids (exclude_input_in_output false)."""
    ids = inputs.get("input_ids")
    if ids is None:
        raise InvalidInput("input_ids", "is required")
    ids = ids.reshape(-1)
    length = scalar(inputs, "input_lengths", len(ids))
    if not 0 < length <= len(ids):
        raise InvalidInput("input_lengths", f"must be between 1 and the {len(ids)} ids given, got {length}")
    beam_width = int(scalar(inputs, "beam_width", 1) or 1)
    if not 1 <= beam_width <= MAX_BEAM_WIDTH:
        raise InvalidInput("beam_width", f"must be between 1 and {MAX_BEAM_WIDTH} on the CPU engine, got {beam_width}")
    if beam_width > 1 and scalar(inputs, "streaming", False):
        raise InvalidInput("streaming", "the CPU engine's beam search answers at the end; stream with beam_width 1")
    for name, what in UNSUPPORTED_ON_CPU.items():
        if scalar(inputs, name, False):
            raise InvalidInput(name, f"{what} are not available from the CPU engine")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= scalar(inputs, name, 0.0) <= 2:
            raise InvalidInput(name, f"must be between -2 and 2, got {scalar(inputs, name)}")
    bias = inputs.get("embedding_bias")
    bias = bias.reshape(-1).astype(np.float32) if bias is not None and bias.size and np.any(bias) else None
    if bias is not None and not np.all(np.isfinite(bias)):
        raise InvalidInput("embedding_bias", "must be finite")
    stop = inputs.get("stop_words_list")
    bad = inputs.get("bad_words_list")
    streaming = bool(scalar(inputs, "streaming", False))
    request = EngineRequest(
        request_id=request_id,
        input_ids=[int(t) for t in ids[:length]],
        max_new_tokens=int(scalar(inputs, "request_output_len")),
        end_id=scalar(inputs, "end_id"),
        stop_words=parse_word_list(stop) if stop is not None and stop.size else [],
        bad_words=parse_word_list(bad) if bad is not None and bad.size else [],
        temperature=float(scalar(inputs, "temperature", 1.0)),
        top_k=int(scalar(inputs, "runtime_top_k", 0)),
        top_p=float(scalar(inputs, "runtime_top_p", 0.0)),
        repetition_penalty=float(scalar(inputs, "repetition_penalty", 1.0)),
        min_length=int(scalar(inputs, "min_tokens", scalar(inputs, "min_length", 0))),
        random_seed=scalar(inputs, "seed", scalar(inputs, "random_seed")),
        streaming=streaming,
        return_log_probs=bool(scalar(inputs, "return_log_probs", False)),
        beam_width=beam_width,
        length_penalty=float(scalar(inputs, "len_penalty", 1.0)),
        presence_penalty=float(scalar(inputs, "presence_penalty", 0.0)),
        frequency_penalty=float(scalar(inputs, "frequency_penalty", 0.0)),
        embedding_bias=bias,
        return_generation_logits=bool(scalar(inputs, "return_generation_logits", False)),
    )
    if request.temperature <= 0 and not request.greedy:
        raise InvalidInput("temperature", "must be positive when sampling (use runtime_top_k 1 for greedy)")
    if not 0 <= request.top_p <= 1:
        raise InvalidInput("runtime_top_p", f"must be in [0, 1], got {request.top_p}")
    if request.top_k < 0:
        raise InvalidInput("runtime_top_k", f"must be 0 or positive, got {request.top_k}")
    include_input = not bool(scalar(inputs, "exclude_input_in_output", exclude_input_default)) and not streaming
    return request, include_input


def engine_outputs(emission: Emission, prefix_ids: list[int] = (), requested: frozenset[str] | None = None
                   ) -> dict[str, np.ndarray]:
    """output_ids [1, beam=1, n], sequence_length [1, 1], and the log probs, as TensorRT-LLM shapes them;
    only the `requested` ones (None: all)."""
    if emission.beams:
        return _beam_outputs(emission.beams, list(prefix_ids), requested)
    ids = [*prefix_ids, *emission.token_ids]
    outputs = {"output_ids": np.array(ids, dtype=np.int32).reshape(1, 1, len(ids)),
               "sequence_length": np.array([[len(ids)]], dtype=np.int32)}
    if requested is None or "cum_log_probs" in requested:
        outputs["cum_log_probs"] = np.array([[sum(emission.log_probs)]], dtype=np.float32)
    if requested is None or "output_log_probs" in requested:
        probs = list(emission.log_probs)   # of the generated tokens only, as TensorRT-LLM's (also with the input)
        outputs["output_log_probs"] = np.array(probs, dtype=np.float32).reshape(1, 1, len(probs))
    if emission.logits and (requested is None or "generation_logits" in requested):
        outputs["generation_logits"] = np.stack(emission.logits).astype(np.float32)[None, None]   # [1, beam, n, vocab]
    return {k: v for k, v in outputs.items() if requested is None or k in requested}


def _beam_outputs(beams: list, prefix_ids: list[int], requested: frozenset[str] | None) -> dict[str, np.ndarray]:
    """Every beam, best first: output_ids [1, beam, n] (padded with 0), sequence_length [1, beam], the
    log probs of the generated tokens [1, beam, n] and their sums [1, beam]."""
    rows = [prefix_ids + list(ids) for ids, _ in beams]
    n, width = max(len(r) for r in rows), len(beams)
    generated = max(len(ids) for ids, _ in beams)
    output_ids = np.zeros((1, width, n), dtype=np.int32)
    log_probs = np.zeros((1, width, generated), dtype=np.float32)
    for b, (row, (_, probs)) in enumerate(zip(rows, beams)):
        output_ids[0, b, :len(row)] = row
        log_probs[0, b, :len(probs)] = probs
    outputs = {"output_ids": output_ids, "sequence_length": np.array([[len(r) for r in rows]], dtype=np.int32),
               "cum_log_probs": log_probs.sum(axis=2), "output_log_probs": log_probs}
    return {k: v for k, v in outputs.items() if requested is None or k in requested}
