"""The GPU target: a Hugging Face LLaMA checkpoint -> an INT8 TensorRT-LLM engine folder.

Two commands of the pinned TensorRT-LLM release (`trtllm_release`, 1.2.1) do the work, as its
LLaMA example defines them (examples/models/core/llama/convert_checkpoint.py and
tensorrt_llm/commands/build.py; the option lists are recorded in
build_engine/data/trtllm_1.2.1_options.json):

1. `examples/models/core/llama/convert_checkpoint.py` writes a TensorRT-LLM checkpoint:
   int8-wo  --use_weight_only --weight_only_precision int8             (W8A16)
   int8-sq  --smoothquant ALPHA --per_channel --per_token              (W8A8; never per-tensor,
            which wrecks accuracy: NVIDIA/TensorRT-LLM#1618, #945) with a calibration set
   fp16     the reference build for accuracy comparisons
   --int8_kv_cache adds INT8 KV-cache scales (also calibrated).
2. `trtllm-build` compiles it with the plugins and limits the planner chose: paged KV cache,
   removed input padding, GPT attention and GEMM plugins, context FMHA (paged context FMHA for
   KV-cache reuse when the KV cache is fp16), in-flight batching limits.

Calibration (int8-sq, INT8 KV cache) loads the whole fp16 model in one process and reads a
local dataset through `tensorrt_llm.models.convert_utils.load_calib_dataset`, which picks the
dataset's config, split and text field by matching the *path string* against
DEFAULT_HF_DATASET_META: a path containing "cnn_dailymail" reads split "train" field "article",
one containing "lambada" reads split "validation" field "text", any other path split "train",
field "text". So the calibration set is written as `<dir>/train.jsonl` with a "text" field, in a
folder whose path names neither dataset. Each sample also gets " TL;DR: " appended by the LLaMA
converter's capture_activation_range (a leftover of its summarization default).

Top-level imports stay light: no transformers, torch or TensorRT-LLM until a build runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from bayling.errors import BaylingError
from bayling.build_engine import gpu_planner, trtllm_release
from bayling.build_engine.gpu_planner import ALL_QUANTS, KV_CACHE_TYPES, LLMAPI_QUANTS, QUANTS, GpuPlan, ModelShape

CALIB_FILE = "train.jsonl"                    # the split name HF `datasets` infers from the file name
CALIB_FIELD = "text"                          # the field load_calib_dataset reads for a local folder
RESERVED_DATASET_NAMES = ("cnn_dailymail", "lambada")   # DEFAULT_HF_DATASET_META keys matched by substring
WORK_DIR = ".trtllm-work"                     # inside the engine folder while building; removed at the end


def default_calib_prompts() -> Path:
    return Path(str(resources.files("bayling.build_engine").joinpath("data", "calibration_prompts.jsonl")))


# ------------------------------------------------------------------------------------------ options

def find_convert_script() -> str:
    env = os.environ.get("TRTLLM_EXAMPLES_DIR")
    candidates = ([str(Path(env) / trtllm_release.CONVERT_SCRIPT_SUBPATH)] if env else []) + \
        list(trtllm_release.CONVERT_SCRIPT_CANDIDATES)
    for candidate in candidates:
        if Path(candidate).is_file():
            return candidate
    return candidates[0]


@dataclass
class TrtllmOptions:
    """How the engine is converted and compiled; the one place its defaults are written."""
    quant: str = "int8-wo"
    kv_cache: str = "fp16"
    tp: int = 1
    smoothquant_alpha: float = 0.5
    calib_max_seq_length: int = 512           # convert_checkpoint.py's default
    convert_script: str = field(default_factory=find_convert_script)
    python: str = "python3"
    trtllm_build: str = "trtllm-build"
    dtype: str = "float16"                    # BayLing's weights are fp16

    def __post_init__(self):
        if self.quant not in QUANTS:
            hint = " (fp8 is for --target trtllm-llmapi)" if self.quant in LLMAPI_QUANTS else ""
            raise BaylingError(f"--quant {self.quant!r} is not a --target trtllm build{hint}; choose from {', '.join(QUANTS)}")
        if self.kv_cache not in KV_CACHE_TYPES:
            raise BaylingError(f"unknown --kv-cache {self.kv_cache!r}; choose from {', '.join(KV_CACHE_TYPES)}")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise BaylingError(f"--smoothquant-alpha must be in [0, 1], not {self.smoothquant_alpha}")
        if self.tp < 1:
            raise BaylingError("--tp must be at least 1")
        if self.calib_max_seq_length < 16:
            raise BaylingError("--calib-max-seq-length must be at least 16")


@dataclass
class TrtllmBuild:
    """One `bayling build --target trtllm` run: what `run_trtllm_build` is called with."""
    model_dir: Path
    output: Path
    name: str | None = None                   # shown to clients; default: the model folder's name
    max_context: int | None = None            # default: the model's
    template_choice: str = "auto"             # one of bayling.templates.TEMPLATE_CHOICES
    calib_prompts: Path | None = None         # default: the set shipped with bayling
    gpu_memory: int | None = None             # bytes of each GPU to plan for; default: what nvidia-smi reports
    dry_run: bool = False
    force: bool = False                       # replace an existing engine folder
    force_version: bool = False               # accept a TensorRT-LLM other than the pinned one
    options: TrtllmOptions = field(default_factory=TrtllmOptions)

    def __post_init__(self):
        self.model_dir, self.output = Path(self.model_dir), Path(self.output)


# ---------------------------------------------------------------------------------------------- CLI

def add_trtllm_arguments(parser) -> None:
    """The options of `bayling build --target trtllm` (a parser or an argument group)."""
    existing = getattr(parser, "_option_string_actions", {})
    d = TrtllmOptions()
    parser.add_argument("--quant", choices=ALL_QUANTS, default=d.quant,
                        help="int8-wo: INT8 weight-only (W8A16, default); int8-sq: SmoothQuant W8A8 per-channel + "
                             "per-token (calibrated; trtllm only); fp16: the reference build (trtllm only); fp8: "
                             "FP8 weights and activations for Hopper/Ada (trtllm-llmapi only)")
    parser.add_argument("--kv-cache", choices=KV_CACHE_TYPES, default=d.kv_cache,
                        help="KV-cache type (int8 halves its memory; calibrated; turns KV-cache reuse off)")
    parser.add_argument("--gpu-memory", metavar="SIZE",
                        help="memory of each GPU to plan for, e.g. 16GiB, 24GB (default: what nvidia-smi reports)")
    parser.add_argument("--tp", type=int, default=d.tp, metavar="N", help=f"tensor-parallel GPUs (default {d.tp})")
    parser.add_argument("--smoothquant-alpha", type=float, default=d.smoothquant_alpha, metavar="A",
                        help=f"SmoothQuant migration strength in [0, 1] (default {d.smoothquant_alpha})")
    parser.add_argument("--calib-prompts", type=Path, metavar="JSONL",
                        help="bilingual calibration conversations (default: the set shipped with bayling)")
    parser.add_argument("--calib-max-seq-length", type=int, default=d.calib_max_seq_length, metavar="N",
                        help=f"tokens per calibration sample (default {d.calib_max_seq_length})")
    parser.add_argument("--convert-script", default=d.convert_script, metavar="PATH",
                        help=f"TensorRT-LLM's examples/{trtllm_release.CONVERT_SCRIPT_SUBPATH} (default: found in "
                             "the container, or under $TRTLLM_EXAMPLES_DIR)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and every command; run nothing")
    parser.add_argument("--force-version", action="store_true",
                        help=f"build with a TensorRT-LLM other than the pinned {trtllm_release.TRTLLM_VERSION}")
    if "--max-context" not in existing:
        parser.add_argument("--max-context", type=int, help="context length in tokens (default: the model's)")


def trtllm_build_from_args(args: argparse.Namespace, *, model_dir: Path, output: Path,
                           name: str | None) -> TrtllmBuild:
    """The run the `bayling build` arguments ask for (its parser, build.add_arguments, defines
    every attribute read here: --template and --force are its own, the rest add_trtllm_arguments')."""
    options = TrtllmOptions(quant=args.quant, kv_cache=args.kv_cache, tp=args.tp,
                            smoothquant_alpha=args.smoothquant_alpha,
                            calib_max_seq_length=args.calib_max_seq_length, convert_script=args.convert_script)
    return TrtllmBuild(model_dir, output, name=name, max_context=args.max_context, template_choice=args.template,
                       calib_prompts=args.calib_prompts,
                       gpu_memory=gpu_planner.parse_memory(args.gpu_memory) if args.gpu_memory else None,
                       dry_run=args.dry_run, force=args.force, force_version=args.force_version, options=options)


# ---------------------------------------------------------------------------------------- commands

@dataclass
class CalibrationSet:
    path: Path                 # the folder given to --calib_dataset
    count: int                 # samples, all used (--calib_size)
    source: Path               # the prompts file it was rendered from
    template: str


def plan_commands(model_dir: Path, checkpoint_dir: Path, engine_dir: Path, options: TrtllmOptions, plan: GpuPlan,
                  calibration: CalibrationSet | None = None) -> list[list[str]]:
    """The converter's and trtllm-build's argv lists, for the pinned release.

    Every option here is one that release defines (tests/test_trtllm_build.py keeps both option
    lists with their source)."""
    if plan.calibration and calibration is None:
        raise BaylingError(f"--quant {options.quant} with KV cache {options.kv_cache} calibrates: a calibration set is needed")
    convert = [options.python, options.convert_script, "--model_dir", str(model_dir), "--output_dir", str(checkpoint_dir),
               "--dtype", options.dtype, "--tp_size", str(options.tp)]
    if options.quant == "int8-wo":
        convert += ["--use_weight_only", "--weight_only_precision", "int8"]
    elif options.quant == "int8-sq":
        # per-channel weights + per-token activations, always: per-tensor SmoothQuant loses too much accuracy
        convert += ["--smoothquant", f"{options.smoothquant_alpha:g}", "--per_channel", "--per_token"]
    if options.kv_cache == "int8":
        convert += ["--int8_kv_cache"]
    if plan.calibration:
        convert += ["--calib_dataset", str(calibration.path), "--calib_size", str(calibration.count),
                    "--calib_max_seq_length", str(options.calib_max_seq_length)]
        if plan.calibrate_on_cpu:
            convert += ["--load_model_on_cpu"]
    on_off = {True: "enable", False: "disable"}
    build = [options.trtllm_build, "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(engine_dir),
             "--gemm_plugin", "auto", "--gpt_attention_plugin", "auto",
             "--kv_cache_type", "paged", "--tokens_per_block", str(plan.assumptions.tokens_per_block),
             "--remove_input_padding", "enable", "--context_fmha", "enable",
             "--use_paged_context_fmha", on_off[plan.paged_context_fmha],
             "--max_batch_size", str(plan.max_batch_size), "--max_input_len", str(plan.max_input_len),
             "--max_seq_len", str(plan.max_seq_len), "--max_num_tokens", str(plan.max_num_tokens),
             "--max_beam_width", str(plan.max_beam_width)]
    if options.tp > 1:
        build += ["--workers", str(options.tp)]
    return [convert, build]


def format_commands(commands: list[list[str]]) -> str:
    return "\n".join(shlex.join(c) for c in commands)


# ------------------------------------------------------------------------------------- calibration

def read_calibration_prompts(path: Path) -> list[dict]:
    """The prompts file: one JSON object a line with `messages` (user/assistant turns, optional system)."""
    from bayling.templates import validate_messages

    path = Path(path)
    if not path.is_file():
        raise BaylingError(f"calibration prompts {path} not found")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            messages = record["messages"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BaylingError(f"{path}:{n}: not a JSON object with 'messages'") from None
        ends_with_answer = bool(messages) and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"
        try:
            validate_messages(messages[:-1] if ends_with_answer else messages)
        except BaylingError as exc:
            raise BaylingError(f"{path}:{n}: {exc}") from None
        records.append(record)
    if not records:
        raise BaylingError(f"{path} has no calibration prompts")
    return records


def render_calibration_set(prompts: Path, template, out_dir: Path) -> CalibrationSet:
    """Render each conversation through the model's chat template (answers included, so the
    activations of both prompt and response are seen) into `out_dir/train.jsonl`, {"text": ...}.

    `template` is a `bayling.templates.ChatTemplate` or the name of a built-in one."""
    from bayling.templates import builtin_template, render_prompt

    if isinstance(template, str):
        template = builtin_template(template)
    out_dir = Path(out_dir)
    clash = [name for name in RESERVED_DATASET_NAMES if name in str(out_dir)]
    if clash:
        raise BaylingError(f"the calibration folder {out_dir} contains {clash[0]!r}: TensorRT-LLM's load_calib_dataset "
                           f"would then read another split and field; choose another path")
    records = read_calibration_prompts(prompts)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / CALIB_FILE, "w", encoding="utf-8") as f:
        for record in records:
            messages = record["messages"]
            ends_with_answer = messages[-1]["role"] == "assistant"
            text = render_prompt(messages, template, add_generation_prompt=not ends_with_answer)
            f.write(json.dumps({CALIB_FIELD: text}, ensure_ascii=False) + "\n")
    return CalibrationSet(out_dir, len(records), Path(prompts), template.name)


# ------------------------------------------------------------------------------------------- GPU

def detect_gpus() -> list[tuple[str, int]]:
    """(name, total bytes) of each GPU nvidia-smi reports; [] without one."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, mib = line.rpartition(",")
        try:
            gpus.append((name.strip(), int(float(mib)) * gpu_planner.MiB))
        except ValueError:
            continue
    return gpus


def gpu_memory_for(gpu_memory: int | None, gpus: list[tuple[str, int]]) -> int:
    """The memory to plan for: the one asked for, else the smallest GPU's."""
    if gpu_memory:
        return gpu_memory
    if not gpus:
        raise BaylingError("no GPU found here (nvidia-smi); pass --gpu-memory SIZE to plan for one, e.g. --gpu-memory 24GiB")
    return min(mem for _, mem in gpus)


# ------------------------------------------------------------------------------------------- build

@dataclass
class _Step:
    total: int
    n: int = 0
    start: float = field(default_factory=time.monotonic)

    def __call__(self, what: str) -> None:
        self.n += 1
        print(f"[{self.n}/{self.total}] {what} (at {time.monotonic() - self.start:.0f}s)", file=sys.stderr, flush=True)


def _run(command: list[str], what: str) -> None:
    """Run one command, its output passed through line by line; keep the tail for the error."""
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print("$ " + shlex.join(command), file=sys.stderr, flush=True)
    tail: list[str] = []
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
    except OSError as exc:
        raise BaylingError(f"{what}: cannot start {command[0]}: {exc}") from None
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(line)
        tail = (tail + [line.rstrip()])[-20:]
    code = proc.wait()
    if code:
        raise BaylingError(f"{what} failed (exit {code}): " + " | ".join(t for t in tail[-3:] if t))


def _resolve_template(choice: str, model_dir: Path, config: dict, name: str):
    """The chat template the engine will use, chosen like engine_folder.choose_template, but from
    tokenizer_config.json instead of a loaded tokenizer (so a dry run needs no transformers)."""
    from bayling.build_engine.engine_folder import SourceModel, choose_template

    chat_template = ""
    tok_config = Path(model_dir) / "tokenizer_config.json"
    jinja_file = Path(model_dir) / "chat_template.jinja"       # where newer transformers save it
    if jinja_file.is_file():
        chat_template = jinja_file.read_text(encoding="utf-8")
    elif tok_config.is_file():
        try:
            chat_template = json.loads(tok_config.read_text(encoding="utf-8")).get("chat_template") or ""
        except json.JSONDecodeError:
            pass
    if isinstance(chat_template, list):  # named templates: take the default one
        chat_template = next((t.get("template", "") for t in chat_template if t.get("name") == "default"), "")

    class _Tok:
        pass

    tok = _Tok()
    tok.chat_template = chat_template
    return choose_template(choice, SourceModel(Path(model_dir), config, name), tok)


def build_record(options: TrtllmOptions, plan: GpuPlan, commands: list[list[str]],
                 calibration: CalibrationSet | None, template_choice: str) -> dict:
    """What goes into the manifest's `build` field."""
    return {
        "target": "trtllm",
        "quantization": options.quant,
        "kv_cache": options.kv_cache,
        "tp": options.tp,
        "template_choice": template_choice,
        "trtllm": {
            "version": trtllm_release.TRTLLM_VERSION,
            "backend": trtllm_release.BACKEND_SOURCE,
            "container": trtllm_release.TRITON_IMAGE,
            "max_batch_size": plan.max_batch_size,
            "max_input_len": plan.max_input_len,
            "max_seq_len": plan.max_seq_len,
            "max_num_tokens": plan.max_num_tokens,
            "max_beam_width": plan.max_beam_width,
            "tokens_per_block": plan.assumptions.tokens_per_block,
            "paged_context_fmha": plan.paged_context_fmha,
            "smoothquant_alpha": options.smoothquant_alpha if options.quant == "int8-sq" else None,
            "commands": [shlex.join(c) for c in commands],
        },
        "calibration": None if calibration is None else {
            "samples": calibration.count, "source": calibration.source.name, "template": calibration.template,
            "max_seq_length": options.calib_max_seq_length, "on_cpu": plan.calibrate_on_cpu},
        "plan": plan.as_dict(),
        "triton": plan.triton_parameters(),
    }


def run_trtllm_build(build: TrtllmBuild) -> dict:
    """`bayling build --target trtllm`: plan, print, then (unless a dry run) convert, build and
    write the engine folder. Returns the manifest's `build` record."""
    model_dir, output, options = build.model_dir, build.output, build.options
    name = build.name or model_dir.resolve().name
    config_path = model_dir / "config.json"
    shape = ModelShape.from_config_file(config_path, name)
    config = json.loads(config_path.read_text(encoding="utf-8"))
    gpus = detect_gpus()
    plan = gpu_planner.plan(shape, options.quant, options.kv_cache, options.tp, gpu_memory_for(build.gpu_memory, gpus),
                            build.max_context)
    if gpus and len(gpus) < options.tp and not build.dry_run:
        raise BaylingError(f"--tp {options.tp} needs {options.tp} GPUs; nvidia-smi reports {len(gpus)}")
    template = _resolve_template(build.template_choice, model_dir, config, name)
    prompts = Path(build.calib_prompts or default_calib_prompts())

    print(f"TensorRT-LLM plan for {name} ({trtllm_release.pin_summary()})")
    print(plan.format_table())
    if build.dry_run:
        work = output / WORK_DIR
        calibration = None
        if plan.calibration:
            records = read_calibration_prompts(prompts)
            calibration = CalibrationSet(work / "calibration", len(records), prompts, template.name)
        commands = plan_commands(model_dir, work / "checkpoint", output / "trtllm", options, plan, calibration)
        print("\ncommands (dry run: nothing is run):")
        if calibration:
            print(f"# render {calibration.count} calibration conversations from {prompts} through the "
                  f"{template.name} template into {calibration.path / CALIB_FILE}")
        print(format_commands(commands))
        installed = trtllm_release.installed_version()
        print(f"\nTensorRT-LLM installed here: {installed or 'none'} (pinned {trtllm_release.TRTLLM_VERSION}; "
              f"run the build in {trtllm_release.TRITON_IMAGE})")
        return build_record(options, plan, commands, calibration, build.template_choice)

    version = trtllm_release.check_installed_version(build.force_version)
    if not Path(options.convert_script).is_file():
        raise BaylingError(f"TensorRT-LLM's LLaMA converter {options.convert_script} not found; pass --convert-script "
                           f"(examples/{trtllm_release.CONVERT_SCRIPT_SUBPATH} of TensorRT-LLM "
                           f"{trtllm_release.BACKEND_TAG})")
    return _build(build, name, plan, template, prompts, version, gpus)


def _build(build: TrtllmBuild, name: str, plan: GpuPlan, template, prompts: Path, version: str,
           gpus: list[tuple[str, int]]) -> dict:
    from bayling.manifest import ENGINE_SUBDIRS
    from bayling.build_engine.engine_folder import (building, choose_template, finish, load_source, load_tokenizer,
                                                    make_manifest, text_settings, tool_versions, write_tokenizer)

    options, output, template_choice = build.options, build.output, build.template_choice
    source = load_source(build.model_dir, name)
    step = _Step(5 if plan.calibration else 4)
    step(f"tokenizer and {template.name} chat template of {source.name}")
    tokenizer = load_tokenizer(source.path)
    template = choose_template(template_choice, source, tokenizer)    # the loaded tokenizer decides
    text = text_settings(source, tokenizer, template)
    with building(output, build.force) as tmp:
        write_tokenizer(tokenizer, template, tmp)
        work = tmp / WORK_DIR
        calibration = None
        if plan.calibration:
            step(f"rendering the calibration set from {prompts.name}")
            calibration = render_calibration_set(prompts, template, work / "calibration")
        engine_dir = tmp / ENGINE_SUBDIRS["tensorrt_llm"]
        convert, trtllm_build = plan_commands(source.path, work / "checkpoint", engine_dir, options, plan, calibration)
        step(f"converting to a TensorRT-LLM {options.quant} checkpoint"
             + (" (calibrating: loads the whole fp16 model)" if plan.calibration else ""))
        _run(convert, "checkpoint conversion")
        step(f"trtllm-build (max_batch_size {plan.max_batch_size}, max_seq_len {plan.max_seq_len}, "
             f"max_num_tokens {plan.max_num_tokens})")
        _run(trtllm_build, "trtllm-build")
        missing = [f"rank{r}.engine" for r in range(options.tp) if not (engine_dir / f"rank{r}.engine").is_file()]
        if missing or not (engine_dir / "config.json").is_file():
            raise BaylingError(f"trtllm-build finished but {engine_dir} lacks {', '.join(missing) or 'config.json'}")
        shutil.rmtree(work, ignore_errors=True)
        step("writing the manifest")
        record = build_record(options, plan, [convert, trtllm_build], calibration, template_choice)
        versions = tool_versions("tensorrt_llm", "tensorrt", "torch", "transformers")
        versions["tensorrt_llm"] = version
        versions["tensorrt_llm_pinned"] = trtllm_release.TRTLLM_VERSION
        if gpus:
            versions["gpu"] = gpus[0][0]
            versions["gpu_count"] = str(len(gpus))
        manifest = make_manifest("tensorrt_llm", source, text, plan.max_seq_len, record, versions, tmp)
        finish(tmp, manifest)
    print(f"engine ready: {output} ({source.name}, {options.quant}, KV cache {options.kv_cache}, "
          f"context {plan.max_seq_len})", file=sys.stderr)
    return record
