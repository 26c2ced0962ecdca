"""The orchestrating loop: calibrate, rotate and slice one layer at a time.

Memory discipline: only the layer being processed sits on ``device``; calibration activations
live on the host in the model's dtype and travel to the device one batch at a time; covariance
sums are accumulated on the device in float64 while streaming.

The walk, per layer (:func:`walk`)::

    block = source.layer(i)                      where the weights come from
    bases = calibrate_block(block, ...)          statistics with the weights untouched: Q_mid, Q_out
    widths = slice_block(block, bases, w)        the one rotate-and-slice of the block
    sink.done(i, block); checkpoint.after_layer  where the layer goes; what resume needs

:func:`calibrate_block` runs the block in its *original* basis on inputs carried back from the
upstream basis (x Q_in^T: the same function, as Q_in has orthonormal columns), once for
attention and once for the MLP, so every PCA sees the signals of the already-sliced upstream
model. For a sequential layer with input basis Q_in (kept width d_in)::

    x   = inputs in basis Q_in                      [B, T, d_in]
    r   = x Q_in^T + attn(norm(x Q_in^T))           [B, T, D]   PCA -> Q_mid
    y   = r Q_mid Q_mid^T                           [B, T, D]   (the sliced mid stream, carried back)
    o   = y + mlp(norm(y))                          [B, T, D]   PCA -> Q_out
    out = o Q_out                                   [B, T, d_out] next layer's input

With MLP neurons to prune or corrections on, :mod:`slicegpt.core.corrections` adds its passes
between these (the dense model's layer, once; attention's writer refit; the MLP's neuron choice
and writer refit), each before the pass whose output it changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import json
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .._version import __version__
from ..arch import ArchSpec, spec_for_config
from ..config import SliceConfig, check_device
from ..data import Rows, clip_seqlen
from ..sources import calibration_rows_for, resolve_auto_calibration
from ..memory import release_free_memory
from . import allocate, corrections, neurons, ops, spread, uniform
from .budget import parse_axes
from .block import BlockBases, slice_block, slice_embeddings, slice_head
from .capture import LayerInputs, capture_layer_inputs, stream
from .modules import SlicedBlock, WeightlessRMSNorm
from .placement import dispatch, is_dispatched, layer_devices, undispatch
from .precision import asks_fast_float32, fast_float32
from .pca import Covariance, FixedRotation, NumericalError, PCARotation, PooledCovariance, RotationSource, check_finite
from .report import SliceReport, numerics
from .sizing import WidthPlan, plan_widths
from .streams import NUMERICS, InMemorySink, LayerSink, LoopState, Restart, Streams
from .surgery import (
    count_parameters,
    get_layers,
    get_path,
    hidden_size,
    is_prepared,
    is_tied,
    prepare,
    prepare_layer,
    prepare_outside_layers,
)
from .widths import ConstantWidth, Widths, WidthPolicy

log = logging.getLogger(__name__)


class _BasisChooser:
    """Asks the rotation source for the basis at each point, after the covariance is reduced."""

    def __init__(self, rotation: RotationSource, streams: Streams, device: torch.device) -> None:
        self.rotation, self.streams, self.device = rotation, streams, device
        self.spectra: dict[str, list[float]] = {}
        self.refits: dict[str, float] = {}  # relative ridge strength chosen per refit writer

    def __call__(self, point: str, cov: Covariance | None) -> torch.Tensor:
        if cov is not None:
            cov = self.streams.reduce(cov)
            check_finite(point, cov)
        evals, q = self.rotation(point, cov)
        if evals is not None:
            self.spectra[point] = evals.tolist()
        # every process computed this basis from the same combined covariance; one process's bits for all
        return self.streams.reduce.agree(q.to(device=self.device, dtype=torch.float64).contiguous())


def _signal(config: SliceConfig, norm: WeightlessRMSNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    return norm if config.pca_signal == "normed" else (lambda x: x)


def calibrate_block(
    block: SlicedBlock,
    spec: ArchSpec,
    index: int,
    inputs: LayerInputs,
    q_in: torch.Tensor,
    w: Any,
    choose: _BasisChooser,
    config: SliceConfig,
    keep_full: bool,
) -> BlockBases:
    """Run ``block`` (weights in the original basis) over the calibration rows; choose its mid and
    out bases, prune its MLP neurons and refit its writers where asked.

    Leaves the next layer's inputs, in the chosen output basis, in ``inputs.hidden`` (and the
    dense model's next inputs in ``inputs.reference`` when corrections are on).
    ``keep_full``: the output stays full width in the original basis (the head reads it).
    """
    device = choose.device
    D = q_in.shape[0]
    dtype = inputs.hidden[0].dtype
    signal = _signal(config, block.attn_norm)
    # (d_in, D): back to the original basis; None where the stream is in it already (the basis
    # kept: MLP neurons alone, or a statistics walk), which spares a product per pass
    back_in = None if ops.is_identity(q_in, w.d_in) else q_in[:, : w.d_in].t().to(dtype)

    def to_original(x: torch.Tensor) -> torch.Tensor:
        return x if back_in is None else x @ back_in

    wants_pca = choose.rotation.needs_statistics
    width = neurons.intermediate_size(block, spec) if w.mlp is not None else None
    prune = w.mlp if width is not None and w.mlp < width else None
    dense = corrections.dense_layer(block, index, inputs, device) if inputs.reference is not None else None
    q_mid = None
    # What the writers read in their refit passes: the passes after them run the writer alone.
    attn_read: corrections.WriterInputs | None = None
    mlp_read: tuple[corrections.WriterInputs, torch.Tensor | None] | None = None
    if spec.topology == "sequential":
        if dense is not None:
            # also where attention itself is not compressed (MLP neurons only): its refit lets it
            # cancel what upstream pruning changed (SmolLM2, 25% of parameters by MLP neurons, 32
            # calibration rows: wiki 2.49x / books 3.26x dense perplexity with it, 2.46x / 3.43x without)
            attn_read = corrections.refit_attention(
                block, spec, index, inputs, to_original, dense[0], device, choose.refits, reduce=choose.streams.reduce
            )
        cov = Covariance(D, device) if wants_pca else None
        for i, x in stream(inputs.hidden, device):  # attention once per batch (its writer alone after a refit)
            xb = to_original(x)
            if attn_read is not None and attn_read.inputs is not None:
                r = xb + attn_read.output(i, device)
            else:
                args, kwargs = inputs.layer_call(index, i, device)
                r = xb + block.attn_branch(xb, args, kwargs)
            if cov is not None:
                cov.add(signal(r), inputs.masks[i])
            inputs.hidden[i] = r.cpu()
        attn_read = None  # released before the MLP keeps what its writer reads
        q_mid = choose(f"layer.{index}.mid", cov)
        mid = None if ops.is_identity(q_mid, w.d_mid) else q_mid[:, : w.d_mid].to(dtype)

        def to_mid(r: torch.Tensor) -> torch.Tensor:  # the sliced mid stream, carried back
            return r if mid is None else (r @ mid) @ mid.t()

        if spec.experts is not None:
            # MoE: each routed expert is pruned and refit on its own output; their sum has no
            # one writer to refit toward the dense stream (attention's refit above still runs).
            if prune is not None:
                corrections.prune_experts(
                    block,
                    spec,
                    inputs,
                    to_mid,
                    prune,
                    device,
                    choose.refits,
                    f"layer.{index}.mlp",
                    reduce=choose.streams.reduce,
                )
        elif prune is not None or dense is not None:
            mlp_read = corrections.refit_mlp(
                block,
                spec,
                inputs,
                to_mid,
                None if dense is None else dense[1],
                prune,
                device,
                choose.refits,
                f"layer.{index}.mlp",
                config.token_weighting,
                reduce=choose.streams.reduce,
            )
        cov = None if keep_full or not wants_pca else Covariance(D, device)
        with _watch_mlp(choose, block, spec) as watch:
            for i, r in stream(inputs.hidden, device):  # the MLP once per batch, on the sliced mid stream
                y = to_mid(r)
                m = _mlp_out(block, y, mlp_read, i, device)
                o = y + m
                if cov is not None:
                    cov.add(signal(o), inputs.masks[i])
                if watch is not None:
                    watch.add(m, o, inputs.masks[i])
                inputs.hidden[i] = o.cpu()
    else:
        if prune is not None:
            mlp_read = corrections.refit_mlp(
                block,
                spec,
                inputs,
                to_original,
                None,
                prune,
                device,
                choose.refits,
                f"layer.{index}.mlp",
                config.token_weighting,
                reduce=choose.streams.reduce,
            )
        cov = None if keep_full or not wants_pca else Covariance(D, device)
        with _watch_mlp(choose, block, spec) as watch:
            for i, x in stream(inputs.hidden, device):  # parallel: both branches read one norm
                args, kwargs = inputs.layer_call(index, i, device)
                xb = to_original(x)
                m = _mlp_out(block, xb, mlp_read, i, device)
                o = xb + block.attn_branch(xb, args, kwargs) + m
                if cov is not None:
                    cov.add(signal(o), inputs.masks[i])
                if watch is not None:
                    watch.add(m, o, inputs.masks[i])
                inputs.hidden[i] = o.cpu()
    if dense is not None:
        inputs.reference = dense[1]
    q_out = torch.eye(D, dtype=torch.float64, device=device) if keep_full else choose(f"layer.{index}.out", cov)
    inputs.project(q_out[:, : w.d_out], device)
    return BlockBases(q_in=q_in, q_mid=q_mid, q_out=q_out)


def _mlp_out(
    block: SlicedBlock,
    y: torch.Tensor,
    read: tuple[corrections.WriterInputs, torch.Tensor | None] | None,
    batch: int,
    device: torch.device,
) -> torch.Tensor:
    """The MLP branch's output on ``y``: its writer on the kept neurons of what it read in the refit
    pass (the same product the pruned MLP computes), or the branch run again where none was kept."""
    if read is not None and read[0].inputs is not None:
        return read[0].output(batch, device, read[1])
    return block.mlp_branch(y)


def _watch_mlp(choose: _BasisChooser, block: SlicedBlock, spec: ArchSpec) -> Any:
    """A context giving what watches this layer's MLP pass, where the rotation source is a
    collector that asks (:class:`slicegpt.core.spread.NeuronCurves`), and None otherwise."""
    observe = getattr(choose.rotation, "observe_mlp", None)
    return contextlib.nullcontext() if observe is None else observe(block, spec, choose.streams.reduce)


def walk(
    model: nn.Module,
    spec: ArchSpec,
    rows: Rows | None,
    widths: Widths,
    rotation: RotationSource,
    config: SliceConfig,
    streams: Streams,
    devices: Sequence[torch.device],
    *,
    progress: bool = True,
    desc: str = "slicing layers",
    start: LoopState | None = None,
) -> tuple[Widths, dict[str, list[float]], dict[str, float]]:
    """Rotate and slice every layer in order; returns the widths as built, the PCA spectra and the refits.

    ``start`` continues a stopped walk at ``start.next_layer``: the layers before it and the
    embeddings are already rotated and sliced in ``model`` (see :func:`restore`), and the state
    holds the activations, basis, spectra, refits and widths as built the stopped walk had
    there, so the rest goes on bit for bit as it would have. ``devices``: where each layer is
    processed (:func:`~slicegpt.core.placement.layer_devices`).
    """
    device = devices[0]  # capture and the embeddings' statistics run with the first layer
    D, n = widths.hidden, len(get_layers(model, spec))
    choose = _BasisChooser(rotation, streams, device)
    inputs = None
    # Calibration passes run when the rotation needs statistics, or when neurons are pruned or
    # writers refit (a fixed rotation with pruning: uniform mode's second walk).
    prunes = any(w.mlp is not None for w in widths.layers) and not rotation.collect_only
    correct = config.corrections and not rotation.collect_only
    if rotation.needs_statistics or prunes or correct or hasattr(rotation, "observe_mlp"):
        # On a restart this captures through the restored (sliced) embeddings: only the layers'
        # call arguments and the masks are kept, which do not depend on the embeddings' width.
        # This process's share of the rows (all of them in one process); the refits' held-out
        # rows are the last global batch wherever it sits, so results match one process's.
        local, batches = streams.reduce.share(rows, config.batch_size)
        inputs = capture_layer_inputs(model, spec, local, config.batch_size, device, store=streams.activations)
        held = corrections.held_out(-(-len(rows) // config.batch_size))
        inputs.held = batches.index(held) if held in batches else -1
        if start is not None:
            inputs.hidden = inputs.new(start.hidden)
            inputs.reference = None if start.reference is None else inputs.new(start.reference)
        elif correct:
            inputs.reference = inputs.new(h.clone() for h in inputs.hidden)
        release_free_memory()
    if start is None:
        pca = inputs is not None and rotation.needs_statistics
        q_prev = choose(
            "embedding", inputs.covariance(_signal(config, WeightlessRMSNorm(D, 1e-6)), device) if pca else None
        )
        if not rotation.collect_only:
            slice_embeddings(model, spec, q_prev, widths.embedding)
        if inputs is not None:
            inputs.project(q_prev[:, : widths.embedding], device)
        first, built = 0, []
    else:
        choose.spectra, choose.refits = dict(start.spectra), dict(start.refits)
        q_prev = None if start.q_prev is None else start.q_prev.to(device)
        first, built = start.next_layer, list(start.built)
    embeddings = {} if rotation.collect_only else embedding_tensors(model, spec)
    for index in tqdm(range(first, n), desc=desc, unit="layer", disable=not progress, initial=first, total=n):
        device = choose.device = devices[index]
        q_prev = None if q_prev is None else q_prev.to(device)
        block = streams.source.layer(model, spec, index).to(device)
        w = widths.layers[index]
        if inputs is not None:
            keep_full = index == n - 1 and w.d_out == D and not rotation.shared
            bases = calibrate_block(block, spec, index, inputs, q_prev, w, choose, config, keep_full)
        else:
            bases = BlockBases(q_prev, choose(f"layer.{index}.mid", None), choose(f"layer.{index}.out", None))
        if rotation.collect_only:
            built.append(w)
            streams.source.release(model, spec, index, block)
        else:
            built.append(slice_block(block, spec, bases, w, shared=rotation.shared))
        q_prev = bases.q_out
        # The checkpoint before the sink: a streamed layer's tensors are gone once it is written.
        streams.checkpoint.after_layer(
            LoopState(
                index + 1,
                q_prev,
                choose.spectra,
                choose.refits,
                built,
                hidden=None if inputs is None else inputs.hidden,
                reference=None if inputs is None else inputs.reference,
                layer=block.state_dict(),
                embeddings=embeddings,
            )
        )
        if not rotation.collect_only:
            streams.sink.done(model, spec, index, block)
        release_free_memory()  # the old weights and this layer's activations were just replaced
    if not rotation.collect_only:
        slice_head(model, spec, q_prev, widths.head)
    return replace(widths, layers=tuple(built)), choose.spectra, choose.refits


def embedding_tensors(model: nn.Module, spec: ArchSpec) -> dict[str, torch.Tensor]:
    """The embedding tables' tensors under their model paths ('model.embed_tokens.weight')."""
    return {f"{path}.{name}": t for path in spec.embeddings for name, t in get_path(model, path).state_dict().items()}


