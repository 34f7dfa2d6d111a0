"""NVIDIA's `tensorrt_llm_bls` interface over the `bayling` entry model's logic.

The model takes NVIDIA's BLS tensors (text_input, max_tokens, the sampling parameters) and answers
with exact text: the entry model's detokenizer accumulates the tokens, so each streamed
`text_output` is only the new text and the pieces join to the non-streamed answer. What differs
from `bayling` is only the interface: `text_output` is 1-D (one value per beam, as NVIDIA's
`end_to_end_grpc_client.py` reads it), BayLing's own outputs (finish_reason, token counts) are
not sent, and NVIDIA's inputs that a text model here cannot serve are refused by name.
"""

from __future__ import annotations

import numpy as np

from bayling import contract
from bayling.errors import InvalidInput
from bayling.model_repository.triton_io import scalar, text

PUBLIC_OUTPUTS = frozenset(t.name for t in contract.BLS_OUTPUTS)
# NVIDIA's BLS inputs the entry model reads under the same name
ENTRY_NAMES = frozenset(t.name for t in contract.ENTRY_INPUTS)


def check_inputs(inputs: dict[str, np.ndarray]) -> None:
    """INVALID_ARGUMENT naming the first BLS input this deployment cannot honour."""
    for name, what in contract.TEXT_MODEL_UNSUPPORTED.items():
        value = inputs.get(name)
        if value is not None and value.size and not (value.dtype == np.bool_ and not value.any()):
            raise InvalidInput(name, f"{what} are not served here (a text model)")
    for name in ("num_return_sequences", "beam_width"):
        if (scalar(inputs, name, 1) or 1) != 1:
            raise InvalidInput(name, "tensorrt_llm_bls answers one sequence here; use the ensemble for more")
    for name in ("return_log_probs", "return_context_logits", "return_generation_logits",
                 "return_kv_cache_reuse_stats"):
        if scalar(inputs, name, False):
            raise InvalidInput(name, "is not served by tensorrt_llm_bls here; use the ensemble")
    if "embedding_bias_words" in inputs and inputs["embedding_bias_words"].size:
        raise InvalidInput("embedding_bias_words", "is not served by tensorrt_llm_bls here; use the ensemble")


def bls_outputs(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The entry model's response tensors -> NVIDIA's BLS ones (text_output 1-D)."""
    out = {name: value for name, value in outputs.items() if name in PUBLIC_OUTPUTS}
    if "text_output" in out:
        out["text_output"] = np.asarray(out["text_output"]).reshape(-1)
    return out


def tensorrt_llm_sampling(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """TensorRT-LLM's defaults instead of BayLing's chat ones: greedy unless top_k (above 1) or top_p
    (above 0) is given, temperature 1, as NVIDIA's BLS model passes the request to the engine."""
    inputs = dict(inputs)
    top_k, top_p = scalar(inputs, "top_k", 0) or 0, scalar(inputs, "top_p", 0.0) or 0.0
    if top_p == 0:
        inputs.pop("top_p", None)
        if top_k in (0, 1):
            inputs["top_k"] = np.ones((1, 1), dtype=np.int32)
    if "temperature" not in inputs:
        inputs["temperature"] = np.ones((1, 1), dtype=np.float32)
    return inputs


class BlsEntry:
    """An `Entry` seen through NVIDIA's BLS interface: everything is the entry's, but its outputs."""

    def __init__(self, entry):
        self._entry = entry

    def __getattr__(self, name):
        return getattr(self._entry, name)

    def parse(self, inputs: dict[str, np.ndarray]):
        """As the entry, but exclude_input_in_output false puts the prompt before a non-streamed answer
        (a streamed one never repeats it, as TensorRT-LLM's streaming)."""
        include = scalar(inputs, "exclude_input_in_output", True) is False
        req = self._entry.parse(tensorrt_llm_sampling({k: v for k, v in inputs.items() if k != "exclude_input_in_output"}))
        req.prompt_text = text(inputs, "text_input") if include and not req.stream else ""
        return req

    def outputs(self, piece: str, req, *args, **kwargs) -> dict[str, np.ndarray]:
        if getattr(req, "prompt_text", ""):
            piece, req.prompt_text = req.prompt_text + piece, ""
        return bls_outputs(self._entry.outputs(piece, req, *args, **kwargs))
