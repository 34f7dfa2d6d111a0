"""Benchmark `bayling merge` against the naive whole-model merge and a plain copy.

    .venv/bin/python benchmarks/bench_merge.py                  # one ~2 GB model
    .venv/bin/python benchmarks/bench_merge.py --size 2GB --size 4GB

For each size it builds a synthetic LLaMA-shaped checkpoint pair in float16
(base ~ N(0, 0.02); target = base + 1% noise; delta = target - base, as
apply_delta.py's make_diff writes it), as safetensors shards with an index,
and then measures, each in a fresh child process and with the inputs in the
page cache:

* copy   - the physical limit: read the base and the delta, write the base's
           bytes to a new folder (shutil.copyfile, i.e. sendfile) and fsync;
* ours   - bayling.build_engine.merge.merge(), the code behind `bayling merge`;
* naive  - BayLing's apply_delta.py with transformers: both models whole in
           float16, param.data += base, save_pretrained.

The three run in turn, --repeat times (default 3). It reports the median wall
time (the whole child process, imports included), the median work time (timed
inside the child, after its imports), output bytes per second of work time,
and the largest peak RSS (VmHWM of the child), and checks that ours and naive
hold the same tensors bit for bit. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Peak RSS of the child itself: VmHWM of its own address space (ru_maxrss of a child also counts the
# parent's memory at fork time, before exec).
HWM = r"""
def HWM():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

COPY_CHILD = HWM + r"""
import json, os, shutil, sys, time
base, delta, out = sys.argv[1:4]
t0 = time.monotonic()
os.makedirs(out)
buf = bytearray(16 << 20)
for name in sorted(os.listdir(delta)):
    if name.endswith(".safetensors"):
        with open(os.path.join(delta, name), "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
n = 0
for name in sorted(os.listdir(base)):
    if name.endswith(".safetensors"):
        dst = os.path.join(out, name)
        shutil.copyfile(os.path.join(base, name), dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())
        n += os.path.getsize(dst)
print(json.dumps({"work_s": time.monotonic() - t0, "bytes": n, "hwm": HWM()}))
"""

OURS_CHILD = HWM + r"""
import json, sys, time
from bayling.build_engine.merge import merge
import torch, safetensors
base, delta, out = sys.argv[1:4]
t0 = time.monotonic()
r = merge(base, delta, out)
print(json.dumps({"work_s": time.monotonic() - t0, "bytes": r.bytes_written, "hwm": HWM()}))
"""

NAIVE_CHILD = HWM + r"""
import json, os, sys, time
import torch
from transformers import AutoModelForCausalLM
base_path, delta_path, out = sys.argv[1:4]
t0 = time.monotonic()
base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float16, low_cpu_mem_usage=True)
delta = AutoModelForCausalLM.from_pretrained(delta_path, dtype=torch.float16, low_cpu_mem_usage=True)
base_sd = base.state_dict()
for name, param in delta.state_dict().items():
    assert name in base_sd
    param.data += base_sd[name]
delta.save_pretrained(out)
n = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
print(json.dumps({"work_s": time.monotonic() - t0, "bytes": n, "hwm": HWM()}))
"""


def dims_for(size: int) -> dict:
    """LLaMA-shaped dimensions (hidden 2048, MLP 5504, vocab 32000) with as many layers as fit in ``size`` bytes."""
    vocab, hidden, inter = 32000, 2048, 5504
    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)
    fixed = 2 * (2 * vocab * hidden + hidden)
    layers = max(1, round((size - fixed) / per_layer))
    return {"vocab": vocab, "hidden": hidden, "inter": inter, "layers": layers,
            "bytes": fixed + layers * per_layer}


def build_pair(root: Path, dims: dict, shard_bytes: int) -> tuple[Path, Path]:
    """Write base/ and delta/ (safetensors shards + index + config.json), one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO / "tests"))
    from _merge_helpers import llama_config, llama_shapes  # noqa: E402

    shapes = llama_shapes(dims["vocab"], dims["hidden"], dims["inter"], dims["layers"])
    config = llama_config(dims["vocab"], dims["hidden"], dims["inter"], dims["layers"])
    config.update(num_attention_heads=16, num_key_value_heads=16)
    groups, size = [[]], 0
    for name, shape in shapes.items():
        n = 2 * torch.Size(shape).numel()
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    base_dir, delta_dir = root / "base", root / "delta"
    for d in (base_dir, delta_dir):
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config, indent=1))
    weight_map = {}
    gen = torch.Generator().manual_seed(0)
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        base, delta = {}, {}
        for name in group:
            shape = shapes[name]
            if len(shape) == 1:
                b = (0.4 + 0.1 * torch.randn(shape, generator=gen)).half()
            else:
                b = (0.02 * torch.randn(shape, generator=gen)).half()
            noise = torch.randn(shape, generator=gen).mul_(0.01 * b.float().pow(2).mean().sqrt())
            target = noise.add_(b.float()).half()
            base[name], delta[name] = b, target - b
            weight_map[name] = fname
        save_file(base, str(base_dir / fname), metadata={"format": "pt"})
        save_file(delta, str(delta_dir / fname), metadata={"format": "pt"})
        del base, delta
    for d in (base_dir, delta_dir):
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": dims["bytes"]}, "weight_map": weight_map}, indent=1))
    return base_dir, delta_dir


def warm(*folders: Path) -> None:
    buf = bytearray(16 << 20)
    for folder in folders:
        for p in sorted(folder.iterdir()):
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def measure(code: str, *args: Path) -> dict:
    """Run ``code`` in a fresh Python; wall time, the child's own JSON report and its peak RSS."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed ({proc.returncode}): {code[:60]}...")
    report = json.loads(out.strip().splitlines()[-1])
    report.update(wall_s=wall, peak_rss=report.pop("hwm"))
    return report


