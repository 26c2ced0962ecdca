"""Every figure slicegpt draws: a sweep's curves and the PCA spectra of a slicing run.

Plots need matplotlib (the ``plots`` extra); it is imported only when a plot is drawn, and
figures are drawn on an Agg canvas of their own so that no global pyplot state is touched.
Images are exactly figsize x :data:`DPI` pixels.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .markdown import sparsity_label, task_names, task_score
from .spectra import as_widths, cumulative_share, spectrum_summary

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.figure import Figure

PLOTS_MISSING = "matplotlib is not installed: pip install 'slicegpt[plots]'"
PPL_PLOT = "ppl_vs_removed.png"
ACCURACY_PLOT = "accuracy_vs_removed.png"
DPI = 100


def require_matplotlib() -> None:
    """Fail with one actionable line, before any expensive work, when plots cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError(PLOTS_MISSING)


def figure(width_in: float, height_in: float) -> "Figure":
    """A figure on its own Agg canvas: no pyplot, so no global backend switch in the caller's session."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: "Figure", path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No bbox_inches="tight": the image is exactly figsize x DPI pixels, which callers can rely on.
    fig.savefig(path, dpi=DPI, format="png")
    return path


# --------------------------------------------------------------------------- spectra


def log_scale_if_wide(ax: Any, values: Sequence[float]) -> bool:
    """A log y axis with plain tick labels (20, 30, 60, 100, not 2x10^1: perplexities are read,
    not estimated) when the values span more than 5x; says whether it was set."""
    if not values or min(values) <= 0 or max(values) / min(values) <= 5:
        return False
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    return True


def _spectrum_panels(names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Group points into panels: the embedding, one per layer (mid and out together), the uniform basis."""
    panels: dict[str, list[str]] = {}
    order: list[tuple[int, str]] = []

    def add(key: str, rank: int, name: str) -> None:
        if key not in panels:
            panels[key] = []
            order.append((rank, key))
        panels[key].append(name)

    for name in names:
        parts = name.split(".")
        if name == "embedding":
            add("embedding", -1, name)
        elif len(parts) == 3 and parts[0] == "layer" and parts[1].isdigit():
            add(f"layer {int(parts[1])}", int(parts[1]), name)
        else:
            add(name, 1 << 30, name)
    for key in panels:  # mid before out inside a layer's panel
        panels[key].sort(key=lambda n: (not n.endswith(".mid"), n))
    return [(key, panels[key]) for _, key in sorted(order)]


_POINT_COLORS = {"mid": "tab:blue", "out": "tab:orange", "embedding": "tab:green", "uniform": "tab:purple"}


