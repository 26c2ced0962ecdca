"""Conversations as data: read, rendered through the model's chat template, packed into rows; and
the model's own answers to prompts, generated batch by batch.

A conversation file is ``.jsonl``, one ``{"messages": [{"role": ..., "content": ...}, ...]}``
per line: the records transformers' ``apply_chat_template`` takes. Each is rendered through the
tokenizer's template exactly as the model sees it when it chats (its default system prompt
included), and the tokens of every assistant turn, its end-of-turn marker included, are marked so
that training and perplexity can count them alone.

Packing: rows of ``seqlen`` tokens, each starting at the start of a conversation, filled with
whole conversations in order; the space a whole conversation does not fit is topped up with the
start of the next one (which then opens the next row whole), so no row holds padding, and the
top-up tokens are never counted by a loss. A conversation longer than a row is cut to it; how
many were is said.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import DataError, Rows

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant", "tool")


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def is_conversation_file(source: Any) -> bool:
    """Is ``source`` a ``.jsonl`` file whose first record holds ``messages``?"""
    if not isinstance(source, (str, os.PathLike)) or not str(source).endswith(".jsonl") or not os.path.isfile(source):
        return False
    try:
        with open(source, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    record = json.loads(line)
                    return isinstance(record, dict) and "messages" in record
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return False


def check_messages(messages: Any, where: str) -> Messages:
    """``messages`` as a list of {role, content} strings, or a one-line error naming ``where``."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} records")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: every message needs a 'role' and a 'content' string")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: unknown role {m['role']!r} (use {', '.join(ROLES)})")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def read_conversations(path: str | os.PathLike) -> list[Messages]:
    """The conversations of a ``.jsonl`` file (a ``messages`` list per line), checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"conversation file not found: {path}")
    out: list[Messages] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or "messages" not in record:
            raise DataError(f"{path}:{n}: each line must be a JSON object with a 'messages' list")
        out.append(check_messages(record["messages"], f"{path}:{n}"))
    if not out:
        raise DataError(f"{path} holds no conversations")
    return out


@dataclass(frozen=True)
class Rendered:
    """One conversation as the model reads it: token ids and which of them the assistant wrote."""

    ids: list[int]
    assistant: list[bool]


def _template(tokenizer: Any, messages: Messages, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render(tokenizer: Any, messages: Messages) -> Rendered:
    """Render ``messages`` through the tokenizer's chat template; mark each assistant turn's tokens.

    An assistant turn is what the template writes between the conversation before it (with the
    generation prompt) and the conversation through it: its content and end-of-turn marker.
    """
    if not has_chat_template(tokenizer):
        raise DataError("conversations need a chat template, and this tokenizer has none: give plain text instead")
    text = _template(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = _template(tokenizer, messages[: i + 1])
        if upto.startswith(before) and text.startswith(upto):
            spans.append((len(before), len(upto)))
        else:  # a template that rewrites earlier turns (drops reasoning, say): find the content itself
            at = text.find(m["content"], spans[-1][1] if spans else 0)
            if at >= 0:
                spans.append((at, at + len(m["content"])))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    assistant = [any(a <= s < b for a, b in spans) for s, _e in offsets]
    return Rendered(ids, assistant)


@dataclass
class Packed:
    """Rows packed from conversations, and what the packing did."""

    rows: Rows
    conversations: int  # conversations in the rows (whole or cut)
    truncated: int  # conversations longer than a row, cut to it
    tokens: int  # tokens in all rows
    counted: int  # tokens the loss counts (assistant tokens, or all but top-ups)

    def note(self, what: str) -> str | None:
        if not self.truncated:
            return None
        return (
            f"note: {self.truncated} of {self.conversations} conversations in {what} are longer than a row and were "
            "cut to it (raise `seqlen` to keep them whole)"
        )


def pack(examples: Sequence[Rendered], seqlen: int, rows: int | None = None, assistant_only: bool = True) -> Packed:
    """Rows of ``seqlen`` tokens from ``examples`` in order (see the module's note); at most
    ``rows`` of them. ``loss_mask`` marks the counted tokens: the assistant's (``assistant_only``)
    or every token, top-ups excepted either way."""
    if seqlen < 2:
        raise DataError(f"seqlen {seqlen} is too short")
    out_ids: list[list[int]] = []
    out_mask: list[list[bool]] = []
    cur_ids: list[int] = []
    cur_mask: list[bool] = []
    truncated = used = 0
    for ex in examples:
        if rows is not None and len(out_ids) >= rows:
            break
        ids, mark = ex.ids, ex.assistant if assistant_only else [True] * len(ex.ids)
        if len(ids) > seqlen:
            ids, mark = ids[:seqlen], mark[:seqlen]
            truncated += 1
        used += 1
        room = seqlen - len(cur_ids)
        if len(ids) <= room:
            cur_ids += ids
            cur_mask += mark
            continue
        if cur_ids:  # top up with this conversation's start (never counted), then open a row with it
            out_ids.append(cur_ids + ids[:room])
            out_mask.append(cur_mask + [False] * room)
        cur_ids, cur_mask = list(ids), list(mark)
        if len(cur_ids) == seqlen:
            out_ids.append(cur_ids)
            out_mask.append(cur_mask)
            cur_ids, cur_mask = [], []
    if cur_ids and len(cur_ids) == seqlen and (rows is None or len(out_ids) < rows):
        out_ids.append(cur_ids)
        out_mask.append(cur_mask)
    if rows is not None:
        out_ids, out_mask = out_ids[:rows], out_mask[:rows]
    if not out_ids:
        return Packed(
            Rows(torch.zeros(0, seqlen, dtype=torch.long), loss_mask=torch.zeros(0, seqlen, dtype=torch.bool)),
            used,
            truncated,
            0,
            0,
        )
    ids_t = torch.tensor(out_ids, dtype=torch.long)
    mask_t = torch.tensor(out_mask, dtype=torch.bool)
    return Packed(Rows(ids_t, loss_mask=mask_t), used, truncated, ids_t.numel(), int(mask_t.sum()))


def conversation_rows(
    tokenizer: Any,
    conversations: Sequence[Messages],
    seqlen: int,
    rows: int | None,
    seed: int | None,
    assistant_only: bool = True,
    what: str = "the data",
) -> Packed:
    """Render ``conversations`` (shuffled with ``seed`` first, unless None) and pack them."""
    order = list(range(len(conversations)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    rendered = (render(tokenizer, conversations[i]) for i in order)
    return pack(list(rendered), seqlen, rows, assistant_only)


# ---- generation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated: greedy (``temperature`` 0) or sampled, at most
    ``max_new_tokens`` new tokens each; ``seed`` draws the samples."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Answer:
    """A generated answer: its text, the token ids it was generated from and as, and why it stopped."""

    text: str
    prompt_ids: list[int]
    ids: list[int]
    finished: bool  # stopped at an end-of-turn token, not at max_new_tokens


def prompt_messages(prompt: str, system: str | None = None) -> Messages:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def prompt_ids(tokenizer: Any, prompt: str, system: str | None = None) -> list[int]:
    """The tokens the model reads before answering ``prompt``: through its chat template with the
    generation prompt, or the plain text for a model without one (it continues the text)."""
    if has_chat_template(tokenizer):
        text = _template(tokenizer, prompt_messages(prompt, system), generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None else []) + ids


def stop_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the model's generation config's and the tokenizer's EOS."""
    found: list[int] = []
    for value in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in found:
                found.append(v)
    if not found:
        raise DataError("the tokenizer names no end-of-sequence token: answers could not stop")
    return found


def _pad_id(tokenizer: Any, stops: list[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else stops[0]


def forward_params(model: nn.Module) -> set[str]:
    """The keyword arguments the model's forward declares (empty where it cannot be read)."""
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return set()


def cache_kwarg(model: nn.Module) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name is deprecated); the
    one the model's forward declares."""
    params = forward_params(model)
    return "past_key_values" if "cache" not in params and "past_key_values" in params else "cache"


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (``cache`` first: the deprecated alias warns on 5.x)."""
    cache = getattr(output, "cache", None)
    if cache is None and "past_key_values" in getattr(output, "keys", lambda: ())():
        cache = output["past_key_values"]
    return cache


# A model's generation-config settings that change which token greedy decoding picks (or make it
# another search): where one is set, answers come from transformers' generate, which applies them.
GREEDY_CHANGERS = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "min_length",
    "min_new_tokens",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "renormalize_logits",
    "guidance_scale",
    "watermarking_config",
    "num_beams",
    "penalty_alpha",
    "dola_layers",
)


def plain_greedy(model: nn.Module) -> bool:
    """Does greedy decoding of this model take each row's most likely token and nothing else?"""
    from transformers import GenerationConfig

    config = getattr(model, "generation_config", None)
    if config is None:
        return True
    default = GenerationConfig()
    return all(getattr(config, k, None) == getattr(default, k, None) for k in GREEDY_CHANGERS)


@torch.inference_mode()
def greedy_tokens(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, stops: Sequence[int], pad: int
) -> torch.Tensor | None:
    """Greedy continuations of the left-padded rows ``ids`` ([B, W], ``mask`` 1 on real tokens):
    [B, max_new_tokens] new tokens, ``pad`` after a row's stop token; None where the model returns
    no KV cache that can drop rows (a forward that ignores ``use_cache``: transformers' generate
    must answer).

    What transformers' greedy generate returns, but a row that has stopped leaves the batch (and
    its KV cache) at once, where generate runs every row until the last stops: a batch of the
    model's own answers (mean 92 of up to 256 tokens) costs what its living rows do. Positions
    count real tokens as generate counts them; the prompt's head runs at its last position only.
    """
    B = ids.shape[0]
    out = torch.full((B, max_new_tokens), pad, dtype=torch.long)
    if max_new_tokens < 1 or B == 0:
        return out
    params, key = forward_params(model), cache_kwarg(model)
    stop = torch.tensor(list(stops), dtype=torch.long)  # compared on the host, where the tokens go
    # Positions as generate counts them (padded ones read 1), given to a forward that takes them.
    positioned = not params or "position_ids" in params
    pos = mask.long().cumsum(-1) - 1
    pos.masked_fill_(mask == 0, 1)
    extra: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    if positioned:
        extra["position_ids"] = pos
    output = model(input_ids=ids, attention_mask=mask, use_cache=True, **extra)
    cache = output_cache(output)
    if not hasattr(cache, "batch_select_indices"):
        return None
    nxt = output.logits[:, -1].argmax(-1)  # [B]
    alive = torch.arange(B)  # the batch rows still decoding, by their row in ``out``
    for step in range(max_new_tokens):
        token = nxt.cpu()
        out[alive, step] = token
        going = ~torch.isin(token, stop)
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):  # the rows that stopped leave the batch and the cache
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep.to(ids.device))
            alive, mask, nxt = alive[keep], mask[keep.to(mask.device)], nxt[keep.to(nxt.device)]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        step_kw: dict[str, Any] = {key: cache}
        if positioned:
            step_kw["position_ids"] = mask.long().sum(-1, keepdim=True) - 1
        output = model(input_ids=nxt[:, None], attention_mask=mask, use_cache=True, **step_kw)
        cache = output_cache(output)
        nxt = output.logits[:, -1].argmax(-1)
    return out


