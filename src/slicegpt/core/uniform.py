"""Uniform mode: one rotation for the whole network, and a head that stays tied.

With a single basis everywhere no residual connection needs a shortcut matrix, so the sliced
model *is* a model of the source family with a smaller ``hidden_size``
(:mod:`slicegpt.io.standard` writes it as one). This module holds the algorithm's part: which
families can be expressed that way, and how a tied head survives the rotation.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..arch import ArchSpec, UnsupportedModelError, spec_for_config
from .modules import ScaledRMSNorm
from .surgery import get_layers, get_path, set_path


def check_supported(config: Any, spec: ArchSpec) -> None:
    """A one-line error for families whose standard config cannot express a uniform slice."""
    name = config.model_type
    if spec.norm != "rms":
        raise UnsupportedModelError(
            f"`uniform` cannot export {name}: its LayerNorm subtracts the mean over the kept coordinates, which a "
            "rotated stream does not have; use per-layer slicing"
        )
    if getattr(spec, "post_norms", False):
        raise UnsupportedModelError(
            f"`uniform` cannot export {name}: its norms after the attention and MLP outputs act in the original basis; "
            "use per-layer slicing"
        )
    if spec.topology != "sequential" or not _has_head_dim(config):
        raise UnsupportedModelError(
            f"`uniform` cannot export {name}: its config has no separate head_dim, so a smaller hidden_size would "
            "shrink the attention heads; use per-layer slicing"
        )


def can_keep_basis(spec: ArchSpec) -> bool:
    """Can a per-layer model whose residual width stays whole keep its original basis and a tied head?

    (Per-layer budgets spent on MLP neurons alone: no rotation is needed, so no shortcut
    matrices, and the head stays tied with the final norm's scale moved into the norm.) The
    same families as uniform mode, less the head-size condition, which only a narrower
    stream raises.
    """
    return spec.norm == "rms" and not getattr(spec, "post_norms", False) and spec.topology == "sequential"


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
    if torch.equal(m, torch.diag(m.diagonal())):
        # already diagonal (the original basis, kept whole where only MLP neurons go): any turn
        # would only permute it (eigh sorts), and a kept basis costs the walk no products
        return q, m.diagonal().clone()
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


def explicit_norm_parameters(model: nn.Module, spec: ArchSpec, d: int) -> int:
    """Parameters the standard checkpoint adds: the norm weights that are implicit in memory.

    In memory every norm of a uniform model is weightless (the final one carries a scale only
    when the head stays tied); the standard checkpoint writes each as an explicit (d,) weight.
    The report counts the model as saved, so these count too.
    """
    per_layer = 1 + (spec.mlp_norm is not None)
    final = 0 if isinstance(get_path(model, spec.final_norm), ScaledRMSNorm) else 1
    return (per_layer * len(get_layers(model, spec)) + final) * d


def width_accepted(config: Any, d: int) -> bool:
    """Does the family's standard config accept hidden_size ``d`` (head size kept explicit)?

    Asked of transformers itself: transformers 5 refuses, for instance, a Llama config whose
    hidden_size is not a multiple of num_attention_heads even with an explicit head_dim, so a
    uniform slice at such a width could be computed but never saved.
    """
    from transformers import AutoModelForCausalLM

    heads = getattr(config, "num_attention_heads", None)
    if heads and d % int(heads):
        return False  # the common refusal, answered without building anything
    probe = copy.deepcopy(config)
    head_dim = int(getattr(probe, "head_dim", None) or probe.hidden_size // probe.num_attention_heads)
    probe.hidden_size, probe.head_dim = d, head_dim
    try:
        probe = type(config).from_dict(probe.to_dict())
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(probe)
    except Exception:  # any refusal by the family's config or model code
        return False
    return True


def accepted_width(config: Any, d: int, round_to: int) -> int:
    """The widest width at most ``d``, a multiple of ``round_to``, that the standard config accepts."""
    for c in range(d, 0, -1):
        if (c % round_to == 0 or c == int(config.hidden_size)) and width_accepted(config, c):
            return c
    raise UnsupportedModelError(f"no hidden width up to {d} is accepted by {config.model_type}'s standard config")
