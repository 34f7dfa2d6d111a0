"""The GPU memory planner against figures computed by hand for LLaMA-7B and LLaMA-13B shapes.

LLaMA-7B:  hidden 4096, MLP 11008, 32 layers, 32 heads (head_dim 128), vocab 32000
LLaMA-13B: hidden 5120, MLP 13824, 40 layers, 40 heads (head_dim 128), vocab 32000
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bayling.build_engine import gpu_planner as gp
from bayling.build_engine.gpu_planner import GiB, LLAMA_7B, LLAMA_13B, MiB, ModelShape
from bayling.errors import BaylingError


# ------------------------------------------------------------------------------------ parameter counts

def test_llama_parameter_counts_match_the_published_sizes():
    # 7B: per layer q,o 2*4096^2 + k,v 2*4096*4096 + MLP 3*4096*11008 = 202,375,168; x32 = 6,476,005,376
    assert LLAMA_7B.linear_params_per_layer == 202_375_168
    # + embedding and lm_head 2*32000*4096 = 262,144,000 + norms 2*4096*32 + 4096 = 266,240
    assert LLAMA_7B.total_params == 6_738_415_616            # "6.7B"
    # 13B: per layer 4*5120^2 + 3*5120*13824 = 317,194,240; x40 = 12,687,769,600; + 327,680,000 + 414,720
    assert LLAMA_13B.linear_params_per_layer == 317_194_240
    assert LLAMA_13B.total_params == 13_015_864_320          # "13.0B"


def test_weight_bytes_fp16_is_two_bytes_a_parameter():
    assert gp.weight_bytes(LLAMA_7B, "fp16") == 13_476_831_232          # 12.55 GiB
    assert gp.weight_bytes(LLAMA_13B, "fp16") == 26_031_728_640         # 24.24 GiB


def test_weight_bytes_int8_weight_only():
    # GEMM weights 1 byte + fp16 scale per output channel (qkv 12288 + dense 4096 + fc/gate 2*11008
    # + proj 4096 = 42,496 per layer); embedding, lm_head and norms stay fp16.
    # 7B: 6,476,005,376 + 2*42,496*32 (2,719,744) + 2*262,144,000 (524,288,000) + 2*266,240 (532,480)
    assert gp.weight_bytes(LLAMA_7B, "int8-wo") == 7_003_545_600         # 6.52 GiB
    # 13B: 12,687,769,600 + 2*53,248*40 (4,259,840) + 655,360,000 + 829,440
    assert gp.weight_bytes(LLAMA_13B, "int8-wo") == 13_348_218_880       # 12.43 GiB


def test_weight_bytes_smoothquant_has_fp32_scales():
    # 7B: 6,476,005,376 + 4*42,496*32 (5,439,488) + 524,288,000 + 532,480
    assert gp.weight_bytes(LLAMA_7B, "int8-sq") == 7_006_265_344


def test_tensor_parallel_splits_gemms_and_lm_head_but_not_the_embedding():
    # 7B int8-wo tp2: 6,476,005,376/2 + 2,719,744/2 + embedding 262,144,000 + lm_head 262,144,000/2 + norms 532,480
    assert gp.weight_bytes(LLAMA_7B, "int8-wo", tp=2) == 3_633_111_040
    assert gp.weight_bytes(LLAMA_7B, "fp16", tp=2) == 6_869_753_856


def test_kv_cache_bytes_per_token():
    # 2 (K,V) x layers x KV heads x head_dim x bytes
    assert gp.kv_bytes_per_token(LLAMA_7B, "fp16") == 2 * 32 * 32 * 128 * 2 == 524_288     # 512 KiB
    assert gp.kv_bytes_per_token(LLAMA_7B, "int8") == 262_144                               # 256 KiB
    assert gp.kv_bytes_per_token(LLAMA_13B, "fp16") == 2 * 40 * 40 * 128 * 2 == 819_200    # 800 KiB
    assert gp.kv_bytes_per_token(LLAMA_13B, "int8") == 409_600
    assert gp.kv_bytes_per_token(LLAMA_7B, "fp16", tp=2) == 262_144                         # heads split


def test_grouped_query_attention_shrinks_the_kv_cache():
    llama3_8b = ModelShape(4096, 14336, 32, 32, 8, 128256, 8192, False, "Llama-3-8B")
    assert gp.kv_bytes_per_token(llama3_8b) == 2 * 32 * 8 * 128 * 2 == 131_072
    # KV heads are duplicated, not split below one per GPU
    assert gp.kv_bytes_per_token(llama3_8b, tp=16) == 2 * 32 * 1 * 128 * 2


# ------------------------------------------------------------------------------------------- plans

def test_plan_bayling_7b_int8_weight_only_on_16_gib():
    p = gp.plan(LLAMA_7B, "int8-wo", "fp16", 1, 16 * GiB, 2048)
    assert p.max_seq_len == 2048
    assert p.max_input_len == 1536                        # 2048 - 512 kept for the answer
    # activations: 2 (safety) x 2 bytes x (2*4096 + 3*4096 + 2*11008) = 169,984 B per batched token;
    # 8192 tokens -> 1,392,508,928 + fp32 logits 256 x 32000 x 4 = 32,768,000 -> 1,425,276,928
    # (under 10% of 16 GiB = 1,717,986,918, so max_num_tokens stays 8192)
    assert p.max_num_tokens == 8192
    assert p.activation_bytes == 1_425_276_928
    assert p.runtime_bytes == GiB
    # free after load = 17,179,869,184 - 7,003,545,600 - 1,073,741,824 - 1,425,276,928
    assert p.free_after_load == 7_677_304_832
    # headroom max(512 MiB, 5% of 16 GiB = 858,993,459): (free - headroom) / free = 0.888 -> 0.88
    assert p.kv_cache_free_gpu_mem_fraction == 0.88
    # 0.88 x free = 6,756,028,252 B / 524,288 = 12,886 tokens -> 12,864 (blocks of 64)
    assert p.kv_cache_bytes == 6_756_028_252
    assert p.max_tokens_in_paged_kv_cache == 12_864
    assert p.full_sequences == 6                          # 12,864 // 2048
    assert p.max_batch_size == 12                         # 2 x 6
    assert p.paged_context_fmha and p.kv_cache_reuse
    assert not p.calibration


def test_plan_bayling_13b_fp16_on_16_gib_is_refused_with_the_numbers():
    with pytest.raises(BaylingError) as err:
        gp.plan(LLAMA_13B, "fp16", "fp16", 1, 16 * GiB)
    message = str(err.value)
    assert "24.24 GiB" in message and "16.00 GiB" in message     # the weights alone do not fit
    assert "--quant int8-wo --kv-cache int8" in message          # and what would


def test_plan_bayling_13b_int8_with_fp16_kv_on_16_gib_cannot_hold_one_sequence():
    # weights 12.43 GiB; even with max_num_tokens lowered to max_input_len 1536 (activations
    # 1536 x 212,992 + 32,768,000 = 359,923,712) free is 2,397,984,768 B, the fraction 0.64 and
    # the KV cache 1,534,710,251 B / 819,200 = 1,873 -> 1,856 tokens < 2048
    with pytest.raises(BaylingError) as err:
        gp.plan(LLAMA_13B, "int8-wo", "fp16", 1, 16 * GiB)
    assert "1856 tokens" in str(err.value) and "max_num_tokens 1536" in str(err.value)
    assert "less than one sequence of 2048" in str(err.value)
    assert "--kv-cache int8 --tp 1 fits (2368 KV tokens" in str(err.value)


def test_max_num_tokens_is_lowered_to_leave_room_for_one_sequence():
    # 7B fp16 on 16 GiB: with 8192 batched tokens the KV cache would hold 640 tokens; with 2048
    # (activations 2048 x 169,984 + 32,768,000 = 380,895,232) free is 2,248,400,896 B, fraction
    # 0.61, KV cache 1,371,524,546 B / 524,288 -> 2,560 tokens: one sequence, batch 2
    p = gp.plan(LLAMA_7B, "fp16", "fp16", 1, 16 * GiB)
    assert p.max_num_tokens == 2048 and p.activation_bytes == 380_895_232
    assert p.free_after_load == 2_248_400_896 and p.kv_cache_free_gpu_mem_fraction == 0.61
    assert p.max_tokens_in_paged_kv_cache == 2_560 and p.max_batch_size == 2
    assert any("lowered from 8192 to 2048" in n for n in p.notes)


def test_plan_bayling_13b_int8_with_int8_kv_fits_16_gib():
    p = gp.plan(LLAMA_13B, "int8-wo", "int8", 1, 16 * GiB)
    # activations 4096 x 212,992 + 32,768,000 = 905,183,232
    assert p.max_num_tokens == 4096 and p.activation_bytes == 905_183_232
    # free = 17,179,869,184 - 13,348,218,880 - 1,073,741,824 - 905,183,232 = 1,852,725,248
    assert p.free_after_load == 1_852_725_248
    assert p.kv_cache_free_gpu_mem_fraction == 0.53               # (free - 858,993,459) / free = 0.536
    # 0.53 x free = 981,944,381 B / 409,600 = 2,397 -> 2,368 tokens: one 2048-token sequence
    assert p.max_tokens_in_paged_kv_cache == 2_368
    assert p.max_batch_size == 2
    # INT8 KV cache: no paged context FMHA, hence no KV-cache reuse; and calibration loads the
    # whole fp16 model (24.24 GiB), which the 16 GiB GPU cannot hold
    assert not p.paged_context_fmha and not p.kv_cache_reuse
    assert p.calibration and p.calibrate_on_cpu
    assert p.calibration_fp16_bytes == 26_031_728_640


def test_tensor_parallelism_makes_13b_fp16_fit_two_24_gib_gpus():
    p = gp.plan(LLAMA_13B, "fp16", "fp16", 2, 24 * GiB)
    assert p.weight_bytes == gp.weight_bytes(LLAMA_13B, "fp16", 2)
    assert p.runtime_bytes == GiB + 512 * MiB
    assert p.kv_bytes_per_token == 409_600
    assert p.max_tokens_in_paged_kv_cache >= 2048


def test_longer_context_than_the_model_is_capped_with_a_note():
    p = gp.plan(LLAMA_7B, "int8-wo", "fp16", 1, 80 * GiB, max_context=8192)
    assert p.max_seq_len == 2048
    assert any("2048 positions" in n for n in p.notes)


def test_the_batch_size_is_capped():
    p = gp.plan(LLAMA_7B, "int8-wo", "int8", 1, 80 * GiB, max_context=512)
    assert p.max_batch_size == 256


def test_triton_parameters_are_strings_for_the_config_template():
    p = gp.plan(LLAMA_7B, "int8-wo", "fp16", 1, 16 * GiB)
    params = p.triton_parameters()
    assert params == {"max_batch_size": "12", "max_beam_width": "1", "kv_cache_free_gpu_mem_fraction": "0.88",
                      "max_tokens_in_paged_kv_cache": "12864", "enable_kv_cache_reuse": "true",
                      "enable_chunked_context": "true", "batch_scheduler_policy": "guaranteed_no_evict"}
    json.dumps(p.as_dict())  # the manifest stores the plan as JSON


def test_format_table_shows_the_numbers_a_user_checks():
    table = gp.plan(LLAMA_7B, "int8-wo", "fp16", 1, 16 * GiB).format_table()
    for expected in ("weights                         6.52 GiB per GPU", "512 KiB", "0.88", "12864",
                     "2048 / 1536", "8192", "max_batch_size                  12"):
        assert expected in table


def test_model_shape_from_a_hugging_face_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 5120, "intermediate_size": 13824,
        "num_hidden_layers": 40, "num_attention_heads": 40, "vocab_size": 32000, "max_position_embeddings": 2048}))
    shape = ModelShape.from_config_file(tmp_path, "BayLing-13B-v1.1")
    assert shape == ModelShape(5120, 13824, 40, 40, 40, 32000, 2048, False, "BayLing-13B-v1.1")  # KV heads default to heads
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(BaylingError, match="lacks"):
        ModelShape.from_config_file(tmp_path)


@pytest.mark.parametrize("text, expected", [("16GiB", 16 * GiB), ("24 GB", 24_000_000_000), ("40G", 40 * GiB),
                                            ("40960MiB", 40 * GiB), ("1.5GiB", 3 * GiB // 2), (123, 123)])
def test_parse_memory(text, expected):
    assert gp.parse_memory(text) == expected


def test_parse_memory_refuses_nonsense():
    with pytest.raises(BaylingError, match="memory size"):
        gp.parse_memory("lots")


def test_bad_choices_are_refused():
    with pytest.raises(BaylingError, match="quantization"):
        gp.plan(LLAMA_7B, "int4")
    with pytest.raises(BaylingError, match="does not divide"):
        gp.plan(LLAMA_7B, tp=3)


@settings(max_examples=60, deadline=None)
@given(gib=st.integers(8, 160), quant=st.sampled_from(gp.QUANTS), kv=st.sampled_from(gp.KV_CACHE_TYPES),
       context=st.sampled_from([512, 1024, 2048]))
def test_every_plan_fits_its_gpu(gib, quant, kv, context):
    try:
        p = gp.plan(LLAMA_7B, quant, kv, 1, gib * GiB, context)
    except BaylingError:
        return
    used = p.weight_bytes + p.runtime_bytes + p.activation_bytes + p.kv_cache_bytes
    assert used < p.gpu_memory
    assert p.max_tokens_in_paged_kv_cache * p.kv_bytes_per_token <= p.kv_cache_bytes
    assert p.max_tokens_in_paged_kv_cache >= p.max_seq_len >= p.max_input_len
    assert p.max_num_tokens >= p.max_input_len
    assert 1 <= p.max_batch_size <= 256 and 0.05 <= p.kv_cache_free_gpu_mem_fraction <= 0.95
    bigger = gp.plan(LLAMA_7B, quant, kv, 1, (gib + 8) * GiB, context)
    assert bigger.max_tokens_in_paged_kv_cache >= p.max_tokens_in_paged_kv_cache


def test_the_runbook_tables_in_docs_are_the_planners_current_output():
    """docs/gpu.md pastes benchmarks/gpu_plan_table.py's output; regenerate it when the planner changes."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("gpu_plan_table", root / "benchmarks" / "gpu_plan_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    docs = (root / "docs" / "gpu.md").read_text(encoding="utf-8")
    rows = table.plan_rows(2048) + table.speed_rows(2048)
    assert len(rows) == 2 + 2 * 4 * len(table.CONFIGS) + 2 + 2 * 2 * 6      # 7B, 13B x 4 GPUs x configs
    missing = [row for row in rows if row not in docs]
    assert not missing, f"docs/gpu.md is stale; first stale row: {missing[0]}"


