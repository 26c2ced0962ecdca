"""A model's files without its weights: config.json, the shard index and the safetensors headers.

A safetensors file starts with an 8-byte little-endian header length, then a JSON header naming
each tensor's dtype, shape and byte range (``data_offsets``, relative to the end of the header);
the data follows. Reading only those first bytes tells every tensor's shape and the size of the
file as written, so ``slicegpt plan`` sizes a 70B model in milliseconds, and works on folders
whose data is missing (a config and an index only, or files cut after their header).

:func:`write_index_only_folder` writes such a folder from a config (no weights): what the plan
of a model one does not have on disk reads.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import shards
from .format import is_sliced_folder
from .models import DEFAULT_MODEL_NAME, find_gguf, resolve_model

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

#: Bytes per element of each safetensors dtype code.
DTYPE_BYTES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
#: The torch names of the floating codes (what --dtype and config.json call them).
DTYPE_NAMES: dict[str, str] = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# A header larger than this is not a safetensors header (the format caps it at 100 MB).


class PlanInputError(ValueError):
    """The model's files cannot be planned for (missing, not safetensors, damaged header)."""


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as its file's header declares it."""

    dtype: str  # safetensors code: 'BF16', 'F32' ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 4)


@dataclass(frozen=True)
class ModelFiles:
    """What a model's files say without their weights.

    ``tensors``: every stored tensor from the safetensors headers, or None when only an index
    (names, total size) or no safetensors file at all was there. ``disk_bytes``: the size the
    files declare (header and data as written, whatever is really on disk), or the index's
    ``total_size``; None when nothing says. ``source`` says which of these it came from.
    """

    name: str
    config: dict[str, Any]
    tensors: dict[str, TensorHeader] | None
    disk_bytes: int | None
    source: str
    chat_template: bool = False  # the tokenizer's files carry a chat template

    @property
    def stored_params(self) -> int | None:
        return None if self.tensors is None else sum(t.numel for t in self.tensors.values())

    @property
    def disk_dtype(self) -> str | None:
        """The floating dtype holding most of the bytes ('bfloat16'), if headers were read."""
        if not self.tensors:
            return None
        by: dict[str, int] = {}
        for t in self.tensors.values():
            by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
        code = max(by, key=lambda c: by[c])
        return DTYPE_NAMES.get(code, code)


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorHeader], int]:
    """(tensors, declared file size) from a safetensors file's header; reads the header's bytes only
    (the data may be absent or cut: plan never reads it)."""
    p = Path(path)
    try:
        header, base = shards.read_header(p)
    except OSError as exc:
        raise PlanInputError(f"cannot read {p}: {exc.strerror or exc}") from None
    except shards.ShardError as exc:
        raise PlanInputError(str(exc)) from None
    try:
        tensors: dict[str, TensorHeader] = {}
        end = 0
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            tensors[key] = TensorHeader(str(entry["dtype"]), tuple(int(s) for s in entry["shape"]))
            end = max(end, int(entry["data_offsets"][1]))
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise PlanInputError(f"{p} has no valid safetensors header: {type(exc).__name__}: {exc}") from None
    return tensors, base + end


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PlanInputError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise PlanInputError(f"{path} is not a JSON object")
    return data


def _gguf_refusal(name: str) -> PlanInputError:
    return PlanInputError(
        f"{name} is a GGUF model: plan needs a safetensors model (config.json and .safetensors files or their "
        "index); convert it first (e.g. 'slicegpt export', or save it with transformers)"
    )


def read_local(folder: str | os.PathLike[str]) -> ModelFiles:
    """A local folder's config and tensor table, from its headers (or its index) only."""
    path = Path(folder)
    name = str(folder)
    if path.is_file() and path.suffix == ".gguf":
        raise _gguf_refusal(name)
    if not path.exists():
        raise PlanInputError(f"cannot plan {name}: no such file or folder")
    if not path.is_dir():
        raise PlanInputError(f"cannot plan {name}: not a model folder (config.json and safetensors files)")
    if not (path / "config.json").is_file():
        if any(path.glob("*.gguf")):
            raise _gguf_refusal(name)
        raise PlanInputError(f"cannot plan {name}: no config.json in the folder")
    if is_sliced_folder(path):
        raise PlanInputError(f"{name} is already sliced (a slicegpt folder): plan its source model instead")
    config = _read_json(path / "config.json")
    index = path / INDEX
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise PlanInputError(f"{index} has no weight_map")
        shards = sorted(set(weight_map.values()))
        if all((path / s).is_file() for s in shards):
            return _from_headers(name, config, [path / s for s in shards], "safetensors headers (sharded)")
        # A config + index folder (no shards here): names and the total size only; shapes come
        # from the config's skeleton.
        total = data.get("metadata", {}).get("total_size")
        return ModelFiles(
            name,
            config,
            None,
            int(total) if isinstance(total, (int, float)) else None,
            "shard index only (no shard files): shapes from config.json",
        )
    files = sorted(path.glob("*.safetensors"))
    if files:
        return _from_headers(name, config, files, "safetensors header" if len(files) == 1 else "safetensors headers")
    if any(path.glob("*.gguf")):
        raise _gguf_refusal(name)
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise PlanInputError(
            f"cannot plan {name}: plan (like slice) needs safetensors weights, and the folder has only pickled ones"
        )
    return ModelFiles(name, config, None, None, "config.json only: shapes from it, size on disk estimated")


