"""Shared fixtures: tiny random models of every supported family, built from configs (no download)."""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable

import pytest
import torch

# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB = 320

# One entry per family: model_type -> config class name and its kwargs. Small enough to run in
# float64 in milliseconds, but with GQA, biases and every optional module the family has.
_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=256)
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **_COMMON)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, sliding_window=None, **_COMMON)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **_COMMON)),
    "qwen3": ("Qwen3Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, **_COMMON)),
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


def make_tiny(model_type: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    import transformers

    cls_name, kwargs = TINY_CONFIGS[model_type]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomise_norms(model, seed)
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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> "Path":
    """A dense tiny Llama with a tokenizer, saved as a local HF folder, plus a text file."""
    from pathlib import Path

    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny("llama", dtype=torch.float32)
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "corpus.txt").write_text(SAMPLE_TEXT)
    return Path(root)
