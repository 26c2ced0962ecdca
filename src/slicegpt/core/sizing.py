"""Widths chosen in one place: what slicing will build, decided before any calibration work.

:func:`plan_widths` turns a model and a :class:`~slicegpt.config.SliceConfig` into a
:class:`WidthPlan`: the residual width, every layer's widths and MLP neurons, the parameter
target and split a budget found, whether the model keeps its original basis, and how many MLP
neurons a per-layer budget may spread over the layers by their error (the per-layer counts come
from calibration; the count depends on their total only). ``slice_model`` builds exactly these
widths; ``slicegpt plan`` prints them and their exact parameter count without any data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from ..arch import ArchSpec
from ..config import DEFAULT_RESIDUAL_SHARE, SliceConfig
from . import uniform
from .budget import BudgetWidth, ParameterCounter, parse_axes, resolve_target
from .surgery import get_layers, hidden_size
from .widths import ConstantWidth, Widths, WidthPolicy, fit_widths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WidthPlan:
    """The widths a slicing run builds, and what chose them.

    ``widths`` are every layer's widths (MLP neurons as one count per layer, the even split,
    where a budget prunes them); ``target`` and ``residual_share`` are the parameter budget and
    the share of its removal the residual width took (None without a budget); ``keep_basis``
    says that the model keeps its original basis (the residual width is whole: no rotation, no
    shortcut matrices, a tied head stays tied); ``spread_total`` is the number of MLP neurons a
    per-layer budget spreads over the layers by their error (None: every layer keeps its count),
    in steps of ``step``.
    """

    widths: Widths
    counter: ParameterCounter
    target: int | None = None
    residual_share: float | None = None
    keep_basis: bool = False
    spread_total: int | None = None
    step: int = 1

    @property
    def budget(self) -> bool:
        return self.target is not None

    def spread(self, per_layer: Sequence[int]) -> Widths:
        """These widths with the MLP neurons spread as ``per_layer`` (their sum is ``spread_total``)."""
        if self.spread_total is None or sum(per_layer) != self.spread_total:
            raise ValueError(f"spread neurons {list(per_layer)} do not sum to the planned {self.spread_total}")
        return self.widths.with_mlp(per_layer)

    def params(self) -> int:
        """The compressed model's exact parameter count as saved (tied weights once)."""
        if self.spread_total is None:
            return self.counter.count(self.widths)
        # any spread of the same total counts the same: every layer's neurons cost alike
        kept = [w.mlp for w in self.widths.layers]
        return self.counter.count(self.widths.with_mlp([kept[0] + self.spread_total - sum(kept), *kept[1:]]))

    def allocation(self, widths: Widths) -> dict[str, Any]:
        """What a budget run records of the widths it built (empty without a budget)."""
        if not self.budget:
            return {}
        record: dict[str, Any] = {
            "residual_share": self.residual_share,
            "residual_width": widths.embedding,
            "mlp_neurons": self.widths.mlp_neurons,
        }
        if self.spread_total is not None:
            # "mlp_neurons": the count every layer would keep without spreading (the same total)
            record["mlp_neurons_per_layer"] = [w.mlp for w in widths.layers]
        return record


def plan_widths(
    model: nn.Module,
    spec: ArchSpec,
    config: SliceConfig,
    shipped: int,
    policy: WidthPolicy | None = None,
) -> WidthPlan:
    """The widths slicing ``model`` (its config is enough: a meta model serves) with ``config``
    builds. ``shipped``: its parameter count as shipped (a fractional target is of it);
    ``policy``: widths chosen by the caller instead of the config's.

    An impossible target or an axis that cannot be pruned is refused here, before any work.
    """
    if policy is None and config.target_params is not None:
        budget = _budget(model, spec, config, shipped)
        widths, share = budget.split
        keep_basis = budget.counter.kept_basis(widths)
        spreads = (
            config.spread_neurons
            and spec.experts is None
            and keep_basis
            and all(w.mlp is not None for w in widths.layers)
        )
        return WidthPlan(
            widths=widths,
            counter=budget.counter,
            target=budget.target,
            residual_share=share,
            keep_basis=keep_basis,
            spread_total=budget.spread_total() if spreads else None,
            step=budget.step,
        )
    chosen = policy or _constant(model, config)
    widths = fit_widths(chosen.widths(hidden_size(model), len(get_layers(model, spec)), spec.topology), spec)
    return WidthPlan(widths=widths, counter=ParameterCounter(model.config, spec, config.uniform))


def _budget(model: nn.Module, spec: ArchSpec, config: SliceConfig, shipped: int) -> BudgetWidth:
    axes = parse_axes(config.axes)
    if "residual" not in axes:
        share = 0.0
    elif "mlp" not in axes:
        share = 1.0
    else:
        share = DEFAULT_RESIDUAL_SHARE if config.residual_share is None else config.residual_share
    counter = ParameterCounter(
        model.config, spec, config.uniform, keep_basis=not config.uniform and uniform.can_keep_basis(spec)
    )
    valid = (lambda d: uniform.width_accepted(model.config, d)) if config.uniform else None
    budget = BudgetWidth(
        resolve_target(config.target_params, shipped),
        counter,
        share,
        config.round_to,
        config.slice_head or config.uniform,
        valid,
        residual_allowed="residual" in axes,
        mlp_allowed="mlp" in axes,
    )
    budget.split  # an impossible target fails here, before any work
    return budget


def _constant(model: nn.Module, config: SliceConfig) -> WidthPolicy:
    """The paper's constant width; in uniform mode, moved down to a width the family's standard config accepts."""
    policy = ConstantWidth(config.sparsity, config.round_to, config.slice_head or config.uniform)
    if config.uniform:
        d = policy.kept(hidden_size(model))
        ok = uniform.accepted_width(model.config, d, config.round_to)
        if ok != d:
            log.info(
                f"slicegpt: width {d} is not one {model.config.model_type}'s standard config accepts "
                f"(num_attention_heads={getattr(model.config, 'num_attention_heads', '?')}); using {ok}"
            )
            policy = ConstantWidth(config.sparsity, 1, True, width=ok)
    return policy
