"""Mixtral: sparse MoE MLP with fused expert stacks.

The router (``mlp.gate``, weight [E, H]) and every expert's gate/up stack
(``mlp.experts.gate_up_proj``, [E, 2I, H]) read the normalised stream; every expert's down stack
(``mlp.experts.down_proj``, [E, H, I]) writes it. The MoE block allocates its output like its
input, hence ``mlp_preserves_width``.
"""

from __future__ import annotations

from . import ArchSpec, register

MIXTRAL = register(
    ArchSpec(
        name="mixtral",
        model_types=("mixtral",),
        mlp_inputs=("mlp.gate", "mlp.experts.gate_up_proj"),
        mlp_outputs=("mlp.experts.down_proj",),
        mlp_preserves_width=True,
        experts="mlp.experts",
    )
)
