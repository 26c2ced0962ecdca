"""Shared fixtures: tiny random models of every supported family, built from configs (no download)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB = 320

# One entry per family (or per variant of a family that slices differently): key -> config class
# name and its kwargs. Small enough to run in float64 in milliseconds, but with GQA, biases and
# every optional module the family has.
_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=256)
_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, **_COMMON)
# Sliding windows shorter than the test inputs, so that sliding and global layers really differ.
_GEMMA = dict(
    hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1, head_dim=16, **_COMMON
)
_MOE = dict(num_experts_per_tok=2, num_key_value_heads=2, num_attention_heads=4, hidden_size=64, **_COMMON)
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(num_hidden_layers=3, tie_word_embeddings=True, **_LLAMA_LIKE)),
    "mistral": ("MistralConfig", dict(num_hidden_layers=3, sliding_window=None, **_LLAMA_LIKE)),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=3, tie_word_embeddings=True, **_LLAMA_LIKE)),
    "qwen3": ("Qwen3Config", dict(num_hidden_layers=3, head_dim=16, **_LLAMA_LIKE)),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            enable_bias=True,
            pad_token_id=1,
            **_COMMON,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        dict(
            n_embd=64,
            n_inner=96,
            n_layer=2,
            n_head=4,
            n_positions=256,
            vocab_size=VOCAB,
            bos_token_id=0,
            eos_token_id=1,
        ),
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            rotary_pct=0.5,
            use_parallel_residual=True,
            attention_bias=True,
            bos_token_id=0,
            eos_token_id=1,
            **_COMMON,
        ),
    ),
    "gpt_neox_sequential": (
        "GPTNeoXConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            rotary_pct=0.5,
            use_parallel_residual=False,
            bos_token_id=0,
            eos_token_id=1,
            **_COMMON,
        ),
    ),
    "gptj": (
        "GPTJConfig",
        dict(
            n_embd=64,
            n_inner=96,
            n_layer=2,
            n_head=4,
            rotary_dim=8,
            n_positions=256,
            vocab_size=VOCAB,
            bos_token_id=0,
            eos_token_id=1,
        ),
    ),
    "phi": (
        "PhiConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            partial_rotary_factor=0.5,
            qk_layernorm=True,
            bos_token_id=0,
            eos_token_id=1,
            **_COMMON,
        ),
    ),
    "phi3": ("Phi3Config", dict(num_hidden_layers=2, pad_token_id=0, bos_token_id=0, eos_token_id=1, **_LLAMA_LIKE)),
    "gemma": ("GemmaConfig", dict(num_hidden_layers=2, **_GEMMA)),
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=2, sliding_window=8, query_pre_attn_scalar=16, **_GEMMA)),
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(
            num_hidden_layers=3,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            **_GEMMA,
        ),
    ),
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_hidden_layers=2, num_local_experts=4, **_MOE)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=4,
            num_hidden_layers=3,
            mlp_only_layers=[1],
            qkv_bias=True,
            **_MOE,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=4,
            num_hidden_layers=2,
            head_dim=16,
            mlp_only_layers=[0],
            **_MOE,
        ),
    ),
}


def randomise_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every norm a non-trivial scale (and bias) so that folding them is really tested."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 2)
        if "norm" in name.lower() or "ln" in leaf[-2].lower():
            if name.endswith("weight"):
                p.data = (0.5 + torch.rand(p.shape, generator=gen)).to(p.dtype)
            elif name.endswith("bias"):
                p.data = (0.1 * torch.randn(p.shape, generator=gen)).to(p.dtype)


def randomise_biases(model: torch.nn.Module, seed: int = 0) -> None:
    """Linear biases start at zero; make them non-zero so that centring and folding move them."""
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("bias") and not ("norm" in name.lower() or "ln" in name.rsplit(".", 2)[-2].lower()):
            p.data = (0.1 * torch.randn(p.shape, generator=gen)).to(p.dtype)


def make_tiny(model_type: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    import transformers

    cls_name, kwargs = TINY_CONFIGS[model_type]
    if dtype == torch.float64:
        # transformers' default fused-experts kernel (grouped_mm) has no float64 path.
        kwargs = {**kwargs, "experts_implementation": "eager"}
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomise_norms(model, seed)
    randomise_biases(model, seed)
    return model.to(dtype).eval()


@pytest.fixture
def tiny() -> Callable[..., torch.nn.Module]:
    return make_tiny


def calib_rows(n: int = 8, seqlen: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def have(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.\n"
    "All that glitters is not gold. Knowledge is power, and time is money.\n\n"
) * 40


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE trained in memory on SAMPLE_TEXT: a real fast tokenizer, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A dense tiny Llama with a tokenizer, saved as a local HF folder, plus a text file."""

    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny("llama", dtype=torch.float32)
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "corpus.txt").write_text(SAMPLE_TEXT)
    return Path(root)
