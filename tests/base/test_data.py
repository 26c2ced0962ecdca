"""Text sources and token rows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from slicegpt.data import DataError, Text, calibration_rows, cut_rows, file_text, load_text, wiki_articles

from conftest import have


class CharTokenizer:
    """One token per character: enough to test row cutting without any model files."""

    bos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = False) -> dict:
        return {"input_ids": [ord(c) % 250 + 2 for c in text]}


@pytest.mark.skipif(not have("gensim"), reason="gensim (the built-in 'wiki' corpus) is not installed")
def test_wiki_corpus_is_the_documented_split() -> None:
    articles = wiki_articles()
    assert len(articles) == 105
    assert all(len(a) >= 500 for a in articles)
    evaluation = load_text("wiki", "evaluation")
    calibration = load_text("wiki", "calibration")
    assert len(evaluation) == 757_522
    assert hashlib.sha256(evaluation.encode()).hexdigest().startswith("e5237bcdf5ad27d4")
    assert evaluation.endswith("\n") and not evaluation.endswith("\n\n")
    assert "\n\n\n" not in evaluation
    assert calibration.count("\n\n") >= 83  # 84 articles joined by blank lines
    assert articles[84][:200] in evaluation and articles[84][:200] not in calibration


def test_cut_rows_drops_remainder_and_adds_bos() -> None:
    stream = torch.arange(10)
    rows = cut_rows(stream, 3)
    assert rows.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with_bos = cut_rows(stream, 3, bos_token_id=99)
    assert with_bos.tolist() == [[99, 0, 1], [99, 2, 3], [99, 4, 5], [99, 6, 7], [99, 8, 9]]


def test_txt_and_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\n\n\nsecond doc\n")
    assert file_text(txt) == "first doc\nline two\n\nsecond doc\n"
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(str(jl), "evaluation") == "one\n\ntwo\n"
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"body": 1}\n')
    with pytest.raises(DataError, match="'text' field"):
        load_text(str(bad), "calibration")
    with pytest.raises(DataError, match="not found"):
        load_text(str(tmp_path / "missing.txt"), "calibration")
    with pytest.raises(DataError, match="unknown text source"):
        load_text("no-such-corpus", "calibration")


def test_calibration_rows_are_distinct_seeded_and_bounded(tmp_path: Path) -> None:
    text = "".join(chr(65 + i % 26) for i in range(1000))
    tok = CharTokenizer()
    a = calibration_rows(tok, Text(text), nsamples=5, seqlen=100, seed=0)
    b = calibration_rows(tok, Text(text), nsamples=5, seqlen=100, seed=0)
    c = calibration_rows(tok, Text(text), nsamples=5, seqlen=100, seed=1)
    assert a.input_ids.shape == (5, 100)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    # rows are whole non-overlapping windows of the stream
    stream = torch.tensor(tok(text)["input_ids"])
    starts = {int(torch.nonzero((stream.unfold(0, 100, 100) == r).all(1))[0]) for r in a.input_ids}
    assert len(starts) == 5
    with pytest.raises(DataError, match="11 asked"):
        calibration_rows(tok, Text(text), nsamples=11, seqlen=100, seed=0)


def test_wikitext2_loader_asks_for_the_right_dataset(monkeypatch) -> None:
    """The online path, exercised offline on a stand-in for datasets.load_dataset."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return {"text": [" = Title = \n", " body line \n", ""]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_text("wikitext2", "calibration") == " = Title = \n\n\n body line \n\n\n"
    load_text("wikitext2", "evaluation")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train"), ("wikitext", "wikitext-2-raw-v1", "test")]
