"""Small LLaMA-shaped checkpoints for the merge tests (random weights, several shards, both file formats)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TOKENIZER_FILES = {
    "tokenizer_config.json": json.dumps({"model_max_length": 2048, "tokenizer_class": "LlamaTokenizer"}),
    "special_tokens_map.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": 2}),
}


def llama_shapes(vocab: int = 256, hidden: int = 64, inter: int = 172, layers: int = 2) -> dict[str, tuple]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{n}_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def llama_config(vocab: int = 256, hidden: int = 64, inter: int = 172, layers: int = 2) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu",
    }


def random_model(seed: int, std: float = 0.02, dtype=torch.float16, **dims) -> dict[str, torch.Tensor]:
    """Random weights of LLaMA's shapes and scale (matrices ~ N(0, std), norms ~ 0.4)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in llama_shapes(**dims).items():
        if len(shape) == 1:
            t = 0.4 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = std * torch.randn(shape, generator=g)
        out[name] = t.to(dtype)
    return out


def fine_tune(base: dict[str, torch.Tensor], seed: int, rel: float = 0.01) -> dict[str, torch.Tensor]:
    """A "fine-tune" of base: every weight moved by noise of rel times the tensor's rms, rounded to float16."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, b in base.items():
        bf = b.float()
        rms = bf.pow(2).mean().sqrt()
        out[n] = (bf + rel * rms * torch.randn(b.shape, generator=g)).half()
    return out


def diff16(target: dict, base: dict) -> dict:
    """What apply_delta.py's make_diff writes: target - base in float16."""
    return {n: target[n].half() - base[n].half() for n in target}


def add16(base: dict, delta: dict) -> dict:
    """The naive whole-model merge: base + delta in float16."""
    return {n: base[n].half() + delta[n].half() for n in delta}


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], fmt: str = "safetensors", shards: int = 3,
                    index: bool = True, config: dict | None = None, tokenizer: bool = True) -> Path:
    """Write a Hugging Face checkpoint folder: fmt is safetensors, bin or bin-legacy (pre-zipfile torch.save)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or llama_config(), indent=1))
    if tokenizer:
        for name, text in TOKENIZER_FILES.items():
            (folder / name).write_text(text)
        (folder / "tokenizer.model").write_bytes(os.urandom(1000))
    names = list(tensors)
    groups = [names[i::shards] for i in range(shards)] if shards > 1 else [names]
    groups = [g for g in groups if g]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    prefix = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"{prefix}-{i + 1:05d}-of-{len(groups):05d}.{ext}" if len(groups) > 1 else f"{prefix}.{ext}"
        part = {n: tensors[n] for n in group}
        if fmt == "safetensors":
            save_file({n: t.contiguous() for n, t in part.items()}, str(folder / fname), metadata={"format": "pt"})
        else:
            torch.save(part, folder / fname, _use_new_zipfile_serialization=(fmt == "bin"))
        weight_map.update({n: fname for n in group})
    if index:
        index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a merge output, read with the safetensors library through the index."""
    from safetensors.torch import load_file

    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(Path(folder) / shard)))
    assert set(out) == set(index["weight_map"])
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8).view(-1),
                                                                     b.contiguous().view(torch.uint8).view(-1))


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
