"""Nested state (dicts, lists, numbers, strings, tensors) in one safetensors file, never a pickle.

Training checkpoints and slicing staging hold optimiser states, RNG states, bases and
activations. ``torch.save`` would write them as a pickle, which can run code when read; here
the tensors go into a safetensors file and the structure around them into its JSON header
(``metadata["tree"]``), with dict keys kept with their types (an optimiser's state is keyed by
integers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

TREE_KEY = "tree"


class TreeFileError(ValueError):
    """A state file is missing, damaged, or not one of ours."""


def _encode(obj: Any, tensors: dict[str, torch.Tensor], seen: dict[tuple[int, int], str]) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu")
        # safetensors refuses tensors that share storage: a second view is stored as its own copy.
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else (id(t), 0)
        name = f"t{len(tensors)}"
        tensors[name] = t.clone().contiguous() if key in seen else t.contiguous()
        seen.setdefault(key, name)
        return {"__t": name}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"state keys must be str or int, got {type(k).__name__}")
        return {"__d": [[k, _encode(v, tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__l" if isinstance(obj, list) else "__tu": [_encode(v, tensors, seen) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a state file")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__t" in obj:
            return tensors[obj["__t"]]
        if "__d" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__d"]}
        if "__l" in obj:
            return [_decode(v, tensors) for v in obj["__l"]]
        if "__tu" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tu"])
    return obj


def fresh(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied into memory of its own, as every tensor computed in a run sits.

    A tensor read from a safetensors file is a view into the file's buffer, aligned to 8 bytes
    only. MKL's float64 matrix products give different last bits for operands that are not
    16-byte aligned (seen on AMD EPYC: ``x @ q.T`` with x [4, 24, 48] differs by 7e-15), so a
    resumed run fed such views drifted from an uninterrupted one. torch's CPU allocator aligns
    to 64 bytes, as for the tensors of an uninterrupted run.
    """
    return t.clone(memory_format=torch.contiguous_format)


def save_tree(path: str | os.PathLike, tree: Any) -> None:
    """Write ``tree`` to ``path`` through a temporary name: a kill mid-write leaves the old file whole."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_encode(tree, tensors, {}))
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={TREE_KEY: structure}))


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary name and rename: a kill mid-write leaves the old file whole, and
    a write that fails (a full disk) leaves no temporary file and fails in one line."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a failed write
        tmp.unlink(missing_ok=True)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(
            f"cannot write {path}: {reason} (is the disk full?); what was staged before is kept: "
            "free space and rerun with --resume"
        ) from exc


def load_tree(path: str | os.PathLike) -> Any:
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fresh(fh.get_tensor(k)) for k in fh.keys()}
        return _decode(json.loads(meta[TREE_KEY]), tensors)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TreeFileError(f"cannot read the state file {path}: {first}") from exc
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a damaged header
        raise TreeFileError(f"cannot read the state file {path}: {type(exc).__name__}") from exc
