"""The fast float32 products: set only inside a compression on the CPU, put back after, same model."""

from __future__ import annotations

import pytest
import torch

import slicegpt
from slicegpt.core import precision, slicing
from slicegpt.core.precision import asks_fast_float32, fast_float32

from conftest import calib_rows, make_tiny


def knob() -> str:
    return torch.backends.mkldnn.matmul.fp32_precision


@pytest.fixture
def bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a CPU with bfloat16 units, whatever this one has (the knob is set either way)."""
    monkeypatch.setattr(precision, "fast_float32_available", lambda: True)


def test_fast_float32_is_set_inside_and_restored_even_after_an_error(bf16_units: None) -> None:
    before = knob()
    with fast_float32(True) as on:
        assert on and knob() == "bf16"
    assert knob() == before
    with pytest.raises(RuntimeError, match="boom"):
        with fast_float32(True):
            raise RuntimeError("boom")
    assert knob() == before
    with fast_float32(False) as on:
        assert not on and knob() == before


def test_fast_float32_does_nothing_without_bfloat16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "fast_float32_available", lambda: False)
    before = knob()
    with fast_float32(True) as on:
        assert not on and knob() == before


def test_only_a_run_on_the_cpu_alone_uses_them() -> None:
    on = lambda **kw: asks_fast_float32(slicegpt.SliceConfig(sparsity=0.25, **kw))  # noqa: E731
    assert on(device="cpu")
    assert not on(device="cuda") and not on(device="cuda:1") and not on(device="cpu", device_map="auto")
    assert not on(device="cpu", fast_matmul=False)


@pytest.mark.parametrize("fast", [True, False])
def test_a_compression_runs_with_the_setting_asked_for_and_leaves_it_as_it_was(
    bf16_units: None, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    seen: list[str] = []
    walk = slicing.walk

    def watched(*args, **kwargs):
        seen.append(knob())
        return walk(*args, **kwargs)

    monkeypatch.setattr(slicing, "walk", watched)
    before = knob()
    model = make_tiny("llama", torch.float32)
    # verify off: the fixture forces the mode on whatever this CPU does in it (bfloat16 inputs on AMX)
    config = slicegpt.SliceConfig(sparsity=0.25, nsamples=8, seqlen=24, batch_size=4, fast_matmul=fast, verify=False)
    slicegpt.slice_model(model, None, calib_rows(), config, progress=False)
    assert seen == ["bf16" if fast else before] and knob() == before


def test_the_probe_tells_float32_from_products_rounded_to_bfloat16() -> None:
    assert precision.keeps_float32_accuracy(torch.matmul)
    assert precision.keeps_float32_accuracy(lambda a, b: (a.double() @ b.double()).float())
    assert not precision.keeps_float32_accuracy(lambda a, b: a.bfloat16().float() @ b.bfloat16().float())
    assert not precision.keeps_float32_accuracy(lambda a, b: torch.full((a.shape[0], b.shape[1]), float("nan")))


def test_inside_the_fast_mode_this_cpus_products_keep_float32_accuracy() -> None:
    """Whatever this CPU: where the mode is used, its products are float32's (an AMX Xeon's oneDNN
    rounds them to bfloat16 in it, so there the mode is not used), and the knob is put back."""
    before = knob()
    with fast_float32(True) as on:
        assert on == precision.fast_float32_available()
        assert precision.keeps_float32_accuracy(torch.matmul)
    assert knob() == before


def test_the_fast_products_give_the_same_model_to_float32_rounding() -> None:
    """Where this CPU's fast mode keeps float32 the two runs take different paths; either way the
    sliced models agree to float32's rounding (and the invariance check passes)."""
    ids = calib_rows(2, 24, seed=5)
    logits = []
    for fast in (False, True):
        model = make_tiny("llama", torch.float32)
        config = slicegpt.SliceConfig(sparsity=0.25, nsamples=8, seqlen=24, batch_size=4, fast_matmul=fast)
        slicegpt.slice_model(model, None, calib_rows(), config, progress=False)
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    scale = float(logits[0].abs().max())
    assert float((logits[0] - logits[1]).abs().max()) <= 1e-4 * scale


def test_the_command_line_turns_them_off() -> None:
    import argparse

    from slicegpt.cli.common import add_slice_config_arguments, slice_config_from_args

    p = argparse.ArgumentParser()
    add_slice_config_arguments(p)
    assert slice_config_from_args(p.parse_args([]), 0.25).fast_matmul is True
    assert slice_config_from_args(p.parse_args(["--no-fast-matmul"]), 0.25).fast_matmul is False