def _from_headers(name: str, config: dict[str, Any], files: list[Path], source: str) -> ModelFiles:
    tensors: dict[str, TensorHeader] = {}
    size = 0
    for f in files:
        found, declared = read_header(f)
        tensors.update(found)
        size += declared
    return ModelFiles(name, config, tensors, size, source)


def read_hub(repo: str) -> ModelFiles:
    """A hub model's config and tensor table: config.json, then the index and the safetensors
    headers by HTTP range requests (``huggingface_hub.get_safetensors_metadata``): no weights."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    try:
        config = _read_json(Path(hf_hub_download(repo, "config.json")))
        meta = get_safetensors_metadata(repo)
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated, no safetensors: all the user's to fix
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanInputError(f"cannot plan {repo}: not a local folder, and the hub says: {text}") from None
    tensors: dict[str, TensorHeader] = {}
    size = 0
    for file_meta in meta.files_metadata.values():
        for key, info in file_meta.tensors.items():
            tensors[key] = TensorHeader(str(info.dtype), tuple(int(s) for s in info.shape))
            size += tensors[key].nbytes
    return ModelFiles(repo, config, tensors, size, "hub: config.json and safetensors headers (range requests)")


def has_chat_template(folder: Path) -> bool:
    """Do a model folder's tokenizer files carry a chat template (``chat_template.jinja``, or a
    ``chat_template`` in ``tokenizer_config.json``)?"""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    try:
        return bool(config.is_file() and json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def _hub_chat_template(repo: str) -> bool:
    from huggingface_hub import hf_hub_download

    for name in ("chat_template.jinja", "tokenizer_config.json"):
        try:
            if has_chat_template(Path(hf_hub_download(repo, name)).parent):
                return True
        except Exception:  # noqa: BLE001 - a file the repo lacks: no template from it
            continue
    return False


def read_model_files(name_or_path: str | None) -> ModelFiles:
    """A local folder or a hub id, read without weights; the embedded default (None or its name)
    and a .gguf are read as the safetensors folder slice converts them into (cached)."""
    if (
        name_or_path is None
        or name_or_path == DEFAULT_MODEL_NAME
        or (Path(name_or_path).exists() and find_gguf(Path(name_or_path)) is not None)
    ):
        folder, display = resolve_model(name_or_path)
        files = read_local(Path(folder))
        return replace(files, name=display, chat_template=has_chat_template(Path(folder)))
    path = Path(name_or_path)
    looks_local = (
        name_or_path.startswith(("/", "./", "../", "~")) or path.suffix in (".gguf", ".safetensors") or path.exists()
    )
    if looks_local:
        files = read_local(path.expanduser())
        return replace(files, chat_template=path.expanduser().is_dir() and has_chat_template(path.expanduser()))
    if name_or_path.count("/") != 1:
        raise PlanInputError(f"cannot plan {name_or_path}: no such folder, and not a hub id (owner/name)")
    return replace(read_hub(name_or_path), chat_template=_hub_chat_template(name_or_path))


def write_index_only_folder(folder: str | os.PathLike[str], config: Any, dtype: str | None = None) -> Path:
    """A 'config + index' folder for ``config`` (a transformers config): config.json and a
    model.safetensors.index.json naming every tensor a checkpoint of it stores (tied weights once)
    in shards of about 5 GB, with their total size; no shard file, no weight. What
    ``slicegpt plan`` reads for a model one does not have (a 70B from its published config)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config)  # the dtype is written into it: leave the caller's as it was
    torch_dtype = getattr(torch, dtype or str(getattr(config, "dtype", None) or "float32").removeprefix("torch."))
    if dtype is not None:
        config.dtype = torch_dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen: set[int] = set()
    weight_map: dict[str, str] = {}
    total, shard, in_shard = 0, 1, 0
    names = []
    for key, p in model.state_dict(keep_vars=True).items():
        if id(p) in seen:  # a tied head is not stored
            continue
        seen.add(id(p))
        nbytes = p.numel() * torch.finfo(torch_dtype).bits // 8
        if in_shard and in_shard + nbytes > 5_000_000_000:
            shard, in_shard = shard + 1, 0
        names.append((key, shard))
        in_shard += nbytes
        total += nbytes
    for key, s in names:
        weight_map[key] = f"model-{s:05d}-of-{shard:05d}.safetensors"
    config.save_pretrained(folder)
    (folder / INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    return folder
