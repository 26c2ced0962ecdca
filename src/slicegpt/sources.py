"""Data sources: the one place a source name becomes token rows, for calibration, training and evaluation.

A source is one of:

* text: ``wiki``, ``wikitext2``, ``lambada`` (evaluation only), ``hf:NAME``, a ``.txt`` file or a
  ``.jsonl`` file with a ``text`` field, or :class:`~slicegpt.data.Text` (see :mod:`slicegpt.data`);
* conversations: a ``.jsonl`` file of ``{"messages": [...]}`` records, rendered through the
  model's chat template and packed whole (:mod:`slicegpt.chat`); losses and perplexities count
  the assistant's tokens;
* ``self`` (or ``self:PROMPTS``, PROMPTS a built-in subset such as ``builtin:all`` or a prompt
  file): the source model's own answers to the training split of the built-in prompt set
  (:mod:`slicegpt.prompts`), greedy, generated as many as the run needs and cached under
  ``$SLICEGPT_CACHE/conversations`` (keyed by the model's fingerprint), so a second run reads them;
* a mix ``A+B`` (``wiki+self``): an equal share of the rows from each part; ``N*A`` weighs a part
  (``2*wiki+self``: two thirds of the rows from ``wiki``, one third from ``self``).

Nothing here reads evaluation prompts: ``self`` answers training prompts only, and a conversation
file used for calibration or training that asks a held-out built-in prompt is refused.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import torch
from torch import nn

from . import chat, data, prompts
from .data import DataError, Rows, Text

log = logging.getLogger(__name__)

SELF = "self"
#: The default data: the model's kind decides (:func:`resolve_auto`).
AUTO = "auto"
#: What 'auto' training data is for a model with a chat template (recovery): prose and its own
#: conversations, half each (measured: it keeps its chat where prose alone loses it, and costs
#: nothing on prose; benchmarks/README, "Chat models judged by their answers").
CHAT_DEFAULT = "wiki+self"
#: What 'auto' calibration is for a model with a chat template: the prose rows a base model gets
#: (``nsamples`` of them) and as many of its own conversations on top, 2 x ``nsamples`` rows in
#: all (:func:`resolve_auto_calibration`). Prose rows on top of which its own conversations come
#: keep its prose: 'wiki+self' on 32 rows in all cost Qwen2.5-Coder 9.4% of wiki over two draws,
#: 32 + 16 rows ('2*wiki+self' on 48) none. 32 + 32 against 32 + 16, two calibration draws
#: each: top-1 agreement with the source's answers higher on every draw (SmolLM2 65.9% against
#: 64.4% on 256 held-out prompts, Qwen 86.2% against 84.7%), wiki and novels within 2.1%
#: (benchmarks/README, "Chat models judged by their answers"). The price: 2x the calibration rows.
CHAT_CALIBRATION = "wiki+self"
#: How the source model answers for ``self``: greedy, at most this many new tokens each.
SELF_SETTINGS = chat.GenerationSettings(max_new_tokens=256)
#: Prompts answered per generation call (fixed, so the cache's answers do not depend on how many a run asked for).
SELF_CHUNK = 64
SELF_BATCH_SIZE = 32
#: Training reads many more rows than calibration: 'self' answers at most this many prompts for it
#: (a one-time cost, cached) and the rows repeat in epochs beyond them; generate-data --n makes more.
SELF_TRAIN_PROMPTS = 1024

Purpose = Literal["calibration", "training", "evaluation"]
C = TypeVar("C")


def resolve_auto(source: Any, tokenizer: Any, *, streamed: bool = False) -> Any:
    """``source``, or for 'auto' the default for this model: 'wiki+self' for a model with a chat
    template, 'wiki' for a base model or a streamed one (its answers need the whole model: run
    ``slicegpt generate-data`` first and give the file)."""
    if not (isinstance(source, str) and source == AUTO):
        return source
    if chat.has_chat_template(tokenizer) and not streamed:
        return CHAT_DEFAULT
    if chat.has_chat_template(tokenizer):
        log.info(
            "note: streamed, so calibrating on 'wiki': a chat model's own answers need the whole model; "
            "run `slicegpt generate-data` first and pass `calib=wiki+FILE`"
        )
    return "wiki"


def resolve_auto_calibration(config: C, tokenizer: Any, *, streamed: bool = False) -> C:
    """``config`` (a SliceConfig) with its 'auto' calibration as it runs: for a model with a chat
    template sliced in memory, :data:`CHAT_CALIBRATION` on 2 x ``nsamples`` rows (its prose rows
    as a base model's, as many of its own conversations on top); otherwise as :func:`resolve_auto` says,
    on ``nsamples`` rows. Anything but 'auto' is left as given."""
    source = resolve_auto(config.calib, tokenizer, streamed=streamed)
    if source == CHAT_DEFAULT and config.calib == AUTO:
        return chat_calibration(config)
    return replace(config, calib=source)


def chat_calibration(config: C) -> C:
    """``config`` (a SliceConfig) calibrating a chat model by default: :data:`CHAT_CALIBRATION`
    on ``nsamples`` prose rows and as many of its own conversations on top."""
    return replace(config, calib=CHAT_CALIBRATION, nsamples=2 * config.nsamples)


def weighted_parts(source: Any) -> list[tuple[Any, int]]:
    """The parts of a mix and their weights (``'2*wiki+self'`` -> [('wiki', 2), ('self', 1)]);
    any other source is one part of weight 1."""
    if not (isinstance(source, str) and not isinstance(source, Text) and "+" in source and not os.path.exists(source)):
        return [(source, 1)]
    found = []
    for text in (p.strip() for p in source.split("+")):
        count, star, name = text.partition("*")
        weight, name = (count.strip(), name.strip()) if star and not os.path.exists(text) else ("1", text)
        if not name or not weight.isdigit() or int(weight) < 1:
            raise DataError(f"a mix of sources is 'A+B' or, weighted, '2*A+B'; got {source!r}")
        found.append((name, int(weight)))
    names = [name for name, _ in found]
    for name in names:
        if names.count(name) > 1:
            raise DataError(f"{name!r} appears twice in the mix {source!r}: weigh it instead ('2*{name}+...')")
    return found


def parts(source: Any) -> list[Any]:
    """The parts of a mix (``'wiki+self'`` -> ['wiki', 'self'], ``'2*wiki+self'`` the same); any
    other source is one part."""
    return [name for name, _ in weighted_parts(source)]


def check_source(source: Any, what: str = "data") -> None:
    """Refuse, before any work, a source that names a file that is not there or a name that is
    not a source (its contents are read, and checked, when its rows are made)."""
    if not isinstance(source, str) or isinstance(source, Text) or source == AUTO:
        return
    for part in parts(source):
        if part in data.BUILTIN_TEXTS or part.startswith(data.HF_PREFIX) or is_self(part) or os.path.exists(part):
            continue
        if part.endswith((".txt", ".jsonl")) or os.sep in part:
            raise DataError(f"{what} file not found: {part}")
        raise DataError(
            f"unknown {what} source {part!r}: use 'wiki', 'wikitext2', 'hf:NAME', 'self', a .txt/.jsonl file, "
            "or a mix such as 'wiki+self'"
        )


def is_self(part: Any) -> bool:
    return isinstance(part, str) and not isinstance(part, Text) and (part == SELF or part.startswith(SELF + ":"))


def is_conversations(source: Any) -> bool:
    """Does ``source`` (or any part of a mix) hold conversations (a conversation file or ``self``)?"""
    return any(is_self(p) or chat.is_conversation_file(p) for p in parts(source))


def _self_prompts(part: str) -> str:
    return part.partition(":")[2] or "builtin"


def check_not_held_out(conversations: Sequence[chat.Messages], where: str) -> None:
    """Refuse conversations that ask held-out evaluation prompts of the built-in set."""
    held = prompts.held_out_texts()
    asked = sum(any(m["role"] == "user" and m["content"].strip() in held for m in c) for c in conversations)
    if asked:
        raise DataError(
            f"{asked} conversations in {where} ask held-out evaluation prompts of the built-in set: "
            "they must not be calibrated or trained on"
        )


@dataclass
class _Shares:
    """How many rows each part of a mix gives: in proportion to the parts' weights, the rows left
    by rounding down going to the largest remainders (the first parts on ties)."""

    counts: list[int]

    @classmethod
    def of(cls, total: int, weights: Sequence[int]) -> "_Shares":
        whole = sum(weights)
        counts = [total * w // whole for w in weights]
        rest = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
        for i in rest[: total - sum(counts)]:
            counts[i] += 1
        return cls(counts)


def own_conversations(
    model: nn.Module | None,
    tokenizer: Any,
    part: str,
    *,
    rows: int,
    seqlen: int,
    device: str | torch.device | None = None,
    progress: bool = True,
    max_prompts: int | None = None,
) -> tuple[Path, list[chat.Messages]]:
    """The cached conversations of ``model`` answering the built-in training prompts, generated
    until they pack into ``rows`` rows of ``seqlen`` tokens (or the prompts run out).

    Prompts are answered in fixed chunks of :data:`SELF_CHUNK` in the prompt set's order, so the
    answers do not depend on how many a run asked for, and the rows are the conversations packed
    in that order: the same rows whatever the cache held before.
    """
    if model is None:
        raise DataError(f"'{part}' is the source model's own answers: it needs the source model (a teacher)")
    if not chat.has_chat_template(tokenizer):
        raise DataError(
            f"'{part}' renders the model's answers through its chat template, and this tokenizer has none: "
            "use plain text (wiki, a file)"
        )
    spec = _self_prompts(part)
    pool = prompts.prompts_for(spec, "train")[:max_prompts]
    if not prompts.is_builtin(spec):
        check_not_held_out([chat.prompt_messages(p.text) for p in pool], spec)
    header = {"model": chat.model_fingerprint(model, tokenizer), "prompts": spec, **chat.settings_dict(SELF_SETTINGS)}
    path = data.cache_dir() / "conversations" / f"{header['model']}-{spec.replace(':', '-').replace('/', '_')}.jsonl"
    file = chat.ConversationFile(path, header)
    done = {r["id"]: r for r in file.records()}
    chunks = 0
    while True:
        ready = [done[p.id] for p in pool[: chunks * SELF_CHUNK] if p.id in done]
        convs = [chat.record_conversation(r) for r in ready]
        packed = chat.pack([chat.render(tokenizer, c) for c in convs], seqlen, rows)
        if len(packed.rows) >= rows or chunks * SELF_CHUNK >= len(pool):
            break
        need_tokens = rows * seqlen - packed.tokens
        per = max(64.0, packed.tokens / max(1, len(convs))) if convs else 256.0
        more = max(1, -(-int(need_tokens / per * 1.1) // SELF_CHUNK))
        todo = range(chunks, min(chunks + more, -(-len(pool) // SELF_CHUNK)))
        missing = [c for c in todo if any(p.id not in done for p in pool[c * SELF_CHUNK : (c + 1) * SELF_CHUNK])]
        if missing and progress:
            log.info(
                f"slicegpt: the source model answers built-in prompts ({spec}) for '{part}': "
                f"{len(missing) * SELF_CHUNK} prompts, cached in {path}"
            )
        for c in missing:
            chunk = pool[c * SELF_CHUNK : (c + 1) * SELF_CHUNK]
            for r in chat.answer_into_file(
                model,
                tokenizer,
                chunk,
                file,
                SELF_SETTINGS,
                batch_size=SELF_BATCH_SIZE,
                device=device,
                progress=progress,
                desc=f"answering ({c + 1})",
            ):
                done[r["id"]] = r
        chunks = todo.stop
    return path, convs


def _rows_of(
    model: nn.Module | None,
    tokenizer: Any,
    part: Any,
    purpose: Purpose,
    *,
    rows: int | None,
    seqlen: int,
    seed: int,
    bos: int | None,
    assistant_only: bool,
    device: Any,
    progress: bool,
) -> tuple[Rows, str | None]:
    """Rows of one part: all it has (``rows`` None) or ``rows`` of them; with a note on truncation."""
    if is_self(part):
        if purpose == "evaluation":
            raise DataError(f"'{part}' is calibration and training data; evaluate answers with `slicegpt eval --chat`")
        if rows is None:
            raise DataError(f"'{part}' needs a number of rows")
        _, convs = own_conversations(
            model,
            tokenizer,
            part,
            rows=rows,
            seqlen=seqlen,
            device=device,
            progress=progress,
            max_prompts=SELF_TRAIN_PROMPTS if purpose == "training" else None,
        )
        packed = chat.conversation_rows(tokenizer, convs, seqlen, rows, None, assistant_only)
        return packed.rows, packed.note(f"'{part}'")
    if chat.is_conversation_file(part):
        convs = chat.read_conversations(part)
        if purpose != "evaluation":
            check_not_held_out(convs, str(part))
        # evaluation: every conversation in file order; otherwise drawn with the seed
        packed = chat.conversation_rows(
            tokenizer, convs, seqlen, rows, None if purpose == "evaluation" else seed, assistant_only
        )
        return packed.rows, packed.note(str(part))
    split: data.Split = "evaluation" if purpose == "evaluation" else "calibration"
    if purpose == "calibration" and rows is not None:
        return data.calibration_rows(tokenizer, part, nsamples=rows, seqlen=seqlen, seed=seed, bos_token_id=bos), None
    cut = data.cut_rows(data.tokenize(tokenizer, data.load_text(part, split)), seqlen, bos)
    if purpose == "training":
        cut = cut[torch.randperm(cut.shape[0], generator=torch.Generator().manual_seed(seed))]
    return Rows(cut if rows is None else cut[:rows]), None


def _concat(all_rows: Sequence[Rows], seed: int | None) -> Rows:
    """The rows of every part together (interleaved by a seeded shuffle); loss masks kept."""
    rows = [r for r in all_rows if len(r)]
    if not rows:
        return all_rows[0]
    if len(rows) == 1:
        return rows[0]
    ids = torch.cat([r.input_ids for r in rows])
    masked = any(r.loss_mask is not None for r in rows)
    mask = (
        torch.cat(
            [r.loss_mask if r.loss_mask is not None else torch.ones_like(r.input_ids, dtype=torch.bool) for r in rows]
        )
        if masked
        else None
    )
    if seed is not None:
        order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed))
        ids, mask = ids[order], None if mask is None else mask[order]
    return Rows(ids.contiguous(), loss_mask=None if mask is None else mask.contiguous())


def _say(note: str | None) -> None:
    if note:
        log.info(note)


def calibration_rows(
    model: nn.Module | None,
    tokenizer: Any,
    source: Any,
    *,
    nsamples: int,
    seqlen: int,
    seed: int,
    bos: int | None = None,
    device: Any = None,
    progress: bool = True,
) -> Rows:
    """``nsamples`` rows of ``seqlen`` tokens from ``source`` (a mix: shares of its parts by weight)."""
    if nsamples < 1:
        raise DataError("nsamples must be at least 1")
    ps, weights = zip(*weighted_parts(source))
    shares = _Shares.of(nsamples, weights).counts
    got = []
    for part, n in zip(ps, shares):
        if n == 0:
            continue
        rows, note = _rows_of(
            model,
            tokenizer,
            part,
            "calibration",
            rows=n,
            seqlen=seqlen,
            seed=seed,
            bos=bos,
            assistant_only=True,
            device=device,
            progress=progress,
        )
        _say(note)
        if len(rows) < n:
            raise DataError(
                f"calibration source {data.label(part)} gives {len(rows)} rows of {seqlen} tokens; {n} asked: "
                "give more data, or lower `nsamples` or `seqlen`"
            )
        got.append(Rows(rows.input_ids, loss_mask=rows.loss_mask))
    return _concat(got, seed if len(got) > 1 else None)


def calibration_rows_for(model: nn.Module, tokenizer: Any, calib: Any, config: Any) -> Rows:
    """Calibration rows for ``model``: ``calib`` is :class:`Rows`, a (rows, seqlen) tensor of ids,
    or a source (name, path, mix, :class:`Text`) drawn as ``config`` (a SliceConfig) says. ``self``
    parts are answered by ``model`` itself, on ``config.device``."""
    if isinstance(calib, Rows):
        return calib
    if isinstance(calib, torch.Tensor):
        return Rows(calib.long())
    return calibration_rows(
        model,
        tokenizer,
        calib,
        nsamples=config.nsamples,
        seqlen=data.clip_seqlen(model, config.seqlen),
        seed=config.seed,
        bos=data.bos_for(model, tokenizer),
        device=config.device,
    )


def training_rows(
    model: nn.Module | None,
    tokenizer: Any,
    source: Any,
    *,
    seqlen: int,
    val_rows: int,
    seed: int,
    bos: int | None = None,
    rows_needed: int | None = None,
    assistant_only: bool = True,
    device: Any = None,
    progress: bool = True,
) -> tuple[Rows, Rows]:
    """(training rows, held-out validation rows) from ``source``'s calibration part.

    Text and conversation files give all their rows, shuffled with ``seed``; ``self`` is generated
    (by ``model``, the dense teacher) until ``rows_needed`` training rows; each part of a mix
    holds out its share of ``val_rows``, never trained on.
    """
    ps, weights = zip(*weighted_parts(source))
    val_shares = _Shares.of(val_rows, weights).counts
    need_shares = _Shares.of(rows_needed, weights).counts if rows_needed is not None else [None] * len(ps)
    trains, vals = [], []
    for part, v, need in zip(ps, val_shares, need_shares):
        want = None if not is_self(part) else (need or 0) + v
        rows, note = _rows_of(
            model,
            tokenizer,
            part,
            "training",
            rows=want,
            seqlen=seqlen,
            seed=seed,
            bos=bos,
            assistant_only=assistant_only,
            device=device,
            progress=progress,
        )
        _say(note)
        if len(rows) < v + 1:
            raise DataError(
                f"training source {data.label(part)} gives {len(rows)} rows of {seqlen} tokens; at least {v + 1} "
                f"are needed ({v} held out for validation): give more data or lower `seqlen`"
            )
        vals.append(Rows(rows.input_ids[:v], loss_mask=None if rows.loss_mask is None else rows.loss_mask[:v]))
        trains.append(Rows(rows.input_ids[v:], loss_mask=None if rows.loss_mask is None else rows.loss_mask[v:]))
    return _concat(trains, seed if len(trains) > 1 else None), _concat(vals, None)


def evaluation_rows(model: nn.Module, tokenizer: Any, source: Any, seqlen: int, max_rows: int | None = None) -> Rows:
    """The evaluation rows of ``source`` (text: its evaluation part cut in rows; conversations:
    every one, in file order, the assistant's tokens counted); the first ``max_rows``."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 (a row of {seqlen} token predicts nothing)")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    got = []
    for part in parts(source):
        rows, note = _rows_of(
            model,
            tokenizer,
            part,
            "evaluation",
            rows=None,
            seqlen=data.clip_seqlen(model, seqlen),
            seed=0,
            bos=data.bos_for(model, tokenizer),
            assistant_only=True,
            device=None,
            progress=False,
        )
        _say(note)
        got.append(rows)
    rows = _concat(got, None)
    if len(rows) == 0:
        raise ValueError(f"evaluation data {data.label(source)} is shorter than one row of {seqlen} tokens")
    if max_rows is None:
        return rows
    return Rows(rows.input_ids[:max_rows], loss_mask=None if rows.loss_mask is None else rows.loss_mask[:max_rows])