def restore(model: nn.Module, spec: ArchSpec, widths: Widths, restart: Restart, sink: LayerSink | None = None) -> None:
    """Put a stopped walk's finished work back into the prepared ``model``: the embeddings and
    every finished layer are cut to their widths (the per-layer walk with no bases, as loading
    does) and take the tensors the walk had left in them. ``sink``: each finished layer goes
    there at once, as the walk sent it (a streamed run writes it to the output shards and
    empties it: one finished layer in memory at a time)."""
    slice_embeddings(model, spec, None, widths.embedding)
    for path in spec.embeddings:
        prefix = f"{path}."
        _assign(
            get_path(model, path),
            {k[len(prefix) :]: v for k, v in restart.embeddings.items() if k.startswith(prefix)},
            path,
        )
    layers = get_layers(model, spec)
    for index, (w, tensors) in enumerate(zip(restart.state.built, restart.layers)):
        slice_block(layers[index], spec, BlockBases(None, None, None), w)
        _assign(layers[index], tensors, f"layer {index}")
        if sink is not None:
            sink.done(model, spec, index, layers[index])


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:  # a staging folder that does not fit the model it claims to continue
        raise ValueError(
            f"the staged tensors of {what} do not fit the model: {str(exc).strip().splitlines()[0]}"
        ) from None