@torch.inference_mode()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    settings: GenerationSettings,
    *,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_batch: Callable[[list[int], list[Answer]], None] | None = None,
    skip: Callable[[list[int]], bool] | None = None,
    desc: str = "generating",
) -> list[Answer | None]:
    """Answers to ``prompts`` (token ids, as :func:`prompt_ids` gives), in their order.

    Batches are fixed by the whole list (prompts sorted by length, then cut every ``batch_size``),
    and a sampled batch is seeded by its index: the same prompts give the same answers whether a
    run is whole or resumed. ``skip(indices)`` leaves a batch out (its answers None);
    ``on_batch(indices, answers)`` is told each finished batch (to append it to a file).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    stops = stop_ids(model, tokenizer)
    pad = _pad_id(tokenizer, stops)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if device is not None:
        model.to(dev)
    model.eval()
    plain = plain_greedy(model)  # greedy answers from :func:`greedy_tokens`, rows leaving as they stop
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    answers: list[Answer | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
    for b, idx in enumerate(batches):
        if skip is not None and skip(idx):
            bar.update(len(idx))
            continue
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding: every prompt ends where generation starts
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        kwargs: dict[str, Any] = dict(
            max_new_tokens=settings.max_new_tokens, do_sample=not settings.greedy, eos_token_id=stops, pad_token_id=pad
        )
        if not settings.greedy:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        else:  # a model's generation config may ask for sampling; greedy means greedy
            kwargs.update(temperature=None, top_p=None, top_k=None)
        new = None
        if settings.greedy and plain:
            new = greedy_tokens(model, ids.to(dev), mask.to(dev), settings.max_new_tokens, stops, pad)
        if new is None:
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                torch.manual_seed(settings.seed * 1_000_003 + b)
                out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kwargs)
            new = out[:, width:].cpu()
        done: list[Answer] = []
        for r, i in enumerate(idx):
            toks = new[r].tolist()
            end = next((k for k, t in enumerate(toks) if t in stops), None)
            kept = toks if end is None else toks[: end + 1]
            text = tokenizer.decode(kept if end is None else kept[:-1], skip_special_tokens=True).strip()
            answers[i] = Answer(text, list(prompts[i]), kept, end is not None)
            done.append(answers[i])
        if on_batch is not None:
            on_batch(idx, done)
        bar.update(len(idx))
    bar.close()
    return answers


# ---- conversation files the model writes -------------------------------------------------------


def model_fingerprint(model: nn.Module, tokenizer: Any) -> str:
    """A short digest that tells models apart: the config, the chat template, and the shape and
    the first and last 4096 values of every parameter (whole-weight hashing of a large model
    would take minutes; a different model or a changed weight shows in these). Where the model was
    loaded from is left out: the same model from a moved folder keeps its cached answers, and a
    resumed ``generate-data`` file its header."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    settings = config.to_dict() if config is not None else {}
    settings.pop("_name_or_path", None)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    for name, p in model.named_parameters():
        if p.is_meta:
            raise DataError("the model's weights are not loaded (a streamed skeleton): it cannot answer prompts here")
        flat = p.detach().reshape(-1)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        for part in (flat[:4096], flat[-4096:]):
            h.update(part.to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class ConversationFile:
    """A ``.jsonl`` of generated conversations, appended batch by batch; each record holds its
    prompt id and the generation settings, so a rerun continues it and a different run is refused."""

    path: Path
    header: dict[str, Any] = field(default_factory=dict)  # what every record must agree on

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):
                    break  # a line cut by a kill mid-write: its batch is generated again
                raise DataError(f"{self.path}:{n}: not JSON; the file is damaged") from None
            out.append(record)
        for record in out:
            theirs = record.get("generation")
            if _settled(theirs) != _settled(self.header):
                raise DataError(
                    f"{self.path} holds conversations generated otherwise ({_differ(theirs, self.header)}); "
                    "use another `out`, or the same settings to continue it"
                )
        return out

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({**r, "generation": self.header}, ensure_ascii=False) + "\n" for r in records)
        self._drop_partial_line()
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    def _drop_partial_line(self) -> None:
        if self.path.is_file():
            raw = self.path.read_bytes()
            if raw and not raw.endswith(b"\n"):
                self.path.write_bytes(raw[: raw.rfind(b"\n") + 1])


