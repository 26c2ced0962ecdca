"""GPT-NeoX (Pythia, ...): LayerNorm, fused query_key_value; parallel or sequential by config.

With ``use_parallel_residual`` attention and MLP read two norms of the same x and add into one
residual (parallel topology, one shortcut); without it the block is sequential.
"""

from __future__ import annotations

from . import ArchSpec, register

GPT_NEOX = register(
    ArchSpec(
        name="gpt_neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        embeddings=("gpt_neox.embed_in",),
        final_norm="gpt_neox.final_layer_norm",
        attn="attention",
        attn_inputs=("attention.query_key_value",),
        attn_outputs=("attention.dense",),
        mlp_inputs=("mlp.dense_h_to_4h",),
        mlp_outputs=("mlp.dense_4h_to_h",),
        topology_for=lambda config: "parallel" if getattr(config, "use_parallel_residual", True) else "sequential",
        norm="layer",
    )
)