def plot_spectra(
    spectra: Mapping[str, Sequence[float]],
    widths: Any,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """One panel per layer (and the embedding): cumulative explained variance against component index.

    The chosen width is a vertical line, the variance kept there is written in the panel. ``widths``
    is a :class:`~slicegpt.core.widths.Widths` or its ``to_dict()``; ``spectra`` maps point names to
    descending eigenvalues (:attr:`SliceReport.spectra`, or a folder's ``spectra.json``).
    """
    if not spectra:
        raise ValueError("no spectra to plot")
    w = as_widths(widths).to_dict()
    summary = spectrum_summary(spectra, w)
    fig = figure(1, 1)  # checks for matplotlib before the import below
    from matplotlib.ticker import MaxNLocator

    panels = _spectrum_panels(list(spectra))
    ncols = max(1, math.ceil(math.sqrt(len(panels))))
    nrows = math.ceil(len(panels) / ncols)
    fig.set_size_inches(3.6 * ncols, 2.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (label, names) in zip(axes.flat, panels):
        lowest = 1.0
        for k, name in enumerate(names):
            kind = name.rsplit(".", 1)[-1] if name.startswith("layer.") else name
            color = _POINT_COLORS.get(kind, "tab:gray")
            cum = cumulative_share(spectra[name])
            lowest = min(lowest, cum[0] if cum else 1.0)
            ax.plot(range(1, len(cum) + 1), [100 * c for c in cum], color=color, lw=1.3, label=kind)
            info = summary[name]
            if info["width"] is not None and info["variance_kept"] is not None:
                ax.axvline(info["width"], color=color, ls="--", lw=0.9)
                ax.plot([info["width"]], [100 * info["variance_kept"]], "o", color=color, ms=4)
                # Stacked in the lower right, one line per point: never overlaps the curves' knee.
                # Two decimals near 100%: where a few massive-activation directions dominate, every
                # width keeps > 99%, and one decimal would print 100.0% everywhere.
                share = 100 * info["variance_kept"]
                text = f"{share:.2f}" if share > 99 else f"{share:.1f}"
                ax.text(
                    0.97,
                    0.06 + 0.11 * k,
                    f"{kind}: {text}% kept @ {info['width']}/{info['dim']}",
                    transform=ax.transAxes,
                    ha="right",
                    va="bottom",
                    fontsize=7,
                    color=color,
                )
        if label.startswith("layer ") and not any(n.endswith(".out") for n in names):
            layer = w["layers"][int(label.split()[1])]
            if layer["d_out"] == w["hidden"]:
                # The last layer's output is what the head reads: kept whole unless slice_head, so no PCA ran.
                ax.text(
                    0.97,
                    0.06 + 0.11 * len(names),
                    f"out: not sliced ({layer['d_out']}, the head reads it)",
                    transform=ax.transAxes,
                    ha="right",
                    va="bottom",
                    fontsize=7,
                    color=_POINT_COLORS["out"],
                )
        ax.set_title(label, fontsize=9)
        ax.set_ylim(max(0.0, 100 * lowest - 5), 100.5)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("component", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("cumulative variance (%)", fontsize=8)
    fig.suptitle(title or "PCA spectra: cumulative explained variance, chosen width dashed", fontsize=10)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- sweep


def _short_name(model: str | None) -> str:
    """A local folder's last component for plot titles (the full path stays in results.json)."""
    if not model:
        return "model"
    return Path(model).name if os.path.isabs(model) or model.startswith(".") else model


def spectrum_plot_name(sparsity: float) -> str:
    return f"spectrum_{sparsity:g}.png"


def plot_sweep(results: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Draw a :func:`sweep` result's plots into ``out_dir``; returns the files written."""
    out = Path(out_dir)
    runs = list(results["runs"])
    written: list[Path] = []
    model = _short_name(results.get("model"))

    def dense_marker(
        ax: Any, xs: list[float], ys: list[float | None], dense: list[bool], color: str, label: bool
    ) -> None:
        for x, y, d in zip(xs, ys, dense):
            if d and y is not None:
                ax.plot(
                    [x],
                    [y],
                    marker="*",
                    ms=15,
                    color=color,
                    mec="black",
                    mew=0.6,
                    ls="none",
                    label="dense (as shipped)" if label else None,
                    zorder=5,
                )

    xs = [100 * r["share_removed"] for r in runs]
    dense = [bool(r.get("dense")) for r in runs]
    ppl = [r.get("perplexity") for r in runs]
    if any(p is not None for p in ppl):
        fig = figure(7.0, 4.8)
        ax = fig.subplots()
        pts = [(x, p, r) for x, p, r in zip(xs, ppl, runs) if p is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:blue", label="sliced")
        for x, p, r in pts:
            ax.annotate(sparsity_label(r["sparsity"]), (x, p), textcoords="offset points", xytext=(5, 5), fontsize=8)
        dense_marker(ax, xs, ppl, dense, "gold", True)
        # Left of this line the "sliced" model is bigger than the one shipped.
        ax.axvline(0.0, color="gray", ls=":", lw=1, label="as many parameters as shipped")
        if not log_scale_if_wide(ax, [p for p in ppl if p is not None]):
            # Nearly equal perplexities would otherwise be shown as offsets from a "+3.27e2" label.
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        detail = next((r["perplexity_details"] for r in runs if r.get("perplexity_details")), None)
        # Data files are named by their file name only: a long path would crowd out the axis label.
        source = (
            f"\non {_short_name(detail['source'])}, {detail['rows']} rows x {detail['seqlen']} tokens" if detail else ""
        )
        ax.set_xlabel("parameters actually removed (%, 1 - after/before)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{model}: perplexity vs. parameters removed{source}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(save_figure(fig, out / PPL_PLOT))

    tasks = task_names(results)
    if tasks:
        fig = figure(7.0, 4.8)
        ax = fig.subplots()
        colors = [f"C{i}" for i in range(10)]
        for i, task in enumerate(tasks):
            ys = [task_score(r, task) for r in runs]
            pts = [(x, 100 * y) for x, y in zip(xs, ys) if y is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[i % 10], lw=1, ms=4, label=task)
            dense_marker(ax, xs, [None if y is None else 100 * y for y in ys], dense, colors[i % 10], False)
        avg = [(r.get("tasks") or {}).get("average") for r in runs]
        pts = [(x, 100 * y) for x, y in zip(xs, avg) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "s-", color="black", lw=2.2, label="average")
            dense_marker(ax, xs, [None if y is None else 100 * y for y in avg], dense, "black", True)
        ax.axvline(0.0, color="gray", ls=":", lw=1)
        scores = [
            100 * y
            for r in runs
            for y in [task_score(r, t) for t in tasks] + [(r.get("tasks") or {}).get("average")]
            if y is not None
        ]
        if scores:  # a flat line would otherwise get a +-0.05 axis around it
            ax.set_ylim(max(0.0, min(scores) - 5), min(100.0, max(scores) + 5))
        limit = next(((r.get("tasks") or {}).get("provenance", {}).get("limit") for r in runs if r.get("tasks")), None)
        ax.set_xlabel("parameters actually removed (%, 1 - after/before)")
        ax.set_ylabel("accuracy (%, paper metric)" + (f", first {limit} items per task" if limit else ""))
        ax.set_title(f"{model}: zero-shot accuracy vs. parameters removed", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(save_figure(fig, out / ACCURACY_PLOT))

    for r in runs:
        if r.get("spectra") and r.get("widths"):
            title = (
                f"{model} at sparsity {sparsity_label(r['sparsity'])}: cumulative explained variance, chosen width "
                "dashed"
            )
            written.append(
                plot_spectra(r["spectra"], r["widths"], out / spectrum_plot_name(r["sparsity"]), title=title)
            )
    return written
