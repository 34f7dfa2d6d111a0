"""The tensor contract: every Triton model's inputs and outputs, declared once.

The `input [...]` and `output [...]` blocks of every rendered `config.pbtxt`
come from here, the CPU and GPU `tensorrt_llm` models alike, and so do the
names and dtypes that clients send. Names follow NVIDIA's tensorrtllm_backend
v0.17.0 (`all_models/inflight_batcher_llm`) so that NVIDIA's tools work
unchanged; BayLing's entry model `bayling` adds `messages`,
`return_prompt_ids` and the token counts.

Every model here uses Triton's batch dimension (`max_batch_size > 0`), so a
client sends one request as shape ``[1, *dims]``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# Triton data type -> numpy dtype (STRING is Triton's BYTES: numpy object arrays of bytes)
NUMPY_DTYPES: dict[str, type] = {
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT64": np.uint64,
    "UINT8": np.uint8,
    "FP32": np.float32,
    "FP16": np.float16,
    "BOOL": np.bool_,
    "STRING": np.object_,
}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str                      # Triton type without the TYPE_ prefix
    dims: tuple[int, ...]           # per request, without the batch dimension
    optional: bool = False
    scalar: bool = False            # dims [1] reshaped to [] for the backend, as NVIDIA declares them
    ragged: bool = False            # allow_ragged_batch

    @property
    def numpy_dtype(self) -> type:
        return NUMPY_DTYPES[self.dtype]

    @property
    def wire_dtype(self) -> str:
        """The dtype name tritonclient uses (STRING is sent as BYTES)."""
        return "BYTES" if self.dtype == "STRING" else self.dtype

    def pbtxt(self) -> str:
        lines = [f'    name: "{self.name}"', f"    data_type: TYPE_{self.dtype}",
                 f"    dims: [ {', '.join(str(d) for d in self.dims)} ]"]
        if self.scalar:
            lines.append("    reshape: { shape: [ ] }")
        if self.optional:
            lines.append("    optional: true")
        if self.ragged:
            lines.append("    allow_ragged_batch: true")
        return "  {\n" + "\n".join(lines) + "\n  }"


def _scalar(name: str, dtype: str, optional: bool = True) -> Tensor:
    return Tensor(name, dtype, (1,), optional=optional, scalar=True)


def _optional(tensors: tuple[Tensor, ...], *names: str) -> tuple[Tensor, ...]:
    return tuple(replace(t, optional=True) if t.name in names else t for t in tensors)


def _t(name: str, dtype: str, *dims: int, optional: bool = True, ragged: bool = False) -> Tensor:
    return Tensor(name, dtype, tuple(dims), optional=optional, ragged=ragged)


# --- the engine model `tensorrt_llm` (TensorRT-LLM backend on GPU, CTranslate2 Python model on CPU):
# all of v0.17.0's tensors, in its order (tests/test_nvidia_parity.py checks them against the record
# model_repository/data/inflight_batcher_llm_v0.17.0.json). `LOGITS` stands for NVIDIA's ${logits_datatype}.
LOGITS = "FP32"
# v0.17 name -> TensorRT-LLM 1.x name; a request may give either (the 1.x one wins).
RENAMED_IN_1_X: dict[str, str] = {"min_length": "min_tokens", "random_seed": "seed"}
RENAMED_IN_1_X_INPUTS: tuple[Tensor, ...] = (_scalar("min_tokens", "INT32"), _scalar("seed", "UINT64"))
ENGINE_INPUTS: tuple[Tensor, ...] = (
    _t("input_ids", "INT32", -1, ragged=True),
    _t("encoder_input_features", "FP16", -1, -1, ragged=True),   # ${encoder_input_features_data_type}
    _scalar("encoder_output_lengths", "INT32"),
    _scalar("input_lengths", "INT32", optional=False),
    _scalar("request_output_len", "INT32", optional=False),
    _scalar("num_return_sequences", "INT32"),
    _t("draft_input_ids", "INT32", -1, ragged=True),
    _t("decoder_input_ids", "INT32", -1, ragged=True),
    _scalar("decoder_input_lengths", "INT32"),
    _t("draft_logits", LOGITS, -1, -1, ragged=True),
    _scalar("draft_acceptance_threshold", "FP32"),
    _scalar("end_id", "INT32"),
    _scalar("pad_id", "INT32"),
    _t("stop_words_list", "INT32", 2, -1, ragged=True),
    _t("bad_words_list", "INT32", 2, -1, ragged=True),
    _t("embedding_bias", "FP32", -1, ragged=True),
    _scalar("beam_width", "INT32"),
    _scalar("temperature", "FP32"),
    _scalar("runtime_top_k", "INT32"),
    _scalar("runtime_top_p", "FP32"),
    _scalar("runtime_top_p_min", "FP32"),
    _scalar("runtime_top_p_decay", "FP32"),
    _scalar("runtime_top_p_reset_ids", "INT32"),
    _scalar("len_penalty", "FP32"),
    _scalar("early_stopping", "BOOL"),
    _scalar("repetition_penalty", "FP32"),
    _scalar("min_length", "INT32"),
    _scalar("beam_search_diversity_rate", "FP32"),
    _scalar("presence_penalty", "FP32"),
    _scalar("frequency_penalty", "FP32"),
    _scalar("random_seed", "UINT64"),
    _scalar("return_log_probs", "BOOL"),
    _scalar("return_context_logits", "BOOL"),
    _scalar("return_generation_logits", "BOOL"),
    _scalar("return_kv_cache_reuse_stats", "BOOL"),
    _scalar("exclude_input_in_output", "BOOL"),
    _scalar("stop", "BOOL"),
    _scalar("streaming", "BOOL"),
    _t("prompt_embedding_table", "FP16", -1, -1, ragged=True),
    _t("prompt_table_extra_ids", "UINT64", -1, ragged=True),
    _scalar("prompt_vocab_size", "INT32"),
    _t("cross_attention_mask", "BOOL", -1, -1, ragged=True),
    _scalar("lora_task_id", "UINT64"),
    _t("lora_weights", "FP16", -1, -1, ragged=True),
    _t("lora_config", "INT32", -1, 3, ragged=True),
    _t("context_phase_params", "UINT8", -1, ragged=True),
    # TensorRT-LLM 1.x's names of min_length and random_seed: the pinned GPU backend (1.2.1) reads only
    # these (triton_backend/inflight_batcher_llm/src/utils.h); the CPU and LLM API engines read either.
    *RENAMED_IN_1_X_INPUTS,
    _t("skip_cross_attn_blocks", "BOOL", 1, ragged=True),
    _t("retention_token_range_starts", "INT32", -1, ragged=True),
    _t("retention_token_range_ends", "INT32", -1, ragged=True),
    _t("retention_token_range_priorities", "INT32", -1, ragged=True),
    _t("retention_token_range_durations_ms", "INT32", -1, ragged=True),
    _t("retention_decode_priority", "INT32", 1, ragged=True),
    _t("retention_decode_duration_ms", "INT32", 1, ragged=True),
)

KV_CACHE_STATS: tuple[Tensor, ...] = (
    Tensor("kv_cache_alloc_new_blocks", "INT32", (1,)),
    Tensor("kv_cache_reused_blocks", "INT32", (1,)),
    Tensor("kv_cache_alloc_total_blocks", "INT32", (1,)),
)

ENGINE_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("output_ids", "INT32", (-1, -1)),          # [beam, tokens]
    Tensor("sequence_length", "INT32", (-1,)),        # [beam]
    Tensor("cum_log_probs", "FP32", (-1,)),           # [beam]
    Tensor("output_log_probs", "FP32", (-1, -1)),     # [beam, tokens]
    Tensor("context_logits", LOGITS, (-1, -1)),
    Tensor("generation_logits", LOGITS, (-1, -1, -1)),
    Tensor("batch_index", "INT32", (1,)),             # which request of a batched call a response answers
    Tensor("sequence_index", "INT32", (1,)),          # which of its num_return_sequences
    Tensor("context_phase_params", "UINT8", (-1,)),
) + KV_CACHE_STATS

# Engine inputs the CPU engine (CTranslate2) cannot honour: a request that gives one is refused with
# INVALID_ARGUMENT naming it (the TensorRT-LLM engine on GPU takes them). Flags count only when true.
CPU_UNSUPPORTED: dict[str, str] = {
    "encoder_input_features": "encoder-decoder models", "encoder_output_lengths": "encoder-decoder models",
    "draft_input_ids": "speculative decoding", "draft_logits": "speculative decoding",
    "draft_acceptance_threshold": "speculative decoding",
    "runtime_top_p_min": "top-p decay", "runtime_top_p_decay": "top-p decay", "runtime_top_p_reset_ids": "top-p decay",
    "beam_search_diversity_rate": "diverse beam search",
    "return_context_logits": "context logits", "return_kv_cache_reuse_stats": "KV cache statistics",
    "prompt_embedding_table": "prompt tuning", "prompt_table_extra_ids": "prompt tuning",
    "prompt_vocab_size": "prompt tuning", "cross_attention_mask": "multimodal models",
    "lora_task_id": "LoRA adapters", "lora_weights": "LoRA adapters", "lora_config": "LoRA adapters",
    "context_phase_params": "disaggregated serving", "skip_cross_attn_blocks": "multimodal models",
    "retention_token_range_starts": "KV cache retention", "retention_token_range_ends": "KV cache retention",
    "retention_token_range_priorities": "KV cache retention",
    "retention_token_range_durations_ms": "KV cache retention", "retention_decode_priority": "KV cache retention",
    "retention_decode_duration_ms": "KV cache retention",
}

# --- `preprocessing` and `postprocessing`, with NVIDIA's (upper-case) names
PREPROCESSING_INPUTS: tuple[Tensor, ...] = (
    _t("QUERY", "STRING", 1, optional=False),
    _t("DECODER_QUERY", "STRING", 1),
    _t("IMAGE_BYTES", "UINT8", -1, -1, -1, -1),
    _t("IMAGE_URL", "STRING", 1),
    _t("VIDEO_BYTES", "UINT8", -1, -1, -1, -1),
    _t("REQUEST_OUTPUT_LEN", "INT32", 1, optional=False),
    _t("BAD_WORDS_DICT", "STRING", -1),
    _t("STOP_WORDS_DICT", "STRING", -1),
    _t("EMBEDDING_BIAS_WORDS", "STRING", -1),
    _t("EMBEDDING_BIAS_WEIGHTS", "FP32", -1),
    _t("END_ID", "INT32", 1),
    _t("PAD_ID", "INT32", 1),
    _t("PROMPT_TABLE_EXTRA_ID", "UINT64", 1),
)

PREPROCESSING_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("INPUT_ID", "INT32", (-1,)),
    Tensor("REQUEST_INPUT_LEN", "INT32", (1,)),
    Tensor("DECODER_INPUT_ID", "INT32", (-1,)),
    Tensor("REQUEST_DECODER_INPUT_LEN", "INT32", (1,)),
    Tensor("BAD_WORDS_IDS", "INT32", (2, -1)),
    Tensor("STOP_WORDS_IDS", "INT32", (2, -1)),
    Tensor("EMBEDDING_BIAS", "FP32", (-1,)),
    Tensor("REQUEST_OUTPUT_LEN", "INT32", (-1,)),
    Tensor("OUT_END_ID", "INT32", (1,)),
    Tensor("OUT_PAD_ID", "INT32", (1,)),
    Tensor("OUT_PROMPT_TABLE_EXTRA_IDS", "UINT64", (-1,)),
    # multimodal outputs (declared as NVIDIA does; a text model never produces them)
    Tensor("PIXEL_VALUES", "FP16", (-1, -1, -1, -1)),
    Tensor("ASPECT_RATIO_IDS", "INT64", (-1,)),
    Tensor("ASPECT_RATIO_MASK", "INT64", (-1, -1)),
    Tensor("CROSS_ATTENTION_MASK", "INT64", (-1, -1, -1)),
    Tensor("IMAGE_SIZES", "INT64", (2,)),
    Tensor("IS_VIDEO_INPUT", "BOOL", (1,)),
)

# Inputs of the text models that need a multimodal or prompt-tuned model: refused by name.
TEXT_UNSUPPORTED: dict[str, str] = {
    "DECODER_QUERY": "encoder-decoder models", "IMAGE_BYTES": "multimodal models", "IMAGE_URL": "multimodal models",
    "VIDEO_BYTES": "multimodal models", "PROMPT_TABLE_EXTRA_ID": "prompt tuning",
}

POSTPROCESSING_INPUTS: tuple[Tensor, ...] = (
    Tensor("TOKENS_BATCH", "INT32", (-1, -1)),        # [beam, tokens]
    Tensor("SEQUENCE_LENGTH", "INT32", (-1,)),        # [beam]
)

POSTPROCESSING_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("OUTPUT", "STRING", (-1,)),                # one text per beam, the whole response 1-D as NVIDIA's
)

# --- the public `ensemble` (NVIDIA's names, so genai-perf and Triton's OpenAI frontend work)
_PARAMETERS: tuple[Tensor, ...] = (     # what the ensemble and tensorrt_llm_bls share, in NVIDIA's order
    _t("exclude_input_in_output", "BOOL", 1),
    _t("end_id", "INT32", 1),
    _t("pad_id", "INT32", 1),
    _t("top_k", "INT32", 1),
    _t("top_p", "FP32", 1),
    _t("temperature", "FP32", 1),
    _t("length_penalty", "FP32", 1),
    _t("repetition_penalty", "FP32", 1),
    _t("min_length", "INT32", 1),
    _t("presence_penalty", "FP32", 1),
    _t("frequency_penalty", "FP32", 1),
    _t("random_seed", "UINT64", 1),
)

ENSEMBLE_INPUTS: tuple[Tensor, ...] = (
    _t("text_input", "STRING", 1, optional=False),
    _t("decoder_text_input", "STRING", 1),
    _t("max_tokens", "INT32", 1, optional=False),
    _t("num_return_sequences", "INT32", 1),
    _t("bad_words", "STRING", -1),
    _t("stop_words", "STRING", -1),
) + _PARAMETERS + (
    _t("return_log_probs", "BOOL", 1),
    _t("return_context_logits", "BOOL", 1),
    _t("return_generation_logits", "BOOL", 1),
    _t("return_kv_cache_reuse_stats", "BOOL", 1),
    _t("beam_width", "INT32", 1),
    _t("stream", "BOOL", 1),
    _t("prompt_embedding_table", "FP16", -1, -1),
    _t("prompt_table_extra_id", "UINT64", 1),
    _t("prompt_vocab_size", "INT32", 1),
    _t("embedding_bias_words", "STRING", -1),
    _t("embedding_bias_weights", "FP32", -1),
    _t("lora_task_id", "UINT64", 1),
    _t("lora_weights", "FP16", -1, -1, ragged=True),
    _t("lora_config", "INT32", -1, 3, ragged=True),
) + tuple(_t(t.name, t.dtype, 1) for t in RENAMED_IN_1_X_INPUTS)   # TensorRT-LLM 1.x's names

ENSEMBLE_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("text_output", "STRING", (-1,)),
    Tensor("cum_log_probs", "FP32", (-1,)),
    Tensor("output_log_probs", "FP32", (-1, -1)),
    Tensor("context_logits", LOGITS, (-1, -1)),
    Tensor("generation_logits", LOGITS, (-1, -1, -1)),
    Tensor("batch_index", "INT32", (1,)),
    Tensor("sequence_index", "INT32", (1,)),
) + KV_CACHE_STATS

# --- `tensorrt_llm_bls`: NVIDIA's BLS model (text in, text out, decoupled); here the `bayling` model's
# logic with text_input, so streamed pieces are exact text (tokens accumulated, not decoded one by one).
BLS_INPUTS: tuple[Tensor, ...] = (
    _t("text_input", "STRING", 1, optional=False),
    _t("decoder_text_input", "STRING", 1),
    _t("image_input", "FP16", -1, 3, -1, -1),
    _t("image_bytes_input", "UINT8", -1, -1, -1, -1),
    _t("image_url_input", "STRING", 1),
    _t("video_bytes_input", "UINT8", -1, -1, -1, -1),
    _t("max_tokens", "INT32", 1, optional=False),
    _t("bad_words", "STRING", -1),
    _t("stop_words", "STRING", -1),
) + _PARAMETERS + (
    _scalar("return_log_probs", "BOOL"),
    _scalar("return_context_logits", "BOOL"),
    _scalar("return_generation_logits", "BOOL"),
    _scalar("num_return_sequences", "INT32"),
    _t("beam_width", "INT32", 1),
    _t("stream", "BOOL", 1),
    _t("prompt_embedding_table", "FP16", -1, -1),
    _t("prompt_vocab_size", "INT32", 1),
    _t("prompt_table_extra_id", "UINT64", 1),
    _t("embedding_bias_words", "STRING", -1),
    _t("embedding_bias_weights", "FP32", -1),
    _t("num_draft_tokens", "INT32", 1),
    _scalar("use_draft_logits", "BOOL"),
    _scalar("lora_task_id", "UINT64"),
    _t("lora_weights", "FP16", -1, -1, ragged=True),
    _t("lora_config", "INT32", -1, 3, ragged=True),
    _scalar("return_kv_cache_reuse_stats", "BOOL"),
)

BLS_OUTPUTS: tuple[Tensor, ...] = ENSEMBLE_OUTPUTS

# Inputs of the ensemble and tensorrt_llm_bls that the text pipeline here does not serve (on either
# engine: no multimodal, prompt-tuned or LoRA model is built); a request giving one is refused by name.
TEXT_MODEL_UNSUPPORTED: dict[str, str] = {
    "decoder_text_input": "encoder-decoder models", "image_input": "multimodal models",
    "image_bytes_input": "multimodal models", "image_url_input": "multimodal models",
    "video_bytes_input": "multimodal models", "prompt_embedding_table": "prompt tuning",
    "prompt_table_extra_id": "prompt tuning", "prompt_vocab_size": "prompt tuning",
    "num_draft_tokens": "speculative decoding", "use_draft_logits": "speculative decoding",
    "lora_task_id": "LoRA adapters", "lora_weights": "LoRA adapters", "lora_config": "LoRA adapters",
}

# How the ensemble wires its public names to the engine (the rest go through preprocessing).
ENSEMBLE_TO_ENGINE: dict[str, str] = {
    "exclude_input_in_output": "exclude_input_in_output",
    "top_k": "runtime_top_k",
    "top_p": "runtime_top_p",
    "temperature": "temperature",
    "length_penalty": "len_penalty",
    "repetition_penalty": "repetition_penalty",
    "min_length": "min_length",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "random_seed": "random_seed",
    **{new: new for new in RENAMED_IN_1_X.values()},   # the 1.x names, for clients of TensorRT-LLM 1.x
    "return_log_probs": "return_log_probs",
    "return_context_logits": "return_context_logits",
    "return_generation_logits": "return_generation_logits",
    "return_kv_cache_reuse_stats": "return_kv_cache_reuse_stats",
    "num_return_sequences": "num_return_sequences",
    "beam_width": "beam_width",
    "stream": "streaming",
    "prompt_embedding_table": "prompt_embedding_table",
    "prompt_vocab_size": "prompt_vocab_size",
    "lora_task_id": "lora_task_id",
    "lora_weights": "lora_weights",
    "lora_config": "lora_config",
}

# Every public parameter that becomes one engine scalar: the ensemble's direct wiring, plus those that
# reach the engine through `preprocessing` (max_tokens, end_id, pad_id). The `bayling` model uses it too.
PUBLIC_TO_ENGINE: dict[str, str] = {**ENSEMBLE_TO_ENGINE, "max_tokens": "request_output_len", "end_id": "end_id",
                                    "pad_id": "pad_id"}
# The `bayling` model sends the 1.x names, which every engine reads (the GPU backend only those).
PUBLIC_TO_ENGINE.update(RENAMED_IN_1_X)
# The `bayling` model's OpenAI options: logprobs asks for the engine's log probs, top_logprobs > 0 for its
# generation logits (the alternatives are ranked from them), as one engine scalar each ...
PUBLIC_TO_ENGINE.update({"logprobs": "return_log_probs", "top_logprobs": "return_generation_logits"})
# ... and logit_bias becomes NVIDIA's vocabulary-sized FP32 `embedding_bias` (not a scalar).
LOGIT_BIAS_TENSOR = "embedding_bias"


def engine_scalars(values: dict) -> dict[str, np.ndarray]:
    """Public parameter values -> the engine's [1, 1] tensors, named and typed as `tensorrt_llm` declares them.

    >>> engine_scalars({"top_k": 1, "max_tokens": 64})["runtime_top_k"]
    array([[1]], dtype=int32)
    """
    arrays = {}
    for name, value in values.items():
        engine = PUBLIC_TO_ENGINE[name]
        arrays[engine] = np.array([[value]], dtype=tensor(ENGINE_MODEL, engine).numpy_dtype)
    return arrays


# --- the entry model `bayling`: everything the ensemble takes (text_input and max_tokens
# optional), plus a conversation as JSON; streamed responses carry only the new text.
_ENTRY_FROM_ENSEMBLE = ("text_input", "max_tokens", "bad_words", "stop_words", "exclude_input_in_output", "end_id",
                        "pad_id", "top_k", "top_p", "temperature", "length_penalty", "repetition_penalty", "min_length",
                        "presence_penalty", "frequency_penalty", "random_seed", "return_log_probs",
                        "return_context_logits", "return_generation_logits", "beam_width", "stream")
ENTRY_INPUTS: tuple[Tensor, ...] = _optional(tuple(t for t in ENSEMBLE_INPUTS if t.name in _ENTRY_FROM_ENSEMBLE),
                                             "text_input", "max_tokens") + (
    Tensor("messages", "STRING", (1,), optional=True),
    Tensor("return_prompt_ids", "BOOL", (1,), optional=True),
    # OpenAI's per-token log probabilities and logit bias ({token_id: bias} as JSON)
    Tensor("logprobs", "BOOL", (1,), optional=True),
    Tensor("top_logprobs", "INT32", (1,), optional=True),
    Tensor("logit_bias", "STRING", (1,), optional=True),
)

ENTRY_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("text_output", "STRING", (1,)),
    Tensor("finish_reason", "STRING", (1,)),   # "" while streaming, then stop / length / cancelled
    Tensor("prompt_tokens", "INT32", (1,)),
    Tensor("completion_tokens", "INT32", (1,)),
    Tensor("prompt_ids", "INT32", (-1,)),      # only when return_prompt_ids is true
    # only when logprobs is true: a JSON list of {token, logprob, bytes, top_logprobs}, one per token of this response
    Tensor("token_logprobs", "STRING", (1,)),
)

ENTRY_MODEL = "bayling"
ENSEMBLE_MODEL = "ensemble"
ENGINE_MODEL = "tensorrt_llm"
BLS_MODEL = "tensorrt_llm_bls"

MODELS: dict[str, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] = {
    "preprocessing": (PREPROCESSING_INPUTS, PREPROCESSING_OUTPUTS),
    ENGINE_MODEL: (ENGINE_INPUTS, ENGINE_OUTPUTS),
    "postprocessing": (POSTPROCESSING_INPUTS, POSTPROCESSING_OUTPUTS),
    ENSEMBLE_MODEL: (ENSEMBLE_INPUTS, ENSEMBLE_OUTPUTS),
    ENTRY_MODEL: (ENTRY_INPUTS, ENTRY_OUTPUTS),
    BLS_MODEL: (BLS_INPUTS, BLS_OUTPUTS),
}


def io_blocks(model: str) -> str:
    """The `input [...]` and `output [...]` blocks of `model`'s config.pbtxt."""
    inputs, outputs = MODELS[model]
    return ("input [\n" + ",\n".join(t.pbtxt() for t in inputs) + "\n]\n"
            "output [\n" + ",\n".join(t.pbtxt() for t in outputs) + "\n]\n")


def tensor(model: str, name: str) -> Tensor:
    inputs, outputs = MODELS[model]
    for t in inputs + outputs:
        if t.name == name:
            return t
    raise KeyError(f"{model} has no tensor {name!r}")


def request_arrays(model: str, values: dict) -> dict[str, np.ndarray]:
    """Client-side request tensors for `model`: each value as shape [1, ...] with the contract's dtype.
    Strings are UTF-8 encoded (bytes pass through); a list fills a [-1] dimension."""
    arrays = {}
    for name, value in values.items():
        spec = tensor(model, name)
        items = value if isinstance(value, (list, tuple)) else [value]
        if spec.dtype == "STRING":
            arrays[name] = np.array([[v if isinstance(v, bytes) else str(v).encode("utf-8") for v in items]],
                                    dtype=np.object_)
        else:
            arrays[name] = np.array([list(items)], dtype=spec.numpy_dtype)
    return arrays
