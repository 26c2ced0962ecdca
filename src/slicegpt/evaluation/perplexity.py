"""Perplexity on a text, the way the paper measures it.

The text is tokenized once, cut into non-overlapping rows of ``seqlen`` tokens (remainder
dropped), and perplexity is exp(mean negative log-likelihood over every predicted token).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import check_device
from ..data import bos_for, clip_seqlen, cut_rows, label, load_text, tokenize


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    rows: int
    seqlen: int
    seconds: float
    source: str
    # Summed NLL of each row's seqlen - 1 predictions, in row order: the perplexity of the
    # first k rows is exp(sum(row_nll[:k]) / (k * (seqlen - 1))).
    row_nll: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def perplexity_of_first(self, k: int) -> float:
        """Perplexity over the first ``k`` rows only (comparable with a ``max_rows=k`` run)."""
        k = min(k, len(self.row_nll))
        if k < 1:
            raise ValueError("no rows were evaluated")
        return math.exp(sum(self.row_nll[:k]) / (k * (self.seqlen - 1)))


def eval_rows(model: nn.Module, tokenizer: Any, data: str, seqlen: int, max_rows: int | None = None) -> torch.Tensor:
    """The evaluation rows of ``data`` (a source name, a path, or raw text), shape (rows, seqlen)."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 (a row of {seqlen} token predicts nothing)")
    text = load_text(data, "evaluation")
    rows = cut_rows(tokenize(tokenizer, text), clip_seqlen(model, seqlen), bos_for(model, tokenizer))
    if rows.shape[0] == 0:
        raise ValueError(f"evaluation text is shorter than one row of {seqlen} tokens")
    return rows if max_rows is None else rows[:max_rows]


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    data: str = "wiki",
    *,
    seqlen: int = 2048,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    max_rows: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``data`` ('wiki', 'wikitext2', a .txt/.jsonl path, or raw text)."""
    start = time.perf_counter()
    rows = eval_rows(model, tokenizer, data, seqlen, max_rows)
    if device is not None:
        model.to(check_device(device))
    dev = next(model.parameters()).device
    model.eval()
    count = 0
    row_nll: list[float] = []
    batches = range(0, rows.shape[0], batch_size)
    for start_row in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        ids = rows[start_row : start_row + batch_size].to(dev)
        logits = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
        # Token t predicts token t+1; every row contributes seqlen - 1 predictions.
        flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B * (T - 1), V]
        nll = F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="none").view(ids.shape[0], -1).sum(dim=1)  # [B]
        del logits, flat
        row_nll.extend(nll.double().tolist())
        count += ids[:, 1:].numel()
    mean = math.fsum(row_nll) / count
    return PerplexityResult(
        perplexity=math.exp(mean),
        nll=mean,
        tokens=count,
        rows=rows.shape[0],
        seqlen=rows.shape[1],
        seconds=time.perf_counter() - start,
        source=label(data),
        row_nll=row_nll,
    )
