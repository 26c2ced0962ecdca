"""The numbers of a model's shape that a run's memory and time depend on, read from a (meta) model:
shared by the plan (:mod:`slicegpt.evaluation.plan`) and the rate probe (:mod:`slicegpt.evaluation.probe`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..arch import UnsupportedModelError, spec_for_config
from ..core.neurons import experts_of, intermediate_size
from ..core.surgery import count_parameters, get_layers, get_path, is_tied


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a model that memory and time depend on (counts of parameters, not bytes).

    ``params``: stored parameters, a tied table once. ``non_layer_params``: everything but the
    decoder layers (embeddings, final norm, head). ``table_params``: one embedding table (a tied
    head is a clone of it once slicing unties it). ``largest_layer_params``: the largest decoder
    layer. ``largest_tensor``: elements of the largest single weight (what is rotated in float64
    at once). ``intermediate``: MLP neurons per layer (an MoE expert's for fused MoE blocks).
    ``experts``: routed experts per MoE layer (1 for a dense MLP): pruning keeps moments for each.
    ``points_per_layer``: PCA points per layer (2 for sequential blocks, 1 for parallel ones).
    ``attention_width``: query heads x head size (what attention's score and value products span).
    """

    params: int
    layer_params: int
    non_layer_params: int
    table_params: int
    largest_layer_params: int
    largest_tensor: int
    hidden: int
    intermediate: int
    layers: int
    tied: bool
    points_per_layer: int
    head_dim: int
    attention_width: int
    experts: int = 1


def model_shape(model: nn.Module) -> ModelShape:
    """The numbers :func:`memory_model` and :func:`time_model` need, from a (meta) model."""
    spec = spec_for_config(model.config)
    layers = get_layers(model, spec)
    sizes = [count_parameters(layer) for layer in layers]
    tied = is_tied(model, spec)
    table = get_path(model, spec.embeddings[0]).weight.numel()
    total = count_parameters(model)
    cfg = model.config
    d = int(cfg.hidden_size)
    try:
        inter = next((n for n in (intermediate_size(layer, spec) for layer in layers) if n is not None), None)
    except UnsupportedModelError:  # a fused gate/up MLP
        inter = None
    if inter is None:
        inter = int(getattr(cfg, "moe_intermediate_size", None) or getattr(cfg, "intermediate_size", None) or 4 * d)
    experts = next(
        (int(x.down_proj.shape[0]) for x in (experts_of(layer, spec) for layer in layers) if x is not None), 1
    )
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    return ModelShape(
        params=total,
        layer_params=sum(sizes),
        non_layer_params=total - sum(sizes),
        table_params=table,
        largest_layer_params=max(sizes),
        largest_tensor=max(p.numel() for p in model.parameters()),
        hidden=d,
        intermediate=int(inter),
        layers=len(layers),
        tied=tied,
        points_per_layer=2 if spec.topology == "sequential" else 1,
        head_dim=int(getattr(cfg, "head_dim", None) or d // heads),
        attention_width=heads * int(getattr(cfg, "head_dim", None) or d // heads),
        experts=experts,
    )
