#!/usr/bin/env python3
"""Integration check, outside the test suite: does llama.cpp run an exported GGUF like transformers?

Given a .gguf written by ``slicegpt export`` and the Hugging Face folder it came from, both
evaluate the same token ids (the folder's tokenizer applied to the start of the built-in 'wiki'
evaluation text, or a file), and the next-token logits and perplexities are compared. The
tokenizer in the GGUF is checked too: llama.cpp tokenizes the same text and the ids must match.

llama.cpp keeps its KV cache in f16 by default, so even an f32 file differs from transformers by
about 1e-3 in the logits; expect ~1e-2 with f16 weights.

Needs ``llama-cpp-python`` (``pip install llama-cpp-python``; it builds llama.cpp from source).

    python scripts/llamacpp_check.py --gguf out.gguf --hf FOLDER [--tokens 256] [--json check.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _text(source: str) -> str:
    if source == "wiki":
        from slicegpt.data import load_text

        return load_text("wiki", "evaluation")
    return Path(source).read_text(encoding="utf-8")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _perplexity(logits: np.ndarray, ids: list[int]) -> float:
    # logits[t] predicts ids[t + 1]
    lp = _log_softmax(logits[:-1])
    nll = -lp[np.arange(len(ids) - 1), ids[1:]]
    return float(math.exp(nll.mean()))


def hf_logits(folder: str, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    import slicegpt

    # a sliced folder of any kind through slicegpt (per-layer widths need its modules), else transformers
    # in float32 whatever the folder was saved in (bf16 folders: numpy has no bfloat16)
    model = (
        slicegpt.load(folder, dtype=torch.float32)
        if slicegpt.io.format.is_sliced_folder(folder)
        else AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _detokenize(llm: Any, ids: list[int]) -> str:
    """llama.cpp's own llama_detokenize (Llama.detokenize goes token by token through a 32-byte
    buffer and silently drops longer pieces)."""
    import ctypes

    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    size = 8 * len(ids) + 64
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buf, size, False, False)
        if n >= 0:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = -n  # too small: llama.cpp says how much it needs
    raise RuntimeError("llama_detokenize kept asking for a larger buffer")


def llamacpp_run(
    gguf: str, ids: list[int], text: str, text_ids: list[int], threads: int
) -> tuple[np.ndarray, list[int], str, dict[str, str]]:
    from llama_cpp import Llama

    n = len(ids)
    llm = Llama(
        model_path=gguf, logits_all=True, n_ctx=max(n, 512), n_batch=max(n, 512), n_threads=threads, verbose=False
    )
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[:n], dtype=np.float32)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    decoded = _detokenize(llm, text_ids)
    meta = dict(llm.metadata)
    llm.close()  # free now: at interpreter exit llama_cpp's finaliser can run after its library is gone
    return logits, tokens, decoded, meta


def compare(ref: np.ndarray, got: np.ndarray, ids: list[int]) -> dict[str, Any]:
    diff = np.abs(ref - got)
    lp_ref, lp_got = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(lp_ref) * (lp_ref - lp_got)).sum(-1)  # KL(transformers || llama.cpp) per position
    return {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit": float(np.abs(ref).max()),
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "ppl_transformers": _perplexity(ref, ids),
        "ppl_llamacpp": _perplexity(got, ids),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True, help="the exported .gguf")
    p.add_argument("--hf", required=True, help="the Hugging Face folder it was exported from")
    p.add_argument("--text", default="wiki", help="'wiki' (built-in evaluation text) or a text file")
    p.add_argument("--tokens", type=int, default=256, help="evaluate the first N tokens")
    p.add_argument("--tokenize-chars", type=int, default=4000, help="compare tokenizations on the first N characters")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    text = _text(args.text)
    tokenizer = AutoTokenizer.from_pretrained(args.hf)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens]

    t0 = time.perf_counter()
    ref = hf_logits(args.hf, ids)
    t1 = time.perf_counter()
    sample = text[: args.tokenize_chars]
    hf_tokens = tokenizer(sample, add_special_tokens=False)["input_ids"]
    got, cpp_tokens, cpp_decoded, meta = llamacpp_run(args.gguf, ids, sample, hf_tokens, args.threads)
    t2 = time.perf_counter()
    if got.shape != ref.shape:
        print(f"shape mismatch: transformers {ref.shape}, llama.cpp {got.shape}", file=sys.stderr)
        return 1

    first_diff = next((i for i, (a, b) in enumerate(zip(hf_tokens, cpp_tokens)) if a != b), None)
    if first_diff is None and len(hf_tokens) != len(cpp_tokens):
        first_diff = min(len(hf_tokens), len(cpp_tokens))
    result: dict[str, Any] = {
        "gguf": args.gguf,
        "hf": args.hf,
        "text": args.text,
        "tokens": len(ids),
        **compare(ref, got, ids),
        "tokenizer_match": first_diff is None,
        "tokenizer_first_mismatch": first_diff,
        "tokenized_chars": len(sample),
        # llama.cpp turns the transformers ids back into the text transformers decodes them to
        "detokenizer_match": cpp_decoded == tokenizer.decode(hf_tokens),
        # the chat template travels with the file, as transformers' tokenizer has it
        "chat_template_match": meta.get("tokenizer.chat_template") == getattr(tokenizer, "chat_template", None),
        "seconds_transformers": round(t1 - t0, 2),
        "seconds_llamacpp": round(t2 - t1, 2),
        "gguf_metadata": {
            k: v
            for k, v in meta.items()
            if not k.startswith("tokenizer.") or k in ("tokenizer.ggml.pre", "tokenizer.ggml.model")
        },
    }

    rows = [
        ("tokens evaluated", f"{len(ids)}"),
        ("perplexity transformers", f"{result['ppl_transformers']:.4f}"),
        ("perplexity llama.cpp", f"{result['ppl_llamacpp']:.4f}"),
        ("max |logit diff|", f"{result['max_abs_logit_diff']:.4g} (max |logit| {result['max_abs_logit']:.3g})"),
        ("mean |logit diff|", f"{result['mean_abs_logit_diff']:.4g}"),
        ("top-1 agreement", f"{result['top1_agreement'] * 100:.2f}%"),
        ("KL mean / max (nats)", f"{result['mean_kl']:.3g} / {result['max_kl']:.3g}"),
        ("tokenizer", "same ids" if first_diff is None else f"differs at token {first_diff} of {len(hf_tokens)}"),
        ("detokenizer", "same text" if result["detokenizer_match"] else "differs"),
        ("chat template", "the same" if result["chat_template_match"] else "differs or missing"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{Path(args.gguf).name} (llama.cpp) vs {args.hf} (transformers)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
