"""The job a chat model is made for: answering users, measured against the model it was compressed from.

On prompts it was never calibrated or trained on (the built-in set's held-out split, by default):

* the source model answers each prompt greedily (its answers cached, keyed by its fingerprint);
* the compressed model reads those answers teacher-forced: how often its most likely next token
  is the source's (top-1 agreement; the source itself scores 100%), and the perplexity it gives
  them (answer perplexity);
* the compressed model answers greedily itself: the share of answers that loop (a word 3-gram
  three times or more), that echo the system prompt, their mean length in tokens, and their word
  overlap (unigram F1) with the source's answers. The source's own shares stand beside them.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import chat
from ..data import DataError, cache_dir
from ..prompts import Prompt, builtin_prompts, prompts_for

#: The defaults of an evaluation: 64 held-out prompts, greedy, 40 new tokens each.
DEFAULT_PROMPTS = "builtin"
DEFAULT_N = 64
DEFAULT_MAX_NEW_TOKENS = 40


@dataclass
class AnswerStats:
    """What one model's own greedy answers show."""

    loops: float  # share of answers that repeat a word 3-gram three times or more
    echoes: float  # share that repeat a word 4-gram of the system prompt
    mean_tokens: float  # mean answer length in tokens
    finished: float  # share that ended (an end-of-turn token) within the token limit


@dataclass
class ChatResult:
    """A chat evaluation: the model against its source on the same prompts."""

    prompts: str
    n: int
    max_new_tokens: int
    source_model: str
    top1_agreement: float  # the model's argmax equals the source's token, on the source's answers
    answer_perplexity: float  # the model's perplexity of the source's answers
    source_top1_agreement: float  # the source's own argmax on its answers read back (100% but for rounding)
    source_answer_perplexity: float  # the source's own perplexity of its greedy answers
    word_f1: float  # mean unigram F1 of the model's answers against the source's
    model: AnswerStats
    source: AnswerStats
    seconds: float
    examples: list[dict[str, str]] = field(default_factory=list)
    per_source: dict[str, dict[str, float]] = field(default_factory=dict)
    # Code prompts with their tests, when run (run_code): the share of answers whose code passes.
    pass_at_1: float | None = None
    source_pass_at_1: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stats(answers: Sequence[chat.Answer], system: str) -> AnswerStats:
    return AnswerStats(
        loops=chat.mean(chat.loops(a.text) for a in answers),
        echoes=chat.mean(chat.echoes(a.text, system) for a in answers),
        mean_tokens=chat.mean(len(a.ids) for a in answers),
        finished=chat.mean(a.finished for a in answers),
    )


#: The largest logits one teacher-forced forward may make (bytes, float32). A 152k vocabulary
#: (Qwen2.5) at 460 tokens (a code prompt and its 256-token answer) is 280 MB a row: 32 such rows
#: at once held 9 GB of logits, twice over inside the forward, and a 23 GB machine ran out.
LOGITS_BUDGET = 1 << 30


@torch.inference_mode()
def teacher_forced(
    model: nn.Module,
    prompt_ids: Sequence[list[int]],
    answer_ids: Sequence[list[int]],
    *,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    logits_budget: int = LOGITS_BUDGET,
) -> tuple[list[int], list[float], list[int]]:
    """Per answer: how many of its tokens are the model's argmax, the summed NLL the model gives
    them, and how many there are; each answer read after its prompt (right padding).

    At most ``batch_size`` rows a forward, and fewer where their logits ([rows, width, vocab]
    float32) would pass ``logits_budget`` bytes (at least one row)."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    vocab = int(model.get_output_embeddings().weight.shape[0])
    hits: list[int] = []
    nll: list[float] = []
    counts: list[int] = []
    start = 0
    while start < len(prompt_ids):
        width = 0
        end = start
        while end < min(start + batch_size, len(prompt_ids)):  # add rows while their logits fit
            w = max(width, len(prompt_ids[end]) + len(answer_ids[end]))
            if end > start and (end - start + 1) * w * vocab * 4 > logits_budget:
                break
            width, end = w, end + 1
        seqs = [list(p) + list(a) for p, a in zip(prompt_ids[start:end], answer_ids[start:end])]
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        logits = (
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits.float().cpu()
        )  # [B, T, V]
        for r, (p, a) in enumerate(zip(prompt_ids[start:end], answer_ids[start:end])):
            if not a:
                hits.append(0), nll.append(0.0), counts.append(0)
                continue
            pos = torch.arange(len(p) - 1, len(p) + len(a) - 1)  # position t predicts token t + 1
            target = torch.tensor(a)
            row = logits[r, pos]  # [len(a), V]
            hits.append(int((row.argmax(-1) == target).sum()))
            nll.append(float(F.cross_entropy(row, target, reduction="sum")))
            counts.append(len(a))
        del logits
        start = end
    return hits, nll, counts


def source_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    settings: chat.GenerationSettings,
    *,
    batch_size: int,
    device: Any,
    progress: bool,
    cache: bool = True,
) -> list[chat.Answer]:
    """The source model's answers, cached under $SLICEGPT_CACHE/answers by its fingerprint."""
    if not cache:
        ids = [chat.prompt_ids(tokenizer, p.text) for p in prompts]
        return list(
            chat.generate(
                model,
                tokenizer,
                ids,
                settings,
                batch_size=batch_size,
                device=device,
                progress=progress,
                desc="source answers",
            )
        )  # type: ignore[arg-type]
    header = {"model": chat.model_fingerprint(model, tokenizer), **chat.settings_dict(settings)}
    path = cache_dir() / "answers" / f"{header['model']}-{settings.max_new_tokens}.jsonl"
    records = chat.answer_into_file(
        model,
        tokenizer,
        prompts,
        chat.ConversationFile(path, header),
        settings,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc="source answers",
    )
    return [
        chat.Answer(
            r["messages"][-1]["content"] if "messages" in r else r["text"],
            r["prompt_ids"],
            r["answer_ids"],
            r["finished"],
        )
        for r in records
    ]


