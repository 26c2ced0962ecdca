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
    common = ["slice", model, "--uniform", "--sparsity", "0.25", "--calib", corpus, "--nsamples", "4", "--seqlen", "32",
              "--stream", stream, "--no-samples"]
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
