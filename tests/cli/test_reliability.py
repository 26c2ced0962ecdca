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

TESTS = Path(__file__).resolve().parents[1]  # the tests root: conftest, the torchrun worker
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
def test_streamed_slicing_refuses_a_checkpoint_lacking_a_tensor_outside_the_layers(
    untied: Path, tmp_path: Path, capsys, missing: str
) -> None:
    """It was filled at random by transformers (only logged), and the run exited 0."""
    folder = tmp_path / "m"
    shutil.copytree(untied / "m", folder)
    weights = load_file(folder / "model.safetensors")
    weights.pop(missing)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    for stream in ("auto", "on", "off"):
        assert (
            main(
                [
                    "slice",
                    str(folder),
                    "--sparsity",
                    "0.25",
                    "--calib",
                    str(untied / "c.txt"),
                    "--nsamples",
                    "4",
                    "--seqlen",
                    "32",
                    "--stream",
                    stream,
                    "--out",
                    str(tmp_path / "o"),
                    "--no-samples",
                ]
            )
            == 2
        )
        err = _last_error(capsys)
        assert "lacks" in err and missing in err, err
        assert not (tmp_path / "o").exists()


def test_axes_are_honoured_exactly() -> None:
    """'residual,residual' spent the budget on MLP neurons; 'residual' cut MLP neurons once the width bottomed out."""
    model = make_tiny("llama")
    report = slicegpt.slice_model(
        model,
        None,
        calib_rows(8),
        slicegpt.SliceConfig(uniform=False, target_params=0.9, axes="residual,residual", batch_size=4),
        progress=False,
    )
    assert report.allocation["axes"] == ["residual"]
    assert report.widths.mlp_neurons is None and report.widths.embedding < 64
    with pytest.raises(ValueError, match="residual width alone"):
        slicegpt.slice_model(
            make_tiny("llama"),
            None,
            calib_rows(8),
            slicegpt.SliceConfig(uniform=False, target_params=0.3, axes="residual", batch_size=4),
            progress=False,
        )


def _sliced_from(source: Path, corpus: Path, out: Path, *extra: str) -> None:
    assert (
        main(
            [
                "slice",
                str(source),
                "--sparsity",
                "0.25",
                "--calib",
                str(corpus),
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--out",
                str(out),
                "--no-samples",
                *extra,
            ]
        )
        == 0
    )


