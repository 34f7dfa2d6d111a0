"""What a merge will write, fixed before its first byte: the options, the output shards and their headers.

Every tensor of the delta (target) is matched by name, shape and kind of dtype with the base, so
that missing tensors and mismatches fail before the output exists.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from bayling.errors import BaylingError

from .checkpoint import CheckpointReader, TensorInfo, natural_key

FORMAT = "bayling-merge/1"
MANIFEST = "bayling-merge.json"
JOURNAL = "bayling-merge.journal.json"
INDEX = "model.safetensors.index.json"

SAMPLE = 1 << 16                 # elements sampled per tensor for the statistics and the fingerprint
CHUNK_BYTES = 16 * 1024 * 1024   # largest read, per input, per step

DEFAULT_MAX_SHARD = 2 * 1000**3  # "2GB", as Hugging Face counts
DEFAULT_KEEP_FREE = 256 * 1024**2
DEFAULT_MAX_RATIO = 0.5
DEFAULT_MAX_INEXACT = 0.05

# Files copied from the delta (merge) or the target (make-diff) next to the weights.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json",
              "chat_template.jinja", "tokenizer.model.v3", "preprocessor_config.json")


def tmp_name(name: str) -> str:
    """The name an output file is written under until its rename: the shard writer's, and
    bayling.files.write_atomically's (journal, index, manifest, config and tokenizer files)."""
    return name + ".tmp"


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


def safetensors_header(tensors: list[PlannedTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for t in tensors:
        t.offset = pos
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def other_role(mode: str) -> str:
    return "delta" if mode == "merge" else "target"


def make_plan(mode: str, base: CheckpointReader, other: CheckpointReader, max_shard_size: int) -> Plan:
    role = other_role(mode)
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
        s.header = safetensors_header(s.tensors)
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
