"""Perplexity: per-row NLLs add up to the whole, whatever the batch size."""

from __future__ import annotations

import math

import pytest
import torch

import slicegpt
from conftest import make_tiny, tiny_tokenizer

TEXT = slicegpt.Text(
    "\n".join(f"line {i} of a small text about rotations and widths, number {i * 7 % 13}." for i in range(200))
)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_row_nll_sums_to_the_total_and_first_k_matches_max_rows(batch_size: int) -> None:
    model = make_tiny("llama", dtype=torch.float32)
    tok = tiny_tokenizer()
    full = slicegpt.perplexity(model, tok, TEXT, seqlen=16, batch_size=batch_size, progress=False)
    assert full.rows >= 5 and len(full.row_nll) == full.rows
    assert full.tokens == full.rows * (full.seqlen - 1)
    assert math.exp(sum(full.row_nll) / full.tokens) == pytest.approx(full.perplexity, rel=1e-9)
    first = slicegpt.perplexity(model, tok, TEXT, seqlen=16, batch_size=1, max_rows=4, progress=False)
    assert full.perplexity_of_first(4) == pytest.approx(first.perplexity, rel=1e-5)
    assert full.row_nll[:4] == pytest.approx(first.row_nll, rel=1e-5)
