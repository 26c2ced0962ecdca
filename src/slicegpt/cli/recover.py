"""``slicegpt recover``: train a sliced folder back toward the dense model (distillation or LM loss;
all weights or LoRA)."""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import DTYPES, LORA_GROUPS, RecoverConfig
from ..core.distributed import TorchDistributedReduction
from ..chat import is_conversation_file, read_conversations
from ..data import DataError, bos_for, clip_seqlen, label, load_text, shared_documents
from ..sources import check_source, is_conversations, is_self, parts, resolve_auto, training_rows
from ..evaluation.perplexity import eval_rows
from ..io import folders
from ..io.format import SlicedFolderError, is_sliced_folder, read_metadata
from ..io.models import ModelLoadError, load_model, source_identity, tokenizer_failure
from ..io.card import write_card
from ..io.recipe import Recipe, absolute_sources, recipe_of
from ..io.staging import staging_dir
from ..memory import peak_memory
from ..training.recover import recover
from . import distributed
from ..core.surgery import count_parameters
from .common import (
    add_samples_argument,
    add_save_dtype_argument,
    parse_count,
    parse_duration,
    print_samples,
    save_dtype,
    write_json,
)

HELP = "recover quality by training: distil the dense model into a sliced one, or fine-tune it"
DESCRIPTION = (
    "Train a folder written by `slicegpt slice` and save the result in the same format (per-layer "
    "folders stay slicegpt folders, uniform folders stay standard checkpoints, LoRA merged). By "
    "default the dense model it was sliced from is the teacher and the loss is the KL divergence "
    "between the teacher's and the student's next-token distributions, computed batch by batch."
)
D = RecoverConfig()
ADAPTER = "adapter"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a sliced folder (written by `slicegpt slice`)")
    p.add_argument(
        "--teacher",
        default=None,
        metavar="MODEL",
        help="the dense teacher: hub id, local folder, .gguf; default: the source model the folder records",
    )
    p.add_argument(
        "--data",
        default=D.data,
        help="training data: 'wiki' (built-in, its calibration part), 'wikitext2' (hub, train split), "
        "'hf:NAME' (a datasets data set, e.g. hf:tatsu-lab/alpaca), a .txt/.jsonl text file, a .jsonl of conversations "
        "('messages' records, rendered through the chat template), 'self' (the dense model's own answers to the "
        "built-in training prompts, generated and cached), or a mix such as 'wiki+self' ('2*wiki+self' weighs "
        "the parts' held-out rows and the own answers generated; a text part gives all its rows)",
    )
    p.add_argument(
        "--loss-on",
        default=D.loss_on,
        choices=["auto", "assistant", "all"],
        help="which tokens the loss counts: "
        "the assistant's turns of conversations, all tokens, or auto (assistant for conversations, all for text)",
    )
    p.add_argument("--out", default=None, help="output folder (default: FOLDER-recovered)")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last training checkpoint of the same run (kept beside --out)",
    )
    p.add_argument(
        "--loss",
        default=D.loss,
        choices=["kd", "lm"],
        help="kd: distillation from the teacher (default); lm: next-token cross-entropy, no teacher",
    )
    p.add_argument(
        "--train",
        default=D.train,
        choices=["all", "lora"],
        help="train every weight, or LoRA adapters (peft; merged at the end)",
    )
    p.add_argument("--lora-rank", type=int, default=D.lora_rank, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=D.lora_alpha, help="LoRA alpha")
    p.add_argument("--lora-dropout", type=float, default=D.lora_dropout, help="LoRA dropout")
    p.add_argument(
        "--lora-targets",
        default=D.lora_targets,
        help=f"comma-separated groups among {', '.join(LORA_GROUPS)} (names from the family's spec)",
    )
    p.add_argument(
        "--keep-adapter",
        action="store_true",
        help="with --train lora: also save the adapter alone, in OUT/adapter (it applies to FOLDER's weights)",
    )
    p.add_argument(
        "--tokens",
        type=parse_count,
        default=D.tokens,
        help="training tokens (e.g. 2M); steps = tokens / (batch-size x grad-accum x seqlen)",
    )
    p.add_argument("--max-steps", type=int, default=D.max_steps, help="optimiser steps instead of --tokens")
    p.add_argument(
        "--time-budget",
        type=parse_duration,
        default=D.time_budget,
        metavar="DURATION",
        help=(
            "train for at most this long (2h, 90m, 3600s), steps and validations together: the schedule is planned "
            "to end within it after the first steps are timed (at most --tokens / --max-steps), training stops when "
            "it is spent, and the best validated state is kept"
        ),
    )
    p.add_argument("--lr", type=float, default=D.lr, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=D.warmup, help="linear warm-up steps, then cosine decay to lr/10")
    p.add_argument("--weight-decay", type=float, default=D.weight_decay, help="AdamW weight decay")
    p.add_argument(
        "--seqlen", type=int, default=D.seqlen, help="tokens per training row (clipped to the model's context)"
    )
    p.add_argument("--batch-size", type=int, default=D.batch_size, help="rows per forward pass")
    p.add_argument("--grad-accum", type=int, default=D.grad_accum, help="forward passes per optimiser step")
    p.add_argument("--temperature", type=float, default=D.temperature, help="distillation temperature")
    p.add_argument(
        "--val-rows",
        type=int,
        default=D.val_rows,
        help="training-text rows held out for validation (early stopping, the kept best state)",
    )
    p.add_argument(
        "--eval-data",
        default=D.eval_data,
        metavar="DATA",
        help=(
            "also measure perplexity on DATA's evaluation part every --eval-every steps (for the curve only; must not "
            "overlap the training text)"
        ),
    )
    p.add_argument("--eval-max-rows", type=int, default=D.eval_max_rows, help="rows of --eval-data measured each time")
    p.add_argument("--eval-every", type=int, default=D.eval_every, help="validate every N steps")
    p.add_argument(
        "--early-stop-patience",
        type=int,
        default=D.early_stop_patience,
        help="stop after N validations without improvement and keep the best state",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=D.checkpoint_every,
        help="write a resumable checkpoint every N steps (0: never)",
    )
    p.add_argument("--device", default=D.device, help="cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--dtype", default=D.dtype, choices=list(DTYPES), help="bfloat16/float16: autocast (weights stay float32)"
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        default=D.gradient_checkpointing,
        help="recompute layer activations in the backward pass (less memory, more time)",
    )
    p.add_argument("--seed", type=int, default=D.seed, help="row order and adapter initialisation")
    p.add_argument(
        "--json", default=None, metavar="PATH", help="write the report (curve, tokens, seconds, memory) as JSON"
    )
    add_save_dtype_argument(p)
    add_samples_argument(p)
    distributed.add_argument(p)


