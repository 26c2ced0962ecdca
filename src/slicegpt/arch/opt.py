"""OPT (Meta): LayerNorm, learned positions (offset by 2 inside the embedding), biases, no MLP module.

The MLP is the layer's own ``fc1``, ``activation_fn`` and ``fc2`` applied in order. Only the
pre-norm variant can be sliced: post-norm OPT (``do_layer_norm_before=False``, opt-350m) puts
its norms on the residual stream itself, and opt-350m's ``project_in``/``project_out`` (word
embeddings narrower than the stream) are a variant no other pre-norm OPT has.
"""

from __future__ import annotations

from typing import Any

from . import ArchSpec, UnsupportedModelError, register


def _check(config: Any) -> None:
    if not getattr(config, "do_layer_norm_before", True):
        raise UnsupportedModelError(
            "OPT with do_layer_norm_before=False (post-norm, e.g. opt-350m) cannot be sliced: its norms sit on the "
            "residual stream"
        )
    if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        raise UnsupportedModelError(
            f"OPT with word_embed_proj_dim={config.word_embed_proj_dim} != hidden_size={config.hidden_size} "
            "(project_in/project_out) is not supported"
        )
    if getattr(config, "_remove_final_layer_norm", False):
        raise UnsupportedModelError("OPT without a final layer norm (_remove_final_layer_norm=True) is not supported")


OPT = register(
    ArchSpec(
        name="opt",
        model_types=("opt",),
        layers="model.decoder.layers",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        final_norm="model.decoder.final_layer_norm",
        attn_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm",
        mlp=("fc1", "activation_fn", "fc2"),
        attn_outputs=("self_attn.out_proj",),
        mlp_inputs=("fc1",),
        mlp_outputs=("fc2",),
        norm="layer",
        check=_check,
    )
)
