"""The engine-free GPU target without a GPU: `bayling build --target trtllm-llmapi` quantizes the scripted
tiny LLaMA with the real Model Optimizer on the CPU; the LLM API engine runs the same contract tests
as the CPU engine (tests/test_engine_ct2.py) against a stand-in of TensorRT-LLM's LLM API that decodes
that exported checkpoint (tests/llmapi_standin.py); its Triton model is rendered, parses as a
ModelConfig and serves the whole stack (ensemble, `bayling` model) in a real tritonserver.

What does not run here: TensorRT-LLM itself (its LLM API, kernels and the W8A16/FP8 GEMMs on a GPU).
"""

from __future__ import annotations

import json
import os
import shutil
import string
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from bayling import contract
from bayling.build_engine import gpu_planner as gp
from bayling.build_engine import llmapi_build as lb
from bayling.build_engine.trtllm_release import release_options
from bayling.errors import BaylingError, InvalidInput
from bayling.manifest import ENGINE_SUBDIRS, read_manifest
from bayling.model_repository import engine_io
from tests.client_helpers import Collector
from tests.engine_checks import greedy, stream_behind_a_slow_first_send
from bayling.model_repository.engine_ct2 import EngineRequest
from bayling.model_repository.engine_llmapi import (LlmApiEngine, LlmApiSettings, load_llm, sampling_kwargs,
                                                    token_log_probs)
from tests.conftest import ROOT, SCRIPT_SHOWN, bayling_cli


API = release_options()["llm_api"]
STANDIN = "tests.llmapi_standin:LLM"


@pytest.fixture(scope="module")
def llmapi_engine_dir(tmp_path_factory, scripted_model_dir) -> Path:
    """`bayling build --target trtllm-llmapi` of the scripted model (real Model Optimizer, on the CPU)."""
    out = tmp_path_factory.mktemp("llmapi") / "tiny-bayling-w8a16"
    bayling_cli("build", "--target", "trtllm-llmapi", "--model", str(scripted_model_dir), "--output", str(out),
                "--gpu-memory", "16GiB")
    return out


