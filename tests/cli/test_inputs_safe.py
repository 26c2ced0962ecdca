"""No command writes, replaces or deletes one of its inputs, whatever --out, --json, --plot, --gguf
and --overwrite say: the conflict is one line before any work, and the input is left as it was."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from slicegpt.cli import main


def _digest(path: Path) -> str:
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return hashlib.sha256(
        b"".join(p.name.encode() + p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())
    ).hexdigest()


@pytest.fixture(scope="module")
def sliced(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(a copy of the dense model, a folder sliced from it, the corpus)."""
    root = tmp_path_factory.mktemp("safe")
    src = root / "src"
    shutil.copytree(tiny_model_dir / "model", src)
    corpus = root / "corpus.txt"
    shutil.copy(tiny_model_dir / "corpus.txt", corpus)
    out = root / "s"
    assert (
        main(
            [
                "slice",
                str(src),
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
            ]
        )
        == 0
    )
    return src, out, corpus


def _refused(capsys, argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("slicegpt: error:") and all(n in err for n in needles), err


def test_recover_never_replaces_the_recorded_source_model(sliced, tmp_path: Path, capsys) -> None:
    src, out, corpus = sliced
    before = _digest(src)
    _refused(
        capsys,
        ["recover", str(out), "--data", str(corpus), "--out", str(src), "--overwrite", "--max-steps", "1"],
        "would replace the input",
        str(src),
    )
    assert _digest(src) == before


@pytest.mark.parametrize("command", ["slice", "eval", "inspect", "plan", "recover"])
def test_json_never_overwrites_an_input_file(sliced, tmp_path: Path, capsys, command: str) -> None:
    src, out, corpus = sliced
    target = (src if command in ("slice", "plan") else out) / "model.safetensors"
    before = _digest(target)
    argv = {
        "slice": [
            "slice",
            str(src),
            "--sparsity",
            "0.25",
            "--calib",
            str(corpus),
            "--nsamples",
            "4",
            "--seqlen",
            "32",
            "--out",
            str(tmp_path / "o"),
        ],
        "eval": ["eval", str(out), "--ppl", str(corpus), "--seqlen", "32"],
        "inspect": ["inspect", str(out)],
        "plan": ["plan", str(src)],
        "recover": ["recover", str(out), "--data", str(corpus), "--out", str(tmp_path / "r"), "--max-steps", "1"],
    }[command]
    _refused(capsys, argv + ["--json", str(target)], "--json", "would overwrite the input")
    assert _digest(target) == before
    if command in ("slice", "eval", "recover"):  # the data read is an input too
        _refused(capsys, argv + ["--json", str(corpus)], "--json", "would overwrite the input")


def test_plot_and_gguf_never_overwrite_an_input_file(sliced, capsys) -> None:
    src, out, _ = sliced
    target = out / "model.safetensors"
    before = _digest(target)
    _refused(capsys, ["inspect", str(out), "--plot", str(target)], "--plot")
    _refused(capsys, ["export", str(src), "--gguf", str(src / "model.safetensors"), "--overwrite"], "--gguf")
    assert _digest(target) == before


def test_an_output_folder_holding_an_input_is_never_replaced(sliced, tmp_path: Path, capsys) -> None:
    src, out, corpus = sliced
    d = tmp_path / "d"
    d.mkdir()
    (d / "cal.txt").write_text(corpus.read_text())
    _refused(
        capsys,
        [
            "slice",
            str(src),
            "--sparsity",
            "0.25",
            "--calib",
            str(d / "cal.txt"),
            "--nsamples",
            "4",
            "--seqlen",
            "32",
            "--out",
            str(d),
            "--overwrite",
        ],
        "would replace the input",
        "cal.txt",
    )
    _refused(
        capsys,
        ["recover", str(out), "--data", str(d / "cal.txt"), "--out", str(d), "--overwrite", "--max-steps", "1"],
        "would replace the input",
    )
    assert (d / "cal.txt").read_text() == corpus.read_text()
    # a mix names every part; each is protected
    _refused(
        capsys,
        [
            "slice",
            str(src),
            "--sparsity",
            "0.25",
            "--calib",
            f"{corpus}+{d / 'cal.txt'}",
            "--nsamples",
            "4",
            "--seqlen",
            "32",
            "--out",
            str(d),
            "--overwrite",
        ],
        "would replace the input",
    )
