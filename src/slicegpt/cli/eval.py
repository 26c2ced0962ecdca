"""``slicegpt eval``: perplexity, zero-shot task accuracy and chat answers of a dense model or a sliced folder."""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..config import DTYPES
from ..core.placement import spread_model
from ..core.surgery import count_parameters
from ..evaluation.chat import DEFAULT_MAX_NEW_TOKENS, DEFAULT_N, DEFAULT_PROMPTS, evaluate_chat, format_chat
from ..evaluation.perplexity import perplexity
from ..evaluation.tasks import evaluate_tasks, format_tasks_table
from ..io.card import write_card
from ..io.format import is_sliced_folder, read_metadata
from ..io.models import load_model
from ..memory import peak_memory
from .common import EVAL_DEFAULTS, add_task_arguments, split_tasks, write_json

HELP = "measure perplexity, zero-shot accuracy and chat answers of a dense model or a sliced folder"
DESCRIPTION = (
    "Perplexity: the text is tokenized once, cut into non-overlapping rows of --seqlen tokens "
    "(remainder dropped), and perplexity = exp(mean NLL over every predicted token); for a .jsonl "
    "of conversations, over the assistant's tokens. --chat measures the job of a chat model: on "
    "held-out prompts, how the model's answers compare with its source model's (--compare, by "
    "default the model a sliced folder was made from)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = EVAL_DEFAULTS
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="sliced folder, hub id, local HF folder or .gguf; default: the embedded SmolLM2-135M-Instruct",
    )
    p.add_argument(
        "--ppl",
        default=None,
        metavar="DATA",
        help="comma-separated: 'wiki' (built-in, evaluation part), 'lambada' (novels, "
        "a second domain), 'wikitext2' (hub, test split), a .txt/.jsonl text file, or a .jsonl of conversations "
        "(the assistant's tokens counted); default 'wiki' when neither --tasks nor --chat is given",
    )
    add_task_arguments(p)
    p.add_argument(
        "--chat",
        nargs="?",
        const=DEFAULT_PROMPTS,
        default=None,
        metavar="PROMPTS",
        help="answer held-out prompts beside the source model (--compare): top-1 agreement with its answers, their "
        "perplexity, and the share of the model's own answers that loop or echo the system prompt. PROMPTS: "
        "'builtin' (the default: the built-in set's held-out split), 'builtin:code', 'builtin:all', or a prompt file",
    )
    p.add_argument("--chat-n", type=int, default=DEFAULT_N, metavar="N", help="prompts --chat asks")
    p.add_argument(
        "--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="tokens each --chat answer may have"
    )
    p.add_argument("--examples", type=int, default=3, help="--chat answers shown side by side")
    p.add_argument(
        "--run-code",
        action="store_true",
        help="with --chat builtin:code: run each answer's code against the tests shipped "
        "with its prompt (mbpp, humaneval), in a separate isolated Python with a 10 s timeout, and report pass@1 "
        "(this runs model-written code on this machine; give --max-new-tokens room for whole functions, e.g. 384)",
    )
    p.add_argument(
        "--compare",
        default=None,
        metavar="SOURCE",
        help="the model to compare with: its perplexities beside every one, "
        "and its answers for --chat (default for --chat: the source model a sliced folder records)",
    )
    p.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per row (clipped to the model's context)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per forward pass")
    p.add_argument(
        "--max-rows", type=int, default=d.max_rows, help="evaluate the first N rows of each --ppl source only"
    )
    p.add_argument("--device", default=d.device, help="cpu, cuda, ...")
    p.add_argument(
        "--device-map",
        default=d.device_map,
        metavar="MAP",
        help="run a model too large for one device over several: "
        "'auto' (every CUDA device) or a list such as 'cuda:0,cuda:1' (layers split evenly, in order); instead of "
        "--device",
    )
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES), help="dtype to run the model in")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")
    p.add_argument(
        "--update-card",
        action="store_true",
        help="add the figures to the sliced folder's model card (README.md) "
        "and its results.json, beside the source model's where --compare or --chat measured them",
    )


def _check(args: argparse.Namespace) -> None:
    if args.update_card and not (args.model and is_sliced_folder(args.model)):
        raise ValueError("--update-card writes into a sliced folder's model card: give one as MODEL")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_rows is not None and args.max_rows < 1:
        raise ValueError(f"--max-rows must be at least 1, got {args.max_rows}")
    if args.chat_n < 1 or args.max_new_tokens < 1:
        raise ValueError("--chat-n and --max-new-tokens must be at least 1")


def _source_name(args: argparse.Namespace) -> str | None:
    """The model to compare with: --compare, or (for --chat) the source a sliced folder records."""
    if args.compare:
        return args.compare
    if args.chat and args.model and is_sliced_folder(args.model):
        source = read_metadata(args.model).get("source_model")
        if not source:
            raise ValueError(f"{args.model} records no source model: name it with --compare")
        return source
    if args.chat:
        raise ValueError(
            "--chat compares answers with a source model: name it with --compare (or evaluate a sliced folder)"
        )
    return None


