"""The fast neuron statistics against the exact reference: the same neurons? the same model?

    .venv/bin/python benchmarks/fast_statistics.py                      # SmolLM2, 25%, uniform and per-layer budget
    .venv/bin/python benchmarks/fast_statistics.py --nsamples 32 --modes uniform
    .venv/bin/python benchmarks/fast_statistics.py --against ieee --model qwen2.5-coder-0.5b --modes uniform
    .venv/bin/python benchmarks/fast_statistics.py --against select64 --modes uniform
    .venv/bin/python benchmarks/fast_statistics.py --against rows64 --nsamples 32 --modes uniform

Two speed-ups of the budget method change arithmetic: each batch's moment products (x^T x,
x^T t) are computed in float32 and summed in float64 (slicegpt.core.refit.product_dtype), and
the greedy neuron selection takes its neurons in rounds of 16 (slicegpt.core.neurons.ROUND).
A third changes every float32 product of the run: on a CPU with bfloat16 units they go through
them (``fast_matmul``, slicegpt.core.precision). A fourth tries a wide writer's ridge strengths
on a sample of its output rows (slicegpt.core.refit.strength_rows).
This compresses the model twice per mode, in fresh processes: once as the package does, once
as the baseline --against names: 'reference' (float64 products, neurons taken one at a time, no
fast float32 products), 'ieee' (the package but for the fast float32 products) or 'select64' (the
package but for its kept neurons, chosen in float64 as before 2026-12-06), or, the other way round,
'rows64' (the package with its ridge strengths tried on about 64 output rows, slicegpt.core.refit.
strength_rows: these models' writers are too narrow for the package to sample them, so this tries
them on as many times fewer rows than their outputs as a 7B model's are), and reports per layer how
many kept MLP neurons differ, whether each layer keeps as many (per-layer mode spreads them by
error curves from the same moments), perplexity on the first --wiki-rows rows of the 'wiki'
evaluation part and --books-rows of 'lambada', and the compression time.
Results: a markdown table and --out (JSON).
"""  # noqa: E501 - the usage examples are one command per line, printed as they are by --help

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from fresh import add_one, answer_one, load_source, replace_runs, run_fresh

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def one_run(job: dict) -> dict:
    import torch

    import slicegpt
    from slicegpt.core import neurons, refit, spread

    if job["statistics"] == "reference":  # the reference: float64 products, neurons taken one at a time
        refit.product_dtype = spread.product_dtype = lambda x: torch.float64
        neurons.ROUND = 1
    kept: list[list[int]] = []
    keep = neurons.keep_neurons

    def recording(block, spec, index, down=None):  # the neurons each layer keeps, in layer order
        kept.append(index.tolist())
        return keep(block, spec, index, down)

    neurons.keep_neurons = recording
    if job["statistics"] == "select64":  # the kept neurons chosen in float64 (the curves stay float32)
        neurons.selection_dtype = lambda weight: torch.float64
    if job["statistics"] == "rows64":  # ridge strengths tried on about 64 output rows (read at call time)
        refit.STRENGTH_ROWS = 64
    torch.manual_seed(0)
    model, tokenizer, _ = load_source(job.get("model"))
    uniform = job["mode"] == "uniform"
    config = slicegpt.SliceConfig(
        target_params=job["target"],
        uniform=uniform,
        nsamples=job["nsamples"],
        seqlen=1024,
        calib="wiki",
        seed=job.get("seed", 42),
        fast_matmul=job["statistics"] in ("fast", "select64", "rows64"),
    )
    start = time.perf_counter()
    report = slicegpt.slice_model(model, tokenizer, None, config, progress=False)
    seconds = time.perf_counter() - start
    wiki = slicegpt.perplexity(model, tokenizer, "wiki", seqlen=1024, max_rows=job["wiki_rows"], progress=False)
    books = slicegpt.perplexity(model, tokenizer, "lambada", seqlen=1024, max_rows=job["books_rows"], progress=False)
    return dict(
        job,
        params=report.params_after,
        seconds=seconds,
        kept=choices(kept),
        wiki=wiki.perplexity,
        books=books.perplexity,
        torch_threads=torch.get_num_threads(),
    )


def choices(kept: list[list[int]]) -> list[list[int]]:
    """The layers' neuron choices: every call but the cuts of an empty skeleton to its first k
    neurons (the parameter counting's), which keep 0..k-1."""
    return [k for k in kept if k != list(range(len(k)))]


