"""GPT-2: LayerNorm, learned positions (wpe), Conv1D weights stored (in, out), fused c_attn.

Conv1D is read through its transposed view (see ops), so the fused q/k/v projection is just one
reader and ``c_proj`` one writer. GPT-2's forward reshapes the final hidden states to the
width the embeddings produced, so the head is always sliced like the embeddings.
"""

from __future__ import annotations

from typing import Any

from . import ArchSpec, UnsupportedModelError, register


def _check(config: Any) -> None:
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError("GPT-2 with cross-attention (add_cross_attention=True) is not supported")


GPT2 = register(
    ArchSpec(
        name="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        final_norm="transformer.ln_f",
        attn="attn",
        attn_norm="ln_1",
        mlp_norm="ln_2",
        attn_inputs=("attn.c_attn",),
        attn_outputs=("attn.c_proj",),
        mlp_inputs=("mlp.c_fc",),
        mlp_outputs=("mlp.c_proj",),
        norm="layer",
        head_reads_embedding_width=True,
        check=_check,
    )
)
