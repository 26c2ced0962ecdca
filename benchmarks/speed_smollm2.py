"""Inference speed of SmolLM2 sliced at 25% against the dense model, with the issue's targets.

    .venv/bin/python benchmarks/speed_smollm2.py                          # CPU, float32
    .venv/bin/python benchmarks/speed_smollm2.py --device cuda --dtype bfloat16 --out benchmarks/results/speed_smollm2_cuda.json

The sliced folder is `make demo`'s (sliced/SmolLM2-135M-Instruct-25); pass --sliced for
another. Both models run alternately in one process (`slicegpt bench --compare`): prefill of
batch x 512 tokens (full logits), then decode with the KV cache; medians over --repeats after
a warm-up. Targets: prefill throughput ratio sliced/dense at batch 8 at least 0.95 of the ratio
FLOPs per token predict (from the actual widths, shortcut matrices included); decode at batch 1
no slower than dense. Prints the table and the verdicts, writes the full JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sliced", default=str(ROOT / "sliced" / "SmolLM2-135M-Instruct-25"))
    p.add_argument("--dense", default="SmolLM2-135M-Instruct", help="the dense reference (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "speed_smollm2_cpu.json"))
    args = p.parse_args()
    if not Path(args.sliced).is_dir():
        raise SystemExit(f"no sliced folder at {args.sliced}: run `make demo` first, or pass --sliced")
    cmd = [sys.executable, "-m", "slicegpt", "bench", args.sliced, "--compare", args.dense, "--names", "dense,sliced",
           "--device", args.device, "--dtype", args.dtype, "--batch-sizes", args.batch_sizes,
           "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len), "--repeats", str(args.repeats),
           "--no-progress", "--json", args.out]
    subprocess.run(cmd, check=True)
    result = json.loads(Path(args.out).read_text())
    by_batch = {entry["batch_size"]: entry for entry in result["results"]}
    verdicts = {}
    if 8 in by_batch:
        mop = by_batch[8]["measured_over_predicted"]["prefill_tokens_per_s"]
        verdicts["prefill_b8_measured_over_predicted"] = {"value": mop, "target": ">= 0.95", "met": mop >= 0.95}
    if 1 in by_batch:
        ratio = by_batch[1]["measured_ratio"]["decode_tokens_per_s"]
        verdicts["decode_b1_sliced_over_dense"] = {"value": ratio, "target": ">= 1.0", "met": ratio >= 1.0}
    for name, v in verdicts.items():
        print(f"{name}: {v['value']:.3f} (target {v['target']}): {'met' if v['met'] else 'NOT met'}")
    result["targets"] = verdicts
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
