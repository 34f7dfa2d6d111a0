"""`bayling build --target trtllm` without a GPU: the commands it would run use only options the
pinned TensorRT-LLM release defines, the calibration set follows TensorRT-LLM's loading rules,
the GPU `tensorrt_llm` configuration parses and declares the CPU variant's tensors, and the
whole build runs end to end against stand-ins for the two TensorRT-LLM commands.

What runs here is everything but TensorRT-LLM itself (see docs/gpu.md, "What was executed").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import string
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from bayling import contract
from bayling.build_engine import gpu_planner as gp
from bayling.build_engine import trtllm_build as tb
from bayling.build_engine import trtllm_release as rel
from bayling.errors import BaylingError

FLAG, INT, FLOAT, STR = "flag", "int", "float", "str"

# Every option list and config key comes from build_engine/data/trtllm_1.2.1_options.json, recorded
# from TensorRT-LLM 1.2's sources; its "sources" names each file, path and commit read:
#   trtllm-build        tensorrt_llm/commands/build.py parse_arguments() + plugin/plugin.py cli_plugin_args
#   convert_checkpoint  examples/models/core/llama/convert_checkpoint.py parse_arguments()
#   backend keys        triton_backend/inflight_batcher_llm/src/model_instance_state.cc GetParameter<...>()
OPTIONS = rel.release_options()


def _spec(raw: dict) -> dict[str, object]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}


TRTLLM_BUILD_OPTIONS = _spec(OPTIONS["trtllm_build"])
CONVERT_CHECKPOINT_OPTIONS = _spec(OPTIONS["convert_checkpoint"])
BACKEND_PARAMETER_KEYS = set(OPTIONS["backend_parameters"])
BOOL_PARAMETERS = set(OPTIONS["backend_bool_parameters"])
REQUIRED_PARAMETERS = set(OPTIONS["backend_required_parameters"])

# --- tensorrt_llm.models.convert_utils, as read for 0.17 (b4f2086d); not re-read at 1.2 (see docs/gpu.md) ---
# load_calib_dataset() walks this dict in order and takes the first key that is a *substring* of
# the dataset path ('' matches everything): (config name, split, text field).
DEFAULT_HF_DATASET_META = {
    "ccdv/cnn_dailymail": ("3.0.0", "train", "article"),
    "cnn_dailymail": ("3.0.0", "train", "article"),
    "lambada": (None, "validation", "text"),
    "": (None, "train", "text"),
}

ROOT = Path(__file__).resolve().parent.parent
GPU_TEMPLATE = ROOT / "model_repository" / "templates" / "tensorrt_llm_gpu" / "config.pbtxt.in"
CPU_TEMPLATE = ROOT / "model_repository" / "templates" / "tensorrt_llm_cpu" / "config.pbtxt.in"
BAYLING_SYSTEM = ("I am an intelligent language assistant developed by the NLP Group of ICT/CAS.\n"
                  "Below is a dialog consisting of instructions and responses. Write a response that completes the request.\n")
LLAMA_7B_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                   "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 2048,
                   "torch_dtype": "float16"}
LLAMA_13B_CONFIG = dict(LLAMA_7B_CONFIG, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40)


def check_argv(argv: list[str], spec: dict[str, object]) -> list[str]:
    """Check every option (and its value) against a parser's option list; return the options."""
    seen, i = [], 0
    while i < len(argv):
        option = argv[i]
        assert option.startswith("-"), f"stray value {option!r} in {argv}"
        assert option in spec, f"{option} is not an option of the pinned release"
        kind = spec[option]
        seen.append(option)
        if kind == FLAG:
            i += 1
            continue
        assert i + 1 < len(argv), f"{option} needs a value"
        value = argv[i + 1]
        if kind == INT:
            int(value)
        elif kind == FLOAT:
            float(value)
        elif isinstance(kind, tuple):
            assert value in kind, f"{option} {value}: the release accepts {kind}"
        i += 2
    assert len(seen) == len(set(seen)), f"an option is repeated in {argv}"
    return seen


def calibration_for(plan: gp.GpuPlan, tmp_path: Path) -> tb.CalibrationSet | None:
    return tb.CalibrationSet(tmp_path / "calib", 60, tb.default_calib_prompts(), "bayling") if plan.calibration else None


def commands_for(quant: str, kv: str, tp: int, tmp_path: Path, gpu=80 * gp.GiB, shape=gp.LLAMA_7B, **options):
    plan = gp.plan(shape, quant, kv, tp, gpu)
    opts = tb.TrtllmOptions(quant=quant, kv_cache=kv, tp=tp, **options)
    convert, build = tb.plan_commands(tmp_path / "hf", tmp_path / "ckpt", tmp_path / "engine", opts, plan,
                                      calibration_for(plan, tmp_path))
    return plan, convert, build


