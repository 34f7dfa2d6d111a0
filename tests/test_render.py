"""The rendered model repository: every config parses with Triton's ModelConfig protobuf, no
placeholder survives, I/O comes from the contract, and the CPU and GPU engine models agree."""

import dataclasses
import shutil

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from bayling import contract
from bayling.errors import BaylingError
from bayling.manifest import read_manifest, write_manifest
from bayling.model_repository.render import MODELS, check_config, render_repository
from tests.conftest import bayling_cli


def parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def io_signature(config):
    return ([(i.name, i.data_type, list(i.dims), i.optional) for i in config.input],
            [(o.name, o.data_type, list(o.dims)) for o in config.output])


@pytest.fixture(scope="module")
def gpu_engine(default_engine, tmp_path_factory):
    """An engine folder whose manifest says TensorRT-LLM, with the planner's serving values."""
    engine = tmp_path_factory.mktemp("gpu") / "engine"
    shutil.copytree(default_engine / "tokenizer", engine / "tokenizer")
    shutil.copy(default_engine / "chat_template.jinja", engine)
    manifest = dataclasses.replace(read_manifest(default_engine), engine="tensorrt_llm", build={"triton": {
        "max_batch_size": 64, "max_beam_width": 1, "kv_cache_free_gpu_mem_fraction": 0.9,
        "max_tokens_in_paged_kv_cache": 65536, "enable_kv_cache_reuse": "true", "enable_chunked_context": "true",
        "batch_scheduler_policy": "max_utilization"}})
    write_manifest(engine, manifest)
    return engine


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_every_config_parses_with_no_placeholder_left(variant, default_engine, gpu_engine, tmp_path):
    repo = render_repository(default_engine if variant == "cpu" else gpu_engine, tmp_path / "repo")
    for model in MODELS:
        text = (repo / model / "config.pbtxt").read_text()
        assert "${" not in text
        config = parse(repo / model / "config.pbtxt")
        assert config.name == model
        inputs, outputs = contract.MODELS[model]
        assert [i.name for i in config.input] == [t.name for t in inputs]
        assert [o.name for o in config.output] == [t.name for t in outputs]
    engine = parse(repo / "tensorrt_llm" / "config.pbtxt")
    assert engine.backend == ("python" if variant == "cpu" else "tensorrtllm")
    assert engine.model_transaction_policy.decoupled
    assert (repo / "tensorrt_llm" / "1" / "model.py").exists() == (variant == "cpu")


def test_cpu_and_gpu_engine_models_declare_the_same_tensors(default_engine, gpu_engine, tmp_path):
    cpu = parse(render_repository(default_engine, tmp_path / "cpu") / "tensorrt_llm" / "config.pbtxt")
    gpu = parse(render_repository(gpu_engine, tmp_path / "gpu") / "tensorrt_llm" / "config.pbtxt")
    assert io_signature(cpu) == io_signature(gpu)
    assert cpu.max_batch_size > 0 and gpu.max_batch_size == 64
    params = {k: v.string_value for k, v in gpu.parameters.items()}
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["exclude_input_in_output"] == "true"
    assert params["gpt_model_path"] == str(gpu_engine.resolve() / "trtllm")


def test_everything_but_the_engine_model_is_identical(default_engine, gpu_engine, tmp_path):
    """Apart from parameters (engine path, model description) and the batch size (the engine's), the
    other models are the same on CPU and GPU."""
    cpu = render_repository(default_engine, tmp_path / "cpu")
    gpu = render_repository(gpu_engine, tmp_path / "gpu")
    for model in ("preprocessing", "postprocessing", "ensemble", "bayling"):
        a, b = parse(cpu / model / "config.pbtxt"), parse(gpu / model / "config.pbtxt")
        for config in (a, b):
            config.ClearField("parameters")
            config.ClearField("max_batch_size")
        assert a == b, model
        assert (cpu / model / "1" / "model.py").exists() == (gpu / model / "1" / "model.py").exists()


def test_entry_model_tells_clients_about_the_model(default_engine, tmp_path):
    config = parse(render_repository(default_engine, tmp_path / "repo") / "bayling" / "config.pbtxt")
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["model_name"] == "SmolLM2-135M-Instruct"
    assert params["engine"] == "llamacpp" and params["template"] == "hf" and int(params["max_context"]) == 2048   # llama.cpp's slice per sequence


def test_ensemble_wires_preprocessing_engine_and_postprocessing(default_engine, tmp_path):
    config = parse(render_repository(default_engine, tmp_path / "repo") / "ensemble" / "config.pbtxt")
    steps = config.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["preprocessing", "tensorrt_llm", "postprocessing"]
    engine_inputs = {t.name for t in contract.ENGINE_INPUTS}
    assert set(steps[1].input_map) <= engine_inputs
    assert steps[1].input_map["streaming"] == "stream" and steps[2].output_map["OUTPUT"] == "text_output"


def test_check_config_refuses_leftovers_and_drift():
    with pytest.raises(BaylingError, match="placeholder"):
        check_config('name: "bayling"\nmax_batch_size: ${max_batch_size}', "bayling")
    with pytest.raises(BaylingError, match="does not parse"):
        check_config('name: "bayling"\nnot_a_field: 1', "bayling")
    with pytest.raises(BaylingError, match="inputs differ"):
        check_config('name: "bayling"\ninput [ { name: "x" data_type: TYPE_INT32 dims: [ 1 ] } ]', "bayling")


