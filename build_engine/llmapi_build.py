"""The engine-free GPU target: a Hugging Face LLaMA checkpoint -> a Model Optimizer 8-bit checkpoint
plus the LLM API settings, served by TensorRT-LLM's LLM API (PyTorch backend) in the pinned container.

TensorRT-LLM's main branch has removed the TensorRT engine flow; the LLM API over a checkpoint
quantized by NVIDIA Model Optimizer (PyPI `nvidia-modelopt`) is what new releases serve. There is no
engine to compile: the build quantizes, exports and records the limits the planner chose.

  int8-wo  Model Optimizer INT8_WEIGHT_ONLY_CFG -> an HF checkpoint with `quant_algo: W8A16`
           (int8 weights, one scale per output channel; embeddings, lm_head and norms stay 16-bit).
           TensorRT-LLM 1.2's PyTorch backend loads it with its weight-only linear method
           (tensorrt_llm/_torch/modules/linear.py, WeightOnlyQuantLinearMethod: int8 `weight`,
           per-channel `weight_scale`). Any GPU the container supports; the 16 GB choice.
  fp8      Model Optimizer FP8_DEFAULT_CFG (calibrated) -> `quant_algo: FP8`: Hopper (SM 9.0) and
           Ada (SM 8.9) only; activations in FP8 too, so faster prefill than W8A16.

The KV cache stays 16-bit (the PyTorch backend has no INT8 KV cache). Quantization runs wherever
torch runs: on the GPU in the container, or on the CPU (slowly for a 13B model; tests do it for a
tiny LLaMA). Top-level imports stay light: no torch, transformers or modelopt until a build runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bayling.errors import BaylingError
from bayling.build_engine import gpu_planner, trtllm_release
from bayling.build_engine.gpu_planner import LLMAPI_QUANTS, GpuPlan, ModelShape
from bayling.build_engine.trtllm_build import (_Step, _resolve_template, default_calib_prompts, detect_gpus,
                                               gpu_memory_for, read_calibration_prompts)
from bayling.model_repository.engine_llmapi import DEFAULT_FACTORY, SETTINGS_FILE, LlmApiSettings

TARGET = "trtllm-llmapi"
ENGINE = "tensorrt_llm_llmapi"
MODELOPT_PACKAGE = "nvidia-modelopt"
# bayling --quant -> (Model Optimizer config in modelopt.torch.quantization, the quant_algo its export writes)
RECIPES = {"int8-wo": ("INT8_WEIGHT_ONLY_CFG", "W8A16"), "fp8": ("FP8_DEFAULT_CFG", "FP8")}
FP8_MIN_SM = (8, 9)     # Ada; Hopper is 9.0
ENGINE_SUBDIR = "llmapi"   # bayling.manifest.ENGINE_SUBDIRS[ENGINE]


@dataclass
class LlmapiOptions:
    quant: str = "int8-wo"
    tp: int = 1
    calib_max_seq_length: int = 512
    dtype: str = "auto"                # the model's own (config.json torch_dtype); float16 or bfloat16 to force
    device: str = "auto"               # cuda when torch sees a GPU, else cpu
    factory: str = DEFAULT_FACTORY     # the LLM class the Triton model loads the checkpoint with

    def __post_init__(self):
        if self.quant not in LLMAPI_QUANTS:
            raise BaylingError(f"--quant {self.quant} is not for --target {TARGET}; choose from "
                               f"{', '.join(LLMAPI_QUANTS)} (int8-sq and fp16 are TensorRT engine builds: --target trtllm)")
        if self.tp < 1:
            raise BaylingError("--tp must be at least 1")
        if self.calib_max_seq_length < 16:
            raise BaylingError("--calib-max-seq-length must be at least 16")
        if self.dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise BaylingError(f"unknown dtype {self.dtype!r}")


@dataclass
class LlmapiBuild:
    """One `bayling build --target trtllm-llmapi` run."""
    model_dir: Path
    output: Path
    name: str | None = None
    max_context: int | None = None
    template_choice: str = "auto"
    calib_prompts: Path | None = None
    gpu_memory: int | None = None
    dry_run: bool = False
    force: bool = False
    options: LlmapiOptions = field(default_factory=LlmapiOptions)

    def __post_init__(self):
        self.model_dir, self.output = Path(self.model_dir), Path(self.output)


def llmapi_build_from_args(args: argparse.Namespace, *, model_dir: Path, output: Path, name: str | None) -> LlmapiBuild:
    """The run the `bayling build` arguments ask for (the trtllm group's options, shared)."""
    if args.kv_cache != "fp16":
        raise BaylingError(f"--kv-cache {args.kv_cache} is not for --target {TARGET}: TensorRT-LLM's PyTorch backend "
                           "has no INT8 KV cache (use --target trtllm for one)")
    options = LlmapiOptions(quant=args.quant, tp=args.tp, calib_max_seq_length=args.calib_max_seq_length)
    return LlmapiBuild(model_dir, output, name=name, max_context=args.max_context, template_choice=args.template,
                       calib_prompts=args.calib_prompts,
                       gpu_memory=gpu_planner.parse_memory(args.gpu_memory) if args.gpu_memory else None,
                       dry_run=args.dry_run, force=args.force, options=options)


def settings_for(plan: GpuPlan, options: LlmapiOptions) -> LlmApiSettings:
    s = plan.llm_api_settings()
    return LlmApiSettings(max_batch_size=s["max_batch_size"], max_num_tokens=s["max_num_tokens"],
                          max_seq_len=s["max_seq_len"], kv_cache_config=s["kv_cache_config"],
                          max_beam_width=s["max_beam_width"], enable_chunked_prefill=s["enable_chunked_prefill"],
                          tensor_parallel_size=options.tp, factory=options.factory)


def build_record(options: LlmapiOptions, plan: GpuPlan, settings: LlmApiSettings, template_choice: str,
                 calibration: dict | None, modelopt_version: str | None) -> dict:
    config, algo = RECIPES[options.quant]
    return {
        "target": TARGET,
        "quantization": options.quant,
        "kv_cache": "fp16",
        "tp": options.tp,
        "template_choice": template_choice,
        "modelopt": {"package": MODELOPT_PACKAGE, "version": modelopt_version, "config": config, "quant_algo": algo},
        "trtllm": {"version": trtllm_release.TRTLLM_VERSION, "container": trtllm_release.TRITON_IMAGE,
                   "backend": "pytorch (LLM API)"},
        "llm_api": asdict(settings),
        "calibration": calibration,
        "plan": plan.as_dict(),
    }


def plan_for(build: LlmapiBuild) -> tuple[str, GpuPlan, list[tuple[str, int]]]:
    name = build.name or build.model_dir.resolve().name
    shape = ModelShape.from_config_file(build.model_dir / "config.json", name)
    gpus = detect_gpus()
    plan = gpu_planner.plan(shape, build.options.quant, "fp16", build.options.tp,
                            gpu_memory_for(build.gpu_memory, gpus), build.max_context)
    return name, plan, gpus


def run_llmapi_build(build: LlmapiBuild) -> dict:
    """`bayling build --target trtllm-llmapi`: plan and print; unless a dry run, quantize with Model
    Optimizer, export, and write the engine folder. Returns the manifest's `build` record."""
    options = build.options
    name, plan, gpus = plan_for(build)
    config = json.loads((build.model_dir / "config.json").read_text(encoding="utf-8"))
    template = _resolve_template(build.template_choice, build.model_dir, config, name)
    prompts = Path(build.calib_prompts or default_calib_prompts())
    records = read_calibration_prompts(prompts)
    settings = settings_for(plan, options)
    recipe, algo = RECIPES[options.quant]
    print(f"TensorRT-LLM LLM API plan for {name} (TensorRT-LLM {trtllm_release.TRTLLM_VERSION}, PyTorch backend, "
          f"container {trtllm_release.TRITON_IMAGE})")
    print(plan.format_table())
    how = (f"calibrated on {len(records)} conversations through the {template.name} template" if plan.calibration
           else "weights only: per-channel scales from the weights, no calibration")
    print(f"\nModel Optimizer: modelopt.torch.quantization.{recipe} ({how}) -> export_hf_checkpoint, quant_algo {algo}")
    print(f"LLM API settings ({ENGINE_SUBDIR}/{SETTINGS_FILE}):")
    print(json.dumps(asdict(settings), indent=2))
    if options.quant == "fp8":
        print("note: FP8 needs a Hopper (SM 9.0) or Ada (SM 8.9) GPU to serve")
    if build.dry_run:
        print(f"\n(dry run: nothing is quantized; a real build needs {MODELOPT_PACKAGE} and torch, on a GPU or the CPU)")
        return build_record(options, plan, settings, build.template_choice, None, _modelopt_version())
    if _modelopt_version() is None:
        raise BaylingError(f"Model Optimizer is not installed here: pip install '{MODELOPT_PACKAGE}' "
                           "(or 'bayling-deploy[modelopt]'), or build inside "
                           f"{trtllm_release.TRITON_IMAGE} (docker/Dockerfile.gpu installs it)")
    return _build(build, name, plan, settings, template, records, gpus)


def _modelopt_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version(MODELOPT_PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def calibration_texts(records: list[dict], template) -> list[str]:
    """The calibration conversations rendered through the model's chat template (answers included)."""
    from bayling.templates import render_prompt

    texts = []
    for record in records:
        messages = record["messages"]
        ends_with_answer = messages[-1]["role"] == "assistant"
        texts.append(render_prompt(messages, template, add_generation_prompt=not ends_with_answer))
    return texts


def quantize(model, tokenizer, texts: list[str], quant: str, max_seq_length: int, device: str):
    """Model Optimizer's post-training quantization of `model` in place, calibrated on `texts` (none
    given: weight-only, whose per-channel scales come from the weights themselves)."""
    import torch
    import modelopt.torch.quantization as mtq

    config = getattr(mtq, RECIPES[quant][0])
    batches = [tokenizer(t, return_tensors="pt", truncation=True, max_length=max_seq_length).input_ids.to(device)
               for t in texts]

    def forward_loop(m):
        with torch.no_grad():
            for ids in batches:
                m(ids)

    return mtq.quantize(model, config, forward_loop=forward_loop if batches else None)


def export(model, out_dir: Path, expected_algo: str) -> dict:
    """Write the HF checkpoint with Model Optimizer's unified exporter; check what it says it is."""
    from modelopt.torch.export import export_hf_checkpoint

    export_hf_checkpoint(model, export_dir=str(out_dir))
    quant_file = out_dir / "hf_quant_config.json"
    if not quant_file.is_file():
        raise BaylingError(f"Model Optimizer wrote no {quant_file.name} in {out_dir}")
    quant = json.loads(quant_file.read_text(encoding="utf-8")).get("quantization", {})
    if quant.get("quant_algo") != expected_algo:
        raise BaylingError(f"Model Optimizer exported quant_algo {quant.get('quant_algo')!r}, not {expected_algo}")
    return quant


def _torch_setup(options: LlmapiOptions, config: dict):
    import torch

    device = options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = options.dtype if options.dtype != "auto" else str(config.get("torch_dtype") or config.get("dtype")
                                                                   or "float16")
    dtype = getattr(torch, dtype_name.replace("torch.", ""))
    if options.quant == "fp8":
        if dtype == torch.float32:   # Model Optimizer 0.47's FP8 export fails on float32 models
            dtype = torch.float16
        if device == "cuda" and torch.cuda.get_device_capability() < FP8_MIN_SM:
            print("warning: this GPU has no FP8; the checkpoint is for Hopper or Ada GPUs", file=sys.stderr)
    return device, dtype


def _build(build: LlmapiBuild, name: str, plan: GpuPlan, settings: LlmApiSettings, template, records, gpus) -> dict:
    from transformers import AutoModelForCausalLM

    from bayling.manifest import ENGINE_SUBDIRS
    from bayling.build_engine.engine_folder import (building, choose_template, finish, load_source, load_tokenizer,
                                                    make_manifest, text_settings, tool_versions, write_tokenizer)

    options, output = build.options, build.output
    source = load_source(build.model_dir, name)
    step = _Step(4)
    step(f"tokenizer and {template.name} chat template of {source.name}")
    tokenizer = load_tokenizer(source.path)
    template = choose_template(build.template_choice, source, tokenizer)
    text = text_settings(source, tokenizer, template)
    device, dtype = _torch_setup(options, source.config)
    with building(output, build.force) as tmp:
        write_tokenizer(tokenizer, template, tmp)
        step(f"loading {source.name} ({str(dtype).replace('torch.', '')}, {device})")
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype).to(device).eval()
        recipe, algo = RECIPES[options.quant]
        texts = calibration_texts(records, template) if plan.calibration else []
        step(f"Model Optimizer {recipe}" + (f", calibrated on {len(texts)} conversations" if texts else ", weights only"))
        model = quantize(model, tokenizer, texts, options.quant, options.calib_max_seq_length, device)
        checkpoint = tmp / ENGINE_SUBDIRS[ENGINE]
        step(f"exporting the {algo} checkpoint and the LLM API settings")
        quant = export(model, checkpoint, algo)
        del model
        tokenizer.save_pretrained(str(checkpoint))     # so the folder also serves alone (trtllm-serve DIR)
        (checkpoint / SETTINGS_FILE).write_text(json.dumps(asdict(settings), indent=2) + "\n", encoding="utf-8")
        calibration = {"samples": len(texts), "template": template.name,
                       "max_seq_length": options.calib_max_seq_length, "device": device} if texts else None
        record = build_record(options, plan, settings, build.template_choice, calibration, _modelopt_version())
        record["modelopt"]["exported"] = quant
        versions = tool_versions(MODELOPT_PACKAGE, "torch", "transformers")
        versions["tensorrt_llm_pinned"] = trtllm_release.TRTLLM_VERSION
        if gpus:
            versions["gpu"] = gpus[0][0]
        manifest = make_manifest(ENGINE, source, text, plan.max_seq_len, record, versions, tmp)
        finish(tmp, manifest)
    print(f"engine ready: {output} ({source.name}, {options.quant} = {algo} via Model Optimizer, context "
          f"{plan.max_seq_len}; serve it with the LLM API in {trtllm_release.TRITON_IMAGE})", file=sys.stderr)
    return record
