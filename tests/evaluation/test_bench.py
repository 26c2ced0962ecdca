"""Tests for slicegpt.evaluation.bench and .flops: FLOP accounting from real shapes, the timing
harness on tiny random models (dense and with hand-made sliced blocks) and the CLI command.

Only positivity/structure of timings is asserted; speed goals live in benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from slicegpt.arch import UnsupportedModelError
from slicegpt.cli.bench import add_arguments, measure
from slicegpt.core.modules import SlicedBlock
from slicegpt.evaluation.bench import BenchConfig, benchmark, compare, format_table
from slicegpt.evaluation.flops import find_decoder_layers, flops_breakdown, flops_per_token

VOCAB = 256
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS  # 16


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
    )
    return LlamaForCausalLM(config).eval()


def narrow(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
    """A smaller copy of `linear` keeping the leading rows/columns (what slicing does after rotation)."""
    in_features = in_features or linear.in_features
    out_features = out_features or linear.out_features
    new = nn.Linear(in_features, out_features, bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:out_features, :in_features])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[:out_features])
    return new


def sliced_block(layer: nn.Module, d_in: int, d_mid: int, d_out: int) -> SlicedBlock:
    """A SliceGPT block made by hand: the layer's own attention and MLP with narrower Linear
    in/out features, and shortcut matrices that map the residual stream between the (different)
    widths before and after each branch."""
    attn, mlp = layer.self_attn, layer.mlp
    attn.q_proj = narrow(attn.q_proj, in_features=d_in)
    attn.k_proj = narrow(attn.k_proj, in_features=d_in)
    attn.v_proj = narrow(attn.v_proj, in_features=d_in)
    attn.o_proj = narrow(attn.o_proj, out_features=d_mid)
    mlp.gate_proj = narrow(mlp.gate_proj, in_features=d_mid)
    mlp.up_proj = narrow(mlp.up_proj, in_features=d_mid)
    mlp.down_proj = narrow(mlp.down_proj, out_features=d_out)
    block = SlicedBlock(attn, mlp, attn_name="self_attn", mlp_name="mlp", topology="sequential", width=HIDDEN, eps=1e-6)
    block.set_shortcut("attn_shortcut", torch.eye(d_in, d_mid), torch.float32)
    block.set_shortcut("mlp_shortcut", torch.eye(d_mid, d_out), torch.float32)
    return block


# (d_in, d_mid, d_out) per layer; d_out of layer i is d_in of layer i + 1.
SLICED_DIMS = [(56, 48, 48), (48, 40, 40)]


def sliced_like_llama(seed: int = 0) -> LlamaForCausalLM:
    model = tiny_llama(seed)
    inner = model.model
    inner.layers = nn.ModuleList(sliced_block(layer, *dims) for layer, dims in zip(inner.layers, SLICED_DIMS))
    first_width, last_width = SLICED_DIMS[0][0], SLICED_DIMS[-1][2]
    embed = nn.Embedding(VOCAB, first_width)
    with torch.no_grad():
        embed.weight.copy_(inner.embed_tokens.weight[:, :first_width])
    inner.embed_tokens = embed
    inner.norm = LlamaRMSNorm(last_width)
    model.lm_head = narrow(model.lm_head, in_features=last_width)
    return model.eval()


def test_flops_per_token_matches_hand_count_for_dense_llama() -> None:
    model = tiny_llama()
    seq = 16
    q = o = 2 * 64 * 64  # 4 heads x 16 = 64
    k = v = 2 * 64 * 32  # 2 kv heads x 16 = 32
    gate = up = down = 2 * 64 * 128
    per_layer_linear = q + k + v + o + gate + up + down  # 73_728
    lm_head = 2 * 64 * 256
    attention_per_layer = 2 * 2 * seq * 4 * 16  # QK^T + AV over seq keys, 4 query heads of 16
    expected = 2 * per_layer_linear + lm_head + 2 * attention_per_layer
    assert expected == 188_416
    assert flops_per_token(model, seq) == expected

    parts = flops_breakdown(model, seq)
    assert parts == {
        "decoder_linear": 147_456.0,
        "lm_head": 32_768.0,
        "other_linear": 0.0,
        "shortcut": 0.0,
        "attention": 8_192.0,
    }
    # Attention is the only seq-dependent term: 512 FLOPs per extra context position here.
    assert flops_per_token(model, 116) - flops_per_token(model, 16) == 100 * 2 * 2 * 2 * 4 * 16


def test_decoder_layers_are_found_from_the_family_spec() -> None:
    model = tiny_llama()
    assert find_decoder_layers(model) is model.model.layers
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=128, n_positions=64))
    assert find_decoder_layers(gpt2) is gpt2.transformer.h
    assert find_decoder_layers(sliced_like_llama()) is not None  # sliced blocks sit in the same list


def test_unsupported_family_is_a_clear_error() -> None:
    class Other(nn.Module):
        config = LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
        config.model_type = "mamba"

        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(LAYERS))

    with pytest.raises(UnsupportedModelError, match="FLOPs.*model_type='mamba'.*supported: .*llama"):
        flops_per_token(Other(), 16)


def test_flops_follow_actual_shapes_and_count_shortcuts() -> None:
    model = sliced_like_llama()
    seq = 16
    expected_linear = 0
    expected_shortcut = 0
    for d_in, d_mid, d_out in SLICED_DIMS:
        expected_linear += 2 * d_in * (64 + 32 + 32)  # q, k, v keep their (head) output width
        expected_linear += 2 * 64 * d_mid  # o_proj
        expected_linear += 2 * 2 * d_mid * 128 + 2 * 128 * d_out  # gate, up, down
        expected_shortcut += 2 * d_in * d_mid + 2 * d_mid * d_out
    expected_head = 2 * SLICED_DIMS[-1][2] * VOCAB
    expected_attention = LAYERS * 2 * 2 * seq * HEADS * HEAD_DIM

    parts = flops_breakdown(model, seq)
    assert parts["decoder_linear"] == expected_linear
    assert parts["shortcut"] == expected_shortcut
    assert parts["lm_head"] == expected_head
    assert parts["attention"] == expected_attention
    assert parts["other_linear"] == 0
    total = flops_per_token(model, seq)
    assert total == expected_linear + expected_shortcut + expected_head + expected_attention
    assert total < flops_per_token(tiny_llama(), seq)


def test_flops_count_hf_conv1d() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64))
    seq = 8
    per_layer = 2 * 32 * 96 + 2 * 32 * 32 + 2 * 32 * 128 + 2 * 128 * 32  # c_attn, attn c_proj, c_fc, mlp c_proj
    expected = 2 * per_layer + 2 * 32 * 128 + 2 * (2 * 2 * seq * 2 * 16)
    assert flops_per_token(model, seq) == expected


def _assert_metrics(metrics: dict[str, Any], batch_size: int, gen_len: int) -> None:
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token", "ttft_ms"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0, key
    assert metrics["decode_steps"] == gen_len - 1
    assert metrics["peak_mem_mb"] is None or metrics["peak_mem_mb"] > 0
    assert len(metrics["raw"]["prefill_s"]) == 2


def test_compare_dense_vs_sliced_like(tmp_path: Path) -> None:
    dense, sliced = tiny_llama(), sliced_like_llama()
    config = BenchConfig(prompt_len=16, gen_len=4, batch_sizes=(1, 2), repeats=2, warmup=1, progress=False)
    result = compare(dense, sliced, VOCAB, config)

    # Must survive a JSON round trip (that is what --json writes).
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(result, allow_nan=False))
    loaded = json.loads(path.read_text())

    assert loaded["device"] == "cpu"
    assert loaded["dtype"] == "float32"
    assert loaded["device_name"]
    assert loaded["torch_threads"] >= 1
    assert loaded["names"] == ["dense", "sliced"]
    assert [entry["batch_size"] for entry in loaded["results"]] == [1, 2]

    flops_dense = flops_per_token(dense, 16)
    flops_sliced = flops_per_token(sliced, 16)
    assert loaded["models"]["dense"]["flops_per_token_prefill"] == flops_dense
    for entry in loaded["results"]:
        for name in ("dense", "sliced"):
            _assert_metrics(entry["metrics"][name], entry["batch_size"], gen_len=4)
        for metric in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            measured = entry["measured_ratio"][metric]
            predicted = entry["predicted_ratio"][metric]
            assert measured > 0
            assert measured == pytest.approx(entry["metrics"]["sliced"][metric] / entry["metrics"]["dense"][metric])
            assert entry["measured_over_predicted"][metric] == pytest.approx(measured / predicted)
        assert entry["predicted_ratio"]["prefill_tokens_per_s"] == pytest.approx(flops_dense / flops_sliced)
        assert entry["predicted_ratio"]["decode_tokens_per_s"] > 1  # the sliced model does less work

    table = format_table(loaded)
    assert "measured sliced/dense" in table and "decode_tokens_per_s" in table
    assert table.count("\n| 2 | ") >= 2  # a row per model at batch size 2


def test_benchmark_via_generate() -> None:
    config = BenchConfig(
        prompt_len=8, gen_len=3, batch_sizes=(2,), repeats=2, warmup=1, decode_method="generate", progress=False
    )
    result = benchmark(tiny_llama(), VOCAB, config)
    assert result["kind"] == "benchmark"
    metrics = result["results"][0]["metrics"]["model"]
    _assert_metrics(metrics, batch_size=2, gen_len=3)
    assert "| 2 | model |" in format_table(result)


@pytest.mark.parametrize("decode_method", ["manual", "generate"])
def test_static_cache_decodes_dense_and_sliced_like(decode_method: str) -> None:
    config = BenchConfig(
        prompt_len=8,
        gen_len=3,
        batch_sizes=(2,),
        repeats=2,
        warmup=0,
        cache="static",
        decode_method=decode_method,
        progress=False,
    )
    result = compare(tiny_llama(), sliced_like_llama(), VOCAB, config)
    assert result["config"]["cache"] == "static"
    for metrics in result["results"][0]["metrics"].values():
        _assert_metrics(metrics, batch_size=2, gen_len=3)
    assert "static KV cache" in format_table(result)


def test_static_cache_gives_the_tokens_of_the_dynamic_one() -> None:
    from slicegpt.evaluation.bench import _decode_manual  # the loop both caches run through

    model = sliced_like_llama()
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    seen: dict[str, list[torch.Tensor]] = {}
    for cache in ("dynamic", "static"):
        tokens: list[torch.Tensor] = []
        handle = model.register_forward_hook(lambda _m, _a, out: tokens.append(out.logits[:, -1].argmax(-1)))
        try:
            with torch.no_grad():
                _decode_manual(
                    model, ids, BenchConfig(prompt_len=8, gen_len=5, cache=cache, progress=False), torch.device("cpu")
                )
        finally:
            handle.remove()
        seen[cache] = tokens
    assert len(seen["static"]) == 5 and all(torch.equal(a, b) for a, b in zip(seen["dynamic"], seen["static"]))


class CacheDroppingLayer(nn.Module):
    """A buggy block that never hands the KV cache to attention."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
        return self.layer(hidden_states, **kwargs)


