"""How each phase of a compression grows with the model's width: one random layer per shape.

    .venv/bin/python benchmarks/cost_width.py                                   # 4 shapes up to 7B's, 3 methods
    .venv/bin/python benchmarks/cost_width.py --shapes 7b --methods budget-per-layer
    .venv/bin/python benchmarks/cost_width.py --plot benchmarks/results/cost_width.png

Each job, in a fresh process: a one-layer Llama of the shape's widths (random weights, a 256-token
vocabulary so that embeddings and head cost nothing), float32 (--dtype bfloat16: as a 70B model
is usually loaded; the statistics are float32 products either way), compressed to 75% of its
parameters by the method, the phases timed as benchmarks/cost_phases.py times them, and one
dense forward pass of the layer over the same rows as the unit. Rows: 32 of 128 random tokens
(4,096 tokens; a layer's arithmetic does not care what the tokens say, and the cubic phases do
not depend on the tokens at all).

The shapes (hidden / MLP / heads / kv heads): SmolLM2-135M 576/1536/9/3, Qwen2.5-0.5B
896/4864/14/2, TinyLlama-1.1B 2048/5632/32/4, Llama-2-7B 4096/11008/32/32, Llama-2-70B
8192/28672/64/8 (not in the default set: about 18x 7B's cubic phases, and about 20 GB of memory
in bfloat16). The
table gives, per phase, the least-squares slope of log(seconds) on log(layer parameters) over
the float32 shapes run (1: linear in the layer's size, 1.5: cubic in its width; a bfloat16 layer,
drawn as a cross, is a point apart), and each job's peak
resident set beside what `slicegpt plan` says of that layer in memory; a second table puts each
phase beside the time the plan predicts for it. Results: stdout, --out (JSON), --plot (PNG).
"""  # noqa: E501 - the usage examples are one command per line, printed as they are by --help

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from cost_phases import METHODS, PHASES, PLAN_TERMS, plan_cells, rates_source, timed_compression
from fresh import add_one, answer_one, replace_runs, run_fresh

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SHAPES = {
    # name: (hidden, MLP width, heads, kv heads)
    "smollm2": (576, 1536, 9, 3),
    "qwen0.5b": (896, 4864, 14, 2),
    "1b": (2048, 5632, 32, 4),
    "7b": (4096, 11008, 32, 32),
    "70b": (8192, 28672, 64, 8),
}
DEFAULT_SHAPES = "smollm2,qwen0.5b,1b,7b"
COLUMNS = (*PHASES, "other")


def one_run(job: dict) -> dict:
    import torch
    import transformers

    import slicegpt
    from slicegpt.data import Rows
    from slicegpt.evaluation.plan import plan_model
    from slicegpt.evaluation.probe import probe_run
    from slicegpt.io.headers import write_index_only_folder
    from slicegpt.memory import peak_rss_gb

    hidden, mlp, _, _ = SHAPES[job["shape"]]
    config = layer_config(job["shape"], job["seqlen"])
    torch.manual_seed(0)
    dtype = job.get("dtype", "float32")
    model = transformers.AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype)).eval()
    ids = torch.randint(0, 256, (job["nsamples"], job["seqlen"]), generator=torch.Generator().manual_seed(1))
    cfg = slicegpt.SliceConfig(
        target_params=job["target"],
        nsamples=job["nsamples"],
        seqlen=job["seqlen"],
        dtype=dtype,
        **METHODS[job["method"]],
    )
    probed = probe_run(config, cfg).to_dict()  # what `slicegpt plan --measure` times, before the compression
    report, timing = timed_compression(model, None, Rows(ids), cfg)
    with tempfile.TemporaryDirectory() as folder:  # what `slicegpt plan` says of this very layer
        write_index_only_folder(folder, config, dtype)
        planned = plan_model(folder, cfg).memory.host_in_memory / 1e9
    return dict(
        job,
        hidden=hidden,
        mlp=mlp,
        params=report.params_after,
        params_before=report.params_before,
        peak_rss_gb=peak_rss_gb(),
        plan_host_gb=planned,
        probed=probed,
        **timing,
    )