def config_from_args(args: argparse.Namespace) -> RecoverConfig:
    if not (args.tokens >= 1 and float(args.tokens) == int(args.tokens)):
        raise ValueError(f"--tokens must be a whole number of tokens of at least 1 (2M, 500k), got {args.tokens:g}")
    return RecoverConfig(
        loss=args.loss,
        train=args.train,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=args.lora_targets,
        data=args.data,
        tokens=int(args.tokens),
        loss_on=args.loss_on,
        max_steps=args.max_steps,
        time_budget=args.time_budget,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        temperature=args.temperature,
        val_rows=args.val_rows,
        eval_data=args.eval_data,
        eval_max_rows=args.eval_max_rows,
        eval_every=args.eval_every,
        early_stop_patience=args.early_stop_patience,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    # Under torchrun (data-parallel): rank 0 runs the command; the others train beside it silently.
    config = config_from_args(args)
    check_source(config.data, "training")  # before any model is read
    ranks, _ = distributed.join(args, config)
    if ranks is not None and not ranks.leader:
        with distributed.silenced():
            _run(args, ranks)
        ranks.finish()  # rank 0 has written the output
        return 0
    # One writer per output folder: a second run for the same --out stops at once.
    with folders.OutputLock(output_folder(args)):
        code = _run(args, ranks)
    if ranks is not None:
        ranks.finish()
    return code


def _run(args: argparse.Namespace, ranks: TorchDistributedReduction | None = None) -> int:
    config = config_from_args(args)
    if ranks is not None:
        config = replace(config, device=ranks.device)
    leader = ranks is None or ranks.leader
    if args.keep_adapter and config.train != "lora":
        raise ValueError("--keep-adapter needs --train lora")
    folder = Path(args.folder)
    if args.json and Path(args.json).is_dir():
        raise FileExistsError(f"--json {args.json} is a folder; name a file")
    try:
        meta = read_metadata(folder)
    except SlicedFolderError as exc:
        raise SlicedFolderError(f"recover takes a folder written by `slicegpt slice`: {exc}") from None
    out = output_folder(args)
    folders.check_output_dir(out, args.overwrite, protect=(folder, args.teacher))
    # The default data for this model ('auto': its tokenizer says whether it chats), recorded as it runs.
    config = replace(config, data=resolve_auto(config.data, folder_tokenizer(folder)))
    # A missing or unreadable source fails before any model loads.
    train_texts = [_read_part(part) for part in parts(config.data)]
    eval_text = (
        load_text(config.eval_data, "evaluation")
        if config.eval_data is not None and not is_conversation_file(config.eval_data)
        else None
    )
    for part, text in zip(parts(config.data), train_texts):
        shared = shared_documents(text, eval_text) if text is not None and eval_text is not None else 0
        if shared:
            raise DataError(
                f"{shared} documents of --eval-data {label(config.eval_data)} are also in the training text "
                f"{label(part)}"
            )
    uses_self = any(is_self(p) for p in parts(config.data))
    wants_teacher = config.loss != "lm" or uses_self  # 'self' data: the dense model answers the prompts
    if args.teacher and not wants_teacher:
        raise ValueError("--teacher has no use with --loss lm (nothing is distilled): drop one of them")
    teacher_name = (args.teacher or meta.get("source_model")) if wants_teacher else None
    if wants_teacher:
        teacher_name = check_teacher_identity(teacher_name, meta, folder, explicit=bool(args.teacher))

    student, tokenizer, source = load_model(str(folder))
    teacher = teacher_tok = None
    if teacher_name is not None:
        try:
            teacher, teacher_tok, _ = load_model(teacher_name)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{exc} (the teacher; name another with --teacher, or use --loss lm)") from None
    rows = training_rows(
        teacher,
        tokenizer,
        config.data,
        seqlen=clip_seqlen(student, config.seqlen),
        val_rows=config.val_rows,
        seed=config.seed,
        bos=bos_for(student, tokenizer),
        rows_needed=config.rows_needed(),
        assistant_only=config.assistant_only(is_conversations(config.data)),
        device=config.device,
        progress=leader,
    )
    eval_ids = (
        eval_rows(student, tokenizer, config.eval_data, config.seqlen, config.eval_max_rows)
        if config.eval_data is not None
        else None
    )
    if config.loss == "lm" and teacher is not None:  # it only answered the prompts
        teacher = teacher_tok = teacher_name = None

    state = staging_dir(out, "recover")
    if leader and not args.resume and state.exists():
        print(
            f"note: {state} holds a checkpoint of an earlier run; starting over (pass --resume to continue it instead)"
        )
        shutil.rmtree(state)
    model, report = recover(
        student,
        tokenizer,
        config,
        teacher=teacher,
        teacher_tokenizer=teacher_tok,
        teacher_name=teacher_name,
        rows=rows,
        eval_ids=eval_ids,
        state_dir=state if ranks is None else None,
        resume=args.resume,
        adapter_dir=state / ADAPTER if args.keep_adapter and leader else None,
        progress=leader,
        ranks=ranks,
    )
    if not leader:
        return 0
    saved_dtype = save_dtype(args, meta.get("source_model"))
    recipe = recipe_of(folder, meta) or Recipe(model=meta.get("source_model"), slice={})
    recipe.recover = {
        **config.to_dict(),
        "data": absolute_sources(config.data),
        "eval_data": absolute_sources(config.eval_data),
    }
    recipe.save_dtype = saved_dtype
    first, last = report.curve[0], report.curve[-1]
    measured = {"validation perplexity (held-out training rows)": {"model": last["val_ppl"], "source": None}}
    if "eval_ppl" in last:
        measured[f"perplexity, {label(config.eval_data)} ({config.eval_max_rows} rows, during training)"] = {
            "model": last["eval_ppl"],
            "source": None,
        }

    def extra(tmp: Path) -> None:  # written into the folder before it appears: adapter, recipe, model card
        if args.keep_adapter:
            shutil.copytree(state / ADAPTER, tmp / ADAPTER)
        recipe.write(tmp)
        write_card(tmp, read_metadata(tmp), results=measured)

    folders.save(model.to("cpu"), out, tokenizer=tokenizer, overwrite=args.overwrite, extra=extra, dtype=saved_dtype)
    shutil.rmtree(state, ignore_errors=True)  # the run is complete: nothing left to resume

    result: dict[str, Any] = {"folder": str(folder), "out": str(out), "source_model": source, **report.summary()}
    result.update(peak_memory(config.device))
    print(
        f"{out}: {report.loss}/{report.train}, {report.steps} steps, {report.tokens:,} tokens in {report.seconds:.0f} "
        f"s ({report.tokens_per_second:.0f} tokens/s); validation perplexity {first['val_ppl']:.3f} -> "
        f"{last['val_ppl']:.3f}"
        + (
            f"; {label(config.eval_data)} {first['eval_ppl']:.3f} -> {last['eval_ppl']:.3f}"
            if "eval_ppl" in last
            else ""
        )
        + (
            f"; the time budget ran out at step {report.steps}"
            + (f" of {report.planned_steps} planned" if report.planned_steps else "")
            if report.stopped_on_time
            else ""
        )
        + (
            f"; kept step {report.best_step}"
            if report.best_step is not None and report.best_step != report.steps
            else ""
        )
    )
    write_json(args.json, result)
    print_samples(
        args,
        tokenizer,
        teacher if teacher is not None else meta.get("source_model"),
        model,
        count_parameters(model),
        device=config.device,
    )
    return 0


def check_teacher_identity(name: str | None, meta: dict[str, Any], folder: Path, *, explicit: bool) -> str:
    """The teacher, as recorded (an absolute path, a hub id or the default's name), checked: never
    a sliced folder (the student itself included); the default one (the source the folder
    records) must have the weights it had when the folder was sliced."""
    if not name:
        raise ValueError("the folder records no source model: name the dense model with --teacher, or use --loss lm")
    if is_sliced_folder(name):
        raise ValueError(f"the teacher {name} is a sliced folder: distil from the dense model it was made from")
    recorded, fingerprint = source_identity(name)
    expected = meta.get("source_fingerprint")
    if expected and fingerprint is not None and fingerprint != expected:
        if not explicit:
            raise ModelLoadError(
                f"{recorded} is not the model {folder} was sliced from (its weights differ from the fingerprint "
                "recorded then): name the dense source with --teacher"
            )
        print(f"note: the teacher {recorded} is not the model {folder} was sliced from (its weights differ)")
    return recorded


def folder_tokenizer(folder: Path) -> Any:
    """The tokenizer of a sliced folder (what 'auto' data asks: does the model chat?)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - any failure to read the files is the user's to fix
        raise tokenizer_failure(str(folder), folder, exc) from exc


def _read_part(part: str) -> str | None:
    """Check one part of --data before any model loads: text is read (and returned), a
    conversation file parsed; 'self' is generated later, by the teacher."""
    if is_self(part):
        return None
    if is_conversation_file(part):
        read_conversations(part)
        return None
    return load_text(part, "calibration")


def output_folder(args: argparse.Namespace) -> Path:
    return Path(args.out or f"{str(args.folder).rstrip('/')}-recovered")
