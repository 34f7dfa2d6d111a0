"""Everything the Python models need to turn text into ids and ids into text, loaded once
per model instance from the engine folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bayling.detokenizer import ByteRuns, Decode, byte_runs, make_decode
from bayling.manifest import CHAT_TEMPLATE_NAME, TOKENIZER_DIR, EngineManifest, read_manifest
from bayling.params import GenerationParams
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

    def text_stream(self, extra_stop_strings: list[str] = (), *, stop_tokens: bool = True) -> TextStream:
        m = self.manifest
        return TextStream(self.decode, byte_runs=self.byte_runs, stop_token_ids=m.stop_token_ids if stop_tokens else (),
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
