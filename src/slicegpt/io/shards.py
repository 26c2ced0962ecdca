"""Safetensors files read tensor by tensor and written shard by shard, without holding a model.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's
dtype, shape and byte range in the data section) and the raw data. :class:`ShardReader` reads
only the byte ranges it is asked for, with plain reads rather than a memory map: mapped pages a
process has touched count towards its resident memory until the file is closed, and a streamed
slice must not grow to the size of the model it reads. :class:`ShardWriter` takes tensors as
they are finished, appends their bytes to a data file per shard, and writes each shard's header
when the shard is full, so memory never holds more than the tensors being added.

Output naming follows transformers: one file ``model.safetensors`` when everything fits one
shard, else ``model-00001-of-0000N.safetensors`` ... with ``model.safetensors.index.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from torch import nn

from ..arch import spec_for_config
from ..core.surgery import get_layers
from .format import WEIGHTS, file_record

INDEX = "model.safetensors.index.json"
# transformers' own default for save_pretrained's max_shard_size.
DEFAULT_MAX_SHARD_SIZE = "5GB"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_CODES = {v: k for k, v in _DTYPES.items()}
_COPY_CHUNK = 64 << 20


class ShardError(ValueError):
    """A weights file or index that cannot be read as safetensors."""


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', 1000000 -> bytes (decimal units as transformers reads them)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size {text!r} is not a size like 5GB, 500MB or 2GiB")
    base = 1024 if m.group(3) else 1000
    size = int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))
    if size <= 0:
        raise ValueError(f"--max-shard-size {text!r} must be positive")
    return size


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in ``file``
    end: int


def read_header(path: Path) -> tuple[dict, int]:
    """(the JSON header, where the data section starts) of one safetensors file."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ShardError(f"{path} is not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise ShardError(f"{path} is not a safetensors file (header length {n})")
        if n > os.path.getsize(path) - 8:
            raise ShardError(f"{path} is cut inside its safetensors header ({os.path.getsize(path) - 8} of {n} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardError(f"{path} has an unreadable safetensors header: {exc}") from None
    return header, 8 + n


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding a model's weights in ``folder``, single or sharded."""
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ShardError(f"{folder / INDEX} is not a safetensors index: {exc}") from None
        return [folder / f for f in dict.fromkeys(weight_map.values())]
    raise ShardError(f"{folder} has no {WEIGHTS} or {INDEX}")


class ShardReader:
    """The tensors of a model folder's safetensors files, read on request (never mapped)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.entries: dict[str, TensorEntry] = {}
        for path in weight_files(self.folder):
            if not path.is_file():
                raise ShardError(f"{path} (named by {INDEX}) is missing")
            header, base = read_header(path)
            size = path.stat().st_size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info.get("dtype") not in _DTYPES:
                    raise ShardError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
                start, end = (base + int(o) for o in info["data_offsets"])
                if end > size:
                    raise ShardError(f"{path} is truncated: tensor {name} ends at byte {end}, the file has {size}")
                self.entries[name] = TensorEntry(path, _DTYPES[info["dtype"]], tuple(info["shape"]), start, end)

    def names(self) -> list[str]:
        return list(self.entries)

    def fingerprint(self, samples: int = 16, width: int = 64) -> str:
        """A digest of the weights that reads a few KB per tensor, not the checkpoint: every
        tensor's name, dtype and shape, and ``samples`` runs of ``width`` bytes spread evenly over
        its data (a different model, a rescaled or rewritten tensor shows in them)."""
        h = hashlib.sha256()
        handles: dict[Path, Any] = {}
        try:
            for name in sorted(self.entries):
                e = self.entries[name]
                h.update(f"{name}|{e.dtype}|{e.shape}|".encode())
                size = e.end - e.start
                fh = handles.get(e.file) or handles.setdefault(e.file, open(e.file, "rb"))
                for k in range(samples if size > samples * width else 1):
                    at = e.start + (k * (size - width) // max(1, samples - 1) if size > samples * width else 0)
                    fh.seek(at)
                    h.update(fh.read(min(width, size) if size <= samples * width else width))
        finally:
            for fh in handles.values():
                fh.close()
        return h.hexdigest()[:16]

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors, each read into its own memory (cast to ``dtype`` when given)."""
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.entries:
                raise ShardError(f"{self.folder} has no tensor {name}")
            by_file.setdefault(self.entries[name].file, []).append(name)
        for path, group in by_file.items():
            with open(path, "rb") as fh:
                for name in sorted(group, key=lambda k: self.entries[k].start):
                    e = self.entries[name]
                    t = torch.empty(e.shape, dtype=e.dtype)
                    fh.seek(e.start)
                    view = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
                    if fh.readinto(view) != e.end - e.start:
                        raise ShardError(f"{path} is truncated inside tensor {name}")
                    out[name] = t if dtype is None or not t.is_floating_point() else t.to(dtype)
        return out


def _raw(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_size`` bytes as they come.

    ``add`` appends a group of tensors (one decoder layer, say) to the current shard's data file,
    starting a new shard first when the group would not fit (a group larger than the limit gets
    a shard of its own, as transformers does); ``finish`` writes every shard's header in front of
    its data and the index, and returns the file names. Nothing is held in memory but the group.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.dtype = dtype  # floating tensors are written in this dtype (None: as they are)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.limit = parse_size(max_shard_size)
        self.metadata = metadata or {"format": "pt"}
        self.shards: list[dict[str, dict]] = []  # per shard: name -> header entry
        self.sizes: list[int] = []
        self.written: set[str] = set()

    def _data(self, k: int) -> Path:
        return self.folder / f".shard-{k:05d}.data"

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.dtype is not None:
            tensors = {k: t.to(self.dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        group = sum(t.numel() * t.element_size() for t in tensors.values())
        if not self.shards or (self.sizes[-1] and self.sizes[-1] + group > self.limit):
            self.shards.append({})
            self.sizes.append(0)
        k = len(self.shards) - 1
        with open(self._data(k), "ab") as fh:
            for name, t in tensors.items():
                if name in self.written:
                    raise ValueError(f"tensor {name} written twice")
                if t.dtype not in _CODES:
                    raise ShardError(f"cannot write tensor {name} of dtype {t.dtype}")
                raw = _raw(t)
                fh.write(raw)
                start = self.sizes[k]
                self.sizes[k] += len(raw)
                self.shards[k][name] = {
                    "dtype": _CODES[t.dtype],
                    "shape": list(t.shape),
                    "data_offsets": [start, self.sizes[k]],
                }
                self.written.add(name)

    def finish(self) -> list[str]:
        """Write the shards (and the index when there is more than one); returns the file names."""
        if not self.shards:
            self.shards.append({})
            self.sizes.append(0)
            self._data(0).touch()
        n = len(self.shards)
        names = [WEIGHTS] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for k, name in enumerate(names):
            header = json.dumps({"__metadata__": self.metadata, **self.shards[k]}, separators=(",", ":")).encode()
            header += b" " * (-len(header) % 8)  # the data section starts 8-byte aligned
            with open(self.folder / name, "wb") as out, open(self._data(k), "rb") as data:
                out.write(struct.pack("<Q", len(header)))
                out.write(header)
                while chunk := data.read(_COPY_CHUNK):
                    out.write(chunk)
            self._data(k).unlink()
        if n > 1:
            weight_map = {t: names[k] for k, shard in enumerate(self.shards) for t in shard}
            index = {"metadata": {"total_size": sum(self.sizes)}, "weight_map": weight_map}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            return [*names, INDEX]
        return names

    def discard(self) -> None:
        for k in range(len(self.shards)):
            self._data(k).unlink(missing_ok=True)


def read_state(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors weights, single file or sharded."""
    reader = ShardReader(folder)
    return reader.read(reader.names(), dtype)


def layer_tensors(block: nn.Module, prefix: str, index: int) -> dict[str, torch.Tensor]:
    """A decoder layer's tensors under the model's state-dict names: the group the output shards
    take per layer, in memory and streamed alike (so both write the same files)."""
    return {f"{prefix}.{index}.{k}": v for k, v in block.state_dict().items()}


def host_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict on the host, contiguous, as it is written; empty (meta) tensors
    (a streamed slice's layers, written already) left out."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if not v.is_meta}


def write_weights(writer: ShardWriter, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write ``state`` (the model's tensors as saved; the layers a streamed slice wrote already
    left out): each decoder layer's group in order, then the rest; returns the files' records."""
    spec = spec_for_config(model.config)
    state = dict(state)
    for index, block in enumerate(get_layers(model, spec)):
        group = {
            k: state.pop(k) for k in layer_tensors(block, spec.layers, index) if k in state and k not in writer.written
        }
        if group:
            writer.add(group)
    rest = {k: v for k, v in state.items() if k not in writer.written}
    empty = [k for k, v in rest.items() if v.is_meta]
    if empty:
        raise RuntimeError(f"cannot save: tensors {', '.join(empty[:3])} hold no data (a streamed layer never written)")
    writer.add(rest)
    return {name: file_record(writer.folder / name) for name in writer.finish()}
