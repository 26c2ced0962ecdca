"""Gemma 2 and Gemma 3 (text): four norms per layer, two of them on the branch outputs.

``pre_feedforward_layernorm`` is the MLP's input norm (folded as usual); the norms after
attention and after the MLP act on the branch outputs before the residual add. Those keep the
full width in the original basis and are followed by a projection into the rotated, sliced
stream (see ``SlicedBlock``): it costs D x d parameters per post-norm, two per layer. Gemma 3's
q/k norms act per head. Sliding-window and global layers receive different masks and rotary
tables, which the calibration loop captures per layer.
"""

from __future__ import annotations

from . import ArchSpec, register

GEMMA2 = register(
    ArchSpec(
        name="gemma2",
        model_types=("gemma2", "gemma3_text"),
        mlp_norm="pre_feedforward_layernorm",
        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        norm_weight_offset=1.0,
        bos_per_row=True,
    )
)
