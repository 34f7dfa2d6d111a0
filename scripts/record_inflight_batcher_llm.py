#!/usr/bin/env python3
"""Record the tensors of NVIDIA's inflight_batcher_llm models from a tensorrtllm_backend checkout.

The parity test (tests/test_nvidia_parity.py) compares bayling.contract with this record, so
the facts come from the release's own config.pbtxt files, read once, and no code of theirs is
copied. Placeholders (`${logits_datatype}`, ...) are kept by name in the record.

examples:
  git clone --branch v0.17.0 https://github.com/NVIDIA/tensorrtllm_backend /tmp/trtllm_backend
  scripts/record_inflight_batcher_llm.py /tmp/trtllm_backend --tag v0.17.0 \
      --output model_repository/data/inflight_batcher_llm_v0.17.0.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

MODELS = ("preprocessing", "postprocessing", "ensemble", "tensorrt_llm", "tensorrt_llm_bls")
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def parse_config(text: str):
    """Triton's ModelConfig of a template: unquoted placeholders get a value that parses (a data type
    placeholder becomes TYPE_FP32 and is reported by name)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    dtype_placeholders: dict[str, str] = {}

    def unquoted(match: re.Match) -> str:
        line_start = text.rfind("\n", 0, match.start()) + 1
        prefix = text[line_start:match.start()]
        if '"' in prefix:
            return match.group(0)
        if "data_type" in prefix:
            return "TYPE_FP32"
        if "decoupled" in prefix:
            return "true"
        return "1"

    # remember which tensor had a placeholder data type
    for block in re.finditer(r"name:\s*\"(\w+)\"[^{}]*?data_type:\s*\$\{(\w+)\}", text):
        dtype_placeholders[block.group(1)] = block.group(2)
    config = model_config_pb2.ModelConfig()
    text_format.Parse(PLACEHOLDER.sub(unquoted, text), config)
    return config, dtype_placeholders


def tensor_record(t, dtype_placeholders: dict[str, str]) -> dict:
    from tritonclient.grpc import model_config_pb2

    record = {"name": t.name, "data_type": model_config_pb2.DataType.Name(t.data_type).removeprefix("TYPE_"),
              "dims": list(t.dims), "optional": bool(getattr(t, "optional", False))}
    if t.name in dtype_placeholders:
        record["data_type"] = "${%s}" % dtype_placeholders[t.name]
    if t.HasField("reshape"):
        record["reshape"] = list(t.reshape.shape)
    if getattr(t, "allow_ragged_batch", False):
        record["allow_ragged_batch"] = True
    return record


def record(checkout: Path, tag: str) -> dict:
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    models = {}
    for model in MODELS:
        path = f"all_models/inflight_batcher_llm/{model}/config.pbtxt"
        text = (checkout / path).read_text(encoding="utf-8")
        config, dtypes = parse_config(text)
        decoupled = re.search(r"decoupled:\s*(\S+)", text)
        models[model] = {
            "path": path,
            "decoupled": decoupled.group(1) if decoupled else False,
            "inputs": [tensor_record(t, dtypes) for t in config.input],
            "outputs": [tensor_record(t, dtypes) for t in config.output],
        }
        if config.HasField("ensemble_scheduling"):
            models[model]["steps"] = [{"model_name": step.model_name, "input_map": dict(step.input_map),
                                       "output_map": dict(step.output_map)}
                                      for step in config.ensemble_scheduling.step]
    return {"repository": "NVIDIA/tensorrtllm_backend", "tag": tag, "commit": commit, "models": models}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", type=Path, help="a tensorrtllm_backend checkout at the tag")
    parser.add_argument("--tag", required=True, help="the tag checked out (recorded with the data)")
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    if not (args.checkout / "all_models/inflight_batcher_llm").is_dir():
        print(f"error: {args.checkout} is not a tensorrtllm_backend checkout", file=sys.stderr)
        return 2
    args.output.write_text(json.dumps(record(args.checkout, args.tag), indent=1) + "\n", encoding="utf-8")
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
