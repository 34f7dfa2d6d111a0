"""NVIDIA's inflight_batcher_llm interface, model by model, against the pinned release's own configs.

model_repository/data/inflight_batcher_llm_v0.17.0.json records, for each of NVIDIA's models
(tensorrtllm_backend v0.17.0, all_models/inflight_batcher_llm/<model>/config.pbtxt, read by
scripts/record_inflight_batcher_llm.py), every input and output with its dtype, dims, optionality,
reshape and ragged batching, and the ensemble's wiring. The models rendered here must declare
exactly those tensors, plus the short list of additions below (none today), so that NVIDIA's
clients find every name they send and read.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from bayling import contract
from bayling.model_repository.render import RenderOptions, render_repository

RECORD = json.loads(resources.files("bayling.model_repository").joinpath("data/inflight_batcher_llm_v0.17.0.json")
                    .read_text(encoding="utf-8"))
NVIDIA_MODELS = ("preprocessing", "postprocessing", "ensemble", "tensorrt_llm", "tensorrt_llm_bls")

# Tensors we declare beyond NVIDIA's, per model, with why. BayLing's own tensors live on the `bayling`
# model, never on NVIDIA's; the one addition, on the engine and the ensemble, is TensorRT-LLM 1.x's names of two v0.17 inputs.
ADDITIONS: dict[str, dict[str, str]] = {model: {} for model in NVIDIA_MODELS}
ADDITIONS["tensorrt_llm"] = {new: f"TensorRT-LLM 1.x's name of {old}: the pinned GPU backend reads only it"
                             for old, new in contract.RENAMED_IN_1_X.items()}
ADDITIONS["ensemble"] = dict(ADDITIONS["tensorrt_llm"])

# NVIDIA's dtype placeholders and the value this repository renders for them (what fill_template.py
# would be given for an FP32-logits engine and an FP16 encoder).
PLACEHOLDER_DTYPES = {"${logits_datatype}": "FP32", "${encoder_input_features_data_type}": "FP16"}


def theirs(model: str, kind: str) -> dict[str, dict]:
    out = {}
    for t in RECORD["models"][model][kind]:
        t = dict(t)
        t["data_type"] = PLACEHOLDER_DTYPES.get(t["data_type"], t["data_type"])
        t.setdefault("reshape", None)
        t.setdefault("allow_ragged_batch", False)
        out[t.pop("name")] = t
    return out


def declared(tensors) -> dict[str, dict]:
    """The same fields, from a parsed config.pbtxt's inputs or outputs."""
    return {t.name: {"data_type": model_config_pb2.DataType.Name(t.data_type).removeprefix("TYPE_"),
                     "dims": list(t.dims), "optional": bool(getattr(t, "optional", False)),
                     "reshape": list(t.reshape.shape) if t.HasField("reshape") else None,
                     "allow_ragged_batch": bool(getattr(t, "allow_ragged_batch", False))}
            for t in tensors}


@pytest.fixture(scope="module", params=[True, False], ids=["decoupled", "unary"])
def rendered(request, default_engine, tmp_path_factory):
    repo = render_repository(default_engine, tmp_path_factory.mktemp("parity") / "repo",
                             RenderOptions(decoupled=request.param))
    configs = {}
    for model in NVIDIA_MODELS:
        config = model_config_pb2.ModelConfig()
        text_format.Parse((repo / model / "config.pbtxt").read_text(encoding="utf-8"), config)
        configs[model] = config
    return request.param, configs


def test_the_record_names_its_source():
    assert RECORD["repository"] == "NVIDIA/tensorrtllm_backend" and RECORD["tag"] == "v0.17.0"
    assert len(RECORD["commit"]) == 40
    for model in NVIDIA_MODELS:
        assert RECORD["models"][model]["path"] == f"all_models/inflight_batcher_llm/{model}/config.pbtxt"


@pytest.mark.parametrize("model", NVIDIA_MODELS)
@pytest.mark.parametrize("kind", ["inputs", "outputs"])
def test_each_model_declares_nvidia_s_tensors_exactly(rendered, model, kind):
    _, configs = rendered
    ours = declared(configs[model].input if kind == "inputs" else configs[model].output)
    nvidia = theirs(model, kind)
    missing = sorted(set(nvidia) - set(ours))
    extra = sorted(set(ours) - set(nvidia) - set(ADDITIONS[model]))
    assert not missing, f"{model} lacks NVIDIA's {kind} {missing}"
    assert not extra, f"{model} declares {kind} NVIDIA's has not: {extra} (document them in ADDITIONS)"
    differing = {name: (ours[name], spec) for name, spec in nvidia.items() if ours[name] != spec}
    assert not differing, f"{model} {kind} differ from NVIDIA's: {differing}"


@pytest.mark.parametrize("model", NVIDIA_MODELS)
def test_the_contract_is_what_is_rendered(rendered, model):
    """bayling.contract (what clients and the models' code read) and the rendered configs agree."""
    _, configs = rendered
    inputs, outputs = contract.MODELS[model]
    assert [t.name for t in inputs] == [t.name for t in configs[model].input]
    assert [t.name for t in outputs] == [t.name for t in configs[model].output]


def test_the_ensemble_is_wired_as_nvidia_s(rendered):
    _, configs = rendered
    ours = [(s.model_name, dict(s.input_map), dict(s.output_map)) for s in configs["ensemble"].ensemble_scheduling.step]
    nvidia = [(s["model_name"], s["input_map"], s["output_map"]) for s in RECORD["models"]["ensemble"]["steps"]]
    # plus the additions: each wired to the engine input of the same name
    nvidia[1][1].update({name: name for name in ADDITIONS["ensemble"]})
    assert ours == nvidia


def test_decoupled_mode_is_a_render_option_as_nvidia_s(rendered):
    decoupled, configs = rendered
    assert RECORD["models"]["tensorrt_llm"]["decoupled"] == "${decoupled_mode}"
    assert RECORD["models"]["tensorrt_llm_bls"]["decoupled"] == "${decoupled_mode}"
    for model in ("tensorrt_llm", "tensorrt_llm_bls"):
        assert configs[model].model_transaction_policy.decoupled is decoupled
    for model in ("preprocessing", "postprocessing"):
        assert not configs[model].model_transaction_policy.decoupled


def test_what_the_cpu_engine_refuses_is_declared_and_named():
    """Every input refused by name is one NVIDIA's models take (so the GPU variant keeps it)."""
    engine_inputs = {t["name"] for t in RECORD["models"]["tensorrt_llm"]["inputs"]}
    assert set(contract.CPU_UNSUPPORTED) <= engine_inputs
    pre_inputs = {t["name"] for t in RECORD["models"]["preprocessing"]["inputs"]}
    assert set(contract.TEXT_UNSUPPORTED) <= pre_inputs
    public = {t["name"] for t in RECORD["models"]["tensorrt_llm_bls"]["inputs"]}
    public |= {t["name"] for t in RECORD["models"]["ensemble"]["inputs"]}
    assert set(contract.TEXT_MODEL_UNSUPPORTED) <= public
