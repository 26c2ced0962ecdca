"""The figures only benchmarks draw (benchmarks/figures.py): exact image sizes, one panel per measure."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_recovery_curves_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    Image = pytest.importorskip("PIL.Image")
    from figures import plot_recovery

    curves = {
        "kd/all": [{"tokens": 0, "eval_ppl": 90.0}, {"tokens": 4096, "eval_ppl": 40.0}],
        "lm/all": [{"tokens": 0, "eval_ppl": 90.0}, {"tokens": 4096, "eval_ppl": 60.0}],
    }
    path = plot_recovery(curves, tmp_path / "curves.png", dense=18.6)
    with Image.open(path) as im:
        assert im.size == (700, 480)


def test_methods_plot_has_one_panel_per_measure(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    Image = pytest.importorskip("PIL.Image")
    from figures import plot_methods

    series = {"budget": [(25.0, 43.3), (20.0, 33.0)], "SliceGPT": [(25.0, 109.2), (20.0, 70.1)]}
    path = plot_methods({"wiki": series, "books": series}, tmp_path / "m.png", dense={"wiki": 18.6, "books": 40.1})
    with Image.open(path) as im:
        assert im.size == (1200, 480)
