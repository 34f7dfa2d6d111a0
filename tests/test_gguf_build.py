"""The llama.cpp target's conversion (build_engine/gguf_build.py): names, the rotary layout, quantization,
bounded memory, and that llama.cpp reads the file back as the model transformers runs."""

import numpy as np
import pytest

from bayling.build_engine import gguf_build
from bayling.errors import BaylingError
from tests.conftest import bayling_cli
from tests.models import save_random_llama


def test_hugging_face_names_map_to_llama_cpp_s():
    assert gguf_build.gguf_name("model.layers.12.mlp.down_proj.weight") == "blk.12.ffn_down.weight"
    assert gguf_build.gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_build.gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(BaylingError, match="vision_tower"):
        gguf_build.gguf_name("model.vision_tower.weight")


def test_rope_permute_puts_each_rotary_pair_side_by_side():
    """One head of 8 rows: Hugging Face keeps halves [0 1 2 3 | 4 5 6 7]; llama.cpp wants 0 4 1 5 2 6 3 7."""
    rows = np.arange(16, dtype=np.float32).reshape(16, 1)          # two heads of 8
    assert gguf_build.rope_permute(rows, heads=2).ravel().tolist() == [0, 4, 1, 5, 2, 6, 3, 7,
                                                                       8, 12, 9, 13, 10, 14, 11, 15]


def test_rope_scaling_is_refused_not_ignored():
    config = {"num_attention_heads": 4, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
              "vocab_size": 600, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(BaylingError, match="RoPE scaling"):
        gguf_build.LlamaShape.of(config)
    config.pop("rope_scaling")
    config["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}   # transformers 5's form
    assert gguf_build.LlamaShape.of(config).rope_theta == 100000.0


@pytest.mark.parametrize("quantization, tolerance", [("f32", 1e-3), ("q8_0", 0.1)])
def test_llama_cpp_computes_what_transformers_computes(tmp_path, llama_tokenizer_dir, quantization, tolerance):
    """The written file, read by llama.cpp, gives the logits transformers gives for the checkpoint (exactly in
    float32, within INT8 error in Q8_0): names, the rotary layout and the hyperparameters are right."""
    import torch
    from transformers import LlamaForCausalLM

    from bayling.build_engine.engine_folder import load_source
    from bayling.model_repository.engine_llamacpp import LlamaModel

    model_dir = save_random_llama(tmp_path / "tiny", llama_tokenizer_dir, max_shard_size="200KB")
    path = tmp_path / f"{quantization}.gguf"
    gguf_build.write_gguf(load_source(model_dir), path, context=256, quantization=quantization)
    prompt = [1, 37, 212, 5, 99, 450, 3]
    with torch.no_grad():
        expected = LlamaForCausalLM.from_pretrained(str(model_dir)).eval()(torch.tensor([prompt])).logits[0, -1].numpy()
    with LlamaModel(str(path), slots=1, context=64, threads=1) as model:
        got = model.decode_prompt(prompt)
    scale = float(np.abs(expected).max())
    assert np.abs(got - expected).max() <= tolerance * scale


def test_q8_0_file_is_a_third_of_the_float32_checkpoint(tmp_path, llama_tokenizer_dir):
    from bayling.build_engine.engine_folder import load_source

    model_dir = save_random_llama(tmp_path / "tiny", llama_tokenizer_dir)
    source = load_source(model_dir)
    gguf_build.write_gguf(source, tmp_path / "m.gguf", context=256, quantization="q8_0")
    assert (tmp_path / "m.gguf").stat().st_size < source.describe()["bytes"] / 3


def test_a_checkpoint_missing_layers_fails_before_anything_is_left(tmp_path, llama_tokenizer_dir):
    from safetensors.torch import load_file, save_file

    model_dir = save_random_llama(tmp_path / "tiny", llama_tokenizer_dir)
    weights = model_dir / "model.safetensors"
    state = load_file(str(weights))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(weights))
    engine = tmp_path / "engine"
    run = bayling_cli("build", "--model", str(model_dir), "--output", str(engine), "--template", "bayling", check=False)
    error = run.stderr.strip().splitlines()[-1]     # after the steps shown so far, one line of reason
    assert run.returncode == 1 and error.startswith("bayling build: error:") and "blk.1.ffn_up.weight" in error
    assert not engine.exists() and not [p for p in tmp_path.iterdir() if ".building-" in p.name]


def test_unknown_quantization_is_refused(tmp_path, llama_tokenizer_dir):
    model_dir = save_random_llama(tmp_path / "tiny", llama_tokenizer_dir)
    run = bayling_cli("build", "--model", str(model_dir), "--output", str(tmp_path / "e"), "--quantization", "q4_k",
                      check=False)
    assert run.returncode == 1 and "q8_0" in run.stderr and not (tmp_path / "e").exists()
