"""The MLP-width axis: keep the most useful intermediate neurons and refit the down projection.

For a dense MLP with ``n`` intermediate neurons, ``h = act(gate(x)) * up(x)`` ([N, n]) is what
the writers (``down_proj``, ``fc2``, ...) read. Dropping neuron ``j`` deletes row ``j`` of every
producer (gate/up, fc1: their output rows) and column ``j`` of every consumer. What the kept
neurons cannot say any more is partly recovered by refitting the consumer on them:

    W' = argmin_W  E||h W_ref^T - h_S W^T||^2 + lam ||W - W_ref[:, S]||^2

which, with C = E[h^T h] ([n, n], float64) and the kept set S, is

    W'^T = (C_SS + lam I)^-1 (C_S: W_ref^T + lam W_ref[:, S]^T)        [k, D]

The statistics are the second moment of ``h`` only: the target is the layer's own unpruned
output, so no other model need run beside it. The kept set is chosen greedily: each step keeps
the neuron whose addition most reduces that least-squares error (a pivoted Cholesky of C
weighted by W_ref), which accounts for neurons that say the same thing.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import ArchSpec, UnsupportedModelError
from . import ops
from .ops import WeightRef
from .surgery import weight_refs


def mlp_neuron_refs(block: nn.Module, spec: ArchSpec) -> tuple[list[WeightRef], list[WeightRef]]:
    """(producers, consumers) of one block's MLP intermediate activation.

    Every producer's output rows and every consumer's input columns are the neurons; families
    whose MLP is not laid out that way (fused gate_up stacks, routed experts) are refused.
    """
    producers, consumers = weight_refs(block, spec.mlp_inputs), weight_refs(block, spec.mlp_outputs)
    if spec.mlp_preserves_width or any(r.tensor.dim() != 2 for r in producers + consumers):
        raise UnsupportedModelError(f"{spec.name}: pruning MLP neurons of routed experts is not supported; use --axes residual")
    widths = {r.out_dim for r in producers} | {r.in_dim for r in consumers}
    if len(widths) != 1:
        raise UnsupportedModelError(
            f"{spec.name}: its MLP weights do not share one intermediate width ({sorted(widths)}); use --axes residual"
        )
    return producers, consumers


def intermediate_size(block: nn.Module, spec: ArchSpec) -> int:
    return mlp_neuron_refs(block, spec)[1][0].in_dim


def keep_neurons(block: nn.Module, spec: ArchSpec, index: torch.Tensor, down: list[torch.Tensor] | None = None) -> None:
    """Keep the neurons ``index`` ([k], int64) of the block's MLP; ``down`` replaces the consumers'
    (D, k) matrices (a refit), in the consumers' order."""
    producers, consumers = mlp_neuron_refs(block, spec)
    for ref in producers:
        dtype = ref.tensor.dtype
        ops.set_matrix(ref, ops.get_matrix(ref)[index.to(ref.tensor.device)])
        bias = ops.get_bias(ref)
        ops.set_bias(ref, None if bias is None else bias[index.to(bias.device)], dtype)
    for i, ref in enumerate(consumers):
        w = ops.get_matrix(ref)[:, index.to(ref.tensor.device)] if down is None else down[i]
        ops.set_matrix(ref, w)


def cut_neurons(block: nn.Module, spec: ArchSpec, k: int) -> None:
    """An empty skeleton's MLP cut to its first ``k`` neurons (the saved weights are already pruned)."""
    if intermediate_size(block, spec) != k:
        keep_neurons(block, spec, torch.arange(k))


class NeuronStats:
    """Streaming second moment of the consumers' input h, float64: E[h^T h] ([n, n])."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.count = 0

    def hook(self, _module: nn.Module, args: tuple) -> None:
        h = args[0].detach()
        flat = h.reshape(-1, h.shape[-1]).to(torch.float64)
        if self.sum is None:
            self.sum = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=flat.device)
        self.sum.addmm_(flat.t(), flat)
        self.count += flat.shape[0]

    def mean(self) -> torch.Tensor:
        if self.sum is None or self.count == 0:
            raise RuntimeError("no calibration tokens reached the MLP")
        return self.sum / self.count


def greedy_neurons(cov: torch.Tensor, w_ref: torch.Tensor, k: int, cross: torch.Tensor | None = None) -> torch.Tensor:
    """The ``k`` neurons a greedy least-squares column selection keeps, sorted ([k], int64).

    Works on moments only: C = E[h^T h] ([n, n]) and the target's cross moment B ([n, D]):
    B = C W_ref^T when the target is the layer's own unpruned output (``cross`` None), or
    E[h^T t] for another target t (the dense model's). With the partial Cholesky factor L of C on the chosen neurons, the residual cross
    moment R = B - L (L_S:)^T-part and the Schur complements s_j = C_jj - ||L_j||^2, adding
    neuron j lowers the error by ||R_j||^2 / s_j; the best is kept and R, s are updated.
    """
    cov = cov.to(torch.float64)
    n = cov.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"cannot keep {k} of {n} neurons")
    resid = (cov @ w_ref.to(torch.float64).t() if cross is None else cross.to(torch.float64)).clone()  # [n, D]
    schur = cov.diagonal().clone()
    floor = 1e-12 * schur.max().clamp_min(1e-300)
    factor = torch.zeros(n, k, dtype=torch.float64, device=cov.device)
    chosen = torch.zeros(n, dtype=torch.bool, device=cov.device)
    for t in range(k):
        gain = resid.pow(2).sum(dim=1) / schur.clamp_min(floor)
        gain[chosen | (schur <= floor)] = -1.0
        p = int(torch.argmax(gain))
        if gain[p] < 0:
            # The moments are exhausted (rank-deficient: fewer calibration tokens than neurons):
            # the rest adds nothing numerically. Keep the largest remaining raw variance and leave
            # the factor alone (dividing by a vanished Schur complement would blow it up, and
            # already chosen neurons would then be picked again).
            p = int(torch.argmax(torch.where(chosen, float("-inf"), cov.diagonal())))
            chosen[p] = True
            continue
        col = (cov[:, p] - factor[:, :t] @ factor[p, :t]) / schur[p].clamp_min(floor).sqrt()
        factor[:, t] = col
        resid -= torch.outer(col, resid[p] / schur[p].clamp_min(floor).sqrt())
        schur = schur - col.pow(2)
        chosen[p] = True
    return torch.nonzero(chosen).flatten()


def ridge_refit(cov: torch.Tensor, w_ref: torch.Tensor, index: torch.Tensor, lam: float) -> torch.Tensor:
    """The consumer refit on the kept neurons, (D, k) float64 (see the module docstring).

    ``lam`` is relative to the mean kept variance: lam * mean(diag C_SS).
    """
    cov, w_ref = cov.to(torch.float64), w_ref.to(torch.float64)
    c_ss = cov[index][:, index]
    reg = lam * c_ss.diagonal().mean()
    rhs = cov[index] @ w_ref.t() + reg * w_ref[:, index].t()  # [k, D]
    eye = torch.eye(len(index), dtype=torch.float64, device=cov.device)
    return torch.linalg.solve(c_ss + reg * eye, rhs).t()
