"""The loop's connections to the outside, each a small protocol with today's implementation.

* :class:`LayerSource` -- where a layer's weights come from (the model in memory, or
  :class:`slicegpt.io.streaming.StreamingSource`: read from the safetensors shards and prepared
  when the layer's turn comes);
* :class:`LayerSink` -- where a finished layer goes (stays in the model, or
  :class:`slicegpt.io.streaming.StreamingSink`: written to the output shards and dropped);
* :class:`Reduction` -- the processes calibrating together: which calibration rows this one
  holds, and how every statistic summed over rows (covariances before each PCA, the refits'
  moments) is combined, and what every process must agree on (the identity in one process; an
  all-reduce over ranks when calibration is distributed, :mod:`slicegpt.core.distributed`);
* :class:`Checkpoint` -- told what identifies the run before any work and handed the state
  needed to continue after uniform mode's pooling walk and after every layer; it may hand back
  a :class:`Restart` to continue a stopped run (nothing by default;
  :class:`slicegpt.io.staging.SliceStaging` keeps a staging folder on disk for resume).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from ..arch import ArchSpec
from ..data import Rows
from .pca import Covariance
from .surgery import get_layers
from .widths import LayerWidths


class LayerSource(Protocol):
    #: True when layers are read on demand and the model between them holds no layer weights
    #: (meta tensors): the whole-model steps (NaN scan, logit check) then work layer by layer.
    streamed: bool

    def layer(self, model: nn.Module, spec: ArchSpec, index: int) -> nn.Module:
        """The prepared layer ``index``, in place in ``model``, with its weights."""
        ...

    def release(self, model: nn.Module, spec: ArchSpec, index: int, block: nn.Module) -> None:
        """A layer a statistics-only walk is done with (nothing of it is kept)."""
        ...


class LayerSink(Protocol):
    def done(self, model: nn.Module, spec: ArchSpec, index: int, block: nn.Module) -> None: ...


class Reduction(Protocol):
    """Combines what each process measured on its share of the calibration rows.

    Everything a process decides (bases, neurons kept, refit weights, ridge strengths) is computed
    from combined statistics, so every process slices its copy of the model alike.
    """

    processes: int  # how many processes share the rows (1: nothing to combine)

    def __call__(self, cov: Covariance) -> Covariance:
        """The covariance summed over every process's rows (sum and count)."""
        ...

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the processes, in place (every process passes the same shapes, in order)."""
        ...

    def agree(self, tensor: torch.Tensor) -> torch.Tensor:
        """One process's ``tensor`` for all (a decision made from combined statistics, made bit-identical)."""
        ...

    def share(self, rows: Rows, batch_size: int) -> tuple[Rows, range]:
        """This process's rows of ``rows``, and which batches of ``batch_size`` rows of the whole set they
        are: its rows, batched by ``batch_size``, are exactly those global batches, in order."""
        ...


@dataclass
class LoopState:
    """What the walk carries from one layer to the next, and all that a restart needs to go on
    bit for bit: the index of the next layer, the basis of the stream entering it (D, D float64),
    the spectra and refit strengths chosen so far, the widths as built of the finished layers,
    and the calibration activations the next layer reads.

    ``layer`` and ``embeddings`` are the tensors of the layer just finished and of the sliced
    embedding tables (state-dict names, the tables' under their model path): views of the
    model's own tensors, for a checkpoint to write; a restart hands its finished layers back in
    :class:`Restart` instead.
    """

    next_layer: int
    q_prev: torch.Tensor | None
    spectra: dict[str, list[float]] = field(default_factory=dict)
    refits: dict[str, float] = field(default_factory=dict)
    built: list[LayerWidths] = field(default_factory=list)
    # The next layer's input in its basis; the dense model's stream with corrections on. Not
    # the layers' call arguments or masks: capture computes them again, identically, as they do
    # not depend on the slicing.
    hidden: list[torch.Tensor] | None = None
    reference: list[torch.Tensor] | None = None
    layer: dict[str, torch.Tensor] = field(default_factory=dict)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Restart:
    """What a checkpoint hands back to continue a stopped run (see :func:`slicegpt.core.slicing.slice_model`).

    ``pooled``: uniform mode's (eigenvalues, Q) once its statistics-only walk finished (the walk
    is then skipped). ``state``: where the slicing walk goes on (its ``layer`` and ``embeddings``
    unused), with ``layers[i]`` the tensors of each finished layer and ``embeddings`` those of
    the sliced embedding tables, as :class:`LoopState` handed them out.
    """

    pooled: tuple[torch.Tensor, torch.Tensor] | None = None
    state: LoopState | None = None
    layers: Sequence[dict[str, torch.Tensor]] = field(default_factory=list)  # may read each when indexed
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)


#: The identity entry that differs on another machine or thread count (``report.numerics``): a
#: resume there is told that its bits may differ, not refused.
NUMERICS = "numerics"


class Checkpoint(Protocol):
    def begin(self, identity: dict[str, Any]) -> Restart | None:
        """Called once before the walks with what identifies the run (source model, settings,
        calibration data, widths, and under :data:`NUMERICS` what its last bits depend on);
        returns what to continue from, or None to start afresh."""
        ...

    def pooled(self, evals: torch.Tensor, q: torch.Tensor) -> None:
        """Uniform mode's shared rotation, once its statistics-only walk finished."""
        ...

    def after_layer(self, state: LoopState) -> None: ...


class InMemorySource:
    """The layers of the model already in host memory."""

    streamed = False

    def layer(self, model: nn.Module, spec: ArchSpec, index: int) -> nn.Module:
        return get_layers(model, spec)[index]

    def release(self, model: nn.Module, spec: ArchSpec, index: int, block: nn.Module) -> None:
        block.to("cpu")


class InMemorySink:
    """A finished layer stays in the model, back on the host (or, with ``keep_on_device``, on the
    device it was processed on: a model spread over several devices, ``--device-map``)."""

    keep_on_device = False  # (a class default: subclasses need not call __init__)

    def __init__(self, keep_on_device: bool = False) -> None:
        self.keep_on_device = keep_on_device

    def done(self, model: nn.Module, spec: ArchSpec, index: int, block: nn.Module) -> None:
        if not self.keep_on_device:
            block.to("cpu")


class LocalReduction:
    """One process holds every calibration row: nothing to combine."""

    processes = 1

    def __call__(self, cov: Covariance) -> Covariance:
        return cov

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        return None

    def agree(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def share(self, rows: Rows, batch_size: int) -> tuple[Rows, range]:
        return rows, range(-(-len(rows) // batch_size))


class NoCheckpoint:
    """Nothing is kept: a stopped run starts over."""

    def begin(self, identity: dict[str, Any]) -> Restart | None:
        return None

    def pooled(self, evals: torch.Tensor, q: torch.Tensor) -> None:
        return None

    def after_layer(self, state: LoopState) -> None:
        return None


@dataclass
class Streams:
    """The loop's connections, defaulting to one process working in memory."""

    source: LayerSource = field(default_factory=InMemorySource)
    sink: LayerSink = field(default_factory=InMemorySink)
    reduce: Reduction = field(default_factory=LocalReduction)
    checkpoint: Checkpoint = field(default_factory=NoCheckpoint)
    #: Makes each list of calibration activations: host memory (a list), or files on disk
    #: (:class:`slicegpt.io.offload.DiskTensors`) when they would not fit.
    activations: Callable[[], Any] = list
