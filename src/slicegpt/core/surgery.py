"""Structural changes to a Hugging Face causal LM, driven by its :class:`ArchSpec`.

``prepare`` makes a model computationally invariant (untied head, norms folded away, blocks
rewired); the readers and writers of the residual stream around each block are found here from
the family's spec. Cutting to widths is :mod:`slicegpt.core.block`'s one walk, which slicing and
loading share.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from . import ops
from ..arch import ArchSpec, UnsupportedModelError
from .modules import SlicedBlock, WeightlessRMSNorm
from .ops import WeightRef


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


def weight_refs(root: nn.Module, paths: Iterable[str]) -> list[WeightRef]:
    """The matrices at ``paths`` (modules or bare parameters); optional paths (``...?``) may be absent."""
    refs: list[WeightRef] = []
    for raw in paths:
        path, optional = raw.rstrip("?"), raw.endswith("?")
        parent_path, _, name = path.rpartition(".")
        try:
            parent = get_path(root, parent_path) if parent_path else root
            obj = getattr(parent, name)
        except (AttributeError, IndexError):
            if optional:
                continue
            raise
        if isinstance(obj, nn.Module):
            refs.append(WeightRef.of(obj))
        elif isinstance(obj, torch.Tensor):
            refs.append(WeightRef.parameter(parent, name))
        elif not optional:
            raise TypeError(f"{path} is neither a module nor a parameter ({type(obj).__name__})")
    return refs


def _branch_writers(layer: nn.Module, paths: Iterable[str], post_proj: str) -> list[WeightRef]:
    # Behind a post-norm the branch's own output projection stays in the original basis; the
    # projection after the norm is what writes into the stream.
    proj = getattr(layer, post_proj, None) if isinstance(layer, SlicedBlock) else None
    return [WeightRef.of(proj)] if proj is not None else weight_refs(layer, paths)


def attn_readers(layer: nn.Module, spec: ArchSpec) -> list[WeightRef]:
    readers = weight_refs(layer, spec.attn_inputs)
    # In a parallel block the MLP reads the same normalised stream as attention.
    return readers + weight_refs(layer, spec.mlp_inputs) if spec.topology == "parallel" else readers


def mlp_readers(layer: nn.Module, spec: ArchSpec) -> list[WeightRef]:
    return [] if spec.topology == "parallel" else weight_refs(layer, spec.mlp_inputs)


def attn_writers(layer: nn.Module, spec: ArchSpec) -> list[WeightRef]:
    writers = _branch_writers(layer, spec.attn_outputs, "attn_post_proj")
    if spec.topology == "parallel":
        writers += _branch_writers(layer, spec.mlp_outputs, "mlp_post_proj")
    return writers


def mlp_writers(layer: nn.Module, spec: ArchSpec) -> list[WeightRef]:
    return [] if spec.topology == "parallel" else _branch_writers(layer, spec.mlp_outputs, "mlp_post_proj")


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
    4. replace each decoder layer by a :class:`SlicedBlock` (post-norms become a weightless norm
       and a projection diag(scale)) and the final norm by a weightless RMSNorm over the
       original width.
    """
    if is_prepared(model, spec):
        return
    prepare_outside_layers(model, spec)
    layers = get_layers(model, spec)
    for i, layer in enumerate(layers):
        layers[i] = prepare_layer(layer, spec, model.config, i)


def prepare_outside_layers(model: nn.Module, spec: ArchSpec) -> None:
    """:func:`prepare` for everything but the decoder layers: head untied, (LayerNorm families)
    embeddings centred, the final norm folded into the head and made weightless."""
    for p in model.parameters():
        p.requires_grad_(False)
    untie_head(model, spec)
    if spec.norm == "layer":
        if spec.post_norms is not None:
            raise UnsupportedModelError(f"{spec.name}: post-norms are supported for RMSNorm families only")
        for path in spec.embeddings:
            ops.centre_embedding(get_path(model, path))
    final_norm = get_path(model, spec.final_norm)
    eps = _norm_eps(final_norm, spec, model.config)
    ops.fold_norm_into([get_path(model, spec.head)], *_norm_affine(final_norm, spec))
    set_path(model, spec.final_norm, WeightlessRMSNorm(hidden_size(model), eps))


