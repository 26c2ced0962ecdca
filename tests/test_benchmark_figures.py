"""What only benchmarks use: the figures they draw (benchmarks/figures.py: exact image sizes, one panel per
measure) and how they keep their results (benchmarks/fresh.py)."""

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


def test_a_benchmark_run_again_replaces_its_earlier_figures_and_keeps_the_rest() -> None:
    from fresh import replace_runs

    old = [
        {"model": "a", "rows": 8, "s": 1.0},
        {"model": "a", "rows": 32, "s": 2.0},
        {"model": "b", "rows": 8, "s": 3.0},
    ]
    new = [{"model": "a", "rows": 8, "s": 9.0}]
    assert replace_runs(old, new, ("model", "rows")) == [old[1], old[2], new[0]]
    # a key a run does not carry counts as None: an old run without it is the same settings
    assert replace_runs([{"model": "a"}], [{"model": "a", "seed": None}], ("model", "seed")) == [
        {"model": "a", "seed": None}
    ]
    assert replace_runs(old, [], ("model",)) == old
