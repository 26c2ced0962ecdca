"""Phi-1/1.5/2: LayerNorm with biases, parallel attention and MLP under one norm, head with a bias.

The optional q/k LayerNorms (``qk_layernorm``) act per head inside attention, on widths that
slicing never touches.
"""

from __future__ import annotations

from . import ArchSpec, register

PHI = register(
    ArchSpec(
        name="phi",
        model_types=("phi",),
        final_norm="model.final_layernorm",
        mlp_norm=None,
        attn_outputs=("self_attn.dense",),
        mlp_inputs=("mlp.fc1",),
        mlp_outputs=("mlp.fc2",),
        topology="parallel",
        norm="layer",
    )
)
