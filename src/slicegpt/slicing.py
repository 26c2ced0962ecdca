"""The orchestrating loop: calibrate, rotate and slice one layer at a time.

Memory discipline: only the layer being processed sits on ``device``; calibration activations
live on the host in the model's dtype and travel to the device one batch at a time; covariance
sums are accumulated on the device in float64 while streaming.

Per sequential layer ``l`` with input basis Q_in (kept width d_in), one pass over the calibration
rows runs attention once, another runs the MLP once:

    x   = inputs in basis Q_in                      [B, T, d_in]
    r   = x Q_in^T + attn(norm(x))                  [B, T, D]   original basis; PCA -> Q_mid
    y   = r Q_mid                                    [B, T, d_mid]
    o   = y Q_mid^T + mlp(norm(y))                   [B, T, D]   PCA -> Q_out
    out = o Q_out                                    [B, T, d_out] next layer's input

Attention's inputs are rotated before its pass and its outputs after it; likewise the MLP, so
every PCA sees the signals of the already-sliced upstream model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .arch import ArchSpec, spec_for_config
from .config import SliceConfig, parse_dtype
from .data import Rows, calibration_rows
from .memory import release_free_memory
from .modules import SlicedBlock, WeightlessRMSNorm
from .surgery import (
    LayerWidths,
    Widths,
    attn_readers,
    attn_writers,
    count_parameters,
    fit_widths,
    get_layers,
    get_path,
    hidden_size,
    mlp_readers,
    mlp_writers,
    prepare,
)

FORMAT_VERSION = 1


# --------------------------------------------------------------------------- widths


class WidthPolicy(Protocol):
    """Chooses the width of every point of the residual stream."""

    def widths(self, hidden: int, num_layers: int, topology: str) -> Widths: ...


@dataclass(frozen=True)
class ConstantWidth:
    """The same kept width ``int((1 - sparsity) * D)`` rounded down to ``round_to`` everywhere.

    The last layer's output (what the final norm and head read) keeps the full width unless
    ``slice_head``.
    """

    sparsity: float
    round_to: int = 8
    slice_head: bool = False

    def kept(self, hidden: int) -> int:
        d = int((1.0 - self.sparsity) * hidden)
        if d < hidden:
            d -= d % self.round_to
        if d < 1:
            raise ValueError(f"sparsity {self.sparsity} leaves no width of {hidden} (round_to {self.round_to})")
        return d

    def widths(self, hidden: int, num_layers: int, topology: str) -> Widths:
        d = self.kept(hidden)
        layers = []
        for i in range(num_layers):
            last = i == num_layers - 1
            d_out = d if (self.slice_head or not last) else hidden
            layers.append(LayerWidths(d_in=d, d_mid=d, d_out=d_out, mlp_shortcut=topology == "sequential"))
        return Widths(hidden=hidden, embedding=d, layers=tuple(layers))


# --------------------------------------------------------------------------- covariance


class Covariance:
    """Streaming sum of x^T x over unmasked tokens, float64, on the device it is given."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        flat = x.reshape(-1, x.shape[-1])
        if mask is not None:
            flat = flat[mask.reshape(-1).to(flat.device).bool()]
        flat = flat.to(torch.float64)
        self.sum.addmm_(flat.t(), flat)
        self.count += flat.shape[0]

    def pca(self, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (descending, of the mean covariance) and eigenvectors as columns."""
        if self.count == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        cov = self.sum / self.count
        damped = cov + damping * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        evals, evecs = torch.linalg.eigh(damped)
        order = torch.argsort(evals, descending=True)
        # Report the undamped spectrum: what the data says, not the regulariser.
        undamped = torch.einsum("ij,ji->i", evecs.t() @ cov, evecs)
        return undamped[order], evecs[:, order]


# --------------------------------------------------------------------------- rotations


class RotationSource(Protocol):
    """Gives the rotation (D, D float64, columns by significance) at each point of the stream.

    ``needs_statistics``: the loop must stream calibration data and accumulate covariances.
    ``shared``: every point gets the same basis, so a residual connection whose width does not
    change carries no shortcut matrix.
    """

    needs_statistics: bool
    shared: bool

    def __call__(self, point: str, cov: "Covariance | None") -> tuple[torch.Tensor | None, torch.Tensor]: ...


@dataclass
class PCARotation:
    """Per-point PCA of the calibration signals (SliceGPT's choice)."""

    damping: float = 0.01
    needs_statistics: bool = True
    shared: bool = False

    def __call__(self, point: str, cov: "Covariance | None") -> tuple[torch.Tensor | None, torch.Tensor]:
        assert cov is not None
        return cov.pca(self.damping)


@dataclass
class FixedRotation:
    """One given rotation everywhere (a random Q in invariance tests; the uniform mode's shared Q).

    No calibration data is needed: the loop only rotates and slices weights.
    """

    q: torch.Tensor
    needs_statistics: bool = False
    shared: bool = True

    def __call__(self, point: str, cov: "Covariance | None") -> tuple[torch.Tensor | None, torch.Tensor]:
        return None, self.q


class PooledCovariance:
    """Collects every point's covariance, trace-normalised, and returns the identity.

    Run over the unrotated model at full width, it leaves the model unchanged and yields the
    uniform mode's single rotation: the PCA of the sum of all points' covariances, each scaled
    to unit trace so that no layer dominates by the size of its activations.
    """

    needs_statistics = True
    shared = True

    def __init__(self, dim: int) -> None:
        self.eye = torch.eye(dim, dtype=torch.float64)
        self.total = torch.zeros(dim, dim, dtype=torch.float64)
        self.points: list[str] = []

    def __call__(self, point: str, cov: "Covariance | None") -> tuple[torch.Tensor | None, torch.Tensor]:
        assert cov is not None
        c = (cov.sum / max(cov.count, 1)).cpu()
        self.total += c / c.trace().clamp_min(1e-30)
        self.points.append(point)
        return None, self.eye

    def rotation(self, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = Covariance(self.total.shape[0], torch.device("cpu"))
        pooled.sum, pooled.count = self.total.clone(), len(self.points)
        return pooled.pca(damping)


# --------------------------------------------------------------------------- capture


class _Captured(Exception):
    pass


def _to(obj: Any, device: torch.device | str, memo: dict[int, tuple[Any, Any]] | None = None) -> Any:
    """Move every tensor inside nested tuples/lists/dicts.

    With ``memo``, a tensor met again (layers of one kind share their mask and rotary tables) is
    moved once and shared; the memo keeps the original alive so that its id cannot be reused.
    """
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        hit = memo.get(id(obj))
        if hit is None:
            hit = memo[id(obj)] = (obj, obj.to(device))
        return hit[1]
    if isinstance(obj, tuple):
        return tuple(_to(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _non_layer_modules(model: nn.Module, spec: ArchSpec) -> list[nn.Module]:
    """Everything the model runs before its first layer: the siblings of the layer list."""
    parent_path, _, name = spec.layers.rpartition(".")
    parent = get_path(model, parent_path) if parent_path else model
    return [m for n, m in parent.named_children() if n != name]


@dataclass
class LayerInputs:
    """Calibration inputs, kept on the host, one entry per batch.

    ``hidden`` holds the current layer's input; ``calls[batch][layer]`` the other arguments the
    model hands each layer. They differ between layers where layer kinds differ (Gemma 2/3:
    sliding-window and global layers get different masks and rotary tables).
    """

    hidden: list[torch.Tensor]  # [B, T, width]
    calls: list[list[tuple[tuple, dict[str, Any]]]]
    masks: list[torch.Tensor | None]  # [B, T]

    def layer_call(self, layer: int, batch: int, device: torch.device) -> tuple[tuple, dict[str, Any]]:
        args, kwargs = self.calls[batch][layer]
        return _to(args, device), _to(kwargs, device)


class _Recorder(nn.Module):
    """Stands in for one decoder layer while capturing: records its arguments, passes x on."""

    def __init__(self, index: int, sink: list, returns_tuple: bool, last: bool) -> None:
        super().__init__()
        self.index, self.sink, self.returns_tuple, self.last = index, sink, returns_tuple, last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.sink.append((self.index, hidden, tuple(args[1:]), kwargs))
        if self.last:  # nothing after the layers is needed: skip the final norm and the head
            raise _Captured
        return (hidden,) if self.returns_tuple else hidden


@torch.inference_mode()
def capture_layer_inputs(model: nn.Module, spec: ArchSpec, rows: Rows, batch_size: int, device: torch.device) -> LayerInputs:
    """Run the model with its layers stood in for by recorders; keep what each layer receives.

    The model's own forward computes the hidden states layer 0 reads and every argument it hands
    each layer (masks, positions, rotary embeddings, cache arguments): no transformers forward
    is copied, and whatever a new version passes is passed on as is. The recorders cost nothing,
    and the forward stops at the last one.
    """
    layers = get_layers(model, spec)
    originals = list(layers)
    front = _non_layer_modules(model, spec)
    for m in front:
        m.to(device)
    captured = LayerInputs([], [], [])
    sink: list = []
    for i in range(len(layers)):
        layers[i] = _Recorder(i, sink, spec.layer_returns_tuple, last=i == len(layers) - 1)
    try:
        for ids, mask in rows.batches(batch_size):
            captured.masks.append(mask)
            sink.clear()
            try:
                model(
                    input_ids=ids.to(device),
                    attention_mask=None if mask is None else mask.to(device),
                    use_cache=False,
                )
            except _Captured:
                pass
            if [entry[0] for entry in sink] != list(range(len(layers))):
                raise RuntimeError(f"the model called its layers in an unexpected order: {[entry[0] for entry in sink]}")
            memo: dict[int, tuple[Any, Any]] = {}
            captured.hidden.append(sink[0][1].detach().to("cpu"))
            captured.calls.append([(_to(a, "cpu", memo), _to(k, "cpu", memo)) for _, _, a, k in sink])
    finally:
        sink.clear()
        for i, layer in enumerate(originals):
            layers[i] = layer
        for m in front:
            m.to("cpu")
    return captured


# --------------------------------------------------------------------------- report


@dataclass
class SliceReport:
    """What slicing did: widths, spectra, parameter counts, time."""

    architecture: str
    model_type: str
    widths: Widths
    config: SliceConfig
    params_before: int
    params_after: int
    seconds: float
    calibration_tokens: int
    # PCA eigenvalues per point, descending: "embedding", "layer.{i}.mid", "layer.{i}.out".
    spectra: dict[str, list[float]] = field(default_factory=dict)

    def variance_kept(self) -> dict[str, float]:
        """Share of each spectrum's total kept at the chosen width."""
        kept: dict[str, float] = {}
        for name, spectrum in self.spectra.items():
            width = self._width_of(name)
            total = sum(spectrum)
            kept[name] = sum(spectrum[:width]) / total if total > 0 else 1.0
        return kept

    def _width_of(self, name: str) -> int:
        if name in ("embedding", "uniform"):
            return self.widths.embedding
        _, idx, point = name.split(".")
        w = self.widths.layers[int(idx)]
        return w.d_mid if point == "mid" else w.d_out


# --------------------------------------------------------------------------- main loop


def _stream(items: list[torch.Tensor], device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    for i, t in enumerate(items):
        yield i, t.to(device)


def _signal(x: torch.Tensor, norm: WeightlessRMSNorm, config: SliceConfig) -> torch.Tensor:
    return norm(x) if config.pca_signal == "normed" else x


def _model_context(model: nn.Module) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def clip_seqlen(model: nn.Module, seqlen: int) -> int:
    ctx = _model_context(model)
    return min(seqlen, ctx) if ctx else seqlen


def _resolve_rows(model: nn.Module, tokenizer: Any, calib: Any, config: SliceConfig, spec: ArchSpec) -> Rows:
    if isinstance(calib, Rows):
        return calib
    if isinstance(calib, torch.Tensor):
        return Rows(calib.long())
    seqlen = clip_seqlen(model, config.seqlen)
    bos = tokenizer.bos_token_id if spec.bos_per_row else None
    source = calib if calib is not None else config.calib
    if isinstance(source, str) and "\n" in source:  # raw text given directly
        return calibration_rows(tokenizer, "<text>", nsamples=config.nsamples, seqlen=seqlen, seed=config.seed, bos_token_id=bos, text=source)
    return calibration_rows(tokenizer, source, nsamples=config.nsamples, seqlen=seqlen, seed=config.seed, bos_token_id=bos)


def _shortcut(q_in: torch.Tensor, d_in: int, q_out: torch.Tensor, d_out: int, shared: bool) -> torch.Tensor | None:
    # A shared rotation and an unchanged width make the residual path the identity.
    if shared and d_in == d_out and torch.equal(q_in, q_out):
        return None
    return ops.shortcut_matrix(q_in, d_in, q_out, d_out)


def _rotate_weights_only(model: nn.Module, spec: ArchSpec, widths: Widths, rotation: RotationSource, progress: bool) -> None:
    """Rotate and slice with bases known in advance: no calibration forward at all."""
    _, q = rotation("embedding", None)
    for path in spec.embeddings:
        ops.rotate_embedding(get_path(model, path), q, widths.embedding)
    q_prev = q
    dtype = next(model.parameters()).dtype
    for idx, block in enumerate(tqdm(get_layers(model, spec), desc="rotating layers", unit="layer", disable=not progress)):
        w = widths.layers[idx]
        ops.rotate_inputs(attn_readers(block, spec), q_prev, w.d_in)
        if spec.topology == "sequential":
            _, q_mid = rotation(f"layer.{idx}.mid", None)
            ops.rotate_outputs(attn_writers(block, spec), q_mid, w.d_mid)
            block.set_shortcut("attn_shortcut", _shortcut(q_prev, w.d_in, q_mid, w.d_mid, rotation.shared), dtype)
            ops.rotate_inputs(mlp_readers(block, spec), q_mid, w.d_mid)
            q_from, d_from, writers, which = q_mid, w.d_mid, mlp_writers(block, spec), "mlp_shortcut"
        else:
            q_from, d_from, writers, which = q_prev, w.d_in, attn_writers(block, spec), "attn_shortcut"
        _, q_out = rotation(f"layer.{idx}.out", None)
        ops.rotate_outputs(writers, q_out, w.d_out)
        block.set_shortcut(which, _shortcut(q_from, d_from, q_out, w.d_out, rotation.shared), dtype)
        q_prev = q_out
    ops.rotate_inputs([get_path(model, spec.head)], q_prev, widths.head)


def _calibrated_loop(
    model: nn.Module,
    spec: ArchSpec,
    rows: Rows,
    config: SliceConfig,
    widths: Widths,
    rotation: RotationSource,
    progress: bool,
    desc: str = "slicing layers",
) -> dict[str, list[float]]:
    """The per-layer streaming loop (see the module docstring); returns the PCA spectra."""
    device = torch.device(config.device)
    D = widths.hidden
    layers = get_layers(model, spec)
    dtype = next(model.parameters()).dtype
    spectra: dict[str, list[float]] = {}

    def new_cov(wanted: bool = True) -> Covariance | None:
        return Covariance(D, device) if wanted else None

    def rotate_at(point: str, cov: Covariance | None) -> torch.Tensor:
        evals, q = rotation(point, cov)
        if evals is not None:
            spectra[point] = evals.tolist()
        return q.to(device=device, dtype=torch.float64)

    inputs = capture_layer_inputs(model, spec, rows, config.batch_size, device)
    release_free_memory()
    probe_norm = WeightlessRMSNorm(D, layers[0].attn_norm.eps)

    # Embeddings: PCA of what layer 0 reads.
    cov = new_cov()
    for i, x in _stream(inputs.hidden, device):
        cov.add(_signal(x, probe_norm, config), inputs.masks[i])
    q_prev = rotate_at("embedding", cov)
    for path in spec.embeddings:
        ops.rotate_embedding(get_path(model, path), q_prev.cpu(), widths.embedding)
    for i, x in _stream(inputs.hidden, device):
        inputs.hidden[i] = (x.to(torch.float64) @ q_prev[:, : widths.embedding]).to(dtype).cpu()

    for idx, block in enumerate(tqdm(layers, desc=desc, unit="layer", disable=not progress)):
        w = widths.layers[idx]
        # The head reads the full width: the original basis serves, no PCA needed.
        keep_full = idx == len(layers) - 1 and w.d_out == D and not rotation.shared
        block.to(device)
        q_in_t = q_prev[:, : w.d_in].t().to(dtype)  # (d_in, D): back to the original basis

        ops.rotate_inputs(attn_readers(block, spec), q_prev, w.d_in)
        if spec.topology == "sequential":
            # Pass A: attention once per row; r (original basis) replaces x in host storage.
            cov = new_cov()
            for i, x in _stream(inputs.hidden, device):
                args, kwargs = inputs.layer_call(idx, i, device)
                r = x @ q_in_t + block.attn_branch(x, args, kwargs)
                cov.add(_signal(r, block.mlp_norm, config), inputs.masks[i])
                inputs.hidden[i] = r.cpu()
            q_mid = rotate_at(f"layer.{idx}.mid", cov)
            ops.rotate_outputs(attn_writers(block, spec), q_mid, w.d_mid)
            block.set_shortcut("attn_shortcut", _shortcut(q_prev, w.d_in, q_mid, w.d_mid, rotation.shared), dtype)
            # Fused MoE blocks size their output like their input, while the MLP's writers are
            # still D wide here: such MLPs run in the original basis (y projected back, readers
            # not yet rotated), which computes the same, and their readers rotate after the pass.
            in_original_basis = spec.mlp_preserves_width
            if not in_original_basis:
                ops.rotate_inputs(mlp_readers(block, spec), q_mid, w.d_mid)

            # Pass B: the MLP once per row.
            q_mid_d = q_mid[:, : w.d_mid].to(dtype)
            cov = new_cov(not keep_full)
            for i, r in _stream(inputs.hidden, device):
                y = r @ q_mid_d
                y_back = y @ q_mid_d.t()
                o = y_back + block.mlp_branch(y_back if in_original_basis else y)
                if cov is not None:
                    cov.add(_signal(o, block.mlp_norm, config), inputs.masks[i])
                inputs.hidden[i] = o.cpu()
            if in_original_basis:
                ops.rotate_inputs(mlp_readers(block, spec), q_mid, w.d_mid)
            q_from, d_from, writers, which = q_mid, w.d_mid, mlp_writers(block, spec), "mlp_shortcut"
        else:
            # Parallel block: attention and MLP read the same norm; one pass, one PCA.
            cov = new_cov(not keep_full)
            for i, x in _stream(inputs.hidden, device):
                args, kwargs = inputs.layer_call(idx, i, device)
                o = x @ q_in_t + block.attn_branch(x, args, kwargs) + block.mlp_branch(x)
                if cov is not None:
                    cov.add(_signal(o, block.attn_norm, config), inputs.masks[i])
                inputs.hidden[i] = o.cpu()
            q_from, d_from, writers, which = q_prev, w.d_in, attn_writers(block, spec), "attn_shortcut"

        q_out = torch.eye(D, dtype=torch.float64, device=device) if keep_full else rotate_at(f"layer.{idx}.out", cov)
        ops.rotate_outputs(writers, q_out, w.d_out)
        block.set_shortcut(which, _shortcut(q_from, d_from, q_out, w.d_out, rotation.shared), dtype)
        q_out_d = q_out[:, : w.d_out].to(dtype)
        for i, o in _stream(inputs.hidden, device):
            inputs.hidden[i] = (o @ q_out_d).cpu()
        q_prev = q_out
        block.to("cpu")
        release_free_memory()  # the old weights and this layer's activations were just replaced

    ops.rotate_inputs([get_path(model, spec.head)], q_prev.cpu(), widths.head)
    return spectra


# no_grad, not inference_mode: tensors made under inference_mode stay "inference tensors" for
# good, and a sliced model's weights must take part in autograd afterwards (recovery
# fine-tuning, even a .t() view outside inference mode fails on them).
@torch.no_grad()
def slice_model(
    model: nn.Module,
    tokenizer: Any,
    calib: Any = None,
    config: SliceConfig | None = None,
    *,
    policy: WidthPolicy | None = None,
    rotation: RotationSource | None = None,
    progress: bool = True,
    source_model: str | None = None,
) -> SliceReport:
    """Rotate and slice ``model`` in place.

    ``calib`` is a source name or path ('wiki', 'wikitext2', 'corpus.txt'), raw text, a
    (rows, seqlen) tensor of token ids, or :class:`Rows`; None uses ``config.calib``.
    ``policy`` chooses the widths (default: :class:`ConstantWidth` from the config);
    ``rotation`` the bases (default: :class:`PCARotation` per point, or with
    ``config.uniform`` one pooled rotation for the whole network).
    """
    config = config or SliceConfig()
    config.validate()
    spec = spec_for_config(model.config)
    start = time.perf_counter()
    model.eval()
    params_before = count_parameters(model)
    was_tied = _is_tied(model, spec)
    final_scale = None
    if config.uniform:
        from .uniform import check_uniform_supported, final_norm_scale

        check_uniform_supported(model.config, spec)
        final_scale = final_norm_scale(model, spec) if was_tied else None
    rotation = rotation or PCARotation(config.damping)
    rows = _resolve_rows(model, tokenizer, calib, config, spec) if (rotation.needs_statistics or config.uniform) else None

    prepare(model, spec)
    model.to("cpu")
    release_free_memory()  # prepare replaced every folded weight
    D = hidden_size(model)
    n_layers = len(get_layers(model, spec))
    policy = policy or ConstantWidth(config.sparsity, config.round_to, config.slice_head or config.uniform)
    widths = fit_widths(policy.widths(D, n_layers, spec.topology), spec)
    spectra: dict[str, list[float]] = {}

    if config.uniform:
        # First pass: the unrotated model at full width, pooling every point's covariance.
        pool = PooledCovariance(D)
        full = ConstantWidth(0.0, 1, slice_head=True).widths(D, n_layers, spec.topology)
        _calibrated_loop(model, spec, rows, config, full, pool, progress, desc="pooling covariances")
        evals, q = pool.rotation(config.damping)
        spectra["uniform"] = evals.tolist()
        if final_scale is not None:
            from .uniform import align_to_final_norm

            q, final_scale = align_to_final_norm(q, widths.embedding, final_scale)
        rotation = FixedRotation(q)

    if rotation.needs_statistics:
        spectra.update(_calibrated_loop(model, spec, rows, config, widths, rotation, progress))
    else:
        _rotate_weights_only(model, spec, widths, rotation, progress)

    if final_scale is not None:
        from .uniform import retie_head

        retie_head(model, spec, final_scale)

    report = SliceReport(
        architecture=spec.name,
        model_type=model.config.model_type,
        widths=widths,
        config=config,
        params_before=params_before,
        params_after=count_parameters(model),
        seconds=time.perf_counter() - start,
        calibration_tokens=0 if rows is None else int(rows.input_ids.numel() if rows.attention_mask is None else rows.attention_mask.sum()),
        spectra=spectra,
    )
    model.config.slicegpt = metadata(report, source_model)
    return report


def _is_tied(model: nn.Module, spec: ArchSpec) -> bool:
    head = get_path(model, spec.head).weight
    emb = get_path(model, spec.embeddings[0]).weight
    return head is emb or head.data_ptr() == emb.data_ptr()


def metadata(report: SliceReport, source_model: str | None) -> dict[str, Any]:
    """What a saved folder needs to rebuild the model, and what produced it."""
    from . import __version__

    return {
        "format_version": FORMAT_VERSION,
        "slicegpt_version": __version__,
        "architecture": report.architecture,
        "model_type": report.model_type,
        "source_model": source_model,
        "mode": "uniform" if report.config.uniform else "per-layer",
        "settings": report.config.to_dict(),
        "widths": report.widths.to_dict(),
        "params_before": report.params_before,
        "params_after": report.params_after,
        "calibration_tokens": report.calibration_tokens,
        "variance_kept": report.variance_kept(),
    }
