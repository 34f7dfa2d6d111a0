"""Print the GPU planner's numbers for BayLing-7B and -13B on 16, 24, 40 and 80 GiB GPUs, and the
memory-bandwidth bound on decoding speed (the tables of docs/gpu.md).

    .venv/bin/python benchmarks/gpu_plan_table.py

Decoding one token reads every weight once (for a whole in-flight batch) plus each sequence's KV
cache, so a step takes at least (weights + batch x context x KV bytes/token) / bandwidth. The
figures are that ceiling, computed, not measured; real engines reach a fraction of it.
"""

from __future__ import annotations

import argparse

from bayling.build_engine.gpu_planner import GiB, KiB, LLAMA_13B, LLAMA_7B, kv_bytes_per_token, plan, weight_bytes
from bayling.errors import BaylingError

MODELS = (("BayLing-7B", LLAMA_7B), ("BayLing-13B", LLAMA_13B))
GPUS_GIB = (16, 24, 40, 80)
# The TensorRT engine target (trtllm) builds all but fp8; the LLM API target (trtllm-llmapi) takes
# int8-wo / fp16 (W8A16) and fp8 / fp16 (Hopper, Ada): it has no INT8 KV cache.
CONFIGS = (("int8-wo", "fp16"), ("int8-wo", "int8"), ("int8-sq", "fp16"), ("fp16", "fp16"), ("fp8", "fp16"))

# Memory bandwidth from NVIDIA's product pages / datasheets (GB/s, decimal).
GPUS = (
    ("T4 16GB", 16, 320),            # https://www.nvidia.com/en-us/data-center/tesla-t4/
    ("L4 24GB", 24, 300),            # https://www.nvidia.com/en-us/data-center/l4/
    ("A10 24GB", 24, 600),           # https://www.nvidia.com/en-us/data-center/products/a10-gpu/
    ("A100 40GB", 40, 1555),         # https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
    ("A100 80GB SXM", 80, 2039),     # same datasheet
    ("H100 80GB SXM", 80, 3350),     # https://www.nvidia.com/en-us/data-center/h100/
)


def plan_rows(context: int) -> list[str]:
    rows = ["| model | GPU | weights / KV cache | weights per GPU | KV per token | KV tokens | max_batch_size "
            "| max_num_tokens | max_input_len / max_seq_len | kv_cache_free_gpu_mem_fraction |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, shape in MODELS:
        for gib in GPUS_GIB:
            for quant, kv in CONFIGS:
                head = f"| {name} | {gib} GiB | {quant} / {kv} |"
                try:
                    p = plan(shape, quant, kv, 1, gib * GiB, context, suggest=False)
                except BaylingError as exc:
                    reason = str(exc).split(": ", 1)[1].rstrip(".")
                    rows.append(f"{head} refused: {reason} | | | | | | |")
                    continue
                rows.append(f"{head} {p.weight_bytes / GiB:.2f} GiB | {p.kv_bytes_per_token // KiB} KiB | "
                            f"{p.max_tokens_in_paged_kv_cache} | {p.max_batch_size} | {p.max_num_tokens} | "
                            f"{p.max_input_len} / {p.max_seq_len} | {p.kv_cache_free_gpu_mem_fraction:.2f} |")
    return rows


def speed_rows(context: int) -> list[str]:
    avg = context // 2
    rows = ["| model | weights / KV cache | GPU | bandwidth | 1 stream, tokens/s | batch (planner) | "
            "batch tokens/s |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for name, shape in MODELS:
        for quant, kv in (("int8-wo", "fp16"), ("fp16", "fp16")):
            w = weight_bytes(shape, quant)
            per_token = kv_bytes_per_token(shape, kv)
            for gpu, gib, gbs in GPUS:
                bw = gbs * 1e9
                try:
                    batch = plan(shape, quant, kv, 1, gib * GiB, context, suggest=False).max_batch_size
                except BaylingError:
                    rows.append(f"| {name} | {quant} / {kv} | {gpu} | {gbs} GB/s | does not fit | | |")
                    continue
                single = bw / (w + avg * per_token)
                step = (w + batch * avg * per_token) / bw
                rows.append(f"| {name} | {quant} / {kv} | {gpu} | {gbs} GB/s | {single:.0f} | {batch} | "
                            f"{batch / step:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048, help="max context (default 2048, BayLing v1)")
    args = parser.parse_args()
    print(f"Planner, one GPU, context {args.context} (GPU memory as nominal GiB):\n")
    print("\n".join(plan_rows(args.context)))
    print(f"\nBandwidth bound on decoding, average context {args.context // 2} tokens per sequence:\n")
    print("\n".join(speed_rows(args.context)))


if __name__ == "__main__":
    main()
