"""Computational invariance, per family, in float64 on tiny random models.

Tolerance: the HF norms compute in float32 even for float64 inputs (they upcast to float32,
not to the input dtype), so the unchanged reference carries ~1e-7 relative error; our
weightless norms are exact. 1e-5 on logits of order 1 is far below anything slicing changes.
"""

from __future__ import annotations

import copy

import pytest
import torch

import slicegpt
from slicegpt.arch import spec_for_config
from slicegpt.slicing import FixedRotation
from slicegpt.surgery import prepare

from conftest import TINY_CONFIGS, calib_rows, make_tiny

FAMILIES = sorted(TINY_CONFIGS)
ATOL = 1e-5


def _inputs() -> torch.Tensor:
    return torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(7))


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=x, use_cache=False).logits


def _random_orthogonal(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


@pytest.mark.parametrize("family", FAMILIES)
def test_fusion_leaves_logits_unchanged(family: str) -> None:
    model = make_tiny(family)
    x = _inputs()
    ref = _logits(model, x)
    fused = copy.deepcopy(model)
    prepare(fused, spec_for_config(fused.config))
    out = _logits(fused, x)
    assert torch.allclose(out, ref, atol=ATOL), (out - ref).abs().max()
    # and the fusion really happened: no norm weights are left anywhere in the stream
    assert not any("layernorm" in n or n.endswith("norm.weight") and ".layers." in n and "q_norm" not in n and "k_norm" not in n
                   for n, _ in fused.named_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_random_rotation_leaves_logits_unchanged(family: str) -> None:
    model = make_tiny(family)
    x = _inputs()
    ref = _logits(model, x)
    hidden = model.config.hidden_size
    q = _random_orthogonal(hidden, seed=3)
    rotated = copy.deepcopy(model)
    slicegpt.slice_model(rotated, None, calib_rows(), slicegpt.SliceConfig(sparsity=0.0, batch_size=4),
                         rotation=FixedRotation(q), progress=False)
    # the weights really changed basis
    emb0 = model.get_input_embeddings().weight
    assert not torch.allclose(rotated.get_input_embeddings().weight, emb0)
    out = _logits(rotated, x)
    assert torch.allclose(out, ref, atol=ATOL), (out - ref).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_pca_rotation_unsliced_leaves_logits_unchanged(family: str) -> None:
    model = make_tiny(family)
    x = _inputs()
    ref = _logits(model, x)
    rotated = copy.deepcopy(model)
    report = slicegpt.slice_model(rotated, None, calib_rows(), slicegpt.SliceConfig(sparsity=0.0, batch_size=4), progress=False)
    assert report.widths.embedding == model.config.hidden_size
    assert any(b.attn_shortcut is not None for b in rotated.model.layers)
    out = _logits(rotated, x)
    assert torch.allclose(out, ref, atol=ATOL), (out - ref).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_slicing_changes_little_and_matches_metadata(family: str) -> None:
    model = make_tiny(family)
    sliced = copy.deepcopy(model)
    report = slicegpt.slice_model(sliced, None, calib_rows(16), slicegpt.SliceConfig(sparsity=0.25, batch_size=4), progress=False)
    d = int(0.75 * model.config.hidden_size) // 8 * 8
    meta = sliced.config.slicegpt
    assert meta["widths"]["embedding"] == d
    assert sliced.get_input_embeddings().weight.shape == (model.config.vocab_size, d)
    spec = spec_for_config(model.config)
    from slicegpt.surgery import attn_readers, attn_writers, get_layers, mlp_readers, mlp_writers

    for block, w in zip(get_layers(sliced, spec), meta["widths"]["layers"]):
        assert all(m.weight.shape[1] == w["d_in"] for m in attn_readers(block, spec))
        assert all(m.weight.shape[0] == w["d_mid"] for m in attn_writers(block, spec))
        assert all(m.weight.shape[1] == w["d_mid"] for m in mlp_readers(block, spec))
        assert all(m.weight.shape[0] == w["d_out"] for m in mlp_writers(block, spec))
        assert block.attn_shortcut.shape == (w["d_in"], w["d_mid"])
        assert block.mlp_shortcut.shape == (w["d_mid"], w["d_out"])
    # the last layer keeps the full width for the head unless --slice-head
    assert meta["widths"]["layers"][-1]["d_out"] == model.config.hidden_size
    assert sliced.get_output_embeddings().weight.shape[1] == model.config.hidden_size
    assert report.params_after == slicegpt.count_parameters(sliced) == meta["params_after"]
    x = _inputs()
    assert torch.isfinite(_logits(sliced, x)).all()
