"""`preprocessing` and `postprocessing` of the NVIDIA-compatible `ensemble`.

They keep NVIDIA's tensor names and meaning (`text_input` is the whole prompt, no chat
template), so genai-perf and Triton's OpenAI frontend work unchanged. Each streamed chunk
reaches `postprocessing` as a separate, stateless request, so like NVIDIA's it decodes
chunks independently: for streaming with exact Chinese text and spaces, use `bayling`.
"""

from __future__ import annotations

import numpy as np

from bayling.errors import InvalidInput
from bayling.textstream import PLACEHOLDERS, ReplaceChain
from bayling.tokenization import word_list
from bayling.model_repository.engine_text import EngineText
from bayling.model_repository.triton_io import bytes_array, scalar, text, texts


class Preprocessor:
    def __init__(self, text_ctx: EngineText):
        self.text = text_ctx

    def process(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        m = self.text.manifest
        query = text(inputs, "QUERY")
        if not query:
            raise InvalidInput("text_input", "is empty")
        ids = self.text.encoder.encode_text(query)
        max_tokens = scalar(inputs, "REQUEST_OUTPUT_LEN")
        if max_tokens is None or not 1 <= max_tokens <= m.max_context:
            raise InvalidInput("max_tokens", f"must be between 1 and {m.max_context}, got {max_tokens}")
        if len(ids) + max_tokens > m.max_context:
            raise InvalidInput("text_input", f"the prompt is {len(ids)} tokens; with max_tokens {max_tokens} it "
                                             f"does not fit the context of {m.max_context} tokens")
        end_id = scalar(inputs, "END_ID", m.eos_id)
        stop = self.text.engine_stop_words(end_id, texts(inputs, "STOP_WORDS_DICT"))
        bad = [self.text.tokenizer.encode(w, add_special_tokens=False) for w in texts(inputs, "BAD_WORDS_DICT")]
        return {
            "INPUT_ID": np.array([ids], dtype=np.int32),
            "REQUEST_INPUT_LEN": np.array([[len(ids)]], dtype=np.int32),
            "REQUEST_OUTPUT_LEN": np.array([[max_tokens]], dtype=np.int32),
            "STOP_WORDS_IDS": word_list(stop)[None],
            "BAD_WORDS_IDS": word_list(bad)[None],
            "OUT_END_ID": np.array([[end_id]], dtype=np.int32),
            "OUT_PAD_ID": np.array([[scalar(inputs, "PAD_ID", m.pad_id)]], dtype=np.int32),
        }


class Postprocessor:
    def __init__(self, text_ctx: EngineText):
        self.text = text_ctx
        self._placeholders = ReplaceChain(PLACEHOLDERS) if text_ctx.manifest.placeholders else None

    def process(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = np.asarray(inputs["TOKENS_BATCH"])          # [1, beam, n]
        lengths = np.asarray(inputs["SEQUENCE_LENGTH"])      # [1, beam]
        outputs = []
        for beam, ids in enumerate(tokens.reshape(tokens.shape[-2] if tokens.ndim > 1 else 1, -1)):
            n = int(lengths.reshape(-1)[beam])
            decoded = self.text.tokenizer.decode([int(t) for t in ids[:n]], skip_special_tokens=True)
            if self._placeholders:
                decoded = self._placeholders.replace_all(decoded)
            outputs.append(decoded)
        return {"OUTPUT": bytes_array(outputs)}
