"""Models people can run: small files (the saved dtype), quantized GGUF, provenance in every output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import slicegpt
from slicegpt.cli import main
from slicegpt.io.gguf import export_gguf
from slicegpt.io.models import source_dtype


def _dtypes(folder: Path) -> set[str]:
    out = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            out |= {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}
    return out


@pytest.mark.parametrize("stream", ["on", "off"])
def test_save_dtype_halves_the_files_and_loads_unchanged(tiny_model_dir: Path, tmp_path: Path, stream: str) -> None:
    model, corpus = str(tiny_model_dir / "model"), str(tiny_model_dir / "corpus.txt")
    common = [
        "slice",
        model,
        "--uniform",
        "--sparsity",
        "0.25",
        "--calib",
        corpus,
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--stream",
        stream,
        "--no-samples",
    ]
    assert main(common + ["--out", str(tmp_path / "auto")]) == 0  # a float32 source: float32 files
    assert main(common + ["--out", str(tmp_path / "bf16"), "--save-dtype", "bf16"]) == 0
    assert _dtypes(tmp_path / "auto") == {"F32"} and _dtypes(tmp_path / "bf16") == {"BF16"}
    size = lambda d: sum(f.stat().st_size for f in (tmp_path / d).glob("*.safetensors"))  # noqa: E731
    assert size("bf16") < 0.52 * size("auto")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    ids = torch.randint(0, 300, (1, 24))
    a, b = slicegpt.load(tmp_path / "auto"), slicegpt.load(tmp_path / "bf16")
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert (la - lb).abs().max() / la.abs().max() < 2e-2  # bf16 rounding of the weights only


def test_the_save_default_follows_the_source(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert source_dtype(str(tiny_model_dir / "model")) == "float32"
    for outtype, want in (("f32", "float32"), ("f16", "float16"), ("q8_0", "bfloat16"), ("bf16", "bfloat16")):
        gguf_file = export_gguf(tiny_model_dir / "model", tmp_path / f"m-{outtype}.gguf", outtype=outtype)
        assert source_dtype(str(gguf_file)) == want, outtype


def _small(tiny_model_dir: Path) -> list[str]:
    """A quick calibration for the tiny model: 4 rows of 32 tokens of its corpus, no samples shown."""
    return ["--calib", str(tiny_model_dir / "corpus.txt"), "--nsamples", "4", "--seqlen", "32", "--no-samples"]


def _weights(folder: Path) -> dict[str, str]:
    import hashlib

    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.glob("*.safetensors")}


def test_compress_runs_the_pipeline_and_its_recipe_remakes_the_folder(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    import gguf
    import yaml

    model, corpus = str(tiny_model_dir / "model"), str(tiny_model_dir / "corpus.txt")
    out = tmp_path / "small"
    assert (
        main(
            [
                "compress",
                model,
                "--size",
                "0.85",
                "--calib",
                corpus,
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--gguf",
                "q8_0",
                "--recover",
                "2048",
                "--recover-data",
                corpus,
                "--out",
                str(out),
                "--no-samples",
            ]
        )
        == 0
    )
    files = {p.name for p in out.iterdir()}
    assert {"README.md", "recipe.yaml", "small-q8_0.gguf", "config.json", "model.safetensors"} <= files
    assert not list(tmp_path.glob(".small*"))  # the intermediate sliced folder is gone
    meta = slicegpt.read_metadata(out)
    assert (
        meta["mode"] == "uniform"
        and meta["params_after"] <= 0.85 * meta["params_before"]
        and meta["recovery"]["tokens"] > 0
    )
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["slice"]["target_params"] == 0.85 and recipe["slice"]["uniform"] is True
    assert recipe["recover"]["tokens"] == 2048 and recipe["export"] == {"outtype": "q8_0"}
    assert recipe["model"] == str(Path(model).resolve()) and recipe["source_fingerprint"]
    card = (out / "README.md").read_text()
    assert (
        card.startswith("---\n")
        and "pipeline_tag: text-generation" in card
        and "slicegpt compress --recipe recipe.yaml" in card
    )
    assert "Recovery" in card and f"{meta['params_after'] / 1e6:.2f}M" in card
    reader = gguf.GGUFReader(out / "small-q8_0.gguf")
    assert reader.fields["general.name"].contents() == "small"
    # MLP neurons rounded to the quantization block: every matrix is quantized, none left f16
    assert recipe["slice"]["round_to"] % 32 == 0 and meta["widths"]["layers"][0]["mlp"] % 32 == 0
    matrices = [t for t in reader.tensors if len(t.shape) > 1 or t.shape[0] > 64]
    assert matrices and all(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in matrices)
    # one command remakes it, bit for bit
    again = tmp_path / "again"
    assert main(["compress", "--recipe", str(out / "recipe.yaml"), "--out", str(again), "--no-samples"]) == 0
    assert _weights(again) == _weights(out)
    # a recipe naming a setting that does not exist is refused before any work
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**recipe, "slice": {**recipe["slice"], "sparsty": 0.3}}))
    capsys.readouterr()
    assert main(["compress", "--recipe", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "unknown settings: sparsty" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_eval_update_card_adds_what_it_measured(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, corpus = str(tiny_model_dir / "model"), str(tiny_model_dir / "corpus.txt")
    out = tmp_path / "s"
    assert (
        main(
            [
                "slice",
                model,
                "--uniform",
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
                "--no-samples",
            ]
        )
        == 0
    )
    assert "No measurement yet" in (out / "README.md").read_text()
    assert (
        main(
            [
                "eval",
                str(out),
                "--ppl",
                corpus,
                "--seqlen",
                "32",
                "--max-rows",
                "4",
                "--compare",
                model,
                "--update-card",
            ]
        )
        == 0
    )
    card = (out / "README.md").read_text()
    assert "| perplexity," in card and "No measurement yet" not in card
    results = json.loads((out / "results.json").read_text())
    (row,) = results.values()
    assert row["model"] > 1 and row["source"] > 1
    assert main(["eval", model, "--ppl", corpus, "--update-card"]) == 2  # only a sliced folder has a card to update


def test_output_folders_get_the_users_usual_permissions(tiny_model_dir: Path, tmp_path: Path) -> None:
    import os
    import stat

    out = tmp_path / "s"
    assert (
        main(["slice", str(tiny_model_dir / "model"), "--sparsity", "0.25", *_small(tiny_model_dir), "--out", str(out)])
        == 0
    )
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's private 0700


def test_inspect_builds_the_dense_model_a_uniform_budget_folder_came_from(tiny_model_dir: Path, tmp_path: Path) -> None:
    """It built 'dense' from the compressed config: FLOPs per token 0.0% removed and wrong dense counts."""
    from slicegpt.evaluation.inspect import inspect_folder

    out = tmp_path / "u"
    assert (
        main(
            [
                "slice",
                str(tiny_model_dir / "model"),
                "--target-params",
                "0.8",
                "--axes",
                "mlp",
                *_small(tiny_model_dir),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    info = inspect_folder(out)
    assert info["standard_checkpoint"] and info["layers"][0]["mlp_neurons"] < 96
    assert all(
        layer["params_dense"] > layer["params"] and layer["flops_dense"] > layer["flops"] for layer in info["layers"]
    )
    assert info["share_flops_removed"] > 0.1


def test_compress_refuses_bad_input_before_any_work_and_never_replaces_its_recipe(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    """compress given adversarially: a missing recovery file, a fractional token count, an unknown
    calibration source, --per-layer with --gguf, and --out the folder holding the --recipe it
    reads: each one line, before any slicing, with nothing written."""
    model = str(tiny_model_dir / "model")
    small = _small(tiny_model_dir)
    out = tmp_path / "o"

    def error(*argv: str) -> str:
        assert main(["compress", *argv]) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    nope = str(tmp_path / "nope.txt")
    assert error(model, *small, "--recover", "1000", "--recover-data", nope, "--out", str(out)) == (
        f"slicegpt: error: recovery file not found: {nope}"
    )
    assert "whole number of tokens" in error(model, *small, "--recover", "0.5", "--out", str(out))
    assert "unknown calibration source 'wikk'" in error(model, "--calib", "wikk", "--out", str(out))
    assert "drop --per-layer" in error(model, *small, "--per-layer", "--gguf", "q8_0", "--out", str(out))
    assert not out.exists() and not list(tmp_path.glob(".o*"))
    assert main(["compress", model, *small, "--out", str(out)]) == 0
    capsys.readouterr()
    before = (out / "recipe.yaml").read_bytes()
    for recipe in (out, out / "recipe.yaml"):
        assert "would replace the input" in error("--recipe", str(recipe), "--out", str(out), "--overwrite")
    assert (out / "recipe.yaml").read_bytes() == before


@pytest.mark.parametrize("kind", ["uniform budget", "per-layer budget", "per-layer SliceGPT", "recovered"])
def test_inspect_is_right_on_every_folder_kind(tiny_model_dir: Path, tmp_path: Path, kind: str) -> None:
    """inspect's counts are the folder's: the compressed count the run recorded (and what loading
    gives), the dense count of the source, and FLOPs that never grow."""
    from slicegpt.evaluation.inspect import inspect_folder
    from slicegpt.io.format import read_metadata

    model, corpus = str(tiny_model_dir / "model"), str(tiny_model_dir / "corpus.txt")
    small = _small(tiny_model_dir)
    size = {
        "uniform budget": ["--target-params", "0.8"],
        "per-layer budget": ["--target-params", "0.8", "--per-layer"],
        "per-layer SliceGPT": ["--sparsity", "0.25"],
        "recovered": ["--target-params", "0.8"],
    }[kind]
    out = tmp_path / "s"
    assert main(["slice", model, *size, *small, "--out", str(out)]) == 0
    if kind == "recovered":
        rec = tmp_path / "r"
        argv = ["recover", str(out), "--data", corpus, "--tokens", "256", "--seqlen", "32", "--batch-size", "2"]
        assert main([*argv, "--out", str(rec), "--no-samples"]) == 0
        out = rec
    info = inspect_folder(out)
    meta = read_metadata(out)
    dense = slicegpt.count_parameters(slicegpt.load_model(model)[0])
    assert info["params_dense"] == dense == meta["params_before"]
    assert info["params"] == meta["params_after"]
    # a per-layer SliceGPT folder at 25% grows (shortcut matrices); every budget folder shrinks
    assert (info["params"] < 0.8 * dense + 1) == (kind != "per-layer SliceGPT")
    assert all(layer["flops"] <= layer["flops_dense"] for layer in info["layers"])
    assert info["share_params_removed"] == pytest.approx(1 - info["params"] / dense)


def test_export_says_which_matrices_stay_f16_for_their_width(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    import gguf

    out = tmp_path / "s"
    small = _small(tiny_model_dir)
    assert main(["slice", str(tiny_model_dir / "model"), "--target-params", "0.8", *small, "--out", str(out)]) == 0
    assert slicegpt.read_metadata(out)["widths"]["layers"][0]["mlp"] % 32  # round_to 8: not a block multiple
    capsys.readouterr()
    path = export_gguf(out, tmp_path / "s.gguf", outtype="q8_0")
    err = capsys.readouterr().err  # the command line's notes handler (installed by main) shows it
    assert "stay f16 in the GGUF" in err and "slice with --round-to 32" in err
    down = [t for t in gguf.GGUFReader(path).tensors if t.name.endswith("ffn_down.weight")]
    assert down and all(t.tensor_type == gguf.GGMLQuantizationType.F16 for t in down)
