"""Uniform mode: one rotation for the whole network, exported as a standard checkpoint.

With a single basis everywhere no residual connection needs a shortcut matrix, so the sliced
model *is* a model of the source family with a smaller ``hidden_size``: plain transformers,
vLLM and llama.cpp read it. Two facts make the export exact:

* a weightless RMSNorm over the original width D applied to d coordinates equals a standard
  RMSNorm over d with weight sqrt(D/d) and epsilon eps * D/d;
* attention keeps its head size, so the config states ``head_dim`` explicitly.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import ArchSpec, UnsupportedModelError, spec_for_config
from .modules import ScaledRMSNorm, WeightlessRMSNorm
from .surgery import get_layers, get_path, set_path



def check_uniform_supported(config: Any, spec: ArchSpec) -> None:
    """A one-line error for families whose standard config cannot express a uniform slice."""
    name = config.model_type
    if spec.norm != "rms":
        raise UnsupportedModelError(
            f"--uniform cannot export {name}: its LayerNorm subtracts the mean over the kept coordinates, which a "
            "rotated stream does not have; use per-layer slicing"
        )
    if getattr(spec, "post_norms", False):
        raise UnsupportedModelError(
            f"--uniform cannot export {name}: its norms after the attention and MLP outputs act in the original basis; "
            "use per-layer slicing"
        )
    if spec.topology != "sequential" or not _has_head_dim(config):
        raise UnsupportedModelError(
            f"--uniform cannot export {name}: its config has no separate head_dim, so a smaller hidden_size would shrink "
            "the attention heads; use per-layer slicing"
        )


def _has_head_dim(config: Any) -> bool:
    """Does the family's modelling code read ``config.head_dim`` rather than hidden_size // heads?

    Asked of the code itself: build a one-layer skeleton on the meta device with a smaller
    hidden size and see whether the query projection keeps the original head size.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    probe = copy.deepcopy(config)
    heads = int(probe.num_attention_heads)
    head_dim = int(getattr(probe, "head_dim", None) or probe.hidden_size // heads)
    probe.head_dim = head_dim
    probe.hidden_size = int(probe.hidden_size) - 8
    if hasattr(probe, "slicegpt"):
        delattr(probe, "slicegpt")
    try:
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(probe)
    except Exception:  # a config that cannot even be built this way cannot be exported either
        return False
    spec = spec_for_config(config)
    q = get_path(get_layers(skeleton, spec)[0], spec.attn_inputs[0])
    return int(q.weight.shape[0]) == heads * head_dim


def final_norm_scale(model: nn.Module, spec: ArchSpec) -> torch.Tensor:
    """The final norm's effective per-coordinate scale, before it is folded into the head (D,)."""
    norm = get_path(model, spec.final_norm)
    return norm.weight.detach().to(torch.float64) + spec.norm_weight_offset


def align_to_final_norm(q: torch.Tensor, d: int, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the kept basis inside its own span so that a tied head stays (nearly) exact.

    A tied head must be the rotated embedding E Q_d, so the final norm's scale w cannot live in
    the head; it must be a diagonal scale in the rotated basis. Inside the kept subspace,
    M = Q_d^T diag(w) Q_d (d x d, symmetric) has eigenvectors V; in the basis Q_d V the scale
    is the diagonal of eigenvalues, exactly. Turning the basis inside span(Q_d) keeps the
    subspace (and so everything PCA chose), and with one basis for the whole network every
    layer is still invariant. What is lost is only diag(w)'s leakage out of the kept subspace:
    nothing at sparsity 0.

    Returns the new (D, D) orthogonal basis (kept columns first) and the (d,) final-norm scale.
    """
    qd = q[:, :d]
    m = qd.t() @ (scale.to(q.dtype)[:, None] * qd)  # (d, d)
    lam, v = torch.linalg.eigh((m + m.t()) / 2)
    q_new = q.clone()
    q_new[:, :d] = qd @ v
    return q_new, lam


def retie_head(model: nn.Module, spec: ArchSpec, scale: torch.Tensor) -> None:
    """Tie the head to the rotated embeddings again; the final norm takes ``scale`` (d,)."""
    emb = get_path(model, spec.embeddings[0])
    head = get_path(model, spec.head)
    final = get_path(model, spec.final_norm)
    set_path(model, spec.final_norm, ScaledRMSNorm(final.width, final.eps, scale.to(emb.weight.dtype)))
    head.weight = emb.weight
    model.config.tie_word_embeddings = True


def _standard_config(model: nn.Module, spec: ArchSpec, d: int) -> Any:
    config = copy.deepcopy(model.config)
    D = int(config.hidden_size)
    attn = getattr(get_layers(model, spec)[0], spec.attn)
    head_dim = int(getattr(attn, "head_dim", None) or getattr(config, "head_dim", None) or D // config.num_attention_heads)
    config.hidden_size = d
    config.head_dim = head_dim
    config.rms_norm_eps = float(config.rms_norm_eps) * D / d
    for key in ("slicegpt", "auto_map"):
        if hasattr(config, key):
            delattr(config, key)
    return config


def standard_state_dict(model: nn.Module, spec: ArchSpec) -> dict[str, torch.Tensor]:
    """The uniform model's tensors under the family's standard names, norms made explicit."""
    meta = model.config.slicegpt
    D = int(meta["widths"]["hidden"])
    d = int(meta["widths"]["embedding"])
    gain = math.sqrt(D / d)
    dtype = next(model.parameters()).dtype
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    offset = spec.norm_weight_offset
    const = torch.full((d,), gain - offset, dtype=dtype)
    for i in range(len(get_layers(model, spec))):
        state[f"{spec.layers}.{i}.{spec.attn_norm}.weight"] = const.clone()
        if spec.mlp_norm is not None:
            state[f"{spec.layers}.{i}.{spec.mlp_norm}.weight"] = const.clone()
    final = get_path(model, spec.final_norm)
    scale = final.weight.detach().to("cpu", torch.float64) if isinstance(final, ScaledRMSNorm) else torch.ones(d, dtype=torch.float64)
    state[f"{spec.final_norm}.weight"] = (gain * scale - offset).to(dtype)
    if model.config.tie_word_embeddings:
        state.pop(f"{spec.head}.weight", None)
    return state


def export_standard(model: nn.Module, out: Path, *, tokenizer: Any = None) -> None:
    """Write a uniform model into the (empty, temporary) folder ``out`` as a standard checkpoint."""
    from safetensors.torch import save_file

    spec = spec_for_config(model.config)
    meta = dict(model.config.slicegpt)
    d = int(meta["widths"]["embedding"])
    config = _standard_config(model, spec, d)
    config.architectures = [type(model).__name__]
    save_file(standard_state_dict(model, spec), str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    meta["standard_config"] = {"hidden_size": d, "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps}
    from .io import write_companions

    write_companions(out, meta, model, tokenizer)
