"""Parameter budgets: count a compressed model exactly before building it, and choose widths for a target.

Counting builds the compressed skeleton on the meta device (no memory, no weights) with the same
surgery and the same per-layer walk as slicing, so the count is the saved model's by
construction: shortcut matrices, an untied head, explicit norms of a standard checkpoint and a
tied head counted once all included.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from ..arch import ArchSpec, UnsupportedModelError
from .block import BlockBases, slice_block, slice_embeddings, slice_head
from .neurons import intermediate_size
from .surgery import count_parameters, get_layers, get_path, is_tied, prepare
from .uniform import explicit_norm_parameters
from .widths import ConstantWidth, Widths, fit_widths

AXES = ("residual", "mlp")


def parse_axes(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """The axes named, each once, in order ('residual,residual' is the residual width alone)."""
    axes = tuple(dict.fromkeys(a.strip() for a in (text.split(",") if isinstance(text, str) else text) if a.strip()))
    bad = [a for a in axes if a not in AXES]
    if bad or not axes:
        raise ValueError(f"unknown compression axes {bad or text!r}; choose among {', '.join(AXES)} (comma-separated)")
    return axes


def resolve_target(target: float, shipped: int) -> int:
    """A parameter target: a count (> 1), or a fraction (0, 1] of the parameters as shipped."""
    if not target > 0 or not math.isfinite(target):
        raise ValueError(f"target parameters must be a positive finite number, got {target}")
    if target > 1 and target != int(target):
        raise ValueError(f"a target above 1 is a parameter count, a whole number (100.9M, 1.2B); got {target}")
    return int(target * shipped) if target <= 1 else int(target)


class ParameterCounter:
    """Exact saved-parameter counts of compressed versions of one model, from its config alone."""

    def __init__(self, config: Any, spec: ArchSpec, uniform: bool, keep_basis: bool = False) -> None:
        """``keep_basis`` (per-layer mode): where the residual width stays whole the model keeps
        its original basis, so, as in uniform mode, no shortcut matrices and a tied head stay
        tied (its final norm then carries a (D,) scale); the norms stay implicit (a slicegpt folder)."""
        from transformers import AutoModelForCausalLM

        cfg = copy.deepcopy(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        self.tied = is_tied(model, spec)
        prepare(model, spec)
        self.model, self.spec, self.uniform, self.keep_basis = model, spec, uniform, keep_basis
        self.hidden = int(cfg.hidden_size)
        self.layers = len(get_layers(model, spec))
        # The width the MLP-neuron axis prunes in each layer (None where it has none: the dense
        # layers of an MoE model keep their MLP), and the first such width.
        try:
            self.prunable: list[int | None] = [intermediate_size(b, spec) for b in get_layers(model, spec)]
        except UnsupportedModelError:
            self.prunable = [None] * self.layers
        self.intermediate: int | None = next((n for n in self.prunable if n is not None), None)

    def count(self, widths: Widths) -> int:
        model = copy.deepcopy(self.model)  # meta tensors: nothing is copied but shapes
        slice_embeddings(model, self.spec, None, widths.embedding)
        for block, w in zip(get_layers(model, self.spec), widths.layers):
            slice_block(block, self.spec, BlockBases(None, None, None), w)
        slice_head(model, self.spec, None, widths.head)
        n = count_parameters(model)
        if self.uniform or self.kept_basis(widths):
            # one basis: no shortcuts; the head stays tied if it was
            n -= sum(
                p.numel()
                for b in get_layers(model, self.spec)
                for p in (b.attn_shortcut, b.mlp_shortcut)
                if p is not None
            )
            if self.tied:
                n -= get_path(model, self.spec.head).weight.numel()
            if self.uniform:  # a standard checkpoint: norms become explicit, the final norm's scale included
                n += explicit_norm_parameters(model, self.spec, widths.embedding)
            elif self.tied:  # the tied head's final-norm scale
                n += widths.embedding
        return n

    def kept_basis(self, widths: Widths) -> bool:
        """Does a per-layer model of these widths keep the original basis (residual width whole)?"""
        return self.keep_basis and not self.uniform and widths.embedding == self.hidden and widths.head == self.hidden


@dataclass(frozen=True)
class BudgetWidth:
    """Widths for a parameter target: residual width ``d`` (a multiple of ``round_to``, and one the
    family's standard config accepts in uniform mode), then the most MLP neurons (a multiple of
    ``round_to``, and of 8 for routed experts, the same in every layer) that keep the count within ``target``.

    ``residual_share`` says how the budget is split: the share of the parameters to remove that
    the residual width takes (0: MLP neurons only; 1: residual only, SliceGPT as in the paper).
    """

    target: int
    counter: ParameterCounter
    residual_share: float
    round_to: int = 8
    slice_head: bool = False
    valid_width: Any = None  # callable(d) -> bool, e.g. the family's head-count divisibility
    residual_allowed: bool = True  # may the residual width take more when neurons cannot reach the target
    mlp_allowed: bool = True  # may MLP neurons go (False: the residual width alone, or the target is refused)

    def _widths(self, d: int, k: int | None) -> Widths:
        base = ConstantWidth(0.0, 1, self.slice_head, width=d).widths(
            self.counter.hidden, self.counter.layers, self.counter.spec.topology
        )
        base = fit_widths(base, self.counter.spec)
        return base.with_mlp([k if n is not None else None for n in self.counter.prunable])

    @property
    def step(self) -> int:
        """MLP neurons are kept in multiples of this. Routed experts run through grouped matrix
        products whose strides must be multiples of 16 bytes: 8 neurons in half precision."""
        return math.lcm(self.round_to, 8) if self.counter.spec.experts is not None else self.round_to

    def spread_total(self) -> int:
        """The most MLP neurons all layers together may keep within the target when each layer may
        keep its own count (a multiple of ``step``): the even split's total, plus what its
        rounding to a count every layer shares left over."""
        widths = self.split[0]
        kept = [w.mlp for w in widths.layers]
        if any(k is None for k in kept):
            raise ValueError("spreading needs every layer's MLP neurons pruned")
        at = self.counter.count(widths)
        one_less = widths.with_mlp([kept[0] - self.step, *kept[1:]])
        per_step = at - self.counter.count(
            one_less
        )  # parameters of `step` neurons in one layer (the same in every layer)
        return sum(kept) + (self.target - at) // per_step * self.step

    def _widths_ok(self, d: int) -> bool:
        return d % self.round_to == 0 and (self.valid_width is None or self.valid_width(d))

    def widths(self, hidden: int, num_layers: int, topology: str) -> Widths:
        return self.split[0]

    @cached_property
    def split(self) -> tuple[Widths, float]:
        """The widths, and the residual share they were found at (found once: each candidate is
        counted on a skeleton, and slicing asks before any work and again when it starts).

        When MLP neurons cannot reach the target at ``residual_share`` (per-layer mode pays for
        shortcut matrices and an untied head), the residual width takes more, in steps of a
        quarter, and of the shares that reach it the most balanced wins: the one whose smaller
        kept fraction (residual width of the hidden size, neurons of the MLP's) is largest.
        Starving one axis costs most: SmolLM2 per-layer at 25% removed, the first share that
        reached the target (0.25) kept 200 of 1536 neurons and gave 37x dense perplexity, the
        residual width alone (share 1) 18x; the balanced rule takes 0.75 (width 360, 928 neurons).
        """
        try:
            return self._at(self.counter.hidden, self.residual_share), self.residual_share
        except ValueError as exc:
            more = [s for s in (0.25, 0.5, 0.75, 1.0) if s > self.residual_share] if self.residual_allowed else []
            if not more or "leaves no MLP neurons" not in str(exc):
                raise
            first = exc
        reached: list[tuple[float, float, Widths]] = []
        for share in more:
            try:
                widths = self._at(self.counter.hidden, share)
            except ValueError as exc:
                if "leaves no MLP neurons" not in str(exc):
                    raise
                continue
            n = self.counter.intermediate or 1
            kept = min(widths.embedding / self.counter.hidden, (widths.mlp_neurons or n) / n)
            reached.append((kept, -share, widths))
        if not reached:
            raise first
        kept, share, widths = max(reached, key=lambda r: (r[0], r[1]))  # ties: the smaller share
        return widths, -share

    def _at(self, hidden: int, residual_share: float) -> Widths:
        full = self.counter.count(self._widths(hidden, None))
        if self.target >= full:
            raise ValueError(
                f"the target {self.target:,} parameters is not below the model's {full:,}: nothing to remove"
            )
        # residual width first: its share of the parameters to remove
        want = full - residual_share * (full - self.target)
        d = hidden
        if residual_share > 0:
            candidates = [c for c in range(hidden, 0, -1) if self._widths_ok(c) or c == hidden]
            d = next((c for c in candidates if self.counter.count(self._widths(c, None)) <= want), candidates[-1])
        at_d = self.counter.count(self._widths(d, None))
        if at_d <= self.target:
            return self._widths(d, None)
        if not self.mlp_allowed:
            raise ValueError(
                f"the target {self.target:,} parameters is below what the residual width alone reaches "
                f"({at_d:,} at width {d}); add the 'mlp' axis or raise the target"
            )
        n = self.counter.intermediate
        if n is None:
            raise UnsupportedModelError(
                f"{self.counter.spec.name}: the MLP-neuron axis is not available; use `axes=residual`"
            )
        per_neuron = at_d - self.counter.count(self._widths(d, n - 1))
        k = n - -(-(at_d - self.target) // per_neuron)  # fewest neurons removed that reach the target
        step = self.step
        k -= k % step
        if k < step:
            raise ValueError(f"the target {self.target:,} leaves no MLP neurons at residual width {d}")
        widths = self._widths(d, k)
        assert self.counter.count(widths) <= self.target
        return widths
