"""Spread a budget's MLP neurons over the layers by what each layer loses without them.

A standard checkpoint keeps one ``intermediate_size``: every layer loses the same number of
neurons. A per-layer folder can keep different numbers, and the layers are not alike (SmolLM2's
first layer needs far more than its middle ones). One pass of the dense model over a few
calibration rows gives, per layer, the moments of its MLP intermediate activation h ([tokens, n])
and of the MLP's output t ([tokens, D]), every token weighted by 1 / the mean square of the
layer's output (what the next norm sees of an error is its size relative to the stream; without
the weight a few attention-sink tokens carry almost all of the energy and decide). A greedy
least-squares selection run to every width (:func:`slicegpt.core.neurons.greedy_order`) turns
those into each layer's error against the number of neurons it keeps, and the neurons then go,
``step`` at a time from a floor, to the layer whose error they lower most.

Every layer's neurons cost the same parameters (the residual width is whole), so the count
depends on the total only; the total may exceed the even split's by what rounding every layer
to one shared count left of the budget.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import ArchSpec
from ..data import Rows
from .capture import capture_layer_inputs, stream
from .neurons import greedy_order
from .refit import InputRecorder, Moments, stream_weights
from .streams import InMemorySource, LayerSource
from .surgery import get_layers, mlp_writers


@torch.no_grad()
def error_curves(
    model: nn.Module,
    spec: ArchSpec,
    rows: Rows,
    device: str | torch.device | Sequence[torch.device] = "cpu",
    source: LayerSource | None = None,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Per layer: the weighted error of its MLP output kept on j = 0..n neurons ([n + 1], float64).

    ``model`` is prepared (:func:`~slicegpt.core.surgery.prepare`: norms folded, blocks
    rewired; in its original basis it computes what the dense model does). One layer at a time
    comes from ``source`` (default: the model's own layers), runs on ``device`` over the stored
    activations of ``rows`` (kept on the host) and is released, as the slicing walk does.
    ``device``: one, or one per layer (a model spread over several). ``progress``: a bar per layer
    (minutes on a 0.5B model: the greedy selection runs to every width).
    """
    count = len(get_layers(model, spec))
    devices = (
        [torch.device(device)] * count if isinstance(device, (str, torch.device)) else [torch.device(d) for d in device]
    )
    source = source or InMemorySource()
    inputs = capture_layer_inputs(model, spec, rows, 1, devices[0])
    D = inputs.hidden[0].shape[-1]
    curves = []
    for index in tqdm(range(count), desc="spreading MLP neurons", unit="layer", disable=not progress):
        device = devices[index]
        block = source.layer(model, spec, index).to(device)
        (writer,) = mlp_writers(block, spec)
        weight = writer.tensor.to(torch.float64)
        weight = weight.t() if writer.transposed else weight  # (D, n)
        moments, energy = Moments(), 0.0  # of the weighted intermediate h [tokens, n] and MLP output t [tokens, D]
        recorder = InputRecorder(writer.module)
        try:
            for i, x in stream(inputs.hidden, device):
                args, kwargs = inputs.layer_call(index, i, device)
                r = x + block.attn_branch(x, args, kwargs)
                t = block.mlp_branch(r)  # no post-norm in these families: what the writer writes
                out = r + t
                h, t, wt = (
                    recorder.last.reshape(-1, weight.shape[1]),
                    t.reshape(-1, D),
                    stream_weights(out).reshape(-1, 1),
                )
                mask = inputs.masks[i]
                if mask is not None:  # padding tokens do not count
                    keep = mask.reshape(-1).to(device).bool()
                    h, t, wt = h[keep], t[keep], wt[keep]
                h, t = h.to(torch.float64) * wt, t.to(torch.float64) * wt
                moments.add(h, t)
                energy += float(t.pow(2).sum())
                inputs.hidden[i] = out.cpu()
        finally:
            recorder.remove()
        source.release(model, spec, index, block)
        cov, cross = moments.mean()
        _, gains = greedy_order(cov, weight, weight.shape[1], cross=cross)  # on the layer's device
        total = energy / moments.count
        curves.append(torch.cat([torch.tensor([total], dtype=torch.float64), total - torch.cumsum(gains.cpu(), 0)]))
    return curves


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


def spread_neurons(
    model: nn.Module,
    spec: ArchSpec,
    rows: Rows,
    kept: list[int],
    total: int,
    step: int,
    device: str | torch.device | Sequence[torch.device] = "cpu",
    source: LayerSource | None = None,
    progress: bool = False,
) -> tuple[list[int], dict[str, Any]]:
    """``total`` neurons over the layers, and a record of what was done (``kept``: the even split
    it is compared with)."""
    start = time.perf_counter()
    curves = error_curves(model, spec, rows, device, source, progress=progress)
    counts = spread(curves, total, step)
    record = {
        "rows": len(rows),
        "step": step,
        "total": total,
        "even_total": sum(kept),
        "seconds": time.perf_counter() - start,
        "weighted_error_even": float(sum(c[j] for c, j in zip(curves, kept))),
        "weighted_error_spread": float(sum(c[j] for c, j in zip(curves, counts))),
    }
    return counts, record
