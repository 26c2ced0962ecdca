"""The loop's connections (layer source and sink, covariance reduction, checkpoint) with trivial implementations.

Each protocol is exercised by a small implementation that records what the loop hands it; the
results must equal those of the default (in-memory, one-process) connections.
"""

from __future__ import annotations

import copy

import pytest
import torch

import slicegpt
from slicegpt.core.pca import Covariance
from slicegpt.core.streams import InMemorySink, InMemorySource, LocalReduction, LoopState, NoCheckpoint, Streams
from slicegpt.core.surgery import get_layers

from conftest import calib_rows, make_tiny

CONFIG = slicegpt.SliceConfig(sparsity=0.25, batch_size=4)
X = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))


class RecordingSource(InMemorySource):
    def __init__(self) -> None:
        self.asked: list[int] = []

    def layer(self, model, spec, index):
        self.asked.append(index)
        return super().layer(model, spec, index)


class RecordingSink(InMemorySink):
    def __init__(self) -> None:
        self.done_at: list[tuple[int, int]] = []

    def done(self, model, spec, index, block) -> None:
        super().done(model, spec, index, block)
        # a finished layer arrives sliced: its attention reads the kept width
        self.done_at.append((index, block.attention_module.q_proj.in_features))


class DoublingReduction(LocalReduction):
    """Stands in for an all-reduce over two ranks that hold the same rows: sums and counts double."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, cov: Covariance) -> Covariance:
        self.calls += 1
        doubled = Covariance(cov.sum.shape[0], cov.sum.device)
        doubled.sum, doubled.count = 2 * cov.sum, 2 * cov.count
        return doubled


class RecordingCheckpoint(NoCheckpoint):
    def __init__(self) -> None:
        self.states: list[LoopState] = []

    def after_layer(self, state: LoopState) -> None:
        self.states.append(LoopState(state.next_layer, state.q_prev.clone(), dict(state.spectra)))


def _sliced(streams: Streams | None = None) -> tuple[torch.nn.Module, slicegpt.SliceReport]:
    model = make_tiny("llama")
    report = slicegpt.slice_model(model, None, calib_rows(8), CONFIG, progress=False, streams=streams)
    return model, report


def test_connections_see_every_layer_in_order_and_change_nothing() -> None:
    ref_model, ref = _sliced()
    source, sink, reduce, ckpt = RecordingSource(), RecordingSink(), DoublingReduction(), RecordingCheckpoint()
    model, report = _sliced(Streams(source=source, sink=sink, reduce=reduce, checkpoint=ckpt))
    n = len(get_layers(model, slicegpt.arch.spec_for_config(model.config)))
    assert source.asked == list(range(n))
    assert sink.done_at == [(i, 48) for i in range(n)]
    # one reduction per PCA: the embedding, and each layer's mid and out (the last layer's out
    # stays full width for the head, so it needs none)
    assert reduce.calls == 1 + 2 * n - 1 == len(report.spectra)
    assert [s.next_layer for s in ckpt.states] == list(range(1, n + 1))
    assert all(s.q_prev.shape == (64, 64) for s in ckpt.states)
    assert set(ckpt.states[-1].spectra) == set(report.spectra)
    # doubling every sum and count leaves every mean covariance, hence every basis, as it was
    assert report.widths == ref.widths
    with torch.inference_mode():
        assert torch.allclose(model(input_ids=X).logits, ref_model(input_ids=X).logits, atol=1e-10)


def test_fixed_rotation_walk_needs_no_statistics() -> None:
    model = make_tiny("qwen2")
    q = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    reduce, ckpt = DoublingReduction(), RecordingCheckpoint()
    ref = copy.deepcopy(model)
    slicegpt.slice_model(
        model,
        None,
        None,
        slicegpt.SliceConfig(sparsity=0.0),
        rotation=slicegpt.core.pca.FixedRotation(q),
        progress=False,
        streams=Streams(reduce=reduce, checkpoint=ckpt),
    )
    assert reduce.calls == 0 and len(ckpt.states) == 3
    with torch.inference_mode():
        assert torch.allclose(model(input_ids=X).logits, ref(input_ids=X).logits, atol=1e-5)


def test_verify_refuses_a_fusion_that_changes_the_function(monkeypatch: pytest.MonkeyPatch) -> None:
    import slicegpt.core.slicing as slicing
    from slicegpt.core.pca import NumericalError

    model = make_tiny("llama")
    report = slicegpt.slice_model(
        model, None, calib_rows(8), slicegpt.SliceConfig(sparsity=0.25, batch_size=4), progress=False
    )
    assert report.verified is not None and report.verified < 1e-6
    summary = report.summary()
    assert len(summary["calibration_sha256"]) == 64 and set(summary["versions"]) == {
        "slicegpt",
        "torch",
        "transformers",
    }

    real = slicing.prepare

    def wrong_fold(model, spec):  # a spec that gets one norm's fold wrong, as a new family might
        real(model, spec)
        with torch.no_grad():
            slicing.get_layers(model, spec)[1].mlp.up_proj.weight.mul_(1.5)

    monkeypatch.setattr(slicing, "prepare", wrong_fold)
    with pytest.raises(NumericalError, match="no longer computes what it did"):
        slicegpt.slice_model(
            make_tiny("llama"), None, calib_rows(8), slicegpt.SliceConfig(sparsity=0.25, batch_size=4), progress=False
        )
    report = slicegpt.slice_model(
        make_tiny("llama"),
        None,
        calib_rows(8),
        slicegpt.SliceConfig(sparsity=0.25, batch_size=4, verify=False),
        progress=False,
    )
    assert report.verified is None
