"""One-token matrix-vector products at SmolLM2's widths, stock against matvec weight layout.

    .venv/bin/python benchmarks/matvec_layout.py [--threads 2] [--out benchmarks/results/matvec_layout.json]

Times ``F.linear(x, W)`` for x of one token, as a decode step runs it, for every weight shape
of the dense model and of its 25% slices, with W stored row-major as ``nn.Linear`` keeps it
and input-major; ``slicegpt.use_matvec_layout`` picks input-major for weights with at least as
many outputs as inputs, square ones included (bold in the table; the shortcut, used as x @ S
with S stored (in, out), is input-major as it is). Enough copies of each weight are cycled that they do
not fit the caches, so the figures are what streaming weights from memory costs; the four
variants of a weight alternate within each repeat, medians. Prints µs per product and the
sliced/dense time ratios in the stock and the matvec layout against the ratio of sizes; writes
JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slicegpt.core.layout import prefers_input_major

HERE = Path(__file__).resolve().parent

# (name, dense (out, in), sliced (out, in)) for SmolLM2-135M sliced 576 -> 432.
SHAPES = [
    ("q_proj", (576, 576), (576, 432)),
    ("k_proj, v_proj", (192, 576), (192, 432)),
    ("o_proj", (576, 576), (432, 576)),
    ("gate_proj, up_proj", (1536, 576), (1536, 432)),
    ("down_proj", (576, 1536), (432, 1536)),
    ("shortcut (x @ S)", None, (432, 432)),
    ("head", (49152, 576), (49152, 432)),
]
CACHE_BYTES = 256 * 1024 * 1024  # cycle through this much weight memory per shape


def _copies(shape: tuple[int, int], layout: str) -> list[torch.Tensor]:
    out_f, in_f = shape
    weights = [torch.randn(out_f, in_f) for _ in range(max(2, CACHE_BYTES // (out_f * in_f * 4)))]
    return [w.t().contiguous().t() for w in weights] if layout == "input-major" else weights


def _time_once(weights: list[torch.Tensor]) -> float:
    x = torch.randn(1, 1, weights[0].shape[1])
    start = time.perf_counter()
    for w in weights:
        F.linear(x, w)
    return (time.perf_counter() - start) / len(weights)


def chosen(shape: tuple[int, int]) -> str:
    """What slicegpt.use_matvec_layout picks for a weight of this (out, in) shape."""
    return "input-major" if prefers_input_major(*shape) else "row-major"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=str(HERE / "results" / "matvec_layout.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(
        "| weight | dense (out, in) | row-major µs | input-major µs | sliced (out, in) | row-major µs | input-major µs "
        "| sliced/dense, stock | sliced/dense, matvec layout | size sliced/dense |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for name, dense, sliced in SHAPES:
        variants = {
            (kind, layout): _copies(shape, layout)
            for kind, shape in (("dense", dense), ("sliced", sliced))
            if shape is not None
            for layout in ("row-major", "input-major")
        }
        for weights in variants.values():
            _time_once(weights)  # warm-up: first touch of every page
        times: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
        for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
            for key, weights in variants.items():
                times[key].append(_time_once(weights))
        us = {f"{kind}_{layout}_us": statistics.median(t) * 1e6 for (kind, layout), t in times.items()}
        del variants
        row: dict = {"weight": name, "dense_shape": dense, "sliced_shape": sliced, **us}
        if dense is not None:
            row["ratio_stock"] = us["sliced_row-major_us"] / us["dense_row-major_us"]
            row["ratio_matvec"] = us[f"sliced_{chosen(sliced)}_us"] / us[f"dense_{chosen(dense)}_us"]
            row["size_ratio"] = (sliced[0] * sliced[1]) / (dense[0] * dense[1])
        rows.append(row)

        def cell(kind: str, layout: str, shape: tuple[int, int] | None) -> str:
            if shape is None:
                return ""
            text = f"{us[f'{kind}_{layout}_us']:.1f}"
            return f"**{text}**" if chosen(shape) == layout else text  # bold: what the matvec layout uses

        ratios = (
            f"{row['ratio_stock']:.3f} | {row['ratio_matvec']:.3f} | {row['size_ratio']:.3f}"
            if dense is not None
            else " | | "
        )
        print(
            f"| {name} | {dense or ''} | {cell('dense', 'row-major', dense)} | {cell('dense', 'input-major', dense)} "
            f"| {sliced} | {cell('sliced', 'row-major', sliced)} | {cell('sliced', 'input-major', sliced)} "
            f"| {ratios} |",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "threads": args.threads, "machine": platform.processor() or platform.machine()}
    out.write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
