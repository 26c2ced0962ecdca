"""Slicing a model larger than memory: its layers read from the safetensors shards one at a time.

:func:`open_streamed` builds the model's skeleton on the meta device and reads only what lies
outside the decoder layers (embeddings, final norm, head: what capture and the head's slicing
need). :class:`StreamingSource` reads a layer's tensors when the loop reaches it and makes that
layer invariant (:func:`slicegpt.core.surgery.prepare_layer`, the same operations on the same
bits as a whole-model prepare); :class:`StreamingSink` appends the finished layer to the output
shards and empties it. Host memory so holds the non-layer tensors, one layer and the
calibration activations, whatever the depth.

A checkpoint whose tensor names are not the model's own (families transformers converts while
loading, as fused MoE experts) cannot be read layer by layer: ``stream='auto'`` then slices in
memory and says so.
"""

from __future__ import annotations

import logging
import copy
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..arch import ArchSpec, spec_for_config
from ..config import SliceConfig, parse_dtype
from ..core.report import SliceReport
from ..core.slicing import slice_model
from ..core.streams import Checkpoint, LocalReduction, NoCheckpoint, Reduction, Streams
from ..core.surgery import get_layers, get_path, prepare_layer
from .folders import check_free_space, check_output_dir, save, staging_writer
from .models import ModelLoadError, first_line, resolve_model, source_identity, tied_away, tokenizer_failure
from .shards import DEFAULT_MAX_SHARD_SIZE, INDEX, WEIGHTS, ShardReader, ShardWriter, layer_tensors

log = logging.getLogger(__name__)

STREAM_MODES = ("auto", "on", "off")


class StreamingError(ValueError):
    """A model that cannot be streamed from its files."""


def local_folder(name_or_path: str | None) -> tuple[Path, str]:
    """(a local folder with config.json and safetensors weights, the display name).

    GGUF files become a cached converted folder (as for in-memory loading); a hub id is
    downloaded (config, tokenizer and safetensors files only) into the hub cache.
    """
    source, display = resolve_model(name_or_path)
    path = Path(source)
    if not path.exists():
        try:
            from huggingface_hub import snapshot_download

            path = Path(
                snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"])
            )
        except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated: one line
            raise ModelLoadError(f"cannot download {name_or_path}: {first_line(exc)}") from exc
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"cannot load model {name_or_path}: no config.json there")
    return path, display


def has_safetensors(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file() or (folder / INDEX).is_file()


class StreamingSource:
    """Layers read from ``reader`` when the loop reaches them, cast to ``dtype`` and prepared.

    ``templates`` are the skeleton's decoder layers as built (meta tensors), taken before the
    model is prepared: each read fills a copy of one.
    """

    streamed = True

    def __init__(self, reader: ShardReader, model: nn.Module, spec: ArchSpec, dtype: torch.dtype) -> None:
        self.reader, self.dtype = reader, dtype
        self.templates = [copy.deepcopy(layer) for layer in get_layers(model, spec)]
        self.prefix = spec.layers
        by_layer: dict[int, list[str]] = {}
        for name in reader.names():
            if name.startswith(self.prefix + "."):
                index = int(name[len(self.prefix) + 1 :].split(".", 1)[0])
                by_layer.setdefault(index, []).append(name)
        self.names = by_layer

    def original(self, model: nn.Module, spec: ArchSpec, index: int) -> nn.Module:
        """Layer ``index`` as the checkpoint holds it (not yet invariant), with its weights."""
        prefix = f"{self.prefix}.{index}."
        tensors = self.reader.read(self.names.get(index, []), self.dtype)
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise StreamingError(
                    f"the source weight {name} holds NaN or Inf: the model is damaged; nothing was written"
                )
        layer = copy.deepcopy(self.templates[index])
        try:
            layer.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items()}, strict=True, assign=True)
        except RuntimeError as exc:
            raise StreamingError(
                f"layer {index} of {self.reader.folder} does not fit the model's config: {first_line(exc)}"
            ) from None
        for p in layer.parameters():
            p.requires_grad_(False)
        return layer.eval()  # (the templates were copied from a skeleton built in training mode: dropout)

    def layer(self, model: nn.Module, spec: ArchSpec, index: int) -> nn.Module:
        block = prepare_layer(self.original(model, spec, index), spec, model.config, index)
        get_layers(model, spec)[index] = block
        return block

    def release(self, model: nn.Module, spec: ArchSpec, index: int, block: nn.Module) -> None:
        block.to("meta")


