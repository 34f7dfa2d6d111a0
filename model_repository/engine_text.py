"""Everything the Python models need to turn text into ids and ids into text, loaded once
per model instance from the engine folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bayling.detokenizer import ByteRuns, Decode, byte_runs, make_decode
from bayling.manifest import CHAT_TEMPLATE_NAME, TOKENIZER_DIR, EngineManifest, read_manifest
from bayling.params import NO_END_ID, GenerationParams
from bayling.templates import ChatTemplate, builtin_template
from bayling.textstream import TextStream
from bayling.tokenization import PromptEncoder


@dataclass
class EngineText:
    manifest: EngineManifest
    tokenizer: object
    template: ChatTemplate
    encoder: PromptEncoder
    decode: Decode
    byte_runs: ByteRuns
    defaults: GenerationParams

    def stop_tokens(self, end_id: int | None) -> list[int]:
        """Token ids that end an answer: the template's and the model's, none with NO_END_ID."""
        return [] if end_id == NO_END_ID else list(self.manifest.stop_token_ids)

    def engine_stop_words(self, end_id: int | None, stop_words: list[str]) -> list[list[int]]:
        """TensorRT-LLM's stop words: the stop tokens other than EOS (the end id already ends it), then the
        request's stop strings as token sequences."""
        words = [[t] for t in self.stop_tokens(end_id) if t != self.manifest.eos_id]
        return words + [self.tokenizer.encode(w, add_special_tokens=False) for w in stop_words]

    def text_stream(self, extra_stop_strings: list[str] = (), *, end_id: int | None = None) -> TextStream:
        m = self.manifest
        return TextStream(self.decode, byte_runs=self.byte_runs, stop_token_ids=self.stop_tokens(end_id),
                          stop_strings=[*m.stop_strings, *extra_stop_strings],
                          placeholders=m.placeholders)


def load_engine_text(engine_dir: str | Path) -> EngineText:
    from transformers import AutoTokenizer

    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(engine_dir / TOKENIZER_DIR))
    source = (engine_dir / CHAT_TEMPLATE_NAME).read_text(encoding="utf-8")
    if manifest.template in ("bayling", "bayling-3"):
        base = builtin_template(manifest.template)
        template = ChatTemplate(base.name, source, base.stop_strings, base.stop_token_ids, manifest.placeholders)
    else:
        template = ChatTemplate(manifest.template, source, tuple(manifest.stop_strings), (), manifest.placeholders)
    return EngineText(manifest, tokenizer, template, PromptEncoder(tokenizer, template), make_decode(tokenizer),
                      byte_runs(tokenizer),
                      GenerationParams(**manifest.defaults))
