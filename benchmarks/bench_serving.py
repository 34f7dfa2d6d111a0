"""Tokens/s of the served model (one stream, and N concurrent streams) next to CTranslate2
called directly in-process and `transformers` generate in float32, on the same prompts, in one run.

    .venv/bin/python benchmarks/bench_serving.py [--engine ENGINE_DIR] [--tokens 128] [--concurrency 8]

Every run answers the same prompts greedily with at most --tokens tokens each (long-form prompts,
so answers mostly run to the limit); tokens/s counts the tokens actually generated. The served figures go through the whole stack: gRPC stream ->
`bayling` (template, tokenization, streaming detokenization) -> `tensorrt_llm` (CTranslate2
INT8 with batching) and back. Defaults to the embedded default model's engine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain in detail how a bicycle works.",
    "用中文详细介绍一下长城的历史。",
    "Write a long essay about your favourite season.",
    "Explain at length the benefits of learning a second language.",
    "请写一篇关于月亮的长文章。",
    "Write a detailed guide for someone starting to learn programming.",
    "Describe in detail a busy market in the morning.",
]


def served(grpc_url: str, prompts: list[str], tokens: int) -> tuple[float, int]:
    """All prompts at once, one streamed gRPC request each; returns (seconds, tokens generated)."""
    from bayling.client import BayLingClient

    results = [None] * len(prompts)
    with BayLingClient(grpc_url, retries=0) as client:
        def run(i):
            with client.stream_chat(prompts[i], max_tokens=tokens, temperature=0.0) as stream:
                for _ in stream:
                    pass
                results[i] = stream.result

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    if any(r is None for r in results):
        raise SystemExit("a served request failed (see the traceback above)")
    return elapsed, sum(r.completion_tokens for r in results)


def prompt_ids(tokenizer, prompts):
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
            for p in prompts]


def ct2_direct(engine: Path, tokenizer, prompts: list[str], tokens: int, batch: bool) -> tuple[float, int]:
    """The same engine with the same thread setting as the served CPU engine model."""
    import ctranslate2

    from bayling.manifest import read_manifest
    from bayling.model_repository.render import cpu_threads_for

    generator = ctranslate2.Generator(str(engine / "ctranslate2"), device="cpu", compute_type="default",
                                      intra_threads=cpu_threads_for(read_manifest(engine), None))
    starts = [tokenizer.convert_ids_to_tokens(ids) for ids in prompt_ids(tokenizer, prompts)]
    options = dict(max_length=tokens, sampling_topk=1, include_prompt_in_result=False, end_token=[tokenizer.eos_token_id])
    try:
        generator.generate_batch(starts[:1], **{**options, "max_length": 4})  # warm up
        start = time.perf_counter()
        if batch:
            out = generator.generate_batch(starts, **options)
        else:
            out = [generator.generate_batch([s], **options)[0] for s in starts]
        elapsed = time.perf_counter() - start
    finally:
        del generator
    return elapsed, sum(len(r.sequences_ids[0]) for r in out)


def hf_fp32(checkpoint: Path, tokenizer, prompts: list[str], tokens: int, batch: bool) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    model.eval()
    all_ids = prompt_ids(tokenizer, prompts)
    options = dict(max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    generated = 0
    with torch.inference_mode():
        model.generate(torch.tensor([all_ids[0]]), max_new_tokens=4, do_sample=False)  # warm up
        start = time.perf_counter()
        if batch:
            width = max(len(ids) for ids in all_ids)  # left padding, as generate expects for decoders
            input_ids = torch.tensor([[tokenizer.eos_token_id] * (width - len(i)) + i for i in all_ids])
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in all_ids])
            out = model.generate(input_ids, attention_mask=mask, **options)
            for row in out[:, width:].tolist():  # count up to each answer's EOS
                generated += row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
        else:
            for ids in all_ids:
                out = model.generate(torch.tensor([ids]), **options)
                row = out[0, len(ids):].tolist()
                generated += row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
        elapsed = time.perf_counter() - start
    return elapsed, generated


def main() -> None:
    from bayling.manifest import read_manifest
    from bayling.paths import default_engine_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, default=default_engine_dir("cpu-ct2"),
                        help="CTranslate2 engine folder (bayling build --default --target cpu-ct2)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is shown")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from bayling.model_repository.serve import ServeOptions, start_server

    manifest = read_manifest(args.engine)
    tokenizer = AutoTokenizer.from_pretrained(str(args.engine / "tokenizer"))
    prompts = (PROMPTS * ((args.concurrency + len(PROMPTS) - 1) // len(PROMPTS)))[:args.concurrency]
    rows = []

    def measure(label, fn, n_streams):
        runs = [fn() for _ in range(args.repeats)]
        seconds = statistics.median(r[0] for r in runs)
        generated = runs[0][1]
        rows.append((label, n_streams, generated, seconds, generated / seconds))
        print(f"{label:<44} {n_streams:>3} {generated:>6} {seconds:>8.2f} {generated / seconds:>8.1f}", flush=True)

    print(f"model {manifest.model_name}, engine {args.engine}, {args.tokens} tokens per prompt, "
          f"median of {args.repeats} runs")
    print(f"{'':<44} {'n':>3} {'tokens':>6} {'seconds':>8} {'tok/s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(ServeOptions(args.engine, 0, 0, 0, address="127.0.0.1", run_dir=Path(tmp),
                                           log_file=Path(tmp) / "tritonserver.log"))
        try:
            served(server.grpc_url, prompts[:1], 4)  # warm up
            measure("served (Triton, gRPC stream), 1 stream", lambda: served(server.grpc_url, prompts[:1], args.tokens), 1)
            measure(f"served (Triton, gRPC stream), {args.concurrency} streams",
                    lambda: served(server.grpc_url, prompts, args.tokens), args.concurrency)
        finally:
            server.stop()
    measure("CTranslate2 int8 in-process, 1 prompt", lambda: ct2_direct(args.engine, tokenizer, prompts[:1], args.tokens, False), 1)
    measure(f"CTranslate2 int8 in-process, batch of {args.concurrency}",
            lambda: ct2_direct(args.engine, tokenizer, prompts, args.tokens, True), args.concurrency)
    checkpoint = Path(manifest.source["path"])
    measure("transformers fp32 generate, 1 prompt", lambda: hf_fp32(checkpoint, tokenizer, prompts[:1], args.tokens, False), 1)
    measure(f"transformers fp32 generate, batch of {args.concurrency}",
            lambda: hf_fp32(checkpoint, tokenizer, prompts, args.tokens, True), args.concurrency)
    served1, ct2_1, hf1 = rows[0][4], rows[2][4], rows[4][4]
    print(f"serving stack cost, one stream: {100 * (1 - served1 / ct2_1):.1f}% of CTranslate2's tokens/s")
    print(f"serving stack cost, {args.concurrency} streams: {100 * (1 - rows[1][4] / rows[3][4]):.1f}%")
    print(f"INT8 engine vs fp32 transformers, one prompt: {ct2_1 / hf1:.2f}x; batch: {rows[3][4] / rows[5][4]:.2f}x")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
