"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama layout with fused qkv_proj and gate_up_proj.

A fused projection reads the stream along its input axis like any other: fusion only changes
its output axis, which slicing never touches.
"""

from __future__ import annotations

from . import ArchSpec, register

PHI3 = register(
    ArchSpec(
        name="phi3",
        model_types=("phi3",),
        attn_inputs=("self_attn.qkv_proj",),
        mlp_inputs=("mlp.gate_up_proj",),
    )
)
