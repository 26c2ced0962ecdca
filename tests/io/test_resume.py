"""A stopped slicing run continues from its staging folder to the files an uninterrupted run writes, bit for bit.

API level: a staging checkpoint that raises right after it has written layer k (or uniform
mode's rotation) stands in for a crash; the same call with ``resume=True`` must then save
folders whose every file equals an uninterrupted run's. Process level: a real ``slicegpt slice``
is SIGKILLed at a random moment after its first layer checkpoint and rerun with ``--resume``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slicegpt
from slicegpt.cli import main
from slicegpt.core.streams import LoopState, Streams
from slicegpt.io.staging import (
    FINGERPRINT,
    STATE,
    ResumeError,
    SliceStaging,
    _layer_file,
    _load_tensors,
    _save_tensors,
    staging_dir,
)
from slicegpt.io.treefile import load_tree, save_tree

from conftest import calib_rows, make_tiny, tiny_tokenizer


class Crash(Exception):
    """Stands in for a kill: raised right after a checkpoint was written."""


class CrashingStaging(SliceStaging):
    """Writes like :class:`SliceStaging`, then stops the run after layer ``after`` (or, with
    ``after='pooled'``, once uniform mode's rotation is staged)."""

    def __init__(self, folder: Path, after: int | str, **kwargs) -> None:
        super().__init__(folder, **kwargs)
        self.after = after

    def pooled(self, evals: torch.Tensor, q: torch.Tensor) -> None:
        super().pooled(evals, q)
        if self.after == "pooled":
            raise Crash

    def after_layer(self, state: LoopState) -> None:
        super().after_layer(state)
        if state.next_layer - 1 == self.after:
            raise Crash


SETTINGS = {
    "per-layer": dict(sparsity=0.25),
    "uniform": dict(sparsity=0.25, uniform=True),
    "target": dict(uniform=False, target_params=0.75),  # MLP neurons pruned, writers refit (corrections on)
    "target-uniform": dict(target_params=0.75, uniform=True),
}


def _slice(family: str, settings: dict, out: Path, checkpoint=None, rows: torch.Tensor | None = None) -> None:
    model = make_tiny(family)
    config = slicegpt.SliceConfig(batch_size=4, **settings)
    report = slicegpt.slice_model(
        model,
        None,
        calib_rows(8) if rows is None else rows,
        config,
        progress=False,
        source_model=f"tiny-{family}",
        streams=None if checkpoint is None else Streams(checkpoint=checkpoint),
    )
    slicegpt.save(model, out, report=report)


def _digests(folder: Path) -> dict[str, str]:
    """Every file's sha256, but the model card's (it names its own folder)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "README.md"
    }


def _assert_same_files(a: Path, b: Path) -> None:
    da, db = _digests(a), _digests(b)
    assert {"model.safetensors", "config.json", "slicegpt.json"} <= set(da)
    assert da == db, [n for n in da if da[n] != db.get(n)]


@pytest.mark.parametrize(
    ("family", "mode", "after"),
    [
        ("llama", "per-layer", 0),
        ("llama", "per-layer", 1),
        ("llama", "per-layer", 2),
        ("llama", "uniform", "pooled"),
        ("llama", "uniform", 1),
        ("llama", "target", 0),
        ("llama", "target", 1),
        ("llama", "target-uniform", 1),
        ("gemma3_text", "per-layer", 1),  # sliding and global layers: different call arguments per layer
        ("gpt_neox", "target", 0),  # parallel blocks
    ],
)
def test_a_stopped_slice_resumes_to_the_same_files(tmp_path: Path, family: str, mode: str, after: int | str) -> None:
    settings = SETTINGS[mode]
    _slice(family, settings, tmp_path / "whole")
    stage = tmp_path / "stage"
    with pytest.raises(Crash):
        _slice(family, settings, tmp_path / "out", CrashingStaging(stage, after))
    assert (stage / STATE).is_file() == (after != "pooled")
    assert not (tmp_path / "out").exists()
    notes: list[str] = []
    staging = SliceStaging(stage, resume=True, say=notes.append)
    _slice(family, settings, tmp_path / "out", staging)
    assert len(notes) == 1 and "resuming" in notes[0]
    _assert_same_files(tmp_path / "out", tmp_path / "whole")
    staging.finish()
    assert not stage.exists()


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path: Path) -> None:
    """A half-written temporary file (the kill came mid-write) is ignored: the last committed state is used."""
    _slice("llama", SETTINGS["target"], tmp_path / "whole")
    stage = tmp_path / "stage"
    with pytest.raises(Crash):
        _slice("llama", SETTINGS["target"], tmp_path / "out", CrashingStaging(stage, 0))
    (stage / (STATE + ".tmp")).write_bytes(b"half a state")
    (stage / "layer-00001.safetensors.tmp").write_bytes(b"half a layer")
    notes: list[str] = []
    _slice("llama", SETTINGS["target"], tmp_path / "out", SliceStaging(stage, resume=True, say=notes.append))
    assert "resuming at layer 1" in notes[0]
    _assert_same_files(tmp_path / "out", tmp_path / "whole")


def test_a_mismatched_resume_is_refused_naming_what_differs(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    with pytest.raises(Crash):
        _slice("llama", SETTINGS["per-layer"], tmp_path / "out", CrashingStaging(stage, 0))
    with pytest.raises(ResumeError, match=r"sparsity \(0\.25 then, 0\.3 now\)") as info:
        _slice("llama", dict(sparsity=0.3), tmp_path / "out", SliceStaging(stage, resume=True))
    assert "\n" not in str(info.value) and "widths" in str(info.value)
    with pytest.raises(ResumeError, match="calibration data") as info:
        _slice(
            "llama",
            SETTINGS["per-layer"],
            tmp_path / "out",
            SliceStaging(stage, resume=True),
            rows=calib_rows(8, seed=2),
        )
    assert "sparsity" not in str(info.value)
    with pytest.raises(ResumeError, match="source model .*model config"):
        _slice("qwen2", SETTINGS["per-layer"], tmp_path / "out", SliceStaging(stage, resume=True))
    assert (stage / STATE).is_file()  # a refused resume leaves the staging as it was


def test_tensors_read_back_from_staging_sit_in_aligned_memory_of_their_own(tmp_path: Path) -> None:
    """The cause of resumed runs differing from uninterrupted ones on AMD EPYC (by ~1e-14 in the
    layers after the restore): safetensors hands back views into the file's buffer, aligned to 8
    bytes only, and MKL's float64 products take another summation path for operands not 16-byte
    aligned. Every tensor read back must sit in freshly allocated (64-byte aligned) memory, as
    the tensors of an uninterrupted run do."""
    tree = {
        "a": torch.randn(3, 7, dtype=torch.float64),
        "b": torch.randn(5),
        "c": [torch.randn(4, 3, dtype=torch.float64)],
    }
    save_tree(tmp_path / "tree.safetensors", tree)
    back = load_tree(tmp_path / "tree.safetensors")
    _save_tensors(tmp_path / "layer.safetensors", {"a": tree["a"], "b": tree["b"], "c": tree["c"][0]})
    layer = _load_tensors(tmp_path / "layer.safetensors")
    for got, want in [
        (back["a"], tree["a"]),
        (back["b"], tree["b"]),
        (back["c"][0], tree["c"][0]),
        (layer["a"], tree["a"]),
        (layer["b"], tree["b"]),
        (layer["c"], tree["c"][0]),
    ]:
        assert torch.equal(got, want)
        assert got.data_ptr() % 64 == 0 and got.storage_offset() == 0


def test_a_resume_on_other_numerics_says_its_bits_may_differ(tmp_path: Path) -> None:
    """The metadata records what the bits depend on; a resume where that changed (another CPU,
    another thread count) goes on, saying that bitwise equality is not promised."""
    stage = tmp_path / "stage"
    with pytest.raises(Crash):
        _slice("llama", SETTINGS["per-layer"], tmp_path / "out", CrashingStaging(stage, 0))
    identity = json.loads((stage / FINGERPRINT).read_text())
    assert identity["numerics"]["threads"] == torch.get_num_threads() and identity["numerics"]["cpu"]
    identity["numerics"]["threads"] += 1
    (stage / FINGERPRINT).write_text(json.dumps(identity))
    notes: list[str] = []
    _slice("llama", SETTINGS["per-layer"], tmp_path / "out", SliceStaging(stage, resume=True, say=notes.append))
    assert any("other numerics" in n and "threads" in n and "not bit for bit" in n for n in notes), notes
    meta = json.loads((tmp_path / "out" / "slicegpt.json").read_text())
    assert meta["numerics"] == {**identity["numerics"], "threads": torch.get_num_threads()}


# ---- the command line -----------------------------------------------------------------------


def _cli(model: str, corpus: str, out: Path, *extra: str) -> list[str]:
    return [
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
        str(out),
        *extra,
    ]


def test_cli_resume_notes_and_cleanup(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    model, corpus = str(tiny_model_dir / "model"), str(tiny_model_dir / "corpus.txt")
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert main(_cli(model, corpus, whole)) == 0
    assert not staging_dir(whole).exists()  # removed after the successful save

    # --resume with nothing to resume: starts from the beginning and says so, in one line
    capsys.readouterr()
    assert main(_cli(model, corpus, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "nothing to resume" in line] and not staging_dir(out).exists()
    _assert_same_files(out, whole)

    # a crash after layer 1, then --resume with other settings: refused in one line naming them
    real = SliceStaging.after_layer

    def crash(self, state):
        real(self, state)
        if state.next_layer == 2:
            raise Crash

    monkeypatch.setattr(SliceStaging, "after_layer", crash)
    other = tmp_path / "other"
    with pytest.raises(Crash):
        main(_cli(model, corpus, other))
    monkeypatch.setattr(SliceStaging, "after_layer", real)
    assert (staging_dir(other) / STATE).is_file() and not other.exists()
    capsys.readouterr()
    assert main(_cli(model, corpus, other, "--resume", "--nsamples", "5")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "slicegpt: error:" in line]
    assert (
        len(err) == 1
        and err[0].startswith("slicegpt: error:")
        and "nsamples (4 then, 5 now)" in err[0]
        and "calibration data" in err[0]
    )
    assert (
        main(
            ["slice", model, "--target-params", "0.75", "--search", "--calib", corpus, "--out", str(other), "--resume"]
        )
        == 2
    )
    assert "--search" in capsys.readouterr().err

    # the same command with --resume continues and removes the staging folder once saved
    assert main(_cli(model, corpus, other, "--resume")) == 0
    assert "resuming at layer 2" in capsys.readouterr().err
    assert not staging_dir(other).exists()
    _assert_same_files(other, whole)

    # without --resume an earlier run's staging folder is announced and replaced
    monkeypatch.setattr(SliceStaging, "after_layer", crash)
    with pytest.raises(Crash):
        main(_cli(model, corpus, tmp_path / "again"))
    monkeypatch.setattr(SliceStaging, "after_layer", real)
    capsys.readouterr()
    assert main(_cli(model, corpus, tmp_path / "again")) == 0
    assert "holds the staging of an earlier run" in capsys.readouterr().err
    assert not staging_dir(tmp_path / "again").exists()
    _assert_same_files(tmp_path / "again", whole)


def test_a_resume_after_a_kill_during_the_final_save(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the output was renamed into place but before the staging was removed: --resume
    finishes (replacing the output with the same files) without --overwrite."""
    model, corpus = str(tiny_model_dir / "model"), str(tiny_model_dir / "corpus.txt")
    out = tmp_path / "out"

    def killed(self) -> None:
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(SliceStaging, "finish", killed)
        with pytest.raises(Crash):
            main(_cli(model, corpus, out))
    before = _digests(out)
    assert staging_dir(out).is_dir()
    assert main(_cli(model, corpus, out)) == 2  # without --resume (or --overwrite) the output is kept
    assert main(_cli(model, corpus, out, "--resume")) == 0
    assert _digests(out) == before and not staging_dir(out).exists()


def test_a_killed_slice_resumes_to_the_same_files(tmp_path: Path) -> None:
    """SIGKILL a real `slicegpt slice` at a random moment mid-run (just after a random layer is
    staged); the same command with --resume writes the files an uninterrupted run writes, bit for bit."""
    import transformers

    # Longer than the shared tiny model: more layers and rows, so that the kill lands mid-run.
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=10,
        vocab_size=320,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    folder = tmp_path / "model"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        " ".join(f"line {i} of the calibration text, with words {i * 7 % 13} and {i % 11}." for i in range(4000))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "slicegpt",
            "slice",
            str(folder),
            "--per-layer",
            "--target-params",
            "0.75",
            "--calib",
            str(corpus),
            "--nsamples",
            "64",
            "--seqlen",
            "64",
            "--batch-size",
            "8",
            "--out",
            str(out),
        ]

    subprocess.run(command(tmp_path / "whole"), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # A random moment mid-run: just after a random layer k (of 10) is staged, at least two layers
    # before the end (a timed kill lands after the end once the whole run is under a second).
    staged = staging_dir(out) / _layer_file(random.randint(1, config.num_hidden_layers - 3))
    deadline = time.time() + 300
    while not staged.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(random.uniform(0.0, 0.02))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed: make it longer"
    assert staging_dir(out).is_dir()
    done = subprocess.run(command(out) + ["--resume"], check=True, env=env, capture_output=True, text=True)
    assert "resuming" in done.stderr, done.stderr
    assert not staging_dir(out).exists()
    _assert_same_files(out, tmp_path / "whole")


@pytest.mark.parametrize("mode", ["per-layer", "target"])
def test_staging_every_few_layers_resumes_from_the_last_staged_one(tmp_path: Path, mode: str) -> None:
    """--checkpoint-every 2: stopped after layer 2 (3 done), the state is that after layer 1;
    the resume redoes layer 2 and gives the files of an uninterrupted run."""
    settings = SETTINGS[mode]
    _slice("llama", settings, tmp_path / "whole")
    stage = tmp_path / "stage"
    with pytest.raises(Crash):
        _slice("llama", settings, tmp_path / "out", CrashingStaging(stage, 2, every=2))
    notes: list[str] = []
    _slice("llama", settings, tmp_path / "out", SliceStaging(stage, resume=True, say=notes.append, every=2))
    assert notes and "resuming at layer 2" in notes[0]
    _assert_same_files(tmp_path / "out", tmp_path / "whole")
    with pytest.raises(ValueError, match="--checkpoint-every"):
        SliceStaging(stage, every=0)
