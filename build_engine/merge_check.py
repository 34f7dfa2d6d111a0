"""The base check: is the base the model the delta was made from? (See merge.py's docstring.)"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from bayling.errors import BaylingError

from .merge_plan import FORMAT, MANIFEST, SAMPLE, Options, PlannedTensor

MIN_JUDGED = 1024                # matrices with fewer elements are not used for the base check
ABORT_AFTER = 3                  # stop once this many matrices failed (and they are the majority)


def sample_step(shape: tuple[int, ...], numel: int) -> int:
    """Stride of the fixed sample: at most SAMPLE elements, not aligned with rows (no single column)."""
    if numel <= SAMPLE:
        return 1
    step = -(-numel // SAMPLE)
    last = shape[-1] if shape else 1
    while math.gcd(step, last) != 1:
        step += 1
    return step


def _round(x: float) -> float:
    if not math.isfinite(x):
        return x
    return float(f"{x:.6g}")


def tensor_stats(mode: str, base_sample, other_sample) -> dict:
    """Statistics of one tensor from its float16 samples (base and delta, or base and target)."""
    import torch

    b, o = base_sample, other_sample
    if mode == "merge":
        d = o
        inexact = int(torch.count_nonzero((b + d) - b != d))
    else:
        d = o - b
        inexact = int(torch.count_nonzero(b + d != o))
    n = b.numel()
    bf, df = b.float(), d.float()
    base_rms = math.sqrt(float(torch.dot(bf, bf)) / n) if n else 0.0
    delta_rms = math.sqrt(float(torch.dot(df, df)) / n) if n else 0.0
    ratio = delta_rms / base_rms if base_rms > 0 else (0.0 if delta_rms == 0 else math.inf)
    return {
        "sampled": n,
        "base_rms": _round(base_rms),
        "delta_rms": _round(delta_rms),
        "ratio": _round(ratio),
        "inexact": _round(inexact / n) if n else 0.0,
        "delta_max_abs": _round(float(d.abs().max())) if n else 0.0,
        "base_fingerprint": hashlib.sha256(b.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:32],
    }


class CheckFailed(BaylingError):
    """The inputs are wrong: the caller removes the partial output."""


class BaseCheck:
    """Judges, tensor by tensor, whether the base is the one the delta was made from."""

    def __init__(self, mode: str, opts: Options, base_dir: Path, other_dir: Path, out: Path,
                 recorded: dict[str, str]):
        self.mode, self.opts, self.recorded = mode, opts, recorded
        self.base_dir, self.other_dir, self.out = base_dir, other_dir, out
        self.judged: list[str] = []
        self.failed: list[tuple[str, dict, str]] = []
        self.fingerprint_mismatch: list[str] = []

    def add(self, t: PlannedTensor, stats: dict) -> None:
        rec = self.recorded.get(t.name)
        if rec is not None and rec != stats["base_fingerprint"]:
            self.fingerprint_mismatch.append(t.name)
            if not self.opts.skip_base_check:
                raise CheckFailed(
                    f"the base differs from the one this delta was made from: tensor '{t.name}' of {self.base_dir} "
                    f"does not match the fingerprint that 'bayling merge --make-diff' recorded in "
                    f"{self.other_dir / MANIFEST}. Use the exact base model the delta was made from; nothing was "
                    f"kept in {self.out}. To merge anyway, re-run with --skip-base-check.")
        if len(t.shape) < 2 or t.numel < MIN_JUDGED or stats["base_rms"] == 0:
            return
        self.judged.append(t.name)
        reasons = []
        if stats["ratio"] > self.opts.max_delta_ratio:
            reasons.append("ratio")
        if stats["inexact"] > self.opts.max_inexact:
            reasons.append("inexact")
        if reasons:
            self.failed.append((t.name, stats, "+".join(reasons)))
            if (not self.opts.skip_base_check and len(self.failed) >= ABORT_AFTER
                    and 2 * len(self.failed) > len(self.judged)):
                raise CheckFailed(self.explain())

    def finish(self) -> None:
        if (not self.opts.skip_base_check and self.judged and self.failed
                and 2 * len(self.failed) > len(self.judged)):
            raise CheckFailed(self.explain())

    def explain(self) -> str:
        name, s, reasons = self.failed[0]
        what = ("the base model does not match this delta" if self.mode == "merge"
                else "the target does not look like a fine-tune of this base")
        head = (f"{what}: {len(self.failed)} of the first {len(self.judged)} weight matrices checked fail. "
                f"Example '{name}': ")
        if "ratio" in reasons and s["ratio"] > self.opts.max_delta_ratio:
            body = (f"rms(delta)/rms(base) = {s['ratio']:.3g}, where a fine-tune changes weights by a small fraction "
                    f"(limit --max-delta-ratio {self.opts.max_delta_ratio:g}). "
                    + ("Were --base and --delta swapped, or is the base another or an untrained model? "
                       if self.mode == "merge" else "Is the target a fine-tune of this base at all? "))
        else:
            if self.mode == "merge":
                body = (f"adding the delta to the base in float16 and subtracting the base again gives back the delta "
                        f"for only {100 * (1 - s['inexact']):.1f}% of {s['sampled']} sampled elements (limit "
                        f"--max-inexact {self.opts.max_inexact:g}); with the base a float16 delta was made from it is "
                        f"about 100%, because target - base is exact in float16 for a fine-tune, while the delta's "
                        f"low bits do not line up with another base's float16 spacing (rms(delta)/rms(base) = "
                        f"{s['ratio']:.3g}). This usually means the wrong base model, for example Llama-2 instead of "
                        f"the original LLaMA-1, or a differently converted copy. ")
            else:
                body = (f"base + (target - base) in float16 gives back the target for only "
                        f"{100 * (1 - s['inexact']):.1f}% of {s['sampled']} sampled elements (limit --max-inexact "
                        f"{self.opts.max_inexact:g}), so the delta would not reproduce the target; a fine-tune of "
                        f"this base gives about 100%. ")
        tail = (f"Nothing was kept in {self.out}. If you are sure the inputs are right "
                + ("(for example a delta computed in float32 by another tool) " if self.mode == "merge" else "")
                + "re-run with --skip-base-check.")
        return head + body + tail

    def summary(self) -> dict:
        verdict = "ok"
        if self.failed or self.fingerprint_mismatch:
            verdict = "skipped" if self.opts.skip_base_check else "warnings"
        return {
            "verdict": verdict,
            "skip_base_check": self.opts.skip_base_check,
            "max_delta_ratio": self.opts.max_delta_ratio,
            "max_inexact": self.opts.max_inexact,
            "judged": len(self.judged),
            "failed": [{"tensor": n, "reason": r, "ratio": s["ratio"], "inexact": s["inexact"]}
                       for n, s, r in self.failed],
            "recorded_fingerprints": len(self.recorded),
            "fingerprint_mismatches": self.fingerprint_mismatch,
        }


def recorded_fingerprints(other_dir: Path) -> dict[str, str]:
    """Base fingerprints that 'bayling merge --make-diff' left in a delta folder, if any."""
    path = other_dir / MANIFEST
    if not path.is_file():
        return {}
    try:
        man = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if man.get("format") != FORMAT or man.get("mode") != "make-diff" or man.get("sample") != SAMPLE:
        return {}
    return {n: t["stats"]["base_fingerprint"] for n, t in man.get("tensors", {}).items()
            if t.get("stats", {}).get("base_fingerprint")}
