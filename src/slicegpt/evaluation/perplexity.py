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
from ..data import Rows, label
from ..sources import evaluation_rows


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
    # Predictions counted in each row, where not every one is (conversations: the assistant's
    # tokens); empty when each row counts seqlen - 1.
    row_tokens: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def perplexity_of_first(self, k: int) -> float:
        """Perplexity over the first ``k`` rows only (comparable with a ``max_rows=k`` run)."""
        k = min(k, len(self.row_nll))
        if k < 1:
            raise ValueError("no rows were evaluated")
        counted = sum(self.row_tokens[:k]) if self.row_tokens else k * (self.seqlen - 1)
        return exp_or_inf(math.fsum(self.row_nll[:k]) / counted)


def exp_or_inf(nll: float) -> float:
    """exp(nll), or inf where it overflows (a model whose perplexity is beyond float range)."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def eval_rows(model: nn.Module, tokenizer: Any, data: Any, seqlen: int, max_rows: int | None = None) -> Rows:
    """The evaluation rows of ``data`` (a source name, a path, a conversation file, or raw text);
    conversation rows carry a loss mask (the assistant's tokens)."""
    return evaluation_rows(model, tokenizer, data, seqlen, max_rows)


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
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rows = eval_rows(model, tokenizer, data, seqlen, max_rows)
    if device is not None:
        model.to(check_device(device))
    dev = next(model.parameters()).device
    model.eval()
    count = 0
    row_nll: list[float] = []
    row_count: list[int] = []
    batches = range(0, len(rows), batch_size)
    for start_row in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        ids = rows.input_ids[start_row : start_row + batch_size].to(dev)
        logits = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
        # Token t predicts token t+1; every row contributes seqlen - 1 predictions (those the
        # loss mask counts, for conversations: the assistant's tokens).
        flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B * (T - 1), V]
        nll = F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="none").view(ids.shape[0], -1)  # [B, T - 1]
        if rows.loss_mask is not None:
            counted = rows.loss_mask[start_row : start_row + batch_size, 1:].to(dev)
            nll = nll * counted
            row_count.extend(counted.sum(dim=1).tolist())
        else:
            row_count.extend([nll.shape[1]] * nll.shape[0])
        del logits, flat
        row_nll.extend(nll.sum(dim=1).double().tolist())
    count = sum(row_count)
    if count == 0:
        raise ValueError(f"{label(data)} has no tokens to predict")
    mean = math.fsum(row_nll) / count
    return PerplexityResult(
        perplexity=exp_or_inf(mean),
        nll=mean,
        tokens=count,
        rows=len(rows),
        seqlen=rows.input_ids.shape[1],
        seconds=time.perf_counter() - start,
        source=label(data),
        row_nll=row_nll,
        row_tokens=row_count if rows.loss_mask is not None else [],
    )
