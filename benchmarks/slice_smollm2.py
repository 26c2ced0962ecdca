"""Slice the embedded SmolLM2-135M-Instruct at several sparsities and tabulate what it costs.

    .venv/bin/python benchmarks/slice_smollm2.py                       # per-layer, 0/20/25/30%
    .venv/bin/python benchmarks/slice_smollm2.py --modes per-layer,uniform --sparsities 0.2,0.25,0.3

Each run happens in a fresh process (so its peak RSS is its own: loading, slicing and
evaluation together): 128 x 1024 calibration rows from the built-in 'wiki' corpus, float32,
perplexity on the whole evaluation part at 1024 tokens per row (and on its first 40 rows, from
the same pass, for comparison with shorter runs). The machine-independent cost figure is
slicing time divided by the time of one dense forward pass over the same calibration tokens,
measured in the same process before slicing: the dense model runs one row at a time (its
fastest setting here; batches of 8 are ~15% slower per token and hold 1.6 GB of logits) over
the first --dense-rows calibration rows, and that time is scaled to all of them (every row has
the same length, so the cost is linear in rows).
Results: a markdown table on stdout and benchmarks/results/slice_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def one_run(
    mode: str, sparsity: float, nsamples: int, seqlen: int, eval_seqlen: int, max_rows: int | None, dense_rows: int
) -> dict:
    import torch

    import slicegpt
    from slicegpt.sources import calibration_rows_for

    torch.manual_seed(0)
    model, tokenizer, name = slicegpt.load_model()
    config = slicegpt.SliceConfig(
        sparsity=sparsity, nsamples=nsamples, seqlen=seqlen, batch_size=8, uniform=mode == "uniform"
    )
    result: dict = {"model": name, "mode": mode, "sparsity": sparsity, "nsamples": nsamples, "seqlen": seqlen}
    if mode == "dense":
        res = slicegpt.perplexity(model, tokenizer, "wiki", seqlen=eval_seqlen, max_rows=max_rows)
        result.update(
            perplexity=res.perplexity,
            perplexity_first40=res.perplexity_of_first(40),
            eval_rows=res.rows,
            eval_seconds=res.seconds,
            params=slicegpt.count_parameters(model),
            share_removed=0.0,
        )
    else:
        # One dense forward pass over exactly the calibration rows: the unit of slicing cost.
        rows = calibration_rows_for(model, tokenizer, "wiki", config)
        timed = min(dense_rows, rows.input_ids.shape[0])
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(timed):
                model(input_ids=rows.input_ids[i : i + 1], use_cache=False)
        dense_forward = (time.perf_counter() - start) * rows.input_ids.shape[0] / timed
        report = slicegpt.slice_model(model, tokenizer, rows, config, source_model=name)
        res = slicegpt.perplexity(model, tokenizer, "wiki", seqlen=eval_seqlen, max_rows=max_rows)
        result.update(
            perplexity=res.perplexity,
            perplexity_first40=res.perplexity_of_first(40),
            eval_rows=res.rows,
            eval_seconds=res.seconds,
            params=report.params_after,
            params_dense=report.params_before,
            share_removed=1 - report.params_after / report.params_before,
            slicing_seconds=report.seconds,
            dense_forward_seconds=dense_forward,
            dense_forward_rows_timed=timed,
            slicing_over_dense_forward=report.seconds / dense_forward,
            width=report.widths.embedding,
        )
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    result["torch_threads"] = torch.get_num_threads()
    return result


def table(rows: list[dict]) -> str:
    out = [
        "| mode | sparsity | width | perplexity (eval rows) | first 40 rows | parameters | share removed | slicing s "
        "| slicing / dense fwd | peak RSS GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['mode']} | {r['sparsity']:.2f} | {r.get('width', 576)} | {r['perplexity']:.2f} "
            f"({r.get('eval_rows', '?')}) | {r.get('perplexity_first40', float('nan')):.2f} | "
            f"{r['params'] / 1e6:.1f}M | {100 * r['share_removed']:.1f}% | {r.get('slicing_seconds', 0):.0f} | "
            f"{r.get('slicing_over_dense_forward', float('nan')):.2f} | {r['peak_rss_gb']:.2f} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="dense,per-layer", help="comma list of dense, per-layer, uniform")
    p.add_argument("--sparsities", default="0,0.2,0.25,0.3")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument("--max-rows", type=int, default=None, help="evaluate only the first N rows (default: all)")
    p.add_argument("--dense-rows", type=int, default=32, help="calibration rows the dense forward pass is timed on")
    p.add_argument("--out", default=str(RESULTS / "slice_smollm2.json"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one job, print JSON
    args = p.parse_args()
    if args.one:
        mode, sparsity = args.one.split(":")
        print(
            "RESULT "
            + json.dumps(
                one_run(
                    mode, float(sparsity), args.nsamples, args.seqlen, args.eval_seqlen, args.max_rows, args.dense_rows
                )
            )
        )
        return
    jobs = []
    for mode in args.modes.split(","):
        for s in [0.0] if mode == "dense" else [float(x) for x in args.sparsities.split(",")]:
            jobs.append(f"{mode}:{s}")
    out_path = Path(args.out)
    results: list[dict] = json.loads(out_path.read_text())["runs"] if out_path.exists() else []
    for job in jobs:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            job,
            "--nsamples",
            str(args.nsamples),
            "--seqlen",
            str(args.seqlen),
            "--eval-seqlen",
            str(args.eval_seqlen),
            "--dense-rows",
            str(args.dense_rows),
        ] + (["--max-rows", str(args.max_rows)] if args.max_rows else [])
        print(f"== {job}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"job {job} failed")
        r = json.loads(line[-1][7:])
        results = [x for x in results if (x["mode"], x["sparsity"]) != (r["mode"], r["sparsity"])] + [r]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(
            json.dumps({"runs": results, "torch_threads": __import__("torch").get_num_threads()}, indent=2) + "\n"
        )
        print(table([r]).splitlines()[-1], flush=True)
    order = {"dense": 0, "per-layer": 1, "uniform": 2}
    print(table(sorted(results, key=lambda r: (order.get(r["mode"], 9), r["sparsity"]))))


if __name__ == "__main__":
    main()