def test_decoder_layers_that_ignore_the_cache_are_rejected() -> None:
    model = tiny_llama()
    model.model.layers = nn.ModuleList(CacheDroppingLayer(layer) for layer in model.model.layers)
    config = BenchConfig(prompt_len=8, gen_len=2, batch_sizes=(1,), repeats=1, warmup=0, progress=False)
    with pytest.raises(RuntimeError, match="KV cache"):
        benchmark(model, VOCAB, config)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="gen_len"):
        BenchConfig(gen_len=1)
    with pytest.raises(ValueError, match="dtype"):
        BenchConfig(dtype="float8")
    with pytest.raises(ValueError, match="decode_method"):
        BenchConfig(decode_method="beam")
    with pytest.raises(ValueError, match="cache"):
        BenchConfig(cache="paged")
    assert BenchConfig(batch_sizes=[4, 1]).batch_sizes == (4, 1)  # type: ignore[arg-type]


def test_cli_compare_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loaded: list[tuple[str, str, str]] = []

    def load_model(path: str, device: str, dtype: str) -> tuple[nn.Module, int]:
        loaded.append((path, device, dtype))
        return (sliced_like_llama() if path == "sliced_dir" else tiny_llama()), VOCAB

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "out" / "bench.json"
    args = parser.parse_args(
        [
            "sliced_dir",
            "--compare",
            "dense_dir",
            "--device",
            "cpu",
            "--batch-sizes",
            "1,2",
            "--prompt-len",
            "8",
            "--gen-len",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--names",
            "dense,sliced",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    result = measure(args, load_model)

    assert loaded == [("sliced_dir", "cpu", "float32"), ("dense_dir", "cpu", "float32")]
    written = json.loads(out.read_text())
    assert written["kind"] == "compare"
    assert written["paths"] == {"dense": "dense_dir", "sliced": "sliced_dir"}
    assert written["config"]["batch_sizes"] == [1, 2]
    assert written["results"][1]["measured_ratio"]["decode_tokens_per_s"] > 0
    assert result["names"] == ["dense", "sliced"]
    assert "measured sliced/dense" in capsys.readouterr().out


def test_cli_rejects_bad_batch_sizes() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--batch-sizes", "1,x"])
