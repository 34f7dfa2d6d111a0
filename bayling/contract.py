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


# --- the engine model `tensorrt_llm` (TensorRT-LLM backend on GPU, CTranslate2 Python model on CPU)
ENGINE_INPUTS: tuple[Tensor, ...] = (
    Tensor("input_ids", "INT32", (-1,), optional=True, ragged=True),
    _scalar("input_lengths", "INT32", optional=False),
    _scalar("request_output_len", "INT32", optional=False),
    _scalar("end_id", "INT32"),
    _scalar("pad_id", "INT32"),
    Tensor("stop_words_list", "INT32", (2, -1), optional=True, ragged=True),
    Tensor("bad_words_list", "INT32", (2, -1), optional=True, ragged=True),
    Tensor("embedding_bias", "FP32", (-1,), optional=True, ragged=True),
    _scalar("beam_width", "INT32"),
    _scalar("temperature", "FP32"),
    _scalar("runtime_top_k", "INT32"),
    _scalar("runtime_top_p", "FP32"),
    _scalar("len_penalty", "FP32"),
    _scalar("early_stopping", "BOOL"),
    _scalar("repetition_penalty", "FP32"),
    _scalar("min_length", "INT32"),
    _scalar("presence_penalty", "FP32"),
    _scalar("frequency_penalty", "FP32"),
    _scalar("random_seed", "UINT64"),
    _scalar("return_log_probs", "BOOL"),
    _scalar("return_context_logits", "BOOL"),
    _scalar("return_generation_logits", "BOOL"),
    _scalar("exclude_input_in_output", "BOOL"),
    _scalar("stop", "BOOL"),
    _scalar("streaming", "BOOL"),
)

ENGINE_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("output_ids", "INT32", (-1, -1)),          # [beam, tokens]
    Tensor("sequence_length", "INT32", (-1,)),        # [beam]
    Tensor("cum_log_probs", "FP32", (-1,)),
    Tensor("output_log_probs", "FP32", (-1, -1)),
    Tensor("context_logits", "FP32", (-1, -1)),
    Tensor("generation_logits", "FP32", (-1, -1, -1)),
    Tensor("batch_index", "INT32", (1,)),
    Tensor("sequence_index", "INT32", (1,)),
)

# --- `preprocessing` and `postprocessing`, with NVIDIA's (upper-case) names
PREPROCESSING_INPUTS: tuple[Tensor, ...] = (
    Tensor("QUERY", "STRING", (1,)),
    Tensor("REQUEST_OUTPUT_LEN", "INT32", (1,)),
    Tensor("BAD_WORDS_DICT", "STRING", (-1,), optional=True),
    Tensor("STOP_WORDS_DICT", "STRING", (-1,), optional=True),
    Tensor("END_ID", "INT32", (1,), optional=True),
    Tensor("PAD_ID", "INT32", (1,), optional=True),
)

PREPROCESSING_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("INPUT_ID", "INT32", (-1,)),
    Tensor("REQUEST_INPUT_LEN", "INT32", (1,)),
    Tensor("BAD_WORDS_IDS", "INT32", (2, -1)),
    Tensor("STOP_WORDS_IDS", "INT32", (2, -1)),
    Tensor("REQUEST_OUTPUT_LEN", "INT32", (-1,)),
    Tensor("OUT_END_ID", "INT32", (1,)),
    Tensor("OUT_PAD_ID", "INT32", (1,)),
)

POSTPROCESSING_INPUTS: tuple[Tensor, ...] = (
    Tensor("TOKENS_BATCH", "INT32", (-1, -1)),
    Tensor("SEQUENCE_LENGTH", "INT32", (-1,)),
)

POSTPROCESSING_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("OUTPUT", "STRING", (-1,)),
)

