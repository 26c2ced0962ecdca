"""Computational invariance, per family, in float64 on tiny random models.

Tolerance: the HF RMSNorms compute in float32 even for float64 inputs (they upcast to float32,
not to the input dtype), so the unchanged reference of an RMSNorm family carries ~1e-7 relative
error; our weightless norms are exact (LayerNorm families agree to ~1e-15). 1e-5 on logits of
order 1 is far below anything slicing changes, and far below what one forgotten reader or
writer costs (~1e-2 and more).
"""

from __future__ import annotations

import copy

import pytest
import torch

import slicegpt
from slicegpt.arch import UnsupportedModelError, spec_for_config, supported_architectures
from slicegpt.core.modules import SlicedBlock, WeightlessRMSNorm
from slicegpt.core.capture import capture_layer_inputs
from slicegpt.core.pca import FixedRotation
from slicegpt.data import Rows
from slicegpt.io.format import build_metadata
from slicegpt.core.surgery import (
    attn_readers,
    attn_writers,
    get_layers,
    get_path,
    mlp_readers,
    mlp_writers,
    prepare,
    weight_refs,
)

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


def test_every_family_is_listed() -> None:
    # Both ways: every tiny config is a supported family, and every registered family has a tiny config.
    types = {getattr(__import__("transformers"), cls)().model_type for cls, _ in TINY_CONFIGS.values()}
    assert types == set(supported_architectures())


@pytest.mark.parametrize("family", FAMILIES)
def test_fusion_leaves_logits_unchanged(family: str) -> None:
    model = make_tiny(family)
    x = _inputs()
    ref = _logits(model, x)
    fused = copy.deepcopy(model)
    spec = spec_for_config(fused.config)
    prepare(fused, spec)
    out = _logits(fused, x)
    assert torch.allclose(out, ref, atol=ATOL), (out - ref).abs().max()
    # and the fusion really happened: every block rewired, no norm of the stream left with weights
    layers = get_layers(fused, spec)
    assert all(isinstance(b, SlicedBlock) for b in layers)
    assert type(get_path(fused, spec.final_norm)) is WeightlessRMSNorm
    names = {n for n, _ in fused.named_parameters()}
    norms = [spec.attn_norm, spec.mlp_norm, *(spec.post_norms or ())]
    left = [
        n
        for n in names
        for i in range(len(layers))
        for norm in norms
        if norm and n.startswith(f"{spec.layers}.{i}.{norm}.")
    ]
    assert not left and not any(n.startswith(spec.final_norm + ".") for n in names), left


