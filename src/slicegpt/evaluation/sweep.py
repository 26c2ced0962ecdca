"""Sparsity sweeps: slice one model at several sparsities and measure every result.

``slicegpt sweep MODEL --sparsities 0,0.1,0.2,0.25,0.3 --out DIR`` loads the model afresh for
every sparsity (only one model is ever in memory), slices it, measures perplexity (and lm-eval
tasks with ``--tasks``) and writes into DIR:

* ``results.json``: every run (sparsity, parameters before/after, share actually removed, FLOPs
  per token, perplexity, task results, slicing seconds, settings, widths, PCA spectra);
* ``results.md``: the same as a markdown table (:func:`~slicegpt.evaluation.markdown.format_sweep_markdown`);
* ``ppl_vs_removed.png``, ``accuracy_vs_removed.png`` (with tasks) and ``spectrum_<sparsity>.png``
  per sliced run (:func:`~slicegpt.evaluation.plots.plot_sweep`).

Sparsity 0 is the dense model as shipped (not rotated): the paper's 0% row and the reference
point of every plot. The x axis of the plots is the share of parameters *actually* removed,
``1 - after / before``: slicing unties tied embeddings and adds shortcut matrices, so for small
models with large vocabularies it can be negative at low sparsities.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from .._version import __version__
from ..config import EvalConfig, SliceConfig
from ..core.slicing import slice_model
from ..core.surgery import count_parameters
from ..data import clip_seqlen
from ..io.format import is_sliced_folder
from ..io.models import load_model
from ..memory import peak_rss_gb, release_memory
from .flops import flops_per_token
from .markdown import fmt_count, format_sweep_markdown, pct, sparsity_label
from .perplexity import perplexity
from .plots import plot_sweep, require_matplotlib
from .tasks import evaluate_tasks, import_lm_eval

_EVAL = EvalConfig()

DEFAULT_SPARSITIES: tuple[float, ...] = (0.0, 0.1, 0.2, 0.25, 0.3)
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
# Significant digits kept of each eigenvalue in results.json: plenty for plots and variance
# shares, and a 4096-wide model's five runs stay tens of MB instead of hundreds.
_SPECTRUM_DIGITS = 6


@dataclass(frozen=True)
class SweepEval:
    """What a sweep measures on every model; defaults from :class:`~slicegpt.config.EvalConfig`.

    ppl: perplexity data ('wiki', 'wikitext2', a .txt/.jsonl path), or None for none.
    seqlen, batch_size, max_rows: perplexity rows (clipped to the model's context), rows per
        forward pass, and the first N rows only; seqlen is also the context of FLOPs per token.
    tasks: lm-eval task names (None or empty: none), run by :func:`~slicegpt.evaluation.tasks.evaluate_tasks`
        on the first ``limit`` items of each, ``num_fewshot``-shot, ``task_batch_size`` requests
        per forward pass; ``tasks_offline``: True for the offline data, False for the hub, None
        to decide by whether the hub is reachable.
    """

    ppl: str | None = "wiki"
    seqlen: int = _EVAL.seqlen
    batch_size: int = _EVAL.batch_size
    max_rows: int | None = _EVAL.max_rows
    tasks: tuple[str, ...] | None = None
    limit: int | None = None
    num_fewshot: int = 0
    tasks_offline: bool | None = None
    task_batch_size: int = 8

    def __post_init__(self) -> None:
        names = tuple(t.strip() for t in (self.tasks or ()) if t.strip())
        object.__setattr__(self, "tasks", names or None)
        self.validate()

    def validate(self) -> None:
        if self.ppl is None and not self.tasks:
            raise ValueError("nothing to measure: give perplexity data (ppl) or tasks")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tasks"] = list(self.tasks) if self.tasks else None
        return data


def parse_targets(text: str | Sequence[float]) -> list[float]:
    """'1,0.8,0.75' (or a sequence) -> parameter targets as fractions in (0, 1], largest first (1: dense)."""
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text) if str(v).strip()]
    except ValueError:
        raise ValueError(f"--targets must be comma-separated fractions, got {text!r}") from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise ValueError(f"every target must be a fraction in (0, 1] of the parameters as shipped, got {text!r}")
    return sorted(set(values), reverse=True)


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


def _write_atomic(path: Path, text: str) -> None:
    # A sweep runs for hours and rewrites its results after every run: never leave a torn file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _round_spectrum(values: Sequence[float]) -> list[float]:
    return [float(f"{v:.{_SPECTRUM_DIGITS}g}") for v in values]


def _check_output(out_dir: Path | None, overwrite: bool, plots: bool) -> None:
    if out_dir is None:
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {out_dir} exists and is not a folder")
    if (out_dir / RESULTS_JSON).exists() and not overwrite:
        raise FileExistsError(f"{out_dir / RESULTS_JSON} exists; pass --overwrite to replace it")
    if plots:
        require_matplotlib()


def _write_results(out_dir: Path, results: Mapping[str, Any]) -> None:
    _write_atomic(out_dir / RESULTS_JSON, json.dumps(results, indent=1) + "\n")
    _write_atomic(out_dir / RESULTS_MD, format_sweep_markdown(results))


def _measure(model: Any, tokenizer: Any, evaluation: SweepEval, device: str, progress: bool) -> dict[str, Any]:
    """Perplexity and task figures of one model, as a run records them."""
    run: dict[str, Any] = {"perplexity": None, "perplexity_details": None, "tasks": None}
    if evaluation.ppl is not None:
        res = perplexity(
            model,
            tokenizer,
            evaluation.ppl,
            seqlen=evaluation.seqlen,
            batch_size=evaluation.batch_size,
            device=device,
            max_rows=evaluation.max_rows,
            progress=progress,
        )
        run["perplexity"], run["perplexity_details"] = res.perplexity, res.to_dict()
    if evaluation.tasks:
        run["tasks"] = evaluate_tasks(
            model,
            tokenizer,
            evaluation.tasks,
            limit=evaluation.limit,
            batch_size=evaluation.task_batch_size,
            num_fewshot=evaluation.num_fewshot,
            offline=evaluation.tasks_offline,
            device=device,
        )
    return run


def _one_run(
    model_name_or_path: str | None,
    sparsity: float,
    base: SliceConfig,
    evaluation: SweepEval,
    progress: bool,
    target: float | None = None,
) -> tuple[str, dict[str, Any]]:
    """Load, slice (unless sparsity is 0) and measure one model; returns its name and the run.

    With ``target`` (a fraction of the parameters as shipped) the run compresses to that budget
    and ``sparsity`` is its label, the share of parameters to remove.
    """
    wall = time.perf_counter()
    model, tokenizer, name = load_model(model_name_or_path, dtype=base.dtype, require_sliceable=True)
    seq = clip_seqlen(model, evaluation.seqlen)
    params_before = count_parameters(model)
    flops_before = flops_per_token(model, seq)
    run: dict[str, Any] = {"sparsity": sparsity, "dense": sparsity == 0.0, "target": target}
    if sparsity == 0.0:
        # The paper's 0% row: the model as shipped, not rotated (rotating at full width
        # changes nothing measurable but adds shortcut matrices).
        run.update(
            params_before=params_before,
            params_after=params_before,
            slicing_seconds=0.0,
            settings=None,
            widths=None,
            variance_kept={},
            spectra={},
            calibration_tokens=0,
        )
    else:
        cfg = (
            replace(base, sparsity=sparsity, target_params=None)
            if target is None
            else replace(base, target_params=target, sparsity=None)
        )
        report = slice_model(model, tokenizer, cfg.calib, cfg, progress=progress, source_model=name)
        run.update(
            params_before=report.params_before,
            params_after=report.params_after,
            slicing_seconds=report.seconds,
            settings=cfg.to_dict(),
            widths=report.widths.to_dict(),
            variance_kept=report.variance_kept(),
            spectra={k: _round_spectrum(v) for k, v in report.spectra.items()},
            calibration_tokens=report.calibration_tokens,
            target_params=report.target_params,
            allocation=report.allocation,
        )
        del report
    run["share_removed"] = 1.0 - run["params_after"] / run["params_before"]
    flops_after = flops_per_token(model, seq)
    run.update(
        flops_seq_len=seq,
        flops_before=flops_before,
        flops_after=flops_after,
        flops_share_removed=1.0 - flops_after / flops_before,
    )
    run.update(_measure(model, tokenizer, evaluation, base.device, progress))
    # Release this model before the next is loaded: only one is ever in memory.
    del model, tokenizer
    release_memory()
    run["wall_seconds"] = time.perf_counter() - wall
    return name, run


def sweep(
    model_name_or_path: str | None,
    sparsities: Sequence[float] | str = DEFAULT_SPARSITIES,
    *,
    targets: Sequence[float] | str | None = None,
    config: SliceConfig | None = None,
    evaluation: SweepEval | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    plots: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Slice ``model_name_or_path`` at every sparsity and measure each result; returns the results dict.

    ``config`` gives every slicing setting but the sparsity (default: :class:`SliceConfig`'s
    defaults); its ``calib`` is the calibration data, its ``device`` also where the models are
    evaluated. Sparsity 0 measures the dense model as shipped. ``evaluation`` says what is
    measured (default: :class:`SweepEval`'s, perplexity on 'wiki'). With ``out``, results.json and
    results.md are rewritten after every run (a crash keeps the runs done) and the plots drawn at
    the end (``plots``); an ``out`` holding a results.json is replaced only with ``overwrite``.

    Each model is loaded afresh, measured and released before the next is loaded.
    """
    base = copy.deepcopy(config) if config is not None else SliceConfig()
    base.validate()
    # With parameter targets (fractions of the model as shipped) each run is labelled by the share
    # it must remove: target 0.75 is the 0.25 run, target 1 the dense model.
    kept = parse_targets(targets) if targets is not None else None
    values = (
        [round(1.0 - t, 6) for t in kept]
        if kept is not None
        else parse_sparsities(sparsities if isinstance(sparsities, str) else list(sparsities))
    )
    evaluation = evaluation if evaluation is not None else SweepEval()
    evaluation.validate()
    # Everything that can fail cheaply fails before the first model is loaded.
    out_dir = Path(out) if out is not None else None
    _check_output(out_dir, overwrite, plots)
    if evaluation.tasks:
        import_lm_eval()
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
        "targets": kept,
        "settings": settings,
        "evaluation": {**evaluation.to_dict(), "device": base.device},
        "runs": [],
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    bar = tqdm(values, desc="sweep", unit="run", disable=not progress)
    for i, sparsity in enumerate(bar):
        bar.set_postfix(sparsity=sparsity_label(sparsity))
        target = None if kept is None or kept[i] >= 1.0 else kept[i]
        results["model"], run = _one_run(model_name_or_path, sparsity, base, evaluation, progress, target)
        results["runs"].append(run)
        results["peak_rss_gb"] = peak_rss_gb()
        tqdm.write(_run_line(run), file=sys.stderr)
        if out_dir is not None:
            _write_results(out_dir, results)
    bar.close()
    if out_dir is not None and plots:
        results["plots"] = [p.name for p in plot_sweep(results, out_dir)]
        _write_results(out_dir, results)  # now with links to the plots
    return results


def _run_line(run: Mapping[str, Any]) -> str:
    head = f"sparsity {sparsity_label(run['sparsity'])}{' (dense)' if run['dense'] else ''}"
    parts = [
        f"params {fmt_count(run['params_before'])} -> {fmt_count(run['params_after'])} ({pct(run['share_removed'])} "
        "removed)"
    ]
    if run.get("perplexity") is not None:
        parts.append(f"perplexity {run['perplexity']:.2f}")
    if run.get("tasks") and run["tasks"].get("average") is not None:
        parts.append(f"task average {100 * run['tasks']['average']:.1f}%")
    parts.append(f"{run['wall_seconds']:.1f} s")
    return f"{head}: " + ", ".join(parts)
