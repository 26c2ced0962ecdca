"""The MLP-width axis: keep the most useful intermediate neurons and refit the down projection.

For a dense MLP with ``n`` intermediate neurons, ``h = act(gate(x)) * up(x)`` ([N, n]) is what
the writers (``down_proj``, ``fc2``, ...) read. Dropping neuron ``j`` deletes row ``j`` of every
producer (gate/up, fc1: their output rows) and column ``j`` of every consumer. What the kept
neurons cannot say any more is partly recovered by refitting the consumer on them:

    W' = argmin_W  E||h W_ref^T - h_S W^T||^2 + lam ||W - W_ref[:, S]||^2

which, with C = E[h^T h] ([n, n], float64) and the kept set S, is

    W'^T = (C_SS + lam I)^-1 (C_S: W_ref^T + lam W_ref[:, S]^T)        [k, D]

(:func:`slicegpt.core.refit.ridge` on the kept rows of the moments; :mod:`slicegpt.core.corrections`
aims the same solve at the dense model's stream instead).

The statistics are the second moment of ``h`` only: the target is the layer's own unpruned
output, so no other model need run beside it. The kept set is chosen greedily: each step keeps
the neuron whose addition most reduces that least-squares error (a pivoted Cholesky of C
weighted by W_ref), which accounts for neurons that say the same thing.

Routed experts (Mixtral, Qwen-MoE: fused stacks ``gate_up_proj`` [E, 2I, H] and ``down_proj``
[E, H, I]) are pruned expert by expert: every expert keeps its own ``k`` neurons, chosen and
refit on the tokens routed to it, each weighted by its routing weight w (the block adds
w * expert(x)), so its moments are those of w * h. One ``k`` for all experts keeps the model a
standard checkpoint of its family (one ``moe_intermediate_size``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import ArchSpec, UnsupportedModelError
from . import ops
from . import refit as refit_
from .ops import WeightRef
from .surgery import get_path, weight_refs


def experts_of(block: nn.Module, spec: ArchSpec) -> nn.Module | None:
    """The layer's fused routed experts, or None (a dense family, or a dense layer of an MoE model)."""
    if spec.experts is None:
        return None
    try:
        experts = get_path(block, spec.experts)
    except (AttributeError, IndexError):
        return None
    if not isinstance(getattr(experts, "down_proj", None), torch.Tensor):
        return None
    if not getattr(experts, "is_concatenated", True) or not getattr(experts, "has_gate", True):
        raise UnsupportedModelError(
            f"{spec.name}: only experts with concatenated [gate; up] stacks can lose neurons; use `axes=residual`"
        )
    return experts


def _stacks(experts: nn.Module) -> tuple[WeightRef, WeightRef]:
    return WeightRef.parameter(experts, "gate_up_proj"), WeightRef.parameter(experts, "down_proj")


def mlp_neuron_refs(block: nn.Module, spec: ArchSpec) -> tuple[list[WeightRef], list[WeightRef]]:
    """(producers, consumers) of one block's MLP intermediate activation.

    Every producer's output rows and every consumer's input columns are the neurons; families
    whose MLP is not laid out that way (fused gate_up stacks, routed experts) are refused.
    """
    producers, consumers = weight_refs(block, spec.mlp_inputs), weight_refs(block, spec.mlp_outputs)
    if spec.mlp_preserves_width or any(r.tensor.dim() != 2 for r in producers + consumers):
        raise UnsupportedModelError(
            f"{spec.name}: its MLP has no plain neuron matrices (routed experts are pruned expert by "
            "expert); use `axes=residual`"
        )
    widths = {r.out_dim for r in producers} | {r.in_dim for r in consumers}
    if len(widths) != 1:
        raise UnsupportedModelError(
            f"{spec.name}: its MLP weights do not share one intermediate width ({sorted(widths)}); use `axes=residual`"
        )
    return producers, consumers


