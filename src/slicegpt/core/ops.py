"""Small pure weight operations: fold, centre, rotate, slice.

Every operation reads a weight as an (out, in) float64 matrix, or a stack (..., out, in) of them
(fused MoE experts), works in float64, and writes back in the weight's own dtype. A
:class:`WeightRef` says where the matrix lives and how it is stored; a plain module stands for
its ``weight`` and ``bias``. ``Q`` arguments are (D, d) float64 matrices whose columns are the
kept principal directions (d <= D); ``None`` means "no rotation", and then only the slicing to
``d`` happens, which is what building an empty skeleton for loading needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Attributes through which modules remember their widths and use them in forward (Linear's
# in/out_features, Conv1D's nx/nf, MoE routers' hidden_dim reshape). Updated when a width changes.
_IN_ATTRS = ("in_features", "nx", "hidden_dim")
_OUT_ATTRS = ("out_features", "nf", "hidden_dim")


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2 style Conv1D stores its weight as (in, out); recognised by name, not import, so
    # that transformers' internal module layout may move without breaking us.
    return type(module).__name__ == "Conv1D"


@dataclass(frozen=True, eq=False)
class WeightRef:
    """A matrix (or a stack of matrices) that reads or writes the residual stream.

    ``module.<name>`` holds it as (..., out, in), or (..., in, out) when ``transposed``;
    ``module.<bias>`` holds its bias (..., out) when ``bias`` is not None.
    """

    module: nn.Module
    name: str = "weight"
    bias: str | None = "bias"
    transposed: bool = False

    @classmethod
    def of(cls, obj: "nn.Module | WeightRef") -> "WeightRef":
        if isinstance(obj, WeightRef):
            return obj
        return cls(obj, "weight", "bias", transposed=_is_conv1d(obj))

    @classmethod
    def parameter(cls, parent: nn.Module, name: str) -> "WeightRef":
        """A bare parameter of ``parent``, as fused experts store theirs.

        transformers' expert modules say ``is_transposed`` when their stacks are (E, in, out),
        and name a stack's bias ``<name>_bias``.
        """
        bias = f"{name}_bias" if isinstance(getattr(parent, f"{name}_bias", None), torch.Tensor) else None
        return cls(parent, name, bias, transposed=bool(getattr(parent, "is_transposed", False)))

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.name)

    @property
    def out_dim(self) -> int:
        return int(self.tensor.shape[-1 if self.transposed else -2])

    @property
    def in_dim(self) -> int:
        return int(self.tensor.shape[-2 if self.transposed else -1])

    def __repr__(self) -> str:
        return f"WeightRef({type(self.module).__name__}.{self.name}, out={self.out_dim}, in={self.in_dim})"


# Rows per float64 block when a big (vocab x D) matrix is transformed: bounds the float64
# temporaries of embeddings and heads (a 262k-token vocabulary is 1.3 GB in float64 at D=640).
_CHUNK_ROWS = 8192


def _map_rows(w: torch.Tensor, fn) -> torch.Tensor:
    """``fn`` applied to float64 blocks of rows of ``w`` (rows, cols); the result in ``w``'s dtype."""
    if w.shape[0] == 0:  # a layer counted at zero neurons: nothing to map, the shape still follows fn
        return fn(w.to(torch.float64)).to(w.dtype)
    out: torch.Tensor | None = None
    for start in range(0, w.shape[0], _CHUNK_ROWS):
        block = fn(w[start : start + _CHUNK_ROWS].to(torch.float64)).to(w.dtype)
        if out is None:
            out = torch.empty((w.shape[0], block.shape[1]), dtype=w.dtype, device=w.device)
        out[start : start + block.shape[0]] = block
    assert out is not None
    return out


def _plain_2d(ref: WeightRef) -> bool:
    # An (out, in) matrix stored as such: its rows can be transformed block by block.
    return not ref.transposed and ref.tensor.dim() == 2


def get_matrix(ref: nn.Module | WeightRef) -> torch.Tensor:
    """The weight as (..., out, in), float64."""
    ref = WeightRef.of(ref)
    w = ref.tensor.detach()
    if ref.transposed:
        w = w.transpose(-1, -2)
    return w.to(torch.float64)


def set_matrix(ref: nn.Module | WeightRef, w: torch.Tensor) -> None:
    """Write a (..., out, in) matrix back, updating the module's record of its widths."""
    ref = WeightRef.of(ref)
    old = ref.tensor
    old_out, old_in = ref.out_dim, ref.in_dim
    stored = w.transpose(-1, -2) if ref.transposed else w
    setattr(ref.module, ref.name, nn.Parameter(stored.contiguous().to(old.dtype), requires_grad=False))
    new_out, new_in = int(w.shape[-2]), int(w.shape[-1])
    for attrs, before, after in ((_IN_ATTRS, old_in, new_in), (_OUT_ATTRS, old_out, new_out)):
        if before == after:
            continue
        for attr in attrs:
            if getattr(ref.module, attr, None) == before:
                setattr(ref.module, attr, after)


def get_bias(ref: nn.Module | WeightRef) -> torch.Tensor | None:
    ref = WeightRef.of(ref)
    b = None if ref.bias is None else getattr(ref.module, ref.bias, None)
    return None if b is None else b.detach().to(torch.float64)


