"""``slicegpt inspect``'s figures: widths, parameters and FLOPs per layer of a sliced folder.

:func:`inspect_folder` reads no weights: both the sliced model and the dense one it came from
are built empty from the folder's config, so a 70B folder is inspected in seconds.
:func:`slicegpt.evaluation.markdown.format_inspect` prints the result.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import EvalConfig, parse_dtype
from ..core.surgery import count_parameters
from ..data import clip_seqlen
from ..io.folders import build_skeleton
from ..io.format import SPECTRA, is_standard, read_metadata
from .flops import find_decoder_layers, flops_breakdown, layer_flops, layer_shortcuts

_EVAL = EvalConfig()


def _empty_model(config: Any) -> nn.Module:
    """A model of ``config`` on the meta device: shapes only, no memory, no file read.

    Built under ``torch.device("meta")`` rather than accelerate's ``init_empty_weights``, because
    the latter leaves tied embeddings untied (transformers 5), which would count them twice.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def inspect_folder(folder: str | os.PathLike[str], *, seq_len: int = _EVAL.seqlen) -> dict[str, Any]:
    """Widths, parameters and FLOPs per token of every layer of a sliced folder, and of its dense source.

    Both models are built with empty (meta) weights from the folder's config: the sliced one as
    :func:`slicegpt.load` builds it, the dense one from the same config at full width, so even a
    70B folder is inspected in seconds without reading its weights. FLOPs follow
    :func:`slicegpt.evaluation.flops.flops_breakdown` at a context of ``seq_len`` tokens (clipped to the model's).
    """
    from transformers import AutoConfig

    path = Path(folder)
    meta = read_metadata(path)
    standard = is_standard(meta)
    config = AutoConfig.from_pretrained(path)
    widths = meta["widths"]
    if standard:
        sliced = _empty_model(config)
        dense_config = copy.deepcopy(config)
        # A uniform folder is its family's standard checkpoint at hidden_size d (and, with MLP
        # neurons pruned, a smaller intermediate size); the dense model is the source's config,
        # recorded where it differs. head_dim is explicit in the config, so it stays.
        dense_config.hidden_size = int(widths["hidden"])
        for key, value in ((meta.get("standard_config") or {}).get("source") or {}).items():
            setattr(dense_config, key, value)
    else:
        sliced = build_skeleton(config, parse_dtype(meta.get("dtype", "float32")))
        dense_config = copy.deepcopy(config)
        for key in ("slicegpt", "auto_map"):
            if hasattr(dense_config, key):
                delattr(dense_config, key)
    dense = _empty_model(dense_config)
    seq = clip_seqlen(dense, seq_len)

    totals = {}
    for label, model in (("sliced", sliced), ("dense", dense)):
        breakdown = flops_breakdown(model, seq)
        totals[label] = {
            "params": count_parameters(model),
            "flops": float(sum(breakdown.values())),
            "flops_breakdown": breakdown,
        }
    # A per-layer folder's config says tie_word_embeddings=False (slicing unties them), so a dense
    # model built from it counts a tied source's embedding twice. The count recorded at slicing time
    # is the source as shipped; it is the reference wherever present. FLOPs do not depend on tying.
    recorded_before = meta.get("params_before")
    dense_params_source = "counted from the config"
    if isinstance(recorded_before, int) and recorded_before > 0:
        totals["dense"]["params"] = recorded_before
        dense_params_source = "recorded at slicing time"
    s_layers, d_layers = find_decoder_layers(sliced), find_decoder_layers(dense)
    variance = meta.get("variance_kept") or {}
    layers = []
    for i, (ls, ld) in enumerate(zip(s_layers, d_layers)):
        w = widths["layers"][i]
        shortcuts = layer_shortcuts(ls)
        layers.append(
            {
                "layer": i,
                "d_in": w["d_in"],
                "d_mid": w["d_mid"],
                "d_out": w["d_out"],
                "mlp_neurons": w.get("mlp"),
                # From the layout itself: a uniform folder's widths carry the flags, but its shared
                # basis made every shortcut the identity, so none was stored.
                "attn_shortcut": "attn_shortcut" in shortcuts,
                "mlp_shortcut": "mlp_shortcut" in shortcuts,
                "variance_kept_mid": variance.get(f"layer.{i}.mid"),
                "variance_kept_out": variance.get(f"layer.{i}.out"),
                "params": count_parameters(ls),
                "params_dense": count_parameters(ld),
                "flops": layer_flops(ls, config, seq),
                "flops_dense": layer_flops(ld, dense_config, seq),
            }
        )
    rest = {
        "params": totals["sliced"]["params"] - sum(l["params"] for l in layers),
        "params_dense": totals["dense"]["params"] - sum(l["params_dense"] for l in layers),
        "flops": totals["sliced"]["flops"] - sum(l["flops"] for l in layers),
        "flops_dense": totals["dense"]["flops"] - sum(l["flops_dense"] for l in layers),
    }
    spectra_file = path / SPECTRA
    return {
        "folder": str(path),
        "source_model": meta.get("source_model"),
        "model_type": meta.get("model_type"),
        "mode": meta.get("mode"),
        "sparsity": (meta.get("settings") or {}).get("sparsity"),
        "target_params": meta.get("target_params"),
        "dtype": meta.get("dtype"),
        "seq_len": seq,
        "hidden": widths["hidden"],
        "embedding_width": widths["embedding"],
        "head_width": widths["layers"][-1]["d_out"] if widths["layers"] else widths["embedding"],
        "layers": layers,
        "rest": rest,
        "params": totals["sliced"]["params"],
        "params_dense": totals["dense"]["params"],
        "params_dense_source": dense_params_source,
        "standard_checkpoint": standard,
        "params_before_recorded": meta.get("params_before"),
        "params_after_recorded": meta.get("params_after"),
        "flops": totals["sliced"]["flops"],
        "flops_dense": totals["dense"]["flops"],
        "flops_breakdown": totals["sliced"]["flops_breakdown"],
        "flops_breakdown_dense": totals["dense"]["flops_breakdown"],
        "share_params_removed": 1.0 - totals["sliced"]["params"] / totals["dense"]["params"],
        "share_flops_removed": 1.0 - totals["sliced"]["flops"] / totals["dense"]["flops"],
        "spectra_file": str(spectra_file) if spectra_file.is_file() else None,
    }