# ------------------------------------------------------------------------------- the commands

@pytest.mark.parametrize("quant", gp.QUANTS)
@pytest.mark.parametrize("kv", gp.KV_CACHE_TYPES)
@pytest.mark.parametrize("tp", [1, 2])
def test_commands_use_only_options_the_pinned_release_defines(quant, kv, tp, tmp_path):
    plan, convert, build = commands_for(quant, kv, tp, tmp_path)
    assert convert[:2] == ["python3", tb.find_convert_script()]
    assert convert[1].endswith("examples/models/core/llama/convert_checkpoint.py")
    check_argv(convert[2:], CONVERT_CHECKPOINT_OPTIONS)
    assert build[0] == "trtllm-build"
    check_argv(build[1:], TRTLLM_BUILD_OPTIONS)


def test_int8_weight_only_is_the_documented_w8a16_conversion(tmp_path):
    _, convert, build = commands_for("int8-wo", "fp16", 1, tmp_path)
    assert convert[convert.index("--dtype") + 1] == "float16"
    assert "--use_weight_only" in convert and convert[convert.index("--weight_only_precision") + 1] == "int8"
    assert not {"--smoothquant", "--per_channel", "--per_token", "--int8_kv_cache", "--calib_dataset"} & set(convert)


def test_smoothquant_is_always_per_channel_and_per_token(tmp_path):
    for alpha in (0.5, 0.8):
        _, convert, _ = commands_for("int8-sq", "fp16", 1, tmp_path, smoothquant_alpha=alpha)
        assert convert[convert.index("--smoothquant") + 1] == f"{alpha:g}"
        assert "--per_channel" in convert and "--per_token" in convert      # never per-tensor (#1618, #945)
        assert "--use_weight_only" not in convert


def test_smoothquant_alpha_must_be_in_range():
    with pytest.raises(BaylingError, match=r"\[0, 1\]"):
        tb.TrtllmOptions(quant="int8-sq", smoothquant_alpha=1.5)


def test_fp16_reference_build_has_no_quantization(tmp_path):
    _, convert, _ = commands_for("fp16", "fp16", 1, tmp_path)
    assert not [a for a in convert if a in ("--use_weight_only", "--smoothquant", "--int8_kv_cache", "--calib_dataset")]


def test_calibrated_builds_pass_the_whole_calibration_set(tmp_path):
    for quant, kv in (("int8-sq", "fp16"), ("int8-wo", "int8")):
        plan, convert, _ = commands_for(quant, kv, 1, tmp_path)
        assert plan.calibration
        assert convert[convert.index("--calib_dataset") + 1] == str(tmp_path / "calib")
        assert convert[convert.index("--calib_size") + 1] == "60"           # every rendered sample
        assert convert[convert.index("--calib_max_seq_length") + 1] == "512"
    _, convert, _ = commands_for("int8-wo", "int8", 1, tmp_path)
    assert "--int8_kv_cache" in convert


def test_calibration_on_cpu_when_the_fp16_model_does_not_fit(tmp_path):
    # 13B: the converter loads the whole fp16 model (24.24 GiB) to calibrate
    plan, convert, _ = commands_for("int8-sq", "int8", 1, tmp_path, gpu=24 * gp.GiB, shape=gp.LLAMA_13B)
    assert plan.calibrate_on_cpu and "--load_model_on_cpu" in convert
    plan, convert, _ = commands_for("int8-sq", "int8", 1, tmp_path, gpu=40 * gp.GiB, shape=gp.LLAMA_13B)
    assert not plan.calibrate_on_cpu and "--load_model_on_cpu" not in convert


def test_a_calibrated_build_without_a_calibration_set_is_refused(tmp_path):
    plan = gp.plan(gp.LLAMA_7B, "int8-sq", "fp16", 1, 24 * gp.GiB)
    with pytest.raises(BaylingError, match="calibration set"):
        tb.plan_commands(tmp_path, tmp_path, tmp_path, tb.TrtllmOptions(quant="int8-sq"), plan)


def test_trtllm_build_gets_the_planner_limits_and_the_llama_plugins(tmp_path):
    plan, _, build = commands_for("int8-wo", "fp16", 1, tmp_path, gpu=16 * gp.GiB)
    args = dict(zip(build[1::2], build[2::2]))
    assert args["--max_batch_size"] == "12" and args["--max_input_len"] == "1536"
    assert args["--max_seq_len"] == "2048" and args["--max_num_tokens"] == "8192"
    assert args["--kv_cache_type"] == "paged" and args["--remove_input_padding"] == "enable"
    assert args["--gpt_attention_plugin"] == "auto" and args["--gemm_plugin"] == "auto"
    assert args["--context_fmha"] == "enable" and args["--use_paged_context_fmha"] == "enable"
    assert args["--tokens_per_block"] == "64" and args["--max_beam_width"] == "1"
    assert args["--output_dir"] == str(tmp_path / "engine")