def run_identity(
    model: nn.Module,
    config: SliceConfig,
    calibration_sha256: str | None,
    widths: Widths,
    rotation: RotationSource,
    source_model: str | None,
    source_fingerprint: str | None = None,
) -> dict[str, Any]:
    """What must match for a checkpoint to continue this run: the source model (its name, a
    fingerprint of its weights, its config), the settings, the calibration token ids, the widths
    and the kind of rotation. Hashes, not contents, where contents are large."""
    digest = lambda raw: hashlib.sha256(raw).hexdigest()  # noqa: E731
    return {
        "source model": source_model,
        "source weights": source_fingerprint,
        "model config": digest(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode()),
        "calibration data": calibration_sha256,
        "widths": digest(json.dumps(widths.to_dict(), sort_keys=True).encode()),
        "rotation": type(rotation).__name__
        + (
            ""
            if getattr(rotation, "q", None) is None
            else " " + digest(rotation.q.detach().cpu().contiguous().numpy().tobytes())[:16]
        ),
        "settings": config.to_dict(),
        NUMERICS: numerics(config.device),
    }


# no_grad, not inference_mode: tensors made under inference_mode stay "inference tensors" for
# good, and a sliced model's weights must take part in autograd afterwards (recovery
# fine-tuning, even a .t() view outside inference mode fails on them).
@torch.no_grad()
def slice_model(
    model: nn.Module,
    tokenizer: Any = None,
    calib: Any = None,
    config: SliceConfig | None = None,
    *,
    policy: WidthPolicy | None = None,
    rotation: RotationSource | None = None,
    progress: bool = True,
    source_model: str | None = None,
    source_fingerprint: str | None = None,
    streams: Streams | None = None,
) -> SliceReport:
    """Rotate and slice ``model`` in place; the report is also kept as ``model.slicegpt_report``.

    ``calib`` is a source name or path ('wiki', 'wikitext2', 'corpus.txt'), raw text as
    :class:`slicegpt.data.Text`, a (rows, seqlen) tensor of token ids, or :class:`Rows`; None
    uses ``config.calib``. ``policy`` chooses the widths (default: the config's, as
    :func:`slicegpt.core.sizing.plan_widths` decides them); ``rotation`` the bases (default:
    :class:`PCARotation` per point, or with ``config.uniform`` one pooled rotation for the whole
    network); ``streams`` where layers come from and go, how covariances are combined, and what
    is checkpointed between layers. ``source_model`` and ``source_fingerprint`` name the model
    sliced (as :func:`slicegpt.io.models.source_identity` gives them): recorded in the metadata,
    and part of what a resume must match.

    Resume: ``streams=Streams(checkpoint=SliceStaging(folder, resume=True))``
    (:mod:`slicegpt.io.staging`) keeps, after every layer, what the run needs to go on; called
    again the same way on the same source model after a crash or a kill, it checks that the run
    is the same one (source model, settings, calibration data; else a
    :class:`~slicegpt.io.staging.ResumeError` naming what differs), puts the finished layers and
    embeddings back and continues at the next layer, giving bit for bit the model an
    uninterrupted run gives. Any :class:`~slicegpt.core.streams.Checkpoint` can do this: its
    ``begin`` hands back a :class:`~slicegpt.core.streams.Restart`.

    The phases: settle the settings; (with ``config.search``) measure candidate splits; plan the
    widths; check and prepare the model; spread MLP neurons; choose the rotation source; walk
    the layers; report.
    """
    config = _settle(model, tokenizer, calib, config, streams)
    run = dict(
        policy=policy,
        rotation=rotation,
        progress=progress,
        source_model=source_model,
        source_fingerprint=source_fingerprint,
        streams=streams,
    )
    with fast_float32(asks_fast_float32(config)):
        if config.search and config.target_params is not None and policy is None:
            return _search(model, tokenizer, calib, config, **run)
        return _compress(model, tokenizer, calib, config, **run)


