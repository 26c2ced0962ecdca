"""Save and load sliced models as self-describing folders.

A folder holds ``model.safetensors``, ``config.json`` (the source family's config, with the
slicing metadata under the ``slicegpt`` key), ``slicegpt.json`` (the same metadata, alone, for
people and scripts), the tokenizer files and the generation config. Loading needs nothing
else: the skeleton is built on the meta device with the same surgery that slicing used, cut to
the recorded widths, and the tensors are assigned, never randomly initialised.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import spec_for_config
from .config import parse_dtype
from .slicing import FORMAT_VERSION
from .surgery import Widths, apply_widths, prepare

WEIGHTS = "model.safetensors"
METADATA = "slicegpt.json"
REMOTE_MODULE = "modeling_slicegpt.py"
SPECTRA = "spectra.json"


class SlicedFolderError(ValueError):
    """A folder is not a (readable, intact, supported) sliced model."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any work) when ``out`` exists and may not be replaced."""
    path = Path(out)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output folder {path} exists; pass --overwrite (overwrite=True) to replace it")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {path} exists and is not a folder")
    return path


def save(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    report: Any = None,
) -> Path:
    """Write a sliced model to ``out`` atomically.

    Per-layer models become a slicegpt folder (loaded by :func:`load`, or by transformers'
    ``from_pretrained(..., trust_remote_code=True)``); uniform models become a standard
    checkpoint of their family that plain transformers loads.

    With ``report`` (the :class:`~slicegpt.slicing.SliceReport` of the run), the PCA spectra
    are kept beside the model in ``spectra.json`` (for ``slicegpt inspect`` and plots).

    Everything is written into a hidden temporary folder beside ``out`` and renamed into place
    at the end, so a crash or a full disk never leaves a half-written model; an existing ``out``
    is replaced only with ``overwrite``.
    """
    meta = getattr(model.config, "slicegpt", None)
    if not isinstance(meta, dict):
        raise SlicedFolderError("this model has not been sliced (no slicegpt metadata on its config)")
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if meta.get("mode") == "uniform":
            from .uniform import export_standard

            export_standard(model, tmp, tokenizer=tokenizer)
        else:
            _write_per_layer(model, tmp, tokenizer)
        if report is not None and getattr(report, "spectra", None):
            (tmp / SPECTRA).write_text(json.dumps({"spectra": report.spectra, "widths": report.widths.to_dict()}) + "\n")
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, backup / "old")
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_per_layer(model: nn.Module, tmp: Path, tokenizer: Any) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
    meta = dict(model.config.slicegpt)
    meta["files"] = {WEIGHTS: {"size": (tmp / WEIGHTS).stat().st_size, "sha256": _sha256(tmp / WEIGHTS)}}
    meta["dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
    config = copy.deepcopy(model.config)
    config.slicegpt = meta
    # transformers' Auto classes find the loader through this (with trust_remote_code=True).
    config.auto_map = {"AutoModelForCausalLM": f"{REMOTE_MODULE[:-3]}.SlicedForCausalLM"}
    config.save_pretrained(tmp)
    shutil.copyfile(Path(__file__).parent / "remote" / REMOTE_MODULE, tmp / REMOTE_MODULE)
    write_companions(tmp, meta, model, tokenizer)


def write_companions(folder: Path, meta: dict[str, Any], model: nn.Module, tokenizer: Any) -> None:
    """What every saved folder carries beside its weights and config: metadata, generation config, tokenizer."""
    (folder / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def read_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The slicing metadata of a folder, checked for presence and format version."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.is_file():
        raise SlicedFolderError(f"{folder} is not a sliced model folder (no config.json)")
    try:
        meta = json.loads(config_file.read_text()).get("slicegpt")
    except (OSError, json.JSONDecodeError) as exc:
        raise SlicedFolderError(f"{config_file} is unreadable: {exc}") from exc
    if not isinstance(meta, dict):
        raise SlicedFolderError(f"{folder} is not a sliced model folder (config.json has no slicegpt metadata)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SlicedFolderError(
            f"{folder} was written in slicegpt format version {version}; this slicegpt reads up to {FORMAT_VERSION}: upgrade slicegpt"
        )
    return meta


def is_sliced_folder(path: str | os.PathLike) -> bool:
    try:
        read_metadata(path)
        return True
    except SlicedFolderError:
        return False


def verify_files(folder: Path, meta: dict[str, Any], checksum: bool = True) -> None:
    """Sizes (always) and sha256 (when ``checksum``) against what was recorded at save time."""
    for name, want in meta.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise SlicedFolderError(f"{path} is missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise SlicedFolderError(f"{path} is {size} bytes, {want['size']} were written: truncated or replaced")
        if checksum and _sha256(path) != want["sha256"]:
            raise SlicedFolderError(f"{path} does not match the checksum recorded at save time: tampered or corrupted")


def build_skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """An empty (meta-device parameters) sliced model of the recorded widths."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    meta = config.slicegpt
    spec = spec_for_config(config)
    # Buffers (rotary frequencies) are not in the weights file: build them for real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prepare(model, spec)
    apply_widths(model, spec, Widths.from_dict(meta["widths"]))
    model.config.slicegpt = meta
    return model


def load(
    folder: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    device_map: str | dict[str, Any] | None = None,
    checksum: bool = True,
) -> nn.Module:
    """Load a sliced folder: needs only the folder (not the source model, not the sparsity).

    ``device_map`` ('auto', or accelerate's mapping of module names to devices) spreads the
    layers over the available devices instead of moving the whole model to ``device``;
    ``checksum`` False checks only the file sizes (faster; a same-size corruption goes unseen).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder = Path(folder)
    meta = read_metadata(folder)
    verify_files(folder, meta, checksum=checksum)
    config = AutoConfig.from_pretrained(folder)
    saved_dtype = parse_dtype(meta.get("dtype", "float32"))
    model = build_skeleton(config, saved_dtype)
    state = load_file(str(folder / WEIGHTS))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SlicedFolderError(f"{folder / WEIGHTS} does not fit the recorded widths: {first}") from exc
    leftovers = [n for n, p in model.named_parameters() if p.is_meta]
    if leftovers:
        raise SlicedFolderError(f"{folder / WEIGHTS} lacks tensors: {', '.join(leftovers[:3])}")
    if dtype is not None:
        model.to(parse_dtype(dtype))
    if device_map is not None:
        from accelerate import dispatch_model, infer_auto_device_map

        if device_map == "auto":
            # A block is the unit that must stay on one device: its shortcut and branches meet there.
            device_map = infer_auto_device_map(model, no_split_module_classes=["SlicedBlock"])
        if isinstance(device_map, str):
            device_map = {"": device_map}
        model = dispatch_model(model, device_map=device_map)
        model.hf_device_map = device_map
    else:
        model.to(device)
    model.eval()
    return model
