"""``slicegpt export``: a uniform sliced (or dense) Llama-family folder as a GGUF file for llama.cpp."""

from __future__ import annotations

import argparse

from ..io.gguf import DIRECT_TYPES, LLAMA_CPP_TYPES, OUTTYPES, export_gguf

HELP = "write a uniform sliced (or dense) Llama-family folder as a GGUF file for llama.cpp, quantized if asked"
DESCRIPTION = (
    "Write a standard Llama-family Hugging Face folder (a --uniform slice, or a dense model) as GGUF "
    "with the gguf package, in the type --outtype names (llama.cpp's names). "
    f"{', '.join(DIRECT_TYPES)} are written here; the k-quants ({', '.join(LLAMA_CPP_TYPES)}) by llama.cpp's "
    "own quantizer from an f16 export, through llama-cpp-python (pip install 'slicegpt[gguf-quant]'). "
    "Per-layer sliced folders are refused: their shortcut matrices exist in no standard runtime."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``slicegpt export FOLDER --gguf OUT [--outtype TYPE] [--overwrite]``."""
    parser.add_argument(
        "folder", help="a standard Hugging Face folder: a dense Llama-family model or a uniform sliced one"
    )
    parser.add_argument("--gguf", required=True, metavar="OUT", help="the .gguf file to write")
    parser.add_argument(
        "--outtype",
        default="f16",
        choices=list(OUTTYPES),
        metavar="TYPE",
        help=f"type of the weight matrices (norms and biases stay f32): {', '.join(OUTTYPES)}",
    )
    parser.add_argument("--dtype", dest="outtype", choices=list(OUTTYPES), help=argparse.SUPPRESS)  # the old name
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    out = export_gguf(args.folder, args.gguf, outtype=args.outtype, overwrite=args.overwrite)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.1f} MB, {args.outtype})")
    return 0