def _settle(
    model: nn.Module, tokenizer: Any, calib: Any, config: SliceConfig | None, streams: Streams | None
) -> SliceConfig:
    """The settings as they will run (and be recorded), checked; a model already sliced refused."""
    config = (config or SliceConfig()).resolved()  # the size and mode as they run, recorded so
    if calib is None:  # the default data for this model ('auto'), recorded as it ran
        streamed = bool(streams and streams.source.streamed)
        config = resolve_auto_calibration(config, tokenizer, streamed=streamed)
    config.validate()
    if getattr(model, "slicegpt_metadata", None) is not None or is_prepared(model, spec_for_config(model.config)):
        raise ValueError("this model is already sliced (loaded from a slicegpt folder): slice its source model instead")
    if clip_seqlen(model, config.seqlen) < config.seqlen:
        clipped = clip_seqlen(model, config.seqlen)
        log.info(f"note: seqlen {config.seqlen} is above the model's context; using {clipped}")
        config = replace(config, seqlen=clip_seqlen(model, config.seqlen))
    return config


def _search(model: nn.Module, tokenizer: Any, calib: Any, config: SliceConfig, **run: Any) -> SliceReport:
    """The allocator: compress a copy at each candidate split, measure it on held-out calibration
    rows, then compress ``model`` at the best (:func:`slicegpt.core.allocate.search_split`)."""
    streams = run["streams"]
    if streams is not None and streams.reduce.processes > 1:
        raise ValueError(
            "search does not run distributed (each candidate would need every process); "
            "run it in one process, or give residual_share"
        )
    progress = run["progress"]
    share, records, seconds, fit = allocate.search_split(
        model,
        tokenizer,
        calib if calib is not None else config.calib,
        config,
        lambda m, t, rows, c, progress: _compress(m, t, rows, c, progress=progress),
        progress=progress,
    )
    report = _compress(model, tokenizer, fit, replace(config, residual_share=share, search=False), **run)
    report.allocation.update(search=records, search_seconds=seconds, searched=True)
    report.config = config
    return report


