"""The CPU target: a Hugging Face LLaMA checkpoint -> a CTranslate2 INT8 engine folder."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bayling.errors import BaylingError
from bayling.manifest import ENGINE_SUBDIRS
from bayling.build_engine.engine_folder import (building, check_output, choose_template, finish, load_source,
                                                load_tokenizer, make_manifest, text_settings, tool_versions,
                                                write_tokenizer)

QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "float32")


class Steps:
    """Numbered steps with elapsed time: the conversion has no finer progress to show."""

    def __init__(self, total: int):
        self.total, self.n, self.start = total, 0, time.monotonic()

    def __call__(self, what: str) -> None:
        self.n += 1
        print(f"[{self.n}/{self.total}] {what} (at {time.monotonic() - self.start:.0f}s)", file=sys.stderr, flush=True)


def build_cpu_engine(model_dir: Path, output: Path, *, template: str = "auto", name: str | None = None,
                     quantization: str = "int8", max_context: int | None = None, force: bool = False,
                     tokenizer_dir: Path | None = None) -> Path:
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    if quantization not in QUANTIZATIONS:
        raise BaylingError(f"unknown quantization {quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
    check_output(output, force)
    step = Steps(4)
    source = load_source(model_dir, name)
    context = min(max_context or source.max_position_embeddings, source.max_position_embeddings)
    step(f"tokenizer and chat template of {source.name}")
    tokenizer = load_tokenizer(tokenizer_dir or source.path)
    chat_template = choose_template(template, source, tokenizer)
    text = text_settings(source, tokenizer, chat_template)
    with building(output, force) as tmp:
        write_tokenizer(tokenizer, chat_template, tmp)
        step(f"converting {source.describe()['bytes'] / 2**20:.0f} MiB of weights to CTranslate2 {quantization}")
        try:
            TransformersConverter(str(source.path), low_cpu_mem_usage=True).convert(
                str(tmp / ENGINE_SUBDIRS["ctranslate2"]), quantization=quantization, force=True)
        except Exception as exc:  # the converter raises whatever transformers or torch raise
            raise BaylingError(f"CTranslate2 conversion of {source.path} failed: {exc}") from None
        step("loading the engine and generating a few tokens to check it")
        generator = ctranslate2.Generator(str(tmp / ENGINE_SUBDIRS["ctranslate2"]), device="cpu", compute_type="default")
        probe = [tokenizer.convert_ids_to_tokens(tokenizer("Hello")["input_ids"])]
        generator.generate_batch(probe, max_length=4, sampling_topk=1, include_prompt_in_result=False)
        del generator
        step("writing the manifest")
        build = {"target": "cpu", "quantization": quantization, "compute_type": "int8" if quantization.startswith("int8") else quantization,
                 "template_choice": template}
        manifest = make_manifest("ctranslate2", source, text, context, build,
                                 tool_versions("ctranslate2", "transformers", "tokenizers", "torch"), tmp)
        finish(tmp, manifest)
    print(f"engine ready: {output} ({source.name}, template {chat_template.name}, context {context})", file=sys.stderr)
    return Path(output)
