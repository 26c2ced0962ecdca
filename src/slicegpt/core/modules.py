"""The modules a sliced model is made of.

A :class:`SlicedBlock` replaces a Hugging Face decoder layer. It owns the layer's *own*
attention and MLP modules (unchanged classes, with smaller linear layers) and only rewires the
residual path: weightless norms in front, and an optional shortcut matrix that carries the
residual stream from one layer's basis into the next. There is no copy of any transformers
forward here: attention receives exactly the arguments the model handed its decoder layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class WeightlessRMSNorm(nn.Module):
    """RMSNorm with no scale, dividing by the *original* width.

    After slicing, the stream has ``d`` of its ``D`` coordinates; the kept coordinates carry
    nearly all of its energy, so ``sum(x_kept^2) / D`` estimates the original mean square.
    Dividing by ``d`` instead would rescale every token by about sqrt(D/d).
    """

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.width = int(width)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32 at least, as the HF norms do, then cast back.
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        ms = xf.pow(2).sum(dim=-1, keepdim=True) / self.width
        return (xf * torch.rsqrt(ms + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"width={self.width}, eps={self.eps}"


def first_output(out: Any) -> torch.Tensor:
    # Attention modules return (output, weights); MoE MLPs may return (output, router_logits).
    return out[0] if isinstance(out, (tuple, list)) else out


class SlicedBlock(nn.Module):
    """A decoder layer rewired for a rotated, sliced residual stream.

    Sequential topology (Llama, OPT, ...)::

        x  [B, T, d_in]
        y = x @ attn_shortcut + attn(norm(x))          [B, T, d_mid]
        z = y @ mlp_shortcut  + mlp(norm(y))           [B, T, d_out]

    Parallel topology (GPT-J, Phi-2, parallel GPT-NeoX), one norm and one shortcut::

        z = x @ attn_shortcut + attn(norm(x)) + mlp(norm(x))

    A shortcut that is ``None`` is the identity (same basis on both sides).

    Post-norms (Gemma 2/3) normalise a branch's output before the residual add. A norm does not
    commute with a rotation, so the branch keeps writing the full width D in the original
    basis; a weightless norm over D follows, then ``*_post_proj`` (D -> d, weight
    Q[:, :d]^T diag(scale)) carries the result into the stream's rotated, sliced basis::

        y = x @ attn_shortcut + attn_post_proj(norm_D(attn(norm(x))))
    """

    def __init__(
        self,
        attn: nn.Module,
        mlp: nn.Module | tuple[nn.Module, ...],
        *,
        attn_name: str,
        mlp_name: str | tuple[str, ...],
        topology: str,
        width: int,
        eps: float,
        returns_tuple: bool = False,
        attn_post: tuple[WeightlessRMSNorm, nn.Linear] | None = None,
        mlp_post: tuple[WeightlessRMSNorm, nn.Linear] | None = None,
    ) -> None:
        super().__init__()
        if topology not in ("sequential", "parallel"):
            raise ValueError(f"unknown block topology {topology!r}")
        self.attn_name = attn_name
        # A tuple names a chain of the layer's own modules that together are its MLP.
        self.mlp_names: tuple[str, ...] = (mlp_name,) if isinstance(mlp_name, str) else tuple(mlp_name)
        self.mlp_name = mlp_name
        self.topology = topology
        self.returns_tuple = returns_tuple
        # Registered under the original attribute names so that parameter names stay those of
        # the source model ("model.layers.3.self_attn.q_proj.weight").
        self.add_module(attn_name, attn)
        for name, module in zip(self.mlp_names, (mlp,) if isinstance(mlp, nn.Module) else mlp, strict=True):
            self.add_module(name, module)
        self.attn_norm = WeightlessRMSNorm(width, eps)
        self.mlp_norm = WeightlessRMSNorm(width, eps) if topology == "sequential" else None
        self.attn_post_norm, self.attn_post_proj = attn_post if attn_post is not None else (None, None)
        self.mlp_post_norm, self.mlp_post_proj = mlp_post if mlp_post is not None else (None, None)
        self.attn_shortcut: nn.Parameter | None = None
        self.mlp_shortcut: nn.Parameter | None = None

    # Not named `attn`/`mlp`/`attention`: those are the submodules' own attribute names in
    # some family (GPT-NeoX calls its attention `attention`).
    @property
    def attention_module(self) -> nn.Module:
        return self._modules[self.attn_name]

    @property
    def feedforward_module(self) -> nn.Module:
        if len(self.mlp_names) == 1:
            return self._modules[self.mlp_names[0]]
        return nn.Sequential(*(self._modules[n] for n in self.mlp_names))

    def set_shortcut(self, which: str, matrix: torch.Tensor | None, dtype: torch.dtype) -> None:
        """Install (d_in, d_out) as ``attn_shortcut`` or ``mlp_shortcut``; None removes it."""
        value = None if matrix is None else nn.Parameter(matrix.contiguous().to(dtype), requires_grad=False)
        setattr(self, which, value)

    def _run_mlp(self, h: torch.Tensor) -> torch.Tensor:
        for name in self.mlp_names:
            h = first_output(self._modules[name](h))
        return h

    @staticmethod
    def _post(out: torch.Tensor, norm: nn.Module | None, proj: nn.Module | None) -> torch.Tensor:
        return out if norm is None else proj(norm(out))

    # The two branches are public so the calibration loop runs exactly what forward runs.
    def attn_branch(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        out = first_output(self.attention_module(self.attn_norm(x), *args, **kwargs))
        return self._post(out, self.attn_post_norm, self.attn_post_proj)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.mlp_norm if self.mlp_norm is not None else self.attn_norm
        return self._post(self._run_mlp(norm(x)), self.mlp_post_norm, self.mlp_post_proj)

    @staticmethod
    def carry(x: torch.Tensor, shortcut: torch.Tensor | None) -> torch.Tensor:
        return x if shortcut is None else x @ shortcut

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        x = hidden_states
        if self.topology == "parallel":
            # One shortcut: attention and MLP both read x, and both write into the output basis.
            out = self.carry(x, self.attn_shortcut) + self.attn_branch(x, args, kwargs) + self.mlp_branch(x)
        else:
            y = self.carry(x, self.attn_shortcut) + self.attn_branch(x, args, kwargs)
            out = self.carry(y, self.mlp_shortcut) + self.mlp_branch(y)
        return (out,) if self.returns_tuple else out


class ScaledRMSNorm(WeightlessRMSNorm):
    """A weightless RMSNorm over the original width, then a per-coordinate scale.

    Used only as the final norm of a uniform model whose head stays tied to the embeddings:
    the final norm's scale can then no longer live in the head, so it lives here.
    """

    def __init__(self, width: int, eps: float, scale: torch.Tensor) -> None:
        super().__init__(width, eps)
        self.weight = nn.Parameter(scale.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.weight.to(x.dtype)
