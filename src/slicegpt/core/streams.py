"""The loop's connections to the outside, each a small protocol with today's implementation.

* :class:`LayerSource` -- where a layer's weights come from (the model in memory today; shards
  read from disk when models larger than memory are streamed);
* :class:`LayerSink` -- where a finished layer goes (stays in the model today; written to output
  shards and dropped when streaming);
* :class:`Reduction` -- combines covariance sums before each PCA (the identity in one process;
  an all-reduce over ranks when calibration is distributed);
* :class:`Checkpoint` -- called between layers with the state needed to continue (nothing today;
  a staging folder for resume).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ..arch import ArchSpec
from .pca import Covariance
from .surgery import get_layers


class LayerSource(Protocol):
    def layer(self, model: nn.Module, spec: ArchSpec, index: int) -> nn.Module: ...


class LayerSink(Protocol):
    def done(self, model: nn.Module, spec: ArchSpec, index: int, block: nn.Module) -> None: ...


class Reduction(Protocol):
    def __call__(self, cov: Covariance) -> Covariance: ...


@dataclass
class LoopState:
    """What the walk carries from one layer to the next: the index of the next layer and the
    basis of the stream entering it (D, D float64). The calibration activations that go with it
    are in the loop's :class:`~slicegpt.core.capture.LayerInputs`."""

    next_layer: int
    q_prev: torch.Tensor | None
    spectra: dict[str, list[float]] = field(default_factory=dict)


class Checkpoint(Protocol):
    def after_layer(self, state: LoopState) -> None: ...


class InMemorySource:
    """The layers of the model already in host memory."""

    def layer(self, model: nn.Module, spec: ArchSpec, index: int) -> nn.Module:
        return get_layers(model, spec)[index]


class InMemorySink:
    """A finished layer stays in the model, back on the host."""

    def done(self, model: nn.Module, spec: ArchSpec, index: int, block: nn.Module) -> None:
        block.to("cpu")


class LocalReduction:
    """One process holds every calibration row: nothing to combine."""

    def __call__(self, cov: Covariance) -> Covariance:
        return cov


class NoCheckpoint:
    def after_layer(self, state: LoopState) -> None:
        return None


@dataclass
class Streams:
    """The four connections, defaulting to one process working in memory."""

    source: LayerSource = field(default_factory=InMemorySource)
    sink: LayerSink = field(default_factory=InMemorySink)
    reduce: Reduction = field(default_factory=LocalReduction)
    checkpoint: Checkpoint = field(default_factory=NoCheckpoint)
