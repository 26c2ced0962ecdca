"""The ``slicegpt`` command line: one module per command, each with HELP, DESCRIPTION,
``add_arguments(parser)`` and ``run(args) -> exit code``; shared flags and error handling in
:mod:`.common`. Every default comes from the config dataclasses.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from .._version import __version__
from . import bench, compress, export, generate_data, inspect, plan, recover, sweep
from . import eval as eval_
from . import slice as slice_
from ..config import flags
from .common import add_command, run_in_one_line

#: The sub-commands, in the order ``slicegpt --help`` lists them.
COMMANDS = {
    "compress": compress,
    "slice": slice_,
    "recover": recover,
    "eval": eval_,
    "generate-data": generate_data,
    "bench": bench,
    "sweep": sweep,
    "inspect": inspect,
    "export": export,
    "plan": plan,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slicegpt",
        description="Compress decoder-only language models by SliceGPT: rotate by PCA, delete rows and columns.",
    )
    parser.add_argument("--version", action="version", version=f"slicegpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        add_command(sub, name, command)
    return parser


class _Stderr(logging.Handler):
    """slicegpt's notes to whatever sys.stderr is when they are emitted, as they are written."""

    def emit(self, record: logging.LogRecord) -> None:
        print(flags(self.format(record)), file=sys.stderr)


def show_notes() -> None:
    """The command line shows slicegpt's notes (INFO and up) on stderr; the library alone shows
    warnings only (Python's default), and a torchrun follower turns them down."""
    root = logging.getLogger("slicegpt")
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        root.addHandler(_Stderr())
    root.setLevel(logging.INFO)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    show_notes()
    args = build_parser().parse_args(argv)
    # Every expected failure is one line naming the problem (see the error classes).
    return run_in_one_line(args.func, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