def _compress(
    model: nn.Module,
    tokenizer: Any,
    calib: Any,
    config: SliceConfig,
    *,
    policy: WidthPolicy | None = None,
    rotation: RotationSource | None = None,
    progress: bool = True,
    source_model: str | None = None,
    source_fingerprint: str | None = None,
    streams: Streams | None = None,
) -> SliceReport:
    """One compression of ``model`` with settled ``config`` (see :func:`slice_model`)."""
    spec = spec_for_config(model.config)
    check_device(config.device)
    start = time.perf_counter()
    model.eval()
    streams, devices = _placement(model, spec, config, streams or Streams())
    _check_finite_weights(model)
    params_before = count_parameters(model)
    tied = is_tied(model, spec)
    if config.uniform:
        uniform.check_supported(model.config, spec)
    # the axes and the budget's feasibility are checked before any calibration work
    plan = plan_widths(model, spec, config, params_before, policy)
    # A uniform model, or a per-layer budget spent on MLP neurons alone (original basis kept),
    # keeps a tied head tied: the final norm's scale moves into the norm.
    final_scale = uniform.final_norm_scale(model, spec) if tied and (config.uniform or plan.keep_basis) else None
    rotation = rotation or PCARotation(config.damping)
    rows = _calibration(model, tokenizer, calib, config, rotation)
    verified = _verify_and_prepare(model, spec, streams, rows, config)
    widths = plan.widths
    spread_record = None
    if rows is not None and plan.spread_total is not None:
        widths, spread_record = _spread(model, spec, rows, plan, config, devices, streams, progress)
    calibration_sha256 = None if rows is None else hashlib.sha256(rows.input_ids.numpy().tobytes()).hexdigest()
    restart = streams.checkpoint.begin(
        run_identity(model, config, calibration_sha256, widths, rotation, source_model, source_fingerprint)
    )
    if restart is not None and restart.state is not None:
        whole = widths.embedding == widths.hidden and rotation.needs_statistics  # no pooling walk needed
        if config.uniform and restart.pooled is None and not whole:
            raise ValueError(
                "the staged run has finished layers but not uniform mode's rotation: it cannot be continued"
            )
        restore(model, spec, widths, restart, sink=streams.sink if streams.source.streamed else None)
    rotation, final_scale, spectra = _rotation_source(
        model, spec, rows, widths, rotation, final_scale, config, plan, streams, devices, restart, progress
    )
    widths, found, refits = walk(
        model,
        spec,
        rows,
        widths,
        rotation,
        config,
        streams,
        devices,
        progress=progress,
        start=None if restart is None else restart.state,
    )
    spectra.update(found)
    if final_scale is not None:
        uniform.retie_head(model, spec, final_scale)
    if config.device_map is not None:
        dispatch(model, spec, devices)  # the layers are on their devices already; the rest joins them
    report = SliceReport(
        architecture=spec.name,
        model_type=model.config.model_type,
        widths=widths,
        config=config,
        params_before=params_before,
        params_after=count_parameters(model)
        + (uniform.explicit_norm_parameters(model, spec, widths.embedding) if config.uniform else 0),
        seconds=time.perf_counter() - start,
        calibration_tokens=0 if rows is None else rows.tokens,
        spectra=spectra,
        source_model=source_model,
        source_fingerprint=source_fingerprint,
        refits=refits,
        calibration_sha256=calibration_sha256,
        versions=library_versions(),
        numerics=numerics(config.device),
        verified=verified,
        tied_head=plan.keep_basis and final_scale is not None,
    )
    if plan.budget:
        report.target_params = plan.target
        report.allocation = {"axes": list(parse_axes(config.axes)), **plan.allocation(widths)}
        if spread_record is not None:
            report.allocation["spread"] = spread_record
        if report.params_after > plan.target:  # counted on the meta skeleton; the real model must agree
            raise RuntimeError(
                f"compressed model has {report.params_after:,} parameters, above the target {plan.target:,}"
            )
    model.slicegpt_report = report
    return report