def layer_config(shape: str, seqlen: int) -> Any:
    """The one-layer Llama of a shape: a 256-token vocabulary, so embeddings and head cost nothing."""
    import transformers

    hidden, mlp, heads, kv = SHAPES[shape]
    return transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_hidden_layers=1,
        max_position_embeddings=max(4096, seqlen),
        tie_word_embeddings=False,
    )


def layer_params(shape: str) -> int:
    """One layer's matrices: q, o (hidden^2 each), k, v (hidden x kv width) and the MLP's three."""
    hidden, mlp, heads, kv = SHAPES[shape]
    return 2 * hidden * hidden + 2 * hidden * (hidden // heads) * kv + 3 * hidden * mlp


def seconds(run: dict, column: str) -> float:
    """A run's seconds in a phase column, or its "total" or "dense forward"."""
    if column == "total":
        return run["total_seconds"]
    if column == "dense forward":
        return run["dense_forward_seconds"]
    return run["phases"].get(column, 0.0)


def slopes(runs: list[dict], method: str) -> dict[str, float]:
    """Per phase, the least-squares slope of log(seconds) on log(layer parameters) over the shapes
    run in float32 (a bfloat16 layer's forward passes run at another speed, so it is a point apart)."""
    mine = [r for r in runs if r["method"] == method and r.get("dtype", "float32") == "float32"]
    out = {}
    for c in (*COLUMNS, "total", "dense forward"):
        pts = [(math.log(layer_params(r["shape"])), math.log(seconds(r, c))) for r in mine if seconds(r, c) > 0.05]
        if len(pts) >= 3:
            mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
            sxx = sum((x - mx) ** 2 for x, _ in pts)
            out[c] = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return out


def table(runs: list[dict]) -> str:
    out = [
        "| method | shape | hidden / MLP | total s | x dense forward | " + " | ".join(COLUMNS) + " | peak RSS (plan) |",
        "|---|---|---|---:|---:|" + "---:|" * (len(COLUMNS) + 1),
    ]
    for r in sorted(runs, key=lambda r: (list(METHODS).index(r["method"]), r["mlp"], r.get("dtype", ""))):
        unit = r["dense_forward_seconds"]
        cells = [f"{r['phases'].get(c, 0):.1f} ({r['phases'].get(c, 0) / unit:.1f})" for c in COLUMNS]
        out.append(
            f"| {r['method']} | {_shape(r)} | {r['hidden']} / {r['mlp']} | {r['total_seconds']:.1f} | "
            f"{r['total_seconds'] / unit:.1f} | " + " | ".join(cells) + " | " + _peak(r) + " |"
        )
    for method in METHODS:
        s = slopes(runs, method)
        if s:
            out.append(f"| {method} | slope on layer parameters | | {s.get('total', float('nan')):.2f} | | ")
            out[-1] += " | ".join(f"{s[c]:.2f}" if c in s else "" for c in COLUMNS) + " |"
    return "\n".join(out)


def plan_check(runs: list[dict], probe_here: bool = False) -> str:
    """Each run's phases beside what ``slicegpt plan`` predicts for that layer: seconds predicted /
    measured per term, and the total (less the disk, not timed here). The rates: those the run
    probed (``plan --measure`` in its process), else this CPU's defaults; ``probe_here``: probed
    now, on this machine (for runs recorded on a machine of this kind before they probed).
    The wide shapes test the plan's cubic terms far beyond the models it was fitted on."""
    from slicegpt import SliceConfig
    from slicegpt.evaluation.plan import plan_model
    from slicegpt.evaluation.probe import ProbedRates
    from slicegpt.io.headers import write_index_only_folder

    out = [
        "| method | shape | rates | " + " | ".join(f"{t} plan / measured" for t in PLAN_TERMS) + " | total |",
        "|---|---|---|" + "---:|" * (len(PLAN_TERMS) + 1),
    ]
    for r in sorted(runs, key=lambda r: (list(METHODS).index(r["method"]), r["mlp"], r.get("dtype", ""))):
        config = layer_config(r["shape"], r["seqlen"])
        dtype = r.get("dtype", "float32")
        cfg = SliceConfig(
            target_params=r["target"], nsamples=r["nsamples"], seqlen=r["seqlen"], dtype=dtype, **METHODS[r["method"]]
        )
        with tempfile.TemporaryDirectory() as folder:
            write_index_only_folder(folder, config, dtype)
            # the rates of the machine that ran it (runs from before the field: taken as without the units)
            units, fast = r.get("bf16_units", False), r.get("fast_float32")
            probed = None if probe_here or r.get("probed") is None else ProbedRates.from_dict(r["probed"])
            plan = plan_model(folder, cfg, bf16_units=units, fast_float32=fast, probed=probed, measure=probe_here)
        how = rates_source(plan, probe_here)
        cells = plan_cells(plan.time, r, digits=1, unit="")
        out.append(f"| {r['method']} | {_shape(r)} | {how} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _shape(run: dict) -> str:
    """The shape's name, and the layer's dtype where it is not float32."""
    return run["shape"] + (f" ({run['dtype']})" if run.get("dtype", "float32") != "float32" else "")


def _peak(run: dict) -> str:
    """The job's peak resident set and what the plan says for the layer in memory (GB)."""
    if "peak_rss_gb" not in run:
        return ""
    return f"{run['peak_rss_gb']:.1f} GB ({run['plan_host_gb']:.1f})"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4.2), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        ordered = sorted((r for r in runs if r["method"] == method), key=lambda r: layer_params(r["shape"]))
        mine = [r for r in ordered if r.get("dtype", "float32") == "float32"]
        other = [r for r in ordered if r.get("dtype", "float32") != "float32"]  # bfloat16 layers: points apart
        x = [layer_params(r["shape"]) / 1e6 for r in mine]
        for k, c in enumerate((*COLUMNS, "dense forward")):
            y = [seconds(r, c) for r in mine]
            if y and max(y) > 0.05:  # one colour per phase in every panel
                style = dict(color="k", linestyle="--") if c == "dense forward" else dict(color=f"C{k}", marker="o")
                ax.loglog(x, [max(v, 1e-2) for v in y], label=c, **style)
            for r in other:
                if seconds(r, c) > 0.05:
                    colour = "k" if c == "dense forward" else f"C{k}"
                    ax.loglog([layer_params(r["shape"]) / 1e6], [seconds(r, c)], marker="x", color=colour, linestyle="")
        if other:
            ax.plot([], [], marker="x", color="grey", linestyle="", label="x: bfloat16 layer")
        ax.legend(fontsize=7)
        ax.set_title(method)
        ax.set_xlabel("parameters of the layer, millions (4,096 tokens)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("seconds (this CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated among {', '.join(SHAPES)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated among {', '.join(METHODS)}")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--target", type=float, default=0.75)
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="the layer's dtype (bfloat16: a 70B model as it is usually loaded; the statistics are the same)",
    )
    p.add_argument("--out", default=str(RESULTS / "cost_width.json"))
    p.add_argument("--plot", default=None, help="write the log-log plot here (PNG)")
    add_one(p)
    p.add_argument("--tables", action="store_true", help="print the table of the runs in --out (and --plot) and stop")
    p.add_argument(
        "--probe-here",
        action="store_true",
        help="with --tables: plan every run with rates probed now on this machine (plan --measure), "
        "for runs recorded on a machine of this kind",
    )
    args = p.parse_args()
    if args.tables:
        runs = json.loads(Path(args.out).read_text())["runs"]
        print(table(runs) + "\n\n" + plan_check(runs, probe_here=args.probe_here))
        if args.plot:
            plot(runs, Path(args.plot))
        return
    if answer_one(args, one_run):
        return
    out = Path(args.out)
    runs: list[dict] = json.loads(out.read_text())["runs"] if out.exists() else []
    for shape in args.shapes.split(","):
        for method in args.methods.split(","):
            job = dict(shape=shape, method=method, nsamples=args.nsamples, seqlen=args.seqlen, target=args.target)
            if args.dtype != "float32":  # named only when not the default, so that older runs still match
                job["dtype"] = args.dtype
            print(f"== {method}, {shape}", file=sys.stderr, flush=True)
            r = run_fresh(__file__, job, f"{method} on {shape}")
            runs = replace_runs(runs, [r], tuple(job))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
            print(table([r]).splitlines()[2], flush=True)
    print(table(runs) + "\n\n" + plan_check(runs))
    if args.plot:
        plot(runs, Path(args.plot))


if __name__ == "__main__":
    main()
