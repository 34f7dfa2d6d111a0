"""Per-token cost of streaming detokenization at output lengths 10, 100, 1000 and 4000 tokens:
bayling's TextStream (incremental detokenizer + placeholders + stop strings) next to re-decoding
the whole output at every step (what NVIDIA's accumulate mode and BayLing's original tools do).

    .venv/bin/python benchmarks/bench_detokenizer.py [--engine ENGINE_DIR]

Uses the tokenizer of an engine folder (default: the embedded default model's engine,
built with `bayling build --default`). The text mixes Chinese and English.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bayling.detokenizer import byte_runs, make_decode
from bayling.paths import default_engine_dir
from bayling.textstream import PLACEHOLDERS, ReplaceChain, TextStream

TEXT = ("BayLing is a bilingual assistant. 百聆是一个中英双语的大语言模型，擅长翻译和多轮对话。"
        "It answers questions, writes, and translates between Chinese and English. 今天天气很好，我们去公园散步吧！ ")
LENGTHS = (10, 100, 1000, 4000)


def streamed(tokenizer, ids) -> float:
    stream = TextStream(make_decode(tokenizer), byte_runs=byte_runs(tokenizer), stop_strings=["###"],
                        placeholders=True)
    start = time.perf_counter()
    for t in ids:
        stream.add_tokens([t])
    stream.finish("length")
    return time.perf_counter() - start


def redecoded(tokenizer, ids) -> float:
    """Each step: decode everything so far, replace placeholders, look for the stop string."""
    chain = ReplaceChain(PLACEHOLDERS)
    start = time.perf_counter()
    for n in range(1, len(ids) + 1):
        text = chain.replace_all(tokenizer.decode(ids[:n], skip_special_tokens=True))
        text.find("###")
    return time.perf_counter() - start


def best_of(fn, repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, default=default_engine_dir())
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.engine / "tokenizer"))
    ids_all = tokenizer.encode(TEXT * 200, add_special_tokens=False)
    print(f"tokenizer: {args.engine / 'tokenizer'} ({type(tokenizer).__name__}, {len(tokenizer)} ids)")
    print(f"{'tokens':>7} {'TextStream us/token':>20} {'re-decode us/token':>19} {'re-decode / stream':>19}")
    rows = []
    for n in LENGTHS:
        ids = ids_all[:n]
        repeats = 5 if n <= 1000 else 2
        ours = best_of(lambda: streamed(tokenizer, ids), repeats) / n * 1e6
        theirs = best_of(lambda: redecoded(tokenizer, ids), 1 if n == 4000 else repeats) / n * 1e6
        rows.append((n, ours, theirs))
        print(f"{n:>7} {ours:>20.1f} {theirs:>19.1f} {theirs / ours:>18.1f}x", flush=True)
    print(f"TextStream cost per token at {LENGTHS[-1]} tokens / at {LENGTHS[0]} tokens: {rows[-1][1] / rows[0][1]:.2f}")
    print(f"(median of TextStream rows: {statistics.median(r[1] for r in rows):.1f} us/token)")


if __name__ == "__main__":
    main()