# --- the public `ensemble` (NVIDIA's names, so genai-perf and Triton's OpenAI frontend work)
ENSEMBLE_INPUTS: tuple[Tensor, ...] = (
    Tensor("text_input", "STRING", (1,)),
    Tensor("max_tokens", "INT32", (1,)),
    Tensor("bad_words", "STRING", (-1,), optional=True),
    Tensor("stop_words", "STRING", (-1,), optional=True),
    Tensor("exclude_input_in_output", "BOOL", (1,), optional=True),
    Tensor("end_id", "INT32", (1,), optional=True),
    Tensor("pad_id", "INT32", (1,), optional=True),
    Tensor("top_k", "INT32", (1,), optional=True),
    Tensor("top_p", "FP32", (1,), optional=True),
    Tensor("temperature", "FP32", (1,), optional=True),
    Tensor("length_penalty", "FP32", (1,), optional=True),
    Tensor("repetition_penalty", "FP32", (1,), optional=True),
    Tensor("min_length", "INT32", (1,), optional=True),
    Tensor("presence_penalty", "FP32", (1,), optional=True),
    Tensor("frequency_penalty", "FP32", (1,), optional=True),
    Tensor("random_seed", "UINT64", (1,), optional=True),
    Tensor("return_log_probs", "BOOL", (1,), optional=True),
    Tensor("return_context_logits", "BOOL", (1,), optional=True),
    Tensor("return_generation_logits", "BOOL", (1,), optional=True),
    Tensor("beam_width", "INT32", (1,), optional=True),
    Tensor("stream", "BOOL", (1,), optional=True),
)

ENSEMBLE_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("text_output", "STRING", (-1,)),
    Tensor("cum_log_probs", "FP32", (-1,)),
    Tensor("output_log_probs", "FP32", (-1, -1)),
    Tensor("context_logits", "FP32", (-1, -1)),
    Tensor("generation_logits", "FP32", (-1, -1, -1)),
    Tensor("batch_index", "INT32", (1,)),
    Tensor("sequence_index", "INT32", (1,)),
)

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
    "return_log_probs": "return_log_probs",
    "return_context_logits": "return_context_logits",
    "return_generation_logits": "return_generation_logits",
    "beam_width": "beam_width",
    "stream": "streaming",
}

# Every public parameter that becomes one engine scalar: the ensemble's direct wiring, plus those that
# reach the engine through `preprocessing` (max_tokens, end_id, pad_id). The `bayling` model uses it too.
PUBLIC_TO_ENGINE: dict[str, str] = {**ENSEMBLE_TO_ENGINE, "max_tokens": "request_output_len", "end_id": "end_id",
                                    "pad_id": "pad_id"}


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
ENTRY_INPUTS: tuple[Tensor, ...] = _optional(ENSEMBLE_INPUTS, "text_input", "max_tokens") + (
    Tensor("messages", "STRING", (1,), optional=True),
    Tensor("return_prompt_ids", "BOOL", (1,), optional=True),
)

ENTRY_OUTPUTS: tuple[Tensor, ...] = (
    Tensor("text_output", "STRING", (1,)),
    Tensor("finish_reason", "STRING", (1,)),   # "" while streaming, then stop / length / cancelled
    Tensor("prompt_tokens", "INT32", (1,)),
    Tensor("completion_tokens", "INT32", (1,)),
    Tensor("prompt_ids", "INT32", (-1,)),      # only when return_prompt_ids is true
)

ENTRY_MODEL = "bayling"
ENSEMBLE_MODEL = "ensemble"
ENGINE_MODEL = "tensorrt_llm"

MODELS: dict[str, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] = {
    "preprocessing": (PREPROCESSING_INPUTS, PREPROCESSING_OUTPUTS),
    ENGINE_MODEL: (ENGINE_INPUTS, ENGINE_OUTPUTS),
    "postprocessing": (POSTPROCESSING_INPUTS, POSTPROCESSING_OUTPUTS),
    ENSEMBLE_MODEL: (ENSEMBLE_INPUTS, ENSEMBLE_OUTPUTS),
    ENTRY_MODEL: (ENTRY_INPUTS, ENTRY_OUTPUTS),
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
