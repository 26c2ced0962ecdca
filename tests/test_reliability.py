"""Silent wrong results made refusals or right results (the second adversarial round), each a
regression test that failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import slicegpt
from slicegpt.cli import main

from conftest import SAMPLE_TEXT, calib_rows, make_tiny, tiny_tokenizer

TESTS = Path(__file__).parent
SRC = Path(slicegpt.__file__).parent.parent


def _last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> Path:
    """A tiny untied model (Mistral: lm_head is its own tensor) saved as a local folder, with a corpus."""
    root = tmp_path_factory.mktemp("untied")
    make_tiny("mistral", dtype=torch.float32).save_pretrained(root / "m")
    tiny_tokenizer().save_pretrained(root / "m")
    (root / "c.txt").write_text(SAMPLE_TEXT)
    return root


@pytest.mark.parametrize("missing", ["lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"])
def test_streamed_slicing_refuses_a_checkpoint_lacking_a_tensor_outside_the_layers(untied: Path, tmp_path: Path, capsys,
                                                                                   missing: str) -> None:
    """It was filled at random by transformers (only logged), and the run exited 0."""
    folder = tmp_path / "m"
    shutil.copytree(untied / "m", folder)
    weights = load_file(folder / "model.safetensors")
    weights.pop(missing)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    for stream in ("auto", "on", "off"):
        assert main(["slice", str(folder), "--sparsity", "0.25", "--calib", str(untied / "c.txt"), "--nsamples", "4",
                     "--seqlen", "32", "--stream", stream, "--out", str(tmp_path / "o"), "--no-samples"]) == 2
        err = _last_error(capsys)
        assert "lacks" in err and missing in err, err
        assert not (tmp_path / "o").exists()


def test_axes_are_honoured_exactly() -> None:
    """'residual,residual' spent the budget on MLP neurons; 'residual' cut MLP neurons once the width bottomed out."""
    model = make_tiny("llama")
    report = slicegpt.slice_model(model, None, calib_rows(8), slicegpt.SliceConfig(target_params=0.9, axes="residual,residual",
                                                                                  batch_size=4), progress=False)
    assert report.allocation["axes"] == ["residual"]
    assert report.widths.mlp_neurons is None and report.widths.embedding < 64
    with pytest.raises(ValueError, match="residual width alone"):
        slicegpt.slice_model(make_tiny("llama"), None, calib_rows(8),
                             slicegpt.SliceConfig(target_params=0.3, axes="residual", batch_size=4), progress=False)


def _sliced_from(source: Path, corpus: Path, out: Path, *extra: str) -> None:
    assert main(["slice", str(source), "--sparsity", "0.25", "--calib", str(corpus), "--nsamples", "4", "--seqlen", "32",
                 "--out", str(out), "--no-samples", *extra]) == 0


def test_the_teacher_is_recorded_resolved_and_checked_at_recover_time(untied: Path, tmp_path: Path, capsys,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The source was recorded as typed (a relative path), resolved at recover time: run from
    another folder holding another model there, recover trained against that one."""
    work = tmp_path / "work"
    (work / "m").parent.mkdir()
    shutil.copytree(untied / "m", work / "m")
    monkeypatch.chdir(work)
    _sliced_from(Path("m"), untied / "c.txt", tmp_path / "s")
    meta = slicegpt.read_metadata(tmp_path / "s")
    assert meta["source_model"] == str((work / "m").resolve()) and len(meta["source_fingerprint"]) == 16
    # from another folder, with another model at the relative path: the absolute one is used
    other = tmp_path / "other"
    other.mkdir()
    make_tiny("mistral", dtype=torch.float32, seed=5).save_pretrained(other / "m")
    tiny_tokenizer().save_pretrained(other / "m")
    monkeypatch.chdir(other)
    args = ["recover", str(tmp_path / "s"), "--data", str(untied / "c.txt"), "--seqlen", "32", "--batch-size", "2",
            "--max-steps", "1", "--val-rows", "1", "--no-samples"]
    assert main(args + ["--out", str(tmp_path / "r1"), "--json", str(tmp_path / "r1.json")]) == 0
    assert json.loads((tmp_path / "r1.json").read_text())["teacher"] == str((work / "m").resolve())
    # the recorded source changed in place: refused; named explicitly: a note, and it runs
    shutil.rmtree(work / "m")
    shutil.copytree(other / "m", work / "m")
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "r2")]) == 2
    assert "is not the model" in _last_error(capsys) and not (tmp_path / "r2").exists()
    assert main(args + ["--out", str(tmp_path / "r3"), "--teacher", str(work / "m")]) == 0
    assert "is not the model" in capsys.readouterr().out
    # a sliced folder (the student itself included) is no teacher; --teacher with --loss lm is no use
    assert main(args + ["--out", str(tmp_path / "r4"), "--teacher", str(tmp_path / "s")]) == 2
    assert "is a sliced folder" in _last_error(capsys)
    assert main(args + ["--out", str(tmp_path / "r5"), "--teacher", str(work / "m"), "--loss", "lm"]) == 2
    assert "--teacher has no use with --loss lm" in _last_error(capsys)


def test_a_resume_refuses_a_source_whose_weights_changed_in_place(untied: Path, tmp_path: Path, capsys,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """It resumed, mixing the layers of two models."""
    from slicegpt.io.staging import SliceStaging

    source = tmp_path / "m"
    shutil.copytree(untied / "m", source)
    real = SliceStaging.after_layer

    def crash(self, state):
        real(self, state)
        if state.next_layer == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(SliceStaging, "after_layer", crash)
    with pytest.raises(KeyboardInterrupt):
        _sliced_from(source, untied / "c.txt", tmp_path / "s")
    monkeypatch.setattr(SliceStaging, "after_layer", real)
    weights = load_file(source / "model.safetensors")
    weights["model.layers.2.mlp.down_proj.weight"] *= 2
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["slice", str(source), "--sparsity", "0.25", "--calib", str(untied / "c.txt"), "--nsamples", "4", "--seqlen", "32",
                 "--out", str(tmp_path / "s"), "--no-samples", "--resume"]) == 2
    err = _last_error(capsys)
    assert "source weights" in err and "differ" in err, err


def test_torchrun_processes_must_agree_on_settings_and_weights(untied: Path, tmp_path: Path) -> None:
    """A rank given other settings (or another model) gave exit 0 with logits 51% off, or a gloo SIGABRT."""
    script = tmp_path / "ranks.py"
    out = tmp_path / "o"
    argv = ["slice", str(untied / "m"), "--sparsity", "0.25", "--calib", str(untied / "c.txt"), "--nsamples", "8", "--seqlen", "32",
            "--batch-size", "2", "--out", str(out), "--no-samples"]
    script.write_text("import os, sys\nfrom slicegpt.cli import main\n"
                      f"argv = {argv!r}\n"
                      "if os.environ['RANK'] == '1':\n    argv[3] = '0.5'\n"
                      "sys.exit(main(argv))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert done.stderr.count("processes differ in settings") == 2, done.stderr[-2000:]
    # only torchrun's own report of the failed children carries a traceback; ours are one line each
    assert "slicegpt/" not in done.stderr.split("Traceback", 1)[-1] and not out.exists()
    assert "ChildFailedError" in done.stderr
