"""Save and load sliced models as self-describing folders (the format is :mod:`slicegpt.io.format`).

A per-layer folder holds ``model.safetensors`` (or shards of it with their index), ``config.json``
(the source family's config, with the slicing metadata under the ``slicegpt`` key),
``slicegpt.json`` (the same metadata, alone, for people and scripts), the tokenizer files and the
generation config. Loading needs nothing else: the skeleton is built on the meta device with the
same surgery and the same per-layer walk that slicing used, cut to the recorded widths, and the
tensors are assigned, never randomly initialised. A uniform folder is a standard checkpoint
(:mod:`slicegpt.io.standard`).
"""

from __future__ import annotations

import copy
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..arch import spec_for_config
from ..config import parse_dtype
from ..core.block import BlockBases, slice_block, slice_embeddings, slice_head
from ..core.report import SliceReport
from ..core.surgery import get_layers, get_path, is_prepared, prepare
from ..core.uniform import retie_head
from ..core.widths import Widths
from .format import (
    FORMAT_VERSION,
    REMOTE_MODULE,
    SPECTRA,
    SlicedFolderError,
    build_metadata,
    first_line,
    is_standard,
    provenance,
    read_metadata,
    sha256,
    write_companions,
)
from .shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter, host_state, read_state, write_weights
from .standard import export_standard


def check_output_dir(
    out: str | os.PathLike, overwrite: bool, protect: tuple[str | os.PathLike | None, ...] = ()
) -> Path:
    """Fail early (before any work) when ``out`` exists and may not be replaced.

    ``out`` may never be, or contain, a folder in ``protect`` (the input model) or the working
    directory: replacing it with ``--overwrite`` would delete them.
    """
    path = Path(out)
    target = path.resolve()
    for keep in (*protect, Path.cwd()):
        if keep is None or not Path(keep).exists():
            continue
        kept = Path(keep).resolve()
        if kept == target or kept.is_relative_to(target):
            what = "the working directory" if keep == Path.cwd() else f"the input {keep}"
            raise FileExistsError(f"output folder {path} would replace {what}; choose another --out")
    if path.is_symlink() and not path.exists():
        raise FileExistsError(f"output path {path} is a dangling symbolic link; remove it or choose another --out")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output folder {path} exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {path} exists and is not a folder")
    # Can the staging folder be made beside it? (A read-only parent or a name too long with the
    # staging suffix would otherwise be found only after hours of work.)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=staging_prefix(path, "tmp"), dir=path.parent)).rmdir()
    except OSError as exc:
        raise OSError(f"cannot write the output folder {path}: {exc.strerror or exc}") from None
    return path


def bytes_needed(model: nn.Module) -> int:
    """What the model's tensors take on disk (shared tensors once), plus a margin for headers and companions."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return int(total * 1.02) + (16 << 20)


def human_bytes(n: int | float) -> str:
    """1234567 -> '1.23 MB': three significant figures in the unit that fits."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} bytes"


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse before writing when the disk holding ``folder`` cannot take ``needed`` bytes."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(
            f"{what} needs about {human_bytes(needed)}; {human_bytes(free)} are free on the disk holding {folder}"
        )


