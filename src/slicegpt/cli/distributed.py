"""``torchrun --nproc-per-node N -m slicegpt slice|recover ...``: what the commands do differently under torchrun.

Rank 0 runs the command as in one process (checks, perplexity, saving, the table and JSON),
with its statistics (slice) or gradients (recover) combined with the others'; every other
process only loads the models and does its share of the work beside it, prints nothing but
errors, writes nothing, and waits for rank 0 to finish (see :mod:`slicegpt.core.distributed`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterator, TypeVar

from ..core.distributed import DEFAULT_TIMEOUT_S, TorchDistributedReduction, init_from_env, launch_from_env
from ..core.slicing import slice_model
from ..core.streams import Streams
from ..io import streaming
from ..io.models import load_model


def add_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="under torchrun: the longest any process waits for the others (an error on one process ends the rest "
        "after this at the latest)",
    )


Config = TypeVar("Config")  # SliceConfig or RecoverConfig: a dataclass with a ``device``


def join(args: argparse.Namespace, config: Config) -> tuple[TorchDistributedReduction | None, Config]:
    """Under torchrun with more than one process: refuse what does not run distributed, join the
    others, and take this process's device. (None, config) otherwise."""
    if launch_from_env() is None:
        return None, config
    if getattr(config, "search", False):
        raise ValueError(
            "--search does not run under torchrun (each candidate would need every process); "
            "run it in one process, or give --residual-share"
        )
    if getattr(args, "resume", False):
        raise ValueError(
            "--resume does not run under torchrun (each process's state would have to be staged); run without it"
        )
    ranks = init_from_env(config.device, getattr(args, "dist_timeout", DEFAULT_TIMEOUT_S))
    return ranks, replace(config, device=ranks.device)


@contextmanager
def silenced() -> Iterator[None]:
    """A process other than rank 0 says nothing but errors: slicegpt's notes and transformers'
    logs and progress bars are turned down (its own bars are off: progress=False), no stream is
    redirected, so an error still reaches stderr as it does on rank 0."""
    from transformers.utils import logging as hf_logging

    quiet = logging.getLogger("slicegpt")
    level, hf_level = quiet.level, hf_logging.get_verbosity()
    quiet.setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        quiet.setLevel(level)
        hf_logging.set_verbosity(hf_level)
        hf_logging.enable_progress_bar()


def check_agreement(ranks: TorchDistributedReduction, config: Any, fingerprint: str | None) -> None:
    """Every process must run the same settings on the same weights (checked before any work, on
    every process at once): a mismatch would mix statistics of different runs, or crash inside a
    reduction of tensors of different shapes."""
    settings = {k: v for k, v in config.to_dict().items() if k != "device"}  # each process has its own device
    ranks.check_same(hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest(), "settings")
    ranks.check_same(hashlib.sha256(str(fingerprint).encode()).hexdigest(), "the source model's weights")


def follow(
    args: argparse.Namespace,
    config: Config,
    ranks: TorchDistributedReduction,
    blocking: dict[str, bool],
    source: tuple[str, str | None],
) -> int:
    """A process other than rank 0 of ``slicegpt slice``: slice alongside it, silently (streamed as
    rank 0 decides for itself: either way the same statistics go into the reductions, in the
    same order), then wait for it to have written the output."""
    with silenced():
        opened = None
        if streaming.want_stream(args.stream, blocking):
            opened = streaming.open_streamed(args.model, dtype=config.dtype, require=args.stream == "on")
        if opened is not None:
            model, tokenizer, _name, layers = opened
            streams = Streams(source=layers, sink=streaming.DiscardSink(), reduce=ranks)
        else:
            model, tokenizer, _name = load_model(args.model, dtype=config.dtype, require_sliceable=True)
            streams = Streams(reduce=ranks)
        slice_model(
            model,
            tokenizer,
            config.calib,
            config,
            progress=False,
            source_model=source[0],
            source_fingerprint=source[1],
            streams=streams,
        )
    ranks.finish()
    return 0
