"""The ridge strength walk against the whole grid, on every writer a real compression refits.

    .venv/bin/python benchmarks/ridge_search.py                                   # SmolLM2, uniform budget, 16 rows
    .venv/bin/python benchmarks/ridge_search.py --model qwen2.5-coder-0.5b --nsamples 16
    .venv/bin/python benchmarks/ridge_search.py --method budget-per-layer --nsamples 32

A closed-form correction tries relative ridge strengths on held-out calibration rows, one solve and
one held-out error each (``slicegpt.core.refit``). The default walks the grid from its middle (3 to 6
solves); ``exhaustive`` tries all 11. This compresses the model once (in a fresh process) and, at
every refit, makes the choices on the same moments, timing each: the walk with float64 solves, the
walk with float32 solves on every output row, the same on a sample of the rows (the package's, for a
float32 model: ``refit.STRENGTH_ROWS``; every row below 2,048 outputs), on 64 and 32 rows (as
many times fewer than these models' outputs as 7B's and 70B's samples), and every strength
(float64). How often
they agree, how many strengths the walk tried, where the walk and the exhaustive choice differ how much
of the exhaustive choice's held-out gain over the unrefit writer the walk kept, and where the float32
walk differs from the float64 one how much of that gain it gives up (held-out errors in float64).
Results: tables on stdout and --out (JSON).
"""  # noqa: E501 - the usage examples are one command per line, printed as they are by --help

from __future__ import annotations

import time
from pathlib import Path

from cost_phases import METHODS
from fresh import answer_one, compression_parser, load_source, record_fresh

HERE = Path(__file__).resolve().parent
# about the output rows of the stress-test walks: 9x and 18x fewer than SmolLM2's 576, 14x and 28x
# Qwen2.5-0.5B's 896, as the package's 256 are 16x fewer than 7B's 4,096 and 32x than 70B's 8,192
STRESS_ROWS = (64, 32)
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
            hcov, hcross = (m.to(torch.float64) for m in moments.held.mean())  # held-out sums may be float32
            w64 = w0.to(torch.float64)

            def walk(precision: torch.dtype, rows: int | None = None) -> tuple[float, int, float]:
                """The package's walk with its strengths tried in ``precision`` on the output rows
                ``rows`` picks (None: all): (choice, solves, seconds)."""
                held = hcov.to(precision)
                w_some, fit_xt, held_xt, weight = refit.strength_sample(w64, cross, hcross, rows)
                tried: list[float] = []

                def err(rel: float) -> float:
                    tried.append(rel)
                    return refit.error(refit.ridge(cov, fit_xt, w_some, rel, precision), held, held_xt, weight)

                start = time.perf_counter()
                chosen = refit.choose_strength(err, grid, tie=refit.tie_for(precision))
                return chosen, len(tried), time.perf_counter() - start

            walked, tried, walk_s = walk(torch.float64)
            walked32, tried32, walk32_s = walk(torch.float32)
            # on a sample of the output rows: the package's (refit.STRENGTH_ROWS: every row below
            # 2,048 outputs), and as many times fewer rows than the outputs as 7B's and 70B's samples
            sampled = {rows: walk(torch.float32, rows) for rows in (refit.STRENGTH_ROWS, *STRESS_ROWS)}
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
                    gain=max(0.0, gain),
                    # the sampled walks against the float32 walk on every row (float64 errors, all rows)
                    sampled={
                        str(rows): dict(
                            rows=refit.strength_row_count(w64.shape[0], rows),
                            walked=choice,
                            tried=n_tried,
                            seconds=secs,
                            loss=0.0 if gain <= 0 else (every[choice] - every[walked32]) / gain,
                            lost=max(0.0, every[choice] - every[walked32]),
                        )
                        for rows, (choice, n_tried, secs) in sampled.items()
                    },
                )
            )
            # the final solve at the package's choice (float32 strengths on sampled rows), without
            # walking again, in the package's precision (benchmarks/final_solve_precision.py)
            package = sampled[refit.STRENGTH_ROWS][0] if dtype == torch.float32 else walked  # as refit.refit walks
            return plain(moments, w0, (package,), **({} if dtype is None else {"dtype": dtype}))
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
    out += [
        "",
        "| model | method | rows | writers | output rows tried on | choice = every row's | most held-out gain lost "
        "where they differ | all writers' gain lost | every row's walk s | sampled walk s | ratio |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        w = r["writers"]
        if not w or "sampled" not in w[0]:
            continue
        for key in w[0]["sampled"]:
            got = [x["sampled"][key] for x in w]
            differ = [g for x, g in zip(w, got) if g["walked"] != x["walked32"]]
            full = sum(x["walk32_seconds"] for x in w)
            secs = sum(g["seconds"] for g in got)
            sizes = sorted({g["rows"] for g in got})
            total = sum(x.get("gain", 0.0) for x in w)  # every writer's held-out gain, and the share given up
            lost = "" if "lost" not in got[0] or not total else f"{100 * sum(g['lost'] for g in got) / total:.4f}%"
            out.append(
                f"| {r['source_model']} | {r['method']} | {r['nsamples']} | {len(w)} | "
                f"{key} ({'/'.join(map(str, sizes))}) | {len(w) - len(differ)} | "
                f"{100 * max((g['loss'] for g in differ), default=0.0):.3f}% | {lost} | {full:.1f} | {secs:.1f} | "
                f"{full / max(secs, 1e-9):.2f} |"
            )
    return "\n".join(out)


def main() -> None:
    p = compression_parser(__doc__, RESULTS / "ridge_search.json")
    p.add_argument("--method", default="budget-uniform", choices=[m for m in METHODS if m != "slicegpt"])
    args = p.parse_args()
    if answer_one(args, one_run):
        return
    job = dict(model=args.model, method=args.method, nsamples=args.nsamples, seqlen=args.seqlen, target=args.target)
    print(table(record_fresh(__file__, job, args.out, tuple(job))))


if __name__ == "__main__":
    main()
