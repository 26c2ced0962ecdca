"""Compressed chat models judged by their answers: calibration (and recovery) data against the chat job.

    .venv/bin/python benchmarks/chat_smollm2.py                                    # SmolLM2, 25%, both modes, wiki/self/mix
    .venv/bin/python benchmarks/chat_smollm2.py --calibs self --modes per-layer --tasks piqa,winogrande,hellaswag,arc_easy,arc_challenge
    .venv/bin/python benchmarks/chat_smollm2.py --model qwen2.5-coder-0.5b --out benchmarks/results/chat_qwen.json
    .venv/bin/python benchmarks/chat_smollm2.py --load DIR --name recovered-self    # evaluate a folder made elsewhere (recover)

Each job runs in a fresh process: compress the model to 75% of its parameters as shipped (the
budget method, uniform = a standard checkpoint, or per-layer) with --nsamples rows of 1024 tokens
from each calibration source ('wiki' prose, 'self' = the model's own answers to the built-in
training prompts, 'wiki+self' = half each), save it under benchmarks/results/chat_models/, then
measure on data none of it was calibrated on: the chat job on --chat-n held-out built-in prompts
(greedy, 40 new tokens: top-1 agreement with the dense model's answers, their perplexity, loop and
system-prompt echo shares), perplexity on the 'wiki' evaluation part (--wiki-rows rows of 1024;
all by default) and on 'lambada' novels (--books-rows rows), and with --tasks zero-shot accuracy.
Results: a markdown table on stdout, every job in --out (a job already there is skipped unless --rerun).
--add-tasks RUNS measures only the zero-shot accuracy (--tasks, --limit) of runs already in --out
(the dense model, or the folder a run saved) and adds it to them.
"""  # noqa: E501 - the usage examples are one command per line, printed as they are by --help

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fresh import add_one, answer_one, load_source, replace_runs, run_fresh

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = RESULTS / "chat_models"


def one_run(job: dict) -> dict:
    import torch

    import slicegpt
    from slicegpt.evaluation.chat import evaluate_chat

    torch.manual_seed(0)
    if job.get("tasks_only"):
        return _tasks_only(job)
    model, tokenizer, name = load_source(job.get("model"))
    source = None if job["method"] == "dense" else load_source(job.get("model"))[0]
    dense_params = slicegpt.count_parameters(model)
    result = dict(job, source_model=name, params_dense=dense_params)
    if job.get("load"):
        del model
        model = slicegpt.load(job["load"])
        meta = model.slicegpt_metadata
        result.update(
            params=slicegpt.count_parameters(model),
            settings=meta.get("settings"),
            allocation=meta.get("allocation"),
            recovery=meta.get("recovery", {}).get("settings") if isinstance(meta.get("recovery"), dict) else None,
        )
    elif job["method"] != "dense":
        config = slicegpt.SliceConfig(
            target_params=job["target"],
            uniform=job["mode"] == "uniform",
            nsamples=job["nsamples"],
            seqlen=job.get("seqlen", 1024),
            calib=job["calib"],
            **({} if job.get("seed") is None else {"seed": job["seed"]}),
        )
        if job.get("metric_blend") is not None:  # the experiment of loss_metric.py: neurons chosen in the loss's metric
            import loss_metric

            from slicegpt import sources

            start = time.perf_counter()
            rows = sources.calibration_rows_for(model, tokenizer, job["calib"], config).input_ids  # the run's own rows
            loss_metric.install(loss_metric.metric_roots(loss_metric.loss_metrics(model, rows), job["metric_blend"]))
            result["metric_seconds"] = time.perf_counter() - start
        if job.get("reader_refit"):  # the experiment of reader_refit.py: readers refit beside writers
            import reader_refit

            reader_refit.install()
        start = time.perf_counter()
        report = slicegpt.slice_model(model, tokenizer, None, config, source_model=name)
        result.update(
            params=report.params_after,
            allocation=report.allocation,
            compress_seconds=time.perf_counter() - start,
            settings=config.to_dict(),
            calibration_tokens=report.calibration_tokens,
        )
        folder = MODELS / job["name"]
        slicegpt.save(model, folder, tokenizer=tokenizer, report=report, overwrite=True)
        result["folder"] = str(folder.relative_to(HERE.parent))
    else:
        result.update(params=dense_params)
    if job["method"] == "dense":
        # The dense model against itself agrees by definition: its answers (cached for the other
        # jobs, whose rows carry the dense model's loop and echo shares) need no second reading.
        return _perplexities(job, result, model, tokenizer)
    res = evaluate_chat(
        model, tokenizer, source, tokenizer, source_name=name, n=job["chat_n"], progress=False, examples=4
    )
    result["chat"] = res.to_dict()
    if job.get("code_n"):
        # Code prompts held out of the built-in set (mbpp, humaneval), answered at a length that
        # lets a function finish; pass@1 runs each answer against the prompt's shipped tests.
        code = evaluate_chat(
            model,
            tokenizer,
            source,
            tokenizer,
            source_name=name,
            prompts="builtin:code",
            n=job["code_n"],
            max_new_tokens=job.get("code_tokens", 256),
            progress=False,
            examples=2,
            run_code=True,
        )
        result["code"] = code.to_dict()
    del source
    return _perplexities(job, result, model, tokenizer)


