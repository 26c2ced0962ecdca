"""The matrix-vector weight layout (slicegpt.core.layout): storage order changes, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import slicegpt
from slicegpt.evaluation.bench import BenchConfig, compare
from slicegpt.core.layout import apply_layout, use_matvec_layout

from conftest import VOCAB, calib_rows, make_tiny


def _sliced_llama(uniform: bool) -> nn.Module:
    model = make_tiny("llama", dtype=torch.float32)
    config = slicegpt.SliceConfig(sparsity=0.25, batch_size=4, uniform=uniform)
    slicegpt.slice_model(model, None, calib_rows(16), config, progress=False)
    return model


def _wide_output_linears(model: nn.Module) -> list[nn.Linear]:
    found: dict[int, nn.Linear] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features >= module.in_features:
            found.setdefault(id(module.weight), module)
    return list(found.values())


@pytest.mark.parametrize("kind", ["dense", "per-layer", "uniform"])
def test_matvec_layout_keeps_values_shapes_tying_and_logits(kind: str) -> None:
    model = make_tiny("llama", dtype=torch.float32) if kind == "dense" else _sliced_llama(kind == "uniform")
    ids = calib_rows(2, 12, seed=5)
    with torch.no_grad():
        before_logits = model(ids).logits
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tied_before = model.lm_head.weight is model.get_input_embeddings().weight
    wide = _wide_output_linears(model)
    assert wide, "a Llama has wide-output weights (q, gate/up, the head)"

    assert use_matvec_layout(model) == len(wide)

    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name  # same values and shapes
    for linear in wide:
        weight = linear.weight
        assert not weight.is_contiguous() and weight.t().is_contiguous()  # stored (in, out)
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features < module.in_features:
            assert module.weight.is_contiguous()  # wide-input weights keep rows
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied_before
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before_logits, rtol=1e-5, atol=1e-5)
    assert use_matvec_layout(model) == 0  # idempotent: nothing left to re-lay


@pytest.mark.parametrize("uniform", [False, True], ids=["per-layer", "uniform"])
def test_save_after_matvec_layout_round_trips(tmp_path: Path, uniform: bool) -> None:
    model = _sliced_llama(uniform=uniform)
    use_matvec_layout(model)
    ids = calib_rows(2, 12, seed=6)
    with torch.no_grad():
        expected = model(ids).logits
    slicegpt.save(model, tmp_path / "out")
    if uniform:  # a standard checkpoint: plain transformers reads it
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    else:
        loaded = slicegpt.load(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_bench_applies_the_layout_to_every_model_and_records_it() -> None:
    dense, sliced = make_tiny("llama", dtype=torch.float32), _sliced_llama(uniform=False)
    config = BenchConfig(
        prompt_len=8, gen_len=3, batch_sizes=(1,), repeats=1, warmup=0, layout="matvec", progress=False
    )
    result = compare(dense, sliced, VOCAB, config)
    assert result["config"]["layout"] == "matvec"
    for model in (dense, sliced):
        assert all(not linear.weight.is_contiguous() for linear in _wide_output_linears(model))
    assert result["results"][0]["measured_ratio"]["decode_tokens_per_s"] > 0


def test_unknown_layout_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="layout"):
        BenchConfig(layout="columns")
    with pytest.raises(ValueError, match="unknown weight layout 'columns'"):
        apply_layout(nn.Linear(2, 3), "columns")