def run(args: argparse.Namespace) -> int:
    _check(args)
    source_name = _source_name(args)
    model, tokenizer, name = load_model(args.model, dtype=args.dtype)
    result: dict[str, Any] = {
        "model": args.model or name,
        "parameters": count_parameters(model),
        "dtype": args.dtype,
        "device": args.device,
    }
    device: str | None = args.device
    if args.device_map is not None:
        devices = spread_model(model, args.device_map, args.device)
        result["device_map"], device = model.hf_device_map if len(devices) > 1 else str(devices[0]), None
    sources = [s.strip() for s in (args.ppl or ("" if args.tasks or args.chat else "wiki")).split(",") if s.strip()]
    source = source_tok = None
    if source_name is not None:
        source, source_tok, _ = load_model(source_name, dtype=args.dtype)
        result["source"] = {"model": source_name, "parameters": count_parameters(source), "perplexities": {}}
    result["perplexities"] = {}
    for data in sources:
        res = perplexity(
            model,
            tokenizer,
            data,
            seqlen=args.seqlen,
            batch_size=args.batch_size,
            device=device,
            max_rows=args.max_rows,
        )
        result["perplexities"][data] = res.to_dict()
        line = (
            f"{result['model']}: perplexity {res.perplexity:.3f} on {res.source} ({res.rows} rows x {res.seqlen} "
            f"tokens, {res.tokens} predictions)"
        )
        if source is not None:
            base = perplexity(
                source,
                source_tok,
                data,
                seqlen=args.seqlen,
                batch_size=args.batch_size,
                device=device,
                max_rows=args.max_rows,
            )
            result["source"]["perplexities"][data] = base.to_dict()
            line += f"; source {source_name}: {base.perplexity:.3f} ({_ratio(res.perplexity, base.perplexity)})"
            source.to("cpu")
        print(line)
    if sources:
        result["perplexity"] = result["perplexities"][sources[0]]  # the first, where scripts read one
    if args.chat:
        chat = evaluate_chat(
            model,
            tokenizer,
            source,
            source_tok,
            source_name=source_name or "",
            prompts=args.chat,
            n=args.chat_n,
            max_new_tokens=args.max_new_tokens,
            batch_size=max(args.batch_size, 16),
            device=device,
            examples=args.examples,
            run_code=args.run_code,
        )
        result["chat"] = chat.to_dict()
        print(format_chat(chat, name="this model"))
    if args.tasks:
        result["tasks"] = evaluate_tasks(
            model,
            tokenizer,
            split_tasks(args.tasks) or [],
            limit=args.limit,
            batch_size=args.batch_size,
            num_fewshot=args.num_fewshot,
            offline=True if args.tasks_offline else None,
            device=device,
            dtype=args.dtype,
        )
        print(format_tasks_table(result["tasks"]))
    result.update(peak_memory(args.device))
    write_json(args.json, result)
    if args.update_card:
        write_card(args.model, read_metadata(args.model), results=card_results(result))
        print(f"model card updated: {args.model}/README.md")
    return 0


def card_results(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What an evaluation adds to a model card: {measure: {model, source, percent}}."""
    out: dict[str, dict[str, Any]] = {}
    theirs = (result.get("source") or {}).get("perplexities", {})
    for data, res in result.get("perplexities", {}).items():
        out[f"perplexity, {res['source']} ({res['rows']} rows x {res['seqlen']})"] = {
            "model": res["perplexity"],
            "source": (theirs.get(data) or {}).get("perplexity"),
        }
    chat = result.get("chat")
    if chat:
        where = f"{chat['n']} held-out prompts ({chat['prompts']}), greedy, {chat['max_new_tokens']} tokens"
        out[f"top-1 agreement with the source's answers, {where}"] = {
            "model": chat["top1_agreement"],
            "source": chat["source_top1_agreement"],
            "percent": True,
        }
        out[f"perplexity of the source's answers, {where}"] = {
            "model": chat["answer_perplexity"],
            "source": chat["source_answer_perplexity"],
        }
        out[f"answers that loop, {where}"] = {
            "model": chat["model"]["loops"],
            "source": chat["source"]["loops"],
            "percent": True,
        }
        out[f"answers that echo the system prompt, {where}"] = {
            "model": chat["model"]["echoes"],
            "source": chat["source"]["echoes"],
            "percent": True,
        }
        if chat.get("pass_at_1") is not None:
            out[f"code passing its tests (pass@1), {where}"] = {
                "model": chat["pass_at_1"],
                "source": chat["source_pass_at_1"],
                "percent": True,
            }
    tasks = result.get("tasks")
    if tasks and tasks.get("average") is not None:
        out[f"zero-shot accuracy, mean of {', '.join(sorted(tasks.get('results', {})))}"] = {
            "model": tasks["average"],
            "source": None,
            "percent": True,
        }
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if math.isfinite(a) and math.isfinite(b) and b > 0 else "n/a"
