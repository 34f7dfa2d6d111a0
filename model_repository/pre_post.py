"""`preprocessing` and `postprocessing` of the NVIDIA-compatible `ensemble`.

They keep NVIDIA's tensor names, shapes and meaning (tensorrtllm_backend v0.17.0: `text_input`
is the whole prompt, no chat template; a request may hold several prompts, batch dimension > 1;
`OUTPUT` is one text per beam, 1-D for the whole response), so NVIDIA's clients, genai-perf and
Triton's OpenAI frontend work unchanged. Each streamed chunk reaches `postprocessing` as a
separate, stateless request, so like NVIDIA's it decodes chunks independently: for streaming
with exact Chinese text and spaces, use `bayling` or `tensorrt_llm_bls`.
"""

from __future__ import annotations

import numpy as np

from bayling import contract
from bayling.errors import InvalidInput
from bayling.textstream import PLACEHOLDERS, ReplaceChain
from bayling.tokenization import word_list
from bayling.model_repository.engine_text import EngineText
from bayling.model_repository.triton_io import scalar, text, texts

# NVIDIA's input -> the ensemble's public name, for error messages
PUBLIC_NAMES = {"QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens", "DECODER_QUERY": "decoder_text_input",
                "EMBEDDING_BIAS_WORDS": "embedding_bias_words", "EMBEDDING_BIAS_WEIGHTS": "embedding_bias_weights",
                "PROMPT_TABLE_EXTRA_ID": "prompt_table_extra_id"}


def rows(inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """A batched request's inputs, one dict per row (each keeps a batch dimension of 1)."""
    sizes = {name: value.shape[0] for name, value in inputs.items() if value.ndim}
    size = max(sizes.values(), default=1)
    for name, n in sizes.items():
        if n != size:
            raise InvalidInput(PUBLIC_NAMES.get(name, name), f"has {n} rows for a batch of {size} requests")
    return [{name: value[i:i + 1] for name, value in inputs.items()} for i in range(size)]


def stack_word_lists(lists: list[np.ndarray]) -> np.ndarray:
    """[2, N] word lists -> [batch, 2, max N]: ids padded with 0, offsets with -1, as NVIDIA's."""
    longest = max(w.shape[1] for w in lists)
    out = np.zeros((len(lists), 2, longest), dtype=np.int32)
    out[:, 1, :] = -1
    for i, w in enumerate(lists):
        out[i, :, :w.shape[1]] = w
    return out


class Preprocessor:
    def __init__(self, text_ctx: EngineText):
        self.text = text_ctx

    def process(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, what in contract.TEXT_UNSUPPORTED.items():
            if name in inputs and inputs[name].size:
                raise InvalidInput(PUBLIC_NAMES.get(name, name), f"{what} are not served here (a text model)")
        m = self.text.manifest
        done = [self._one(row) for row in rows(inputs)]
        pad_ids = np.array([[d["pad_id"]] for d in done], dtype=np.int32)
        ones = np.ones((len(done), 1), dtype=np.int32)
        return {
            "INPUT_ID": np.concatenate([np.pad(np.array([d["ids"]], np.int32), ((0, 0), (0, n)),
                                               constant_values=d["pad_id"])
                                        for d, n in zip(done, self._padding(done))]),
            "REQUEST_INPUT_LEN": np.array([[len(d["ids"])] for d in done], dtype=np.int32),
            # decoder-only models: one pad id and length 1, as NVIDIA's preprocessing sends them
            "DECODER_INPUT_ID": pad_ids.copy(),
            "REQUEST_DECODER_INPUT_LEN": ones,
            "BAD_WORDS_IDS": stack_word_lists([d["bad"] for d in done]),
            "STOP_WORDS_IDS": stack_word_lists([d["stop"] for d in done]),
            "EMBEDDING_BIAS": (np.stack([d["bias"] for d in done]) if all(d["bias"] is not None for d in done)
                               else self._bias_or_empty(done, m.vocab_size)),
            "REQUEST_OUTPUT_LEN": np.array([[d["max_tokens"]] for d in done], dtype=np.int32),
            "OUT_END_ID": np.array([[d["end_id"]] for d in done], dtype=np.int32),
            "OUT_PAD_ID": pad_ids,
        }

    @staticmethod
    def _padding(done: list[dict]) -> list[int]:
        longest = max(len(d["ids"]) for d in done)
        return [longest - len(d["ids"]) for d in done]

    @staticmethod
    def _bias_or_empty(done: list[dict], vocab: int) -> np.ndarray:
        if all(d["bias"] is None for d in done):
            return np.zeros((len(done), 0), dtype=np.float32)
        return np.stack([d["bias"] if d["bias"] is not None else np.zeros(vocab, np.float32) for d in done])

    def _one(self, inputs: dict[str, np.ndarray]) -> dict:
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
        return {"ids": ids, "max_tokens": max_tokens, "end_id": end_id, "pad_id": scalar(inputs, "PAD_ID", m.pad_id),
                "stop": word_list(stop), "bad": word_list(bad), "bias": self._embedding_bias(inputs)}

    def _embedding_bias(self, inputs: dict[str, np.ndarray]) -> np.ndarray | None:
        """NVIDIA's embedding bias: each word's weight added to each of its tokens; [vocab] or None."""
        words = [w.decode("utf-8") if isinstance(w, bytes) else str(w)
                 for w in inputs.get("EMBEDDING_BIAS_WORDS", np.zeros((1, 0), object)).reshape(-1)]
        weights = inputs.get("EMBEDDING_BIAS_WEIGHTS", np.zeros((1, 0), np.float32)).reshape(-1)
        if not words and not weights.size:
            return None
        if len(words) != weights.size:
            raise InvalidInput("embedding_bias_weights", f"must hold one weight per word of embedding_bias_words "
                                                         f"({len(words)}), got {weights.size}")
        bias = np.zeros(self.text.manifest.vocab_size, dtype=np.float32)
        for word, weight in zip(words, weights):
            for token in self.text.tokenizer.encode(word, add_special_tokens=False):
                bias[token] += weight
        return bias


class Postprocessor:
    def __init__(self, text_ctx: EngineText):
        self.text = text_ctx
        self._placeholders = ReplaceChain(PLACEHOLDERS) if text_ctx.manifest.placeholders else None

    def process(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """TOKENS_BATCH [batch, beam, n] and SEQUENCE_LENGTH [batch, beam] -> OUTPUT [batch * beam], 1-D."""
        tokens = np.asarray(inputs["TOKENS_BATCH"])
        lengths = np.asarray(inputs["SEQUENCE_LENGTH"])
        if tokens.ndim != 3 or lengths.shape != tokens.shape[:2]:
            raise InvalidInput("TOKENS_BATCH", f"must be [batch, beam, tokens] with SEQUENCE_LENGTH [batch, beam], "
                                               f"got {list(tokens.shape)} and {list(lengths.shape)}")
        outputs = []
        for ids, n in zip(tokens.reshape(-1, tokens.shape[-1]), lengths.reshape(-1)):
            decoded = self.text.tokenizer.decode([int(t) for t in ids[:int(n)]], skip_special_tokens=True)
            if self._placeholders:
                decoded = self._placeholders.replace_all(decoded)
            outputs.append(decoded.encode("utf-8"))
        return {"OUTPUT": np.array(outputs, dtype=np.object_)}
