"""Loading time of a sliced folder against the dense model of the same family and dtype.

    .venv/bin/python benchmarks/load_time.py [--repeats 5]

Dense: transformers' from_pretrained of the converted SmolLM2 folder. Sliced (25%, per-layer):
slicegpt.load with full sha256 verification, with size-only verification, and transformers'
from_pretrained(trust_remote_code=True). Uniform (25%): plain from_pretrained. Each load runs in
a fresh process, alternating the kinds, so page-cache and machine noise hit all alike;
medians are reported with their ratio to dense. Writes benchmarks/results/load_time.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "results" / "load_time_models"

CHILD = """
import sys, time, torch
kind, path = sys.argv[1], sys.argv[2]
import transformers, slicegpt  # imports are not part of the load time
start = time.perf_counter()
if kind == "dense" or kind == "uniform":
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
elif kind == "sliced-sha256":
    m = slicegpt.load(path)
elif kind == "sliced-size":
    m = slicegpt.load(path, checksum=False)
elif kind == "sliced-auto":
    m = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
# touch every weight so that lazily mapped tensors are really read
total = sum(float(p.detach().float().sum()) for p in m.parameters())
print("SECONDS", time.perf_counter() - start)
"""


def ensure_models() -> dict[str, str]:
    import slicegpt
    from slicegpt.io.models import resolve_model

    dense = resolve_model(None)[0]
    paths = {"dense": dense}
    for kind, uniform in (("sliced", False), ("uniform", True)):
        target = WORK / kind
        if not (target / "config.json").exists():
            model, tok, name = slicegpt.load_model()
            slicegpt.slice_model(
                model, tok, "wiki", slicegpt.SliceConfig(sparsity=0.25, nsamples=16, seqlen=512, uniform=uniform)
            )
            slicegpt.save(model, target, tokenizer=tok, overwrite=True)
        paths[kind] = str(target)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    paths = ensure_models()
    kinds = {
        "dense": paths["dense"],
        "sliced-sha256": paths["sliced"],
        "sliced-size": paths["sliced"],
        "sliced-auto": paths["sliced"],
        "uniform": paths["uniform"],
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for kind, path in kinds.items():
            out = subprocess.run([sys.executable, "-c", CHILD, kind, path], capture_output=True, text=True, check=True)
            times[kind].append(float([l for l in out.stdout.splitlines() if l.startswith("SECONDS")][0].split()[1]))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = ["| load | median s | / dense |", "|---|---:|---:|"]
    for k in kinds:
        rows.append(f"| {k} | {med[k]:.3f} | {med[k] / med['dense']:.2f} |")
    print("\n".join(rows))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "load_time.json").write_text(json.dumps({"times": times, "median": med}, indent=2) + "\n")


if __name__ == "__main__":
    main()