def _perplexities(job: dict, result: dict, model, tokenizer) -> dict:
    import torch

    import slicegpt
    from slicegpt.memory import peak_rss_gb

    wiki = slicegpt.perplexity(model, tokenizer, "wiki", seqlen=1024, max_rows=job["wiki_rows"], progress=False)
    books = slicegpt.perplexity(model, tokenizer, "lambada", seqlen=1024, max_rows=job["books_rows"], progress=False)
    result.update(wiki=wiki.perplexity, wiki_rows=wiki.rows, books=books.perplexity, books_rows=books.rows)
    if job.get("tasks"):
        result["tasks"] = _zero_shot(model, tokenizer, job)
    result["peak_rss_gb"] = peak_rss_gb()
    result["torch_threads"] = torch.get_num_threads()
    return result


def _zero_shot(model, tokenizer, job: dict) -> dict:
    """The job's zero-shot tasks (--tasks, --limit items each; offline data, on the CPU)."""
    from slicegpt.evaluation.tasks import evaluate_tasks

    return evaluate_tasks(
        model, tokenizer, job["tasks"].split(","), limit=job["limit"], batch_size=16, offline=True, device="cpu"
    )


def _tasks_only(job: dict) -> dict:
    """--add-tasks: zero-shot accuracy of the dense model or of a run's saved folder, nothing else."""
    import slicegpt
    from slicegpt.memory import peak_rss_gb

    model, tokenizer, _ = load_source(job.get("model"))
    if job.get("folder"):
        del model
        model = slicegpt.load(str(HERE.parent / job["folder"]))
    return dict(tasks=_zero_shot(model, tokenizer, job), peak_rss_gb=peak_rss_gb())


def _read(out_path: Path) -> list[dict]:
    return json.loads(out_path.read_text())["runs"] if out_path.exists() else []


