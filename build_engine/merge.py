"""Apply (or make) a BayLing weight difference, streaming, with bounded memory.

``merge(base, delta, output)`` writes ``target = base + delta`` and
``make_diff(base, target, output)`` writes ``delta = target - base``, both in
float16 and bit for bit what PyTorch gives for the two float16 tensors (the
arithmetic of BayLing's ``apply_delta.py``). ``verify(output)`` re-checks a
finished output against its manifest.

How it works
------------
* Plan first. Every input file is opened and checked (headers, sizes), every
  tensor of the delta (target) is matched by name, shape and kind of dtype
  with the base, and the output shard layout (names, headers, exact sizes) is
  fixed before any byte is written. Missing tensors, mismatches, damaged
  inputs and a lack of disk space therefore fail before the output exists.
* Stream. A reader thread reads chunks of at most ``CHUNK_BYTES`` from both
  inputs into a fixed pool of buffers, the main thread adds (subtracts) them in
  place and takes a small sample for the statistics, a hasher thread feeds the
  shard's SHA-256 and a writer thread writes the chunks into the shard file,
  dropping what is written back from the page cache. Memory use is the buffer
  pool plus one chunk in conversion, whatever the model or tensor size.
* Safe output. Each shard is written as ``NAME.tmp``, fsynced and renamed, so a
  shard file under its final name is always complete. After every shard a
  journal (``bayling-merge.journal.json``) records its SHA-256; a re-run with
  the same inputs re-hashes those shards, keeps the good ones and writes the
  rest. The index, the copied config/tokenizer files and finally the manifest
  (``bayling-merge.json``) come last; an output without the manifest is not
  finished. Output bytes are deterministic, so a resumed run ends with exactly
  the bytes of an uninterrupted one.
* Base check. From a fixed sample of each weight matrix (at most
  ``SAMPLE`` elements) two statistics are computed: ``ratio`` =
  rms(delta)/rms(base), which is small for a fine-tune, and ``inexact``, the
  fraction of elements for which ``fl16(base + delta) - base != delta``.
  BayLing's published deltas were computed as ``target - base`` in float16;
  with the base they were made from that subtraction is exact (Sterbenz), so
  ``inexact`` is about 0, while with another base of the same shapes and
  scale (Llama-2 instead of LLaMA-1) the delta's low bits do not line up with
  that base's float16 spacing and roughly 30% of elements round. A delta
  written by ``--make-diff`` also records a fingerprint of the base's sampled
  elements, which a later merge compares exactly. See docs/merge.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bayling import __version__
from bayling.errors import BaylingError
from bayling.files import fsync_dir, write_atomically
from bayling.progress import progress
from bayling.sizes import format_bytes

from .checkpoint import CheckpointReader, TensorInfo, natural_key

FORMAT = "bayling-merge/1"
MANIFEST = "bayling-merge.json"
JOURNAL = "bayling-merge.journal.json"
INDEX = "model.safetensors.index.json"

SAMPLE = 1 << 16                 # elements sampled per tensor for the statistics and the fingerprint
CHUNK_BYTES = 16 * 1024 * 1024   # largest read, per input, per step
POOL_BUFFERS = 10                # chunk buffers in flight between reader, adder, hasher and writer
MIN_JUDGED = 1024                # matrices with fewer elements are not used for the base check
ABORT_AFTER = 3                  # stop once this many matrices failed (and they are the majority)
HASH_BLOCK = 16 * 1024 * 1024

DEFAULT_MAX_SHARD = 2 * 1000**3  # "2GB", as Hugging Face counts
DEFAULT_KEEP_FREE = 256 * 1024**2
DEFAULT_MAX_RATIO = 0.5
DEFAULT_MAX_INEXACT = 0.05

# Files copied from the delta (merge) or the target (make-diff) next to the weights.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json",
              "chat_template.jinja", "tokenizer.model.v3", "preprocessor_config.json")


@dataclass
class Options:
    max_shard_size: int = DEFAULT_MAX_SHARD
    threads: int | None = None
    skip_base_check: bool = False
    max_delta_ratio: float = DEFAULT_MAX_RATIO
    max_inexact: float = DEFAULT_MAX_INEXACT
    keep_free: int = DEFAULT_KEEP_FREE
    force: bool = False
    chunk_bytes: int = CHUNK_BYTES  # largest read per input per step; does not change the output


# ---------------------------------------------------------------------------------------------------------
# Plan


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str          # output dtype (safetensors name)
    kind: str           # "add" (merge), "sub" (make-diff) or "copy" (non-float tensors)
    base: TensorInfo | None
    other: TensorInfo
    offset: int = 0     # within the shard's data section

    @property
    def numel(self) -> int:
        return self.other.numel

    @property
    def nbytes(self) -> int:
        return self.numel * (2 if self.dtype == "F16" else self.other.itemsize)


@dataclass
class PlannedShard:
    name: str
    tensors: list[PlannedTensor]
    header: bytes = b""

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def size(self) -> int:
        return len(self.header) + self.data_bytes


@dataclass
class Plan:
    mode: str
    shards: list[PlannedShard]
    ignored_base: list[str]
    plan_id: str = ""

    @property
    def tensors(self) -> list[PlannedTensor]:
        return [t for s in self.shards for t in s.tensors]


def _safetensors_header(tensors: list[PlannedTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for t in tensors:
        t.offset = pos
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _other_role(mode: str) -> str:
    return "delta" if mode == "merge" else "target"


def make_plan(mode: str, base: CheckpointReader, other: CheckpointReader, max_shard_size: int) -> Plan:
    role = _other_role(mode)
    names = sorted(other.tensors, key=natural_key)
    missing = [n for n in names if n not in base.tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BaylingError(f"missing parameter: the base {base.folder} has no tensor '{missing[0]}'{more}, which the "
                           f"{role} {other.folder} has; is {base.folder} the right base model?")
    planned = []
    for n in names:
        b, o = base.tensors[n], other.tensors[n]
        if b.shape != o.shape:
            raise BaylingError(f"shape mismatch for tensor '{n}': base {list(b.shape)}, {role} {list(o.shape)} "
                               f"(is {base.folder} the right base model?)")
        if b.is_float != o.is_float or (not o.is_float and b.dtype != o.dtype):
            raise BaylingError(f"dtype mismatch for tensor '{n}': base {b.dtype}, {role} {o.dtype} "
                               "(floating-point tensors are combined in float16; other tensors must have the same dtype)")
        if o.is_float:
            planned.append(PlannedTensor(n, o.shape, "F16", "add" if mode == "merge" else "sub", b, o))
        else:  # integer/bool buffers are not differences: carried over from the delta (target) unchanged
            planned.append(PlannedTensor(n, o.shape, o.dtype, "copy", b, o))
    groups: list[list[PlannedTensor]] = []
    size = 0
    for t in planned:
        if not groups or (groups[-1] and size + t.nbytes > max_shard_size):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    count = len(groups)
    shards = [PlannedShard(f"model-{i + 1:05d}-of-{count:05d}.safetensors", g) for i, g in enumerate(groups)]
    for s in shards:
        s.header = _safetensors_header(s.tensors)
    ignored = sorted((n for n in base.tensors if n not in other.tensors), key=natural_key)
    plan = Plan(mode, shards, ignored)
    ident = {
        "format": FORMAT, "mode": mode, "sample": SAMPLE,
        "base": {"path": str(base.folder.resolve()), "files": base.fingerprint()},
        role: {"path": str(other.folder.resolve()), "files": other.fingerprint()},
        "shards": [[s.name, hashlib.sha256(s.header).hexdigest()] for s in shards],
        "kinds": [t.kind for t in planned],
    }
    plan.plan_id = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return plan


# ---------------------------------------------------------------------------------------------------------
# Statistics and the base check


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


class _CheckFailed(BaylingError):
    """The inputs are wrong: the partial output is removed."""


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
                raise _CheckFailed(
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
                raise _CheckFailed(self.explain())

    def finish(self) -> None:
        if (not self.opts.skip_base_check and self.judged and self.failed
                and 2 * len(self.failed) > len(self.judged)):
            raise _CheckFailed(self.explain())

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


def _recorded_fingerprints(other_dir: Path) -> dict[str, str]:
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


# ---------------------------------------------------------------------------------------------------------
# Files


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def sha256_file(path: Path, advance: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    buf = bytearray(HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            if advance:
                advance(n)
    return h.hexdigest()


def _side_files(folder: Path) -> list[Path]:
    return [folder / n for n in SIDE_FILES if (folder / n).is_file()]


def _our_files(out: Path, plan: Plan | None) -> list[Path]:
    """Files a merge writes into ``out`` (with their temporary names)."""
    names = {MANIFEST, JOURNAL, INDEX}
    if plan is not None:
        names.update(s.name for s in plan.shards)
    names.update(p.name for p in out.glob("model-*-of-*.safetensors"))
    names.update(SIDE_FILES)
    paths = []
    for n in names:
        paths += [out / n, out / (n + ".tmp")]
    return paths


def _remove(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _check_paths(out: Path, base_dir: Path, other_dir: Path, role: str) -> None:
    for d, r in ((base_dir, "base"), (other_dir, role)):
        if d.exists() and out.exists() and os.path.samefile(d, out):
            raise BaylingError(f"--output {out} is the {r} folder; choose a new folder for the result")


# ---------------------------------------------------------------------------------------------------------
# The pipeline: reader thread -> adder (this thread) -> hasher thread -> writer thread


class _Stop(Exception):
    pass


class _Pipeline:
    def __init__(self):
        self.abort = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.abort.set()

    def put(self, q: queue.Queue, item: Any) -> None:
        while True:
            if self.abort.is_set():
                raise _Stop
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self, q: queue.Queue) -> Any:
        while True:
            if self.abort.is_set():
                raise _Stop
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue


class _Pool:
    """At most ``count`` buffers of ``nbytes``; get() waits for one to come back."""

    def __init__(self, pipe: _Pipeline, count: int, nbytes: int):
        self.pipe, self.count, self.nbytes = pipe, count, nbytes
        self.free: queue.Queue = queue.Queue()
        self.made = 0

    def get(self):
        import torch

        try:
            return self.free.get_nowait()
        except queue.Empty:
            pass
        if self.made < self.count:
            self.made += 1
            return torch.empty(self.nbytes, dtype=torch.uint8)
        return self.pipe.get(self.free)

    def put(self, buf) -> None:
        self.free.put(buf)


@dataclass
class _Item:
    shard: PlannedShard
    tensor: PlannedTensor
    lo: int
    hi: int
    base: Any
    other: Any
    bufs: list
    out: Any = None
    data: Any = None    # the result's bytes (a memoryview of ``out``)
    stats: dict | None = None
    digest: str = ""    # SHA-256 of the shard, on its last item

    @property
    def first(self) -> bool:
        return self.lo == 0

    @property
    def last(self) -> bool:
        return self.hi == self.tensor.numel

    @property
    def first_of_shard(self) -> bool:
        return self.first and self.tensor is self.shard.tensors[0]

    @property
    def last_of_shard(self) -> bool:
        return self.last and self.tensor is self.shard.tensors[-1]


_DONE = object()


def _journal_write(out: Path, plan: Plan, done: dict) -> None:
    write_atomically(out / JOURNAL, _json_bytes({"format": FORMAT, "plan_id": plan.plan_id, "done": done}))


def _drop_behind(fd: int, offset: int, length: int) -> None:
    """Start writeback of a written range, and drop it from the page cache once it is clean.

    A long merge then neither floods the page cache with output (evicting the
    inputs) nor leaves gigabytes of dirty pages for the final fsync.
    """
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data)
        data = data[n:]


def _run_pipeline(plan: Plan, todo: list[PlannedShard], base: CheckpointReader, other: CheckpointReader,
                  out: Path, check: BaseCheck, done: dict, advance: Callable[[int], None], chunk_bytes: int) -> None:
    """reader thread -> add/subtract + statistics (this thread) -> hasher thread -> writer thread."""
    import torch

    pipe = _Pipeline()
    pool = _Pool(pipe, POOL_BUFFERS, chunk_bytes)
    q_read: queue.Queue = queue.Queue(maxsize=2)
    q_hash: queue.Queue = queue.Queue(maxsize=2)
    q_write: queue.Queue = queue.Queue(maxsize=2)

    def reader() -> None:
        try:
            for shard in todo:
                for t in shard.tensors:
                    width = max(t.other.itemsize, t.base.itemsize if t.kind != "copy" else 1)
                    step = max(1, chunk_bytes // width)
                    lo = 0
                    while True:
                        hi = min(t.numel, lo + step)
                        bufs, b = [], None
                        if t.kind != "copy":
                            bufs.append(pool.get())
                            b = base.read_range(t.name, lo, hi, out=bufs[-1])
                        bufs.append(pool.get())
                        o = other.read_range(t.name, lo, hi, out=bufs[-1])
                        pipe.put(q_read, _Item(shard, t, lo, hi, b, o, bufs))
                        lo = hi
                        if lo >= t.numel:
                            break
            pipe.put(q_read, _DONE)
        except _Stop:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            pipe.fail(exc)

    def hasher() -> None:
        try:
            h = None
            while True:
                item = pipe.get(q_hash)
                if item is _DONE:
                    pipe.put(q_write, _DONE)
                    return
                if item.first_of_shard:
                    h = hashlib.sha256(item.shard.header)
                h.update(item.data)
                if item.last_of_shard:
                    item.digest = h.hexdigest()
                pipe.put(q_write, item)
        except _Stop:
            pass
        except BaseException as exc:  # noqa: BLE001
            pipe.fail(exc)

    def writer() -> None:
        fd = None
        try:
            tmp = None
            pos = 0
            behind: list[tuple[int, int]] = []
            shard_stats: dict[str, dict] = {}
            while True:
                item = pipe.get(q_write)
                if item is _DONE:
                    return
                shard, t = item.shard, item.tensor
                if fd is None:
                    tmp = out / (shard.name + ".tmp")
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    _write_all(fd, memoryview(shard.header))
                    pos = len(shard.header)
                    shard_stats = {}
                    behind = []
                n = len(item.data)
                if n:
                    _write_all(fd, item.data)
                    _drop_behind(fd, pos, n)        # starts writeback of this chunk
                    behind.append((pos, n))
                    if len(behind) > 3:
                        _drop_behind(fd, *behind.pop(0))  # written back by now: frees its pages
                    pos += n
                item.data = item.out = item.base = item.other = None
                for buf in item.bufs:
                    pool.put(buf)
                advance(n)
                if item.last and item.stats is not None:
                    shard_stats[t.name] = item.stats
                if item.last_of_shard:
                    os.fsync(fd)
                    _drop_behind(fd, 0, 0)
                    os.close(fd)
                    fd = None
                    if tmp.stat().st_size != shard.size:
                        raise BaylingError(f"{tmp} has {tmp.stat().st_size} bytes, expected {shard.size}")
                    os.replace(tmp, out / shard.name)
                    fsync_dir(out)
                    done[shard.name] = {"sha256": item.digest, "size": shard.size, "tensors": shard_stats}
                    _journal_write(out, plan, done)
        except _Stop:
            pass
        except BaseException as exc:  # noqa: BLE001
            pipe.fail(exc)
        finally:
            if fd is not None:
                os.close(fd)

    threads = [threading.Thread(target=f, name=f"merge-{f.__name__}", daemon=True) for f in (reader, hasher, writer)]
    for th in threads:
        th.start()
    samples: tuple[list, list] = ([], [])
    try:
        while True:
            item = pipe.get(q_read)
            if item is _DONE:
                pipe.put(q_hash, _DONE)
                break
            t = item.tensor
            if t.kind == "copy":
                item.out = item.other
            else:
                b = item.base if item.base.dtype == torch.float16 else item.base.to(torch.float16)
                o = item.other if item.other.dtype == torch.float16 else item.other.to(torch.float16)
                if item.first:
                    samples = ([], [])
                step = sample_step(t.shape, t.numel)
                first = -(-item.lo // step) * step
                if first < item.hi:
                    samples[0].append(b[first - item.lo::step].clone())
                    samples[1].append(o[first - item.lo::step].clone())
                item.out = b.add_(o) if t.kind == "add" else o.sub_(b)
                if item.last:
                    if t.numel:
                        item.stats = tensor_stats(plan.mode, torch.cat(samples[0]), torch.cat(samples[1]))
                        check.add(t, item.stats)  # may stop the merge before this tensor is written
                    samples = ([], [])
            # buffers that do not hold the result go back to the pool now
            ptr = item.out.untyped_storage().data_ptr()
            keep = []
            for buf in item.bufs:
                (keep.append if buf.untyped_storage().data_ptr() == ptr else pool.put)(buf)
            item.bufs = keep
            item.base = item.other = None
            item.data = memoryview(item.out.contiguous().view(-1).view(torch.uint8).numpy())
            pipe.put(q_hash, item)
        for th in threads:
            while th.is_alive() and not pipe.abort.is_set():
                th.join(0.1)
    except _Stop:
        pass
    except BaseException as exc:
        pipe.fail(exc)
    finally:
        for th in threads:
            th.join(timeout=30)
    if pipe.error is not None:
        err = pipe.error
        if isinstance(err, OSError) and not isinstance(err, BaylingError):
            raise BaylingError(f"writing {out} failed: {err.strerror or err}") from err
        raise err


# ---------------------------------------------------------------------------------------------------------
# Entry points


@dataclass
class Result:
    output: Path
    manifest: dict
    resumed_shards: int = 0
    written_shards: int = 0
    already_complete: bool = False
    seconds: float = 0.0
    bytes_written: int = 0
    warnings: list[str] = field(default_factory=list)


def merge(base_dir, delta_dir, out_dir, opts: Options | None = None) -> Result:
    """``out = base + delta`` for every tensor of the delta, in float16."""
    return _run("merge", Path(base_dir), Path(delta_dir), Path(out_dir), opts or Options())


def make_diff(base_dir, target_dir, out_dir, opts: Options | None = None) -> Result:
    """``out = target - base`` for every tensor of the target, in float16."""
    return _run("make-diff", Path(base_dir), Path(target_dir), Path(out_dir), opts or Options())


def _tool_versions() -> dict:
    import safetensors
    import torch

    return {"bayling": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__}


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return p


def _run(mode: str, base_dir: Path, other_dir: Path, out: Path, opts: Options) -> Result:
    import torch

    # The arithmetic is a small part of the work; one thread leaves the cores to reading, hashing and writing.
    before = torch.get_num_threads()
    torch.set_num_threads(opts.threads or 1)
    try:
        return _run_locked(mode, base_dir, other_dir, out, opts)
    finally:
        torch.set_num_threads(before)


def _run_locked(mode: str, base_dir: Path, other_dir: Path, out: Path, opts: Options) -> Result:
    start = time.monotonic()
    role = _other_role(mode)
    if opts.max_shard_size <= 0:
        raise BaylingError("--max-shard-size must be positive")
    _check_paths(out, base_dir, other_dir, role)
    base = CheckpointReader(base_dir, "base")
    other = CheckpointReader(other_dir, role)
    created = False
    plan = None
    try:
        plan = make_plan(mode, base, other, opts.max_shard_size)
        side = _side_files(other_dir)
        if mode == "merge" and not (other_dir / "config.json").is_file():
            raise BaylingError(f"the delta folder {other_dir} has no config.json (the merged model takes its config "
                               "and tokenizer from the delta)")
        result = Result(out, {})

        # What is already there?
        done: dict[str, dict] = {}
        if out.exists():
            if not out.is_dir():
                raise BaylingError(f"--output {out} exists and is not a folder")
            man = _load_json(out / MANIFEST)
            jour = _load_json(out / JOURNAL)
            if man is not None and man.get("plan_id") == plan.plan_id:
                done = {s: man["files"][s] | {"tensors": {n: man["tensors"][n]["stats"] for n in man["tensors"]
                                                          if man["tensors"][n]["shard"] == s and
                                                          man["tensors"][n].get("stats")}}
                        for s in (sh.name for sh in plan.shards) if s in man.get("files", {})}
                result.already_complete = True
            elif jour is not None and jour.get("plan_id") == plan.plan_id:
                done = dict(jour.get("done", {}))
            elif any(out.iterdir()):
                if not opts.force:
                    what = ("a finished merge of other inputs" if man is not None else
                            "an interrupted merge of other inputs" if jour is not None else "other files")
                    raise BaylingError(f"--output {out} already holds {what}; choose a new folder, or pass --force "
                                       "to replace the model files in it")
                _remove(_our_files(out, plan) + [out / p.name for p in out.glob("*.bin")]
                        + [out / p.name for p in out.glob("*.safetensors")])

        # Keep only finished shards that are really intact.
        if done:
            with progress("checking finished shards", total=sum(d["size"] for d in done.values())) as p:
                for name in list(done):
                    path = out / name
                    ok = path.is_file() and path.stat().st_size == done[name]["size"]
                    if ok and sha256_file(path, p.advance) != done[name]["sha256"]:
                        ok = False
                    if not ok:
                        print(f"bayling merge: {name} is missing or changed; writing it again", file=sys.stderr)
                        del done[name]
                        result.already_complete = False
        if result.already_complete:
            bad = [f for f, info in man["files"].items() if f not in done and not _file_ok(out / f, info)]
            if not bad:
                result.manifest = man
                result.resumed_shards = len(done)
                result.seconds = time.monotonic() - start
                return result
            result.already_complete = False
        if (out / MANIFEST).exists():
            # from here on the output is not finished: the manifest goes first
            _journal_write(out, plan, done)
            (out / MANIFEST).unlink()

        todo = [s for s in plan.shards if s.name not in done]
        need = (sum(s.size for s in todo) + sum(p.stat().st_size for p in side)
                + 16384 + 1024 * len(plan.tensors))  # + index, journal and manifest
        free = shutil.disk_usage(_existing_ancestor(out)).free
        if free < need + opts.keep_free:
            raise BaylingError(f"not enough free disk space for {out}: the output needs {format_bytes(need)} more and "
                               f"{format_bytes(opts.keep_free)} must stay free (--keep-free), but the file system has "
                               f"{format_bytes(free)} free")
        if not out.exists():
            out.mkdir(parents=True)
            created = True
        for s in todo:
            _remove([out / (s.name + ".tmp")])
        _journal_write(out, plan, done)
        result.resumed_shards = len(done)
        if done:
            print(f"bayling merge: resuming: {len(done)} of {len(plan.shards)} shards already complete",
                  file=sys.stderr)

        check = BaseCheck(mode, opts, base_dir, other_dir, out,
                          _recorded_fingerprints(other_dir) if mode == "merge" else {})
        for name in sorted(done, key=natural_key):  # statistics of the shards kept from an earlier run
            for t in next(s for s in plan.shards if s.name == name).tensors:
                st = done[name].get("tensors", {}).get(t.name)
                if st is not None:
                    check.add(t, st)
        total = sum(s.data_bytes for s in todo)
        verb = "merging" if mode == "merge" else "making the difference"
        with progress(verb, total=total) as p:
            _run_pipeline(plan, todo, base, other, out, check, done, p.advance, opts.chunk_bytes)
        check.finish()
        result.written_shards = len(todo)
        result.bytes_written = total

        # Index, config and tokenizer, then the manifest.
        index = {"metadata": {"total_size": sum(s.data_bytes for s in plan.shards)},
                 "weight_map": {t.name: s.name for s in plan.shards for t in s.tensors}}
        write_atomically(out / INDEX, json.dumps(index, indent=2, sort_keys=True).encode() + b"\n")
        for src in side:
            data = src.read_bytes()
            write_atomically(out / src.name, data)
        files = {s.name: {"sha256": done[s.name]["sha256"], "size": done[s.name]["size"]} for s in plan.shards}
        for name in [INDEX] + [p.name for p in side]:
            files[name] = {"sha256": sha256_file(out / name), "size": (out / name).stat().st_size}
        stats = {n: st for d in done.values() for n, st in d.get("tensors", {}).items()}
        manifest = {
            "format": FORMAT,
            "mode": mode,
            "plan_id": plan.plan_id,
            "sample": SAMPLE,
            "tool": _tool_versions(),
            "inputs": {
                "base": {"path": str(base_dir.resolve()), "format": base.format, "files": base.fingerprint()},
                role: {"path": str(other_dir.resolve()), "format": other.format, "files": other.fingerprint()},
            },
            "options": {"max_shard_size": opts.max_shard_size},
            "base_check": check.summary(),
            "ignored_base_tensors": plan.ignored_base,
            "files": files,
            "tensors": {t.name: {"shard": s.name, "shape": list(t.shape), "dtype": t.dtype, "kind": t.kind,
                                 "stats": stats.get(t.name)} for s in plan.shards for t in s.tensors},
        }
        write_atomically(out / MANIFEST, _json_bytes(manifest))
        _remove([out / JOURNAL])
        result.manifest = manifest
        if check.failed or check.fingerprint_mismatch:
            result.warnings.append(
                f"base check: {len(check.failed)} of {len(check.judged)} matrices outside the limits"
                + (f", {len(check.fingerprint_mismatch)} fingerprint mismatches" if check.fingerprint_mismatch else "")
                + (" (--skip-base-check)" if opts.skip_base_check else "") + f"; see {out / MANIFEST}")
        if plan.ignored_base:
            result.warnings.append(f"{len(plan.ignored_base)} tensors of the base are not in the {role} and were "
                                   f"left out (as apply_delta.py does), e.g. '{plan.ignored_base[0]}'")
        result.seconds = time.monotonic() - start
        return result
    except _CheckFailed:
        if out.exists():
            _remove(_our_files(out, plan))
            if created or not any(out.iterdir()):
                try:
                    out.rmdir()
                except OSError:
                    pass
        raise
    except BaseException:
        if out.exists() and plan is not None:
            _remove([out / (s.name + ".tmp") for s in plan.shards])
            if created and not any(p for p in out.iterdir() if p.name != JOURNAL):
                _remove([out / JOURNAL])
                try:
                    out.rmdir()
                except OSError:
                    pass
        raise
    finally:
        base.close()
        other.close()


def _load_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _file_ok(path: Path, info: dict) -> bool:
    return path.is_file() and path.stat().st_size == info["size"] and sha256_file(path) == info["sha256"]


def verify(out_dir) -> dict:
    """Re-check a finished output against its manifest; raises BaylingError naming every problem."""
    out = Path(out_dir)
    if not out.is_dir():
        raise BaylingError(f"{out} does not exist or is not a folder")
    man = _load_json(out / MANIFEST)
    if man is None:
        if (out / JOURNAL).exists():
            raise BaylingError(f"{out} is an unfinished merge (it has {JOURNAL} but no {MANIFEST}); re-run the same "
                               "'bayling merge' command to finish it")
        raise BaylingError(f"{out} has no {MANIFEST}: it is not the output of a finished 'bayling merge'")
    if man.get("format") != FORMAT:
        raise BaylingError(f"{out / MANIFEST} has format {man.get('format')!r}; this tool reads {FORMAT}")
    problems = []
    files = man.get("files", {})
    with progress("verifying", total=sum(f["size"] for f in files.values())) as p:
        for name, info in sorted(files.items(), key=lambda kv: natural_key(kv[0])):
            path = out / name
            if not path.is_file():
                problems.append(f"{name} is missing")
                continue
            size = path.stat().st_size
            if size != info["size"]:
                problems.append(f"{name} has {size} bytes, the manifest says {info['size']}")
                continue
            if sha256_file(path, p.advance) != info["sha256"]:
                problems.append(f"{name} differs from the manifest (SHA-256 mismatch: the file changed or is damaged)")
    if not problems:
        index = _load_json(out / INDEX) or {}
        expected = {n: t["shard"] for n, t in man.get("tensors", {}).items()}
        if index.get("weight_map") != expected:
            problems.append(f"{INDEX} does not list the tensors the manifest records")
        else:
            from .checkpoint import read_safetensors_header

            for shard in sorted(set(expected.values())):
                header, _ = read_safetensors_header(out / shard)
                names = {n for n in header if n != "__metadata__"}
                if names != {n for n, s in expected.items() if s == shard}:
                    problems.append(f"{shard} does not hold the tensors the manifest records")
    leftovers = sorted(p.name for p in out.glob("*.tmp"))
    if problems:
        raise BaylingError(f"{out} failed verification: " + "; ".join(problems))
    return {"files": len(files), "bytes": sum(f["size"] for f in files.values()),
            "tensors": len(man.get("tensors", {})), "mode": man.get("mode"), "leftovers": leftovers,
            "base_check": man.get("base_check", {}).get("verdict")}