def test_int8_kv_cache_builds_without_paged_context_fmha(tmp_path):
    _, _, build = commands_for("int8-wo", "int8", 1, tmp_path)
    assert build[build.index("--use_paged_context_fmha") + 1] == "disable"


def test_tensor_parallel_conversion_and_parallel_build(tmp_path):
    _, convert, build = commands_for("int8-wo", "fp16", 2, tmp_path)
    assert convert[convert.index("--tp_size") + 1] == "2"
    assert build[build.index("--workers") + 1] == "2"


# ------------------------------------------------------------------------------ calibration set

def test_calibration_prompts_are_a_small_bilingual_set():
    records = tb.read_calibration_prompts(tb.default_calib_prompts())
    assert len(records) == 60
    has_cjk = lambda s: re.search(r"[\u4e00-\u9fff]", s) is not None
    user_zh = [r for r in records if has_cjk(r["messages"][0]["content"])]
    user_en = [r for r in records if not has_cjk(r["messages"][0]["content"])]
    assert len(user_zh) >= 25 and len(user_en) >= 25
    assert sum(r["task"] == "translation" for r in records) == 32
    assert any(len(r["messages"]) == 4 for r in records)          # a few two-turn dialogues


def test_calibration_set_is_rendered_through_the_bayling_template(tmp_path):
    calib = tb.render_calibration_set(tb.default_calib_prompts(), "bayling", tmp_path / "calib")
    assert calib.count == 60 and calib.template == "bayling"
    lines = (tmp_path / "calib" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    assert len(texts) == 60
    assert texts[0] == (BAYLING_SYSTEM + "\n### Instruction:\nProvide the Chinese translation for this sentence: "
                        "The weather is nice today, so let's go for a walk in the park.\n"
                        "### Response:\n今天天气很好，我们去公园散散步吧。</s>\n")
    two_turns = [t for t in texts if t.count("### Instruction:") == 2]
    assert len(two_turns) == 4 and all(t.count("</s>") == 2 for t in two_turns)


def test_the_calibration_folder_is_read_as_split_train_field_text(tmp_path):
    # TensorRT-LLM's rule, applied to the folder this build writes
    def meta_for(path: str):
        return next(meta for key, meta in DEFAULT_HF_DATASET_META.items() if key in path)

    calib = tb.render_calibration_set(tb.default_calib_prompts(), "bayling", tmp_path / "engine" / ".trtllm-work" / "calibration")
    assert meta_for(str(calib.path)) == (None, "train", "text")
    assert (calib.path / "train.jsonl").is_file()                 # `datasets` names the split after the file
    assert set(json.loads((calib.path / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])) == {"text"}
    assert meta_for("/data/lambada_zh") == (None, "validation", "text")   # why such paths are refused


@pytest.mark.parametrize("name", ["lambada", "my_cnn_dailymail_copy"])
def test_a_calibration_folder_named_like_a_known_dataset_is_refused(tmp_path, name):
    with pytest.raises(BaylingError, match="another split and field"):
        tb.render_calibration_set(tb.default_calib_prompts(), "bayling", tmp_path / name)


def test_bad_calibration_prompts_are_refused(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"messages": [{"role": "assistant", "content": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(BaylingError, match="p.jsonl:1"):
        tb.read_calibration_prompts(bad)
    bad.write_text("not json\n", encoding="utf-8")
    with pytest.raises(BaylingError, match="p.jsonl:1"):
        tb.read_calibration_prompts(bad)


# ------------------------------------------------------------------------------ the release pin

def test_the_pin_is_one_release_and_its_container():
    assert rel.TRTLLM_VERSION == "1.2.1" and rel.BACKEND_TAG == "v1.2.1"
    assert rel.TRITON_IMAGE == "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"
    assert (rel.TENSORRT_VERSION, rel.CUDA_VERSION, rel.MIN_DRIVER) == ("10.14.1.48", "13.1.0.036", "590.44.01")
    assert rel.COMPATIBLE_VERSIONS == ("1.2.1",)
    assert OPTIONS["release"] == rel.TRTLLM_VERSION and rel.OPTIONS_FILE == "trtllm_1.2.1_options.json"


def test_the_recorded_options_name_their_sources():
    sources = OPTIONS["sources"]
    assert {"compatibility", "trtllm_build", "plugins", "convert_checkpoint", "backend_parameters",
            "llmapi_model"} <= set(sources)
    assert "26.07" in sources["compatibility"] and "1.2.1" in sources["compatibility"]
    assert "examples/models/core/llama/convert_checkpoint.py" in sources["convert_checkpoint"]
    assert "triton_backend/inflight_batcher_llm/src/model_instance_state.cc" in sources["backend_parameters"]
    for name in ("trtllm_build", "convert_checkpoint", "backend_parameters"):
        assert re.search(r"[0-9a-f]{40}", sources[name]), f"{name}: no commit named"
    # the quantization flags this project relies on, as the 1.2 converter maps them
    assert OPTIONS["weight_only_algos"]["int8"] == "W8A16"
    assert OPTIONS["smoothquant_algos"]["per_channel+per_token"] == "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    assert REQUIRED_PARAMETERS <= BACKEND_PARAMETER_KEYS and BOOL_PARAMETERS <= BACKEND_PARAMETER_KEYS


def test_version_check(monkeypatch, capsys):
    monkeypatch.setattr(rel, "installed_version", lambda: None)
    with pytest.raises(BaylingError, match=re.escape(rel.TRITON_IMAGE)):
        rel.check_installed_version(force=True)               # nothing to force without TensorRT-LLM
    for other in ("0.17.0.post1", "1.2.0", "1.3.0"):     # the old pin, the release before, one without engines
        monkeypatch.setattr(rel, "installed_version", lambda v=other: v)
        with pytest.raises(BaylingError, match="--force-version"):
            rel.check_installed_version()
    assert rel.check_installed_version(force=True) == "1.3.0"
    assert "not the pinned" in capsys.readouterr().err
    monkeypatch.setattr(rel, "installed_version", lambda: "1.2.1")
    assert rel.check_installed_version() == "1.2.1"


def test_this_machine_has_no_tensorrt_llm_and_the_build_says_where_to_run():
    if rel.installed_version() is None:      # the development machines: the stub cannot install
        with pytest.raises(BaylingError, match="run 'bayling build --target trtllm' inside"):
            rel.check_installed_version()
    else:                                    # inside the pinned container
        assert rel.check_installed_version() in rel.COMPATIBLE_VERSIONS


# ------------------------------------------------------------------------------ dry run

def fake_checkpoint(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from bayling import cli

    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_prints_the_table_and_the_commands_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tb, "detect_gpus", lambda: [])
    model = fake_checkpoint(tmp_path / "bayling-13b-v1.1", LLAMA_13B_CONFIG)
    out_dir = tmp_path / "engines" / "bayling-13b-sq"
    code, out, err = run_cli(["build", "--target", "trtllm", "--model", str(model), "--output", str(out_dir),
                              "--quant", "int8-sq", "--gpu-memory", "40GiB", "--dry-run"], capsys)
    assert code == 0, err
    assert "weights                         12.44 GiB per GPU" in out
    assert "KV cache per token              800 KiB" in out
    assert "loads the whole fp16 model (24.24 GiB) on GPU" in out
    commands = [line for line in out.splitlines() if line.startswith(("python3 ", "trtllm-build "))]
    assert len(commands) == 2
    import shlex
    convert, build = (shlex.split(c) for c in commands)
    check_argv(convert[2:], CONVERT_CHECKPOINT_OPTIONS)
    check_argv(build[1:], TRTLLM_BUILD_OPTIONS)
    assert "--per_channel" in convert and "--per_token" in convert
    assert "render 60 calibration conversations" in out and "bayling template" in out
    assert not out_dir.exists()


def test_dry_run_refuses_what_does_not_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tb, "detect_gpus", lambda: [])
    model = fake_checkpoint(tmp_path / "bayling-13b-v1.1", LLAMA_13B_CONFIG)
    code, out, err = run_cli(["build", "--target", "trtllm", "--model", str(model), "--output", str(tmp_path / "e"),
                              "--quant", "fp16", "--gpu-memory", "16GiB", "--dry-run"], capsys)
    assert code == 1
    assert "does not fit in 16.00 GiB" in err and "24.24 GiB" in err


def test_dry_run_without_a_gpu_needs_its_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "detect_gpus", lambda: [])
    model = fake_checkpoint(tmp_path / "m", LLAMA_7B_CONFIG)
    with pytest.raises(BaylingError, match="--gpu-memory"):
        tb.run_trtllm_build(tb.TrtllmBuild(model, tmp_path / "out", dry_run=True))


def test_dry_run_plans_for_the_gpu_nvidia_smi_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tb, "detect_gpus", lambda: [("NVIDIA L4", 23034 * gp.MiB)])
    model = fake_checkpoint(tmp_path / "bayling-7b", LLAMA_7B_CONFIG)
    record = tb.run_trtllm_build(tb.TrtllmBuild(model, tmp_path / "out", dry_run=True))
    assert record["plan"]["gpu_memory"] == 23034 * gp.MiB
    assert "22.49 GiB per GPU" in capsys.readouterr().out


def test_add_trtllm_arguments_leaves_an_existing_max_context_alone():
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-context", type=int)
    tb.add_trtllm_arguments(parser.add_argument_group("trtllm"))      # no argparse conflict
    args = parser.parse_args(["--max-context", "1024", "--quant", "int8-sq", "--kv-cache", "int8", "--tp", "2"])
    assert (args.max_context, args.quant, args.kv_cache, args.tp) == (1024, "int8-sq", "int8", 2)


def bayling_build_args(argv: list[str]) -> argparse.Namespace:
    """`argv` parsed by the real `bayling build` parser."""
    from bayling.build_engine import build

    parser = argparse.ArgumentParser()
    build.add_arguments(parser)
    return parser.parse_args(argv)


def test_the_parser_defaults_are_the_dataclass_defaults(tmp_path):
    parser = argparse.ArgumentParser()
    tb.add_trtllm_arguments(parser)
    parsed = vars(parser.parse_args([]))
    defaults = tb.TrtllmOptions()
    flagged = {"quant", "kv_cache", "tp", "smoothquant_alpha", "calib_max_seq_length", "convert_script"}
    assert flagged <= set(parsed)
    assert {k: parsed[k] for k in flagged} == {k: getattr(defaults, k) for k in flagged}
    # and through the whole `bayling build` parser: no option given is the dataclasses' defaults
    model, out = tmp_path / "m", tmp_path / "out"
    args = bayling_build_args(["--target", "trtllm", "--model", str(model), "--output", str(out)])
    built = tb.trtllm_build_from_args(args, model_dir=args.model, output=args.output, name=args.name)
    assert built == tb.TrtllmBuild(model, out) and built.options == defaults


def test_the_cli_arguments_become_the_build(tmp_path):
    args = bayling_build_args(["--target", "trtllm", "--model", str(tmp_path), "--output", str(tmp_path / "out"),
                               "--name", "BayLing-7B", "--template", "bayling", "--max-context", "1024", "--force",
                               "--quant", "int8-sq", "--kv-cache", "int8", "--tp", "2", "--smoothquant-alpha", "0.8",
                               "--calib-max-seq-length", "256", "--convert-script", "/x/convert_checkpoint.py",
                               "--calib-prompts", "p.jsonl", "--gpu-memory", "24GiB", "--dry-run", "--force-version"])
    built = tb.trtllm_build_from_args(args, model_dir=args.model, output=args.output, name=args.name)
    assert built == tb.TrtllmBuild(
        tmp_path, tmp_path / "out", name="BayLing-7B", max_context=1024, template_choice="bayling",
        calib_prompts=Path("p.jsonl"), gpu_memory=24 * gp.GiB, dry_run=True, force=True, force_version=True,
        options=tb.TrtllmOptions(quant="int8-sq", kv_cache="int8", tp=2, smoothquant_alpha=0.8,
                                 calib_max_seq_length=256, convert_script="/x/convert_checkpoint.py"))


def test_the_converter_defaults_to_the_one_found_here(tmp_path, monkeypatch):
    monkeypatch.delenv("TRTLLM_EXAMPLES_DIR", raising=False)
    if not any(Path(c).is_file() for c in rel.CONVERT_SCRIPT_CANDIDATES):
        assert tb.TrtllmOptions().convert_script == rel.CONVERT_SCRIPT_CANDIDATES[0]
    script = tmp_path / "models" / "core" / "llama" / "convert_checkpoint.py"
    script.parent.mkdir(parents=True)
    script.write_text("", encoding="utf-8")
    monkeypatch.setenv("TRTLLM_EXAMPLES_DIR", str(tmp_path))
    assert tb.TrtllmOptions().convert_script == str(script)
    parser = argparse.ArgumentParser()
    tb.add_trtllm_arguments(parser)
    assert parser.parse_args([]).convert_script == str(script)


# ------------------------------------------------------------------------------ the GPU config

def gpu_values(plan: gp.GpuPlan) -> dict[str, str]:
    values = plan.triton_parameters()
    values.update(io=contract.io_blocks("tensorrt_llm"), engine_path="/engines/bayling-7b/trtllm",
                  decoupled="true")     # the renderer adds the last three (RenderOptions.decoupled)
    return values


def parse(text: str) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig()
    text_format.Parse(text, config)
    return config


def test_gpu_config_renders_and_parses_as_a_triton_model_config():
    source = GPU_TEMPLATE.read_text(encoding="utf-8")
    plan = gp.plan(gp.LLAMA_7B, "int8-wo", "fp16", 1, 24 * gp.GiB)
    assert set(string.Template(source).get_identifiers()) == set(gpu_values(plan))   # the plan feeds them all
    text = string.Template(source).substitute(gpu_values(plan))
    assert "${" not in text
    config = parse(text)
    assert config.name == "tensorrt_llm" and config.backend == "tensorrtllm"
    assert config.max_batch_size == plan.max_batch_size
    assert config.model_transaction_policy.decoupled
    assert config.HasField("dynamic_batching")
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert set(params) <= BACKEND_PARAMETER_KEYS
    assert REQUIRED_PARAMETERS <= set(params)                     # the 1.2 backend fails to load without them
    assert all(params[k] for k in (set(params) - REQUIRED_PARAMETERS) | {"gpt_model_type"})
    assert not any(params[k] for k in ("guided_decoding_backend", "tokenizer_dir", "xgrammar_tokenizer_info_path"))
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["gpt_model_path"] == "/engines/bayling-7b/trtllm"
    assert params["exclude_input_in_output"] == "true"
    assert params["enable_kv_cache_reuse"] == "true"
    assert params["batch_scheduler_policy"] in ("max_utilization", "guaranteed_no_evict")
    assert 0 < float(params["kv_cache_free_gpu_mem_fraction"]) < 1
    assert int(params["max_tokens_in_paged_kv_cache"]) == plan.max_tokens_in_paged_kv_cache
    assert int(params["max_beam_width"]) == 1
    for key in BOOL_PARAMETERS & set(params):
        assert params[key] in ("true", "false")                  # what GetParameter<bool> accepts


def test_int8_kv_engine_config_turns_kv_cache_reuse_off():
    plan = gp.plan(gp.LLAMA_7B, "int8-wo", "int8", 1, 24 * gp.GiB)
    params = parse(string.Template(GPU_TEMPLATE.read_text(encoding="utf-8")).substitute(gpu_values(plan))).parameters
    assert params["enable_kv_cache_reuse"].string_value == "false"
    assert params["enable_chunked_context"].string_value == "false"


def test_gpu_and_cpu_engine_models_declare_the_same_tensors():
    plan = gp.plan(gp.LLAMA_7B, "int8-wo", "fp16", 1, 24 * gp.GiB)
    gpu = parse(string.Template(GPU_TEMPLATE.read_text(encoding="utf-8")).substitute(gpu_values(plan)))
    cpu_text = string.Template(CPU_TEMPLATE.read_text(encoding="utf-8")).substitute(
        max_batch_size="16", io=contract.io_blocks("tensorrt_llm"), engine_dir="/engines/x", cpu_threads="0",
        one_token_per_response="false", decoupled="true", engine_lanes="1", join_lanes="1",
        max_context="2048")
    cpu = parse(cpu_text)

    def tensors(items):
        return [(t.name, t.data_type, list(t.dims), list(t.reshape.shape) if t.HasField("reshape") else None,
                 getattr(t, "optional", False)) for t in items]

    assert tensors(gpu.input) == tensors(cpu.input) and len(gpu.input) == len(contract.ENGINE_INPUTS)
    assert tensors(gpu.output) == tensors(cpu.output) and len(gpu.output) == len(contract.ENGINE_OUTPUTS)
    assert gpu.model_transaction_policy.decoupled == cpu.model_transaction_policy.decoupled


def test_the_build_record_feeds_the_manifest_and_the_config(tmp_path):
    plan, convert, build = commands_for("int8-sq", "fp16", 1, tmp_path, gpu=24 * gp.GiB)
    opts = tb.TrtllmOptions(quant="int8-sq")
    record = tb.build_record(opts, plan, [convert, build], calibration_for(plan, tmp_path), "auto")
    json.dumps(record)
    assert record["target"] == "trtllm" and record["quantization"] == "int8-sq"
    assert record["trtllm"]["version"] == rel.TRTLLM_VERSION and record["trtllm"]["smoothquant_alpha"] == 0.5
    assert record["trtllm"]["max_num_tokens"] == plan.max_num_tokens
    assert record["calibration"]["samples"] == 60
    assert all(isinstance(v, str) for v in record["triton"].values())
    identifiers = set(string.Template(GPU_TEMPLATE.read_text(encoding="utf-8")).get_identifiers())
    assert identifiers - set(record["triton"]) == {"io", "engine_path", "decoupled"}   # the renderer adds those


# ------------------------------------------------------------------------------ end to end, stand-ins

FAKE_CONVERT = r'''
import argparse, json, os, sys
p = argparse.ArgumentParser()
for o in ("--model_dir", "--output_dir", "--dtype", "--tp_size", "--weight_only_precision", "--smoothquant",
          "--calib_dataset", "--calib_size", "--calib_max_seq_length"):
    p.add_argument(o)
for f in ("--use_weight_only", "--per_channel", "--per_token", "--int8_kv_cache", "--load_model_on_cpu"):
    p.add_argument(f, action="store_true")
a = p.parse_args()
if a.calib_dataset:  # what load_calib_dataset would read: <dir>/train.jsonl, field "text"
    rows = [json.loads(l)["text"] for l in open(os.path.join(a.calib_dataset, "train.jsonl"), encoding="utf-8")]
    assert len(rows) >= int(a.calib_size), "calib_size larger than the set"
os.makedirs(a.output_dir, exist_ok=True)
json.dump({"quantization": {"quant_algo": "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN" if a.smoothquant else "W8A16"}},
          open(os.path.join(a.output_dir, "config.json"), "w"))
open(os.path.join(a.output_dir, "rank0.safetensors"), "wb").write(b"0")
print("Total time of converting checkpoints: 00:00:01")
'''

FAKE_TRTLLM_BUILD = r'''#!PYTHON
import argparse, json, os
p = argparse.ArgumentParser()
p.add_argument("--checkpoint_dir"); p.add_argument("--output_dir"); p.add_argument("--workers", default="1")
a, rest = p.parse_known_args()
assert os.path.isfile(os.path.join(a.checkpoint_dir, "config.json"))
os.makedirs(a.output_dir, exist_ok=True)
json.dump({"build_config": dict(zip(rest[::2], rest[1::2]))}, open(os.path.join(a.output_dir, "config.json"), "w"))
for r in range(int(a.workers)):
    open(os.path.join(a.output_dir, f"rank{r}.engine"), "wb").write(b"engine")
print("[TRT-LLM] [I] Total time of building all engines: 00:00:02")
'''


def tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate("hello world ###".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)


def test_a_build_with_stand_ins_for_tensorrt_llm_writes_a_complete_engine_folder(tmp_path, monkeypatch):
    """Everything `bayling build --target trtllm` does besides TensorRT-LLM's own work: the
    calibration set on disk, both commands run in order, engine files checked, tokenizer,
    chat template and manifest written, the work folder removed."""
    from bayling.manifest import read_manifest

    model = fake_checkpoint(tmp_path / "bayling-7b", dict(LLAMA_7B_CONFIG, _name_or_path="ICTNLP/bayling-7b"))
    (model / "model.safetensors").write_bytes(b"weights")
    tiny_tokenizer(model)
    convert = tmp_path / "convert_checkpoint.py"
    convert.write_text(FAKE_CONVERT, encoding="utf-8")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_build = bin_dir / "trtllm-build"
    fake_build.write_text(FAKE_TRTLLM_BUILD.replace("PYTHON", sys.executable), encoding="utf-8")
    fake_build.chmod(fake_build.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(rel, "installed_version", lambda: "1.2.1")
    monkeypatch.setattr(tb, "detect_gpus", lambda: [("NVIDIA A100-SXM4-40GB", 40 * gp.GiB)])
    monkeypatch.setattr(tb.TrtllmOptions, "python", sys.executable)

    out = tmp_path / "engines" / "bayling-7b-sq"
    args = bayling_build_args(["--target", "trtllm", "--model", str(model), "--output", str(out), "--name", "BayLing-7B",
                               "--quant", "int8-sq", "--convert-script", str(convert)])
    record = tb.run_trtllm_build(tb.trtllm_build_from_args(args, model_dir=args.model, output=args.output,
                                                           name=args.name))

    assert sorted(p.name for p in (out / "trtllm").iterdir()) == ["config.json", "rank0.engine"]
    assert not (out / tb.WORK_DIR).exists()                              # checkpoint and calibration set removed
    manifest = read_manifest(out)
    assert manifest.engine == "tensorrt_llm" and manifest.template == "bayling" and manifest.max_context == 2048
    assert manifest.build == json.loads(json.dumps(record))
    assert manifest.build["calibration"]["samples"] == 60
    assert manifest.versions["tensorrt_llm"] == "1.2.1" and manifest.versions["gpu"] == "NVIDIA A100-SXM4-40GB"
    assert (out / "chat_template.jinja").read_text(encoding="utf-8").startswith("{#- BayLing template")
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()
    built_with = json.loads((out / "trtllm" / "config.json").read_text())["build_config"]
    assert built_with["--max_batch_size"] == str(record["plan"]["max_batch_size"])
    assert built_with["--use_paged_context_fmha"] == "enable"


def test_a_failing_step_leaves_no_engine_folder(tmp_path, monkeypatch):
    model = fake_checkpoint(tmp_path / "bayling-7b", LLAMA_7B_CONFIG)
    (model / "model.safetensors").write_bytes(b"weights")
    tiny_tokenizer(model)
    convert = tmp_path / "convert_checkpoint.py"
    convert.write_text("import sys; print('CUDA error: out of memory'); sys.exit(3)\n", encoding="utf-8")
    monkeypatch.setattr(rel, "installed_version", lambda: "1.2.1")
    monkeypatch.setattr(tb, "detect_gpus", lambda: [("NVIDIA L4", 24 * gp.GiB)])
    monkeypatch.setattr(tb.TrtllmOptions, "python", sys.executable)
    out = tmp_path / "engines" / "e"
    build = tb.TrtllmBuild(model, out, options=tb.TrtllmOptions(convert_script=str(convert)))
    with pytest.raises(BaylingError, match="checkpoint conversion failed .exit 3.: CUDA error: out of memory"):
        tb.run_trtllm_build(build)
    assert not out.exists() and list((tmp_path / "engines").iterdir()) == []


def test_a_real_build_here_refuses_before_touching_the_output(tmp_path, monkeypatch):
    monkeypatch.setattr(rel, "installed_version", lambda: None)
    monkeypatch.setattr(tb, "detect_gpus", lambda: [])
    model = fake_checkpoint(tmp_path / "bayling-7b", LLAMA_7B_CONFIG)
    with pytest.raises(BaylingError, match="not installed here"):
        tb.run_trtllm_build(tb.TrtllmBuild(model, tmp_path / "out", gpu_memory=24 * gp.GiB))
    assert not (tmp_path / "out").exists()


def test_a_model_that_is_not_bayling_calibrates_with_its_own_chat_template(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tb, "detect_gpus", lambda: [])
    model = fake_checkpoint(tmp_path / "llama-2-7b-chat", LLAMA_7B_CONFIG)
    build = tb.TrtllmBuild(model, tmp_path / "out", gpu_memory=24 * gp.GiB, dry_run=True,
                           options=tb.TrtllmOptions(quant="int8-sq"))
    with pytest.raises(BaylingError, match="no chat_template"):
        tb.run_trtllm_build(build)
    (model / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}",
                                               encoding="utf-8")
    record = tb.run_trtllm_build(build)
    assert record["calibration"]["template"] == "hf"
    assert "through the hf template" in capsys.readouterr().out
    calib = tb.render_calibration_set(tb.default_calib_prompts(), tb._resolve_template("auto", model, LLAMA_7B_CONFIG, "x"),
                                      tmp_path / "calib")
    first = json.loads((calib.path / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])["text"]
    assert first.startswith("[user] Provide the Chinese translation") and "[assistant] 今天天气很好" in first


# ------------------------------------------------------------------ the 1.2 backend's tensors

def test_the_1_2_backend_reads_every_engine_tensor_this_project_sends():
    """TensorRT-LLM 1.x's C++ backend reads `min_tokens` and `seed` where 0.17 read `min_length` and
    `random_seed` (triton_backend/inflight_batcher_llm/src/utils.h InputFieldsNames). The contract
    declares both names on the engine (the CPU and LLM API engines read either) and the `bayling` model
    sends the 1.x ones, so min_length and random_seed reach the GPU engine."""
    declared = {t.name for t in contract.ENGINE_INPUTS}
    read = set(OPTIONS["backend_input_tensors"])
    renames = OPTIONS["backend_tensor_renames_since_0_17"]
    assert renames == contract.RENAMED_IN_1_X and set(renames.values()) <= declared & read
    sent = {contract.PUBLIC_TO_ENGINE[p] for p in ("max_tokens", "end_id", "pad_id", "top_k", "top_p", "temperature",
                                                   "repetition_penalty", "presence_penalty", "frequency_penalty",
                                                   "min_length", "random_seed", "beam_width", "return_log_probs",
                                                   "stream", "exclude_input_in_output", "num_return_sequences",
                                                   "return_generation_logits")}
    sent |= {"input_ids", "input_lengths", "stop_words_list", "bad_words_list", "embedding_bias", "stop"}
    assert sent <= declared and sent <= read, sorted(sent - read)
    assert {t.name for t in contract.ENGINE_OUTPUTS} <= set(OPTIONS["backend_output_tensors"])