def same_tensors(a: Path, b: Path) -> bool:
    import torch

    sys.path.insert(0, str(REPO))
    from bayling.build_engine.checkpoint import CheckpointReader

    with CheckpointReader(a) as ra, CheckpointReader(b) as rb:
        if set(ra.tensors) != set(rb.tensors):
            return False
        for name, info in ra.tensors.items():
            step = 8 << 20
            for lo in range(0, info.numel, step):
                hi = min(info.numel, lo + step)
                if not torch.equal(ra.read_range(name, lo, hi).view(torch.uint8),
                                   rb.read_range(name, lo, hi).view(torch.uint8)):
                    return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", action="append", help="model size, e.g. 2GB (repeatable; default 2GB)")
    ap.add_argument("--input-shard-size", default="1GB", help="shard size of the synthetic inputs (default 1GB)")
    ap.add_argument("--workdir", default=None, help="where to build the checkpoints (default: a temporary folder)")
    ap.add_argument("--no-naive", action="store_true", help="skip the transformers whole-model merge")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each method; the table shows medians (default 3)")
    args = ap.parse_args()
    from bayling.sizes import parse_size

    sizes = [parse_size(s) for s in (args.size or ["2GB"])]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bayling-bench-merge-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"machine: {os.cpu_count()} cores ({cpu}), {mem / 2**30:.0f} GiB RAM; Python {platform.python_version()}, "
          f"torch {torch.__version__}; work folder {work}", flush=True)
    rows = []
    for size in sizes:
        dims = dims_for(size)
        root = work / f"model-{dims['bytes'] // 10**6}MB"
        if root.exists():
            shutil.rmtree(root)
        t0 = time.monotonic()
        base, delta = build_pair(root, dims, parse_size(args.input_shard_size))
        print(f"built {dims['bytes'] / 1e9:.2f} GB base + delta ({dims['layers']} layers) in "
              f"{time.monotonic() - t0:.0f} s", flush=True)
        methods = [("copy", COPY_CHILD), ("ours", OURS_CHILD)] + ([] if args.no_naive else [("naive", NAIVE_CHILD)])
        runs: dict[str, list[dict]] = {m: [] for m, _ in methods}
        for round_ in range(args.repeat):  # interleaved, so that drift in the machine affects all alike
            for method, code in methods:
                out = root / f"out-{method}"
                shutil.rmtree(out, ignore_errors=True)
                warm(base, delta)
                os.sync()
                runs[method].append(measure(code, base, delta, out))
                print(f"  {method} #{round_ + 1}: {runs[method][-1]}", flush=True)
        shutil.rmtree(root / "out-copy", ignore_errors=True)
        results = {m: {"wall_s": statistics.median(r["wall_s"] for r in rs),
                       "work_s": statistics.median(r["work_s"] for r in rs),
                       "peak_rss": max(r["peak_rss"] for r in rs)} for m, rs in runs.items()}
        identical = same_tensors(root / "out-ours", root / "out-naive") if "naive" in results else None
        copy_rate = dims["bytes"] / results["copy"]["work_s"]
        for method, r in results.items():
            rate = dims["bytes"] / r["work_s"]
            naive = results.get("naive")
            rows.append((f"{dims['bytes'] / 1e9:.2f} GB", method, r["wall_s"], r["work_s"], rate, r["peak_rss"],
                         rate / copy_rate, naive and naive["work_s"] / r["work_s"], naive and naive["wall_s"] / r["wall_s"]))
        if identical is not None:
            print(f"  ours == naive, bit for bit: {identical}", flush=True)
            if not identical:
                return 1
        shutil.rmtree(root)
    print()
    print("| model | method | wall s | work s | MB/s (work) | peak RSS MiB | speed vs copy (work) "
          "| naive time / this (work) | naive time / this (wall) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for model, method, wall, work_s, rate, rss, vs_copy, sp_work, sp_wall in rows:
        fmt = lambda x: f"{x:.1f}x" if x else "-"  # noqa: E731
        print(f"| {model} | {method} | {wall:.1f} | {work_s:.2f} | {rate / 1e6:.0f} | {rss / 2**20:.0f} | "
              f"{100 * vs_copy:.0f}% | {fmt(sp_work)} | {fmt(sp_wall)} |")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
