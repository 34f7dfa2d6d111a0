"""Quality of an INT8 engine against a reference build of the same model (FP16 on a GPU, float32
on a CPU): greedy token agreement and BLEU on a small bilingual translation set.

    python benchmarks/quality_check.py --engine INT8_DIR --reference REF_DIR [--output quality.json]

Each engine is served in turn by a real tritonserver (`bayling serve`; on a GPU one at a time, so
both need not fit together) and asked to translate benchmarks/data/translation_set.jsonl with
BayLing's translation prompts, greedily. Token agreement compares the two engines' outputs
token by token: the share of each output generated before the first token where they differ
(and, for reference, the share of positions that agree); BLEU compares each with the references. The GPU workflow runs it on the INT8 and FP16 TensorRT-LLM engines.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "translation_set.jsonl"


def translate_all(engine: Path, items: list[dict], max_tokens: int, log_file: Path) -> list[str]:
    from bayling.client import BayLingClient
    from bayling.model_repository import serve
    from bayling.translation import translation_prompt

    server = serve.start_server(serve.ServeOptions(engine, 0, 0, 0, address="127.0.0.1", log_file=log_file))
    try:
        with BayLingClient(server.grpc_url) as client:
            return [client.chat([{"role": "user", "content": translation_prompt(
                        item["source"], item["target_lang"], instruction_lang=item["target_lang"])}],
                        max_tokens=max_tokens, temperature=0.0).text.strip()
                    for item in items]
    finally:
        server.stop()


def token_agreement(tokenizer, a: list[str], b: list[str]) -> tuple[float, float]:
    """Means over segments of (common prefix) / (longer output) and (equal positions) / (longer output)."""
    prefix, positional = [], []
    for x, y in zip(a, b, strict=True):
        tx, ty = tokenizer.encode(x, add_special_tokens=False), tokenizer.encode(y, add_special_tokens=False)
        longer = max(len(tx), len(ty), 1)
        same = [p == q for p, q in zip(tx, ty)]
        prefix.append((same.index(False) if False in same else len(same)) / longer if tx != ty else 1.0)
        positional.append(sum(same) / longer if tx != ty else 1.0)
    return sum(prefix) / len(prefix), sum(positional) / len(positional)


def main() -> int:
    from transformers import AutoTokenizer

    from bayling.manifest import read_manifest
    from bayling.translation import corpus_bleu

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, required=True, help="the engine under test (INT8)")
    parser.add_argument("--reference", type=Path, required=True, help="the reference engine (FP16 or float32)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--output", type=Path, help="write the figures and all outputs as JSON")
    args = parser.parse_args()

    items = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    references = [item["reference"] for item in items]
    outputs = {}
    for label, engine in (("engine", args.engine), ("reference", args.reference)):
        print(f"translating {len(items)} sentences with {engine} ...", file=sys.stderr, flush=True)
        log = Path(tempfile.gettempdir()) / f"quality-check-{label}-tritonserver.log"
        outputs[label] = translate_all(engine, items, args.max_tokens, log)
    tokenizer = AutoTokenizer.from_pretrained(str(args.engine / "tokenizer"))
    report = {
        "engine": {"path": str(args.engine), "build": read_manifest(args.engine).build.get("quantization")},
        "reference": {"path": str(args.reference), "build": read_manifest(args.reference).build.get("quantization")},
        "sentences": len(items),
        "token_agreement_prefix": None, "token_agreement_positional": None,
        "exact_match": sum(a == b for a, b in zip(outputs["engine"], outputs["reference"])) / len(items),
        "bleu_engine": corpus_bleu(outputs["engine"], references),
        "bleu_reference": corpus_bleu(outputs["reference"], references),
        "outputs": [{**item, "engine": a, "reference_engine": b}
                    for item, a, b in zip(items, outputs["engine"], outputs["reference"])],
    }
    report["token_agreement_prefix"], report["token_agreement_positional"] = token_agreement(
        tokenizer, outputs["engine"], outputs["reference"])
    print(f"{'sentences':<32}{report['sentences']}")
    print(f"{'token agreement (prefix)':<32}{report['token_agreement_prefix']:.3f}")
    print(f"{'token agreement (positions)':<32}{report['token_agreement_positional']:.3f}")
    print(f"{'identical outputs':<32}{report['exact_match']:.3f}")
    print(f"{'BLEU (engine)':<32}{report['bleu_engine']:.1f}")
    print(f"{'BLEU (reference)':<32}{report['bleu_reference']:.1f}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
