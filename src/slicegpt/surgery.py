"""Structural changes to a Hugging Face causal LM, driven by its :class:`ArchSpec`.

``prepare`` makes a model computationally invariant (untied head, norms folded away, blocks
rewired). ``Widths`` says how wide each point of the residual stream is after slicing, and
``apply_widths`` cuts an (empty) prepared model to those widths: loading builds the skeleton
with exactly the code that slicing used, so the two can never disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch
from torch import nn

from . import ops
from .arch import ArchSpec
from .modules import SlicedBlock, WeightlessRMSNorm


def get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def set_path(root: nn.Module, path: str, value: Any) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_path(root, parent_path) if parent_path else root
    setattr(parent, name, value)


def get_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return get_path(model, spec.layers)


def hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def is_prepared(model: nn.Module, spec: ArchSpec) -> bool:
    return isinstance(get_layers(model, spec)[0], SlicedBlock)


def _norm_affine(norm: nn.Module, spec: ArchSpec) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    w = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None)
    scale = None if w is None else w.detach().to(torch.float64) + spec.norm_weight_offset
    shift = None if b is None else b.detach().to(torch.float64)
    return scale, shift


def _norm_eps(norm: nn.Module, spec: ArchSpec, config: Any) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(norm, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return spec.norm_eps(config)


def _modules(root: nn.Module, paths: Iterable[str]) -> list[nn.Module]:
    return [get_path(root, p) for p in paths]


def attn_readers(layer: nn.Module, spec: ArchSpec) -> list[nn.Module]:
    readers = _modules(layer, spec.attn_inputs)
    # In a parallel block the MLP reads the same normalised stream as attention.
    return readers + _modules(layer, spec.mlp_inputs) if spec.topology == "parallel" else readers


def mlp_readers(layer: nn.Module, spec: ArchSpec) -> list[nn.Module]:
    return [] if spec.topology == "parallel" else _modules(layer, spec.mlp_inputs)


def attn_writers(layer: nn.Module, spec: ArchSpec) -> list[nn.Module]:
    writers = _modules(layer, spec.attn_outputs)
    return writers + _modules(layer, spec.mlp_outputs) if spec.topology == "parallel" else writers


def mlp_writers(layer: nn.Module, spec: ArchSpec) -> list[nn.Module]:
    return [] if spec.topology == "parallel" else _modules(layer, spec.mlp_outputs)


def untie_head(model: nn.Module, spec: ArchSpec) -> None:
    """Give the head its own weight: embeddings and head get different rotations."""
    head = get_path(model, spec.head)
    emb = get_path(model, spec.embeddings[0])
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    # transformers 5 keeps the resolved tie mapping on the instance and re-ties from it.
    if getattr(model, "all_tied_weights_keys", None):
        model.all_tied_weights_keys = {}
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None and hasattr(text_config, "tie_word_embeddings"):
        text_config.tie_word_embeddings = False


def prepare(model: nn.Module, spec: ArchSpec) -> None:
    """Make the model invariant to rotations of its residual stream; logits are unchanged.

    1. untie embeddings and head;
    2. LayerNorm families: centre embeddings and every write to the stream;
    3. fold each norm's scale (and bias) into the linears that read it;
    4. replace each decoder layer by a :class:`SlicedBlock` and the final norm by a weightless
       RMSNorm over the original width.
    """
    if is_prepared(model, spec):
        return
    for p in model.parameters():
        p.requires_grad_(False)
    untie_head(model, spec)
    layers = get_layers(model, spec)
    width = hidden_size(model)
    if spec.norm == "layer":
        for path in spec.embeddings:
            ops.centre_embedding(get_path(model, path))
        for layer in layers:
            ops.centre_outputs(attn_writers(layer, spec) + mlp_writers(layer, spec))

    for i, layer in enumerate(layers):
        attn_norm = get_path(layer, spec.attn_norm)
        eps = _norm_eps(attn_norm, spec, model.config)
        ops.fold_norm_into(attn_readers(layer, spec), *_norm_affine(attn_norm, spec))
        if spec.mlp_norm is not None:
            ops.fold_norm_into(mlp_readers(layer, spec), *_norm_affine(get_path(layer, spec.mlp_norm), spec))
        layers[i] = SlicedBlock(
            get_path(layer, spec.attn),
            get_path(layer, spec.mlp),
            attn_name=spec.attn,
            mlp_name=spec.mlp,
            topology=spec.topology,
            width=width,
            eps=eps,
            returns_tuple=spec.layer_returns_tuple,
        )

    final_norm = get_path(model, spec.final_norm)
    eps = _norm_eps(final_norm, spec, model.config)
    ops.fold_norm_into([get_path(model, spec.head)], *_norm_affine(final_norm, spec))
    set_path(model, spec.final_norm, WeightlessRMSNorm(width, eps))


@dataclass(frozen=True)
class LayerWidths:
    """Widths of the residual stream around one block.

    ``d_in`` enters the block, ``d_mid`` sits between attention and MLP (sequential blocks only;
    equal to ``d_in`` for parallel ones), ``d_out`` leaves it. The flags say whether the residual
    path carries a change-of-basis matrix there.
    """

    d_in: int
    d_mid: int
    d_out: int
    attn_shortcut: bool = True
    mlp_shortcut: bool = True


@dataclass(frozen=True)
class Widths:
    hidden: int
    embedding: int
    layers: tuple[LayerWidths, ...]

    @property
    def head(self) -> int:
        return self.layers[-1].d_out if self.layers else self.embedding

    def to_dict(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "embedding": self.embedding, "layers": [asdict(w) for w in self.layers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Widths":
        return cls(
            hidden=int(data["hidden"]),
            embedding=int(data["embedding"]),
            layers=tuple(LayerWidths(**w) for w in data["layers"]),
        )


def apply_widths(model: nn.Module, spec: ArchSpec, widths: Widths) -> None:
    """Cut a prepared model to ``widths`` without rotating (for empty skeletons on load)."""
    for path in spec.embeddings:
        ops.rotate_embedding(get_path(model, path), None, widths.embedding)
    for block, w in zip(get_layers(model, spec), widths.layers):
        ops.rotate_inputs(attn_readers(block, spec), None, w.d_in)
        ops.rotate_outputs(attn_writers(block, spec), None, w.d_mid if spec.topology == "sequential" else w.d_out)
        ops.rotate_inputs(mlp_readers(block, spec), None, w.d_mid)
        ops.rotate_outputs(mlp_writers(block, spec), None, w.d_out)
        dtype = _dtype_of(block)
        dev = next(block.parameters()).device
        attn_out = w.d_mid if spec.topology == "sequential" else w.d_out
        if w.attn_shortcut:
            block.set_shortcut("attn_shortcut", torch.empty(w.d_in, attn_out, device=dev), dtype)
        if w.mlp_shortcut and spec.topology == "sequential":
            block.set_shortcut("mlp_shortcut", torch.empty(w.d_mid, w.d_out, device=dev), dtype)
    ops.rotate_inputs([get_path(model, spec.head)], None, widths.head)


def _dtype_of(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def count_parameters(model: nn.Module) -> int:
    """Parameters actually stored, each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        key = id(p)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total
