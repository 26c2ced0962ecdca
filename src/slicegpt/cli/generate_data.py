"""``slicegpt generate-data``: the model answers prompts through its own chat template, as data."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..chat import (
    ConversationFile,
    GenerationSettings,
    answer_into_file,
    has_chat_template,
    model_fingerprint,
    prompt_messages,
    settings_dict,
)
from ..config import DTYPES
from ..data import DataError
from ..io.models import load_model
from ..prompts import SUBSETS, is_builtin, prompts_for
from ..sources import check_not_held_out

#: Built-in prompts answered when --n is not given.
DEFAULT_N = 512

HELP = "have a model answer prompts (its own conversations: calibration and distillation data)"
DESCRIPTION = (
    "The model answers each prompt through its own chat template; the conversations it writes "
    "(.jsonl of 'messages' records) are calibration data (slice --calib FILE) and distillation "
    "data (recover --data FILE) that match its own distribution, with no outside chat data. A "
    "base model without a template continues the prompts as text instead ('text' records). "
    "The built-in prompts are the training split of questions and instructions shipped offline "
    "(sciq, trivia_qa, nq_open, squad, jeopardy, gsm8k; mbpp and humaneval for code): their "
    "held-out split is never used here. Rerunning the same command continues an interrupted run."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="hub id, local folder, .gguf or sliced folder; default: the embedded SmolLM2-135M-Instruct",
    )
    p.add_argument(
        "--prompts",
        default="builtin",
        help=f"{', '.join(SUBSETS)} (the built-in set's training split), or a file: "
        ".txt (one prompt per line) or .jsonl ('prompt' or 'text' fields, or 'messages' ending in a user turn)",
    )
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help="prompts answered: the first N (default: 512 of the built-in set, all of a file)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens each answer may have")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampled at this temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling share (with --temperature)")
    p.add_argument(
        "--seed", type=int, default=0, help="seeds the sampling (each batch by its index: reruns and resumes agree)"
    )
    p.add_argument(
        "--system", default=None, help="a system prompt for every conversation (default: the template's own)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="prompts answered together")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype to run the model in")
    p.add_argument("--out", required=True, help="the .jsonl to write; an existing file of the same run is continued")


def run(args: argparse.Namespace) -> int:
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    out = Path(args.out)
    if out.suffix != ".jsonl":
        raise ValueError(f"--out {out} must be a .jsonl file")
    if out.is_dir():
        raise FileExistsError(f"--out {out} is a folder; name a file")
    if (
        not is_builtin(args.prompts)
        and Path(args.prompts).exists()
        and os.path.realpath(args.prompts) == os.path.realpath(out)
    ):
        raise ValueError(f"--out {out} is the prompt file: the prompts would be overwritten")
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    prompts = prompts_for(args.prompts, "train", args.n or (DEFAULT_N if is_builtin(args.prompts) else None))
    if not is_builtin(args.prompts):
        check_not_held_out([prompt_messages(p.text) for p in prompts], args.prompts)
    model, tokenizer, name = load_model(args.model, dtype=args.dtype)
    if not has_chat_template(tokenizer):
        print(f"note: {name} has no chat template: it continues each prompt as text ('text' records)")
    header = {
        "model": model_fingerprint(model, tokenizer),
        "prompts": args.prompts,
        "system": args.system,
        **settings_dict(settings),
    }
    file = ConversationFile(out, header)
    before = len(file.records())  # refuses a file of another run before any work
    if before:
        print(f"{out} holds {before} conversations of this run: continuing")
    records = answer_into_file(
        model, tokenizer, prompts, file, settings, system=args.system, batch_size=args.batch_size, device=args.device
    )
    if not records:
        raise DataError("no prompts to answer")
    cut = sum(not r["finished"] for r in records)
    print(
        f"{out}: {len(records)} conversations ({len(records) - min(before, len(records))} new) from {name}; "
        f"{cut} answers reached --max-new-tokens {args.max_new_tokens}"
    )
    return 0
