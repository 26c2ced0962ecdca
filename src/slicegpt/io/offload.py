"""Calibration activations kept on disk (``slicegpt slice --offload-activations DIR``).

The loop holds a few lists of per-batch activations ([B, T, width] each): the stream entering
the current layer, and with corrections the dense model's stream and the dense layer's two
outputs. For many long calibration rows of a wide model they outgrow host memory (128 x 2048
rows of Llama-2-70B's width 8192 are 8.6 GB in float32 per list). :class:`DiskTensors` is such a
list kept as one raw file per batch: an item is read whole when the loop reaches its batch and
written back when replaced, so memory holds one batch of each list at a time. Plain reads and
writes, not a memory map: pages of a map stay resident (and counted) while it is open.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterator

import torch


class DiskTensors:
    """A list of tensors, one raw file each, in a fresh folder under ``root`` (removed with it)."""

    def __init__(self, root: str | os.PathLike) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="slicegpt-activations-", dir=root))
        self._meta: list[tuple[torch.dtype, tuple[int, ...]]] = []
        # The files go when the list does (each layer replaces its lists), and at exit.
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), True)

    def __len__(self) -> int:
        return len(self._meta)

    def _index(self, i: int) -> int:
        j = i + len(self) if i < 0 else i
        if not 0 <= j < len(self):
            raise IndexError(f"activation batch {i} of {len(self)}")
        return j

    def _path(self, i: int) -> Path:
        return self.folder / f"{i:06d}.bin"

    def __getitem__(self, i: int) -> torch.Tensor:
        i = self._index(i)
        dtype, shape = self._meta[i]
        t = torch.empty(shape, dtype=dtype)
        if t.numel():
            with open(self._path(i), "rb") as fh:
                fh.readinto(memoryview(t.view(-1).view(torch.uint8).numpy()))
        return t

    def __setitem__(self, i: int, t: torch.Tensor) -> None:
        i = self._index(i)
        t = t.detach().to("cpu").contiguous()
        with open(self._path(i), "wb") as fh:
            if t.numel():
                fh.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self._meta[i] = (t.dtype, tuple(t.shape))

    def append(self, t: torch.Tensor) -> None:
        self._meta.append((t.dtype, tuple(t.shape)))
        self[len(self) - 1] = t

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]


def disk_store(root: str | os.PathLike):
    """The ``Streams(activations=...)`` factory that keeps every activation list under ``root``."""
    return lambda: DiskTensors(root)
