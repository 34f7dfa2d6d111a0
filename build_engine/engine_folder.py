"""What both build targets share: the source checkpoint, the tokenizer and chat template,
and the engine folder's life cycle (built under a temporary name, renamed when complete,
manifest last)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterator

from bayling import __version__
from bayling.errors import BaylingError
from bayling.manifest import CHAT_TEMPLATE_NAME, TOKENIZER_DIR, EngineManifest, read_json, write_manifest
from bayling.params import GenerationParams
from bayling.templates import ChatTemplate, builtin_template, tokenizer_template

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
LLAMA3_VOCAB = 128000  # Llama-3 tokenizers have 128256 ids; LLaMA-1/2 have 32000


@dataclass
class SourceModel:
    path: Path
    config: dict
    name: str

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def max_position_embeddings(self) -> int:
        return int(self.config.get("max_position_embeddings") or 2048)

    @property
    def is_bayling(self) -> bool:
        return "bayling" in f"{self.name} {self.config.get('_name_or_path', '')}".lower()

    def weight_files(self) -> list[Path]:
        return sorted(p for pattern in WEIGHT_PATTERNS for p in self.path.glob(pattern))

    def describe(self) -> dict:
        files = self.weight_files()
        return {"path": str(self.path.resolve()), "name": self.name,
                "files": [p.name for p in files], "bytes": sum(p.stat().st_size for p in files)}


def load_source(model_dir: Path, name: str | None = None) -> SourceModel:
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise BaylingError(f"{model_dir} is not a Hugging Face checkpoint: no config.json")
    config = read_json(config_path)
    architectures = config.get("architectures") or []
    if config.get("model_type") != "llama" and "LlamaForCausalLM" not in architectures:
        raise BaylingError(f"{model_dir} is a {config.get('model_type') or architectures}, not a LLaMA-architecture "
                           "model (BayLing models are LlamaForCausalLM)")
    source = SourceModel(model_dir, config, name or model_dir.resolve().name)
    if not source.weight_files():
        raise BaylingError(f"{model_dir} has no weights (*.safetensors or pytorch_model*.bin)")
    return source


def choose_template(choice: str, source: SourceModel, tokenizer) -> ChatTemplate:
    """`auto`: BayLing's template for BayLing models (BayLing-3 for the Llama-3 based one),
    the tokenizer's own chat template otherwise."""
    if choice == "auto":
        if source.is_bayling:
            choice = "bayling-3" if source.vocab_size >= LLAMA3_VOCAB else "bayling"
        else:
            choice = "hf"
    if choice == "hf":
        try:
            return tokenizer_template(getattr(tokenizer, "chat_template", None) or "")
        except ValueError as exc:
            raise BaylingError(str(exc)) from None
    return builtin_template(choice)


def load_tokenizer(path: Path, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as exc:  # transformers raises many types here
        raise BaylingError(f"cannot load the tokenizer from {path}: {exc}") from None


def write_tokenizer(tokenizer, template: ChatTemplate, engine_dir: Path) -> None:
    """The engine's tokenizer carries the chat template, so `apply_chat_template` agrees with the server."""
    tokenizer.chat_template = template.source
    tokenizer.save_pretrained(str(engine_dir / TOKENIZER_DIR))
    (engine_dir / CHAT_TEMPLATE_NAME).write_text(template.source, encoding="utf-8")


@dataclass
class TextSettings:
    """The text side of the manifest: template, special ids, stops."""
    template: str
    placeholders: bool
    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)


def text_settings(source: SourceModel, tokenizer, template: ChatTemplate) -> TextSettings:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise BaylingError("the tokenizer has no EOS token")
    stops = [eos, *template.stop_token_ids]
    gen_config = source.path / "generation_config.json"
    if gen_config.is_file():
        gen_eos = read_json(gen_config).get("eos_token_id")
        stops += gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
    vocab = max(source.vocab_size, len(tokenizer))
    stops = [int(t) for t in dict.fromkeys(stops) if 0 <= int(t) < vocab]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return TextSettings(template.name, template.placeholders, tokenizer.bos_token_id, int(eos), int(pad),
                        source.vocab_size, stops, list(template.stop_strings))


def default_generation(max_context: int) -> dict:
    defaults = GenerationParams()
    defaults.max_tokens = min(defaults.max_tokens, max_context // 2)
    return defaults.as_dict()


def tool_versions(*packages: str) -> dict[str, str]:
    versions = {"bayling-deploy": __version__}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def folder_sizes(engine_dir: Path) -> dict[str, int]:
    sizes = {}
    for child in sorted(engine_dir.iterdir()):
        files = [child] if child.is_file() else [p for p in child.rglob("*") if p.is_file()]
        sizes[child.name] = sum(p.stat().st_size for p in files)
    return sizes


def make_manifest(engine: str, source: SourceModel, text: TextSettings, max_context: int,
                  build: dict, versions: dict[str, str], engine_dir: Path) -> EngineManifest:
    return EngineManifest(
        engine=engine, model_name=source.name, max_context=max_context, **asdict(text),
        defaults=default_generation(max_context), source=source.describe(), build=build,
        sizes=folder_sizes(engine_dir), versions=versions,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def check_output(output: Path, force: bool) -> None:
    """Refuse to overwrite before doing any work."""
    if Path(output).exists() and not force:
        raise BaylingError(f"{output} already exists; pass --force to replace it")


@contextmanager
def building(output: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `output`; on success it becomes `output`, else it is removed.
    A reader never sees a half-built engine under the final name."""
    output = Path(output)
    check_output(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.building-", dir=output.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; serving pods may run as another user
    try:
        yield tmp
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, old)
            shutil.rmtree(old)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def finish(engine_dir: Path, manifest: EngineManifest) -> None:
    """Written last: the manifest's presence marks a complete engine folder."""
    write_manifest(engine_dir, manifest)
