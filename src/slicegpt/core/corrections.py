"""The passes that prune MLP neurons and refit a block's writers (closed-form corrections).

Each runs the block over the calibration rows once more, gathering the moments that
:mod:`slicegpt.core.refit` solves: what a writer reads, and what it should write (the dense
model's stream, carried beside the compressed one, or the writer's own unpruned output).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..arch import ArchSpec, UnsupportedModelError
from . import neurons, ops
from . import refit as moments_
from .capture import LayerInputs, stream
from .modules import SlicedBlock, first_output
from .ops import WeightRef
from .streams import LocalReduction, Reduction
from .surgery import weight_refs

_LOCAL = LocalReduction()


def held_out(batches: int) -> int:
    """The calibration batch whose rows choose ridge strengths (the last; none with one batch).

    ``batches`` counts the batches of the whole calibration set: when processes share the rows,
    the held-out rows are the same global rows as in one process, on whichever process holds them.
    """
    return batches - 1 if batches > 1 else -1


def combine(moments: moments_.FitMoments, reduce: Reduction) -> None:
    """Sum the fit and held-out moments over the processes, in place.

    A process may hold no held-out rows, or only them: its missing sums count as zeros of the
    shapes the other set has (every process holds at least one batch, so one set is there).
    """
    if reduce.processes == 1:
        return
    fit, held = moments.fit, moments.held
    like = fit if fit.xx is not None else held
    for m in (fit, held):  # zeros in each set's own sum dtype: every process reduces the same dtypes
        if m.xx is None:
            m.xx = torch.zeros_like(like.xx, dtype=m.dtype)
        if m.xt is None and like.xt is not None:
            m.xt = torch.zeros_like(like.xt, dtype=m.dtype)
    counts = torch.tensor([fit.count, held.count], dtype=torch.float64, device=like.xx.device)  # exact below 2^53
    reduce.sum_([t for t in (fit.xx, fit.xt, held.xx, held.xt, counts) if t is not None])
    fit.count, held.count = int(counts[0]), int(counts[1])


class WriterInputs:
    """What a branch's writer read in each batch of a refit pass, kept (host) so that the pass after
    the refit computes the branch's new output as ``writer(input)`` instead of running the whole
    branch again (attention or the MLP up to its writer: most of a layer's compute).

    Kept only where the branch's output is its writer applied to that input (checked on a few
    tokens of the first batch, to rounding: a branch that does anything after its writer, a
    post-norm or a scale, fails it); ``inputs`` is None otherwise, and the branch runs again.
    """

    def __init__(self, module: nn.Module, store: list) -> None:
        self.module, self.inputs = module, store
        self.checked = False

    @property
    def writer_last(self) -> bool:
        """Has the check passed (the branch's output is its writer's on what it read)?"""
        return self.checked and self.inputs is not None

    def add(self, x: torch.Tensor, out: torch.Tensor | None) -> None:
        """Keep ``x``, what the writer read; ``out``, the branch's output, is read by the check
        alone (the first call), and may be None after it."""
        if self.inputs is None:
            return
        if not self.checked:
            if out is None:
                raise ValueError("the first batch's branch output is needed for the writer check")
            self.checked = True
            probe = x.reshape(-1, x.shape[-1])[:16]
            want = out.reshape(-1, out.shape[-1])[:16]
            got = first_output(self.module(probe))
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())):
                self.inputs = None
                return
        self.inputs.append(x.cpu())

    def output(self, batch: int, device: torch.device, neurons: torch.Tensor | None = None) -> torch.Tensor:
        """The writer's output on batch ``batch``'s recorded input (of the ``neurons`` kept, where given)."""
        x = self.inputs[batch].to(device)
        return first_output(self.module(x if neurons is None else x.index_select(-1, neurons.to(device))))


def _to_writer(
    branch: Callable[[], torch.Tensor], rec: moments_.InputRecorder, read: WriterInputs, whole: bool = False
) -> torch.Tensor | None:
    """Run a refit pass's branch on one batch; the writer's input is then ``rec.last``.

    Once the first batch has shown that the branch's output is its writer's (``read``'s check),
    the branch stops at the writer and None is returned: the writer's product on every input
    (for the MLP, all neurons: a third of its arithmetic) was read by that check alone, and the
    pass after the refit computes the refit writer's. ``whole``: run it to the end regardless.
    """
    rec.stop = read.writer_last and not whole
    try:
        return branch()
    except moments_.WriterReached:
        return None


def dense_layer(block: SlicedBlock, index: int, inputs: LayerInputs, device: torch.device) -> tuple[list, list]:
    """The dense model's stream after attention and after the MLP, per batch (host, original basis).

    Run before this block's weights change: the prepared block computes the dense layer exactly.
    """
    mids, outs = inputs.new(), inputs.new()
    for i, x in stream(inputs.reference, device):
        args, kwargs = inputs.layer_call(index, i, device)
        r = x + block.attn_branch(x, args, kwargs)
        mids.append(r.cpu())
        outs.append((r + block.mlp_branch(r)).cpu())
    return mids, outs


def writer(refs: list, what: str) -> Any:
    if len(refs) != 1 or refs[0].tensor.dim() != 2:
        raise UnsupportedModelError(
            f"closed-form corrections need one plain {what} matrix per layer; use correct=False"
        )
    return refs[0]


def refit_attention(
    block: SlicedBlock,
    spec: ArchSpec,
    index: int,
    inputs: LayerInputs,
    to_input: Callable[[torch.Tensor], torch.Tensor],
    targets: list,
    device: torch.device,
    record: dict[str, float],
    *,
    reduce: Reduction = _LOCAL,
) -> WriterInputs:
    """Refit attention's output projection so that the compressed stream after attention lands on the
    dense model's: min E||r_dense - x - attn(x)||^2 over the projection, ridge chosen on held-out
    rows. Each branch so also cancels what the layers before it got wrong (matching the dense
    branch's own output instead shrinks every layer's output, the fit being made on perturbed
    inputs, and that compounds: 6.3x dense perplexity against 2.4x on SmolLM2). Returns what the
    projection read (:class:`WriterInputs`)."""
    if spec.post_norms is not None:
        raise UnsupportedModelError(f"{spec.name}: corrections through post-norms are not supported; use correct=False")
    ref = writer(weight_refs(block, spec.attn_outputs), "attention output")
    bias = ops.get_bias(ref)
    held = inputs.held
    moments, rec = moments_.FitMoments.for_weight(ref.tensor), moments_.InputRecorder(ref.module)
    read = WriterInputs(ref.module, inputs.new())
    try:
        for i, x in stream(inputs.hidden, device):
            args, kwargs = inputs.layer_call(index, i, device)
            xb = to_input(x)
            out = _to_writer(lambda: block.attn_branch(xb, args, kwargs), rec, read)
            t = targets[i].to(device, torch.float64) - xb.to(torch.float64)
            moments.add(rec.last, t if bias is None else t - bias, i == held)
            read.add(rec.last, out)  # last: its check runs the writer, which the recorder sees
    finally:
        rec.remove()
    combine(moments, reduce)
    # the strengths tried in the moments' product precision (float32 for a float32 model)
    w, rel = moments_.refit(moments, ops.get_matrix(ref), dtype=moments_.product_dtype(ref.tensor))
    ops.set_matrix(ref, reduce.agree(w))
    record[f"layer.{index}.attn"] = rel
    return read


def refit_mlp(
    block: SlicedBlock,
    spec: ArchSpec,
    inputs: LayerInputs,
    to_input: Callable[[torch.Tensor], torch.Tensor],
    targets: list | None,
    keep: int | None,
    device: torch.device,
    record: dict[str, float],
    point: str,
    weighting: str,
    *,
    reduce: Reduction = _LOCAL,
) -> tuple[WriterInputs, torch.Tensor | None]:
    """Keep ``keep`` MLP neurons (all with None) and refit the MLP's writer on them; returns what
    the writer read (:class:`WriterInputs`, all neurons) and the neurons kept.

    The target is the dense model's stream after the MLP less the compressed stream before it
    (``targets``: the stream lands back on the dense one), or the MLP's own unpruned output on the
    compressed stream; neurons are chosen greedily for that least-squares problem (:mod:`slicegpt.core.neurons`).
    """
    ref = writer(neurons.mlp_neuron_refs(block, spec)[1], "MLP output")
    w0 = ops.get_matrix(ref)  # (D, n)
    bias = ops.get_bias(ref)
    held = inputs.held
    moments, rec = moments_.FitMoments.for_weight(ref.tensor), moments_.InputRecorder(ref.module)
    read = WriterInputs(ref.module, inputs.new())
    try:
        for i, h in stream(inputs.hidden, device):
            y = to_input(h)
            # Token weighting reads the branch's output: the branch runs whole.
            m = _to_writer(lambda: block.mlp_branch(y), rec, read, whole=weighting == "norm")
            seen = rec.last  # what the writer read: [B, T, n]
            t = None
            if targets is not None:
                t = targets[i].to(device, torch.float64) - y.to(torch.float64)
                t = t if bias is None else t - bias
            x = seen
            if weighting == "norm":
                assert m is not None  # never stopped early
                wt = moments_.stream_weights(y + m)  # by the stream the MLP writes into
                x = x * wt.to(x.dtype)
                t = None if t is None else t * wt
            moments.add(x, t, i == held)
            read.add(seen, m)  # last: its check runs the writer, which the recorder sees
    finally:
        rec.remove()
    combine(moments, reduce)
    index, w, rel = keep_and_refit(moments, w0, keep, reduce.agree, neurons.selection_dtype(ref.tensor))
    neurons.keep_neurons(block, spec, index, [reduce.agree(w)])
    record[point] = rel
    return read, None if keep is None else index


def keep_and_refit(
    moments: moments_.FitMoments,
    w0: torch.Tensor,
    keep: int | None,
    agree: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(kept neurons [k], the writer refit on them (D, k), its ridge strength) from a writer's
    reduced moments; ``w0`` (D, n) is the writer as it is, ``keep`` None keeps every neuron.

    Moments without a target (``xt`` None) aim at the writer's own unpruned output:
    E[h^T t] = E[h^T h] W^T. ``agree`` makes the neuron choice every process's (before the
    moments are cut to it). ``dtype``: the selection's precision
    (:func:`~slicegpt.core.neurons.selection_dtype` of the writer's own weight; ``w0`` is a float64
    copy), and the refit's (:func:`~slicegpt.core.refit.refit`: the strengths tried and the final
    solve; the writer comes back in it).
    """
    for m in (moments.fit, moments.held):
        if m.count and m.xt is None:
            m.xt = moments_.rows_times(m.xx, w0.t(), w0.dtype)
    index = torch.arange(w0.shape[1], device=w0.device)
    if keep is not None:
        fit, held = moments.fit, moments.held
        both = bool(fit.count and held.count)
        if both:
            # Every row's sums, in place of the fit rows' (the greedy choice is the same on sums as
            # on means): beside the held-out sums, no third [n, n] matrix while choosing.
            moments_.add_into(fit.xx, held.xx)
            moments_.add_into(fit.xt, held.xt)
        every = fit if fit.count else held
        index = agree(neurons.greedy_neurons(every.xx, w0, keep, cross=every.xt, dtype=dtype))
        # Cut to the kept neurons one sum at a time, the smaller first: each whole sum goes before
        # the next cut copy is made.
        if held.count:
            held.xx, held.xt = held.xx[index[:, None], index], held.xt[index]
        if fit.count:
            fit.xx, fit.xt = fit.xx[index[:, None], index], fit.xt[index]
        if both:  # the fit rows' sums again, on the kept neurons
            moments_.add_into(fit.xx, held.xx, alpha=-1.0)
            moments_.add_into(fit.xt, held.xt, alpha=-1.0)
    if moments.fit.count == 0:  # every row was held out (an expert reached only there): fit on them
        moments.fit, moments.held = moments.held.to_float64(), moments_.Moments()
    w, rel = moments_.refit(moments, w0[:, index], dtype=dtype)
    return index, w, rel


def prune_experts(
    block: SlicedBlock,
    spec: ArchSpec,
    inputs: LayerInputs,
    to_input: Callable[[torch.Tensor], torch.Tensor],
    keep: int,
    device: torch.device,
    record: dict[str, float],
    point: str,
    *,
    reduce: Reduction = _LOCAL,
) -> None:
    """Keep ``keep`` neurons in every routed expert and refit each expert's down projection.

    The target is each expert's own unpruned output on the compressed stream, weighted by its
    routing weights (the dense stream is the sum over experts, which no single expert's refit
    can aim at); neurons and ridge strength are chosen as for a dense MLP, expert by expert.
    An expert no calibration token reached keeps the neurons with the largest weights, unrefit.
    """
    experts = neurons.experts_of(block, spec)
    assert experts is not None
    down = WeightRef.parameter(experts, "down_proj")
    n = down.in_dim
    stats = neurons.ExpertStats(experts)
    try:
        for i, h in stream(inputs.hidden, device):
            stats.held = i == inputs.held
            block.mlp_branch(to_input(h))
    finally:
        stats.remove()
    indices, downs, chosen = [], [], []
    for e in range(stats.num):
        moments = moments_.FitMoments(stats.fit[e], stats.held_out[e])
        for m in (moments.fit, moments.held):
            if m.xx is None:  # no token here; other processes may have some
                m.xx = torch.zeros(n, n, dtype=torch.float64, device=down.tensor.device)
        combine(moments, reduce)
        w0 = neurons.expert_matrix(down, e)  # (H, n)
        if moments.fit.count + moments.held.count == 0:
            index = neurons.fallback_neurons(experts, e, keep).to(w0.device)
            indices.append(index)
            downs.append(w0[:, index])
            continue
        # agreed below, all experts at once
        index, w, rel = keep_and_refit(moments, w0, keep, dtype=neurons.selection_dtype(down.tensor))
        indices.append(index)
        downs.append(w)
        chosen.append(rel)
    index = reduce.agree(torch.stack(indices))
    neurons.keep_expert_neurons(experts, index, reduce.agree(torch.stack(downs)))
    if chosen:
        record[point] = float(torch.tensor(chosen).median())
