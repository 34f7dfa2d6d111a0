"""The llama.cpp CPU target: a Hugging Face LLaMA checkpoint -> a GGUF Q8_0 engine folder.

Q8_0 is llama.cpp's INT8 format: blocks of 32 weights sharing one float16 scale. The file is
written tensor by tensor (header and tensor table first, then each tensor as it is read,
permuted and quantized), so memory stays that of the largest single tensor whatever the model
size. The GGUF carries no tokenizer: the engine takes and returns token ids (the contract of
`tensorrt_llm`), and the engine folder's `tokenizer/` is the one the `bayling` and
`preprocessing` models use; llama.cpp reads the `no_vocab` tokenizer model as "ids only".

The tensor names and the Q/K layout are llama.cpp's for the `llama` architecture (gguf-py
0.19.0 `constants.py`, `TENSOR_NAMES` for `MODEL_ARCH.LLAMA`; convert_hf_to_gguf.py permutes
q_proj and k_proj so that rotary embedding pairs are adjacent): data in `HF_TO_GGUF` below.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bayling.errors import BaylingError
from bayling.manifest import ENGINE_SUBDIRS
from bayling.build_engine.checkpoint import CheckpointReader
from bayling.build_engine.engine_folder import (SourceModel, building, check_output, choose_template, finish,
                                                load_source, load_tokenizer, make_manifest, text_settings,
                                                tool_versions, write_tokenizer)

GGUF_NAME = "model.gguf"
QUANTIZATIONS = ("q8_0", "f16", "f32")

# Hugging Face LlamaForCausalLM name -> GGUF name ({n}: the layer)
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{n}.input_layernorm.weight": "blk.{n}.attn_norm.weight",
    "model.layers.{n}.self_attn.q_proj.weight": "blk.{n}.attn_q.weight",
    "model.layers.{n}.self_attn.k_proj.weight": "blk.{n}.attn_k.weight",
    "model.layers.{n}.self_attn.v_proj.weight": "blk.{n}.attn_v.weight",
    "model.layers.{n}.self_attn.o_proj.weight": "blk.{n}.attn_output.weight",
    "model.layers.{n}.post_attention_layernorm.weight": "blk.{n}.ffn_norm.weight",
    "model.layers.{n}.mlp.gate_proj.weight": "blk.{n}.ffn_gate.weight",
    "model.layers.{n}.mlp.up_proj.weight": "blk.{n}.ffn_up.weight",
    "model.layers.{n}.mlp.down_proj.weight": "blk.{n}.ffn_down.weight",
}
_PATTERNS = [(re.compile("^" + re.escape(hf).replace(r"\{n\}", r"(\d+)") + "$"), gg) for hf, gg in HF_TO_GGUF.items()]
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")   # recomputed by llama.cpp


@dataclass
class GgufBuildOptions:
    model_dir: Path
    output: Path
    template: str = "auto"
    name: str | None = None
    quantization: str = "q8_0"
    max_context: int | None = None
    force: bool = False


@dataclass
class LlamaShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    rms_eps: float
    rope_theta: float
    tied: bool

    @classmethod
    def of(cls, config: dict) -> "LlamaShape":
        # transformers 5 writes rope_parameters, older versions rope_theta and rope_scaling
        rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0),
                                                 **(config.get("rope_scaling") or {})}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise BaylingError(f"RoPE scaling {rope} is not supported by the llama.cpp target yet")
        heads = int(config["num_attention_heads"])
        return cls(layers=int(config["num_hidden_layers"]), hidden=int(config["hidden_size"]),
                   intermediate=int(config["intermediate_size"]), heads=heads,
                   kv_heads=int(config.get("num_key_value_heads") or heads), vocab=int(config["vocab_size"]),
                   rms_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=float(rope.get("rope_theta", 10000.0)),
                   tied=bool(config.get("tie_word_embeddings", False)))


def gguf_name(hf_name: str) -> str | None:
    """model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight; None for tensors llama.cpp does not take."""
    for pattern, target in _PATTERNS:
        match = pattern.match(hf_name)
        if match:
            return target.format(n=match.group(1)) if match.groups() else target
    if IGNORED.match(hf_name):
        return None
    raise BaylingError(f"tensor {hf_name} is not part of a LlamaForCausalLM checkpoint the llama.cpp target knows")


def rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face keeps each head's rotary halves apart ([x0..x31 | x32..x63]); llama.cpp wants the pairs
    adjacent (x0 x32 x1 x33 ...): the rows of q_proj/k_proj are reordered within each head."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def converted(hf_name: str, weight: np.ndarray, shape: LlamaShape) -> np.ndarray:
    if hf_name.endswith("self_attn.q_proj.weight"):
        return rope_permute(weight, shape.heads)
    if hf_name.endswith("self_attn.k_proj.weight"):
        return rope_permute(weight, shape.kv_heads)
    return weight


def ggml_type(gg_name: str, weight_shape: tuple[int, ...], quantization: str):
    """Norms (1-D) stay float32; matrices take the quantization (Q8_0 needs rows in blocks of 32)."""
    import gguf

    if len(weight_shape) == 1 or quantization == "f32":
        return gguf.GGMLQuantizationType.F32
    if quantization == "f16":
        return gguf.GGMLQuantizationType.F16
    if weight_shape[-1] % 32:
        raise BaylingError(f"{gg_name} has rows of {weight_shape[-1]} values; Q8_0 needs a multiple of 32")
    return gguf.GGMLQuantizationType.Q8_0


def encode(weight: np.ndarray, kind) -> np.ndarray:
    import gguf

    if kind == gguf.GGMLQuantizationType.F32:
        return weight.astype(np.float32)
    if kind == gguf.GGMLQuantizationType.F16:
        return weight.astype(np.float16)
    return gguf.quants.quantize(weight.astype(np.float32), kind)


def _plan(reader: CheckpointReader, shape: LlamaShape) -> list[tuple[str, str]]:
    """(HF name, GGUF name) in writing order; a tied or duplicated LM head is left to llama.cpp, which then
    uses the token embedding as the output layer."""
    plan = []
    for hf_name in reader.tensors:
        gg = gguf_name(hf_name)
        if gg is None or (gg == "output.weight" and shape.tied):
            continue
        plan.append((hf_name, gg))
    names = {gg for _, gg in plan}
    expected = {"token_embd.weight", "output_norm.weight"} | {
        t.format(n=n) for n in range(shape.layers) for t in HF_TO_GGUF.values() if "{n}" in t}
    missing = sorted(expected - names)
    if missing:
        raise BaylingError(f"the checkpoint lacks {len(missing)} of the LLaMA tensors llama.cpp needs "
                           f"(GGUF names), e.g. {missing[:3]}")
    return plan


def write_gguf(source: SourceModel, path: Path, context: int, quantization: str, progress=None) -> None:
    import gguf

    shape = LlamaShape.of(source.config)
    with CheckpointReader(source.path) as reader:
        plan = _plan(reader, shape)
        writer = gguf.GGUFWriter(str(path), arch="llama")
        writer.add_name(source.name)
        writer.add_context_length(context)
        writer.add_embedding_length(shape.hidden)
        writer.add_block_count(shape.layers)
        writer.add_feed_forward_length(shape.intermediate)
        writer.add_rope_dimension_count(shape.hidden // shape.heads)
        writer.add_head_count(shape.heads)
        writer.add_head_count_kv(shape.kv_heads)
        writer.add_layer_norm_rms_eps(shape.rms_eps)
        writer.add_rope_freq_base(shape.rope_theta)
        writer.add_vocab_size(shape.vocab)
        writer.add_tokenizer_model("no_vocab")
        writer.add_file_type({"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "f32": gguf.LlamaFileType.ALL_F32}[quantization])
        kinds = {}
        for hf_name, gg in plan:
            info = reader.tensors[hf_name]
            kind = kinds[gg] = ggml_type(gg, info.shape, quantization)
            block, nbytes = gguf.GGML_QUANT_SIZES[kind]
            numel = info.numel
            byte_shape = (*info.shape[:-1], info.shape[-1] // block * nbytes)
            writer.add_tensor_info(gg, byte_shape if kind == gguf.GGMLQuantizationType.Q8_0 else info.shape,
                                   np.dtype(np.uint8) if kind == gguf.GGMLQuantizationType.Q8_0
                                   else np.dtype(np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16),
                                   numel // block * nbytes, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (hf_name, gg) in enumerate(plan, 1):
            weight = reader.read(hf_name).float().numpy()
            writer.write_tensor_data(encode(converted(hf_name, weight, shape), kinds[gg]))
            if progress:
                progress(i, len(plan))
        writer.close()


def build_gguf_engine(options: GgufBuildOptions) -> Path:
    from bayling.build_engine.ct2_build import Steps

    if options.quantization not in QUANTIZATIONS:
        raise BaylingError(f"unknown quantization {options.quantization!r} for the llama.cpp target; "
                           f"choose from {', '.join(QUANTIZATIONS)}")
    check_output(options.output, options.force)
    step = Steps(4)
    source = load_source(options.model_dir, options.name)
    context = min(options.max_context or source.max_position_embeddings, source.max_position_embeddings)
    step(f"tokenizer and chat template of {source.name}")
    tokenizer = load_tokenizer(source.path)
    chat_template = choose_template(options.template, source, tokenizer)
    text = text_settings(source, tokenizer, chat_template)
    with building(options.output, options.force) as tmp:
        write_tokenizer(tokenizer, chat_template, tmp)
        folder = tmp / ENGINE_SUBDIRS["llamacpp"]
        folder.mkdir()
        step(f"writing {source.describe()['bytes'] / 2**20:.0f} MiB of weights as GGUF {options.quantization}")

        def progress(i, n):
            if i == n or i % max(1, n // 10) == 0:
                print(f"      {i}/{n} tensors", file=sys.stderr, flush=True)

        write_gguf(source, folder / GGUF_NAME, context, options.quantization, progress)
        step("loading the engine and generating a few tokens to check it")
        _probe(folder / GGUF_NAME, tokenizer("Hello")["input_ids"])
        step("writing the manifest")
        build = {"target": "llamacpp", "quantization": options.quantization, "template_choice": options.template}
        manifest = make_manifest("llamacpp", source, text, context, build,
                                 tool_versions("llama_cpp_python", "gguf", "transformers", "tokenizers"), tmp)
        finish(tmp, manifest)
    print(f"engine ready: {options.output} ({source.name}, template {chat_template.name}, context {context})",
          file=sys.stderr)
    return Path(options.output)


def _probe(path: Path, prompt: list[int]) -> None:
    """Load the file with llama.cpp and decode the prompt: a file llama.cpp cannot read fails the build."""
    from bayling.model_repository.engine_llamacpp import LlamaModel

    with LlamaModel(str(path), slots=1, context=max(64, len(prompt) + 8), threads=1) as model:
        logits = model.decode_prompt(prompt)
    if not np.all(np.isfinite(logits)):
        raise BaylingError(f"{path} decodes to non-finite logits")
