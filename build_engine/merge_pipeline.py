"""The streaming pipeline of a merge: reader thread -> add/subtract (the calling thread) -> hasher
thread -> writer thread, over a fixed pool of chunk buffers, so memory stays bounded whatever the
model size. Each shard is written as NAME.tmp, fsynced and renamed; the journal records it.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bayling.errors import BaylingError
from bayling.files import fsync_dir, write_atomically

from .checkpoint import CheckpointReader
from .merge_check import BaseCheck, sample_step, tensor_stats
from .merge_plan import FORMAT, JOURNAL, Plan, PlannedShard, PlannedTensor, tmp_name

POOL_BUFFERS = 10                # chunk buffers in flight between reader, adder, hasher and writer


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


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


def journal_write(out: Path, plan: Plan, done: dict) -> None:
    write_atomically(out / JOURNAL, json_bytes({"format": FORMAT, "plan_id": plan.plan_id, "done": done}))


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


def run_pipeline(plan: Plan, todo: list[PlannedShard], base: CheckpointReader, other: CheckpointReader,
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
                    tmp = out / tmp_name(shard.name)
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
                    journal_write(out, plan, done)
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
