"""``slicegpt inspect``: a sliced folder's widths, parameters and FLOPs per layer, and its spectra."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..evaluation.inspect import inspect_folder
from ..evaluation.markdown import format_inspect, pct
from ..evaluation.plots import plot_spectra, require_matplotlib
from ..evaluation.spectra import spectrum_summary
from ..io.format import SPECTRA
from .common import EVAL_DEFAULTS, write_json

HELP = "widths, parameters and FLOPs per layer of a sliced folder against dense; spectrum plot"
DESCRIPTION = (
    "Print the residual widths (d_in, d_mid, d_out), parameters and FLOPs per token of every layer of a sliced "
    "folder beside the dense model's, the totals and the share removed. No weights are read: both models are "
    "built empty from the folder's config. With --plot, draw the PCA spectra saved in the folder's spectra.json."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``slicegpt inspect`` options."""
    parser.add_argument("folder", help="a sliced folder (written by 'slicegpt slice')")
    parser.add_argument(
        "--plot", default=None, metavar="PATH", help="draw the PCA spectra of the folder's spectra.json into this PNG"
    )
    parser.add_argument(
        "--seqlen",
        type=int,
        default=EVAL_DEFAULTS.seqlen,
        help="context length for the attention term of FLOPs per token (clipped to the model's)",
    )
    parser.add_argument("--seq-len", dest="seqlen", type=int, help=argparse.SUPPRESS)  # the old spelling
    parser.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")


def run(args: argparse.Namespace) -> int:
    """Print the per-layer table; draw the spectra with --plot."""
    if args.plot:
        require_matplotlib()  # before anything else: the user asked for a plot
    info = inspect_folder(args.folder, seq_len=args.seqlen)
    print(format_inspect(info))
    write_json(args.json, info)
    spectra_file = Path(args.folder) / SPECTRA
    if not spectra_file.is_file():
        # No PCA ran (MLP neurons alone: the residual width stayed whole, in its original basis), or
        # the folder was saved without a report (or by an older slicegpt): say so plainly.
        message = (
            f"no {SPECTRA} in {args.folder} (no PCA ran: the residual width is whole; or the folder was saved "
            "without a slicing report): no spectrum plot"
        )
        if args.plot:
            raise FileNotFoundError(message)
        print(message)
        return 0
    data = json.loads(spectra_file.read_text())
    summary = spectrum_summary(data["spectra"], data["widths"])
    kept = [v["variance_kept"] for v in summary.values()]
    if kept:
        print(
            f"spectra: {len(summary)} points; variance kept at the chosen widths: min {pct(min(kept))}, "
            f"mean {pct(sum(kept) / len(kept))}"
        )
    if args.plot:
        title = f"{info.get('source_model') or args.folder}: cumulative explained variance, chosen width dashed"
        path = plot_spectra(data["spectra"], data["widths"], args.plot, title=title)
        print(f"spectrum plot: {path}")
    else:
        print(f"pass --plot PATH to draw the spectra of {spectra_file}")
    return 0