def test_a_failed_render_leaves_the_previous_repository(default_engine, tmp_path):
    repo = render_repository(default_engine, tmp_path / "repo")
    (tmp_path / "broken").mkdir()
    with pytest.raises(BaylingError):
        render_repository(tmp_path / "broken", tmp_path / "repo")  # no manifest
    assert (repo / "bayling" / "config.pbtxt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.rendering")]


def test_tensor_parallel_engines_use_the_orchestrator_mode(gpu_engine):
    from bayling.model_repository.serve import gpu_environment

    manifest = read_manifest(gpu_engine)
    assert gpu_environment(manifest) == {}
    assert gpu_environment(dataclasses.replace(manifest, build={**manifest.build, "tp": 2})) == {"TRTLLM_ORCHESTRATOR": "1"}


def test_cpu_threads_follow_the_engine_kind_and_size(default_engine, default_ct2_engine, tmp_path):
    from bayling.model_repository.render import RenderOptions

    def threads(engine, name, options=RenderOptions()):
        config = parse(render_repository(engine, tmp_path / name, options) / "tensorrt_llm" / "config.pbtxt")
        return config.parameters["intra_threads"].string_value

    assert threads(default_engine, "a") == "0"            # llama.cpp: one batch on every core
    assert threads(default_ct2_engine, "b") == "1"        # CTranslate2: the 135M default engine is small
    assert threads(default_ct2_engine, "c", RenderOptions(cpu_threads=0)) == "0"
    assert threads(default_engine, "d", RenderOptions(cpu_threads=1)) == "1"


def test_cpu_engine_lanes_follow_the_cores_and_the_engine_size(default_ct2_engine, tmp_path):
    from bayling.model_repository.render import RenderOptions, available_cores, engine_lanes_for

    config = parse(render_repository(default_ct2_engine, tmp_path / "a") / "tensorrt_llm" / "config.pbtxt")
    join = min(4, available_cores())
    assert (config.parameters["lanes"].string_value, config.parameters["join_lanes"].string_value) == \
        (str(2 * join), str(join))   # small: one batch per core, as many spare lanes
    manifest = read_manifest(default_ct2_engine)
    large = dataclasses.replace(manifest, sizes={"ctranslate2": 26 << 30})
    assert engine_lanes_for(large, RenderOptions(), 32) == (1, 1)
    assert engine_lanes_for(manifest, RenderOptions(engine_lanes=3), 16) == (3, 3)  # join lanes never exceed lanes
    config = parse(render_repository(default_ct2_engine, tmp_path / "b", RenderOptions(engine_lanes=1))
                   / "tensorrt_llm" / "config.pbtxt")
    assert config.parameters["lanes"].string_value == "1"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_decoupled_false_renders_nvidia_s_unary_deployment(variant, default_engine, gpu_engine, tmp_path):
    from bayling.model_repository.render import RenderOptions

    repo = render_repository(default_engine if variant == "cpu" else gpu_engine, tmp_path / "repo",
                             RenderOptions(decoupled=False))
    for model in ("tensorrt_llm", "tensorrt_llm_bls"):
        assert not parse(repo / model / "config.pbtxt").model_transaction_policy.decoupled
    assert parse(repo / "bayling" / "config.pbtxt").model_transaction_policy.decoupled   # ours streams still
    assert parse(repo / "bayling" / "config.pbtxt").parameters["engine_decoupled"].string_value == "false"
    assert (repo / "tensorrt_llm_bls" / "1" / "model.py").is_file()


def test_bayling_serve_decoupled_flag_takes_true_or_false_and_refuses_the_rest():
    from tests.conftest import bayling_cli

    assert "--decoupled {true,false}" in bayling_cli("serve", "--help").stdout
    bad = bayling_cli("render", "--engine", "x", "--output", "y", "--decoupled", "maybe", check=False)
    assert bad.returncode != 0
    assert "--decoupled: expected true or false, got 'maybe'" in bad.stderr.strip().splitlines()[-1]


def test_the_llama_cpp_context_is_each_sequence_s_slice_of_the_kv_cache(default_engine, default_ct2_engine, tmp_path):
    from bayling.model_repository.render import RenderOptions, served_context

    def context(engine, name, options):
        repo = render_repository(engine, tmp_path / name, options)
        served = {int(parse(repo / m / "config.pbtxt").parameters["max_context"].string_value)
                  for m in ("bayling", "tensorrt_llm", "tensorrt_llm_bls")
                  if "max_context" in parse(repo / m / "config.pbtxt").parameters}
        assert len(served) == 1, "the entry model and the engine agree on the context"
        return served.pop()

    assert context(default_engine, "a", RenderOptions()) == 2048                      # 16 slices of 2,048
    assert context(default_engine, "b", RenderOptions(max_batch_size=4, kv_cache_tokens=65536)) == 8192  # the model's
    assert context(default_engine, "c", RenderOptions(max_batch_size=8, kv_cache_tokens=8 * 1000)) == 1000
    manifest = read_manifest(default_ct2_engine)
    assert served_context(manifest, RenderOptions(kv_cache_tokens=1024)) == 8192      # CTranslate2: no slices
    refused = bayling_cli("render", "--engine", str(default_engine), "--output", str(tmp_path / "d"),
                          "--kv-cache-tokens", "0", check=False)
    assert refused.returncode == 1 and "--kv-cache-tokens must be at least 1" in refused.stderr
