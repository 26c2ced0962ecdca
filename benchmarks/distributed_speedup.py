"""One process against ``torchrun --nproc-per-node N`` slicing the same model, side by side.

    .venv/bin/python benchmarks/distributed_speedup.py                      # the embedded SmolLM2, `slicegpt slice` defaults
    .venv/bin/python benchmarks/distributed_speedup.py --nproc 4 --slice-args "--target-params 0.75"
    .venv/bin/python benchmarks/distributed_speedup.py --tiny               # a tiny random Llama, seconds: checks the harness

Both runs are the same ``slicegpt slice MODEL SLICE_ARGS`` command in fresh processes on the
same machine (device from --slice-args, cpu by default). CPU threads are shared fairly: the
single process gets --threads, each of the N processes --threads / N (OMP_NUM_THREADS), so the
comparison is the same hardware used two ways. Timed: the command's wall clock (model loading
and start-up included) and its slicing time (rank 0's report); checked: the widths agree and
the two saved models' logits on a probe (largest difference relative to the largest logit).

Results: a markdown table on stdout and JSON in benchmarks/results/distributed_speedup.json
(--out; --tiny writes distributed_speedup_tiny.json unless --out is given).
"""  # noqa: E501 - the usage examples are one command per line, printed as they are by --help

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import slicegpt
from slicegpt.data import load_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# --tiny: rows small enough for a random 4-layer model of width 128 to slice in a second
TINY_ARGS = "--calib wiki --nsamples 16 --seqlen 128 --batch-size 2 --round-to 8"


def tiny_model(folder: Path) -> Path:
    """A random 4-layer Llama of width 128 with a byte-level BPE (vocabulary 512) trained on the
    built-in 'wiki' calibration text, saved as a local HF folder: no download, seconds to slice."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [load_text("wiki", "calibration")[:200_000]],
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<s>", "</s>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(command: list[str], threads: int, json_path: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads)), HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {shlex.join(command)}\n{done.stderr[-3000:]}")
    report = json.loads(json_path.read_text())
    return {
        "wall_seconds": wall,
        "slicing_seconds": report["slicing_seconds"],
        "widths": report["widths"],
        "params_sliced": report["params_sliced"],
        "peak_rss_gb_rank0": report.get("peak_rss_gb"),
    }


@torch.no_grad()
def logit_difference(a: Path, b: Path, vocab: int) -> float:
    probe = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    la, lb = (slicegpt.load(p)(input_ids=probe).logits.double() for p in (a, b))
    return float((la - lb).abs().max() / lb.abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=None, help="what `slicegpt slice` reads (default: the embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--slice-args",
        default="",
        help="further `slicegpt slice` flags, one string (default: none, the command's defaults)",
    )
    p.add_argument("--nproc", type=int, default=2, help="processes of the distributed run")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all, shared by the processes of a run"
    )
    p.add_argument(
        "--tiny", action="store_true", help=f"a tiny random Llama instead, with {TINY_ARGS!r} before --slice-args"
    )
    p.add_argument(
        "--out", default=None, help="JSON path (default: benchmarks/results/distributed_speedup[_tiny].json)"
    )
    args = p.parse_args()
    if args.nproc < 2:
        sys.exit("--nproc must be at least 2")
    out = Path(args.out or RESULTS / f"distributed_speedup{'_tiny' if args.tiny else ''}.json")

    with tempfile.TemporaryDirectory(prefix="slicegpt-dist-bench-") as tmp:
        tmp = Path(tmp)
        model = str(tiny_model(tmp / "tiny")) if args.tiny else args.model
        extra = shlex.split((TINY_ARGS + " " if args.tiny else "") + args.slice_args)
        command = ["slice", *([model] if model else []), *extra]
        runs = {}
        for name, launcher, threads in (
            ("1 process", [sys.executable, "-m", "slicegpt"], args.threads),
            (
                f"{args.nproc} processes",
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc-per-node",
                    str(args.nproc),
                    "-m",
                    "slicegpt",
                ],
                args.threads // args.nproc,
            ),
        ):
            folder, report = tmp / f"out-{len(runs)}", tmp / f"report-{len(runs)}.json"
            print(f"running {name} ({max(1, threads)} thread(s) each) ...", file=sys.stderr, flush=True)
            runs[name] = run([*launcher, *command, "--out", str(folder), "--json", str(report)], threads, report)
            runs[name]["threads_per_process"] = max(1, threads)
            runs[name]["folder"] = folder
        one, many = runs.values()
        vocab = slicegpt.load(one["folder"]).config.vocab_size
        difference = logit_difference(many["folder"], one["folder"], vocab)
    for r in runs.values():
        del r["folder"]
    result = {
        "command": "slicegpt " + shlex.join(command),
        "nproc": args.nproc,
        "threads": args.threads,
        "tiny": args.tiny,
        "runs": runs,
        "widths_equal": one["widths"] == many["widths"],
        "max_relative_logit_difference": difference,
        "speedup_wall": one["wall_seconds"] / many["wall_seconds"],
        "speedup_slicing": one["slicing_seconds"] / many["slicing_seconds"],
        "torch": torch.__version__,
    }

    print(f"`{result['command']}`\n")
    print("| run | threads / process | wall s | slicing s | speedup (slicing) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in runs.items():
        print(
            f"| {name} | {r['threads_per_process']} | {r['wall_seconds']:.1f} | {r['slicing_seconds']:.1f} | "
            f"{one['slicing_seconds'] / r['slicing_seconds']:.2f}x |"
        )
    print(f"\nwidths equal: {result['widths_equal']}; largest relative logit difference: {difference:.1e}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
