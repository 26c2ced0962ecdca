"""The allocator: choose how a parameter budget is split between the axes by measuring it.

Each candidate split (a share of the parameters to remove taken by the residual width, the rest
by MLP neurons) compresses a copy of the model on the calibration rows; the split whose result
has the lowest next-token loss on *other* calibration rows (held out from every statistic, never
evaluation text) wins, and the model itself is then compressed at that split.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SliceConfig
from ..data import Rows
from ..sources import calibration_rows_for
from ..memory import release_free_memory
from .report import SliceReport

# Residual shares tried by default: MLP neurons only, a quarter and half of the removal from the stream.
SHARES: tuple[float, ...] = (0.0, 0.25, 0.5)


@torch.no_grad()
def held_out_nll(model: nn.Module, rows: Rows, device: str, batch_size: int) -> float:
    """Mean next-token negative log-likelihood of ``model`` on ``rows``."""
    model.to(device)
    total, count = 0.0, 0
    for ids, _ in rows.batches(batch_size):
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    model.to("cpu")
    return total / count


def search_split(
    model: nn.Module,
    tokenizer: Any,
    calib: Any,
    config: SliceConfig,
    compress: Callable[..., SliceReport],
    *,
    shares: tuple[float, ...] = SHARES,
    held_rows: int = 8,
    progress: bool = True,
) -> tuple[float, list[dict[str, Any]], float, Rows]:
    """(best residual share, one record per candidate, seconds spent, the statistics rows) for
    ``config.target_params``.

    ``compress(model, tokenizer, rows, config)`` is the compression (``slice_model``). The
    statistics use ``config.nsamples`` rows; the next ``held_rows`` rows drawn with the same seed
    (disjoint from them) measure each candidate.
    """
    start = time.perf_counter()
    rows = calibration_rows_for(model, tokenizer, calib, replace(config, nsamples=config.nsamples + held_rows))
    if len(rows) <= held_rows:
        raise ValueError(f"the split search needs more than {held_rows} calibration rows")
    fit, held = rows.take(slice(None, -held_rows)), rows.take(slice(-held_rows, None))
    records = []
    for share in shares:
        candidate = copy.deepcopy(model)
        report = compress(
            candidate, tokenizer, fit, replace(config, residual_share=share, search=False), progress=progress
        )
        nll = held_out_nll(candidate, held, config.device, config.batch_size)
        records.append(
            {
                "residual_share": share,
                "residual_width": report.widths.embedding,
                "mlp_neurons": report.widths.mlp_neurons,
                "params": report.params_after,
                "held_out_nll": nll,
                "held_out_perplexity": math.exp(nll),
                "seconds": report.seconds,
            }
        )
        del candidate
        release_free_memory()
    best = min(records, key=lambda r: r["held_out_nll"])
    return best["residual_share"], records, time.perf_counter() - start, fit
