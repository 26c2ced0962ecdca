"""Architecture knowledge as data.

One small :class:`ArchSpec` per model family says where the norms, the attention and MLP
inputs and outputs, the embeddings and the head live, and how the block is wired (sequential
or parallel). The slicing core never looks at a model's class or name: it looks up
``config.model_type`` here. Adding a family is one short module in this package that calls
:func:`register`, plus its entry in the parametrised tests.

Paths of readers and writers may name a module (its ``weight``, and ``bias`` if any) or a
parameter directly: fused MoE experts store every expert's matrix in one 3-D parameter
(``mlp.experts.gate_up_proj``, [E, out, in]). A path ending in ``?`` is optional: it is looked
for in every layer and skipped where absent (dense layers between MoE layers).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

Topology = Literal["sequential", "parallel"]
NormKind = Literal["rms", "layer"]


class UnsupportedModelError(ValueError):
    """The model's architecture (or a variant of it) cannot be sliced."""


@dataclass(frozen=True)
class ArchSpec:
    """Where the pieces of one decoder family live, as dotted attribute paths.

    Paths of ``embeddings``, ``layers``, ``final_norm`` and ``head`` start at the
    ``*ForCausalLM`` object; every other path starts at one decoder layer.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embeddings: tuple[str, ...] = ("model.embed_tokens",)
    final_norm: str = "model.norm"
    head: str = "lm_head"
    attn: str = "self_attn"
    # One module, or a chain of the layer's own modules applied in order (OPT has no MLP module:
    # fc1, activation_fn and fc2 sit on the layer itself).
    mlp: str | tuple[str, ...] = "mlp"
    attn_norm: str = "input_layernorm"
    # None where attention and MLP read one norm (GPT-J, Phi-2). Parallel GPT-NeoX has two norms
    # of the same input: both are folded, and the block keeps one weightless norm.
    mlp_norm: str | None = "post_attention_layernorm"
    attn_inputs: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_outputs: tuple[str, ...] = ("self_attn.o_proj",)
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_outputs: tuple[str, ...] = ("mlp.down_proj",)
    topology: Topology = "sequential"
    # For families whose wiring depends on the config (GPT-NeoX's use_parallel_residual):
    # spec_for_config returns a copy with ``topology`` set from it.
    topology_for: Callable[[Any], Topology] | None = field(default=None, compare=False)
    norm: NormKind = "rms"
    # Gemma stores its RMSNorm scale as w and multiplies by (1 + w).
    norm_weight_offset: float = 0.0
    # Norms applied to the attention and MLP *outputs* before the residual add (Gemma 2/3), as
    # (after attention, after MLP). They do not commute with a rotation, so those outputs stay
    # at full width in the original basis and a projection D -> d follows the norm.
    post_norms: tuple[str, str] | None = None
    # The MLP's output has its input's width (fused MoE blocks allocate their output like their
    # input): the stream must have one width on both sides of the MLP.
    mlp_preserves_width: bool = False
    # Fused routed experts (``experts.gate_up_proj`` [E, 2I, H], gate rows first, and
    # ``experts.down_proj`` [E, H, I]), where a layer has them: the MLP-neuron axis prunes each
    # expert's own neurons, and ``expert_width_key`` is the config field of their width I.
    experts: str | None = None
    expert_width_key: str = "intermediate_size"
    # The model's forward reshapes its final hidden states to the embeddings' width (GPT-2's
    # ``view(output_shape)``): the head must read the width the embeddings have.
    head_reads_embedding_width: bool = False
    # Does the HF decoder layer return a tuple (older families) or a bare tensor?
    layer_returns_tuple: bool = False
    # Families trained with a BOS token at the start of every sequence (Gemma).
    bos_per_row: bool = False
    # llama.cpp's architecture for a standard checkpoint of the family (what GGUF export
    # writes); None: not exportable.
    gguf_arch: str | None = None
    # Optional check of a config for variants the spec cannot handle (raises UnsupportedModelError).
    check: Callable[[Any], None] | None = field(default=None, compare=False)
    # Maps config fields to the per-family values the core needs (eps, activation, ...).
    norm_eps: Callable[[Any], float] = field(
        default=lambda cfg: float(getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "layer_norm_eps", 1e-5)),
        compare=False,
    )


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    for model_type in spec.model_types:
        if model_type in _REGISTRY and _REGISTRY[model_type] is not spec:
            raise RuntimeError(f"model_type {model_type!r} registered twice")
        _REGISTRY[model_type] = spec
    return spec


def _load_all() -> None:
    # Every module in this package registers its families on import.
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def supported_architectures() -> list[str]:
    """The ``config.model_type`` values that can be sliced, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def spec_for_config(config: Any) -> ArchSpec:
    """The spec for ``config.model_type``; a one-line error naming the supported types otherwise."""
    _load_all()
    model_type = getattr(config, "model_type", None)
    spec = _REGISTRY.get(model_type)  # type: ignore[arg-type]
    if spec is None:
        raise UnsupportedModelError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(supported_architectures())}"
        )
    if spec.check is not None:
        spec.check(config)
    if spec.topology_for is not None:
        spec = replace(spec, topology=spec.topology_for(config))
    return spec
