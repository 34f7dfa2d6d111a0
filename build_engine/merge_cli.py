"""Apply, make or verify a BayLing weight difference (delta) over LLaMA.

BayLing-7B/13B-v1.0 are published as weight differences over the original
LLaMA. This command turns them into a usable model, one tensor at a time:
memory stays at a few hundred MB whatever the model size.

Three modes:

  bayling merge --base LLAMA_DIR --delta DELTA_DIR --output OUT_DIR
      Apply a delta: OUT = BASE + DELTA for every tensor of the delta, in
      float16 (bit for bit what BayLing's apply_delta.py computes). Writes
      safetensors shards, model.safetensors.index.json, config and tokenizer
      files copied from DELTA_DIR, and the manifest bayling-merge.json.

  bayling merge --make-diff --base LLAMA_DIR --target TARGET_DIR --output DELTA_DIR
      The reverse: DELTA = TARGET - BASE in float16, config and tokenizer from
      TARGET_DIR. Its manifest also records a fingerprint of the base, so that
      a later merge of this delta recognizes a wrong base for certain.

  bayling merge --verify OUT_DIR
      Re-check a finished output: every file's size and SHA-256 against the
      manifest, and the index against the shards.

Inputs are Hugging Face folders with safetensors or PyTorch .bin shards, with
or without an index file (.bin files are loaded with weights_only: no pickled
code runs).

Checks, before anything is written: every delta tensor exists in the base with
the same shape and a compatible dtype, no input file is truncated or damaged,
and the output's file system has room for it. While merging, each weight
matrix is checked against the base: a fine-tune's delta is small next to the
base (--max-delta-ratio), and a float16 delta made from this very base adds
back exactly (--max-inexact); a wrong base of the same shapes, for example
Llama-2 instead of LLaMA-1, fails the second test for about 30% of elements
and the merge stops after the first few matrices, removing what it wrote.
--skip-base-check turns this off.

Interrupted? Run the same command again: shards are written under temporary
names and renamed when complete, finished shards are re-hashed and kept, and
the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import argparse
import sys

# merge.py imports torch only when it runs, so this stays light
from .merge_plan import DEFAULT_MAX_INEXACT, DEFAULT_MAX_RATIO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_argument_group("mode (default: apply a delta)")
    mode.add_argument("--make-diff", action="store_true", help="compute DELTA = TARGET - BASE instead")
    mode.add_argument("--verify", metavar="OUT_DIR", help="re-check a finished output against its manifest, then exit")
    io = parser.add_argument_group("folders")
    io.add_argument("--base", metavar="LLAMA_DIR", help="the base model (LLaMA) in Hugging Face format")
    io.add_argument("--delta", metavar="DELTA_DIR", help="the weight difference to apply (merge mode)")
    io.add_argument("--target", metavar="TARGET_DIR", help="the fine-tuned model (--make-diff mode)")
    io.add_argument("--output", "-o", metavar="OUT_DIR", help="where to write the result (new or empty folder)")
    opt = parser.add_argument_group("merge options")
    opt.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                     help="largest output shard, e.g. 2GB, 5GB, 500MB, 4GiB (default: %(default)s)")
    opt.add_argument("--threads", type=int, default=None, metavar="N",
                     help="PyTorch threads for the arithmetic (default: 1; reading, hashing and writing run in their own threads)")
    opt.add_argument("--keep-free", default="256MiB", metavar="SIZE",
                     help="disk space that must remain free on the output's file system (default: %(default)s)")
    opt.add_argument("--force", action="store_true",
                     help="replace model files already in OUT_DIR from a different merge or another source")
    chk = parser.add_argument_group("base check")
    chk.add_argument("--skip-base-check", action="store_true",
                     help="record the base-check statistics but do not stop when they look wrong")
    chk.add_argument("--max-delta-ratio", type=float, default=DEFAULT_MAX_RATIO, metavar="R",
                     help="largest rms(delta)/rms(base) of a weight matrix (default: %(default)s)")
    chk.add_argument("--max-inexact", type=float, default=DEFAULT_MAX_INEXACT, metavar="F",
                     help="largest fraction of sampled elements for which fl16(base + delta) - base != delta "
                          "(default: %(default)s)")


def _options(args: argparse.Namespace):
    from bayling.sizes import parse_size

    from .merge_plan import Options

    return Options(max_shard_size=parse_size(args.max_shard_size), threads=args.threads,
                   skip_base_check=args.skip_base_check, max_delta_ratio=args.max_delta_ratio,
                   max_inexact=args.max_inexact, keep_free=parse_size(args.keep_free), force=args.force)


def main(args: argparse.Namespace) -> int:
    from bayling.errors import BaylingError
    from bayling.sizes import format_bytes

    if args.verify:
        if args.base or args.delta or args.target or args.output or args.make_diff:
            raise BaylingError("--verify OUT_DIR takes no other folders")
        from .merge import verify

        report = verify(args.verify)
        extra = f"; leftover temporary files: {', '.join(report['leftovers'])}" if report["leftovers"] else ""
        print(f"{args.verify}: OK ({report['mode']}, {report['tensors']} tensors, {report['files']} files, "
              f"{format_bytes(report['bytes'])}, base check: {report['base_check']}){extra}")
        return 0

    other_flag, other = ("--target", args.target) if args.make_diff else ("--delta", args.delta)
    wrong_flag = "--delta" if args.make_diff else "--target"
    if (args.delta if args.make_diff else args.target):
        raise BaylingError(f"{wrong_flag} does not belong to this mode; "
                           + ("--make-diff takes --base, --target and --output" if args.make_diff
                              else "use --make-diff to compute a delta from --target"))
    missing = [f for f, v in (("--base", args.base), (other_flag, other), ("--output", args.output)) if not v]
    if missing:
        raise BaylingError(f"missing {', '.join(missing)} (see 'bayling merge --help')")
    from .merge import make_diff, merge

    run = make_diff if args.make_diff else merge
    result = run(args.base, other, args.output, _options(args))
    for w in result.warnings:
        print(f"bayling merge: warning: {w}", file=sys.stderr)
    shards = len([f for f in result.manifest["files"] if f.endswith(".safetensors")])
    if result.already_complete:
        print(f"{args.output}: already complete and verified ({shards} shards); nothing to do")
        return 0
    rate = result.bytes_written / result.seconds if result.seconds > 0 else 0.0
    resumed = f", {result.resumed_shards} kept from an earlier run" if result.resumed_shards else ""
    print(f"{args.output}: wrote {result.written_shards} of {shards} shards{resumed}, "
          f"{format_bytes(result.bytes_written)} in {result.seconds:.1f} s ({format_bytes(rate)}/s); "
          f"base check: {result.manifest['base_check']['verdict']}")
    return 0
