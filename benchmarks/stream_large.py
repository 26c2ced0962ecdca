"""Streaming against in-memory slicing of a model larger than 4 GB in float32, in one run.

    .venv/bin/python benchmarks/stream_large.py                  # make the model once, slice it both ways
    .venv/bin/python benchmarks/stream_large.py --layers 8        # a quick small version
    python benchmarks/stream_large.py --hidden 2048 --intermediate 5632 --layers 24 --device cuda --dtype bfloat16 \
        --modes on --json benchmarks/results/stream_large_cuda.json   # a 1.3B model streamed on a GPU

1. A randomly initialised Llama-family model (default 96 layers of width 1024, 5.9 GB in float32)
   is written as sharded safetensors into --work (not committed), layer by layer, so making it
   never holds it in memory either; a byte-level BPE tokenizer is trained on the 'wiki'
   calibration text for it.
2. `slicegpt slice` runs twice on it with the same settings, each in its own process:
   `--stream on` and `--stream off` (the whole model in memory). Each reports its peak resident
   memory (getrusage: the true peak, page cache not counted).
3. The two output folders' weights files are compared byte for byte.

Prints a markdown table; writes benchmarks/results/stream_large.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def make_model(folder: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> int:
    """Write the random model; returns its float32 size in bytes."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slicegpt.data import load_text
    from slicegpt.io.shards import ShardWriter

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".writing"
    writer = ShardWriter(tmp, "2GB")
    g = torch.Generator().manual_seed(0)

    def tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("norm.weight"):  # norms away from 1, so folding them matters
            return 1 + 0.1 * torch.randn(shape, generator=g)
        return torch.randn(shape, generator=g) * (0.02 if len(shape) == 2 else 1.0)

    for i in range(layers):
        prefix = f"model.layers.{i}."
        writer.add({k: tensor(k, s) for k, s in shapes.items() if k.startswith(prefix)})
    writer.add({k: tensor(k, s) for k, s in shapes.items() if not k.startswith("model.layers.")})
    for name in writer.finish():
        os.replace(tmp / name, folder / name)
    tmp.rmdir()
    config.save_pretrained(folder)

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab - 8,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([load_text("wiki", "calibration")], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>").save_pretrained(
        folder
    )
    return sum(4 * torch.Size(s).numel() for s in shapes.values())


def run_slice(model: Path, out: Path, stream: str, args: argparse.Namespace) -> dict:
    report = out.with_suffix(".json")
    cmd = [
        sys.executable,
        "-m",
        "slicegpt",
        "slice",
        str(model),
        "--stream",
        stream,
        "--out",
        str(out),
        "--overwrite",
        "--sparsity",
        str(args.sparsity),
        "--calib",
        "wiki",
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--batch-size",
        "4",
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--json",
        str(report),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    data = json.loads(report.read_text())
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_gb": data["peak_rss_gb"],
        "params_sliced": data["params_sliced"],
        "slicing_seconds": data["slicing_seconds"],
        "peak_cuda_gb": data.get("peak_cuda_gb"),
    }


def digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.name.endswith((".safetensors", ".index.json"))
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="sliced/stream_large")
    p.add_argument("--layers", type=int, default=96)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--sparsity", type=float, default=0.25)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument(
        "--device", default="cpu", help="where each layer is processed (cuda: the peak device memory is reported)"
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument("--modes", default="on,off", help="which runs: on (streamed), off (in memory), or both")
    p.add_argument("--json", default=str(RESULTS / "stream_large.json"))
    args = p.parse_args()
    work = Path(args.work)
    model = work / f"llama-{args.layers}x{args.hidden}"
    if not (model / "config.json").is_file():
        size = make_model(model, args.layers, args.hidden, args.intermediate, 16, 4, args.vocab)
    else:
        from slicegpt.io.shards import ShardReader

        size = sum(e.end - e.start for e in ShardReader(model).entries.values())
    acts = args.nsamples * args.seqlen * args.hidden * 4
    modes = args.modes.split(",")
    runs = {mode: run_slice(model, work / f"out-{mode}", mode, args) for mode in modes}
    same = digests(work / "out-on") == digests(work / "out-off") if len(runs) == 2 else None
    result = {
        "model_bytes_float32": size,
        "layers": args.layers,
        "hidden": args.hidden,
        "calibration_activation_bytes": acts,
        "device": args.device,
        "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "streamed": runs.get("on"),
        "in_memory": runs.get("off"),
        "outputs_identical": same,
        "streamed_peak_share_of_model": runs["on"]["peak_rss_gb"] * 1e9 / size if "on" in runs else None,
        "bound_25pct_plus_activations_gb": (0.25 * size + acts) / 1e9,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"model: {args.layers} layers x {args.hidden}, {size / 1e9:.2f} GB in float32; calibration activations "
        f"{acts / 1e6:.0f} MB"
    )
    print("| slicing | peak host RSS | share of the model | peak device | seconds |")
    print("|---|---:|---:|---:|---:|")
    for label, key in (("streamed (--stream on)", "on"), ("in memory (--stream off)", "off")):
        if key in runs:
            r = runs[key]
            device = f"{r['peak_cuda_gb']:.2f} GB" if r["peak_cuda_gb"] is not None else "(host)"
            print(
                f"| {label} | {r['peak_rss_gb']:.2f} GB | {r['peak_rss_gb'] * 1e9 / size:.0%} | {device} | "
                f"{r['seconds']:.0f} |"
            )
    print(
        f"outputs byte-identical: {same}; bound (25% of the model + activations): "
        f"{result['bound_25pct_plus_activations_gb']:.2f} GB"
    )


if __name__ == "__main__":
    main()