def test_fp8_weights_are_one_byte_with_16_bit_embeddings_like_int8_weight_only_without_scales():
    m = gp.LLAMA_13B
    linear = m.num_layers * m.linear_params_per_layer
    assert gp.weight_bytes(m, "fp8") == linear + 2 * (2 * m.embedding_params + m.norm_params)
    assert gp.weight_bytes(m, "fp8") < gp.weight_bytes(m, "int8-wo") < gp.weight_bytes(m, "fp16")
    assert gp.plan(m, "fp8", "fp16", 1, 24 * gp.GiB).calibration     # FP8 activations are calibrated


def test_the_llm_api_settings_are_the_plans_limits():
    plan = gp.plan(gp.LLAMA_7B, "int8-wo", "fp16", 1, 16 * gp.GiB)
    s = plan.llm_api_settings()
    assert (s["max_batch_size"], s["max_num_tokens"], s["max_seq_len"]) == (plan.max_batch_size, plan.max_num_tokens,
                                                                           plan.max_seq_len)
    assert s["kv_cache_config"] == {"free_gpu_memory_fraction": 0.88, "max_tokens": plan.max_tokens_in_paged_kv_cache,
                                    "enable_block_reuse": True}
    assert s["enable_chunked_prefill"] is True and s["max_beam_width"] == 1


def test_13b_with_a_16_bit_kv_cache_does_not_fit_16_gib_but_int8_kv_does():
    """Why 16 GB GPUs take the TensorRT engine path for 13B: the LLM API target has no INT8 KV cache."""
    with pytest.raises(BaylingError, match="does not fit in 16.00 GiB"):
        gp.plan(gp.LLAMA_13B, "int8-wo", "fp16", 1, 16 * gp.GiB)
    assert gp.plan(gp.LLAMA_13B, "int8-wo", "int8", 1, 16 * gp.GiB).max_batch_size >= 2
