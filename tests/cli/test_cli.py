"""The command line: a whole run on a tiny local model, and every bad input as one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slicegpt.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    # Progress bars of work done before the failure may precede it; the error is one line, last.
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip()]
    errors = [l for l in lines if "error" in l.lower() or "traceback" in l.lower()]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert errors[0].startswith("slicegpt: error: ")
    for n in needles:
        assert n in errors[0], errors[0]


def test_slice_eval_roundtrip(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sliced"
    report = tmp_path / "r.json"
    corpus = str(tiny_model_dir / "corpus.txt")
    code, stdout, _ = _run(
        capsys,
        "slice",
        str(tiny_model_dir / "model"),
        "--sparsity",
        "0.25",
        "--calib",
        corpus,
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--ppl",
        corpus,
        "--eval-seqlen",
        "32",
        "--json",
        str(report),
    )
    assert code == 0
    assert "| parameters |" in stdout and "perplexity" in stdout
    data = json.loads(report.read_text())
    for key in (
        "params_dense",
        "params_sliced",
        "share_removed",
        "slicing_seconds",
        "peak_rss_gb",
        "dense_perplexity",
        "sliced_perplexity",
    ):
        assert key in data
    assert data["widths"]["embedding"] == 48
    code, stdout, _ = _run(
        capsys, "eval", str(out), "--ppl", corpus, "--seqlen", "32", "--json", str(tmp_path / "e.json")
    )
    assert code == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["perplexity"]["perplexity"] == pytest.approx(data["sliced_perplexity"]["perplexity"], rel=1e-5)


def test_list_architectures(capsys) -> None:
    code, out, _ = _run(capsys, "slice", "--list-architectures")
    assert code == 0
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(out.split())


def test_help_explains_every_flag(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["slice", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--sparsity",
        "--calib",
        "--nsamples",
        "--seqlen",
        "--batch-size",
        "--round-to",
        "--device",
        "--dtype",
        "--seed",
        "--out",
        "--overwrite",
        "--json",
    ):
        assert flag in out


def test_bad_sparsity(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    for value in ("1.0", "-0.1", "1.5"):
        code, _, err = _run(
            capsys, "slice", str(tiny_model_dir / "model"), "--sparsity", value, "--out", str(tmp_path / "o")
        )
        _one_line_error(code, err, "sparsity")
    assert not (tmp_path / "o").exists()


def test_unknown_architecture(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "mamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 16, "num_hidden_layers": 1}))
    code, _, err = _run(capsys, "slice", str(folder), "--sparsity", "0.25", "--out", str(tmp_path / "o"))
    _one_line_error(code, err, "mamba", "llama")
    assert not (tmp_path / "o").exists()


def test_too_little_calibration_text(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    short = tmp_path / "short.txt"
    short.write_text("only a few words here.\n")
    code, _, err = _run(
        capsys,
        "slice",
        str(tiny_model_dir / "model"),
        "--sparsity",
        "0.25",
        "--calib",
        str(short),
        "--nsamples",
        "8",
        "--seqlen",
        "32",
        "--out",
        str(tmp_path / "o"),
    )
    _one_line_error(code, err, "calibration text", "8 asked")
    assert not (tmp_path / "o").exists()


def test_output_folder_exists(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious").write_text("x")
    code, _, err = _run(
        capsys,
        "slice",
        str(tiny_model_dir / "model"),
        "--sparsity",
        "0.25",
        "--calib",
        str(tiny_model_dir / "corpus.txt"),
        "--nsamples",
        "2",
        "--seqlen",
        "32",
        "--out",
        str(out),
    )
    _one_line_error(code, err, "exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["precious"]


def test_overwrite_never_deletes_the_input_model_or_the_working_directory(tmp_path: Path, capsys, monkeypatch) -> None:
    import torch
    from conftest import SAMPLE_TEXT, make_tiny, tiny_tokenizer

    src = tmp_path / "models" / "m"
    make_tiny("llama", dtype=torch.float32).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    corpus = tmp_path / "c.txt"
    corpus.write_text(SAMPLE_TEXT)
    before = sorted(p.name for p in src.iterdir())
    for out in (src, src.parent, tmp_path):
        code, _, err = _run(
            capsys,
            "slice",
            str(src),
            "--sparsity",
            "0.25",
            "--calib",
            str(corpus),
            "--nsamples",
            "2",
            "--seqlen",
            "32",
            "--out",
            str(out),
            "--overwrite",
        )
        _one_line_error(code, err, "would replace the input")
    monkeypatch.chdir(tmp_path / "models")
    code, _, err = _run(
        capsys,
        "slice",
        str(src),
        "--sparsity",
        "0.25",
        "--calib",
        str(corpus),
        "--nsamples",
        "2",
        "--seqlen",
        "32",
        "--out",
        ".",
        "--overwrite",
    )
    _one_line_error(code, err, "would replace")
    assert sorted(p.name for p in src.iterdir()) == before


def test_unreadable_model_path(tmp_path: Path, capsys) -> None:
    code, _, err = _run(capsys, "slice", str(tmp_path / "nowhere"), "--sparsity", "0.25", "--out", str(tmp_path / "o"))
    _one_line_error(code, err, "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(capsys, "slice", str(empty), "--sparsity", "0.25", "--out", str(tmp_path / "o"))
    _one_line_error(code, err, "empty")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    code, _, err = _run(capsys, "eval", str(garbage))
    _one_line_error(code, err, "garbage")
    assert not (tmp_path / "o").exists()


def test_python_m_slicegpt_help_lists_every_command() -> None:
    import subprocess
    import sys

    from slicegpt.cli import COMMANDS

    assert list(COMMANDS) == [
        "compress",
        "slice",
        "recover",
        "eval",
        "generate-data",
        "bench",
        "sweep",
        "inspect",
        "export",
        "plan",
    ]
    done = subprocess.run([sys.executable, "-m", "slicegpt", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    listed = done.stdout.split("positional arguments:")[1]
    for command in COMMANDS:
        assert f"\n    {command} " in listed, command


@pytest.mark.parametrize(
    "command", ["compress", "slice", "recover", "eval", "generate-data", "bench", "sweep", "inspect", "export", "plan"]
)
def test_every_command_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: slicegpt {command} ")


def test_slice_to_a_parameter_target_never_exceeds_it(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    corpus = str(tiny_model_dir / "corpus.txt")
    common = ("--calib", corpus, "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--uniform")
    code, stdout, _ = _run(
        capsys,
        "slice",
        str(tiny_model_dir / "model"),
        "--target-params",
        "0.8",
        "--axes",
        "mlp,residual",
        "--residual-share",
        "0.5",
        "--correct",
        *common,
        "--out",
        str(tmp_path / "t"),
        "--json",
        str(tmp_path / "t.json"),
    )
    assert code == 0, stdout
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["params_sliced"] <= data["target_params"] == int(0.8 * data["params_dense"])
    assert data["allocation"]["residual_share"] == 0.5 and "achieved" in stdout
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "t"
    )  # a standard checkpoint: one width, one intermediate size
    assert loaded.config.hidden_size == data["allocation"]["residual_width"]
    assert loaded.config.intermediate_size == data["allocation"]["mlp_neurons"]
    assert sum(p.numel() for p in loaded.parameters()) == data["params_sliced"]
    code, _, err = _run(
        capsys,
        "slice",
        str(tiny_model_dir / "model"),
        "--target-params",
        "12k",
        "--axes",
        "mlp",
        *common,
        "--out",
        str(tmp_path / "u"),
    )
    _one_line_error(code, err, "leaves no MLP neurons")
    code, _, err = _run(
        capsys,
        "slice",
        str(tiny_model_dir / "model"),
        "--target-params",
        "0.8",
        "--axes",
        "heads",
        *common,
        "--out",
        str(tmp_path / "v"),
    )
    _one_line_error(code, err, "unknown compression axes")
    assert not (tmp_path / "u").exists() and not (tmp_path / "v").exists()


def test_sweep_over_parameter_targets(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    corpus = str(tiny_model_dir / "corpus.txt")
    code, _, _ = _run(
        capsys,
        "sweep",
        str(tiny_model_dir / "model"),
        "--targets",
        "1,0.85",
        "--uniform",
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
        "--out",
        str(tmp_path / "s"),
        "--no-plots",
    )
    assert code == 0
    runs = json.loads((tmp_path / "s" / "results.json").read_text())["runs"]
    assert [r["target"] for r in runs] == [None, 0.85] and runs[0]["dense"]
    assert runs[1]["params_after"] <= runs[1]["target_params"] == int(0.85 * runs[1]["params_before"])


def test_numerical_faults_and_impossible_devices_are_one_line(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    import torch

    import slicegpt
    from conftest import calib_rows, make_tiny, tiny_tokenizer

    bad = make_tiny("llama", dtype=torch.float32)
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    bad.save_pretrained(tmp_path / "nan")
    tiny_tokenizer().save_pretrained(tmp_path / "nan")
    corpus = str(tiny_model_dir / "corpus.txt")
    code, _, err = _run(
        capsys,
        "slice",
        str(tmp_path / "nan"),
        "--sparsity",
        "0.25",
        "--calib",
        corpus,
        "--nsamples",
        "2",
        "--seqlen",
        "32",
        "--out",
        str(tmp_path / "o"),
    )
    _one_line_error(code, err, "model.layers.1.mlp.down_proj.weight holds NaN or Inf")
    assert not (tmp_path / "o").exists()
    # Activations that overflow are caught where they first reach a covariance, naming the place.
    model = make_tiny("llama", dtype=torch.float32)
    model.model.layers[0].self_attn.register_forward_hook(lambda _m, _i, out: (out[0] * float("inf"), *out[1:]))
    with pytest.raises(slicegpt.core.pca.NumericalError, match="as loaded gives NaN or Inf logits"):
        slicegpt.slice_model(
            model, None, calib_rows(4, 16), slicegpt.SliceConfig(sparsity=0.25, batch_size=4), progress=False
        )
    model = make_tiny("llama", dtype=torch.float32)
    model.model.layers[0].self_attn.register_forward_hook(lambda _m, _i, out: (out[0] * float("inf"), *out[1:]))
    with pytest.raises(slicegpt.core.pca.NumericalError, match="layer 0, the stream after its attention branch"):
        slicegpt.slice_model(
            model,
            None,
            calib_rows(4, 16),
            slicegpt.SliceConfig(sparsity=0.25, batch_size=4, verify=False),
            progress=False,
        )
    if not torch.cuda.is_available():
        code, _, err = _run(
            capsys,
            "slice",
            str(tiny_model_dir / "model"),
            "--sparsity",
            "0.25",
            "--calib",
            corpus,
            "--nsamples",
            "2",
            "--seqlen",
            "32",
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "c"),
        )
        _one_line_error(code, err, "CUDA is not available")
        code, _, err = _run(capsys, "eval", str(tiny_model_dir / "model"), "--ppl", corpus, "--device", "cuda")
        _one_line_error(code, err, "CUDA is not available")
    code, _, err = _run(capsys, "eval", str(tiny_model_dir / "model"), "--ppl", corpus, "--seqlen", "1")
    _one_line_error(code, err, "seqlen must be at least 2")
    with pytest.raises(TypeError, match="sparsity must be a number"):
        slicegpt.SliceConfig(sparsity="0.2")
    # Fewer calibration tokens than the hidden width: a warning, the run goes on.
    slicegpt.slice_model(
        make_tiny("llama", dtype=torch.float32),
        None,
        calib_rows(2, 8),
        slicegpt.SliceConfig(sparsity=0.25, batch_size=2),
        progress=False,
    )
    err = capsys.readouterr().err
    # the library names settings; the command line's notes name them as its flags
    assert "rank-deficient" in err and "give more rows (--nsamples) or longer ones (--seqlen)" in err
    # A half-precision model is sliced with float64 statistics, and says so.
    slicegpt.slice_model(
        make_tiny("llama", dtype=torch.bfloat16),
        None,
        calib_rows(4, 16),
        slicegpt.SliceConfig(sparsity=0.25, batch_size=4),
        progress=False,
    )
    assert "accumulated into float64 covariances" in capsys.readouterr().err


def test_hostile_input_is_refused_before_any_work(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    import os

    import torch
    from safetensors.torch import load_file, save_file

    import slicegpt
    from conftest import make_tiny, tiny_tokenizer

    model, corpus = str(tiny_model_dir / "model"), str(tiny_model_dir / "corpus.txt")
    args = ["--calib", corpus, "--nsamples", "2", "--seqlen", "32"]
    # A checkpoint with a tensor missing would be filled with random numbers by transformers.
    holed = tmp_path / "holed"
    make_tiny("llama", dtype=torch.float32).save_pretrained(holed)
    tiny_tokenizer().save_pretrained(holed)
    state = load_file(holed / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, holed / "model.safetensors", metadata={"format": "pt"})
    code, _, err = _run(capsys, "slice", str(holed), "--sparsity", "0.25", *args, "--out", str(tmp_path / "o"))
    _one_line_error(code, err, "lacks 1 tensor(s): model.layers.1.mlp.up_proj.weight")
    # A GGUF with valid magic and garbage after it.
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + os.urandom(256))
    code, _, err = _run(capsys, "eval", str(tmp_path / "bad.gguf"))
    _one_line_error(code, err, "cannot read", "as a GGUF model")
    # Re-slicing a sliced folder; a newer format version; --json at a folder; a dangling --out link.
    sliced = tmp_path / "sliced"
    assert _run(capsys, "slice", model, "--sparsity", "0.25", *args, "--out", str(sliced))[0] == 0
    code, _, err = _run(capsys, "slice", str(sliced), "--sparsity", "0.25", *args, "--out", str(tmp_path / "again"))
    _one_line_error(code, err, "already sliced")
    code, _, err = _run(
        capsys, "slice", model, "--sparsity", "0.25", *args, "--out", str(tmp_path / "j"), "--json", str(tmp_path)
    )
    _one_line_error(code, err, "is a folder")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    code, _, err = _run(capsys, "slice", model, "--sparsity", "0.25", *args, "--out", str(tmp_path / "dangling"))
    _one_line_error(code, err, "dangling symbolic link")
    code, _, err = _run(capsys, "slice", model, "--sparsity", "0.25", *args, "--out", str(tmp_path / ("n" * 250)))
    _one_line_error(code, err, "cannot write the output folder")
    newer = tmp_path / "newer"
    import shutil

    shutil.copytree(sliced, newer)
    config = json.loads((newer / "config.json").read_text())
    config["slicegpt"]["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(config))
    code, _, err = _run(capsys, "eval", str(newer))
    _one_line_error(code, err, "upgrade slicegpt")
    # Calibration text of NUL bytes; a --seqlen above the context is recorded as used.
    (tmp_path / "nul.txt").write_text("\x00" * 5000)
    code, _, err = _run(
        capsys, "slice", model, "--sparsity", "0.25", "--calib", str(tmp_path / "nul.txt"), "--out", str(tmp_path / "z")
    )
    _one_line_error(code, err, "not text")
    assert (
        _run(
            capsys,
            "slice",
            model,
            "--sparsity",
            "0.25",
            "--calib",
            corpus,
            "--nsamples",
            "1",
            "--seqlen",
            "100000",
            "--out",
            str(tmp_path / "long"),
        )[0]
        == 0
    )
    assert slicegpt.read_metadata(tmp_path / "long")["settings"]["seqlen"] == 256
    # A writer killed mid-save left its staging folder: the next save beside it removes it.
    stale = tmp_path / ".sliced2.tmp-999999-abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    assert _run(capsys, "slice", model, "--sparsity", "0.25", *args, "--out", str(tmp_path / "sliced2"))[0] == 0
    assert not stale.exists()


def test_damaged_source_checkpoints_are_one_line(tmp_path: Path, capsys) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from conftest import SAMPLE_TEXT, make_tiny, tiny_tokenizer

    good = tmp_path / "good"
    make_tiny("llama", dtype=torch.float32).save_pretrained(good)
    tiny_tokenizer().save_pretrained(good)
    (tmp_path / "c.txt").write_text(SAMPLE_TEXT)
    args = ["--calib", str(tmp_path / "c.txt"), "--nsamples", "2", "--seqlen", "32"]

    def damaged(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        return folder

    truncated = damaged("truncated")
    raw = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    reshaped = damaged("reshaped")
    state = load_file(reshaped / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:-8].contiguous()
    save_file(state, reshaped / "model.safetensors", metadata={"format": "pt"})
    no_tokenizer = damaged("no_tokenizer")
    for f in no_tokenizer.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            f.unlink()
    for folder, needle in (
        (truncated, "cannot load model"),
        (reshaped, "cannot load model"),
        (no_tokenizer, "cannot load the tokenizer"),
    ):
        code, _, err = _run(
            capsys, "slice", str(folder), "--sparsity", "0.25", *args, "--out", str(tmp_path / f"out-{folder.name}")
        )
        _one_line_error(code, err, needle)
        assert not err.strip().endswith(":"), err
        assert not (tmp_path / f"out-{folder.name}").exists()


def test_only_safetensors_are_read_and_state_files_are_not_pickles(tmp_path: Path, capsys) -> None:
    import math

    import torch

    from slicegpt.io.treefile import TreeFileError, load_tree, save_tree
    from conftest import SAMPLE_TEXT, make_tiny, tiny_tokenizer

    pickled = tmp_path / "pickled"
    model = make_tiny("llama", dtype=torch.float32)
    pickled.mkdir()
    model.config.save_pretrained(pickled)
    tiny_tokenizer().save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    (tmp_path / "c.txt").write_text(SAMPLE_TEXT)
    code, _, err = _run(
        capsys,
        "slice",
        str(pickled),
        "--sparsity",
        "0.25",
        "--calib",
        str(tmp_path / "c.txt"),
        "--nsamples",
        "2",
        "--seqlen",
        "32",
        "--out",
        str(tmp_path / "o"),
    )
    _one_line_error(code, err, "cannot load model")
    # Checkpoint state (optimiser states keyed by int, tuples, inf, views of one tensor) round-trips through
    # safetensors.
    base = torch.arange(6.0)
    tree = {
        "state": {0: {"step": torch.tensor(3.0), "m": base.view(2, 3)}, 1: {"m": base[:2]}},
        "best": math.inf,
        "groups": [{"lr": 1e-3, "params": [0, 1]}],
        "pair": (1, "a"),
        "none": None,
    }
    save_tree(tmp_path / "s.safetensors", tree)
    back = load_tree(tmp_path / "s.safetensors")
    assert (
        back["best"] == math.inf
        and back["pair"] == (1, "a")
        and back["groups"] == tree["groups"]
        and back["none"] is None
    )
    assert (
        set(back["state"]) == {0, 1}
        and torch.equal(back["state"][0]["m"], base.view(2, 3))
        and torch.equal(back["state"][1]["m"], base[:2])
    )
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(TreeFileError, match="cannot read the state file"):
        load_tree(tmp_path / "bad.safetensors")


def test_one_writer_per_output_and_free_space_checked(
    tiny_model_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import subprocess
    import sys

    import slicegpt.io.folders as folders

    model, corpus = str(tiny_model_dir / "model"), str(tiny_model_dir / "corpus.txt")
    args = ["--calib", corpus, "--nsamples", "2", "--seqlen", "32"]
    lock = tmp_path / ".o.lock"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # stands in for a slicegpt run"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(str(live.pid))
        code, _, err = _run(capsys, "slice", model, "--sparsity", "0.25", *args, "--out", str(tmp_path / "o"))
        _one_line_error(code, err, f"another slicegpt run (PID {live.pid}) is writing", str(lock))
        # a lock naming a live process that is not slicegpt (its PID reused since a kill) is taken over
        lock.write_text(str(other.pid))
        assert _run(capsys, "slice", model, "--sparsity", "0.25", *args, "--out", str(tmp_path / "o"))[0] == 0
        assert not lock.exists()
    finally:
        for p in (live, other):
            p.kill()
            p.wait()
    lock.write_text("999999")  # a dead writer's lock is taken over, and released at the end
    assert (
        _run(capsys, "slice", model, "--sparsity", "0.25", *args, "--out", str(tmp_path / "o"), "--overwrite")[0] == 0
    )
    assert not lock.exists()
    # A disk too full for the model: refused before writing, nothing left behind.
    monkeypatch.setattr(folders.shutil, "disk_usage", lambda _p: type("U", (), {"free": 1000})())
    code, _, err = _run(
        capsys, "slice", model, "--sparsity", "0.25", *args, "--out", str(tmp_path / "full")
    )  # streamed: refused before any work
    _one_line_error(code, err, "needs about", "are free on the disk")
    assert not (tmp_path / "full").exists() and not list(tmp_path.glob(".full.*"))
    code, _, err = _run(
        capsys, "slice", model, "--sparsity", "0.25", *args, "--stream", "off", "--out", str(tmp_path / "full")
    )  # in memory: at the save
    _one_line_error(code, err, "needs about", "are free on the disk")
    assert not (tmp_path / "full").exists() and not list(tmp_path.glob(".full.tmp-*"))
    assert (tmp_path / ".full.slice-state").is_dir()  # the finished layers stay: --resume once space is freed


def test_mismatched_tokenizer_and_invalid_utf8_are_one_line(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    import shutil

    from conftest import tiny_tokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir / "model", other)
    big = tiny_tokenizer(vocab_size=400)
    big.save_pretrained(other)
    code, _, err = _run(capsys, "eval", str(other))
    _one_line_error(code, err, "tokenizer has", "do not belong together")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 " * 200)
    code, _, err = _run(
        capsys,
        "slice",
        str(tiny_model_dir / "model"),
        "--sparsity",
        "0.25",
        "--calib",
        str(tmp_path / "bad.txt"),
        "--out",
        str(tmp_path / "o"),
    )
    _one_line_error(code, err, "cannot read", "bad.txt")


def test_library_messages_name_settings_and_the_cli_shows_flags() -> None:
    from slicegpt.config import flags

    assert flags("use `axes=residual`") == "use --axes residual"
    assert flags("lower `nsamples` or `seqlen`") == "lower --nsamples or --seqlen"
    assert flags("(`verify=False` skips this check)") == "(--no-verify skips this check)"
    assert flags("`device_map=auto` needs CUDA; use `device`") == "--device-map auto needs CUDA; use --device"
    # what is not a setting stays as written: record fields, code spans, docstring literals
    assert flags("each record needs a `messages` list") == "each record needs a `messages` list"
    assert flags("run `slicegpt generate-data` first") == "run `slicegpt generate-data` first"
    assert flags("``seqlen``") == "``seqlen``"
