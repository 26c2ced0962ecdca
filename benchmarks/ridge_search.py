"""The ridge strength walk against the whole grid, on every writer a real compression refits.

    .venv/bin/python benchmarks/ridge_search.py                                   # SmolLM2, uniform budget, 16 rows
    .venv/bin/python benchmarks/ridge_search.py --model qwen2.5-coder-0.5b --nsamples 16
    .venv/bin/python benchmarks/ridge_search.py --method budget-per-layer --nsamples 32

A closed-form correction tries relative ridge strengths on held-out calibration rows, one solve and
one held-out error each (``slicegpt.core.refit``). The default walks the grid from its middle (3 to 6
solves); ``exhaustive`` tries all 11. This compresses the model once (in a fresh process) and, at
every refit, makes the choices on the same moments, timing each: the walk with float64 solves, the
walk with float32 solves (the package's, for a float32 model) and every strength (float64). How often
they agree, how many strengths the walk tried, where the walk and the exhaustive choice differ how much
of the exhaustive choice's held-out gain over the unrefit writer the walk kept, and where the float32
walk differs from the float64 one how much of that gain it gives up (held-out errors in float64).
Results: tables on stdout and --out (JSON).
"""  # noqa: E501 - the usage examples are one command per line, printed as they are by --help

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cost_phases import METHODS
from fresh import add_one, answer_one, load_source, replace_runs, run_fresh

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def one_run(job: dict) -> dict:
    import torch

    import slicegpt
    from slicegpt.core import refit

    torch.manual_seed(0)
    model, tokenizer, name = load_source(job["model"])
    writers: list[dict] = []
    plain = refit.refit

    def checked(moments: refit.FitMoments, w0: torch.Tensor, grid=refit.RIDGE_GRID, exhaustive=False, dtype=None):
        if moments.held.count:
            cov, cross = moments.fit.mean()
            hcov, hcross = moments.held.mean()
            w64 = w0.to(torch.float64)

            def walk(precision: torch.dtype) -> tuple[float, int, float]:
                """The package's walk with its strengths tried in ``precision``: (choice, solves, seconds)."""
                held = hcov.to(precision)
                tried: list[float] = []

                def err(rel: float) -> float:
                    tried.append(rel)
                    return refit.error(refit.ridge(cov, cross, w64, rel, precision), held, hcross)

                start = time.perf_counter()
                chosen = refit.choose_strength(err, grid, tie=refit.tie_for(precision))
                return chosen, len(tried), time.perf_counter() - start

            walked, tried, walk_s = walk(torch.float64)
            walked32, tried32, walk32_s = walk(torch.float32)
            start = time.perf_counter()
            every = {rel: refit.error(refit.ridge(cov, cross, w64, rel), hcov, hcross) for rel in grid}
            every_s = time.perf_counter() - start
            best = refit.choose_strength(every.__getitem__, grid, exhaustive=True)
            unrefit = refit.error(w64, hcov, hcross)
            gain = unrefit - every[best]

            def kept(rel: float) -> float:  # the share of the exhaustive choice's held-out gain kept (float64 errors)
                return 1.0 if gain <= 0 else (unrefit - every[rel]) / gain

            writers.append(
                dict(
                    n=int(cov.shape[0]),
                    d=int(w0.shape[0]),
                    walked=walked,
                    walked32=walked32,
                    exhaustive=best,
                    tried=tried,
                    tried32=tried32,
                    walk_seconds=walk_s,
                    walk32_seconds=walk32_s,
                    exhaustive_seconds=every_s,
                    gain_kept=kept(walked),
                    gain_kept32=kept(walked32),
                    # the float32 choice's held-out error above the float64 walk's, relative to the gain
                    loss32=0.0 if gain <= 0 else (every[walked32] - every[walked]) / gain,
                )
            )
            # the final solve at the package's choice (float32 strengths), without walking again
            return plain(moments, w0, (walked32 if dtype == torch.float32 else walked,))
        return plain(moments, w0, grid, exhaustive, **({} if dtype is None else {"dtype": dtype}))

    refit.refit = checked
    config = slicegpt.SliceConfig(
        target_params=job["target"], nsamples=job["nsamples"], seqlen=job["seqlen"], **METHODS[job["method"]]
    )
    slicegpt.slice_model(model, tokenizer, None, config, source_model=name, progress=False)
    return dict(job, source_model=name, writers=writers, torch_threads=torch.get_num_threads())


def summary(r: dict) -> dict:
    w = r["writers"]
    differ = [x for x in w if x["walked"] != x["exhaustive"]]
    differ32 = [x for x in w if "walked32" in x and x["walked32"] != x["walked"]]
    return dict(
        writers=len(w),
        same=len(w) - len(differ),
        tried=sum(x["tried"] for x in w) / max(1, len(w)),
        gain_kept=min((x["gain_kept"] for x in differ), default=1.0),
        walk_seconds=sum(x["walk_seconds"] for x in w),
        exhaustive_seconds=sum(x["exhaustive_seconds"] for x in w),
        same32=len(w) - len(differ32) if w and "walked32" in w[0] else None,
        loss32=max((x["loss32"] for x in differ32), default=0.0),
        walk32_seconds=sum(x.get("walk32_seconds", 0.0) for x in w),
    )


def table(runs: list[dict]) -> str:
    out = [
        "| model | method | rows | writers | same choice | strengths tried (of 11) | least gain kept where "
        "they differ | walk s | every strength s | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        s = summary(r)
        out.append(
            f"| {r['source_model']} | {r['method']} | {r['nsamples']} | {s['writers']} | {s['same']} | "
            f"{s['tried']:.1f} | {100 * s['gain_kept']:.1f}% | {s['walk_seconds']:.1f} | "
            f"{s['exhaustive_seconds']:.1f} | {s['exhaustive_seconds'] / max(s['walk_seconds'], 1e-9):.2f} |"
        )
    out += [
        "",
        "| model | method | rows | writers | float32 walk's choice = float64 walk's | most held-out gain lost where "
        "they differ | float64 walk s | float32 walk s | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        s = summary(r)
        if s["same32"] is None:
            continue
        out.append(
            f"| {r['source_model']} | {r['method']} | {r['nsamples']} | {s['writers']} | {s['same32']} | "
            f"{100 * s['loss32']:.3f}% | {s['walk_seconds']:.1f} | {s['walk32_seconds']:.1f} | "
            f"{s['walk_seconds'] / max(s['walk32_seconds'], 1e-9):.2f} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="hub id, folder, .gguf or a PyPI-shipped name; default: SmolLM2")
    p.add_argument("--method", default="budget-uniform", choices=[m for m in METHODS if m != "slicegpt"])
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--target", type=float, default=0.75)
    p.add_argument("--out", default=str(RESULTS / "ridge_search.json"))
    add_one(p)
    args = p.parse_args()
    if answer_one(args, one_run):
        return
    job = dict(model=args.model, method=args.method, nsamples=args.nsamples, seqlen=args.seqlen, target=args.target)
    out = Path(args.out)
    runs: list[dict] = json.loads(out.read_text())["runs"] if out.exists() else []
    r = run_fresh(__file__, job, "the compression")
    runs = replace_runs(runs, [r], tuple(job))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    print(table(runs))


if __name__ == "__main__":
    main()
