"""Qwen3-MoE: routed experts (no shared expert), q/k norms per head; optionally dense layers."""

from __future__ import annotations

from . import ArchSpec, register

QWEN3_MOE = register(
    ArchSpec(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        mlp_inputs=("mlp.gate?", "mlp.experts.gate_up_proj?", "mlp.gate_proj?", "mlp.up_proj?"),
        mlp_outputs=("mlp.experts.down_proj?", "mlp.down_proj?"),
        mlp_preserves_width=True,
        experts="mlp.experts",
        expert_width_key="moe_intermediate_size",
    )
)
