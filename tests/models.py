"""Small real models that the tests build themselves (nothing comes from a model hub).

- `train_llama_tokenizer`: a LLaMA-style SentencePiece BPE tokenizer (byte fallback, `<unk>`,
  `<s>`, `</s>` at 0, 1, 2) trained on mixed Chinese/English text, as a Hugging Face tokenizer.
- `save_random_llama`: a tiny LlamaForCausalLM with random weights.
- `save_scripted_llama`: a tiny LlamaForCausalLM whose greedy output is a chosen token chain:
  attention and MLP outputs are zero, so the last position's hidden state is the embedding of
  the current token, and the LM head maps each token's embedding to its successor's logit.
  Tests use it to know exactly what a real engine will generate.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "Hello world. This is BayLing, a bilingual assistant. How are you today?",
    "你好，世界。百聆是一个中英双语的大语言模型。今天天气怎么样？",
    "The quick brown fox jumps over the lazy dog. I don't know what you're saying.",
    "机器翻译是自然语言处理的重要任务。请把这句话翻译成英文。",
    "### Instruction:\nTranslate this sentence.\n### Response:\nSure, here it is.",
    "I am an intelligent language assistant developed by the NLP Group of ICT/CAS.",
    "Below is a dialog consisting of instructions and responses. Write a response that completes the request.",
    "北京是中国的首都，上海是中国最大的城市。我们明天见！",
    "我是[名字]，由[机构]在[开发时间]开发。I am [NAME], made by [INSTITUTE] in [CREATE_TIME].",
]


def train_llama_tokenizer(out_dir: Path, vocab_size: int = 600) -> Path:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 30) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "sp"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.9995,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2)
    hf_dir = out_dir / "hf"
    hf_dir.mkdir(exist_ok=True)
    (hf_dir / "tokenizer.model").write_bytes((out_dir / "sp.model").read_bytes())
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    tokenizer.save_pretrained(str(hf_dir))  # adds tokenizer.json, the fast form the engines keep
    return hf_dir


def _config(vocab: int, hidden: int = 64, layers: int = 2, heads: int = 4, context: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=context,
                       bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"])


def save_random_llama(out_dir: Path, tokenizer_dir: Path, *, seed: int = 0, safe_serialization: bool = True,
                      max_shard_size: str = "10GB", context: int = 256) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = LlamaForCausalLM(_config(len(tokenizer), context=context))
    if safe_serialization:
        model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    else:  # transformers 5 writes safetensors only; PyTorch .bin shards as older checkpoints have them
        from tests._merge_helpers import save_checkpoint

        save_checkpoint(out_dir, model.state_dict(), fmt="bin", shards=3, config=model.config.to_dict(), tokenizer=False)
    tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)


def save_scripted_llama(out_dir: Path, tokenizer_dir: Path, script: list[int], start: int, *, context: int = 256,
                        seed: int = 0, strength: float = 40.0) -> Path:
    """Greedy generation after a prompt ending in token `start` yields `script` (distinct ids), then
    keeps going from the script's last id: end the script with EOS for a clean stop."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    chain = [start, *script]
    if len(set(chain)) != len(chain):
        raise ValueError("a scripted chain needs distinct token ids")
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = _config(len(tokenizer), context=context)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        embed.copy_(torch.randn_like(embed))
        head = model.lm_head.weight
        head.zero_()
        for current, successor in zip(chain, chain[1:]):
            e = embed[current]
            head[successor] = strength * e / e.norm()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)