class OutputLock:
    """One writer per output folder: a lock file beside it holds the writer's PID.

    A second run for the same ``--out`` stops at once while the first is alive; a lock left by
    a dead process (killed) is taken over.
    """

    def __init__(self, out: str | os.PathLike) -> None:
        out = Path(out)
        self.path = out.parent / f".{out.name}.lock"
        self.held = False

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            except OSError as exc:  # a read-only parent, a name too long with the lock's suffix
                raise OSError(
                    f"cannot write the output folder {self.path.parent / self.path.name[1:-5]}: {exc.strerror or exc}"
                ) from None
            else:
                with os.fdopen(fd, "w") as fh:
                    fh.write(str(os.getpid()))
                self.held = True
                return self
            try:
                pid = int(self.path.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid == os.getpid():  # this process holds it already (taken early, asked again)
                return self
            if pid and _alive(pid) and _runs_slicegpt(pid):
                raise FileExistsError(
                    f"another slicegpt run (PID {pid}) is writing {self.path.parent / self.path.name[1:-5]} "
                    f"(lock {self.path}); wait for it to finish or choose another --out"
                ) from None
            # a dead writer's lock, or one naming a PID that another program now has: taken over
            self.path.unlink(missing_ok=True)
        raise FileExistsError(f"cannot take the lock {self.path}")

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def staging_prefix(out: Path, kind: str) -> str:
    """Hidden staging folders beside ``out`` carry the writer's PID, so a killed writer's are recognisable."""
    return f".{out.name}.{kind}-{os.getpid()}-"


def remove_stale_staging(out: Path) -> list[Path]:
    """Delete staging folders beside ``out`` left by writers that no longer run (killed mid-save)."""
    removed = []
    for kind in ("tmp", "old"):
        for folder in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*-*"):
            pid = folder.name[len(f".{out.name}.{kind}-") :].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def _runs_slicegpt(pid: int) -> bool:
    """Is process ``pid`` a slicegpt run? (A lock's PID may have been reused by another program
    since its writer was killed.) Where the command line cannot be read, assume it is."""
    try:
        return b"slicegpt" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def save(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    report: SliceReport | None = None,
    extra: Callable[[Path], None] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    shards: ShardWriter | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write a sliced model to ``out`` atomically.

    Per-layer models become a slicegpt folder (loaded by :func:`load`, or by transformers'
    ``from_pretrained(..., trust_remote_code=True)``); uniform models become a standard
    checkpoint of their family that plain transformers loads.

    ``report`` is the :class:`~slicegpt.core.report.SliceReport` of the run (default: the one
    :func:`~slicegpt.core.slicing.slice_model` left on the model, or the metadata of the folder
    the model was loaded from); its PCA spectra are kept beside the model in ``spectra.json``
    (for ``slicegpt inspect`` and plots).

    Everything is written into a hidden temporary folder beside ``out`` and renamed into place
    at the end, so a crash or a full disk never leaves a half-written model; an existing ``out``
    is replaced only with ``overwrite``. ``extra(folder)`` may add files to the temporary folder
    before it is renamed (a LoRA adapter beside a recovered model).

    Weights are written in safetensors shards of at most ``max_shard_size`` (one
    ``model.safetensors`` when they fit, else numbered shards and an index), one decoder layer
    after another and then the rest. ``shards``: a writer (from :func:`staging_writer`) that a
    streamed slice has already given its finished layers (the model's layers are then empty);
    its folder becomes the output. ``dtype``: the weights' dtype on disk (``bfloat16`` halves
    a float32 model's files; config.json says it); None writes them as they are in memory.
    """
    report = report if report is not None else getattr(model, "slicegpt_report", None)
    meta = build_metadata(report) if report is not None else provenance(model)
    if meta is None:
        raise SlicedFolderError("this model has not been sliced (no slice report and no slicegpt metadata)")
    recovery = getattr(model, "slicegpt_recovery", None)  # left by slicegpt.recover (training/ layer)
    if recovery is not None:
        meta = {**meta, "recovery": recovery.summary()}
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    check_free_space(out.parent, bytes_needed(model), f"saving {out}")
    tmp = (
        shards.folder
        if shards is not None
        else Path(tempfile.mkdtemp(prefix=staging_prefix(out, "tmp"), dir=out.parent))
    )
    writer = shards if shards is not None else ShardWriter(tmp, max_shard_size)
    if dtype is not None:
        writer.dtype = parse_dtype(dtype)
    in_memory = model.config.dtype
    if writer.dtype is not None:
        model.config.dtype = writer.dtype  # config.json names the dtype the weights are in
    try:
        if is_standard(meta) and not is_prepared(model, spec_for_config(model.config)):
            # Already a standard model (a uniform folder loaded, then trained): written as is.
            _write_loaded_standard(model, writer, meta, tokenizer)
        elif is_standard(meta):
            export_standard(model, writer, meta, tokenizer=tokenizer)
        else:
            _write_per_layer(model, writer, meta, tokenizer)
        if report is not None and getattr(report, "spectra", None):
            (tmp / SPECTRA).write_text(
                json.dumps({"spectra": report.spectra, "widths": report.widths.to_dict()}) + "\n"
            )
        if extra is not None:
            extra(tmp)
        # mkdtemp made the staging folder private (0700); the output gets the user's usual permissions
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=staging_prefix(out, "old"), dir=out.parent))
            os.replace(out, backup / "old")
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.config.dtype = in_memory
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_writer(
    out: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, dtype: str | torch.dtype | None = None
) -> ShardWriter:
    """A shard writer in a fresh staging folder beside ``out``, for a streamed slice to give its
    finished layers to; :func:`save` (``shards=``) completes it and renames it into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    return ShardWriter(
        tempfile.mkdtemp(prefix=staging_prefix(out, "tmp"), dir=out.parent),
        max_shard_size,
        dtype=None if dtype is None else parse_dtype(dtype),
    )


def _write_loaded_standard(model: nn.Module, writer: ShardWriter, meta: dict[str, Any], tokenizer: Any) -> None:
    state = host_state(model)
    spec = spec_for_config(model.config)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop(f"{spec.head}.weight", None)  # tying kept: the head is the embedding table
    files = write_weights(writer, model, state)
    model.config.save_pretrained(writer.folder)
    write_companions(writer.folder, {**meta, "format_version": FORMAT_VERSION, "files": files}, model, tokenizer)


def _write_per_layer(model: nn.Module, writer: ShardWriter, meta: dict[str, Any], tokenizer: Any) -> None:
    tmp = writer.folder
    meta = dict(meta)
    state = host_state(model)
    if meta.get("tied_head"):  # the head is the embedding table: written once
        state.pop(f"{spec_for_config(model.config).head}.weight", None)
    meta["files"] = write_weights(writer, model, state)
    meta["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    config = copy.deepcopy(model.config)
    config.slicegpt = meta
    # transformers' Auto classes find the loader through this (with trust_remote_code=True).
    config.auto_map = {"AutoModelForCausalLM": f"{REMOTE_MODULE[:-3]}.SlicedForCausalLM"}
    config.save_pretrained(tmp)
    shutil.copyfile(Path(__file__).parent.parent / "remote" / REMOTE_MODULE, tmp / REMOTE_MODULE)
    write_companions(tmp, meta, model, tokenizer)


def verify_files(folder: Path, meta: dict[str, Any], checksum: bool = True) -> None:
    """Sizes (always) and sha256 (when ``checksum``) against what was recorded at save time."""
    if "files" not in meta and (not is_standard(meta) or meta.get("format_version", 1) >= 2):
        raise SlicedFolderError(
            f"{folder}'s metadata records no file sizes or checksums (its 'files' entry was removed): "
            "it cannot be checked; refusing to load it"
        )
    recorded = meta.get("files", {})
    unrecorded = (
        sorted(p.name for p in folder.glob("*.safetensors") if p.name not in recorded) if "files" in meta else []
    )
    if unrecorded:
        raise SlicedFolderError(
            f"{folder}'s metadata records no size or checksum for {', '.join(unrecorded[:3])}: "
            "it cannot be checked; refusing to load it"
        )
    for name, want in recorded.items():
        path = folder / name
        if not path.is_file():
            raise SlicedFolderError(f"{path} is missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise SlicedFolderError(f"{path} is {size} bytes, {want['size']} were written: truncated or replaced")
        if checksum and sha256(path) != want["sha256"]:
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
    widths = Widths.from_dict(meta["widths"])
    apply_widths(model, spec, widths)
    if meta.get("tied_head"):
        retie_head(model, spec, torch.empty(widths.head, dtype=dtype, device="meta"))
    model.slicegpt_metadata = meta
    return model


def apply_widths(model: nn.Module, spec: Any, widths: Widths) -> None:
    """Cut a prepared (empty) model to ``widths``: the per-layer walk with no bases."""
    slice_embeddings(model, spec, None, widths.embedding)
    for block, w in zip(get_layers(model, spec), widths.layers):
        slice_block(block, spec, BlockBases(None, None, None), w)
    slice_head(model, spec, None, widths.head)


def load(
    folder: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    device_map: str | dict[str, Any] | None = None,
    checksum: bool = True,
) -> nn.Module:
    """Load any folder slicegpt wrote: needs only the folder (not the source model, not the sparsity).

    A per-layer folder is rebuilt by slicegpt; a uniform folder is a standard checkpoint, read by
    transformers. Either way the folder's metadata is kept as ``model.slicegpt_metadata``.

    ``device_map`` ('auto', or accelerate's mapping of module names to devices) spreads the
    layers over the available devices instead of moving the whole model to ``device``;
    ``checksum`` False checks only the file sizes (faster; a same-size corruption goes unseen).
    """
    from transformers import AutoConfig

    folder = Path(folder)
    meta = read_metadata(folder)
    verify_files(folder, meta, checksum=checksum)
    if is_standard(meta):
        model = _load_standard(folder, meta, dtype)
        return _place(model, device, device_map, no_split=None)
    config = AutoConfig.from_pretrained(folder)
    saved_dtype = parse_dtype(meta.get("dtype", "float32"))
    model = build_skeleton(config, saved_dtype)
    state = read_state(folder)
    spec = spec_for_config(config)
    head_key = f"{spec.head}.weight"
    if meta.get("tied_head"):
        # written once; assign=True replaces both parameters, so the tie is made again below
        state[head_key] = state.get(f"{spec.embeddings[0]}.weight")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise SlicedFolderError(f"the weights in {folder} do not fit the recorded widths: {first_line(exc)}") from exc
    if meta.get("tied_head"):
        get_path(model, spec.head).weight = get_path(model, spec.embeddings[0]).weight
    leftovers = [n for n, p in model.named_parameters() if p.is_meta]
    if leftovers:
        raise SlicedFolderError(f"the weights in {folder} lack tensors: {', '.join(leftovers[:3])}")
    if dtype is not None:
        model.to(parse_dtype(dtype))
    # A block is the unit that must stay on one device: its shortcut and branches meet there.
    return _place(model, device, device_map, no_split=["SlicedBlock"])


def _load_standard(folder: Path, meta: dict[str, Any], dtype: str | torch.dtype | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=parse_dtype(dtype) if dtype is not None else "auto")
    except (OSError, ValueError, KeyError) as exc:
        raise SlicedFolderError(
            f"{folder} does not load as a standard checkpoint: {str(exc).strip().splitlines()[0]}"
        ) from exc
    model.slicegpt_metadata = meta
    return model


def _place(
    model: nn.Module, device: str | torch.device, device_map: str | dict[str, Any] | None, no_split: list[str] | None
) -> nn.Module:
    if device_map is not None:
        from accelerate import dispatch_model, infer_auto_device_map

        if device_map == "auto":
            device_map = infer_auto_device_map(model, no_split_module_classes=no_split or model._no_split_modules)
        if isinstance(device_map, str):
            device_map = {"": device_map}
        model = dispatch_model(model, device_map=device_map)
        model.hf_device_map = device_map
    else:
        model.to(device)
    model.eval()
    return model
