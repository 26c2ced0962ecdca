"""``slicegpt bench``: prefill and decode speed of a model, or of two compared alternately."""

from __future__ import annotations

import argparse
from typing import Any, Callable

import torch
from torch import nn

from ..config import DTYPES
from ..core.layout import LAYOUTS
from ..evaluation.bench import CACHES, DECODE_METHODS, BenchConfig, benchmark, compare, format_table
from ..io.models import load_model
from .common import write_json

HELP = "inference speed: prefill and decode throughput, latency, memory; --compare for ratios"
DESCRIPTION = (
    "Prefill tokens/s, decode tokens/s with the KV cache, per-token latency and peak memory, medians "
    "over repeats after warm-up. With --compare the two models run alternately in one process and the table gives "
    "their ratios beside the ratio FLOPs per token predict (from the actual widths, shortcut matrices included)."
)

#: ``loader(path, device, dtype) -> (model, tokenizer)``.
Loader = Callable[[str, str, str], tuple[nn.Module, Any]]


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--batch-sizes expects e.g. 1,8; got {text!r}") from error
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"--batch-sizes expects positive ints, got {text!r}")
    return sizes


def _names(text: str) -> tuple[str, str]:
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise argparse.ArgumentTypeError(f"--names expects two different names like dense,sliced; got {text!r}")
    return parts[0], parts[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``slicegpt bench MODEL_OR_FOLDER [--compare OTHER] ...``."""
    defaults = BenchConfig()
    parser.add_argument("model", help="model name or folder (dense or sliced) to benchmark")
    parser.add_argument(
        "--compare",
        metavar="OTHER",
        default=None,
        help="reference model benchmarked alternately with MODEL; ratios are MODEL / OTHER",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=list(DTYPES),
        help="dtype to run the models in (default: float16 on cuda, float32 otherwise)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=",".join(map(str, defaults.batch_sizes)),
        help="batch sizes measured, comma-separated",
    )
    parser.add_argument(
        "--prompt-len", type=int, default=defaults.prompt_len, help="prompt tokens per sequence (random ids)"
    )
    parser.add_argument("--gen-len", type=int, default=defaults.gen_len, help="generated tokens per sequence (>= 2)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed runs before the timed ones")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed runs (medians are reported)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the random prompt ids")
    parser.add_argument(
        "--decode-method",
        choices=DECODE_METHODS,
        default=defaults.decode_method,
        help="manual: a loop of one-token forwards with the KV cache; generate: transformers' generate()",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=defaults.layout,
        help="weight storage for every model measured: 'stock' as loaded; 'matvec' stores weights with at least "
        "as many outputs as inputs input-major, which makes one-token matrix-vector products on CPU cost in "
        "proportion to their size (see slicegpt.core.layout)",
    )
    parser.add_argument(
        "--cache",
        choices=CACHES,
        default=defaults.cache,
        help="KV cache for decoding: transformers' default 'dynamic' (grows by concatenation) or a preallocated "
        "'static' one, as serving engines use",
    )
    parser.add_argument("--names", type=_names, default="reference,model", help="labels for OTHER,MODEL with --compare")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the full result dict as JSON")
    parser.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bar")


def _load(path: str, device: str, dtype: str) -> tuple[nn.Module, Any]:
    model, tokenizer, _ = load_model(path, dtype=dtype, device=device)
    return model, tokenizer


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` the flags describe (device and dtype defaults resolved)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if torch.device(device).type == "cuda" else "float32")
    return BenchConfig(
        device=device,
        dtype=dtype,
        batch_sizes=tuple(args.batch_sizes),
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
        decode_method=args.decode_method,
        layout=args.layout,
        cache=args.cache,
        progress=not args.no_progress,
    )


def measure(args: argparse.Namespace, loader: Loader = _load) -> dict[str, Any]:
    """Load the model(s) with ``loader(path, device, dtype)``, measure, print the table; the result dict."""
    config = config_from_args(args)
    model, tokenizer = loader(args.model, config.device, config.dtype)
    if args.compare:
        reference, _ = loader(args.compare, config.device, config.dtype)
        names = tuple(args.names)
        result = compare(reference, model, tokenizer, config, names=(names[0], names[1]))
        result["paths"] = {names[0]: args.compare, names[1]: args.model}
    else:
        result = benchmark(model, tokenizer, config)
        result["paths"] = {"model": args.model}
    print(format_table(result))
    write_json(args.json, result)
    return result


def run(args: argparse.Namespace) -> int:
    measure(args)
    return 0
