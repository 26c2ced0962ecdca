"""GPT-J: LayerNorm, parallel attention and MLP under one norm, head with a bias."""

from __future__ import annotations

from . import ArchSpec, register

GPTJ = register(
    ArchSpec(
        name="gptj",
        model_types=("gptj",),
        layers="transformer.h",
        embeddings=("transformer.wte",),
        final_norm="transformer.ln_f",
        attn="attn",
        attn_norm="ln_1",
        mlp_norm=None,
        attn_inputs=("attn.q_proj", "attn.k_proj", "attn.v_proj"),
        attn_outputs=("attn.out_proj",),
        mlp_inputs=("mlp.fc_in",),
        mlp_outputs=("mlp.fc_out",),
        topology="parallel",
        norm="layer",
    )
)
