"""--device-map: one process, the model's layers spread over several devices.

This machine has no GPU, so the devices are named 'cpu,cpu': the model is then dispatched with
accelerate's hooks exactly as over 'cuda:0,cuda:1' (the same code path, other names), and the
maps for real GPU names are checked against accelerate without moving anything.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import check_device_map

import slicegpt
from slicegpt.arch import spec_for_config
from slicegpt.cli import main
from slicegpt.config import SliceConfig, parse_device_map
from slicegpt.core import placement
from slicegpt.core.placement import dispatch, is_dispatched, layer_devices, module_map, spread, undispatch
from slicegpt.core.slicing import slice_model
from slicegpt.core.surgery import get_layers

from conftest import TINY_CONFIGS, calib_rows, make_tiny


def test_device_map_settings_parse_or_fail_in_one_line() -> None:
    assert parse_device_map(None) is None
    assert parse_device_map("auto") == "auto"
    assert parse_device_map(" cuda:0, cuda:1 ") == ("cuda:0", "cuda:1")
    for bad in ("", " , ", "gpu0", "cuda:0,tpu"):
        with pytest.raises(ValueError, match="device"):
            parse_device_map(bad)
    with pytest.raises(ValueError, match="device"):
        SliceConfig(device_map="nonsense")


def test_layers_are_spread_evenly_in_contiguous_runs() -> None:
    a, b, c = (torch.device("cuda", i) for i in range(3))
    assert spread(7, [a, b, c]) == [a, a, a, b, b, c, c]
    assert spread(2, [a, b, c]) == [a, b]
    for n in range(1, 40):
        for k in range(1, 6):
            devs = [torch.device("cuda", i) for i in range(k)]
            out = spread(n, devs)
            sizes = [out.count(d) for d in devs]
            assert len(out) == n and max(sizes) - min(sizes) <= 1
            assert [devs.index(d) for d in out] == sorted(devs.index(d) for d in out)  # in order, contiguous


def test_auto_follows_the_models_own_device_map_and_needs_cuda_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_tiny("llama")
    spec = spec_for_config(model.config)
    with pytest.raises(ValueError, match="CUDA"):
        layer_devices(model, spec, "auto", "cpu")  # no GPU here, and no map of its own
    # A model loaded with device_map=...: its entries may name a parent module, a CUDA index, the host.
    model.hf_device_map = {
        "model.embed_tokens": 0,
        "model.layers.0": 0,
        "model.layers.1": 1,
        "model.layers.2": "cpu",
        "model.norm": "cpu",
        "lm_head": 0,
    }
    monkeypatch.setattr(placement, "check_device", torch.device)  # (the CUDA devices named are not on this machine)
    assert layer_devices(model, spec, "auto", "cpu") == [
        torch.device("cuda", 0),
        torch.device("cuda", 1),
        torch.device("cpu"),
    ]
    model.hf_device_map = {"model": "disk", "lm_head": "cpu"}  # offloaded to disk: read back to the host
    assert layer_devices(model, spec, "auto", "cpu") == [torch.device("cpu")] * 3
    assert layer_devices(model, spec, None, "cpu") == [torch.device("cpu")] * 3


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_the_module_map_places_every_weight_of_every_family(family: str) -> None:
    model = make_tiny(family)
    spec = spec_for_config(model.config)
    n = len(get_layers(model, spec))
    devices = spread(n, [torch.device("cuda", 0), torch.device("cuda", 1)])
    placed = module_map(model, spec, devices)
    check_device_map(model, placed)  # accelerate's own check: every parameter and buffer is placed
    assert [placed[f"{spec.layers}.{i}"] for i in range(n)] == [str(d) for d in devices]
    for path in spec.embeddings:
        assert placed[path] == "cuda:0"
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert placed[spec.head] == ("cuda:0" if tied else str(devices[-1]))


@pytest.mark.parametrize(
    "kind", [dict(sparsity=0.25), dict(target_params=0.8, uniform=False), dict(target_params=0.8, uniform=True)]
)
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2_moe"])
def test_slicing_over_a_device_map_equals_one_device(family: str, kind: dict) -> None:
    one, spread_model = make_tiny(family), make_tiny(family)
    rows = calib_rows()
    settings = dict(nsamples=8, seqlen=24, batch_size=4, **kind)
    r1 = slice_model(one, None, rows, SliceConfig(**settings), progress=False)
    r2 = slice_model(spread_model, None, rows, SliceConfig(device_map="cpu,cpu", **settings), progress=False)
    assert r2.widths == r1.widths and r2.params_after == r1.params_after
    assert is_dispatched(spread_model) and not is_dispatched(one)
    spec = spec_for_config(spread_model.config)
    assert {f"{spec.layers}.{i}" for i in range(len(get_layers(spread_model, spec)))} <= set(spread_model.hf_device_map)
    ids = calib_rows(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(spread_model(input_ids=ids).logits, one(input_ids=ids).logits)


def test_each_layer_is_processed_on_its_device_and_stays_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """'cpu:0' and 'cpu:1' are one host, but distinct names: every move of a layer is recorded. (accelerate
    cannot dispatch over such names, so the final dispatch is recorded instead of run.)"""
    from slicegpt.core import slicing
    from slicegpt.core.modules import SlicedBlock

    moves: list = []
    to = SlicedBlock.to
    monkeypatch.setattr(SlicedBlock, "to", lambda self, *a, **k: moves.append(str(a[0])) or to(self, *a, **k))
    monkeypatch.setattr(
        slicing, "dispatch", lambda model, spec, devices: moves.append(("dispatch", [str(d) for d in devices]))
    )
    settings = dict(nsamples=8, seqlen=24, batch_size=4)
    slice_model(make_tiny("llama"), None, calib_rows(), SliceConfig(sparsity=0.25, **settings), progress=False)
    assert moves == ["cpu"] * 6  # one device: each layer there and back to the host
    moves.clear()
    slice_model(
        make_tiny("llama"),
        None,
        calib_rows(),
        SliceConfig(sparsity=0.25, device_map="cpu:0,cpu:1", **settings),
        progress=False,
    )
    assert moves == ["cpu:0", "cpu:0", "cpu:1", ("dispatch", ["cpu:0", "cpu:0", "cpu:1"])]
    moves.clear()
    # uniform mode's statistics-only walk gives each layer back to the host; the slicing walk keeps it
    slice_model(
        make_tiny("llama"),
        None,
        calib_rows(),
        SliceConfig(sparsity=0.25, uniform=True, device_map="cpu:0,cpu:1", **settings),
        progress=False,
    )
    assert moves == [
        "cpu:0",
        "cpu",
        "cpu:0",
        "cpu",
        "cpu:1",
        "cpu",
        "cpu:0",
        "cpu:0",
        "cpu:1",
        ("dispatch", ["cpu:0", "cpu:0", "cpu:1"]),
    ]


def test_a_model_loaded_over_devices_is_sliced_where_it_lives(tmp_path: Path) -> None:
    ref, model = make_tiny("llama"), make_tiny("llama")
    spec = spec_for_config(model.config)
    dispatch(model, spec, [torch.device("cpu")] * 3)  # as from_pretrained(device_map=...) leaves it
    rows = calib_rows()
    with pytest.raises(ValueError, match="device_map='auto'"):
        slice_model(copy.deepcopy(model), None, rows, SliceConfig(nsamples=8, seqlen=24, batch_size=4), progress=False)
    settings = dict(nsamples=8, seqlen=24, batch_size=4, sparsity=0.25)
    slice_model(ref, None, rows, SliceConfig(**settings), progress=False)
    slice_model(model, None, rows, SliceConfig(device_map="auto", **settings), progress=False)
    ids = calib_rows(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    # The dispatched result saves and loads back as the same model, in plain memory.
    slicegpt.save(model, tmp_path / "out")
    back = slicegpt.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, ref(input_ids=ids).logits)
    undispatch(model)
    assert not is_dispatched(model) and all(p.device.type == "cpu" for p in model.parameters())


def test_offloaded_weights_are_refused_in_one_line() -> None:
    model = make_tiny("llama")
    model.lm_head.weight = torch.nn.Parameter(torch.empty(model.lm_head.weight.shape, device="meta"))
    with pytest.raises(ValueError, match="not in memory"):
        undispatch(model)


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_cli_slices_and_evaluates_over_a_device_map(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    corpus = str(tiny_model_dir / "corpus.txt")
    common = [
        "--calib",
        corpus,
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--batch-size",
        "2",
        "--ppl",
        corpus,
        "--eval-seqlen",
        "32",
    ]
    code, err = _cli(
        capsys,
        "slice",
        str(tiny_model_dir / "model"),
        "--sparsity",
        "0.25",
        *common,
        "--out",
        str(tmp_path / "one"),
        "--json",
        str(tmp_path / "one.json"),
    )
    assert code == 0, err
    code, err = _cli(
        capsys,
        "slice",
        str(tiny_model_dir / "model"),
        "--sparsity",
        "0.25",
        *common,
        "--device-map",
        "cpu,cpu",
        "--out",
        str(tmp_path / "map"),
        "--json",
        str(tmp_path / "map.json"),
    )
    assert code == 0, err
    one, spread_run = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "map"))
    for key in ("dense_perplexity", "sliced_perplexity"):
        assert spread_run[key]["perplexity"] == one[key]["perplexity"]
    assert spread_run["settings"]["device_map"] == "cpu,cpu"
    code, err = _cli(
        capsys,
        "eval",
        str(tmp_path / "map"),
        "--ppl",
        corpus,
        "--seqlen",
        "32",
        "--device-map",
        "cpu,cpu",
        "--json",
        str(tmp_path / "e.json"),
    )
    assert code == 0, err
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["perplexity"]["perplexity"] == pytest.approx(one["sliced_perplexity"]["perplexity"], rel=1e-6)
    assert "model.layers.2" in ev["device_map"]


def test_cli_device_map_errors_are_one_line(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    model = str(tiny_model_dir / "model")
    code, err = _cli(
        capsys,
        "slice",
        model,
        "--sparsity",
        "0.25",
        "--device-map",
        "auto",
        "--calib",
        str(tiny_model_dir / "corpus.txt"),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--out",
        str(tmp_path / "x"),
    )
    assert code == 2 and err.strip().splitlines()[-1].startswith("slicegpt: error: ") and "CUDA" in err
    assert not (tmp_path / "x").exists()
    code, err = _cli(
        capsys,
        "slice",
        model,
        "--sparsity",
        "0.25",
        "--device-map",
        "cpu,cpu",
        "--stream",
        "on",
        "--out",
        str(tmp_path / "y"),
    )
    assert code == 2 and "--device-map" in err.strip().splitlines()[-1]