def test_the_teacher_is_recorded_resolved_and_checked_at_recover_time(
    untied: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    args = [
        "recover",
        str(tmp_path / "s"),
        "--data",
        str(untied / "c.txt"),
        "--seqlen",
        "32",
        "--batch-size",
        "2",
        "--max-steps",
        "1",
        "--val-rows",
        "1",
        "--no-samples",
    ]
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


def test_a_resume_refuses_a_source_whose_weights_changed_in_place(
    untied: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    assert (
        main(
            [
                "slice",
                str(source),
                "--sparsity",
                "0.25",
                "--calib",
                str(untied / "c.txt"),
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--out",
                str(tmp_path / "s"),
                "--no-samples",
                "--resume",
            ]
        )
        == 2
    )
    err = _last_error(capsys)
    assert "source weights" in err and "differ" in err, err


def test_torchrun_processes_must_agree_on_settings_and_weights(untied: Path, tmp_path: Path) -> None:
    """A rank given other settings (or another model) gave exit 0 with logits 51% off, or a gloo SIGABRT.
    Every process reports the mismatch, even one slow to print: torchrun ends the others as soon as
    one exits, so no process exits before every one has printed its line (rank 0's stderr here
    takes 2 s to write it; without that wait rank 1 exits first and rank 0 is ended silently)."""
    script = tmp_path / "ranks.py"
    out = tmp_path / "o"
    argv = [
        "slice",
        str(untied / "m"),
        "--sparsity",
        "0.25",
        "--calib",
        str(untied / "c.txt"),
        "--nsamples",
        "8",
        "--seqlen",
        "32",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--no-samples",
    ]
    script.write_text(
        "import os, sys, time\nfrom slicegpt.cli import main\n"
        f"argv = {argv!r}\n"
        "if os.environ['RANK'] == '1':\n    argv[3] = '0.5'\n"
        "class Slow:\n"
        "    def write(self, s):\n"
        "        if 'differ' in s:\n            time.sleep(2)\n"
        "        return sys.__stderr__.write(s)\n"
        "    def flush(self):\n        sys.__stderr__.flush()\n"
        "if os.environ['RANK'] == '0':\n    sys.stderr = Slow()\n"
        "sys.exit(main(argv))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode != 0
    assert done.stderr.count("processes differ in settings") == 2, done.stderr[-2000:]
    # only torchrun's own report of the failed children carries a traceback; ours are one line each
    assert "slicegpt/" not in done.stderr.split("Traceback", 1)[-1] and not out.exists()
    assert "ChildFailedError" in done.stderr


# ---- tracebacks where one line belongs, and the smaller things ---------------------------------------


@pytest.fixture(scope="module")
def uniform_folder(untied: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("u") / "u"
    assert (
        main(
            [
                "slice",
                str(untied / "m"),
                "--uniform",
                "--sparsity",
                "0.25",
                "--calib",
                str(untied / "c.txt"),
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--out",
                str(out),
                "--no-samples",
            ]
        )
        == 0
    )
    return out


def test_bad_numbers_and_devices_are_one_line(untied: Path, uniform_folder: Path, tmp_path: Path, capsys) -> None:
    model, corpus = str(untied / "m"), str(untied / "c.txt")
    sl = ["slice", model, "--calib", corpus, "--nsamples", "4", "--seqlen", "32", "--no-samples"]
    cases = [
        (["eval", model, "--ppl", corpus, "--max-rows", "0"], "--max-rows must be at least 1"),
        (["eval", model, "--ppl", corpus, "--max-rows", "-1"], "--max-rows must be at least 1"),
        (["eval", model, "--ppl", corpus, "--batch-size", "-3"], "--batch-size must be at least 1"),
        (
            [*sl, "--ppl", corpus, "--eval-max-rows", "0", "--out", str(tmp_path / "a")],
            "--eval-max-rows must be at least 1",
        ),
        ([*sl, "--target-params", "inf", "--out", str(tmp_path / "b")], "positive finite"),
        (["plan", model, "--target-params", "inf"], "positive finite"),
        ([*sl, "--target-params", "1.5", "--out", str(tmp_path / "c")], "a whole number"),
        (
            ["recover", str(uniform_folder), "--data", corpus, "--tokens", "0.5", "--out", str(tmp_path / "d")],
            "whole number of tokens",
        ),
        ([*sl, "--device", "meta", "--out", str(tmp_path / "e")], "'meta' holds no data"),
        (["eval", model, "--device", "meta"], "'meta' holds no data"),
        (
            ["recover", str(uniform_folder), "--data", corpus, "--device", "meta", "--out", str(tmp_path / "f")],
            "'meta' holds no data",
        ),
        (["plan", model, "--tflops", "0"], "tflops must be a positive number"),
        (
            [*sl, "--sparsity", "0.25", "--axes", "residual", "--out", str(tmp_path / "g")],
            "only apply with a parameter target",
        ),
        (
            [*sl, "--sparsity", "0.25", "--residual-share", "0.5", "--out", str(tmp_path / "h")],
            "only apply with a parameter target",
        ),
        ([*sl, "--sparsity", "0.25", "--search", "--out", str(tmp_path / "i")], "only apply with a parameter target"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert err and err[-1].startswith("slicegpt: error:") and needle in err[-1], (argv, err[-3:])
        assert not any("Traceback" in line for line in err)
    assert not list(tmp_path.iterdir())  # no output, no staging left by any refusal


def test_a_perplexity_beyond_float_range_is_inf() -> None:
    from slicegpt.evaluation.perplexity import PerplexityResult, exp_or_inf

    assert exp_or_inf(1e4) == float("inf") and exp_or_inf(1.0) == pytest.approx(2.718281828)
    r = PerplexityResult(
        perplexity=float("inf"), nll=1e4, tokens=3, rows=1, seqlen=4, seconds=0.0, source="x", row_nll=[3e4]
    )
    assert r.perplexity_of_first(1) == float("inf")


def test_a_full_disk_while_staging_is_one_line_and_leaves_no_temporary_file(
    untied: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = []

    def full(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) >= 3:  # the disk fills after a few staged files
            Path(path).write_bytes(b"partial")
            raise safetensors.SafetensorError("No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "o"
    assert (
        main(
            [
                "slice",
                str(untied / "m"),
                "--sparsity",
                "0.25",
                "--calib",
                str(untied / "c.txt"),
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--stream",
                "off",
                "--out",
                str(out),
                "--no-samples",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("slicegpt: error: cannot write") and "No space left" in err and "--resume" in err
    assert not list(tmp_path.rglob("*.tmp")) and not out.exists()


def test_metadata_that_cannot_be_checked_is_refused(uniform_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "u"
    shutil.copytree(uniform_folder, folder)
    meta = json.loads((folder / "slicegpt.json").read_text())  # a uniform folder keeps it beside config.json
    for bad, needle in (
        (dict(meta, format_version="2"), "no valid format_version"),
        (dict(meta, files={}), "records no size or checksum"),
    ):
        (folder / "slicegpt.json").write_text(json.dumps(bad))
        with pytest.raises(slicegpt.SlicedFolderError, match=needle):
            slicegpt.load(folder)


def test_export_checks_what_load_checks(uniform_folder: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "u"
    shutil.copytree(uniform_folder, folder)
    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[-3] ^= 0x40  # an exponent bit of the last weight
    (folder / "model.safetensors").write_bytes(bytes(raw))
    assert main(["export", str(folder), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert "checksum" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()
    (folder / "model.safetensors").write_bytes(bytes(raw[: len(raw) // 2]))
    assert main(["export", str(folder), "--gguf", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("slicegpt: error:") and "truncated" in err


def test_smaller_messages_say_the_whole_thing(untied: Path, uniform_folder: Path, tmp_path: Path, capsys) -> None:
    from slicegpt.io.folders import human_bytes

    assert human_bytes(1234) == "1.23 kB" and human_bytes(5e9) == "5 GB" and human_bytes(12) == "12 bytes"
    notok = tmp_path / "notok"
    shutil.copytree(untied / "m", notok)
    for f in notok.glob("tokenizer*"):
        f.unlink()
    assert main(["eval", str(notok)]) == 2
    assert "has no tokenizer files" in capsys.readouterr().err
    # --resume on an output that was finished: says so, not "pass --overwrite (overwrite=True)"
    assert (
        main(
            [
                "slice",
                str(untied / "m"),
                "--uniform",
                "--sparsity",
                "0.25",
                "--calib",
                str(untied / "c.txt"),
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--out",
                str(uniform_folder),
                "--resume",
                "--no-samples",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "is complete" in err and "overwrite=True" not in err