def _settled(header: Any) -> Any:
    """A generation header with unset (None) entries dropped: a file written before a setting
    existed, or by a caller that does not name it (``slice --calib self`` names no system prompt),
    agrees with a run that leaves it unset."""
    return {k: v for k, v in header.items() if v is not None} if isinstance(header, dict) else header


def _differ(a: Any, b: Any) -> str:
    a, b = a or {}, b or {}
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k} {a.get(k)!r} there, {b.get(k)!r} now" for k in keys if a.get(k) != b.get(k)) or "unknown"


def answer_into_file(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    out: ConversationFile,
    settings: GenerationSettings,
    *,
    system: str | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> list[dict[str, Any]]:
    """Have ``model`` answer ``prompts`` (:class:`slicegpt.prompts.Prompt`) into ``out``, skipping
    the batches already there; returns every record, in the prompts' order."""
    have = {r["id"]: r for r in out.records()}
    ids = [prompt_ids(tokenizer, p.text, system) for p in prompts]
    chat = has_chat_template(tokenizer)

    def record(p: Any, a: Answer) -> dict[str, Any]:
        rec: dict[str, Any] = {"id": p.id, "source": p.source}
        if chat:
            rec["messages"] = prompt_messages(p.text, system) + [{"role": "assistant", "content": a.text}]
        else:  # a base model continues the text: plain-text records
            rec["text"] = p.text + tokenizer.decode(a.ids, skip_special_tokens=True)
        rec.update(prompt_ids=a.prompt_ids, answer_ids=a.ids, finished=a.finished)
        return rec

    def on_batch(idx: list[int], answers: list[Answer]) -> None:
        new = [record(prompts[i], a) for i, a in zip(idx, answers) if prompts[i].id not in have]
        out.append(new)
        have.update({r["id"]: r for r in new})

    generate(
        model,
        tokenizer,
        ids,
        settings,
        batch_size=batch_size,
        device=device,
        progress=progress,
        on_batch=on_batch,
        skip=lambda idx: all(prompts[i].id in have for i in idx),
        desc=desc,
    )
    return [have[p.id] for p in prompts]


def record_conversation(record: dict[str, Any]) -> Messages:
    return check_messages(record["messages"], "a generated record")


# ---- what an answer shows ------------------------------------------------------------------------


_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def loops(text: str, n: int = 3, times: int = 3) -> bool:
    """Does the answer repeat a word ``n``-gram ``times`` times or more (a model stuck in a loop)?"""
    w = words(text)
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(w) - n + 1):
        key = tuple(w[i : i + n])
        counts[key] = counts.get(key, 0) + 1
        if counts[key] >= times:
            return True
    return False