def compare(a: dict, b: dict) -> dict:
    """Layer by layer: neurons kept by one and not the other, and the counts each keeps."""
    ka, kb = choices(a["kept"]), choices(b["kept"])
    differ = [len(set(x) ^ set(y)) // 2 if len(x) == len(y) else len(set(x) - set(y)) for x, y in zip(ka, kb)]
    counts = [(len(x), len(y)) for x, y in zip(ka, kb)]
    return dict(differ=differ, counts_equal=all(x == y for x, y in counts), counts=counts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="uniform,per-layer")
    p.add_argument("--model", default=None, help="hub id, folder, .gguf or a PyPI-shipped name; default: SmolLM2")
    p.add_argument(
        "--against",
        default="reference",
        choices=["reference", "ieee", "select64", "rows64"],
        help="the baseline: float64 products and one neuron at a time, the package without fast float32 products, "
        "the package with its kept neurons chosen in float64, or (not a baseline: the sampled arm) the package "
        "with its ridge strengths tried on about 64 output rows",
    )
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--target", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=42, help="draws the calibration rows")
    p.add_argument("--wiki-rows", type=int, default=40)
    p.add_argument("--books-rows", type=int, default=16)
    p.add_argument(
        "--out",
        default=None,
        help="default by --against: results/fast_statistics.json, fast_matmul.json, fast_selection.json, "
        "strength_rows.json",
    )
    add_one(p)
    p.add_argument("--report", action="store_true", help="print the table of --out again, running nothing")
    args = p.parse_args()
    default = {
        "reference": "fast_statistics.json",
        "ieee": "fast_matmul.json",
        "select64": "fast_selection.json",
        "rows64": "strength_rows.json",
    }
    args.out = args.out or str(RESULTS / default[args.against])
    if answer_one(args, one_run):
        return
    runs = json.loads(Path(args.out).read_text())["runs"] if args.report else []
    for mode in [] if args.report else args.modes.split(","):
        for statistics in (args.against, "fast"):
            job = dict(
                model=args.model,
                seed=args.seed,
                mode=mode,
                statistics=statistics,
                nsamples=args.nsamples,
                target=args.target,
                wiki_rows=args.wiki_rows,
                books_rows=args.books_rows,
            )
            print(f"== {mode} {statistics}", file=sys.stderr, flush=True)
            runs.append(run_fresh(__file__, job, f"{mode} {statistics}"))
    out = [
        "| mode | statistics | compress s | wiki ppl | lambada ppl | layers with other neurons | neurons differing |"
    ]
    out.append("|---|---|---:|---:|---:|---:|---:|")
    summary = []
    for mode in args.modes.split(","):
        ref, new = (
            next(r for r in runs if (r["mode"], r["statistics"], r.get("model"), r.get("seed", 42)) == key)
            for key in ((mode, d, args.model, args.seed) for d in (args.against, "fast"))
        )
        c = compare(ref, new)
        summary.append(dict(model=args.model, seed=args.seed, mode=mode, against=args.against, **c))
        moved = [d for d in c["differ"] if d]
        total = sum(len(k) for k in choices(ref["kept"]))
        for r in (ref, new):
            cell = "" if r is ref else f"{len(moved)} of {len(c['differ'])}"
            diff = "" if r is ref else f"{sum(d or 0 for d in c['differ'])} of {total}"
            if r is new and not c["counts_equal"]:
                diff += " (counts per layer differ)"
            ppl = f"{r['wiki']:.2f} | {r['books']:.2f}"
            out.append(f"| {mode} | {r['statistics']} | {r['seconds']:.0f} | {ppl} | {cell} | {diff} |")
    print("\n".join(out))
    if args.report:  # printed again: nothing new to write
        return
    # the runs already in --out stay, but those of the same settings
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out_path.read_text()) if out_path.exists() else {"runs": [], "comparison": []}
    runs = replace_runs(old["runs"], runs, ("model", "seed", "mode", "statistics", "nsamples", "target"))
    # a comparison made again replaces the earlier one
    summary = replace_runs(old.get("comparison", []), summary, ("model", "seed", "mode", "against"))
    out_path.write_text(compact_json({"runs": runs, "comparison": summary}))


def compact_json(obj: dict) -> str:
    """Indented JSON with every list of integers (the kept neurons) on one line: one number per
    line made the file tens of megabytes."""
    text = json.dumps(obj, indent=2)
    return re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", lambda m: "[" + re.sub(r"\s+", "", m.group(1)) + "]", text) + "\n"


if __name__ == "__main__":
    main()
