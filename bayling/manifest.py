"""The engine folder and its manifest: what `bayling build` writes and `bayling serve` reads.

An engine folder looks the same for both targets::

    ENGINE_DIR/
      manifest.json        this file's EngineManifest, written last (its presence means complete)
      tokenizer/           Hugging Face tokenizer files (chat template included)
      chat_template.jinja  the chat template the server applies to `messages`
      llamacpp/model.gguf  the CPU INT8 engine, llama.cpp Q8_0 (engine == "llamacpp")
      ctranslate2/         the CPU INT8 engine, CTranslate2 (engine == "ctranslate2")
      trtllm/              the TensorRT-LLM engine(s)     (engine == "tensorrt_llm")
      llmapi/              a Model Optimizer checkpoint and llm_api.json, for TensorRT-LLM's LLM API
                                                          (engine == "tensorrt_llm_llmapi")
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bayling.errors import BaylingError
from bayling.files import write_atomically

MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
ENGINE_SUBDIRS = {"ctranslate2": "ctranslate2", "llamacpp": "llamacpp", "tensorrt_llm": "trtllm",
                  "tensorrt_llm_llmapi": "llmapi"}
FORMAT_VERSION = 1


@dataclass
class EngineManifest:
    engine: str                      # "llamacpp", "ctranslate2", "tensorrt_llm" or "tensorrt_llm_llmapi"
    model_name: str                  # shown to users, e.g. "BayLing-13B-v1.1"
    template: str                    # "bayling", "bayling-3" or "hf"
    placeholders: bool               # replace BayLing's model-card placeholders in outputs
    max_context: int                 # tokens, prompt + completion
    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)   # generation defaults for this model
    source: dict[str, Any] = field(default_factory=dict)     # where the weights came from
    build: dict[str, Any] = field(default_factory=dict)      # build options (quantization, limits…)
    sizes: dict[str, int] = field(default_factory=dict)      # bytes per part of the engine folder
    versions: dict[str, str] = field(default_factory=dict)   # tool versions used to build
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False) + "\n"


def write_manifest(engine_dir: Path, manifest: EngineManifest) -> Path:
    """Written atomically: a reader sees either no manifest or a complete one."""
    return write_atomically(Path(engine_dir) / MANIFEST_NAME, manifest.to_json())


def read_json(path: Path) -> dict:
    """A JSON file of a model or engine folder; a clear error when it is not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BaylingError(f"{path} is not valid JSON: {exc}") from None


def read_manifest(engine_dir: Path) -> EngineManifest:
    path = Path(engine_dir) / MANIFEST_NAME
    if not path.is_file():
        raise BaylingError(f"{engine_dir} is not a finished engine folder (no {MANIFEST_NAME}); run 'bayling build' first")
    data = read_json(path)
    if data.get("format_version") != FORMAT_VERSION:
        raise BaylingError(f"{path} has format_version {data.get('format_version')}, this tool reads {FORMAT_VERSION}")
    known = {f.name for f in dataclasses.fields(EngineManifest)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BaylingError(f"{path} has unknown fields {unknown}: built by a newer version?")
    try:
        return EngineManifest(**data)
    except TypeError as exc:
        raise BaylingError(f"{path} is incomplete: {exc}") from exc
