"""Sliced models load outside slicegpt's own loader: transformers' Auto classes and plain checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import slicegpt

from slicegpt.arch import UnsupportedModelError, spec_for_config
from slicegpt.core import uniform

from conftest import TINY_CONFIGS, calib_rows, make_tiny


def _uniform_accepts(family: str) -> bool:
    config = make_tiny(family, dtype=torch.float32).config
    try:
        uniform.check_supported(config, spec_for_config(config))
        return True
    except UnsupportedModelError:
        return False


# Every family whose standard config can express a uniform slice (the rest are refused, tested below).
UNIFORM_FAMILIES = [f for f in sorted(TINY_CONFIGS) if _uniform_accepts(f)]

PROMPT = [[5, 17, 42, 99, 3, 250, 11, 8]]


def _logits_and_greedy(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor(PROMPT)
    with torch.inference_mode():
        logits = model(input_ids=x, use_cache=False).logits
        gen = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0
        )
    return logits, gen


def test_per_layer_folder_loads_with_auto_class_and_device_map(tmp_path: Path) -> None:
    model = make_tiny("llama", dtype=torch.float32)
    slicegpt.slice_model(model, None, calib_rows(16), slicegpt.SliceConfig(sparsity=0.25, batch_size=4), progress=False)
    out = slicegpt.save(model, tmp_path / "m")
    assert (out / "modeling_slicegpt.py").is_file()
    logits, gen = _logits_and_greedy(model)
    child = textwrap.dedent(
        """
        import sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, device_map="auto")
        x = torch.tensor(%s)
        with torch.inference_mode():
            logits = m(input_ids=x, use_cache=False).logits
            gen = m.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0
            )
        torch.save({"logits": logits, "gen": gen, "map": dict(m.hf_device_map)}, sys.argv[2])
        """
        % json.dumps(PROMPT)
    )
    result = tmp_path / "r.pt"
    subprocess.run([sys.executable, "-c", child, str(out), str(result)], check=True)
    got = torch.load(result)
    assert torch.equal(got["logits"], logits)
    assert torch.equal(got["gen"], gen)
    assert set(got["map"].values()) == {"cpu"}


def test_uniform_families_cover_the_rms_sequential_ones() -> None:
    assert {"llama", "mistral", "qwen2", "qwen3", "mixtral"} <= set(UNIFORM_FAMILIES)


@pytest.mark.parametrize("family", UNIFORM_FAMILIES)
def test_uniform_is_a_standard_checkpoint_without_slicegpt(family: str, tmp_path: Path) -> None:
    model = make_tiny(family, dtype=torch.float32)
    tied = model.config.tie_word_embeddings
    report = slicegpt.slice_model(
        model, None, calib_rows(16), slicegpt.SliceConfig(sparsity=0.25, batch_size=4, uniform=True), progress=False
    )
    assert all(b.attn_shortcut is None and b.mlp_shortcut is None for b in model.model.layers)
    assert not any(w.attn_shortcut or w.mlp_shortcut for w in report.widths.layers)
    assert report.widths.head == report.widths.embedding == 48
    out = slicegpt.save(model, tmp_path / "u")
    logits, gen = _logits_and_greedy(model)
    child = textwrap.dedent(
        """
        import sys, torch
        sys.modules["slicegpt"] = None  # slicegpt cannot be imported in this process
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        x = torch.tensor(%s)
        with torch.inference_mode():
            logits = m(input_ids=x, use_cache=False).logits
            gen = m.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0
            )
        cfg = m.config
        torch.save({"logits": logits, "gen": gen, "hidden": cfg.hidden_size, "head_dim": cfg.head_dim,
                    "tied": m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()}, sys.argv[2])
        """
        % json.dumps(PROMPT)
    )
    result = tmp_path / "r.pt"
    subprocess.run([sys.executable, "-c", child, str(out), str(result)], check=True)
    got = torch.load(result)
    assert got["hidden"] == 48 and got["head_dim"] == 16
    assert got["tied"] == tied  # a tied source stays tied (and is counted once)
    assert torch.allclose(got["logits"], logits, atol=1e-4, rtol=0)
    assert torch.equal(got["gen"], gen)
    # slicegpt.load reads the same folder through transformers and keeps its provenance reachable
    loaded = slicegpt.load(out)
    assert type(loaded).__name__ == type(model).__name__
    assert loaded.slicegpt_metadata["mode"] == "uniform"
    assert loaded.slicegpt_metadata["params_after"] == report.params_after == slicegpt.count_parameters(loaded)
    with torch.inference_mode():
        assert torch.allclose(loaded(input_ids=torch.tensor(PROMPT)).logits, logits, atol=1e-4, rtol=0)


def test_uniform_unsliced_tied_model_is_exact() -> None:
    """One rotation, nothing sliced, head kept tied: the function is unchanged."""
    model = make_tiny("llama", dtype=torch.float64)
    x = torch.tensor(PROMPT)
    with torch.inference_mode():
        ref = model(input_ids=x).logits
    slicegpt.slice_model(
        model, None, calib_rows(16), slicegpt.SliceConfig(sparsity=0.0, batch_size=4, uniform=True), progress=False
    )
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.inference_mode():
        out = model(input_ids=x).logits
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_uniform_refuses_layernorm_families() -> None:
    model = make_tiny("opt", dtype=torch.float32)
    with pytest.raises(slicegpt.UnsupportedModelError, match="LayerNorm"):
        slicegpt.slice_model(
            model, None, calib_rows(4), slicegpt.SliceConfig(sparsity=0.25, uniform=True), progress=False
        )
