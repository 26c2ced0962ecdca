"""Qwen1.5-MoE / Qwen2-MoE: routed experts plus a gated shared expert; optionally dense layers.

Readers of the normalised stream: the router, every routed expert's gate/up stack, the shared
expert's gate and up projections and the shared expert's sigmoid gate. Writers: the routed
experts' down stack and the shared expert's down projection. Layers listed in
``mlp_only_layers`` (or off the ``decoder_sparse_step``) hold a dense MLP instead, hence the
optional paths.
"""

from __future__ import annotations

from . import ArchSpec, register

QWEN2_MOE = register(
    ArchSpec(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        mlp_inputs=(
            "mlp.gate?",
            "mlp.experts.gate_up_proj?",
            "mlp.shared_expert.gate_proj?",
            "mlp.shared_expert.up_proj?",
            "mlp.shared_expert_gate?",
            "mlp.gate_proj?",
            "mlp.up_proj?",
        ),
        mlp_outputs=("mlp.experts.down_proj?", "mlp.shared_expert.down_proj?", "mlp.down_proj?"),
        mlp_preserves_width=True,
        experts="mlp.experts",
        expert_width_key="moe_intermediate_size",
    )
)
