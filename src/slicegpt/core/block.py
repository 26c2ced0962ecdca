"""The one per-layer walk: rotate and slice one block (and the embeddings and the head) to given bases.

Every path that changes a prepared model's widths goes through :func:`slice_block`: the
calibrated loop (bases from PCA), a fixed rotation (uniform mode's shared Q, a random Q in tests)
and the rebuild of an empty skeleton on load (no bases: slicing only). Statistics are collected
with the block still in the original basis, so the block's weights are changed exactly once.

A basis is a (D, D) float64 matrix whose columns are directions by significance; the first
``d`` columns are kept. ``None`` means "no rotation": only the slicing to ``d`` happens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..arch import ArchSpec
from . import neurons, ops
from .modules import SlicedBlock
from .surgery import attn_readers, attn_writers, get_path, mlp_readers, mlp_writers
from .widths import LayerWidths


@dataclass(frozen=True)
class BlockBases:
    """The bases of the residual stream around one block: entering, between the branches, leaving.

    ``mid`` is unused by parallel blocks (attention and MLP read the same stream). All ``None``
    slices without rotating (an empty skeleton being cut to recorded widths).
    """

    q_in: torch.Tensor | None
    q_mid: torch.Tensor | None
    q_out: torch.Tensor | None


def _shortcut(
    q_from: torch.Tensor | None,
    d_from: int,
    q_to: torch.Tensor | None,
    d_to: int,
    wanted: bool,
    shared: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """The residual path's change of basis Q_from[:, :d_from]^T Q_to[:, :d_to], (d_from, d_to) float64.

    None (the identity) where one shared basis keeps its width. Without bases (a skeleton) an
    uninitialised matrix of the right shape stands in, when the recorded widths say there is one.
    """
    if q_from is None or q_to is None:
        return torch.empty(d_from, d_to, dtype=torch.float64, device=device) if wanted else None
    if shared and d_from == d_to and torch.equal(q_from, q_to):
        return None
    return ops.shortcut_matrix(q_from, d_from, q_to, d_to)


def slice_block(
    block: SlicedBlock, spec: ArchSpec, bases: BlockBases, w: LayerWidths, *, shared: bool = False
) -> LayerWidths:
    """Rotate and slice ``block`` in place: inputs into ``bases.q_in`` at ``w.d_in``, and so on.

    Sequential::   attention  reads (q_in, d_in),  writes (q_mid, d_mid);  shortcut d_in -> d_mid
                   MLP        reads (q_mid, d_mid), writes (q_out, d_out);  shortcut d_mid -> d_out
    Parallel::     both read (q_in, d_in) and write (q_out, d_out);         one shortcut d_in -> d_out
    MLP neurons::  ``w.mlp`` kept (an empty skeleton keeps its first ``w.mlp``)

    ``shared``: every point uses one basis, so a residual path that keeps its width needs no
    matrix. Returns ``w`` with the shortcut flags saying which matrices were installed (what a
    saved folder records, so that loading builds the same ones).
    """
    dtype = next(p for p in block.parameters() if p.is_floating_point()).dtype
    device = next(block.parameters()).device
    if w.mlp is not None:  # calibrated runs pruned already (neurons chosen by statistics); skeletons cut here
        neurons.cut_neurons(block, spec, w.mlp)
    sequential = spec.topology == "sequential"
    ops.rotate_inputs(attn_readers(block, spec), bases.q_in, w.d_in)
    if sequential:
        ops.rotate_outputs(attn_writers(block, spec), bases.q_mid, w.d_mid)
        ops.rotate_inputs(mlp_readers(block, spec), bases.q_mid, w.d_mid)
        ops.rotate_outputs(mlp_writers(block, spec), bases.q_out, w.d_out)
        attn = _shortcut(bases.q_in, w.d_in, bases.q_mid, w.d_mid, w.attn_shortcut, shared, device)
        mlp = _shortcut(bases.q_mid, w.d_mid, bases.q_out, w.d_out, w.mlp_shortcut, shared, device)
    else:
        ops.rotate_outputs(attn_writers(block, spec), bases.q_out, w.d_out)
        attn = _shortcut(bases.q_in, w.d_in, bases.q_out, w.d_out, w.attn_shortcut, shared, device)
        mlp = None
    block.set_shortcut("attn_shortcut", attn, dtype)
    block.set_shortcut("mlp_shortcut", mlp, dtype)
    return replace(w, attn_shortcut=attn is not None, mlp_shortcut=mlp is not None)


def slice_embeddings(model: nn.Module, spec: ArchSpec, q: torch.Tensor | None, d: int) -> None:
    """Every embedding table writes into basis ``q`` at width ``d``: E' = E Q[:, :d]."""
    for path in spec.embeddings:
        ops.rotate_embedding(get_path(model, path), None if q is None else q.cpu(), d)


def slice_head(model: nn.Module, spec: ArchSpec, q: torch.Tensor | None, d: int) -> None:
    """The head reads the last layer's output basis ``q`` at width ``d``."""
    ops.rotate_inputs([get_path(model, spec.head)], None if q is None else q.cpu(), d)