def add_tasks(args: argparse.Namespace, out_path: Path) -> None:
    """Zero-shot accuracy added to the runs named in --add-tasks (each in a fresh process)."""
    if not args.tasks:
        raise SystemExit("--add-tasks needs --tasks")
    for name in args.add_tasks.split(","):
        results = _read(out_path)
        run = next((r for r in results if r["name"] == name and r.get("model") == args.model), None)
        if run is None:
            raise SystemExit(f"--add-tasks: no run named {name!r} for model {args.model} in {out_path}")
        folder = run.get("folder") or run.get("load")
        if run["method"] != "dense" and not folder:
            raise SystemExit(f"--add-tasks: run {name!r} saved no folder to measure")
        if run.get("tasks") and run.get("limit") == args.limit and not args.rerun:
            continue
        print(f"== {name}: {args.tasks}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        job = dict(model=args.model, tasks_only=True, folder=folder, tasks=args.tasks, limit=args.limit)
        r = run_fresh(__file__, job, f"tasks of {name}")
        run.update(
            tasks=r["tasks"],
            limit=args.limit,
            tasks_wall_seconds=time.perf_counter() - start,
            peak_rss_gb=max(run.get("peak_rss_gb", 0), r["peak_rss_gb"]),
        )
        out_path.write_text(json.dumps({"runs": results}, indent=2) + "\n")
        print(table([run]).splitlines()[-1], flush=True)


def _code_cells(c: dict | None, dense: bool = False) -> str:
    if not c:
        return "  |  |"
    if dense:
        return f" 100.0% | {100 * (c['source_pass_at_1'] or 0):.1f}% |"
    return (
        f" {100 * c['top1_agreement']:.1f}% | {100 * (c['pass_at_1'] or 0):.1f}% "
        f"({100 * (c['source_pass_at_1'] or 0):.1f}%) |"
    )


def _as_dense(rows: list[dict], r: dict, key: str) -> dict | None:
    """The dense row's chat figures, from any compressed row of the same model: what the dense
    model's own answers measured there (the dense model agrees with itself by definition)."""
    other = next((x[key] for x in rows if x.get(key) and x.get("model") == r.get("model")), None)
    if other is None:
        return None
    return dict(
        other,
        top1_agreement=1.0,
        answer_perplexity=other["source_answer_perplexity"],
        model=other["source"],
        pass_at_1=other.get("source_pass_at_1"),
    )


def table(rows: list[dict]) -> str:
    dense = {r.get("model"): r for r in rows if r["method"] == "dense"}
    code = any(r.get("code") for r in rows)
    out = [
        "| run | parameters | top-1 agreement | answer ppl | loops (dense) | echoes | wiki ppl | x dense | lambada "
        "ppl | x dense | zero-shot |" + (" code top-1 | code pass@1 (dense) |" if code else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if code else ""),
    ]
    for r in rows:
        is_dense = r["method"] == "dense"
        # the dense row's figures come from the compressed rows' measurements of its answers; a
        # compressed row that did not measure something shows nothing there
        c = r.get("chat") or (_as_dense(rows, r, "chat") if is_dense else None)
        k = r.get("code") or (_as_dense(rows, r, "code") if is_dense else None)
        d = dense.get(r.get("model"))
        wx = r["wiki"] / d["wiki"] if d else float("nan")
        bx = r["books"] / d["books"] if d else float("nan")
        avg = (r.get("tasks") or {}).get("average")
        chat_cells = (
            f"{100 * c['top1_agreement']:.1f}% | {c['answer_perplexity']:.2f} | {100 * c['model']['loops']:.0f}% "
            f"({100 * c['source']['loops']:.0f}%) | {100 * c['model']['echoes']:.0f}% | "
            if c
            else " |  |  |  | "
        )
        out.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f}M | {chat_cells}{r['wiki']:.2f} | {wx:.2f} | {r['books']:.2f} | "
            f"{bx:.2f} | {'' if avg is None else f'{100 * avg:.1f}'} |" + (_code_cells(k, is_dense) if code else "")
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=None, help="a packaged model instead of the embedded SmolLM2 (qwen2.5-coder-0.5b)"
    )
    p.add_argument("--target", type=float, default=0.75)
    p.add_argument("--modes", default="uniform,per-layer", help="uniform, per-layer, or none (the dense row alone)")
    p.add_argument("--calibs", default="wiki,self,wiki+self")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=1024, help="calibration row length (tokens)")
    p.add_argument(
        "--seed", type=int, default=None, help="the calibration draw's seed (default: SliceConfig's); named in the run"
    )
    p.add_argument(
        "--metric-blend",
        type=float,
        default=None,
        help="experiment (loss_metric.py): choose MLP neurons in the loss's metric at each layer, blended with "
        "the identity by this share (1: the loss's metric alone)",
    )
    p.add_argument(
        "--reader-refit",
        action="store_true",
        help="experiment (reader_refit.py): refit each branch's readers (q/k/v, gate/up) toward their dense outputs",
    )
    p.add_argument("--no-dense", action="store_true", help="skip the dense model's own row")
    p.add_argument("--chat-n", type=int, default=64)
    p.add_argument(
        "--code-n",
        type=int,
        default=0,
        help="also ask this many held-out code prompts (mbpp, humaneval) and run their tests (pass@1)",
    )
    p.add_argument("--code-tokens", type=int, default=256, help="new tokens for a code answer")
    p.add_argument("--wiki-rows", type=int, default=None)
    p.add_argument("--books-rows", type=int, default=64)
    p.add_argument("--tasks", default=None)
    p.add_argument("--limit", type=int, default=500)
    p.add_argument(
        "--load",
        default=None,
        metavar="DIR",
        help="evaluate this folder (made by `slicegpt slice` or `recover`) as one run",
    )
    p.add_argument("--name", default=None, help="the run's name (with --load, or one mode and one calibration)")
    p.add_argument("--rerun", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "chat_smollm2.json"))
    p.add_argument(
        "--add-tasks",
        default=None,
        metavar="RUNS",
        help="only zero-shot accuracy (--tasks, --limit) of these runs in --out (comma-separated names; "
        "'dense', or runs that saved a folder), added to them",
    )
    add_one(p)
    args = p.parse_args()
    if answer_one(args, one_run):
        return
    if args.add_tasks:
        add_tasks(args, Path(args.out))
        return
    if args.name and not args.load and len(args.modes.split(",")) * len(args.calibs.split(",")) > 1:
        p.error("--name names one run: give one mode and one calibration")
    common = dict(
        model=args.model,
        chat_n=args.chat_n,
        code_n=args.code_n,
        code_tokens=args.code_tokens,
        wiki_rows=args.wiki_rows,
        books_rows=args.books_rows,
        tasks=args.tasks,
        limit=args.limit,
    )
    jobs = (
        []
        if args.no_dense
        else [dict(common, name="dense", method="dense", mode="-", target=None, calib=None, nsamples=None)]
    )
    if args.load:
        jobs = [
            dict(
                common,
                name=args.name or Path(args.load).name,
                method="loaded",
                mode="-",
                target=None,
                calib=None,
                nsamples=None,
                load=args.load,
            )
        ]
    else:
        for mode in [] if args.modes == "none" else args.modes.split(","):
            for calib in args.calibs.split(","):
                tag = args.name or f"{'uniform' if mode == 'uniform' else 'per-layer'}-{calib}-{args.nsamples}" + (
                    f"x{args.seqlen}" if args.seqlen != 1024 else ""
                ) + (f"-s{args.seed}" if args.seed is not None else "") + (f"-{args.model}" if args.model else "") + (
                    f"-metric{args.metric_blend:g}" if args.metric_blend is not None else ""
                ) + ("-readers" if args.reader_refit else "")
                jobs.append(
                    dict(
                        common,
                        name=tag,
                        method="budget",
                        mode=mode,
                        target=args.target,
                        calib=calib,
                        nsamples=args.nsamples,
                        seqlen=args.seqlen,
                        seed=args.seed,
                        **({} if args.metric_blend is None else {"metric_blend": args.metric_blend}),
                        **({"reader_refit": True} if args.reader_refit else {}),
                    )
                )
    out_path = Path(args.out)
    results = _read(out_path)
    for job in jobs:
        same = [
            r
            for r in results
            if r["name"] == job["name"]
            and r.get("model") == job.get("model")
            and (not job.get("tasks") or r.get("tasks"))
        ]
        if same and not args.rerun:
            continue
        print(f"== {job['name']}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        r = run_fresh(__file__, job, f"job {job['name']}")
        r["wall_seconds"] = time.perf_counter() - start
        # read again: another invocation (--add-tasks, a second model) may have written meanwhile
        results = _read(out_path)
        results = replace_runs(results, [r], ("name", "model"))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"runs": results}, indent=2) + "\n")
        print(table([r]).splitlines()[-1], flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
