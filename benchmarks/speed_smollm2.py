"""Inference speed of SmolLM2 sliced at 25% against the dense model, with the issue's targets.

    .venv/bin/python benchmarks/speed_smollm2.py                          # CPU, float32
    .venv/bin/python benchmarks/speed_smollm2.py --device cuda --dtype bfloat16 --layouts stock \\
        --out benchmarks/results/speed_smollm2_cuda.json

Each run is one `slicegpt bench SLICED --compare dense` process: the two models alternate,
prefill of batch x 512 tokens (full logits), then decode with the KV cache; medians over
--repeats after a warm-up. Runs, by default:

* per-layer 25% (`make demo`'s sliced/SmolLM2-135M-Instruct-25) with the weights as loaded
  ("stock") -- the state before the layout fix -- and with ``--layout matvec`` on both models;
* uniform 25% (sliced/SmolLM2-135M-Instruct-uniform-25, made by
  `slicegpt slice --uniform --sparsity 0.25 --nsamples 128 --seqlen 1024 --out ...`; skipped
  with a note when absent) in both layouts.

Targets, per run: prefill throughput ratio sliced/dense at batch 8 at least 0.95 of the
ratio FLOPs per token predict (from the actual widths, shortcut matrices included); decode at
batch 1 no slower than dense. Prints a summary and the verdicts, writes all results as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SLICED = {
    "per-layer": ROOT / "sliced" / "SmolLM2-135M-Instruct-25",
    "uniform": ROOT / "sliced" / "SmolLM2-135M-Instruct-uniform-25",
}


def verdicts(result: dict) -> dict:
    by_batch = {entry["batch_size"]: entry for entry in result["results"]}
    out = {}
    if 8 in by_batch:
        mop = by_batch[8]["measured_over_predicted"]["prefill_tokens_per_s"]
        out["prefill_b8_measured_over_predicted"] = {"value": mop, "target": ">= 0.95", "met": mop >= 0.95}
    if 1 in by_batch:
        ratio = by_batch[1]["measured_ratio"]["decode_tokens_per_s"]
        out["decode_b1_sliced_over_dense"] = {"value": ratio, "target": ">= 1.0", "met": ratio >= 1.0}
    return out


def summary(runs: list[dict]) -> str:
    lines = [
        "| slice | layout | batch | metric | dense | sliced | measured ratio | FLOPs-predicted | measured / "
        "predicted |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        for entry in run["result"]["results"]:
            for metric in ("prefill_tokens_per_s", "decode_tokens_per_s"):
                m = entry["metrics"]
                lines.append(
                    f"| {run['slice']} | {run['layout']} | {entry['batch_size']} | {metric.split('_')[0]} tokens/s "
                    f"| {m['dense'][metric]:.1f} | {m['sliced'][metric]:.1f} | {entry['measured_ratio'][metric]:.3f} "
                    f"| {entry['predicted_ratio'][metric]:.3f} | {entry['measured_over_predicted'][metric]:.3f} |"
                )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sliced", default=str(SLICED["per-layer"]), help="the per-layer sliced folder")
    p.add_argument("--uniform", default=str(SLICED["uniform"]), help="the uniform sliced folder (skipped if absent)")
    p.add_argument("--slices", default="per-layer,uniform", help="which slices to run: per-layer, uniform or both")
    p.add_argument("--dense", default="SmolLM2-135M-Instruct", help="the dense reference (default: the embedded model)")
    p.add_argument("--layouts", default="stock,matvec", help="weight layouts to run, applied to both models")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results" / "speed_smollm2_cpu.json"))
    args = p.parse_args()
    slices = [name.strip() for name in args.slices.split(",") if name.strip()]
    if not slices or any(name not in SLICED for name in slices):
        raise SystemExit(f"--slices takes per-layer and/or uniform, got {args.slices!r}")
    folders = {name: Path(args.sliced if name == "per-layer" else args.uniform) for name in slices}
    if "per-layer" in folders and not folders["per-layer"].is_dir():
        raise SystemExit(f"no sliced folder at {folders['per-layer']}: run `make demo` first, or pass --sliced")
    if "uniform" in folders and not folders["uniform"].is_dir():
        print(f"note: no uniform folder at {folders['uniform']}; uniform runs skipped", file=sys.stderr)
        del folders["uniform"]

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, folder in folders.items():
            for layout in args.layouts.split(","):
                out = Path(tmp) / f"{kind}-{layout}.json"
                cmd = [
                    sys.executable,
                    "-m",
                    "slicegpt",
                    "bench",
                    str(folder),
                    "--compare",
                    args.dense,
                    "--names",
                    "dense,sliced",
                    "--device",
                    args.device,
                    "--dtype",
                    args.dtype,
                    "--batch-sizes",
                    args.batch_sizes,
                    "--prompt-len",
                    str(args.prompt_len),
                    "--gen-len",
                    str(args.gen_len),
                    "--repeats",
                    str(args.repeats),
                    "--layout",
                    layout,
                    "--no-progress",
                    "--json",
                    str(out),
                ]
                print(f"== {kind} 25%, {layout} layout", flush=True)
                subprocess.run(cmd, check=True)
                result = json.loads(out.read_text())
                runs.append(
                    {
                        "slice": kind,
                        "layout": layout,
                        "folder": str(folder),
                        "targets": verdicts(result),
                        "result": result,
                    }
                )

    print()
    print(summary(runs))
    for run in runs:
        for name, v in run["targets"].items():
            print(
                f"{run['slice']} / {run['layout']}: {name} = {v['value']:.3f} (target {v['target']}): "
                f"{'met' if v['met'] else 'NOT met'}"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"kind": "speed_smollm2", "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