def intermediate_size(block: nn.Module, spec: ArchSpec) -> int | None:
    """The width the MLP-neuron axis prunes: the MLP's, or each routed expert's in MoE families,
    where a dense layer between MoE layers has none (None: it keeps its MLP)."""
    if spec.experts is not None:
        experts = experts_of(block, spec)
        return None if experts is None else _stacks(experts)[1].in_dim
    return mlp_neuron_refs(block, spec)[1][0].in_dim


def expert_matrix(ref: WeightRef, e: int) -> torch.Tensor:
    """Expert ``e``'s (out, in) matrix of a fused stack, float64 (one expert at a time: a whole
    Mixtral stack is gigabytes in float64)."""
    w = ref.tensor.detach()[e]
    return (w.t() if ref.transposed else w).to(torch.float64)


def keep_expert_neurons(experts: nn.Module, index: torch.Tensor, down: torch.Tensor | None = None) -> None:
    """Keep the neurons ``index`` ([E, k], int64: expert e keeps index[e]) of every routed expert;
    ``down`` ([E, H, k]) replaces the down stacks (a refit).

    Kept rows are selected in the stacks' own dtype and layout; the experts' width attribute is
    set by name (not inferred as ops.set_matrix does: an expert's hidden_dim may equal its width).
    """
    gate_up, down_ref = _stacks(experts)
    n = down_ref.in_dim
    index = index.to(gate_up.tensor.device)
    rows = torch.cat([index, index + n], dim=1)  # [E, 2k]: the gate rows, then the same neurons' up rows
    gu = gate_up.tensor.detach()  # [E, 2n, H], or [E, H, 2n] transposed
    axis = 1 if gate_up.transposed else 0  # of one expert's stored matrix: where its outputs lie
    kept = torch.stack([gu[e].index_select(axis, rows[e]) for e in range(gu.shape[0])])
    setattr(experts, gate_up.name, nn.Parameter(kept.contiguous(), requires_grad=False))
    bias = getattr(experts, "gate_up_proj_bias", None)
    if isinstance(bias, torch.Tensor):
        setattr(experts, "gate_up_proj_bias", nn.Parameter(torch.gather(bias.detach(), 1, rows), requires_grad=False))
    dw = down_ref.tensor.detach()  # [E, H, n], or [E, n, H] transposed
    if down is None:
        axis = 0 if down_ref.transposed else 1  # where one expert's inputs (the neurons) lie
        new = torch.stack([dw[e].index_select(axis, index[e]) for e in range(dw.shape[0])])
    else:
        new = (down.transpose(-1, -2) if down_ref.transposed else down).to(dw.dtype)
    setattr(experts, down_ref.name, nn.Parameter(new.contiguous(), requires_grad=False))
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = int(index.shape[1])


def keep_neurons(block: nn.Module, spec: ArchSpec, index: torch.Tensor, down: list[torch.Tensor] | None = None) -> None:
    """Keep the neurons ``index`` ([k], int64) of the block's MLP; ``down`` replaces the consumers'
    (D, k) matrices (a refit), in the consumers' order. For routed experts see :func:`keep_expert_neurons`."""
    experts = experts_of(block, spec)
    if experts is not None:
        E = _stacks(experts)[1].tensor.shape[0]
        keep_expert_neurons(
            experts,
            index.reshape(1, -1).expand(E, -1) if index.dim() == 1 else index,
            None if down is None else down[0],
        )
        return
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
    n = intermediate_size(block, spec)
    if n is not None and n != k:
        keep_neurons(block, spec, torch.arange(k))