def evaluate_chat(
    model: nn.Module,
    tokenizer: Any,
    source: nn.Module,
    source_tokenizer: Any,
    *,
    source_name: str,
    prompts: str = DEFAULT_PROMPTS,
    n: int | None = DEFAULT_N,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    examples: int = 3,
    progress: bool = True,
    cache: bool = True,
    run_code: bool = False,
) -> ChatResult:
    """Evaluate ``model`` as a chat model against ``source`` (the model it was compressed from) on
    ``n`` prompts of ``prompts`` (a built-in subset's held-out split, or a prompt file).
    ``run_code``: for code prompts that ship tests (mbpp, humaneval), run each answer's code
    against them in a subprocess (a timeout each) and report pass@1 for both models."""
    if source_tokenizer is not None and source_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            "the source model's tokenizer differs from the model's: answers cannot be compared token by token"
        )
    start = time.perf_counter()
    asked = prompts_for(prompts, "eval", n)
    settings = chat.GenerationSettings(max_new_tokens=max_new_tokens)
    theirs = source_answers(
        source, tokenizer, asked, settings, batch_size=batch_size, device=device, progress=progress, cache=cache
    )
    if device is not None:
        source.to("cpu")
    hits, nll, counts = teacher_forced(
        model, [a.prompt_ids for a in theirs], [a.ids for a in theirs], batch_size=batch_size, device=device
    )
    s_hits, s_nll, _ = teacher_forced(
        source, [a.prompt_ids for a in theirs], [a.ids for a in theirs], batch_size=batch_size, device=device
    )
    if device is not None:
        source.to("cpu")
    ours = chat.generate(
        model,
        tokenizer,
        [a.prompt_ids for a in theirs],
        settings,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc="model answers",
    )
    ours_ = [a for a in ours if a is not None]
    system = chat.system_text(tokenizer)
    total = max(1, sum(counts))
    f1 = [chat.word_f1(t.text, o.text) for t, o in zip(theirs, ours_)]
    per_source: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(p.source for p in asked):
        idx = [i for i, p in enumerate(asked) if p.source == name]
        c = max(1, sum(counts[i] for i in idx))
        per_source[name] = {
            "prompts": len(idx),
            "top1_agreement": sum(hits[i] for i in idx) / c,
            "loops": chat.mean(chat.loops(ours_[i].text) for i in idx),
        }
    return ChatResult(
        prompts=prompts,
        n=len(asked),
        max_new_tokens=max_new_tokens,
        source_model=source_name,
        top1_agreement=sum(hits) / total,
        answer_perplexity=_exp(math.fsum(nll) / total),
        source_top1_agreement=sum(s_hits) / total,
        source_answer_perplexity=_exp(math.fsum(s_nll) / total),
        word_f1=chat.mean(f1),
        model=_stats(ours_, system),
        source=_stats(theirs, system),
        seconds=time.perf_counter() - start,
        examples=[
            {"prompt": asked[i].text, "source": theirs[i].text, "model": ours_[i].text}
            for i in range(min(examples, len(asked)))
        ],
        per_source=per_source,
        pass_at_1=_pass_rate(asked, ours_) if run_code else None,
        source_pass_at_1=_pass_rate(asked, theirs) if run_code else None,
    )


# ---- code prompts: does the answer's code pass the tests shipped with the prompt? -----------------

