"""Forward FLOPs per token, counted from a model's *actual* module shapes.

Not from ``config.hidden_size``, which a sliced model no longer honours: every matrix product is
charged ``2 * in * out`` at the width it really has, shortcut matrices included, so the speed-up
arithmetic predicts can be set beside the one measured (:mod:`slicegpt.evaluation.bench`).

The decoder layers are found from the family's :class:`~slicegpt.arch.ArchSpec` (the path the
slicing core uses), so only supported families can be counted; a sliced layer is a
:class:`~slicegpt.core.modules.SlicedBlock`, whose shortcut matrices are its ``attn_shortcut`` and
``mlp_shortcut``. Embedding lookups, norms and bias additions cost nothing here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..arch import ArchSpec, UnsupportedModelError, spec_for_config
from ..core.modules import SlicedBlock
from ..core.ops import WeightRef
from ..core.surgery import get_layers

__all__ = [
    "attention_dims",
    "find_decoder_layers",
    "flops_breakdown",
    "flops_per_token",
    "layer_flops",
    "layer_shortcuts",
    "matmul_flops",
]


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model has no `.config`; expected a Hugging Face PreTrainedModel")
    return config


def text_config(config: Any) -> Any:
    """The decoder's hyper-parameters (multimodal configs keep them in a sub-config)."""
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _spec(model: nn.Module) -> ArchSpec:
    try:
        return spec_for_config(_config(model))
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"FLOPs are counted on the layout of a supported family: {exc}") from None


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, where the family's spec says they are (``model.layers``, ``transformer.h`` ...).

    A sliced model replaces the list's *entries* (by :class:`SlicedBlock`) but keeps the list.
    """
    return get_layers(model, _spec(model))


def matmul_flops(module: nn.Module) -> int | None:
    """2 * in * out for a dense projection (bias adds are ignored, as usual); None for anything else."""
    if isinstance(module, nn.Linear):
        return 2 * module.in_features * module.out_features
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2 and WeightRef.of(module).transposed:
        return 2 * weight.numel()  # GPT-2's Conv1D: a Linear storing its weight as [in, out]
    return None


def layer_shortcuts(layer: nn.Module) -> dict[str, nn.Parameter]:
    """The shortcut matrices of a decoder layer by name: a :class:`SlicedBlock`'s that are set."""
    if not isinstance(layer, SlicedBlock):
        return {}
    found = {"attn_shortcut": layer.attn_shortcut, "mlp_shortcut": layer.mlp_shortcut}
    return {name: matrix for name, matrix in found.items() if matrix is not None}


def attention_dims(layer: nn.Module, config: Any) -> tuple[int, int]:
    """(num query heads, head_dim) of one decoder layer.

    Read from the attention module itself where possible because that is what
    actually runs; SliceGPT slices the residual width, never the head width,
    so these normally equal the config values.
    """
    modules = list(layer.modules())
    # Prefer a module that *is* an attention block; fall back to anything exposing head_dim.
    ordered = [m for m in modules if "attention" in type(m).__name__.lower()] + modules
    for module in ordered:
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int) or head_dim <= 0:
            continue
        heads = getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None)
        if not isinstance(heads, int):
            module_config = getattr(module, "config", None) or config
            heads = getattr(module_config, "num_attention_heads", None)
        if isinstance(heads, int) and heads > 0:
            return heads, head_dim
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, int(head_dim)


def _layer_parts(layer: nn.Module, config: Any, seq_len: int, charged: set[int]) -> dict[str, int]:
    """One layer's FLOPs per token by source; adds every weight it charges to ``charged``."""
    linear = 0
    for module in layer.modules():
        flops = matmul_flops(module)
        if flops is not None and id(module.weight) not in charged:
            linear += flops
            charged.add(id(module.weight))
    shortcut = 0
    for matrix in layer_shortcuts(layer).values():
        if id(matrix) not in charged:
            shortcut += 2 * matrix.numel()  # x[.., d_in] @ S[d_in, d_out]
            charged.add(id(matrix))
    heads, head_dim = attention_dims(layer, text_config(config))
    return {"decoder_linear": linear, "shortcut": shortcut, "attention": 2 * 2 * seq_len * heads * head_dim}


def layer_flops(layer: nn.Module, config: Any, seq_len: int) -> float:
    """One decoder layer's share of :func:`flops_breakdown` (same counting rules)."""
    return float(sum(_layer_parts(layer, config, seq_len, set()).values()))


def flops_breakdown(model: nn.Module, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token, split by source.

    Keys: ``decoder_linear`` (nn.Linear / Conv1D inside the decoder layers),
    ``lm_head``, ``other_linear`` (projections elsewhere that also run per
    token, e.g. OPT's project_in/out; 0 for Llama), ``shortcut`` (the shortcut
    matrices of sliced blocks, applied as ``x @ S``) and ``attention`` (QK^T and AV:
    ``2 * 2 * seq_len * heads * head_dim`` per layer).
    """
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    config = _config(model)
    layers = find_decoder_layers(model)

    # Weights already charged as a matmul, so a weight shared by two modules is counted once.
    charged: set[int] = set()
    totals = {"decoder_linear": 0, "shortcut": 0, "attention": 0}
    for layer in layers:
        for key, value in _layer_parts(layer, config, seq_len, charged).items():
            totals[key] += value

    lm_head = 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and id(getattr(head, "weight", None)) not in charged:
        flops = matmul_flops(head)
        if flops is not None:
            lm_head = flops
            charged.add(id(head.weight))

    other_linear = 0
    for module in model.modules():
        flops = matmul_flops(module)
        if flops is not None and id(module.weight) not in charged:
            other_linear += flops
            charged.add(id(module.weight))

    return {
        "decoder_linear": float(totals["decoder_linear"]),
        "lm_head": float(lm_head),
        "other_linear": float(other_linear),
        "shortcut": float(totals["shortcut"]),
        "attention": float(totals["attention"]),
    }


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Total forward FLOPs per token at context length ``seq_len`` (see :func:`flops_breakdown`)."""
    return float(sum(flops_breakdown(model, seq_len).values()))
