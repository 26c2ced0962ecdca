"""Distributed calibration: two CPU processes under torchrun (gloo) slice as one process does.

The rows are shared by whole batches, every statistic summed over rows is all-reduced and every
decision broadcast, so two processes must give one process's widths and, up to the order float64
sums are added in, its logits; and both processes must end with the same model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slicegpt
from slicegpt.cli import main
from slicegpt.core.distributed import Launch, launch_from_env, process_device, shard_rows
from slicegpt.core.pca import Covariance
from slicegpt.core.streams import LocalReduction
from slicegpt.data import Rows

import distributed_worker
from conftest import calib_rows

TESTS = Path(__file__).resolve().parents[1]  # the tests root: conftest, the torchrun worker
SRC = Path(slicegpt.__file__).parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a test run itself under torchrun must not leak its place into the children
    return env


def _torchrun(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *argv],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- rows and devices -------------------------------------------------------------------------


def test_shards_are_whole_contiguous_batches_covering_every_row_once() -> None:
    rows = Rows(torch.arange(11).unsqueeze(1), torch.ones(11, 1, dtype=torch.long))
    for world in (1, 2, 3, 6):
        shards = [shard_rows(rows, 2, r, world) for r in range(world)]
        assert torch.equal(torch.cat([s.input_ids for s, _ in shards]), rows.input_ids)
        assert torch.equal(torch.cat([s.attention_mask for s, _ in shards]), rows.attention_mask)
        assert [b for _, batches in shards for b in batches] == list(range(6))
        for shard, batches in shards:  # each shard's own batches are the global batches it says
            assert len(shard) > 0 and shard.input_ids[0, 0] == 2 * batches[0]
    # the one-process share is everything
    assert LocalReduction().share(rows, 2) == (rows, range(6))


def test_too_few_batches_for_the_processes_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="make 2 batch\\(es\\) for 3 processes"):
        shard_rows(Rows(torch.zeros(4, 3, dtype=torch.long)), 2, 0, 3)


def test_place_and_device_from_torchrun_environment() -> None:
    assert launch_from_env({}) is None and launch_from_env({"WORLD_SIZE": "1"}) is None
    launch = launch_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert launch == Launch(rank=3, world=4, local_rank=1, local_world=2)
    with pytest.raises(ValueError, match="torchrun"):
        launch_from_env({"WORLD_SIZE": "2"})
    assert process_device("cpu", launch) == "cpu" and process_device("cuda", launch) == "cuda:1"
    with pytest.raises(ValueError, match="`device=cuda`"):
        process_device("cuda:0", launch)
    with pytest.raises(ValueError, match="cpu \\(gloo\\) or cuda"):
        process_device("mps", launch)


def test_local_reduction_is_the_identity() -> None:
    local = LocalReduction()
    cov = Covariance(3)
    cov.add(torch.randn(4, 3), None)
    before = cov.sum.clone()
    t = torch.ones(2)
    local.sum_([t])
    assert local(cov) is cov and torch.equal(cov.sum, before) and cov.count == 4
    assert torch.equal(t, torch.ones(2)) and local.agree(t) is t and local.processes == 1


# --- two processes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    done = _torchrun(str(TESTS / "distributed_worker.py"), str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_reduction_on_tensors(two_ranks: list[dict]) -> None:
    for r, result in enumerate(two_ranks):
        red = result["reduction"]
        assert red["world"] == 2
        assert torch.equal(red["summed"], torch.full((2, 3), 3.0, dtype=torch.float64))  # 1 + 2
        assert torch.equal(red["strided"], 2 * torch.arange(6, dtype=torch.float64).reshape(3, 2).t())
        assert torch.equal(red["agreed"], torch.zeros(4, dtype=torch.float64))  # rank 0's
        rows = torch.cat([torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(10 + k)) for k in range(2)])
        whole = Covariance(4)
        whole.add(rows, None)
        assert red["count"] == whole.count == 20
        assert torch.allclose(red["cov"], whole.sum, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", list(distributed_worker.CASES))
def test_two_processes_slice_as_one_does(two_ranks: list[dict], case: str) -> None:
    one = distributed_worker.slice_case(case, None)
    rank0, rank1 = two_ranks[0][case], two_ranks[1][case]
    assert rank0["widths"] == rank1["widths"] == one["widths"]
    # every decision was broadcast: both processes built the very same model
    assert torch.equal(rank0["logits"], rank1["logits"])
    # the same ridge strengths, chosen on the same held-out rows
    assert rank0["refits"] == one["refits"]
    scale = one["logits"].abs().max()
    assert float((rank0["logits"] - one["logits"]).abs().max() / scale) < 1e-9


def test_torchrun_slice_command(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The command under torchrun: rank 0 alone prints and writes; the model is one process's."""
    corpus = str(tiny_model_dir / "corpus.txt")
    common = [
        "slice",
        str(tiny_model_dir / "model"),
        "--calib",
        corpus,
        "--nsamples",
        "6",
        "--seqlen",
        "32",
        "--batch-size",
        "2",
        "--per-layer",
        "--target-params",
        "0.8",
    ]
    done = _torchrun("-m", "slicegpt", *common, "--out", str(tmp_path / "two"), "--json", str(tmp_path / "two.json"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("| parameters |") == 1  # one table: the other process printed nothing
    assert "slicegpt: error" not in done.stderr
    assert main([*common, "--out", str(tmp_path / "one"), "--json", str(tmp_path / "one.json")]) == 0
    two_report, one_report = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two_report["widths"] == one_report["widths"] and two_report["params_sliced"] == one_report["params_sliced"]
    probe = calib_rows(2, seqlen=16)
    with torch.no_grad():
        a, b = (slicegpt.load(tmp_path / n)(input_ids=probe).logits for n in ("two", "one"))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_torchrun_streamed_slice_writes_what_the_in_memory_one_does(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Under torchrun every process streams its layers (the others drop them unwritten): rank 0's
    output is byte for byte that of the same two processes slicing in memory."""
    corpus = str(tiny_model_dir / "corpus.txt")
    common = [
        "slice",
        str(tiny_model_dir / "model"),
        "--calib",
        corpus,
        "--nsamples",
        "6",
        "--seqlen",
        "32",
        "--batch-size",
        "2",
        "--per-layer",
        "--target-params",
        "0.8",
    ]
    for mode in ("on", "off"):
        done = _torchrun("-m", "slicegpt", *common, "--stream", mode, "--out", str(tmp_path / mode))
        assert done.returncode == 0, done.stderr[-4000:]
    weights = lambda folder: {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".safetensors"}  # noqa: E731
    assert weights(tmp_path / "on") == weights(tmp_path / "off")


def test_an_error_on_one_process_ends_them_all(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Rank 0 refuses an existing output folder after the others started calibrating: no hang,
    its one-line error, a failed run."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "something").write_text("x")
    done = _torchrun(
        "-m",
        "slicegpt",
        "slice",
        str(tiny_model_dir / "model"),
        "--calib",
        str(tiny_model_dir / "corpus.txt"),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--batch-size",
        "2",
        "--out",
        str(tmp_path / "taken"),
        "--dist-timeout",
        "60",
        timeout=120,
    )
    assert done.returncode != 0
    assert "slicegpt: error: " in done.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--target-params", "0.8", "--search"], "--search does not run under torchrun"),
        (["--resume"], "--resume does not run under torchrun"),
    ],
)
def test_search_and_resume_are_refused_under_torchrun(flags: list[str], message: str, monkeypatch, capsys) -> None:
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)  # refused before joining the others: no process group needed
    assert main(["slice", "nowhere", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"slicegpt: error: {message}"), err


def test_torchrun_recover_follows_the_one_process_curve(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Data-parallel recovery: two processes, each half of every batch, take one process's steps."""
    model, corpus = str(tiny_model_dir / "model"), str(tiny_model_dir / "corpus.txt")
    sliced = tmp_path / "sliced"
    assert (
        main(
            [
                "slice",
                model,
                "--sparsity",
                "0.25",
                "--calib",
                corpus,
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--out",
                str(sliced),
            ]
        )
        == 0
    )
    common = [
        "recover",
        str(sliced),
        "--teacher",
        model,
        "--data",
        corpus,
        "--max-steps",
        "3",
        "--seqlen",
        "32",
        "--batch-size",
        "4",
        "--val-rows",
        "2",
        "--eval-every",
        "1",
        "--lr",
        "1e-3",
        "--warmup",
        "0",
    ]
    done = _torchrun("-m", "slicegpt", *common, "--out", str(tmp_path / "two"), "--json", str(tmp_path / "two.json"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert main([*common, "--out", str(tmp_path / "one"), "--json", str(tmp_path / "one.json")]) == 0
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["steps"] == one["steps"] == 3 and two["tokens"] == one["tokens"]
    assert [p["val_ppl"] for p in two["curve"]] == pytest.approx([p["val_ppl"] for p in one["curve"]], rel=1e-5)
    assert one["curve"][-1]["val_ppl"] != one["curve"][0]["val_ppl"]  # it trained: the comparison means something
    probe = calib_rows(2, seqlen=16)
    with torch.no_grad():
        a, b = (slicegpt.load(tmp_path / n)(input_ids=probe).logits for n in ("two", "one"))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