def _placement(
    model: nn.Module, spec: ArchSpec, config: SliceConfig, streams: Streams
) -> tuple[Streams, list[torch.device]]:
    """Where each layer is processed; with a map, 'auto' reads hf_device_map before the hooks go."""
    devices = layer_devices(model, spec, config.device_map, config.device)
    if config.device_map is not None:
        if streams.source.streamed:
            raise ValueError(
                "a device map keeps each sliced layer on its device: it slices in memory, not streamed (stream off)"
            )
        undispatch(model)
        if isinstance(streams.sink, InMemorySink):
            streams = replace(streams, sink=InMemorySink(keep_on_device=True))
    elif is_dispatched(model):
        raise ValueError(
            "the model is spread over devices (loaded with device_map=...): pass device_map='auto' to slice it "
            "there, or load it without a device map"
        )
    return streams, devices


def _check_finite_weights(model: nn.Module) -> None:
    # A streamed model's layers are read later; its source checks each layer's weights then.
    bad = next(
        (name for name, p in model.named_parameters() if not p.is_meta and not bool(torch.isfinite(p).all())), None
    )
    if bad is not None:
        raise NumericalError(f"the source weight {bad} holds NaN or Inf: the model is damaged; nothing was sliced")


def _calibration(
    model: nn.Module, tokenizer: Any, calib: Any, config: SliceConfig, rotation: RotationSource
) -> Rows | None:
    """The calibration rows, where anything needs statistics (None: a fixed rotation and nothing to fit)."""
    needs_rows = rotation.needs_statistics or config.uniform or config.corrections or config.target_params is not None
    if not needs_rows:
        return None
    rows = calibration_rows_for(model, tokenizer, calib if calib is not None else config.calib, config)
    half = next(model.parameters()).dtype
    if half in (torch.float16, torch.bfloat16):
        log.info(
            f"note: the model is {str(half).removeprefix('torch.')}: its activations are accumulated into float64 "
            "covariances, and the PCA, rotations and refits run in float64"
        )
    if rows.tokens < hidden_size(model):
        log.warning(
            f"warning: {rows.tokens} calibration tokens for a hidden width of {hidden_size(model)}: the covariance is "
            "rank-deficient and its smallest directions are noise; give more rows (`nsamples`) or longer ones "
            "(`seqlen`)"
        )
    return rows


