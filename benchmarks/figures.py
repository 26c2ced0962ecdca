"""Figures only the benchmarks draw: recovery curves and methods against size (slicegpt's own
figures, and the canvas they share, are in :mod:`slicegpt.evaluation.plots`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from slicegpt.evaluation.plots import figure, log_scale_if_wide, save_figure


def plot_recovery(
    curves: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | os.PathLike[str],
    *,
    key: str = "eval_ppl",
    dense: float | None = None,
    title: str = "perplexity against training tokens",
) -> Path:
    """One line per recovery run: ``key`` ('eval_ppl' or 'val_ppl') of each curve point against
    the tokens seen (a recovery report's ``curve``); ``dense`` draws the teacher's level."""
    fig = figure(7.0, 4.8)
    ax = fig.subplots()
    values: list[float] = []
    for i, (name, curve) in enumerate(curves.items()):
        pts = [(p["tokens"] / 1e3, p[key]) for p in curve if key in p]
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", ms=3, color=f"C{i % 10}", label=name)
            values += [y for _, y in pts]
    if dense is not None:
        ax.axhline(dense, color="black", ls="--", lw=1, label=f"dense teacher ({dense:.2f})")
        values.append(dense)
    log_scale_if_wide(ax, values)
    ax.set_xlabel("training tokens seen (thousands)")
    ax.set_ylabel("perplexity" + (" (held-out validation rows)" if key == "val_ppl" else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_methods(
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    path: str | os.PathLike[str],
    *,
    dense: Mapping[str, float] | None = None,
    title: str = "perplexity against parameters removed",
) -> Path:
    """Side-by-side panels (one per measure, e.g. the wiki and a second domain), each with one
    line per method of (share of parameters removed in %, perplexity) points; ``dense`` draws
    each panel's dense level as a star at 0% removed."""
    fig = figure(6.0 * len(panels), 4.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel, series) in zip(axes, panels.items()):
        values: list[float] = []
        for i, (name, pts) in enumerate(series.items()):
            pts = sorted(pts)
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", ms=4, color=f"C{i % 10}", label=name)
            values += [y for _, y in pts]
        if dense and panel in dense:
            ax.plot(
                [0.0],
                [dense[panel]],
                marker="*",
                ms=15,
                color="gold",
                mec="black",
                mew=0.6,
                ls="none",
                label=f"dense ({dense[panel]:.2f})",
                zorder=5,
            )
            values.append(dense[panel])
        log_scale_if_wide(ax, values)
        ax.set_xlabel("parameters removed (%, of the model as shipped)")
        ax.set_ylabel("perplexity")
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)
