"""`bayling build` for the CPU targets (llama.cpp Q8_0, the default, and CTranslate2), on tiny LLaMA
checkpoints the tests create."""

import json

import pytest

from bayling.manifest import read_manifest
from bayling.templates import builtin_template
from bayling.build_engine.engine_folder import SourceModel, choose_template
from tests.conftest import bayling_cli
from tests.models import save_random_llama


# target -> (manifest engine, quantization, the engine file, the tool version recorded)
TARGETS = {"cpu": ("llamacpp", "q8_0", "llamacpp/model.gguf", "llama_cpp_python"),
           "cpu-ct2": ("ctranslate2", "int8", "ctranslate2/model.bin", "ctranslate2")}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin-shards"])
def test_build_a_tiny_llama_into_a_cpu_int8_engine(tmp_path, llama_tokenizer_dir, safe_serialization, target):
    model = save_random_llama(tmp_path / "tiny-bayling-random", llama_tokenizer_dir,
                              safe_serialization=safe_serialization, max_shard_size="200KB")
    assert len(list(model.glob("*.safetensors" if safe_serialization else "pytorch_model-*.bin"))) > 1
    engine = tmp_path / "engine"
    run = bayling_cli("build", "--model", str(model), "--output", str(engine), "--target", target)
    assert "[4/4]" in run.stderr  # the steps are shown
    manifest = read_manifest(engine)
    kind, quantization, engine_file, tool = TARGETS[target]
    assert manifest.engine == kind and manifest.build["quantization"] == quantization
    assert manifest.template == "bayling" and manifest.placeholders  # "bayling" in the name
    assert manifest.max_context == 256 and (manifest.bos_id, manifest.eos_id) == (1, 2)
    assert manifest.source["bytes"] > 0 and tool in manifest.versions
    assert (engine / engine_file).is_file()
    assert (engine / "chat_template.jinja").read_text() == builtin_template("bayling").source
    saved = json.loads((engine / "tokenizer" / "tokenizer_config.json").read_text())
    assert saved.get("chat_template") == builtin_template("bayling").source or (engine / "tokenizer" / "chat_template.jinja").is_file()


def test_existing_output_needs_force_and_failures_leave_nothing(tmp_path, llama_tokenizer_dir):
    model = save_random_llama(tmp_path / "m", llama_tokenizer_dir)
    engine = tmp_path / "engine"
    bayling_cli("build", "--model", str(model), "--output", str(engine), "--template", "hf", check=False)
    assert not engine.exists()  # the tokenizer has no chat template: refused, nothing left behind
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name]
    bayling_cli("build", "--model", str(model), "--output", str(engine), "--template", "bayling")
    again = bayling_cli("build", "--model", str(model), "--output", str(engine), check=False)
    assert again.returncode == 1 and "already exists" in again.stderr and "--force" in again.stderr
    forced = bayling_cli("build", "--model", str(model), "--output", str(engine), "--force", "--template", "bayling-3")
    assert forced.returncode == 0 and read_manifest(engine).template == "bayling-3"


def test_errors_are_one_line(tmp_path):
    (tmp_path / "nomodel").mkdir()
    run = bayling_cli("build", "--model", str(tmp_path / "nomodel"), "--output", str(tmp_path / "e"), check=False)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [f"bayling build: error: {tmp_path / 'nomodel'} is not a Hugging Face checkpoint: no config.json"]


def test_auto_template_choice(smol_tokenizer, tmp_path):
    llama1 = SourceModel(tmp_path, {"vocab_size": 32000}, "BayLing-13B-v1.1")
    llama3 = SourceModel(tmp_path, {"vocab_size": 128256}, "bayling-2-llama-3-8b")
    other = SourceModel(tmp_path, {"vocab_size": 49152}, "SmolLM2-135M-Instruct")
    assert choose_template("auto", llama1, smol_tokenizer).name == "bayling"
    assert choose_template("auto", llama3, smol_tokenizer).name == "bayling-3"
    assert choose_template("auto", other, smol_tokenizer).name == "hf"
    assert choose_template("bayling", other, smol_tokenizer).name == "bayling"


def test_default_engines_are_the_embedded_model(default_engine, default_ct2_engine):
    for engine, kind in ((default_engine, "llamacpp"), (default_ct2_engine, "ctranslate2")):
        manifest = read_manifest(engine)
        assert manifest.model_name == "SmolLM2-135M-Instruct" and manifest.engine == kind
        assert manifest.template == "hf" and not manifest.placeholders
        assert manifest.sizes[kind] < manifest.source["bytes"] / 3  # INT8 of a float32 checkpoint