def _verify_and_prepare(
    model: nn.Module, spec: ArchSpec, streams: Streams, rows: Rows | None, config: SliceConfig
) -> float | None:
    """Make the model invariant (:func:`prepare`), checking on the first calibration tokens that
    it still computes what it did (the largest relative logit difference; None unchecked)."""
    probe = rows.input_ids[:1, :32] if rows is not None and config.verify else None
    if streams.source.streamed:
        # Only the first layer is read for the check: the spec is the family's, so a fold that
        # is wrong anywhere is wrong there.
        verified = _verify_first_layer(model, spec, streams.source, probe) if probe is not None else None
        prepare(model, spec)  # (done already when verified)
    else:
        before = _logits(model, probe) if probe is not None else None
        prepare(model, spec)
        model.to("cpu")
        verified = _verify(model, probe, before, spec) if probe is not None else None
    release_free_memory()  # prepare replaced every folded weight
    return verified


def neuron_curves(
    model: nn.Module,
    spec: ArchSpec,
    rows: Rows,
    config: SliceConfig,
    devices: Sequence[torch.device | str] | torch.device | str = "cpu",
    streams: Streams | None = None,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Every layer's MLP error curve (:class:`slicegpt.core.spread.NeuronCurves`): a statistics
    walk of the prepared ``model`` at full width in its original basis, as uniform pooling walks.
    ``devices``: one, or one per layer."""
    D, n = hidden_size(model), len(get_layers(model, spec))
    if isinstance(devices, (str, torch.device)):
        devices = [devices] * n
    devices = [torch.device(d) for d in devices]
    collector = spread.NeuronCurves(D)
    full = ConstantWidth(0.0, 1, slice_head=True).widths(D, n, spec.topology)
    streams = streams or Streams()
    walk(
        model,
        spec,
        rows,
        full,
        collector,
        config,
        Streams(source=streams.source, reduce=streams.reduce),
        devices,
        progress=progress,
        desc="spreading MLP neurons",
    )
    return collector.curves


def _spread(
    model: nn.Module,
    spec: ArchSpec,
    rows: Rows,
    plan: WidthPlan,
    config: SliceConfig,
    devices: list[torch.device],
    streams: Streams,
    progress: bool,
) -> tuple[Widths, dict[str, Any]]:
    """The plan's widths with its MLP neurons spread over the layers by each layer's error curve
    (:func:`neuron_curves`, over the first calibration rows)."""
    start = time.perf_counter()
    spread_rows = rows.take(slice(None, spread.SPREAD_ROWS))
    curves = neuron_curves(model, spec, spread_rows, config, devices, streams, progress)
    kept = [w.mlp for w in plan.widths.layers]
    counts = spread.spread(curves, plan.spread_total, plan.step)
    # every process computed the same from the same moments; made bit-identical all the same
    counts = [int(k) for k in streams.reduce.agree(torch.tensor(counts, dtype=torch.int64)).tolist()]
    widths = plan.spread(counts)
    if plan.counter.count(widths) > plan.target:  # the total was counted; the spread must agree
        raise RuntimeError(f"spread neurons {counts} exceed the target {plan.target:,}")
    record = {
        "rows": len(spread_rows),
        "step": plan.step,
        "total": plan.spread_total,
        "even_total": sum(kept),
        "weighted_error_even": float(sum(c[j] for c, j in zip(curves, kept))),
        "weighted_error_spread": float(sum(c[j] for c, j in zip(curves, counts))),
    }
    if progress:  # the time is printed, not recorded: a resumed run's metadata equals an uninterrupted one's
        log.info(
            f"slicegpt: MLP neurons spread over the layers by their error ({time.perf_counter() - start:.0f} s): "
            f"{min(counts)}-{max(counts)} per layer, {sum(counts):,} in all"
        )
    release_free_memory()
    return widths, record


def _rotation_source(
    model: nn.Module,
    spec: ArchSpec,
    rows: Rows | None,
    widths: Widths,
    rotation: RotationSource,
    final_scale: torch.Tensor | None,
    config: SliceConfig,
    plan: WidthPlan,
    streams: Streams,
    devices: list[torch.device],
    restart: Restart | None,
    progress: bool,
) -> tuple[RotationSource, torch.Tensor | None, dict[str, list[float]]]:
    """Where the walk's bases come from: ``rotation`` itself (a basis per point), or one fixed
    rotation for the whole network (uniform mode; a model that keeps its basis), with the final
    norm's scale aligned to it where a tied head needs that. Also the spectra found here."""
    D, spectra = widths.hidden, {}
    if config.uniform and restart is not None and restart.pooled is not None:
        # The pooling walk finished before the stop: its rotation was kept. (A stop inside the
        # pooling walk keeps nothing: it is statistics only, and a restart runs it again.)
        evals, q = restart.pooled
        spectra["uniform"] = evals.tolist()
    elif (config.uniform or plan.keep_basis) and widths.embedding == D and rotation.needs_statistics:
        # The stream keeps its width (only MLP neurons go): any basis serves, the original one
        # costs no pooling walk.
        q = torch.eye(D, dtype=torch.float64)
    elif config.uniform:
        # First walk: statistics only, the unrotated model at full width, pooling every point.
        pool = PooledCovariance(D)
        full = ConstantWidth(0.0, 1, slice_head=True).widths(D, len(get_layers(model, spec)), spec.topology)
        walk(
            model,
            spec,
            rows,
            full,
            pool,
            config,
            Streams(source=streams.source, reduce=streams.reduce),
            devices,
            progress=progress,
            desc="pooling covariances",
        )
        evals, q = pool.rotation(config.damping)
        q = streams.reduce.agree(q.contiguous())
        streams.checkpoint.pooled(evals, q)
        spectra["uniform"] = evals.tolist()
    else:
        return rotation, final_scale, spectra
    if final_scale is not None:
        q, final_scale = uniform.align_to_final_norm(q, widths.embedding, final_scale)
    return FixedRotation(q), final_scale, spectra


# Largest relative logit difference a correct fusion can show, by dtype (rounding, not error).
VERIFY_TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-3, torch.bfloat16: 1e-1, torch.float16: 5e-2}


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    dev = next(model.parameters()).device
    return model(input_ids=ids.to(dev), use_cache=False).logits.to("cpu", torch.float64)


