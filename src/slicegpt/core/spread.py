"""Spread a budget's MLP neurons over the layers by what each layer loses without them.

A standard checkpoint keeps one ``intermediate_size``: every layer loses the same number of
neurons. A per-layer folder can keep different numbers, and the layers are not alike (SmolLM2's
first layer needs far more than its middle ones). A statistics walk of the dense model over a few
calibration rows (:class:`NeuronCurves`, run by :func:`slicegpt.core.slicing.walk` as uniform
mode's pooling is) gives, per layer, the moments of its MLP intermediate activation h
([tokens, n]) and of the MLP's output t ([tokens, D]), every token weighted by 1 / the mean square
of the layer's output (what the next norm sees of an error is its size relative to the stream;
without the weight a few attention-sink tokens carry almost all of the energy and decide). A
greedy least-squares selection run to every width (:func:`slicegpt.core.neurons.greedy_order`, in
float32: :func:`~slicegpt.core.neurons.selection_dtype`) turns those into each layer's error
against the number of neurons it keeps, and the neurons then go, ``step`` at a time from a
floor, to the layer whose error they lower most (:func:`spread`).

Every layer's neurons cost the same parameters (the residual width is whole), so the count
depends on the total only; the total may exceed the even split's by what rounding every layer
to one shared count left of the budget.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..arch import ArchSpec
from .neurons import greedy_order, selection_dtype
from .pca import Covariance
from .refit import InputRecorder, Moments, product_dtype, stream_weights
from .streams import Reduction
from .surgery import mlp_writers

# Calibration rows the neuron spreading's dense pass reads (the first of the statistics rows):
# SmolLM2 at 25% removed, 8 rows gave 11% less summed error than the same count in every layer.
SPREAD_ROWS = 8


class NeuronCurves:
    """The walk's collector for spreading (as :class:`~slicegpt.core.pca.PooledCovariance` is
    uniform mode's): the model walked at full width in its original basis, its weights left
    alone; each layer's MLP pass is watched (:meth:`observe_mlp`) and gives that layer's error
    curve: the weighted error of its MLP output kept on j = 0..n neurons ([n + 1], float64), in
    :attr:`curves`, one per layer in order."""

    needs_statistics = False  # no covariances: the MLP passes are watched instead
    shared = True  # one basis (the original) everywhere
    collect_only = True

    def __init__(self, hidden: int) -> None:
        self.eye = torch.eye(hidden, dtype=torch.float64)
        self.curves: list[torch.Tensor] = []

    def __call__(self, point: str, cov: Covariance | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        return None, self.eye

    def observe_mlp(self, block: nn.Module, spec: ArchSpec, reduce: Reduction) -> "_MLPWatch":
        return _MLPWatch(block, spec, self.curves, reduce)


class _MLPWatch:
    """One layer's MLP pass, batch by batch, as a context: the weighted moments of the writer's
    input h and of the MLP's output t; a pass that ends without an error sums them over the
    processes and appends the layer's curve (:meth:`done`); its hook goes either way."""

    def __init__(self, block: nn.Module, spec: ArchSpec, curves: list[torch.Tensor], reduce: Reduction) -> None:
        (writer,) = mlp_writers(block, spec)
        self.dtype = selection_dtype(writer.tensor)
        weight = writer.tensor.detach().to(torch.float64)
        self.weight = weight.t() if writer.transposed else weight  # (D, n)
        self.moments, self.energy, self.curves, self.reduce = Moments(), 0.0, curves, reduce
        self.recorder = InputRecorder(writer.module)

    def __enter__(self) -> "_MLPWatch":
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.recorder.remove()
        if kind is None:
            self.done()

    def add(self, t: torch.Tensor, out: torch.Tensor, mask: torch.Tensor | None) -> None:
        """``t`` what the MLP wrote ([B, T, D]), ``out`` the stream it wrote into, ``mask`` padding."""
        D, n = self.weight.shape
        h, t, wt = self.recorder.last.reshape(-1, n), t.reshape(-1, D), stream_weights(out).reshape(-1, 1)
        if mask is not None:  # padding tokens do not count
            keep = mask.reshape(-1).to(h.device).bool()
            h, t, wt = h[keep], t[keep], wt[keep]
        dtype = product_dtype(h)  # float32 products where the model is not float64, summed in float64
        h, t = h.to(dtype) * wt.to(dtype), t.to(dtype) * wt.to(dtype)
        self.moments.add(h, t)
        self.energy += float(t.to(torch.float64).pow(2).sum())

    def done(self) -> None:
        m, (D, n) = self.moments, self.weight.shape
        device = self.weight.device
        if m.xx is None:  # this process's rows were all padding here; the others' count
            m.xx = torch.zeros(n, n, dtype=torch.float64, device=device)
            m.xt = torch.zeros(n, D, dtype=torch.float64, device=device)
        totals = torch.tensor([self.energy, float(m.count)], dtype=torch.float64, device=m.xx.device)
        self.reduce.sum_([m.xx, m.xt, totals])
        m.count = int(totals[1])
        # On the sums, not their means (no second [n, n]): the greedy order is the same and its
        # gains are the means' times the count.
        _, gains = greedy_order(m.xx, self.weight, n, cross=m.xt, dtype=self.dtype)  # on the layer's device
        total = float(totals[0]) / m.count
        errors = total - torch.cumsum(gains.cpu() / m.count, 0)  # the best fit's error on the first 1..n neurons
        self.curves.append(torch.cat([torch.tensor([total], dtype=torch.float64), errors]))


def spread(curves: list[torch.Tensor], total: int, step: int = 8, floor: int | None = None) -> list[int]:
    """Neurons per layer summing to ``total`` (a multiple of ``step``): from ``floor`` each
    (default: a quarter of the average, rounded down to ``step``), ``step`` at a time to the
    layer whose error they lower most.

    The error curves of a greedy selection are convex in practice but not exactly, so this is
    the greedy marginal allocation, not a guaranteed optimum.
    """
    if not curves:
        return []
    widths = [len(c) - 1 for c in curves]
    if total % step or total > sum(w - w % step for w in widths):
        raise ValueError(f"cannot spread {total} neurons in steps of {step} over layers of {widths}")
    if floor is None:
        floor = max(step, (total // len(curves) // 4) // step * step)
    k = [min(floor, w - w % step) for w in widths]
    if sum(k) > total:
        raise ValueError(f"a floor of {floor} neurons per layer is above the {total} to spread")
    while sum(k) < total:
        gain = [float(c[j] - c[j + step]) if j + step <= w else -math.inf for c, j, w in zip(curves, k, widths)]
        best = max(range(len(k)), key=gain.__getitem__)
        k[best] += step
    return k
