"""CTranslate2 alone, in-process: how its threads are best split on this machine. Each row runs `calls`
batches of `batch` identical prompts at once (`asynchronous=True`), greedy, --tokens tokens each, on a
generator with `intra` threads per worker and `inter` workers; the CPU engine's lanes are workers.

    .venv/bin/python benchmarks/bench_ct2_lanes.py [--engine ENGINE_DIR] [--tokens 128]

Prints tokens/s, CPU seconds per 1,000 tokens (stable on a noisy machine) and the process's RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

# (intra threads, workers, batch, concurrent calls): one stream, then 16 streams split three ways
LAYOUTS = [(1, 1, 1, 1), (2, 1, 1, 1), (2, 1, 16, 1), (1, 1, 16, 1), (1, 2, 8, 2), (1, 4, 4, 4), (2, 2, 8, 2)]


def rss_mib() -> int:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) // 1024


def run(model_dir: Path, tokens: int, intra: int, inter: int, batch: int, calls: int) -> str:
    import ctranslate2

    vocab = json.loads((model_dir / "vocabulary.json").read_text(encoding="utf-8"))
    prompt = [vocab[i] for i in range(1000, 1064)]
    generator = ctranslate2.Generator(str(model_dir), device="cpu", intra_threads=intra, inter_threads=inter)
    options = dict(max_length=tokens, sampling_topk=1, end_token=[], include_prompt_in_result=False)
    generator.generate_batch([prompt], **{**options, "max_length": 4})   # warm-up
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    futures = [generator.generate_batch([prompt] * batch, asynchronous=True, **options) for _ in range(calls)]
    made = sum(len(f.result().sequences_ids[0]) for call in futures for f in call)
    wall = time.perf_counter() - start
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = used.ru_utime - cpu.ru_utime + used.ru_stime - cpu.ru_stime
    return (f"| {intra} | {inter} | {calls} x {batch} | {made / wall:.0f} | {1000 * cpu_s / made:.1f} | {rss_mib()} |")


def main() -> int:
    from bayling.manifest import ENGINE_SUBDIRS
    from bayling.paths import default_engine_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, default=None, help="CTranslate2 engine folder (default: the embedded "
                        "default's, bayling build --default --target cpu-ct2)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence (default 128)")
    args = parser.parse_args()
    engine = args.engine or default_engine_dir("cpu-ct2")
    print("| intra threads | workers | calls x batch | tokens/s | CPU s / 1k tokens | RSS MiB |")
    print("|---|---|---|---|---|---|")
    for layout in LAYOUTS:
        print(run(engine / ENGINE_SUBDIRS["ctranslate2"], args.tokens, *layout), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
