"""``slicegpt export``: a uniform sliced (or dense) Llama-family folder as a GGUF file for llama.cpp."""

from __future__ import annotations

import argparse

from ..io.gguf import export_gguf

HELP = "write a uniform sliced (or dense) Llama-family folder as a GGUF file for llama.cpp"
DESCRIPTION = (
    "Write a standard Llama-family Hugging Face folder (a --uniform slice, or a dense model) as GGUF "
    "with the gguf package. Per-layer sliced folders are refused: their shortcut matrices exist in no standard runtime."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``slicegpt export FOLDER --gguf OUT [--dtype f16|f32] [--overwrite]``."""
    parser.add_argument("folder", help="a standard Hugging Face folder: a dense Llama-family model or a uniform sliced one")
    parser.add_argument("--gguf", required=True, metavar="OUT", help="the .gguf file to write")
    parser.add_argument("--dtype", default="f16", choices=["f16", "f32"], help="type of the weight matrices (norms and biases stay f32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    out = export_gguf(args.folder, args.gguf, dtype=args.dtype, overwrite=args.overwrite)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.1f} MB, {args.dtype})")
    return 0