class StreamingSink:
    """Each finished layer goes to the output shards, then its tensors are dropped (meta)."""

    def __init__(self, writer: ShardWriter) -> None:
        self.writer = writer

    def done(self, model: nn.Module, spec: ArchSpec, index: int, block: nn.Module) -> None:
        self.writer.add(layer_tensors(block, spec.layers, index))
        block.to("meta")


def streamable(reader: ShardReader | None, model: nn.Module, spec: ArchSpec) -> tuple[str | None, bool]:
    """(why the checkpoint ``reader`` reads (None: the model has no safetensors) cannot be read
    layer by layer into ``model``, or None; whether its tensors outside the layers are named
    otherwise than the model's: transformers then reads those, see :func:`_outside_by_transformers`)."""
    if reader is None:
        return "the model has no safetensors weights", False
    names = set(reader.names())
    want = set(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        want.discard(f"{spec.head}.weight")
        names.discard(f"{spec.head}.weight")
    inside = lambda keys: {k for k in keys if k.startswith(spec.layers + ".")}  # noqa: E731
    if inside(names) != inside(want):
        odd = sorted(inside(names) ^ inside(want))
        return f"its checkpoint names the layers' tensors differently from the model ({', '.join(odd[:2])}, ...)", False
    return None, names != want


def _outside_by_transformers(folder: Path, config: Any, dtype: torch.dtype, spec: ArchSpec) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder layers, read by transformers itself (its renamings of old
    checkpoint names applied: GPT-NeoX's ``embed_out``), from the model cut to no layers."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config.num_hidden_layers = 0
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = []
    small, info = AutoModelForCausalLM.from_pretrained(
        folder, config=config, dtype=dtype, use_safetensors=True, output_loading_info=True
    )
    # transformers fills a tensor the checkpoint lacks at random and only logs it: refused here,
    # as the in-memory loader does (the embeddings, the final norm or an untied head).
    missing = sorted(
        k for k in info.get("missing_keys", []) if not k.startswith(spec.layers + ".") and not tied_away(small, k)
    )
    if missing:
        raise ModelLoadError(
            f"cannot load model {folder}: the checkpoint lacks {len(missing)} tensor(s): {', '.join(missing[:3])}"
        )
    return {k: v.detach().clone() for k, v in small.state_dict().items() if not k.startswith(spec.layers + ".")}


def open_streamed(
    name_or_path: str | None, *, dtype: str | torch.dtype = "float32", require: bool = False
) -> tuple[nn.Module, Any, str, StreamingSource] | None:
    """(skeleton model, tokenizer, display name, its :class:`StreamingSource`) for a safetensors model.

    The skeleton's decoder layers hold meta tensors; everything else is read. Returns None when
    the model cannot be streamed (the reason printed), unless ``require``: then the reason is the
    error.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, display = local_folder(name_or_path)
    torch_dtype = parse_dtype(dtype)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model {name_or_path}: {first_line(exc)}") from exc
    spec = spec_for_config(config)
    # Buffers (rotary frequencies) are not in the checkpoint: they are built for real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    try:
        reader = ShardReader(folder) if has_safetensors(folder) else None
    except ValueError as exc:  # truncated, garbage, a shard missing
        raise ModelLoadError(f"cannot load model {name_or_path}: {exc}") from None
    why, renamed_outside = streamable(reader, model, spec)
    if why is not None:
        if require:
            raise StreamingError(f"cannot stream {display}: {why}; use --stream off")
        log.info(f"note: slicing {display} in memory, not streamed: {why}")
        return None
    # Every shape checked against the config now, from the headers: not at layer 60 of 80.
    want = model.state_dict()
    odd = next((n for n, e in reader.entries.items() if n in want and tuple(want[n].shape) != e.shape), None)
    if odd is not None:
        raise ModelLoadError(
            f"cannot load model {name_or_path}: tensor {odd} has shape {list(reader.entries[odd].shape)} in "
            f"the checkpoint, the config says {list(want[odd].shape)}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - any failure to read the files is the user's to fix
        raise tokenizer_failure(name_or_path, folder, exc) from exc
    source = StreamingSource(reader, model, spec, torch_dtype)
    if renamed_outside:
        outside_tensors = _outside_by_transformers(folder, config, torch_dtype, spec)
    else:
        outside_tensors = reader.read([n for n in reader.names() if not n.startswith(spec.layers + ".")], torch_dtype)
    outside = list(outside_tensors)
    model.load_state_dict(outside_tensors, strict=False, assign=True)
    head, emb = get_path(model, spec.head), get_path(model, spec.embeddings[0])
    if getattr(config, "tie_word_embeddings", False) and f"{spec.head}.weight" not in outside:
        head.weight = emb.weight
    rows = emb.weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"cannot load model {name_or_path}: its tokenizer has {len(tokenizer)} tokens but its embeddings only "
            f"{rows} rows: they do not belong together"
        )
    left = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(spec.layers + ".")]
    if left:
        raise StreamingError(f"{folder} lacks tensors: {', '.join(left[:3])}")
    model.eval()
    return model, tokenizer, display, source


def want_stream(mode: str, reasons: dict[str, bool]) -> bool:
    """Whether to stream for ``--stream mode``.

    ``reasons`` names the settings that need the whole model in memory (a true value rules
    streaming out: an error with 'on', in memory with 'auto'). 'auto' streams otherwise (a model
    whose checkpoint cannot be read layer by layer then falls back, see :func:`open_streamed`).
    """
    if mode not in STREAM_MODES:
        raise ValueError(f"--stream must be one of {', '.join(STREAM_MODES)}, not {mode!r}")
    blocking = [name for name, on in reasons.items() if on]
    if mode == "off":
        return False
    if blocking and mode == "on":
        raise ValueError(
            f"--stream on cannot be combined with {', '.join(blocking)} (they need the whole model in memory)"
        )
    return not blocking


class DiscardSink:
    """A finished layer is dropped unwritten: the sink of a process that calibrates beside rank 0
    (which alone writes the output)."""

    def done(self, model: nn.Module, spec: ArchSpec, index: int, block: nn.Module) -> None:
        block.to("meta")


def slice_streamed(
    name_or_path: str | None,
    out: str | os.PathLike,
    config: SliceConfig | None = None,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
    opened: tuple[nn.Module, Any, str, StreamingSource] | None = None,
    activations: Callable[[], Any] = list,
    reduce: Reduction | None = None,
    checkpoint: Checkpoint | None = None,
    source: tuple[str, str | None] | None = None,
    save_dtype: str | torch.dtype | None = None,
    extra: Callable[[Path], None] | None = None,
) -> SliceReport:
    """Slice a safetensors model into ``out`` without ever holding its layers together.

    The Python form of ``slicegpt slice MODEL --stream on``: the layers are read, sliced and
    written one at a time (see the module's docstring); the result is the folder an in-memory
    slice and :func:`slicegpt.save` write, byte for byte. ``opened``: what :func:`open_streamed`
    returned, when the caller opened the model already. ``activations``: where the calibration
    activations are kept (``slicegpt.io.offload.disk_store(DIR)`` for files on disk); ``reduce``:
    the processes calibrating together (torchrun; this one writes the output); ``checkpoint``:
    what is staged for a resume (:class:`slicegpt.io.staging.SliceStaging`; a restart writes the
    finished layers to the new output's shards one at a time); ``source``: how the source is
    recorded, (name, weights fingerprint) (default: :func:`~slicegpt.io.models.source_identity`);
    ``save_dtype``: the dtype the weights are written in (None: the slicing dtype); ``extra``: adds
    files to the folder before it appears (as :func:`~slicegpt.io.folders.save` does).
    """
    config = (config or SliceConfig()).resolved()
    out = Path(out)
    check_output_dir(out, overwrite, protect=(name_or_path,))
    model, tokenizer, _name, reader_source = opened or open_streamed(name_or_path, dtype=config.dtype, require=True)
    recorded, fingerprint = source or source_identity(name_or_path)
    # The output is never larger than the source: checked before any work, not at layer 60 of 80.
    out.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(
        out.parent, sum(e.end - e.start for e in reader_source.reader.entries.values()), f"slicing into {out}"
    )
    writer = staging_writer(out, max_shard_size, dtype=save_dtype)
    try:
        report = slice_model(
            model,
            tokenizer,
            config.calib,
            config,
            source_model=recorded,
            source_fingerprint=fingerprint,
            progress=progress,
            streams=Streams(
                source=reader_source,
                sink=StreamingSink(writer),
                activations=activations,
                reduce=reduce or LocalReduction(),
                checkpoint=checkpoint or NoCheckpoint(),
            ),
        )
        save(model, out, tokenizer=tokenizer, overwrite=overwrite, report=report, shards=writer, extra=extra)
    except BaseException:
        shutil.rmtree(writer.folder, ignore_errors=True)
        raise
    return report