CODE_TIMEOUT_S = 10.0
_FENCE = re.compile(r"```(?:python|py|Python)?\s*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(answer: str) -> str:
    """The code in an answer: its fenced blocks joined, or the whole answer when it has none."""
    blocks = _FENCE.findall(answer)
    return "\n\n".join(b.strip("\n") for b in blocks) if blocks else answer


def code_program(prompt: Prompt, answer: str) -> str | None:
    """The program that runs ``answer`` against ``prompt``'s tests (None: a prompt without tests)."""
    check = prompt.check
    code = extract_code(answer)
    if "tests" in check:  # mbpp
        return "\n".join([check.get("setup", ""), code, *check["tests"]]) + "\n"
    if "test" in check:  # humaneval: a whole function, or the body that continues the signature
        body = code if f"def {check['entry_point']}" in code else check["prompt"] + code
        return f"{body}\n\n{check['test']}\n\ncheck({check['entry_point']})\n"
    return None


def code_passes(program: str, timeout: float = CODE_TIMEOUT_S) -> bool:
    """Run ``program`` in a fresh isolated interpreter, in an empty folder; passes if it exits 0 in time."""
    with tempfile.TemporaryDirectory(prefix="slicegpt-code-") as folder:
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", program],
                cwd=folder,
                capture_output=True,
                timeout=timeout,
                env={"PATH": os.environ.get("PATH", "")},
            )
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def _pass_rate(asked: Sequence[Prompt], answers: Sequence[chat.Answer]) -> float | None:
    programs = [code_program(p, a.text) for p, a in zip(asked, answers)]
    runnable = [prog for prog in programs if prog is not None]
    return chat.mean(code_passes(prog) for prog in runnable) if runnable else None


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def format_chat(result: ChatResult, name: str = "model") -> str:
    """A markdown table of the result, then the examples side by side."""
    m, s = result.model, result.source
    lines = [
        f"chat: {result.n} held-out prompts ({result.prompts}), greedy, {result.max_new_tokens} new tokens",
        "",
        f"| | source ({result.source_model}) | {name} |",
        "|---|---:|---:|",
        f"| top-1 agreement with the source's answers | {100 * result.source_top1_agreement:.1f}% | "
        f"{100 * result.top1_agreement:.1f}% |",
        f"| perplexity of the source's answers | {result.source_answer_perplexity:.2f} | "
        f"{result.answer_perplexity:.2f} |",
        f"| answers that loop | {100 * s.loops:.1f}% | {100 * m.loops:.1f}% |",
        f"| answers that echo the system prompt | {100 * s.echoes:.1f}% | {100 * m.echoes:.1f}% |",
        f"| mean answer length (tokens) | {s.mean_tokens:.1f} | {m.mean_tokens:.1f} |",
        f"| word overlap with the source's answer (F1) | 1.000 | {result.word_f1:.3f} |",
    ]
    if result.pass_at_1 is not None:
        lines.append(
            f"| code that passes its tests (pass@1) | {100 * (result.source_pass_at_1 or 0):.1f}% | "
            f"{100 * result.pass_at_1:.1f}% |"
        )
    for ex in result.examples:
        lines += [
            "",
            f"> {_one_line(ex['prompt'])}",
            f"source: {_one_line(ex['source'])}",
            f"{name}: {_one_line(ex['model'])}",
        ]
    return "\n".join(lines)


def side_by_side(
    prompts: Sequence[Prompt], source: Sequence[chat.Answer], model: Sequence[chat.Answer], name: str = "compressed"
) -> str:
    """Prompts answered by the source and by the compressed model, for a person to read."""
    lines = []
    for p, a, b in zip(prompts, source, model):
        lines += [
            f"> {_one_line(p.text)}",
            f"  source:     {_one_line(a.text)}",
            f"  {name + ':':<11} {_one_line(b.text)}",
        ]
    return "\n".join(lines)


def _one_line(text: str, limit: int = 240) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "\u2026"


#: Shown when the built-in prompt data is not installed: no calibration source holds them.
FALLBACK_PROMPTS = ("What is the capital of France?", "Give me three tips for staying healthy.")


def sample_prompts(n: int = 2) -> list[Prompt]:
    """The first ``n`` held-out built-in prompts (or fixed ones when that data is missing)."""
    try:
        return builtin_prompts("builtin", "eval", n)
    except DataError:
        return [Prompt(t, "fallback", f"fallback/{i}") for i, t in enumerate(FALLBACK_PROMPTS[:n])]


def samples(
    source: nn.Module,
    model: nn.Module,
    tokenizer: Any,
    *,
    n: int = 2,
    max_new_tokens: int = 48,
    device: str | torch.device | None = None,
    name: str = "compressed",
) -> str:
    """``n`` held-out prompts answered greedily by the source and by ``model``, side by side: so
    that nobody ships a model that stopped talking without seeing it."""
    asked = sample_prompts(n)
    ids = [chat.prompt_ids(tokenizer, p.text) for p in asked]
    settings = chat.GenerationSettings(max_new_tokens=max_new_tokens)
    theirs = chat.generate(source, tokenizer, ids, settings, device=device, progress=False)
    if device is not None:
        source.to("cpu")
    ours = chat.generate(model, tokenizer, ids, settings, device=device, progress=False)
    return side_by_side(asked, theirs, ours, name)  # type: ignore[arg-type]