def prepare_layer(layer: nn.Module, spec: ArchSpec, config: Any, index: int) -> SlicedBlock:
    """One decoder layer made invariant: (LayerNorm families) its writes to the stream centred,
    its norms folded into the linears that read them, the layer rewired as a :class:`SlicedBlock`
    around the layer's own attention and MLP modules.

    Touches nothing outside the layer, so a streamed slice prepares each layer when it is read
    and gets the bits a whole-model :func:`prepare` gives."""
    width = int(config.hidden_size)
    if spec.norm == "layer":
        ops.centre_outputs(attn_writers(layer, spec) + mlp_writers(layer, spec))
    attn_in, mlp_in = weight_refs(layer, spec.attn_inputs), weight_refs(layer, spec.mlp_inputs)
    for kind, refs in (
        ("attention inputs", attn_in),
        ("attention outputs", weight_refs(layer, spec.attn_outputs)),
        ("MLP inputs", mlp_in),
        ("MLP outputs", weight_refs(layer, spec.mlp_outputs)),
    ):
        if not refs:  # a spec whose optional paths all missed would silently skip a rotation
            raise RuntimeError(f"spec {spec.name!r} finds no {kind} in layer {index}")
    attn_norm = get_path(layer, spec.attn_norm)
    eps = _norm_eps(attn_norm, spec, config)
    if spec.mlp_norm is None:
        ops.fold_norm_into(attn_in + mlp_in, *_norm_affine(attn_norm, spec))
    else:
        # Parallel GPT-NeoX too: its two norms read the same x, so once folded both are the
        # block's one weightless norm.
        ops.fold_norm_into(attn_in, *_norm_affine(attn_norm, spec))
        ops.fold_norm_into(mlp_in, *_norm_affine(get_path(layer, spec.mlp_norm), spec))
    attn_post = mlp_post = None
    if spec.post_norms is not None:
        attn_post, mlp_post = (_post_branch(get_path(layer, p), spec, config, width) for p in spec.post_norms)
    mlp = get_path(layer, spec.mlp) if isinstance(spec.mlp, str) else tuple(get_path(layer, p) for p in spec.mlp)
    return SlicedBlock(
        get_path(layer, spec.attn),
        mlp,
        attn_name=spec.attn,
        mlp_name=spec.mlp,
        topology=spec.topology,
        width=width,
        eps=eps,
        returns_tuple=spec.layer_returns_tuple,
        attn_post=attn_post,
        mlp_post=mlp_post,
    )


def _post_branch(norm: nn.Module, spec: ArchSpec, config: Any, width: int) -> tuple[WeightlessRMSNorm, nn.Linear]:
    """A post-norm as a weightless norm over the full width and a (D, D) projection diag(scale).

    Slicing later rotates the projection's outputs like any writer's, making it
    Q[:, :d]^T diag(scale): (d, D), the parameters post-norm families pay for.
    """
    scale, shift = _norm_affine(norm, spec)
    ref = getattr(norm, "weight", None)
    dtype = ref.dtype if ref is not None else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    # Built on the meta device and then given its real weight: no random init of a D x D matrix.
    proj = nn.Linear(width, width, bias=shift is not None, device="meta", dtype=dtype)
    diag = torch.diag(scale) if scale is not None else torch.eye(width, dtype=torch.float64, device=device)
    ops.set_matrix(proj, diag)
    if shift is not None:
        ops.set_bias(proj, shift, dtype)
    return WeightlessRMSNorm(width, _norm_eps(norm, spec, config)), proj


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


def is_tied(model: nn.Module, spec: ArchSpec) -> bool:
    """Does the head share its weight with the (first) embedding table?"""
    head = get_path(model, spec.head).weight
    emb = get_path(model, spec.embeddings[0]).weight
    if head is emb:
        return True
    if head.is_meta or emb.is_meta:
        # Every meta tensor has data_ptr() 0: an untied skeleton would look tied (and the budget
        # counter would leave out a whole head). Not the same tensor: not tied.
        return False
    return head.data_ptr() == emb.data_ptr()
