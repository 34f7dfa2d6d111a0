"""Apply (or make) a BayLing weight difference, streaming, with bounded memory.

``merge(base, delta, output)`` writes ``target = base + delta`` and
``make_diff(base, target, output)`` writes ``delta = target - base``, both in
float16 and bit for bit what PyTorch gives for the two float16 tensors (the
arithmetic of BayLing's ``apply_delta.py``). ``verify(output)`` re-checks a
finished output against its manifest.

How it works
------------
* Plan first (merge_plan.py). Every input file is opened and checked (headers, sizes), every
  tensor of the delta (target) is matched by name, shape and kind of dtype
  with the base, and the output shard layout (names, headers, exact sizes) is
  fixed before any byte is written. Missing tensors, mismatches, damaged
  inputs and a lack of disk space therefore fail before the output exists.
* Stream (merge_pipeline.py). A reader thread reads chunks of at most ``CHUNK_BYTES`` from both
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
* Base check (merge_check.py). From a fixed sample of each weight matrix (at most
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
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bayling import __version__
from bayling.errors import BaylingError
from bayling.files import write_atomically
from bayling.progress import progress
from bayling.sizes import format_bytes

from .checkpoint import CheckpointReader, natural_key
from .merge_check import BaseCheck, CheckFailed, recorded_fingerprints
from .merge_pipeline import journal_write, json_bytes, run_pipeline
from .merge_plan import (FORMAT, INDEX, JOURNAL, MANIFEST, SAMPLE, SIDE_FILES, Options, Plan, make_plan, other_role,
                         tmp_name)

HASH_BLOCK = 16 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------------
# Files


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
        paths += [out / n, out / tmp_name(n)]
    return paths


def _our_tmp_files(out: Path, plan: Plan) -> list[Path]:
    """Temporary files a killed run of this plan can leave in ``out``: partial copies of our own output."""
    names = [MANIFEST, JOURNAL, INDEX, *SIDE_FILES, *(s.name for s in plan.shards)]
    return [out / tmp_name(n) for n in names]


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
    role = other_role(mode)
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
            # A kill mid-write leaves a temporary file (the very first journal write leaves only that): ours, not
            # "other files", and removed below once the folder is judged ours.
            leftovers = _our_tmp_files(out, plan)
            if man is not None and man.get("plan_id") == plan.plan_id:
                done = {s: man["files"][s] | {"tensors": {n: man["tensors"][n]["stats"] for n in man["tensors"]
                                                          if man["tensors"][n]["shard"] == s and
                                                          man["tensors"][n].get("stats")}}
                        for s in (sh.name for sh in plan.shards) if s in man.get("files", {})}
                result.already_complete = True
            elif jour is not None and jour.get("plan_id") == plan.plan_id:
                done = dict(jour.get("done", {}))
            elif any(p not in leftovers for p in out.iterdir()):
                if not opts.force:
                    what = ("a finished merge of other inputs" if man is not None else
                            "an interrupted merge of other inputs" if jour is not None else "other files")
                    raise BaylingError(f"--output {out} already holds {what}; choose a new folder, or pass --force "
                                       "to replace the model files in it")
                _remove(_our_files(out, plan) + [out / p.name for p in out.glob("*.bin")]
                        + [out / p.name for p in out.glob("*.safetensors")])
            _remove(leftovers)

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
            journal_write(out, plan, done)
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
        journal_write(out, plan, done)
        result.resumed_shards = len(done)
        if done:
            print(f"bayling merge: resuming: {len(done)} of {len(plan.shards)} shards already complete",
                  file=sys.stderr)

        check = BaseCheck(mode, opts, base_dir, other_dir, out,
                          recorded_fingerprints(other_dir) if mode == "merge" else {})
        for name in sorted(done, key=natural_key):  # statistics of the shards kept from an earlier run
            for t in next(s for s in plan.shards if s.name == name).tensors:
                st = done[name].get("tensors", {}).get(t.name)
                if st is not None:
                    check.add(t, st)
        total = sum(s.data_bytes for s in todo)
        verb = "merging" if mode == "merge" else "making the difference"
        with progress(verb, total=total) as p:
            run_pipeline(plan, todo, base, other, out, check, done, p.advance, opts.chunk_bytes)
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
        write_atomically(out / MANIFEST, json_bytes(manifest))
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
    except CheckFailed:
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
            _remove([out / tmp_name(s.name) for s in plan.shards])
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
