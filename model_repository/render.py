"""Render the Triton model repository for an engine folder.

Templates live in `model_repository/templates/<model>/` (`config.pbtxt.in` with `${name}`
placeholders, and `1/model.py` for Python models). Inputs and outputs come from
`bayling.contract`, never written by hand. The engine model `tensorrt_llm` takes its CPU
(CTranslate2) or GPU (TensorRT-LLM) template from the engine's manifest; everything else
is identical. Every rendered `config.pbtxt` is checked: no `${` left, and it parses with
Triton's own `ModelConfig` protobuf. The repository is written to a temporary folder and
renamed into place, so a server never sees half of it.

examples:
  bayling render --engine ~/.cache/bayling/engines/SmolLM2-135M-Instruct-int8 --output ./model_repo
"""

from __future__ import annotations

import argparse
import os
import shutil
import string
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from bayling import contract
from bayling.errors import BaylingError
from bayling.manifest import ENGINE_SUBDIRS, EngineManifest, read_manifest

MODELS = ("preprocessing", contract.ENGINE_MODEL, "postprocessing", contract.ENSEMBLE_MODEL, contract.ENTRY_MODEL,
          contract.BLS_MODEL)


@dataclass
class RenderOptions:
    max_batch_size: int = 16        # requests batched together by the engine model
    max_concurrency: int = 64       # requests each `bayling` instance serves at once
    cpu_threads: int | None = None  # CPU engine threads (None: llama.cpp all cores, CTranslate2 by size; 0: all)
    entry_instances: int | None = None  # `bayling` model processes (None: from the cores, see text_instances_for)
    text_instances: int | None = None   # `preprocessing` / `postprocessing` processes (None: likewise)
    one_token_per_response: bool = False  # CPU engine: stream each token alone, as TensorRT-LLM does
    decoupled: bool = True          # tensorrt_llm and tensorrt_llm_bls decoupled (streaming), as NVIDIA's
                                    # decoupled_mode; false: one response per request (unary ModelInfer)
    engine_lanes: int | None = None  # CPU engine: batches generating at once (None: from engine size and cores)
    join_lanes: int | None = None    # lanes busy before newcomers join running batches instead (see engine_ct2)
    kv_cache_tokens: int | None = None  # llama.cpp: KV cache of all sequences together (None: 2048 per sequence)


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU limit (a container's)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


def text_instances_for(requested: int | None, cores: int) -> int:
    """Python text processes (each has its own GIL and relay thread). One relays well over 10,000 tokens/s
    on one core (benchmarks/bench_relay.py), so one per 8 cores, at most 4, is enough for what one GPU
    generates; more only add memory (each loads the tokenizer)."""
    if requested is not None:
        return requested
    return max(1, min(4, cores // 8))


def template_dir() -> Path:
    return Path(str(resources.files("bayling.model_repository").joinpath("templates")))


SMALL_ENGINE_BYTES = 1 << 30


def cpu_threads_for(manifest: EngineManifest, requested: int | None) -> int:
    """llama.cpp runs one batch on every core (0). CTranslate2: small engines generate fastest on one thread
    (the work per step is too small to split; measured 297 vs 151 tokens/s at batch 8 for the 135M default
    model on 2 cores); large ones use every core (0)."""
    if requested is not None:
        return requested
    if manifest.engine != "ctranslate2":   # llama.cpp: one batch on every core (0)
        return 0
    return 1 if manifest.sizes.get("ctranslate2", SMALL_ENGINE_BYTES) < SMALL_ENGINE_BYTES else 0


def engine_lanes_for(manifest: EngineManifest, options: RenderOptions, cores: int) -> tuple[int, int]:
    """(lanes, join lanes) of the CPU engine. A small engine runs one single-threaded batch per core (on the
    default model two batches of 8 made 106 tokens/s on 2 cores where one batch of 16 made 69-87), plus as
    many spare lanes, for requests that can join no running batch (a repetition penalty, min_length, other
    sampling settings). A large one, on all cores, keeps one lane: two would split its cores, unmeasured."""
    small = manifest.sizes.get("ctranslate2", SMALL_ENGINE_BYTES) < SMALL_ENGINE_BYTES
    join = options.join_lanes or (max(1, min(4, cores)) if small else 1)
    lanes = options.engine_lanes or (min(8, 2 * join) if small else 1)
    return lanes, min(join, lanes)


KV_TOKENS_PER_SEQUENCE = 2048


def served_context(manifest: EngineManifest, options: RenderOptions) -> int:
    """Tokens one request may use, prompt and answer together. llama.cpp gives each of the max_batch_size
    sequences its own slice of the KV cache (a cache shared by all makes every token attend over all of
    them: 1.5x the step time at 200 tokens each, 2.4x at 1,000, measured on the default model), so the
    slice is the context: 2,048 tokens by default (the default model's 8,192 for 16 sequences would hold
    3 GiB of cache), or --kv-cache-tokens / --max-batch-size."""
    if manifest.engine != "llamacpp":
        return manifest.max_context
    total = options.kv_cache_tokens or options.max_batch_size * KV_TOKENS_PER_SEQUENCE
    return min(manifest.max_context, total // options.max_batch_size)


def engine_variant(manifest: EngineManifest) -> str:
    return {"ctranslate2": "cpu", "llamacpp": "cpu", "tensorrt_llm": "gpu", "tensorrt_llm_llmapi": "llmapi"}[manifest.engine]


def ensemble_scheduling() -> str:
    """preprocessing -> tensorrt_llm -> postprocessing, wired by name from the contract."""
    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
        maps = [f'      input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items()]
        maps += [f'      output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items()]
        return f'    {{\n      model_name: "{model}"\n      model_version: -1\n' + "\n".join(maps) + "\n    }"

    # NVIDIA's wiring (all_models/inflight_batcher_llm/ensemble/config.pbtxt of v0.17.0)
    pre_in = {"QUERY": "text_input", "DECODER_QUERY": "decoder_text_input", "REQUEST_OUTPUT_LEN": "max_tokens",
              "BAD_WORDS_DICT": "bad_words", "STOP_WORDS_DICT": "stop_words",
              "EMBEDDING_BIAS_WORDS": "embedding_bias_words", "EMBEDDING_BIAS_WEIGHTS": "embedding_bias_weights",
              "END_ID": "end_id", "PAD_ID": "pad_id", "PROMPT_TABLE_EXTRA_ID": "prompt_table_extra_id"}
    pre_out = ("INPUT_ID", "REQUEST_INPUT_LEN", "DECODER_INPUT_ID", "REQUEST_DECODER_INPUT_LEN", "REQUEST_OUTPUT_LEN",
               "STOP_WORDS_IDS", "BAD_WORDS_IDS", "EMBEDDING_BIAS", "OUT_END_ID", "OUT_PAD_ID",
               "OUT_PROMPT_TABLE_EXTRA_IDS")
    internal = {"OUT_END_ID": "_PREPROCESSOR_END_ID", "OUT_PAD_ID": "_PREPROCESSOR_PAD_ID"}
    pre = step("preprocessing", pre_in, {name: internal.get(name, f"_{name}") for name in pre_out})
    engine_in = {"input_ids": "_INPUT_ID", "decoder_input_ids": "_DECODER_INPUT_ID",
                 "input_lengths": "_REQUEST_INPUT_LEN", "decoder_input_lengths": "_REQUEST_DECODER_INPUT_LEN",
                 "request_output_len": "_REQUEST_OUTPUT_LEN", "end_id": "_PREPROCESSOR_END_ID",
                 "pad_id": "_PREPROCESSOR_PAD_ID",
                 "embedding_bias": "_EMBEDDING_BIAS", "stop_words_list": "_STOP_WORDS_IDS",
                 "bad_words_list": "_BAD_WORDS_IDS", "prompt_table_extra_ids": "_OUT_PROMPT_TABLE_EXTRA_IDS"}
    engine_in.update({engine: public for public, engine in contract.ENSEMBLE_TO_ENGINE.items()})
    public_outputs = {t.name for t in contract.ENSEMBLE_OUTPUTS}
    engine_out = {"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH"}
    engine_out.update({t.name: t.name for t in contract.ENGINE_OUTPUTS if t.name in public_outputs})
    engine = step(contract.ENGINE_MODEL, engine_in, engine_out)
    post = step("postprocessing", {"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"},
                {"OUTPUT": "text_output"})
    return "ensemble_scheduling {\n  step [\n" + ",\n".join([pre, engine, post]) + "\n  ]\n}\n"


def check_config(text: str, model: str):
    """Parse with Triton's ModelConfig protobuf; refuse leftovers and mismatched I/O."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    if "${" in text:
        left = text[text.index("${"):].split("}", 1)[0] + "}"
        raise BaylingError(f"{model}/config.pbtxt: placeholder {left} was not rendered")
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise BaylingError(f"{model}/config.pbtxt does not parse as a Triton ModelConfig: {exc}") from None
    if config.name != model:
        raise BaylingError(f"{model}/config.pbtxt names the model {config.name!r}")
    inputs, outputs = contract.MODELS[model]
    declared = [(i.name, model_config_pb2.DataType.Name(i.data_type)) for i in config.input]
    if declared != [(t.name, f"TYPE_{t.dtype}") for t in inputs]:
        raise BaylingError(f"{model}/config.pbtxt inputs differ from bayling.contract")
    if [o.name for o in config.output] != [t.name for t in outputs]:
        raise BaylingError(f"{model}/config.pbtxt outputs differ from bayling.contract")
    return config


def gpu_values(manifest: EngineManifest, engine_dir: Path) -> dict[str, str]:
    """Values for the TensorRT-LLM template, from what the build's planner chose."""
    plan = manifest.build.get("triton", {})
    values = {k: str(v) for k, v in plan.items()}
    values["engine_path"] = str(engine_dir / ENGINE_SUBDIRS["tensorrt_llm"])
    return values


def render_config(model: str, manifest: EngineManifest, engine_dir: Path, options: RenderOptions) -> str:
    name = f"{model}_{engine_variant(manifest)}" if model == contract.ENGINE_MODEL else model
    source = template_dir() / name / "config.pbtxt.in"
    values = {k: str(v) for k, v in asdict(options).items()}
    values["cpu_threads"] = str(cpu_threads_for(manifest, options.cpu_threads))
    values["one_token_per_response"] = "true" if options.one_token_per_response else "false"
    values["decoupled"] = "true" if options.decoupled else "false"
    cores = available_cores()
    values["entry_instances"] = str(text_instances_for(options.entry_instances, cores))
    values["engine_lanes"], values["join_lanes"] = map(str, engine_lanes_for(manifest, options, cores))
    values["text_instances"] = str(text_instances_for(options.text_instances, cores))
    values.update(engine_dir=str(engine_dir), io=contract.io_blocks(model), ensemble_scheduling=ensemble_scheduling(),
                  model_name=manifest.model_name.replace('"', "'"), engine=manifest.engine, template=manifest.template,
                  max_context=str(served_context(manifest, options)))
    if name == "tensorrt_llm_gpu":
        values.update(gpu_values(manifest, engine_dir))
    elif name == "tensorrt_llm_llmapi":   # the LLM API's scheduler limit, as the build's planner chose it
        values["max_batch_size"] = str(manifest.build.get("llm_api", {}).get("max_batch_size", options.max_batch_size))
    try:
        text = string.Template(source.read_text(encoding="utf-8")).substitute(values)
    except KeyError as exc:
        raise BaylingError(f"{source}: no value for placeholder {exc}") from None
    check_config(text, model)
    return text


def render_repository(engine_dir: Path, output: Path, options: RenderOptions | None = None) -> Path:
    options = options or RenderOptions()
    engine_dir = Path(engine_dir).resolve()
    manifest = read_manifest(engine_dir)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.rendering-", dir=output.parent))
    try:
        for model in MODELS:
            folder = tmp / model
            (folder / "1").mkdir(parents=True)
            (folder / "config.pbtxt").write_text(render_config(model, manifest, engine_dir, options), encoding="utf-8")
            name = f"{model}_{engine_variant(manifest)}" if model == contract.ENGINE_MODEL else model
            code = template_dir() / name / "1" / "model.py"
            if code.is_file():
                shutil.copyfile(code, folder / "1" / "model.py")
        os.chmod(tmp, 0o755)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", type=Path, required=True, metavar="ENGINE_DIR", help="engine folder from 'bayling build'")
    parser.add_argument("--output", type=Path, required=True, metavar="REPO_DIR", help="model repository to (re)create")
    add_render_options(parser)


def add_render_options(parser: argparse.ArgumentParser) -> None:
    d = RenderOptions()
    parser.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help=f"engine batch size (default {d.max_batch_size})")
    parser.add_argument("--max-concurrency", type=int, default=d.max_concurrency,
                        help=f"requests the bayling model serves at once (default {d.max_concurrency})")
    parser.add_argument("--cpu-threads", type=int, default=d.cpu_threads,
                        help="CPU engine threads (0: all cores; default: all for llama.cpp; CTranslate2: 1 per "
                             "batch for engines under 1 GiB, else all)")
    parser.add_argument("--entry-instances", type=int, default=d.entry_instances, metavar="N",
                        help="processes of the bayling model (default: one per 8 cores, 1 to 4)")
    parser.add_argument("--text-instances", type=int, default=d.text_instances, metavar="N",
                        help="processes of the ensemble's preprocessing and postprocessing (default: as --entry-instances)")
    parser.add_argument("--one-token-per-response", action="store_true",
                        help="the CPU engine streams each token in its own response, as TensorRT-LLM does (default: "
                             "the tokens made while a response was being sent leave together)")
    parser.add_argument("--decoupled", type=_boolean, default=d.decoupled, metavar="{true,false}",
                        help="deploy tensorrt_llm and tensorrt_llm_bls decoupled, streaming (default true), or not, "
                             "for unary ModelInfer / HTTP infer clients such as NVIDIA's end_to_end_test.py "
                             "(NVIDIA's decoupled_mode)")
    _add_lane_options(parser)
    parser.add_argument("--kv-cache-tokens", type=int, default=None, metavar="N",
                        help="llama.cpp CPU engine: KV cache tokens of all sequences together; each of the "
                             f"--max-batch-size sequences gets N / that many, its context (default: "
                             f"{KV_TOKENS_PER_SEQUENCE} each, at most the model's context)")


def _add_lane_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine-lanes", type=int, default=None, metavar="N",
                        help="CPU engine: batches generating at once, each on its own CTranslate2 worker (default: "
                             "twice --join-lanes for engines under 1 GiB, else 1)")
    parser.add_argument("--join-lanes", type=int, default=None, metavar="N",
                        help="CPU engine: busy lanes before a newcomer joins a running batch rather than starting "
                             "one (default: the cores, at most 4, for engines under 1 GiB, else 1)")


def _boolean(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def options_from(args: argparse.Namespace) -> RenderOptions:
    options = RenderOptions(args.max_batch_size, args.max_concurrency, args.cpu_threads, args.entry_instances,
                            args.text_instances, args.one_token_per_response, args.decoupled, args.engine_lanes,
                            args.join_lanes, args.kv_cache_tokens)
    for name in ("max_batch_size", "max_concurrency", "entry_instances", "text_instances", "engine_lanes", "join_lanes",
                 "kv_cache_tokens"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise BaylingError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return options


def main(args: argparse.Namespace) -> int:
    out = render_repository(args.engine, args.output, options_from(args))
    print(out)
    return 0