def selection_dtype(weight: torch.Tensor) -> torch.dtype:
    """The precision of the greedy neuron selection for an MLP writer's ``weight``, both the
    neurons a layer keeps and the spreading walk's error curves (:mod:`slicegpt.core.spread`): the
    moments' product precision (:func:`~slicegpt.core.refit.product_dtype`: float32, float64 for
    a float64 model). The moments it reads are float64 sums of float32 products already.

    Measured against float64 (benchmarks/README, "Where a compression's time goes"; on this
    project's AMD CPU, whose float32 products go through its bfloat16 units; not measured on other
    CPUs): the curves within 2e-6 (SmolLM2) and 8e-5 (Qwen2.5-Coder-0.5B) of a layer's total error
    and the same spread of neurons; the kept neurons differ from a near-tie on (3% of SmolLM2's,
    4-5% of Qwen's, two calibration draws each), wiki and novels perplexity within 3% either way
    (smaller than two draws differ by) and Qwen's uniform budget 7-10% faster. On CUDA, a process
    that enabled TF32 matmuls selects with TF32's 10-bit products: less exact, not measured here."""
    return refit_.product_dtype(weight)


def greedy_neurons(
    cov: torch.Tensor,
    w_ref: torch.Tensor,
    k: int,
    cross: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The ``k`` neurons a greedy least-squares column selection keeps, sorted ([k], int64)
    (:func:`greedy_order`'s choice, in ``dtype``)."""
    order, _ = greedy_order(cov, w_ref, k, cross, dtype=dtype)
    return order.sort().values


# Neurons chosen per round of the greedy selection, and candidates per neuron chosen: each round
# picks its neurons exactly as one-at-a-time greedy would among the best ROUND * SHORTLIST by the
# round's starting gains, then updates the live neurons with matrix products (two passes over the
# [live, D] residual per round instead of two per neuron; the selection is memory-bound).
ROUND = 16
SHORTLIST = 4
# The share of dead rows (chosen or exhausted) at which the selection's arrays are cut to the live
# ones: each cut copies the live factor once, and until it the products carry the dead rows.
COMPACT_AT = 0.125


def selection_flops(n: int, k: int, d: int) -> float:
    """The arithmetic of :func:`greedy_order` taking ``k`` of ``n`` neurons against a ``d``-wide
    target: the round after t picks reads the factor's live rows, [n - t, t], and updates their
    residual, [n - t, d]: summed over t, 2 (n k^2 / 2 - k^3 / 3) + 2 d (n k - k^2 / 2), with the
    dead rows the live ones carry until they are cut (up to COMPACT_AT of them, half on average)."""
    live = 2.0 * (n * k * k / 2 - k**3 / 3) + 2.0 * d * (n * k - k * k / 2)
    return live / (1.0 - COMPACT_AT / 2)


def greedy_order(
    cov: torch.Tensor,
    w_ref: torch.Tensor,
    k: int,
    cross: torch.Tensor | None = None,
    round_size: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` neurons a greedy least-squares column selection takes, in the order taken
    ([k], int64), and what each lowered the least-squares error by ([k], float64): the error of
    the best fit on the first j is E||t||^2 - gains[:j].sum(), so one run gives a layer's whole
    error-against-width curve (to compare layers, e.g. to spread neurons over them).

    Works on moments only: C = E[h^T h] ([n, n]) and the target's cross moment B ([n, D]):
    B = C W_ref^T when the target is the layer's own unpruned output (``cross`` None), or
    E[h^T t] for another target t (the dense model's). With the partial Cholesky factor L of C on
    the chosen neurons, the residual cross moment R = B - L (L_S:)^T-part and the Schur complements
    s_j = C_jj - ||L_j||^2, adding neuron j lowers the error by ||R_j||^2 / s_j; the best is kept
    and R, s are updated.

    Blocked: a round takes ``round_size`` (default :data:`ROUND`) neurons one at a time, each the
    best of a shortlist (the ``SHORTLIST * round_size`` best at the round's start, whose rows of R, s and the factor are
    updated exactly after every pick), then applies the round to every neuron not yet taken at
    once: the new factor columns by one triangular solve, R by one rank-``round_size`` product
    (a taken neuron's row is never read again, so the arrays are cut to the live rows as they
    die: to every width a third of the memory traffic). Gains are exact for the
    order taken; the order is one-at-a-time greedy's unless a neuron outside the shortlist would
    have overtaken all of it within one round (measured on SmolLM2's moments: benchmarks/README).

    ``dtype``: the elimination's precision (:func:`selection_dtype`). A Schur complement below
    1e-12 (float32: 1e-6) of the largest diagonal counts as exhausted. ``cov`` is read in
    ``dtype`` a few rows or columns at a time, never copied whole (at a 70B model's MLP width a
    float32 copy is 3.3 GB).
    """
    n = cov.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"cannot keep {k} of {n} neurons")
    round_size = ROUND if round_size is None else round_size
    if cross is None:  # [n, D]
        resid = refit_.rows_times(cov, w_ref.to(dtype).t(), dtype)
    else:
        resid = cross.to(dtype, copy=True)
    schur = cov.diagonal().to(dtype, copy=True)
    floor = (1e-12 if dtype == torch.float64 else 1e-6) * schur.max().clamp_min(1e-30)
    # The elimination works on the live rows only: ``live`` holds their neurons, and factor, resid
    # and schur one row per live neuron. A chosen neuron's row is never read again (nor is an
    # exhausted one's: its Schur complement only falls), so each round marks them dead and, once a
    # COMPACT_AT share of the rows is dead, the arrays are cut to the live ones. The round's
    # products then read (n - t) rows of the factor instead of n: to every width a third of the
    # memory traffic.
    live = torch.arange(n, device=cov.device)
    factor = torch.empty(n, k, dtype=dtype, device=cov.device)
    dead = torch.zeros(n, dtype=torch.bool, device=cov.device)
    chosen = torch.zeros(n, dtype=torch.bool, device=cov.device)
    order = torch.zeros(k, dtype=torch.int64, device=cov.device)
    gains = torch.zeros(k, dtype=torch.float64)
    t = 0
    while t < k:
        gain = torch.linalg.vector_norm(resid, dim=1).square_() / schur.clamp_min(floor)
        dead |= schur <= floor
        gain[dead] = -1.0
        valid = int((gain >= 0).sum())
        if valid == 0:
            # The moments are exhausted (rank-deficient: fewer calibration tokens than neurons):
            # the rest adds nothing numerically. Keep the largest remaining raw variances and leave
            # the factor alone (dividing by a vanished Schur complement would blow it up, and
            # already chosen neurons would then be picked again).
            var = torch.where(chosen, float("-inf"), cov.diagonal().to(dtype))
            order[t:] = torch.sort(var, descending=True, stable=True).indices[: k - t]
            break
        b = min(round_size, k - t, valid)
        cand = torch.topk(gain, min(valid, SHORTLIST * b)).indices  # [c], live rows
        old = factor[cand, :t]
        neuron = live[cand]
        # [c, c]: the Schur complement among the shortlist
        block = cov[neuron[:, None], neuron].to(dtype) - old @ old.t()
        rows, sc = resid[cand].clone(), schur[cand].clone()  # [c, D], [c]
        local = torch.zeros(len(cand), b, dtype=dtype, device=cov.device)
        z = torch.zeros(b, resid.shape[1], dtype=dtype, device=cov.device)
        picked = torch.zeros(len(cand), dtype=torch.bool, device=cov.device)
        taken: list[int] = []
        for s in range(b):
            g = torch.linalg.vector_norm(rows, dim=1).square_() / sc.clamp_min(floor)
            g[picked | (sc <= floor)] = -1.0
            q = int(torch.argmax(g))
            if g[q] < 0:
                break
            gains[t + s] = g[q]
            root = sc[q].clamp_min(floor).sqrt()
            col = (block[:, q] - local[:, :s] @ local[q, :s]) / root
            local[:, s] = col
            z[s] = rows[q] / root
            rows.addr_(col, z[s], alpha=-1.0)
            sc = sc - col.pow(2)
            picked[q] = True
            taken.append(q)
        m = len(taken)
        at = cand[taken]  # [m], live rows
        pivots = live[at]  # [m], neurons
        # The round's factor columns for every live neuron: forward substitution through the
        # pivots' rows (lower-triangular, m x m), applied to their Schur complement columns [rows, m].
        # The pivots' columns of C are read as their rows (C is symmetric): m rows in one sweep,
        # where a column is one cache miss per neuron.
        schur_cols = cov[pivots][:, live].t().to(dtype) - factor[:, :t] @ factor[at, :t].t()
        lower = local[taken, :m].tril()
        new = torch.linalg.solve_triangular(lower, schur_cols.t(), upper=False).t()  # [rows, m]
        factor[:, t : t + m] = new
        resid.addmm_(new, z[:m], alpha=-1.0)
        schur = schur - new.pow(2).sum(1)
        chosen[pivots] = True
        dead[at] = True
        order[t : t + m] = pivots
        t += m
        if t < k and int(dead.sum()) >= COMPACT_AT * len(live):
            keep = (~dead).nonzero().squeeze(1)
            live, schur, dead = live[keep], schur[keep], dead[keep]
            factor, resid = _keep_rows(factor, keep, t), _keep_rows(resid, keep, resid.shape[1])
    return order, gains


def _keep_rows(x: torch.Tensor, keep: torch.Tensor, cols: int) -> torch.Tensor:
    """``x`` cut to its rows ``keep`` (increasing) in place, the first ``cols`` columns moved: the
    leading rows of the same storage, so that the cut holds no second copy (a 70B model's greedy
    factor is 2.3 GB). A row only moves up, and each block of rows is gathered before it is
    written, so no row is overwritten before it is read."""
    rows = refit_.row_block(x.shape[0])
    for i in range(0, len(keep), rows):
        block = keep[i : i + rows]
        x[i : i + len(block), :cols] = x[block, :cols]
    return x[: len(keep)]


class ExpertStats:
    """Per-expert moments of w * h over the tokens routed to each expert (w its routing weight,
    h = act(gate(x)) * up(x), [tokens_e, I]), float64, for the fit rows and the held-out rows.

    A forward pre-hook on the experts module, which transformers calls as
    ``experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])``; ``held`` says whether
    the batch being run is the held-out one.
    """

    def __init__(self, experts: nn.Module) -> None:
        gate_up, down = _stacks(experts)
        self.experts, self.gate_up, self.num = experts, gate_up, int(down.tensor.shape[0])
        self.fit = [refit_.Moments() for _ in range(self.num)]
        self.held_out = [refit_.Moments() for _ in range(self.num)]
        self.held = False
        self.handle = experts.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        apply = getattr(self.experts, "_apply_gate", None)
        if apply is not None:  # the family's own gating (transformers' expert modules have one)
            return apply(gate_up_out)
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.experts.act_fn(gate) * up

    def _hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = list(args) + [kwargs[k] for k in names[len(args) :]]
        x, index, weights = (v.detach() for v in values[:3])
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        bias = getattr(self.experts, "gate_up_proj_bias", None)
        store = self.held_out if self.held else self.fit
        for e in range(self.num):
            token, slot = torch.where(index == e)
            if token.numel() == 0:
                continue
            pre = x[token] @ expert_matrix(self.gate_up, e).t()
            if isinstance(bias, torch.Tensor):
                pre = pre + bias[e].to(torch.float64)
            h = self._gate(pre) * weights[token, slot, None].to(torch.float64)
            store[e].add(h, None)

    def remove(self) -> None:
        self.handle.remove()


def fallback_neurons(experts: nn.Module, e: int, k: int) -> torch.Tensor:
    """The neurons an expert no calibration token reached keeps: the largest products of its
    gate, up and down weights' norms, sorted ([k], int64)."""
    gate_up, down = _stacks(experts)
    gu, w = expert_matrix(gate_up, e), expert_matrix(down, e)  # [2I, H], [H, I]
    n = w.shape[1]
    score = gu[:n].norm(dim=1) * gu[n:].norm(dim=1) * w.norm(dim=0)
    return torch.sort(torch.topk(score, k).indices).values
