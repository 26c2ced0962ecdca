"""``slicegpt plan``: parameters, size, peak memory and time of a slicing run, without loading weights."""

from __future__ import annotations

import argparse

from ..evaluation.plan import DEFAULT_DISK_GBPS, format_plan, plan_model
from .common import add_slice_config_arguments, parse_count, slice_config_from_args, write_json

HELP = "sizes, peak memory and time of slicing a model, from its config and safetensors headers (no weights read)"
DESCRIPTION = (
    "Read a model's config.json and its safetensors headers (or the shard index) only, and print, for the slicing "
    "settings given: the model's parameters and size on disk; the sliced model's exact parameter count (the "
    "counter and width policies 'slicegpt slice' uses); the peak host and device memory of in-memory and of "
    "streaming slicing; and a time estimate. MODEL is a local folder (a config and an index with no shards will do) "
    "or a hub id (config.json and the headers are fetched, never the weights). The memory and time figures are "
    "models, term by term (see slicegpt.evaluation.plan), to be checked against measured runs."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``slicegpt plan`` options: slice's settings plus the run's shape and throughput."""
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a local model folder (config.json and safetensors files or their index), "
        "a hub id, or a .gguf; default: the embedded SmolLM2-135M-Instruct",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--target-params",
        type=parse_count,
        default=None,
        metavar="N",
        help="parameters kept: a count (100.9M, 1.2B) "
        "or a fraction of the model (0.75); with neither this nor --sparsity, the default target",
    )
    size.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="the paper's method instead: the share of the hidden width to remove",
    )
    add_slice_config_arguments(p)
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="processes calibrating together (torchrun): each holds rows / N and one device",
    )
    p.add_argument(
        "--stream",
        choices=["auto", "on", "off"],
        default="auto",
        help="the mode slice will run, as slice --stream names it (both are always estimated; auto: streaming, "
        "which reads and writes one layer at a time)",
    )
    p.add_argument(
        "--tflops",
        type=float,
        default=None,
        help=(
            "sustained TFLOP/s in the model's dtype (default by device kind: cpu 0.16, cuda 100 in bf16/fp16, 20 in "
            "fp32)"
        ),
    )
    p.add_argument(
        "--fp64-tflops",
        type=float,
        default=None,
        help="sustained float64 TFLOP/s for statistics, eigendecompositions and the final ridge solves (a float32 "
        "model tries its ridge strengths in float32) (default: cpu 0.1, cuda 10)",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="time this machine's rates first (a forward of one random layer of the model's shape on the run's "
        "device and dtype, the moments' and float64 products, the refits' solves at two widths, the neuron "
        "selection and the rotations: seconds to a minute) and plan with them instead of the defaults; --tflops "
        "and --fp64-tflops still win",
    )
    p.add_argument(
        "--disk-gbps", type=float, default=DEFAULT_DISK_GBPS, help="GB/s for reading the weights and writing the result"
    )
    p.add_argument(
        "--json", default=None, metavar="PATH", help="write every figure (bytes, seconds, FLOPs, each term) as JSON"
    )


def run(args: argparse.Namespace) -> int:
    """Print the plan; write it as JSON with --json."""
    config = slice_config_from_args(args, args.sparsity).resolved()
    plan = plan_model(
        args.model,
        config,
        nproc=args.nproc,
        stream={"auto": None, "on": True, "off": False}[args.stream],
        tflops=args.tflops,
        fp64_tflops=args.fp64_tflops,
        disk_gbps=args.disk_gbps,
        measure=args.measure,
    )
    print(format_plan(plan))
    write_json(args.json, plan.to_dict())
    return 0