def set_bias(ref: nn.Module | WeightRef, b: torch.Tensor | None, dtype: torch.dtype) -> None:
    if b is None:
        return
    ref = WeightRef.of(ref)
    # A module without a bias slot would silently ignore one added here: refuse instead.
    if ref.bias is None or not hasattr(ref.module, ref.bias):
        raise ValueError(f"{ref} has no bias to receive a folded norm bias")
    setattr(ref.module, ref.bias, nn.Parameter(b.contiguous().to(dtype), requires_grad=False))


def fold_norm_into(readers: list, scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
    """Fold a norm's affine ``y = n * scale + shift`` into the linears that read ``y``.

    W x(scale*n + shift) + b  =  (W diag(scale)) n + (W shift + b)
    """
    for ref in map(WeightRef.of, readers):
        if shift is None and scale is not None and _plain_2d(ref):
            s64 = scale.to(torch.float64)
            set_matrix(ref, _map_rows(ref.tensor.detach(), lambda blk: blk * s64))
            continue
        w = get_matrix(ref)  # (..., out, D)
        dtype = ref.tensor.dtype
        b = get_bias(ref)
        if shift is not None:
            extra = w @ shift.to(torch.float64)
            b = extra if b is None else b + extra
        if scale is not None:
            w = w * scale.to(torch.float64)
        set_matrix(ref, w)
        set_bias(ref, b, dtype)


def centre_outputs(writers: list) -> None:
    """Subtract the mean over the output (hidden) axis from weights and biases.

    With every write to the residual stream centred, the stream itself has zero mean, and a
    LayerNorm reading it equals an RMSNorm.
    """
    for ref in map(WeightRef.of, writers):
        dtype = ref.tensor.dtype
        w = get_matrix(ref)  # (..., D, in)
        set_matrix(ref, w - w.mean(dim=-2, keepdim=True))
        b = get_bias(ref)
        if b is not None:
            set_bias(ref, b - b.mean(dim=-1, keepdim=True), dtype)


def centre_embedding(emb: nn.Module) -> None:
    """Centre each embedding row along the hidden axis (rows are (vocab or position, D))."""
    w = emb.weight.detach().to(torch.float64)
    emb.weight = nn.Parameter((w - w.mean(dim=-1, keepdim=True)).to(emb.weight.dtype), requires_grad=False)


def rotate_inputs(readers: list, q: torch.Tensor | None, d: int) -> None:
    """Readers now see the stream in the rotated basis ``x_rot = x @ Q``, of width ``d``.

    W x = W Q Q^T x  ->  W' = W Q[:, :d]  (..., out, d)
    """
    q = _turning(q, d)
    for ref in map(WeightRef.of, readers):
        if _plain_2d(ref):
            qd = None if q is None else q[:, :d].to(ref.tensor.device)
            set_matrix(ref, _map_rows(ref.tensor.detach(), lambda blk: blk[:, :d] if qd is None else blk @ qd))
            continue
        w = get_matrix(ref)
        w = w[..., :d] if q is None else w @ q[:, :d].to(w.device)
        set_matrix(ref, w)


def rotate_outputs(writers: list, q: torch.Tensor | None, d: int) -> None:
    """Writers now emit into the rotated basis: W' = Q[:, :d]^T W, b' = Q[:, :d]^T b."""
    q = _turning(q, d)
    for ref in map(WeightRef.of, writers):
        dtype = ref.tensor.dtype
        w = get_matrix(ref)
        b = get_bias(ref)
        if q is None:
            w = w[..., :d, :]
            b = None if b is None else b[..., :d]
        else:
            qd = q[:, :d].to(w.device)
            w = qd.t() @ w
            b = None if b is None else b @ qd
        set_matrix(ref, w)
        set_bias(ref, b, dtype)


def rotate_embedding(emb: nn.Module, q: torch.Tensor | None, d: int) -> None:
    """Embedding rows (n, D) -> (n, d): E' = E Q[:, :d]."""
    q = _turning(q, d)
    qd = None if q is None else q[:, :d].to(emb.weight.device)
    w = _map_rows(emb.weight.detach(), lambda blk: blk[:, :d] if qd is None else blk @ qd)
    emb.weight = nn.Parameter(w, requires_grad=False)
    if hasattr(emb, "embedding_dim"):
        emb.embedding_dim = d


def shortcut_matrix(q_in: torch.Tensor, d_in: int, q_out: torch.Tensor, d_out: int) -> torch.Tensor:
    """The residual path's change of basis Q_in[:, :d_in]^T Q_out[:, :d_out], (d_in, d_out), float64."""
    return q_in[:, :d_in].t() @ q_out[:, :d_out].to(q_in.device)


def _turning(q: torch.Tensor | None, d: int) -> torch.Tensor | None:
    """``q``, or None where ``q[:, :d]`` is the identity: a kept basis (only MLP neurons go) turns
    no weight, and multiplying every matrix by it in float64 costs 2 x d flops per element (a
    third of SliceGPT's time on a 7B-shaped layer) for the same numbers."""
    return None if q is None or is_identity(q, d) else q


def is_identity(q: torch.Tensor, d: int) -> bool:
    """Is ``q[:, :d]`` the identity (a square basis that was kept: mapping by it changes nothing)?"""
    if q.shape[0] != d or q.shape[-1] < d:
        return False
    qd = q[:, :d]
    # ones on the diagonal and nothing else, without building a (d, d) identity beside it
    return bool((qd.diagonal() == 1).all()) and int(torch.count_nonzero(qd)) == d