def system_text(tokenizer: Any, system: str | None = None) -> str:
    """What the template puts before a user's first message (its default system prompt), as
    plain words: special tokens and role names removed."""
    if not has_chat_template(tokenizer):
        return ""
    marker = "\u2063SLICEGPT\u2063"
    text = _template(tokenizer, prompt_messages(marker, system), generation_prompt=False).split(marker)[0]
    for tok in getattr(tokenizer, "all_special_tokens", []) or []:
        text = text.replace(tok, " ")
    return re.sub(r"<[^<>\s]{1,40}>", " ", text)


def echoes(answer: str, system: str, n: int = 4) -> bool:
    """Does the answer repeat a word ``n``-gram of the system prompt (the model recites its instructions)?"""
    sw = [w for w in words(system) if w not in ("system", "user", "assistant")]
    grams = {tuple(sw[i : i + n]) for i in range(len(sw) - n + 1)}
    aw = words(answer)
    return any(tuple(aw[i : i + n]) in grams for i in range(len(aw) - n + 1))


def word_f1(a: str, b: str) -> float:
    """Unigram F1 of two answers' words (1: the same words)."""
    wa, wb = words(a), words(b)
    if not wa or not wb:
        return float(wa == wb)
    common: dict[str, int] = {}
    for w in wa:
        common[w] = common.get(w, 0) + 1
    overlap = 0
    for w in wb:
        if common.get(w, 0) > 0:
            overlap += 1
            common[w] -= 1
    if overlap == 0:
        return 0.0
    p, r = overlap / len(wb), overlap / len(wa)
    return 2 * p * r / (p + r)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else float("nan")


def settings_dict(settings: GenerationSettings) -> dict[str, Any]:
    return asdict(settings)
