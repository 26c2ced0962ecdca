"""``slicegpt sweep``: slice at several sparsities; results.json, results.md and plots."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..evaluation.markdown import format_sweep_markdown
from ..evaluation.sweep import DEFAULT_SPARSITIES, RESULTS_JSON, RESULTS_MD, SweepEval, parse_sparsities, sweep
from ..io.models import DEFAULT_MODEL_NAME
from .common import EVAL_DEFAULTS, add_slice_config_arguments, add_task_arguments, slice_config_from_args, split_tasks

HELP = "slice at several sparsities; perplexity, task accuracy and plots against parameters removed"
DESCRIPTION = (
    "For each sparsity: load the model afresh, slice it, measure perplexity (and lm-eval tasks with --tasks). "
    "Writes results.json, results.md and PNG plots into --out. Sparsity 0 is the dense model as shipped. "
    "The plots' x axis is the share of parameters actually removed (1 - after/before), which is negative "
    "where untying the embeddings and the shortcut matrices cost more than slicing saves."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``slicegpt sweep`` options; every default comes from :class:`SliceConfig` / :class:`EvalConfig`."""
    d = EVAL_DEFAULTS
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="hub id, local HF folder, .gguf file or folder holding one; default: the embedded SmolLM2-135M-Instruct",
    )
    p.add_argument(
        "--sparsities",
        default=",".join(f"{s:g}" for s in DEFAULT_SPARSITIES),
        help="comma-separated sparsities in [0, 1); 0 is the dense model as shipped",
    )
    p.add_argument(
        "--targets",
        default=None,
        help=(
            "parameter targets instead of sparsities: comma-separated fractions of the parameters as shipped, e.g. "
            "1,0.8,0.75,0.7 (1 is the dense model); the budget is spent as --axes says"
        ),
    )
    add_slice_config_arguments(p)
    p.add_argument(
        "--ppl",
        default="wiki",
        metavar="DATA",
        help=(
            "perplexity data ('wiki', 'wikitext2', a .txt/.jsonl file; evaluation part), or 'none' (then --tasks is "
            "needed)"
        ),
    )
    p.add_argument(
        "--eval-seqlen",
        type=int,
        default=d.seqlen,
        help="row length for --ppl (clipped to the model's context); also the context for FLOPs per token",
    )
    p.add_argument("--eval-batch-size", type=int, default=d.batch_size, help="rows per forward pass for --ppl")
    p.add_argument("--eval-max-rows", type=int, default=d.max_rows, help="evaluate --ppl on the first N rows only")
    add_task_arguments(p)
    p.add_argument(
        "--task-batch-size", type=int, default=SweepEval.task_batch_size, help="task requests per forward pass"
    )
    p.add_argument(
        "--out", default=None, help="output folder for results.json, results.md and the plots (default: sweeps/<model>)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the results in --out if it holds a results.json")
    p.add_argument(
        "--no-plots", action="store_true", help="write results.json and results.md only (no matplotlib needed)"
    )


def evaluation_from_args(args: argparse.Namespace) -> SweepEval:
    """The :class:`SweepEval` the flags describe ('none' or '' for --ppl: no perplexity)."""
    return SweepEval(
        ppl=None if str(args.ppl).strip().lower() in ("", "none") else args.ppl,
        seqlen=args.eval_seqlen,
        batch_size=args.eval_batch_size,
        max_rows=args.eval_max_rows,
        tasks=tuple(split_tasks(args.tasks) or ()),
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        tasks_offline=True if args.tasks_offline else None,
        task_batch_size=args.task_batch_size,
    )


def run(args: argparse.Namespace) -> int:
    """Run :func:`~slicegpt.evaluation.sweep.sweep` from parsed arguments and print the table."""
    config = slice_config_from_args(args, None)
    evaluation = evaluation_from_args(args)
    out = args.out or os.path.join("sweeps", Path(args.model.rstrip("/")).name if args.model else DEFAULT_MODEL_NAME)
    results = sweep(
        args.model,
        parse_sparsities(args.sparsities),
        targets=args.targets,
        config=config,
        evaluation=evaluation,
        out=out,
        overwrite=args.overwrite,
        plots=not args.no_plots,
    )
    print(format_sweep_markdown(results))
    print(f"results in {out}/ ({RESULTS_JSON}, {RESULTS_MD}{', plots' if results.get('plots') else ''})")
    return 0
