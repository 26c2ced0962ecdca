"""The markdown tables slicegpt prints and writes: a slicing run, a sweep, an inspected folder.

Each takes the plain result dict its command produces (and writes as JSON), so a table can be
rebuilt from a results file alone.
"""

from __future__ import annotations

from typing import Any, Mapping


def fmt_count(n: float | int | None) -> str:
    """1234 -> '1.2K', 134_515_008 -> '134.5M': readable for tiny test models and 70B models alike."""
    if n is None:
        return "-"
    n = float(n)
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.1f}{suffix}"
    return f"{n:.0f}"


def pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def sparsity_label(s: float) -> str:
    return f"{100 * s:g}%"


def task_names(results: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for run in results["runs"]:
        for task in (run.get("tasks") or {}).get("results", {}):
            if task not in names:
                names.append(task)
    return names


def task_score(run: Mapping[str, Any], task: str) -> float | None:
    entry = (run.get("tasks") or {}).get("results", {}).get(task)
    if not entry or not entry.get("paper_metric"):
        return None
    return entry[entry["paper_metric"]]


# --------------------------------------------------------------------------- slice


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def format_slice_table(r: dict[str, Any]) -> str:
    share = r["share_removed"]
    target = r.get("target_params")
    label = f"compressed to {_fmt_params(target)}" if target else f"sliced {round(r['settings']['sparsity'] * 100)}%"
    lines = [
        f"model: {r['model']}  ->  {r['out']}",
        "",
        f"| | dense (as shipped) | {label} |",
        "|---|---:|---:|",
        f"| parameters | {_fmt_params(r['params_dense'])} | {_fmt_params(r['params_sliced'])} |",
        f"| share of parameters removed | | {share * 100:.1f}% |",
    ]
    if target:
        a = r.get("allocation") or {}
        lines.append(f"| target (achieved never exceeds it) | | {target:,} (achieved {r['params_sliced']:,}) |")
        spread = a.get("mlp_neurons_per_layer")
        neurons = (
            f"{min(spread)}-{max(spread)} (spread by each layer's error, {sum(spread):,} in all)"
            if spread
            else a.get("mlp_neurons") or "all"
        )
        lines.append(
            f"| residual width / MLP neurons per layer | {r['widths']['hidden']} / all | "
            f"{a.get('residual_width')} / {neurons} |"
        )
    if "dense_perplexity" in r:
        d, s = r["dense_perplexity"], r["sliced_perplexity"]
        lines.append(
            f"| perplexity ({d['source']}, {d['rows']} x {d['seqlen']} tokens) | {d['perplexity']:.2f} | "
            f"{s['perplexity']:.2f} |"
        )
    lines.append(f"| slicing time | | {r['slicing_seconds']:.1f} s |")
    lines.append(f"| wall time (whole run) | | {r['wall_seconds']:.1f} s |")
    lines.append(f"| peak host memory (RSS) | | {r['peak_rss_gb']:.2f} GB |")
    if "peak_cuda_gb" in r:
        lines.append(f"| peak GPU memory | | {r['peak_cuda_gb']:.2f} GB |")
    if share < 0:
        lines += [
            "",
            f"note: the sliced model is larger than the one shipped ({-share * 100:.1f}% more parameters). The shipped "
            "model ties its embeddings and head (counted once); slicing unties them, because the two see different "
            "bases, and adds one shortcut matrix per residual connection. Small models with large vocabularies lose "
            "more to this than slicing saves.",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- sweep


def format_sweep_markdown(results: Mapping[str, Any]) -> str:
    """results.md: one row per run, and how the figures were measured."""
    runs = list(results["runs"])
    tasks = task_names(results)
    ev = results.get("evaluation", {})
    st = results.get("settings", {})
    lines = [f"# SliceGPT sweep: {results.get('model')}", ""]
    lines.append(
        f"calibration: {st.get('calib')}, {st.get('nsamples')} rows x {st.get('seqlen')} tokens, seed "
        f"{st.get('seed')}, PCA of the {st.get('pca_signal')} signal, "
        f"{'uniform' if st.get('uniform') else 'per-layer'} rotation, widths rounded to "
        f"{st.get('round_to')}{', head sliced' if st.get('slice_head') else ''}; dtype {st.get('dtype')}."
    )
    detail = next((r["perplexity_details"] for r in runs if r.get("perplexity_details")), None)
    if detail:
        lines.append(
            f"perplexity: {detail['source']}, {detail['rows']} rows x {detail['seqlen']} tokens ({detail['tokens']} "
            "predictions)."
        )
    if tasks:
        limit = ev.get("limit")
        lines.append(
            f"tasks (paper metric per task, %): {', '.join(tasks)}; {ev.get('num_fewshot', 0)}-shot"
            + (f"; first {limit} items per task only" if limit else "")
            + "."
        )
    lines.append(f"FLOPs per token at a context of {runs[0]['flops_seq_len'] if runs else '-'} tokens.")
    lines.append("")
    header = ["sparsity", "parameters", "params removed", "FLOPs/token removed", "perplexity"]
    header += tasks + (["average"] if tasks else []) + ["slicing time"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---:" for _ in header) + "|")
    for r in runs:
        label = sparsity_label(r["sparsity"]) + (" (dense)" if r.get("dense") else "")
        cells = [
            label,
            fmt_count(r["params_after"]),
            pct(r["share_removed"]),
            pct(r.get("flops_share_removed")),
            "-" if r.get("perplexity") is None else f"{r['perplexity']:.2f}",
        ]
        for task in tasks:
            score = task_score(r, task)
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
            f"note: at {', '.join(sparsity_label(r['sparsity']) for r in negative)} the sliced model has MORE "
            "parameters than the one shipped. Slicing unties tied embeddings and head (the two see different bases) "
            "and adds a shortcut matrix per residual connection; for small models with large vocabularies that costs "
            "more than slicing saves at low sparsity.",
        ]
    if results.get("plots"):
        lines += ["", "plots: " + ", ".join(f"[{p}]({p})" for p in results["plots"])]
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- inspect


def format_inspect(info: Mapping[str, Any]) -> str:
    """The :func:`inspect_folder` result as a markdown table with a header and notes."""
    sp = info.get("sparsity")
    lines = [
        f"folder: {info['folder']}",
        f"source: {info.get('source_model') or 'unknown'} ({info.get('model_type')}, {info.get('mode')}"
        + (
            f", target {info['target_params']:,} parameters"
            if info.get("target_params")
            else f", sparsity {sparsity_label(sp)}"
            if sp is not None
            else ""
        )
        + f", {info.get('dtype') or 'float32'})",
        f"hidden width {info['hidden']}; embedding width {info['embedding_width']}; head reads {info['head_width']}. "
        f"FLOPs per token at a context of {info['seq_len']} tokens.",
        "",
        "| layer | d_in | d_mid | d_out | MLP neurons | shortcuts | variance kept mid / out | params | dense params "
        "| FLOPs/token | dense FLOPs/token |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for l in info["layers"]:
        shortcuts = "+".join(n for n, on in (("attn", l["attn_shortcut"]), ("mlp", l["mlp_shortcut"])) if on) or "none"
        kept = f"{pct(l['variance_kept_mid'])} / {pct(l['variance_kept_out'])}"
        lines.append(
            f"| {l['layer']} | {l['d_in']} | {l['d_mid']} | {l['d_out']} | {l.get('mlp_neurons') or 'all'} | "
            f"{shortcuts} | {kept} | {fmt_count(l['params'])} | {fmt_count(l['params_dense'])} | "
            f"{fmt_count(l['flops'])} | {fmt_count(l['flops_dense'])} |"
        )
    r = info["rest"]
    lines.append(
        f"| embeddings, head, norms | | | | | | | {fmt_count(r['params'])} | {fmt_count(r['params_dense'])} | "
        f"{fmt_count(r['flops'])} | {fmt_count(r['flops_dense'])} |"
    )
    lines.append(
        f"| **total** | | | | | | | {fmt_count(info['params'])} | {fmt_count(info['params_dense'])} | "
        f"{fmt_count(info['flops'])} | {fmt_count(info['flops_dense'])} |"
    )
    lines += [
        "",
        f"parameters: {info['params']:,} sliced vs {info['params_dense']:,} dense: "
        f"{pct(info['share_params_removed'])} removed",
        f"FLOPs per token: {info['flops']:,.0f} sliced vs {info['flops_dense']:,.0f} dense: "
        f"{pct(info['share_flops_removed'])} removed",
    ]
    after = info.get("params_after_recorded")
    if after is not None and after != info["params"]:
        why = (
            " (a standard checkpoint stores the norm weights that the sliced model in memory keeps implicit)"
            if info.get("standard_checkpoint")
            else ""
        )
        lines.append(
            f"note: {after:,} sliced parameters were counted at slicing time; the folder holds {info['params']:,}{why}."
        )
    lines.append(f"dense parameters {info['params_dense_source']}; dense FLOPs from the config at full width.")
    if info["share_params_removed"] < 0:
        lines.append(
            "note: the sliced model is larger than the dense one: slicing unties tied embeddings and head and "
            "adds shortcut matrices, which for small models with large vocabularies outweighs what it removes."
        )
    return "\n".join(lines)