@pytest.mark.parametrize("family", FAMILIES)
def test_random_rotation_leaves_logits_unchanged(family: str) -> None:
    model = make_tiny(family)
    x = _inputs()
    ref = _logits(model, x)
    hidden = model.config.hidden_size
    q = _random_orthogonal(hidden, seed=3)
    rotated = copy.deepcopy(model)
    slicegpt.slice_model(
        rotated,
        None,
        calib_rows(),
        slicegpt.SliceConfig(sparsity=0.0, batch_size=4),
        rotation=FixedRotation(q),
        progress=False,
    )
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
    report = slicegpt.slice_model(
        rotated, None, calib_rows(), slicegpt.SliceConfig(sparsity=0.0, batch_size=4), progress=False
    )
    assert report.widths.embedding == model.config.hidden_size
    assert any(b.attn_shortcut is not None for b in get_layers(rotated, spec_for_config(rotated.config)))
    out = _logits(rotated, x)
    assert torch.allclose(out, ref, atol=ATOL), (out - ref).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_slicing_changes_little_and_matches_metadata(family: str) -> None:
    model = make_tiny(family)
    D = model.config.hidden_size
    sliced = copy.deepcopy(model)
    report = slicegpt.slice_model(
        sliced, None, calib_rows(16), slicegpt.SliceConfig(sparsity=0.25, batch_size=4), progress=False
    )
    d = int(0.75 * D) // 8 * 8
    meta = build_metadata(report)
    assert meta["widths"]["embedding"] == d
    spec = spec_for_config(model.config)
    for path in spec.embeddings:  # token and learned position embeddings
        assert get_path(sliced, path).weight.shape[1] == d
    parallel = spec.topology == "parallel"
    for block, w in zip(get_layers(sliced, spec), meta["widths"]["layers"]):
        attn_out = w["d_out"] if parallel else w["d_mid"]
        assert all(r.in_dim == w["d_in"] for r in attn_readers(block, spec))
        assert all(r.out_dim == attn_out for r in attn_writers(block, spec))
        assert all(r.in_dim == w["d_mid"] for r in mlp_readers(block, spec))
        assert all(r.out_dim == w["d_out"] for r in mlp_writers(block, spec))
        assert block.attn_shortcut.shape == (w["d_in"], attn_out)
        if parallel:  # one shortcut per parallel block
            assert block.mlp_shortcut is None
        else:
            assert block.mlp_shortcut.shape == (w["d_mid"], w["d_out"])
        if spec.mlp_preserves_width:
            assert w["d_mid"] == w["d_out"]
        if spec.post_norms:
            # the branches' own output projections stay full width; the projections after the
            # post-norms carry D -> sliced width
            assert all(r.out_dim == D for r in weight_refs(block, spec.attn_outputs + spec.mlp_outputs))
            assert block.attn_post_proj.weight.shape == (attn_out, D)
            assert block.mlp_post_proj.weight.shape == (w["d_out"], D)
    # the last layer keeps the full width for the head unless --slice-head (or the family's
    # forward needs the head at the embeddings' width)
    head = d if spec.head_reads_embedding_width else D
    assert meta["widths"]["layers"][-1]["d_out"] == head
    assert sliced.get_output_embeddings().weight.shape[1] == head
    assert report.params_after == slicegpt.count_parameters(sliced) == meta["params_after"]
    x = _inputs()
    ref, out = _logits(model, x), _logits(sliced, x)
    assert torch.isfinite(out).all()
    # random weights have no low-rank structure to exploit, but 25% must not destroy the model
    assert (out - ref).abs().mean() < ref.abs().mean()
    # The sliced weights are ordinary tensors that autograd can use (recovery fine-tuning),
    # not inference-mode tensors.
    assert not any(p.is_inference() for p in sliced.parameters())
    for p in sliced.parameters():
        p.requires_grad_(True)
    sliced(x).logits.float().square().mean().backward()
    first = get_layers(sliced, spec)[0]
    for trained in (sliced.get_input_embeddings().weight, first.attn_shortcut):
        assert trained.grad is not None and trained.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_each_layer_gets_its_own_arguments(family: str) -> None:
    """Sliding-window and global layers get different masks: calibration must see each layer's own."""
    model = make_tiny(family)
    spec = spec_for_config(model.config)
    x = calib_rows(2, 20)
    seen: list[dict] = []
    hooks = [
        layer.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw), with_kwargs=True)
        for layer in get_layers(model, spec)
    ]
    with torch.inference_mode():
        model(input_ids=x, use_cache=False)
    for h in hooks:
        h.remove()
    captured = capture_layer_inputs(model, spec, Rows(x), batch_size=2, device=torch.device("cpu"))
    assert len(captured.calls[0]) == len(seen)

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a.shape == b.shape and torch.equal(a, b)
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
            return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
        return a is b or a == b

    calls = [captured.layer_call(i, 0, torch.device("cpu"))[1] for i in range(len(seen))]
    for call, real in zip(calls, seen):
        assert call.keys() == real.keys()
        assert all(same(call[k], real[k]) for k in real), [k for k in real if not same(call[k], real[k])]
    # the test model mixes layer kinds, so some layer's arguments differ from layer 0's
    assert any(not same(calls[0]["attention_mask"], c["attention_mask"]) for c in calls[1:])
    # the model's layers are back in place
    assert not any(type(layer).__name__ == "_Recorder" for layer in get_layers(model, spec))


def test_gpt_neox_topology_follows_the_config() -> None:
    assert spec_for_config(make_tiny("gpt_neox").config).topology == "parallel"
    assert spec_for_config(make_tiny("gpt_neox_sequential").config).topology == "sequential"


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        ("OPTConfig", dict(do_layer_norm_before=False), "do_layer_norm_before=False"),
        ("OPTConfig", dict(word_embed_proj_dim=32, hidden_size=64), "project_in/project_out"),
        ("GPT2Config", dict(add_cross_attention=True), "cross-attention"),
    ],
)
def test_unsupported_variants_are_refused_in_one_line(cls: str, kwargs: dict, message: str) -> None:
    import transformers

    with pytest.raises(UnsupportedModelError, match=message) as info:
        spec_for_config(getattr(transformers, cls)(**kwargs))
    assert "\n" not in str(info.value)
