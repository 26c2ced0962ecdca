"""The on-disk format of slicegpt folders: its version, the metadata, and the one reader of it.

Two kinds of folder, both described by ``slicegpt.json``:

* per-layer: the source family's config with the metadata also under its ``slicegpt`` key (the
  loader rebuilds the skeleton from it), ``modeling_slicegpt.py`` and the sliced weights;
* uniform: a standard checkpoint of the family; the metadata lives in ``slicegpt.json`` only.

Format version rules: a folder written by a newer format is refused with "upgrade slicegpt";
older versions are read as they were written. Version 2 (this one): uniform folders record their
weights' size and sha256 too (version 1 did so for per-layer folders only), so every version-2
folder must have its ``files`` entry: one that lacks it was edited, and is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from .._version import __version__
from ..core.report import SliceReport

FORMAT_VERSION = 2
WEIGHTS = "model.safetensors"
METADATA = "slicegpt.json"
SPECTRA = "spectra.json"
REMOTE_MODULE = "modeling_slicegpt.py"


class SlicedFolderError(ValueError):
    """A folder is not a (readable, intact, supported) sliced model."""


def build_metadata(report: SliceReport) -> dict[str, Any]:
    """What a saved folder needs to rebuild the model, and what produced it."""
    return {"format_version": FORMAT_VERSION, "slicegpt_version": __version__, **report.summary()}


def provenance(model: nn.Module) -> dict[str, Any] | None:
    """The metadata of a sliced model: from the run that sliced it, or the folder it was loaded from."""
    report = getattr(model, "slicegpt_report", None)
    if isinstance(report, SliceReport):
        return build_metadata(report)
    meta = getattr(model, "slicegpt_metadata", None)
    return dict(meta) if isinstance(meta, dict) else None


def _check_version(meta: Any, where: Path) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise SlicedFolderError(f"{where} holds no slicegpt metadata")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SlicedFolderError(
            f"{where} has no valid format_version ({version!r}: a whole number is expected); "
            "it is damaged or not slicegpt's"
        )
    if version > FORMAT_VERSION:
        raise SlicedFolderError(
            f"{where} was written in slicegpt format version {version}; this slicegpt reads up to {FORMAT_VERSION}: "
            "upgrade slicegpt"
        )
    return meta


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SlicedFolderError(f"{path} is unreadable: {exc}") from exc


def read_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The metadata of any folder slicegpt wrote, checked for presence and format version.

    Per-layer folders carry it in config.json (what their loader reads); uniform folders, which
    are standard checkpoints, in slicegpt.json.
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.is_file():
        raise SlicedFolderError(f"{folder} is not a sliced model folder (no config.json)")
    config = _read_json(config_file)
    meta = config.get("slicegpt") if isinstance(config, dict) else None
    if meta is not None:
        return _check_version(meta, config_file)
    side = folder / METADATA
    if side.is_file():
        meta = _check_version(_read_json(side), side)
        if meta.get("mode") == "uniform":
            return meta
    raise SlicedFolderError(f"{folder} is not a sliced model folder (no slicegpt metadata)")


def is_sliced_folder(path: str | os.PathLike) -> bool:
    """Does ``path`` hold a folder slicegpt wrote (of any format version: a newer one is then
    refused by :func:`read_metadata` with "upgrade slicegpt", not read as something else)?"""
    try:
        read_metadata(path)
        return True
    except SlicedFolderError as exc:
        return "upgrade slicegpt" in str(exc)


def is_standard(meta: dict[str, Any]) -> bool:
    """A uniform folder is a standard checkpoint of its family (plain transformers loads it)."""
    return meta.get("mode") == "uniform"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """What is recorded of a written file so that loading can tell it was truncated or changed."""
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def write_companions(folder: Path, meta: dict[str, Any], model: nn.Module, tokenizer: Any) -> None:
    """What every saved folder carries beside its weights and config: metadata, generation config, tokenizer."""
    (folder / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def first_line(exc: BaseException) -> str:
    """An exception's message in one line: its first line, and the lines after it while it ends
    in ':' or ',' (a sentence continued), at most 300 characters."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    out = lines[0]
    for line in lines[1:]:
        if not out.endswith((":", ",")):
            break
        out += " " + line
    return out if len(out) <= 300 else out[:299] + "\u2026"
