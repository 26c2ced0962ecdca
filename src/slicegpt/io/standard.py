"""A uniform slice written as a standard checkpoint of its family.

Two facts make the export exact:

* a weightless RMSNorm over the original width D applied to d coordinates equals a standard
  RMSNorm over d with weight sqrt(D/d) and epsilon eps * D/d;
* attention keeps its head size, so the config states ``head_dim`` explicitly.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ..arch import ArchSpec, spec_for_config
from ..core.modules import ScaledRMSNorm
from ..core.surgery import get_layers, get_path
from .format import write_companions
from .shards import ShardWriter, host_state, write_weights


def _standard_config(model: nn.Module, spec: ArchSpec, d: int, meta_widths: dict[str, Any]) -> Any:
    config = copy.deepcopy(model.config)
    D = int(config.hidden_size)
    attn = getattr(get_layers(model, spec)[0], spec.attn)
    head_dim = int(
        getattr(attn, "head_dim", None) or getattr(config, "head_dim", None) or D // config.num_attention_heads
    )
    config.hidden_size = d
    config.head_dim = head_dim
    kept = {w.get("mlp") for w in meta_widths["layers"]} - {None}
    if kept:  # uniform pruning keeps one intermediate size in every layer (in every routed expert)
        (k,) = kept
        setattr(config, "intermediate_size" if spec.experts is None else spec.expert_width_key, k)
    config.rms_norm_eps = float(config.rms_norm_eps) * D / d
    for key in ("slicegpt", "auto_map"):
        if hasattr(config, key):
            delattr(config, key)
    return config


def standard_state_dict(model: nn.Module, spec: ArchSpec, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The uniform model's tensors under the family's standard names, norms made explicit."""
    D = int(meta["widths"]["hidden"])
    d = int(meta["widths"]["embedding"])
    gain = math.sqrt(D / d)
    dtype = next(model.parameters()).dtype
    state = host_state(model)
    offset = spec.norm_weight_offset
    const = torch.full((d,), gain - offset, dtype=dtype)
    for i in range(len(get_layers(model, spec))):
        state[f"{spec.layers}.{i}.{spec.attn_norm}.weight"] = const.clone()
        if spec.mlp_norm is not None:
            state[f"{spec.layers}.{i}.{spec.mlp_norm}.weight"] = const.clone()
    final = get_path(model, spec.final_norm)
    scale = (
        final.weight.detach().to("cpu", torch.float64)
        if isinstance(final, ScaledRMSNorm)
        else torch.ones(d, dtype=torch.float64)
    )
    # Families that scale embeddings by sqrt(hidden_size) (Gemma) compute that factor from the
    # config, which now says d: the table takes the difference, and a tied head, which would
    # take it too, gets it back from the final norm.
    emb = get_path(model, spec.embeddings[0])
    embed_scale = getattr(emb, "embed_scale", None)
    if embed_scale is not None:
        c = float(embed_scale) / math.sqrt(d)
        key = f"{spec.embeddings[0]}.weight"
        state[key] = (state[key].to(torch.float64) * c).to(dtype)
        if model.config.tie_word_embeddings:
            scale = scale / c
    state[f"{spec.final_norm}.weight"] = (gain * scale - offset).to(dtype)
    if model.config.tie_word_embeddings:
        state.pop(f"{spec.head}.weight", None)
    return state


def export_standard(model: nn.Module, writer: ShardWriter, meta: dict[str, Any], *, tokenizer: Any = None) -> None:
    """Write a uniform model into the writer's (empty, temporary) folder as a standard checkpoint."""
    out = writer.folder
    spec = spec_for_config(model.config)
    meta = dict(meta)
    d = int(meta["widths"]["embedding"])
    config = _standard_config(model, spec, d, meta["widths"])
    config.architectures = [type(model).__name__]
    meta["files"] = write_weights(writer, model, standard_state_dict(model, spec, meta))
    config.save_pretrained(out)
    # what the source's config said where this one differs (inspect builds the dense model from it)
    source = {
        k: getattr(model.config, k)
        for k in ("hidden_size", "intermediate_size", spec.expert_width_key, "rms_norm_eps")
        if getattr(model.config, k, None) is not None and getattr(model.config, k) != getattr(config, k, None)
    }
    meta["standard_config"] = {
        "hidden_size": d,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "source": source,
    }
    write_companions(out, meta, model, tokenizer)
