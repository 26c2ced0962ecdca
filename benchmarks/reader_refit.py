"""Experiment: refit each branch's *readers* too, not only its writers.

The package's corrections refit a branch's writer (``o_proj``, ``down_proj``) so that the
compressed stream after the branch lands on the dense model's. The readers (q/k/v, gate/up) stay
the dense weights and read a stream that has drifted. This wraps the package's passes (this
process only) so that, before each writer refit, the branch's readers are refit by the same ridge
least squares toward the current weights, to give on the compressed stream what they give on the
dense one:

    min over W'  E || W' n(x_c) - W n(x_d) ||^2      (n: the block's weightless RMSNorm)

x_c the compressed stream the branch reads, x_d the dense model's at the same place (its layer
input for attention, its stream after attention for the MLP). The readers of one branch share
their input, so one set of [D, D] moments serves them all. Used by ``chat_smollm2.py
--reader-refit``; nothing here changes the package.
"""

from __future__ import annotations

from typing import Any

import torch


def refit_readers(block, names, norm, compressed, to_input, dense, held, device, record, point) -> None:
    """Refit the readers at ``names`` (one shared normed input) on the compressed stream toward
    their own output on the dense one; ``compressed``/``dense`` the per-batch streams (host)."""
    from slicegpt.core import ops
    from slicegpt.core import refit as moments_
    from slicegpt.core.capture import stream
    from slicegpt.core.surgery import weight_refs

    refs = weight_refs(block, names)
    mats = [ops.get_matrix(r) for r in refs]  # each (out_j, D), float64
    w0 = torch.cat(mats)  # (sum of outputs, D)
    moments = moments_.FitMoments.for_weight(refs[0].tensor)
    for i, x in stream(compressed, device):
        nc = norm(to_input(x))  # [B, T, D]
        target = norm(dense[i].to(device)).to(torch.float64) @ w0.t()  # [B, T, sum of outputs]
        moments.add(nc, target, i == held)
    # one process: no sums to combine across processes (corrections.combine would return at once)
    w, rel = moments_.refit(moments, w0, dtype=moments_.product_dtype(refs[0].tensor))
    start = 0
    for ref, m in zip(refs, mats):
        ops.set_matrix(ref, w[start : start + m.shape[0]])
        start += m.shape[0]
    record[point] = rel


def install() -> None:
    """Wrap the package's dense-layer, attention-refit and MLP-refit passes (this process only)."""
    from slicegpt.core import corrections

    dense_layer, refit_attention = corrections.dense_layer, corrections.refit_attention
    refit_mlp = corrections.refit_mlp
    mids: dict[int, list] = {}  # id(the dense layer's outputs) -> its stream after attention

    def dense_layer_kept(block, index, inputs, device) -> tuple[list, list]:
        mid, out = dense_layer(block, index, inputs, device)
        mids.clear()
        mids[id(out)] = mid
        return mid, out

    def refit_attention_with_readers(block, spec, index, inputs, to_input, targets, device, record, **k: Any):
        # inputs.reference is still this layer's dense input here (it moves on after the MLP)
        refit_readers(
            block, spec.attn_inputs, block.attn_norm, inputs.hidden, to_input,
            inputs.reference, inputs.held, device, record, f"layer.{index}.attn_in",
        )  # fmt: skip
        return refit_attention(block, spec, index, inputs, to_input, targets, device, record, **k)

    def refit_mlp_with_readers(block, spec, inputs, to_input, targets, keep, device, record, point, *a, **k):
        if targets is not None and id(targets) in mids and block.mlp_norm is not None:
            refit_readers(
                block, spec.mlp_inputs, block.mlp_norm, inputs.hidden, to_input,
                mids[id(targets)], inputs.held, device, record, f"{point}_in",
            )  # fmt: skip
        return refit_mlp(block, spec, inputs, to_input, targets, keep, device, record, point, *a, **k)

    corrections.dense_layer = dense_layer_kept
    corrections.refit_attention = refit_attention_with_readers
    corrections.refit_mlp = refit_mlp_with_readers
