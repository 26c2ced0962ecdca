"""Small pure weight operations: fold, centre, rotate, slice.

Every operation reads a linear layer's weight as an (out, in) float64 matrix, works in float64,
and writes back in the layer's own dtype. ``Q`` arguments are (D, d) float64 matrices whose
columns are the kept principal directions (d <= D); ``None`` means "no rotation", and then only
the slicing to ``d`` happens, which is what building an empty skeleton for loading needs.
"""

from __future__ import annotations

import torch
from torch import nn


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2 style Conv1D stores its weight as (in, out); recognised by name, not import, so
    # that transformers' internal module layout may move without breaking us.
    return type(module).__name__ == "Conv1D"


def get_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), float64."""
    w = module.weight.detach()
    if _is_conv1d(module):
        w = w.t()
    return w.to(torch.float64)


def set_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Write an (out, in) matrix back, updating the layer's shape attributes."""
    dtype = module.weight.dtype
    if _is_conv1d(module):
        module.weight = nn.Parameter(w.t().contiguous().to(dtype), requires_grad=False)
        module.nf = w.shape[0]
        return
    module.weight = nn.Parameter(w.contiguous().to(dtype), requires_grad=False)
    if hasattr(module, "in_features"):
        module.out_features, module.in_features = w.shape


def get_bias(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach().to(torch.float64)


def set_bias(module: nn.Module, b: torch.Tensor | None, dtype: torch.dtype) -> None:
    if b is None:
        return
    module.bias = nn.Parameter(b.contiguous().to(dtype), requires_grad=False)


def fold_norm_into(readers: list[nn.Module], scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
    """Fold a norm's affine ``y = n * scale + shift`` into the linears that read ``y``.

    W x(scale*n + shift) + b  =  (W diag(scale)) n + (W shift + b)
    """
    for lin in readers:
        w = get_matrix(lin)  # (out, D)
        dtype = lin.weight.dtype
        b = get_bias(lin)
        if shift is not None:
            extra = w @ shift.to(torch.float64)
            b = extra if b is None else b + extra
        if scale is not None:
            w = w * scale.to(torch.float64)[None, :]
        set_matrix(lin, w)
        set_bias(lin, b, dtype)


def centre_outputs(writers: list[nn.Module]) -> None:
    """Subtract the mean over the output (hidden) axis from weights and biases.

    With every write to the residual stream centred, the stream itself has zero mean, and a
    LayerNorm reading it equals an RMSNorm.
    """
    for lin in writers:
        w = get_matrix(lin)  # (D, in)
        set_matrix(lin, w - w.mean(dim=0, keepdim=True))
        b = get_bias(lin)
        if b is not None:
            set_bias(lin, b - b.mean(), lin.weight.dtype)


def centre_embedding(emb: nn.Module) -> None:
    """Centre each embedding row along the hidden axis (rows are (vocab or position, D))."""
    w = emb.weight.detach().to(torch.float64)
    emb.weight = nn.Parameter((w - w.mean(dim=-1, keepdim=True)).to(emb.weight.dtype), requires_grad=False)


def rotate_inputs(readers: list[nn.Module], q: torch.Tensor | None, d: int) -> None:
    """Readers now see the stream in the rotated basis ``x_rot = x @ Q``, of width ``d``.

    W x = W Q Q^T x  ->  W' = W Q[:, :d]  (out, d)
    """
    for lin in readers:
        w = get_matrix(lin)
        w = w[:, :d] if q is None else w @ q[:, :d].to(w.device)
        set_matrix(lin, w)


def rotate_outputs(writers: list[nn.Module], q: torch.Tensor | None, d: int) -> None:
    """Writers now emit into the rotated basis: W' = Q[:, :d]^T W, b' = Q[:, :d]^T b."""
    for lin in writers:
        dtype = lin.weight.dtype
        w = get_matrix(lin)
        b = get_bias(lin)
        if q is None:
            w = w[:d]
            b = None if b is None else b[:d]
        else:
            qd = q[:, :d].to(w.device)
            w = qd.t() @ w
            b = None if b is None else qd.t() @ b
        set_matrix(lin, w)
        set_bias(lin, b, dtype)


def rotate_embedding(emb: nn.Module, q: torch.Tensor | None, d: int) -> None:
    """Embedding rows (n, D) -> (n, d): E' = E Q[:, :d]."""
    w = emb.weight.detach().to(torch.float64)
    w = w[:, :d] if q is None else w @ q[:, :d].to(w.device)
    emb.weight = nn.Parameter(w.contiguous().to(emb.weight.dtype), requires_grad=False)
    if hasattr(emb, "embedding_dim"):
        emb.embedding_dim = d


def shortcut_matrix(q_in: torch.Tensor, d_in: int, q_out: torch.Tensor, d_out: int) -> torch.Tensor:
    """The residual path's change of basis Q_in[:, :d_in]^T Q_out[:, :d_out], (d_in, d_out), float64."""
    return q_in[:, :d_in].t() @ q_out[:, :d_out].to(q_in.device)