def _verify(model: nn.Module, probe: torch.Tensor, before: torch.Tensor, spec: ArchSpec) -> float:
    """The invariant model must compute what the loaded one did; refuse a family described wrongly."""
    if not bool(torch.isfinite(before).all()):
        raise NumericalError(
            "the model as loaded gives NaN or Inf logits on the first calibration row: its weights or "
            "its dtype cannot represent it; nothing was sliced"
        )
    after = _logits(model, probe)
    diff = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
    dtype = next(model.parameters()).dtype
    if not diff <= VERIFY_TOLERANCE.get(dtype, 2e-3):  # also catches NaN
        raise NumericalError(
            f"made invariant, this {spec.name} model no longer computes what it did (largest relative logit "
            f"difference {diff:.2e}): its family's spec does not fit it; nothing was sliced (`verify=False` skips this "
            "check)"
        )
    return diff


def _verify_first_layer(model: nn.Module, spec: ArchSpec, source: Any, probe: torch.Tensor) -> float:
    """:func:`_verify` for a streamed model, and its :func:`prepare`: the model cut to its first
    layer (read for this) gives the same logits before and after it is made invariant. The
    family's spec is checked where it could be wrong: a fold that is wrong anywhere is wrong in
    layer 0. ``model`` is left prepared, its layers still empty."""
    layers = get_layers(model, spec)
    kept, depth = list(layers), model.config.num_hidden_layers
    first = source.original(model, spec, 0)
    try:
        model.config.num_hidden_layers = 1  # the families that walk layers[: num_hidden_layers]
        del layers[1:]
        layers[0] = first
        before = _logits(model, probe)
        prepare_outside_layers(model, spec)
        layers[0] = prepare_layer(first, spec, model.config, 0)
        return _verify(model, probe, before, spec)
    finally:
        model.config.num_hidden_layers = depth
        del layers[:]
        layers.extend(prepare_layer(layer, spec, model.config, i) for i, layer in enumerate(kept))


def library_versions() -> dict[str, str]:
    import transformers

    return {"slicegpt": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