@pytest.fixture(scope="module")
def standin_engine_dir(llmapi_engine_dir, tmp_path_factory) -> Path:
    """The same engine folder, its LLM class set to the stand-in (what llm_api.json's factory is for)."""
    out = tmp_path_factory.mktemp("llmapi-standin") / llmapi_engine_dir.name
    shutil.copytree(llmapi_engine_dir, out)
    settings_file = out / ENGINE_SUBDIRS["tensorrt_llm_llmapi"] / "llm_api.json"
    settings = json.loads(settings_file.read_text(encoding="utf-8"))
    settings_file.write_text(json.dumps({**settings, "factory": STANDIN}), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def engine(standin_engine_dir):
    manifest = read_manifest(standin_engine_dir)
    checkpoint = standin_engine_dir / ENGINE_SUBDIRS["tensorrt_llm_llmapi"]
    llm, sampling_params = load_llm(checkpoint, LlmApiSettings.read(checkpoint))
    e = LlmApiEngine(llm, sampling_params, vocab_size=manifest.vocab_size, default_end_id=manifest.eos_id)
    yield e
    e.shutdown()


# ------------------------------------------------------------------------------- the build

def test_the_build_writes_a_model_optimizer_w8a16_checkpoint_and_the_planned_settings(llmapi_engine_dir,
                                                                                      scripted_model_dir):
    from safetensors import safe_open

    manifest = read_manifest(llmapi_engine_dir)
    assert manifest.engine == "tensorrt_llm_llmapi" and manifest.template == "bayling"
    checkpoint = llmapi_engine_dir / "llmapi"
    quant = json.loads((checkpoint / "hf_quant_config.json").read_text(encoding="utf-8"))
    assert quant["producer"]["name"] == "modelopt" and quant["quantization"]["quant_algo"] == "W8A16"
    assert manifest.build["modelopt"]["config"] == "INT8_WEIGHT_ONLY_CFG"
    assert manifest.build["modelopt"]["version"] == quant["producer"]["version"]
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        scale = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
        embed = f.get_tensor("model.embed_tokens.weight")
    assert str(q.dtype) == "torch.int8" and scale.shape == (q.shape[0],)      # one scale per output channel
    assert str(embed.dtype) != "torch.int8" and "lm_head.weight_scale" not in names
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    layers = json.loads((scripted_model_dir / "config.json").read_text())["num_hidden_layers"]
    assert {f"model.layers.{i}.{'mlp' if p.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{p}"
            f".weight_scale" for i in range(layers) for p in projections} <= names
    # the LLM API settings are the planner's, for 16 GiB
    shape = gp.ModelShape.from_config_file(scripted_model_dir / "config.json", "x")
    plan = gp.plan(shape, "int8-wo", "fp16", 1, 16 * gp.GiB)
    settings = json.loads((checkpoint / "llm_api.json").read_text(encoding="utf-8"))
    assert settings["max_batch_size"] == plan.max_batch_size and settings["max_num_tokens"] == plan.max_num_tokens
    assert settings["kv_cache_config"] == {"free_gpu_memory_fraction": round(plan.kv_cache_free_gpu_mem_fraction, 2),
                                           "max_tokens": plan.max_tokens_in_paged_kv_cache, "enable_block_reuse": True}
    assert manifest.build["llm_api"] == settings and settings["factory"] == "tensorrt_llm:LLM"
    assert manifest.build["calibration"] is None             # weight-only: scales from the weights themselves
    assert (llmapi_engine_dir / "tokenizer" / "tokenizer_config.json").is_file()


def test_the_w8a16_weights_are_the_originals_to_within_half_a_step(llmapi_engine_dir, scripted_model_dir):
    """No calibration for weight-only: each output channel's scale is its largest |weight| / 127, so
    dequantized weights are the source's to within half a step (rounding)."""
    import torch
    from safetensors.torch import load_file

    exported = load_file(str(llmapi_engine_dir / "llmapi" / "model.safetensors"))
    source = {}
    for path in scripted_model_dir.glob("*.safetensors"):
        source.update(load_file(str(path)))
    checked = 0
    for name, q in exported.items():
        if q.dtype != torch.int8:
            continue
        scale = exported[name + "_scale"].float()
        original = source[name].float()
        error = (q.float() * scale[:, None] - original).abs()
        assert torch.all(error <= scale[:, None] / 2 + 1e-6), name
        amax = original.abs().amax(dim=1)
        live = amax > 0                                       # the scripted model zeroes o_proj and down_proj
        assert torch.allclose(scale[live], amax[live] / 127, rtol=1e-3, atol=1e-8), name
        checked += int(live.any())
    assert checked == 5 * 2                                   # q, k, v, gate, up x 2 layers carry weights


def test_fp8_quantizes_and_exports_on_the_cpu_too(tmp_path, llama_tokenizer_dir):
    """FP8 (Hopper/Ada serving) is built the same way; Model Optimizer 0.47 exports it from a 16-bit
    model only, so the float32 tiny model is cast to float16 first."""
    from safetensors import safe_open
    from tests.models import save_random_llama

    model = save_random_llama(tmp_path / "tiny-llama", llama_tokenizer_dir)
    out = tmp_path / "fp8"
    bayling_cli("build", "--target", "trtllm-llmapi", "--quant", "fp8", "--model", str(model), "--output", str(out),
                "--gpu-memory", "80GiB", "--template", "bayling")
    quant = json.loads((out / "llmapi" / "hf_quant_config.json").read_text(encoding="utf-8"))["quantization"]
    assert quant["quant_algo"] == "FP8"
    with safe_open(str(out / "llmapi" / "model.safetensors"), "pt") as f:
        assert str(f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype) == "torch.float8_e4m3fn"
    build = read_manifest(out).build
    assert build["modelopt"]["config"] == "FP8_DEFAULT_CFG"
    assert build["calibration"]["samples"] == 60 and build["calibration"]["template"] == "bayling"


def test_the_llm_api_arguments_are_ones_the_pinned_release_defines(tmp_path):
    settings = lb.settings_for(gp.plan(gp.LLAMA_7B, "int8-wo", "fp16", 1, 16 * gp.GiB), lb.LlmapiOptions())
    kwargs = settings.llm_kwargs(tmp_path)
    assert set(kwargs) <= set(API["llm_args"])
    assert set(kwargs["kv_cache_config"]) <= set(API["kv_cache_config"])
    assert kwargs["backend"] == "pytorch" and kwargs["skip_tokenizer_init"] is True
    # 7B W8A16 on a 16 GiB GPU: the plan the INT8 TensorRT engine gets, applied at load time instead
    assert (kwargs["max_seq_len"], kwargs["max_batch_size"], kwargs["max_num_tokens"]) == (2048, 12, 8192)
    assert 0 < kwargs["kv_cache_config"]["free_gpu_memory_fraction"] < 1


def test_dry_run_prints_the_recipe_and_the_settings_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from bayling import cli
    from bayling.build_engine import trtllm_build as tb
    from tests.test_trtllm_build import LLAMA_13B_CONFIG, fake_checkpoint

    monkeypatch.setattr(tb, "detect_gpus", lambda: [])
    model = fake_checkpoint(tmp_path / "bayling-13b-v1.1", LLAMA_13B_CONFIG)
    out = tmp_path / "engines" / "e"
    assert cli.main(["build", "--target", "trtllm-llmapi", "--model", str(model), "--output", str(out),
                     "--quant", "fp8", "--gpu-memory", "80GiB", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "modelopt.torch.quantization.FP8_DEFAULT_CFG" in printed and "quant_algo FP8" in printed
    assert "Hopper" in printed and '"free_gpu_memory_fraction"' in printed
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--quant", "int8-sq"], "not for --target trtllm-llmapi"),
    (["--quant", "fp16"], "not for --target trtllm-llmapi"),
    (["--kv-cache", "int8"], "no INT8 KV cache"),
])
def test_what_the_llm_api_target_cannot_build_is_refused_by_name(tmp_path, capsys, argv, message):
    from bayling import cli
    from tests.test_trtllm_build import LLAMA_7B_CONFIG, fake_checkpoint

    model = fake_checkpoint(tmp_path / "m", LLAMA_7B_CONFIG)
    code = cli.main(["build", "--target", "trtllm-llmapi", "--model", str(model), "--output", str(tmp_path / "o"),
                     "--gpu-memory", "24GiB", "--dry-run", *argv])
    assert code == 1 and message in capsys.readouterr().err


def test_fp8_is_refused_by_the_tensorrt_engine_target():
    from bayling.build_engine.trtllm_build import TrtllmOptions

    with pytest.raises(BaylingError, match="fp8 is for --target trtllm-llmapi"):
        TrtllmOptions(quant="fp8")


# ------------------------------------------------------------------------ sampling parameters

def test_requests_become_documented_sampling_params():
    documented = set(API["sampling_params"])
    cases = [greedy([5, 6]), greedy([5, 6], end_id=-1), greedy([5, 6], bad_words=[[7], [9]], min_length=2),
             EngineRequest("", [5], 8, end_id=2, temperature=0.7, top_k=40, top_p=0.9, random_seed=7,
                           repetition_penalty=1.2, return_log_probs=True)]
    for request in cases:
        assert set(sampling_kwargs(request, default_end_id=2)) <= documented
    assert sampling_kwargs(cases[0], 2) == {"max_tokens": 64, "detokenize": False, "end_id": 2, "top_k": 1}
    assert sampling_kwargs(cases[1], 2)["ignore_eos"] is True                  # end_id -1: TensorRT-LLM's "no end id"
    assert sampling_kwargs(cases[2], 2)["bad_token_ids"] == [7, 9] and sampling_kwargs(cases[2], 2)["min_tokens"] == 2
    sampled = sampling_kwargs(cases[3], 2)
    assert (sampled["temperature"], sampled["top_k"], sampled["top_p"], sampled["seed"]) == (0.7, 40, 0.9, 7)
    assert sampled["repetition_penalty"] == 1.2 and sampled["logprobs"] == 1
    penalised = EngineRequest("", [5], 8, presence_penalty=0.5, frequency_penalty=-0.25)
    assert {k: sampling_kwargs(penalised, 2)[k] for k in ("presence_penalty", "frequency_penalty")} == \
        {"presence_penalty": 0.5, "frequency_penalty": -0.25}
    for attribute, value, field in (("beam_width", 2, "beam_width"), ("length_penalty", 0.5, "len_penalty"),
                                    ("return_generation_logits", True, "return_generation_logits")):
        refused = EngineRequest("", [5], 8)
        setattr(refused, attribute, value)          # what engine_io.engine_request reads from those tensors
        with pytest.raises(InvalidInput, match=field):
            sampling_kwargs(refused, 2)
    # top_p 0 (greedy in TensorRT-LLM's backend tensors) is never passed: the LLM API refuses it
    assert "top_p" not in sampling_kwargs(EngineRequest("", [5], 8, top_k=0, top_p=0.0), 2)


def test_several_prompts_or_sequences_in_one_request_are_refused_by_name():
    import numpy as np
    from bayling.model_repository.engine_llmapi import refuse_batched

    refuse_batched({"input_ids": np.array([[5, 6]], np.int32), "num_return_sequences": np.array([[1]], np.int32)})
    with pytest.raises(InvalidInput, match="input_ids"):
        refuse_batched({"input_ids": np.array([[5, 6], [7, 8]], np.int32)})
    with pytest.raises(InvalidInput, match="num_return_sequences"):
        refuse_batched({"input_ids": np.array([[5, 6]], np.int32), "num_return_sequences": np.array([[2]], np.int32)})


def test_log_probs_are_read_in_both_documented_shapes():
    class Completion:
        token_ids = [4, 5]
        logprobs = [-0.5, {5: type("Logprob", (), {"logprob": -1.25})(), 9: -3.0}]

    assert token_log_probs(Completion(), 0, 2) == [-0.5, -1.25]


# ------------------------------------------------------------------- the engine, as the CPU one

def test_greedy_follows_the_script_and_ends_at_end_id(engine, prompt_and_script):
    prompt, script = prompt_and_script
    out = Collector()
    engine.submit(greedy(prompt), out)
    out.wait()
    assert out.tokens == script            # the quantized checkpoint still says it; EOS is not in the output
    assert len(out.emissions) == 1 and out.emissions[0].final


def test_streaming_sends_tokens_as_they_are_made(engine, prompt_and_script):
    prompt, script = prompt_and_script
    out = Collector()
    engine.submit(greedy(prompt, streaming=True), out)
    out.wait()
    assert out.tokens == script
    assert len(out.emissions) > 1 and [e.final for e in out.emissions] == [False] * (len(out.emissions) - 1) + [True]


def test_max_new_tokens_and_stop_words(engine, prompt_and_script):
    prompt, script = prompt_and_script
    short, stopped = Collector(), Collector()
    engine.submit(greedy(prompt, max_new_tokens=3), short)
    engine.submit(greedy(prompt, stop_words=[script[4:6]]), stopped)
    assert short.wait().tokens == script[:3]
    assert stopped.wait().tokens == script[:6]    # ends on the stop word (of two tokens), which is included


def test_end_id_minus_one_goes_past_the_end_token(engine, prompt_and_script):
    prompt, script = prompt_and_script
    out = Collector()
    engine.submit(greedy(prompt, end_id=-1, max_new_tokens=len(script) + 4), out)
    tokens = out.wait().tokens
    assert len(tokens) == len(script) + 4 and tokens[:len(script)] == script


def test_concurrent_requests_stay_separate(engine, prompt_and_script):
    prompt, script = prompt_and_script
    outs = [Collector() for _ in range(6)]
    for i, out in enumerate(outs):
        engine.submit(greedy(prompt, max_new_tokens=2 + i), out)
    for i, out in enumerate(outs):
        assert out.wait().tokens == script[:2 + i]


def test_cancellation_and_stop_request_end_generation(engine, prompt_and_script):
    prompt, script = prompt_and_script
    aborted = engine.llm.aborted
    cancelled, stopped = Collector(), Collector()
    engine.submit(greedy(prompt, end_id=-1, max_new_tokens=200), cancelled, is_cancelled=lambda: True)
    engine.submit(greedy(prompt, request_id="r-1", end_id=-1, max_new_tokens=200, streaming=True), stopped)
    engine.stop("r-1")
    assert len(cancelled.wait().tokens) < 200
    assert len(stopped.wait().tokens) < 200 and stopped.emissions[-1].final
    deadline = time.monotonic() + 10
    while engine.llm.aborted < aborted + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.llm.aborted == aborted + 2            # the LLM API's requests were aborted, not left running


def test_active_and_scheduled_requests_are_counted_as_the_cpp_backend_reports_them(engine, prompt_and_script):
    prompt, _ = prompt_and_script
    out, first = Collector(), threading.Event()

    def held(emission):          # the client is slow: the request stays in the engine meanwhile
        first.wait(10)
        out(emission)

    engine.submit(greedy(prompt, end_id=-1, max_new_tokens=40, streaming=True), held)
    deadline = time.monotonic() + 10
    while engine.scheduled < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.active >= 1 and engine.scheduled >= 1 and engine.kv_tokens >= len(prompt) + 1
    first.set()
    out.wait()
    deadline = time.monotonic() + 10
    while (engine.active, engine.scheduled, engine.kv_tokens) != (0, 0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (engine.active, engine.scheduled, engine.kv_tokens) == (0, 0, 0)


def test_a_slow_client_gets_the_tokens_made_meanwhile_in_one_response(engine, prompt_and_script):
    prompt, script = prompt_and_script
    out = stream_behind_a_slow_first_send(engine, prompt, pause_s=1.0)
    assert out.tokens == script
    assert len(out.emissions) < len(script)


@pytest.mark.parametrize("request_, field", [
    (greedy([1, 10**6]), "input_ids"), (greedy([]), "input_ids"), (greedy([5], max_new_tokens=0), "request_output_len"),
    (greedy([5], end_id=10**6), "end_id"), (greedy([5], stop_words=[[10**6]]), "stop_words_list"),
    (greedy([5], bad_words=[[5, 6]]), "bad_words_list"),
])
def test_invalid_requests_are_refused_naming_the_tensor(engine, request_, field):
    with pytest.raises(InvalidInput, match=field):
        engine.submit(request_, Collector())


def test_the_triton_tensors_become_the_same_request_as_on_the_cpu_engine(engine, prompt_and_script):
    """engine_io (the CPU model's tensor reading) feeds this engine unchanged."""
    import numpy as np

    prompt, script = prompt_and_script
    inputs = {"input_ids": np.array([prompt], dtype=np.int32), "input_lengths": np.array([[len(prompt)]], np.int32),
              "request_output_len": np.array([[5]], np.int32), "end_id": np.array([[2]], np.int32),
              "runtime_top_k": np.array([[1]], np.int32), "streaming": np.array([[True]])}
    request, include_input = engine_io.engine_request(inputs, "t-1")
    out = Collector()
    engine.submit(request, out)
    out.wait()
    assert out.tokens == script[:5] and not include_input
    merged = engine_io.engine_outputs(type(out.emissions[-1])(out.tokens, [0.0] * 5, True))
    assert merged["output_ids"].shape == (1, 1, 5) and merged["sequence_length"].tolist() == [[5]]


# ------------------------------------------------------------------------ the Triton model

def test_the_rendered_llmapi_model_parses_and_declares_the_engine_contract(llmapi_engine_dir, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    from bayling.model_repository.render import render_repository

    repo = render_repository(llmapi_engine_dir, tmp_path / "repo")
    config = model_config_pb2.ModelConfig()
    text_format.Parse((repo / "tensorrt_llm" / "config.pbtxt").read_text(encoding="utf-8"), config)
    assert config.backend == "python" and config.name == "tensorrt_llm"
    assert config.max_batch_size == read_manifest(llmapi_engine_dir).build["llm_api"]["max_batch_size"]
    assert [i.name for i in config.input] == [t.name for t in contract.ENGINE_INPUTS]
    assert [o.name for o in config.output] == [t.name for t in contract.ENGINE_OUTPUTS]
    assert config.parameters["engine_dir"].string_value == str(llmapi_engine_dir.resolve())
    assert (repo / "tensorrt_llm" / "1" / "model.py").read_text().count("LlmApiEngine") >= 1
    source = (ROOT / "model_repository" / "templates" / "tensorrt_llm_llmapi" / "config.pbtxt.in").read_text()
    assert "${" not in (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    assert {"io", "max_batch_size", "decoupled", "engine_dir", "one_token_per_response"} == \
        set(string.Template(source).get_identifiers())


@pytest.fixture(scope="module")
def llmapi_server(standin_engine_dir, tmp_path_factory):
    """A real tritonserver (nvidia-pytriton's) serving the whole repository of the LLM API engine folder;
    its `tensorrt_llm` model is the template's model.py over the stand-in LLM API."""
    from bayling.model_repository.serve import ServeOptions
    from bayling.model_repository import serve
    from bayling.model_repository.server import pytriton_launcher
    from bayling.paths import cache_dir

    run = tmp_path_factory.mktemp("server-llmapi")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), old) if p)   # the stand-in's package
    original = serve.container_launcher
    serve.container_launcher = lambda: pytriton_launcher(cache_dir())               # no NVIDIA container here
    try:
        server = serve.start_server(ServeOptions(standin_engine_dir, 0, 0, 0, address="127.0.0.1", run_dir=run,
                                                 log_file=run / "tritonserver.log", ready_timeout=300))
    finally:
        serve.container_launcher = original
    yield server
    server.stop()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def test_the_whole_stack_serves_the_quantized_checkpoint_through_the_llmapi_model(llmapi_server):
    from tests.triton_helpers import chat, final_value, grpc_stream, http_generate

    request = chat("你好", max_tokens=40, stream=True, temperature=0.0)
    streamed = grpc_stream(llmapi_server.grpc_url, request)
    whole = grpc_stream(llmapi_server.grpc_url, {**request, "stream": False})
    assert streamed.error is None and whole.error is None
    assert whole.text == SCRIPT_SHOWN and streamed.text == SCRIPT_SHOWN
    assert final_value(whole, "finish_reason") == "stop"
    no_end = grpc_stream(llmapi_server.grpc_url, {**request, "stream": False, "end_id": -1})
    assert final_value(no_end, "finish_reason") == "length" and final_value(no_end, "completion_tokens") == 40
    from bayling.templates import builtin_template, render_prompt

    prompt = {"text_input": render_prompt([{"role": "user", "content": "你好"}], builtin_template("bayling")),
              "max_tokens": 40, "top_k": 1}
    status, body = http_generate(llmapi_server.http_url, prompt, model="ensemble")
    assert status == 200 and body["text_output"] == SCRIPT_SHOWN


def test_the_llmapi_model_exports_the_request_gauge_the_chart_scales_on(llmapi_server, standin_engine_dir):
    from tests.client_helpers import wait_until
    from tests.triton_helpers import metric

    expected = read_manifest(standin_engine_dir).build["llm_api"]["max_batch_size"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with urllib.request.urlopen(llmapi_server.metrics_url, timeout=10) as response:
            text = response.read().decode()
        if 'nv_trt_llm_request_metrics{request_type="max"}' in text:
            break
        time.sleep(0.5)
    assert 'nv_trt_llm_request_metrics{request_type="max"}' in text, text[:2000]
    assert metric(llmapi_server.metrics_url, 'nv_trt_llm_request_metrics{request_type="max"}') == expected
    idle = lambda: all(metric(llmapi_server.metrics_url, f'nv_trt_llm_request_metrics{{request_type="{kind}"}}') == 0  # noqa: E731
                       for kind in ("active", "scheduled", "waiting"))
    wait_until(idle, 30, "the gauges the chart's autoscaling reads to be 0 once the earlier tests' requests ended")
    with urllib.request.urlopen(llmapi_server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    assert 'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"} 0' in text
    from tests.client_helpers import settled
    from tests.triton_helpers import chat, grpc_stream

    assert grpc_stream(llmapi_server.grpc_url, chat("你好", max_tokens=8, temperature=0.0)).error is None
    assert settled(lambda: metric(llmapi_server.metrics_url, "bayling_engine_generated_tokens_total")) > 0



def test_bad_input_to_the_llmapi_model_is_invalid_argument_and_it_keeps_serving(llmapi_server):
    from bayling.client.library import stream_error
    from tests.triton_helpers import chat, grpc_stream

    bad = grpc_stream(llmapi_server.grpc_url, {"input_ids": [5, 10**6], "input_lengths": 2, "request_output_len": 4},
                      model="tensorrt_llm")
    assert bad.error is not None
    refused = stream_error(bad.error.status(), bad.error.message())
    assert (refused.status, refused.field) == ("INVALID_ARGUMENT", "input_ids")
    ok = grpc_stream(llmapi_server.grpc_url, chat("你好", max_tokens=40, temperature=0.0))
    assert ok.error is None and ok.text == SCRIPT_SHOWN
