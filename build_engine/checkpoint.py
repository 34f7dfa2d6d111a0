"""Read Hugging Face checkpoints one tensor (or one slice of a tensor) at a time.

``CheckpointReader(folder)`` understands the layouts that the Hugging Face hub uses:

* ``model.safetensors.index.json`` plus its shards, or index-less ``*.safetensors`` files;
* ``pytorch_model.bin.index.json`` plus its shards, or index-less ``*.bin`` files.

Every file is opened and checked when the reader is created (a truncated or
damaged shard fails there, before anything is written), and ``tensors`` lists
name, shape, dtype and size without reading any tensor data.

Memory stays bounded by what the caller asks for:

* safetensors files are read with ``os.preadv`` at the offsets their header
  gives, straight into the caller's buffer. (``safetensors.safe_open`` maps
  the whole file, and every page read stays in the process's resident set
  until the file is closed, so a 10 GB shard would cost 10 GB of RSS.)
* ``.bin`` files are opened with ``torch.load(mmap=True, weights_only=True)``:
  no arbitrary pickles, and no tensor data is read until it is used. The
  mapping is dropped and reopened after every few hundred MB copied out of it,
  so its resident pages do not add up. Old (pre-zipfile) ``.bin`` files cannot
  be mapped; they are loaded whole, still with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from bayling.errors import BaylingError

if TYPE_CHECKING:  # torch is imported lazily: listing the module must stay cheap
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

# safetensors dtype names <-> torch dtype attribute names
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}

# How much may be copied out of a mmapped .bin file before the mapping is dropped and reopened
# (its pages stay resident while it is mapped); a reader keeps one .bin file mapped at a time.
_BIN_REMAP_BYTES = 128 * 1024 * 1024
_MAX_HEADER = 100 * 1024 * 1024


def torch_dtype(st_name: str) -> "torch.dtype":
    import torch

    return getattr(torch, _ST_DTYPES[st_name])


def st_dtype_name(dtype: "torch.dtype") -> str:
    name = str(dtype).removeprefix("torch.")
    for st, tn in _ST_DTYPES.items():
        if tn == name:
            return st
    raise BaylingError(f"tensors of dtype {name} cannot be stored in safetensors")


def st_is_float(st_name: str) -> bool:
    return st_name.startswith(("F", "BF"))


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors name: F16, BF16, F32, I64, ...
    file: Path
    offset: int  # absolute byte offset in a safetensors file; -1 for .bin files

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return _ST_ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_float(self) -> bool:
        return st_is_float(self.dtype)


def natural_key(name: str) -> list:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header; returns (header, data start offset)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BaylingError(f"{path} is truncated or not a safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER or 8 + n > size:
                raise BaylingError(f"{path} is truncated or damaged: its header length field says {n} bytes "
                                   f"but the file has {size} bytes")
            raw = f.read(n)
    except OSError as exc:
        raise BaylingError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise BaylingError(f"{path} is damaged or not a safetensors file: its header is not valid JSON ({exc})") from exc
    return header, 8 + n


def _safetensors_infos(path: Path) -> list[TensorInfo]:
    header, start = read_safetensors_header(path)
    size = path.stat().st_size
    infos, spans = [], []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise BaylingError(f"{path} is damaged: bad header entry for tensor '{name}'") from exc
        if dtype not in _ST_DTYPES:
            raise BaylingError(f"{path}: tensor '{name}' has dtype {dtype}, which this tool does not handle")
        info = TensorInfo(name, shape, dtype, path, start + lo)
        if hi - lo != info.nbytes or lo < 0:
            raise BaylingError(f"{path} is damaged: tensor '{name}' with shape {list(shape)} and dtype {dtype} "
                               f"needs {info.nbytes} bytes but its header gives it {hi - lo}")
        infos.append(info)
        spans.append((lo, hi))
    end = max((hi for _, hi in spans), default=0)
    if start + end > size:
        raise BaylingError(f"{path} is truncated: its header describes {start + end} bytes of data, "
                           f"the file has {size} bytes (download or copy it again)")
    return infos


def _pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    total = len(view)
    while done < total:
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise BaylingError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if n == 0:
            raise BaylingError(f"{path} is truncated: unexpected end of file at byte {offset + done}")
        done += n


class _BinFile:
    """One PyTorch ``.bin`` file, mapped lazily and remapped to keep resident memory bounded."""

    def __init__(self, path: Path):
        self.path = path
        self._sd: dict | None = None
        self._copied = 0
        self.legacy = False
        sd = self._load()
        self.infos = []
        for name, t in sd.items():
            if not _is_tensor(t):
                raise BaylingError(f"{path}: entry '{name}' is not a tensor ({type(t).__name__})")
            self.infos.append(TensorInfo(name, tuple(t.shape), st_dtype_name(t.dtype), path, -1))
        if not self.legacy:
            self._sd = None  # reopened on first read

    def _load(self) -> dict:
        import torch

        try:
            try:
                sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap can only be used" not in str(exc):
                    raise
                print(f"warning: {self.path} uses PyTorch's old (pre-1.6) file format, which cannot be memory-mapped; "
                      "loading it whole (memory use grows with this file's size)", file=sys.stderr)
                sd = torch.load(self.path, map_location="cpu", weights_only=True)
                self.legacy = True
        except OSError as exc:
            raise BaylingError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        except BaylingError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds; all mean an unusable file
            msg = str(exc).split("\n")[0]
            if type(exc).__name__ == "UnpicklingError" or "weights_only" in str(exc).lower():
                raise BaylingError(f"refusing to load {self.path}: it contains Python objects other than tensors, "
                                   f"and loading it could run arbitrary code ({msg[:160]})") from exc
            raise BaylingError(f"{self.path} is truncated, damaged or not a PyTorch checkpoint ({msg[:200]})") from exc
        if not isinstance(sd, dict):
            raise BaylingError(f"{self.path} does not hold a state dict (found {type(sd).__name__})")
        return sd

    def tensor(self, name: str) -> "torch.Tensor":
        if self._sd is None:
            self._sd = self._load()
            self._copied = 0
        return self._sd[name]

    def note_copied(self, nbytes: int) -> None:
        self._copied += nbytes
        if not self.legacy and self._copied >= _BIN_REMAP_BYTES:
            self._sd = None  # drops the mapping and the resident pages with it

    def close(self) -> None:
        if not self.legacy:
            self._sd = None


def _is_tensor(x) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


class CheckpointReader:
    """The tensors of one Hugging Face checkpoint folder, readable one at a time.

    ``tensors`` maps name -> TensorInfo. ``read(name)`` returns a whole tensor;
    ``read_range(name, start, stop, out)`` returns elements ``[start, stop)`` of
    the flattened tensor, read into the storage of ``out`` when given.
    """

    def __init__(self, folder: str | os.PathLike, role: str = "checkpoint"):
        self.folder = Path(folder)
        self.role = role
        if not self.folder.is_dir():
            raise BaylingError(f"the {role} folder {self.folder} does not exist or is not a folder")
        self.files, self.format = self._find_files()
        self.tensors: dict[str, TensorInfo] = {}
        self._bins: dict[Path, _BinFile] = {}
        self._fds: dict[Path, int] = {}
        for path in self.files:
            if self.format == "safetensors":
                infos = _safetensors_infos(path)
            else:
                self._bins[path] = _BinFile(path)
                infos = self._bins[path].infos
            for info in infos:
                if info.name in self.tensors:
                    raise BaylingError(f"tensor '{info.name}' appears twice in the {role} "
                                       f"({self.tensors[info.name].file.name} and {path.name})")
                self.tensors[info.name] = info
        self._check_index()

    # -- discovery ---------------------------------------------------------------------------------------

    def _find_files(self) -> tuple[list[Path], str]:
        d = self.folder
        self.index: dict[str, str] | None = None
        for index_name, fmt in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
            index_path = d / index_name
            if index_path.exists():
                try:
                    weight_map = json.loads(index_path.read_text())["weight_map"]
                    if not isinstance(weight_map, dict):
                        raise TypeError("weight_map is not an object")
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise BaylingError(f"{index_path} is damaged or unreadable ({exc})") from exc
                self.index = weight_map
                files = sorted({d / f for f in weight_map.values()}, key=lambda p: natural_key(p.name))
                for f in files:
                    if not f.is_file():
                        raise BaylingError(f"{index_path.name} in the {self.role} folder {d} lists {f.name}, "
                                           "which is missing (download it again)")
                return files, fmt
        st = sorted(d.glob("*.safetensors"), key=lambda p: natural_key(p.name))
        if st:
            return st, "safetensors"
        bins = sorted((p for p in d.glob("*.bin") if p.name != "training_args.bin"), key=lambda p: natural_key(p.name))
        if bins:
            return bins, "bin"
        if list(d.glob("consolidated.*.pth")):
            raise BaylingError(f"the {self.role} folder {d} holds Meta's original consolidated.*.pth checkpoint; "
                               "convert it to the Hugging Face format first (transformers' "
                               "convert_llama_weights_to_hf.py), then point at the converted folder")
        raise BaylingError(f"the {self.role} folder {d} has no model weights (*.safetensors or *.bin)")

    def _check_index(self) -> None:
        if self.index is None:
            return
        for name, fname in self.index.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != fname:
                raise BaylingError(f"the index of the {self.role} folder {self.folder} puts tensor '{name}' in "
                                   f"{fname}, but that file does not hold it (damaged or mixed-up download)")

    # -- reading -----------------------------------------------------------------------------------------

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise BaylingError(f"cannot read {path}: {exc.strerror or exc}") from exc
            self._fds[path] = fd
        return fd

    def read_range(self, name: str, start: int, stop: int, out: "torch.Tensor | None" = None) -> "torch.Tensor":
        """Elements ``[start, stop)`` of the flattened tensor, in its own dtype.

        With ``out`` (any contiguous tensor with at least that many bytes) the
        data lands in ``out``'s memory and the result is a view of it.
        """
        import torch

        info = self.tensors[name]
        dtype = torch_dtype(info.dtype)
        count = stop - start
        nbytes = count * info.itemsize
        if out is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        else:
            buf = out.view(-1).view(torch.uint8)[:nbytes]
            if buf.numel() < nbytes:
                raise ValueError("buffer too small")
        if self.format == "safetensors":
            if nbytes:
                _pread_into(self._fd(info.file), memoryview(buf.numpy()), info.offset + start * info.itemsize, info.file)
            return buf.view(dtype)
        binf = self._bins[info.file]
        for other in self._bins.values():
            if other is not binf:
                other.close()
        src = binf.tensor(name)
        flat = src.reshape(-1)[start:stop]
        result = buf.view(dtype)
        result.copy_(flat)
        binf.note_copied(nbytes)
        return result

    def read(self, name: str) -> "torch.Tensor":
        """The whole tensor, in its own dtype and shape, in memory of its own."""
        info = self.tensors[name]
        return self.read_range(name, 0, info.numel).view(info.shape)

    def fingerprint(self) -> list[dict]:
        """Cheap identity of the input files: name, size and modification time."""
        out = []
        for p in self.files + ([self.folder / (SAFETENSORS_INDEX if self.format == "safetensors" else BIN_INDEX)]
                               if self.index is not None else []):
            st = p.stat()
            out.append({"name": p.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        return out

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for b in self._bins.values():
            b.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_names(reader: CheckpointReader) -> Iterable[str]:
    """Tensor names in natural order (embeddings, layers 0, 1, ... 10, norm, head)."""
    return sorted(reader.tensors, key=natural_key)
