"""Compressed and quantized against quantized alone, in llama.cpp: file size, perplexity and speed.

    .venv/bin/python benchmarks/llamacpp_sizes.py --models dense=SmolLM2-135M-Instruct,uniform=DIR,per-layer=DIR2 \\
        --types f16,q8_0,q4_k_m,q3_k_m --rows 32

Needs llama-cpp-python (pip install 'slicegpt[gguf-quant]': a source build). For every model and
type: `slicegpt export` writes the GGUF (the dense model from the folder slicegpt converts the
shipped GGUF into; a per-layer folder goes to llama.cpp's deci architecture), then llama.cpp
computes the perplexity of the first --rows rows of 1024 tokens of the 'wiki' evaluation part
and of 'lambada' (novels), tokenized by the model's own tokenizer, every prediction of a row
counted as transformers counts it, and times prefill (512 tokens) and decoding (64 tokens) at
batch 1 with --threads threads. Results: benchmarks/results/llamacpp_sizes.json, a markdown
table, and with --plot a PNG of perplexity against file size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GGUF_DIR = RESULTS / "llamacpp_models"


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def rows_of(folder: str, data: str, n: int) -> list[list[int]]:
    """The first ``n`` evaluation rows of ``data`` as slicegpt's perplexity cuts them (1024 tokens)."""
    from transformers import AutoTokenizer

    from slicegpt.data import cut_rows, load_text, tokenize

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return cut_rows(tokenize(tokenizer, load_text(data, "evaluation")), 1024)[:n].tolist()


def measure(gguf: Path, rows: dict[str, list[list[int]]], threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), logits_all=True, n_ctx=1024, n_batch=1024, n_threads=threads, verbose=False)
    out: dict = {}
    for data, data_rows in rows.items():
        nll, count = 0.0, 0
        for ids in data_rows:
            llm.reset()
            llm.eval(ids)
            logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
            lp = _log_softmax(logits[:-1])
            nll -= float(lp[np.arange(len(ids) - 1), ids[1:]].sum())
            count += len(ids) - 1
        out[f"ppl_{data}"] = math.exp(nll / count)
        out[f"rows_{data}"] = len(data_rows)
    prompt = rows["wiki"][0][:512]
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    out["prefill_tokens_per_s"] = len(prompt) / (time.perf_counter() - t)
    token = int(np.argmax(llm.scores[len(prompt) - 1]))
    t = time.perf_counter()
    for _ in range(64):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    out["decode_tokens_per_s"] = 64 / (time.perf_counter() - t)
    llm.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="name=folder or model id, comma-separated")
    p.add_argument("--types", default="f16,q8_0,q4_k_m,q3_k_m")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(RESULTS / "llamacpp_sizes.json"))
    p.add_argument("--plot", default=None, metavar="PNG")
    args = p.parse_args()

    from slicegpt.io.gguf import export_gguf
    from slicegpt.io.models import resolve_model

    results = json.loads(Path(args.out).read_text())["runs"] if Path(args.out).exists() else []
    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    for entry in args.models.split(","):
        name, _, model = entry.partition("=")
        folder = model if Path(model).is_dir() and (Path(model) / "config.json").is_file() else resolve_model(model)[0]
        rows = {data: rows_of(folder, data, args.rows) for data in ("wiki", "lambada")}
        for outtype in args.types.split(","):
            same = (name, outtype, args.rows, args.threads)
            if any((r["model"], r["type"], r["rows_wiki"], r["threads"]) == same for r in results):
                continue
            gguf = GGUF_DIR / f"{name}-{outtype}.gguf"
            t = time.perf_counter()
            export_gguf(folder, gguf, outtype=outtype, overwrite=True)
            row = {
                "model": name,
                "folder": str(model),
                "type": outtype,
                "bytes": gguf.stat().st_size,
                "export_seconds": time.perf_counter() - t,
                "threads": args.threads,
                **measure(gguf, rows, args.threads),
            }
            results = [r for r in results if not (r["model"] == name and r["type"] == outtype)] + [row]
            Path(args.out).write_text(json.dumps({"runs": results}, indent=2) + "\n")
            print(
                f"{name} {outtype}: {row['bytes'] / 1e6:.0f} MB, wiki {row['ppl_wiki']:.2f}, "
                f"lambada {row['ppl_lambada']:.2f}, prefill {row['prefill_tokens_per_s']:.0f} tok/s, "
                f"decode {row['decode_tokens_per_s']:.0f} tok/s",
                flush=True,
            )
    print("| model | type | file MB | wiki ppl | lambada ppl | prefill tok/s | decode tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in sorted(results, key=lambda r: (r["model"], -r["bytes"])):
        print(
            f"| {r['model']} | {r['type']} | {r['bytes'] / 1e6:.0f} | {r['ppl_wiki']:.2f} | {r['ppl_lambada']:.2f} | "
            f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.0f} |"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        panels = ((axes[0], "ppl_wiki", "wiki evaluation part"), (axes[1], "ppl_lambada", "lambada (novels)"))
        for ax, key, title in panels:
            for name in dict.fromkeys(r["model"] for r in results):
                pts = sorted((r["bytes"] / 1e6, r[key], r["type"]) for r in results if r["model"] == name)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
                for x, y, t in pts:
                    ax.annotate(t, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("GGUF file size (MB)")
            ax.set_ylabel("llama.cpp perplexity")
            ax.set_yscale("log")
            ax.set_title(title)
            ax.legend(fontsize=8)
        fig.suptitle("SmolLM2-135M-Instruct in llama.cpp: compressed + quantized against quantized alone")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
