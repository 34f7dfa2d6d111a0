"""The llama.cpp engine alone, in-process: closed-loop streams of the side-by-side benchmark's chats
(`bayling bench`'s prompts in the engine's chat template, exactly --tokens greedy tokens each), with
prefix copies across slots and without them, alternating, so that both are measured in one run.

    BAYLING_CACHE=.cache/test .venv/bin/python benchmarks/bench_llamacpp_engine.py [--engine ENGINE_DIR]
        [--concurrency 16] [--requests-per-client 3] [--tokens 128] [--rounds 2]

Prints, per run: output tokens/s, CPU milliseconds per output token (steadier than wall clock on a noisy
machine), the prompt tokens the engine computed, and how many newcomers copied a prefix.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from bayling.build_engine.gguf_build import GGUF_NAME
from bayling.client.bench import Workload
from bayling.manifest import ENGINE_SUBDIRS
from bayling.model_repository.engine_ct2 import EngineRequest
from bayling.model_repository.engine_llamacpp import LlamaCppEngine
from bayling.model_repository.engine_text import load_engine_text
from bayling.paths import default_engine_dir


def chat_prompts(engine_dir: Path, n: int, prompt_words: int) -> list[list[int]]:
    """The ids the `bayling` model sends the engine for the benchmark's chats (the engine's template)."""
    encoder = load_engine_text(engine_dir).encoder
    workload = Workload(prompt_words=prompt_words)
    return [encoder.encode_messages([{"role": "user", "content": workload.prompt(i)}]).ids for i in range(n)]


def run(engine_dir: Path, prompts: list[list[int]], clients: int, tokens: int, copies: bool) -> str:
    engine = LlamaCppEngine(str(engine_dir / ENGINE_SUBDIRS["llamacpp"] / GGUF_NAME), context=2048,
                            max_batch_size=clients)
    if not copies:
        engine.copy_min_tokens = 1 << 30
    per_client = len(prompts) // clients

    def client(k: int) -> None:
        for j in range(per_client):
            done = threading.Event()
            engine.submit(EngineRequest("", prompts[k * per_client + j], tokens, end_id=-1, top_k=1, streaming=True),
                          lambda emission: emission.final and done.set())
            done.wait()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    made = engine.generated_tokens
    engine.shutdown()
    return (f"| {'with' if copies else 'without'} | {made / wall:.1f} | {1000 * cpu_s / made:.2f} | "
            f"{engine.prefilled_tokens} | {engine.copied_prefixes} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, default=default_engine_dir(), help="a llama.cpp engine folder")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients (default 16)")
    parser.add_argument("--requests-per-client", type=int, default=3, help="default 3")
    parser.add_argument("--tokens", type=int, default=128, help="output tokens per request (default 128)")
    parser.add_argument("--prompt-words", type=int, default=36, help="as side_by_side.py (default 36)")
    parser.add_argument("--rounds", type=int, default=2, help="with/without pairs (default 2)")
    args = parser.parse_args()
    prompts = chat_prompts(args.engine, args.concurrency * args.requests_per_client, args.prompt_words)
    print(f"{args.concurrency} clients x {args.requests_per_client} requests, {len(prompts[0])}-token prompts, "
          f"{args.tokens} tokens each\n")
    print("| prefix copies | output tok/s | CPU ms / token | prompt tokens computed | copies |\n|---|---|---|---|---|")
    for _ in range(args.rounds):
        for copies in (True, False):
            print(run(args.engine, prompts, args.concurrency, args.tokens, copies), flush=True)


if __name__ == "__main__":
    main()
