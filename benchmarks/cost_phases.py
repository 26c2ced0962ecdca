"""Where a compression's time goes: every phase timed separately, in dense-forward equivalents.

    .venv/bin/python benchmarks/cost_phases.py                                  # SmolLM2, 25%, 3 methods, 32 rows
    .venv/bin/python benchmarks/cost_phases.py --nsamples 8 --methods budget-uniform
    .venv/bin/python benchmarks/cost_phases.py --model qwen2.5-coder-0.5b --nsamples 32,128

Each run in a fresh process: load the model, time one dense forward pass over the calibration rows
(the unit: what any method must spend at least once per layer), then compress it to 75% of its
parameters as shipped (or SliceGPT alone at the width that gives the same count) with the phases
timed by wrapping the package's own functions from outside (nothing in the package changes):

| phase | what is timed |
|---|---|
| attention, MLP | the block's attention and MLP branches (every calibration and refit pass) |
| covariances | PCA covariance accumulation (float64) |
| moments | refit and neuron-selection moments (float32 products summed in float64) |
| eigendecompositions | the PCA of each point |
| neuron selection | the greedy least-squares selection (and the spreading curves) |
| refits | the closed-form corrections' ridge: the strengths tried on held-out rows, the final solve |
| writers alone | the refit writers run on what they read (the pass after a refit) |
| rotate and slice | the weight surgery |
| other | the rest of the compression (capture, copies, bookkeeping) |

Phases nest (a refit pass runs attention inside it): each wrapper counts only its own time, less
the time of any timed phase inside it. Results: a markdown table on stdout and --out (JSON).
"""  # noqa: E501 - the usage examples are one command per line, printed as they are by --help

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from fresh import add_one, answer_one, load_source, replace_runs, run_fresh

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PHASES = (
    "attention",
    "MLP",
    "covariances",
    "moments",
    "eigendecompositions",
    "neuron selection",
    "refits",
    "writers alone",
    "rotate and slice",
)
METHODS = {
    # name: SliceConfig settings (the parameter target is filled in)
    "slicegpt": dict(uniform=True, axes="residual", correct=False, round_to=1),
    "budget-uniform": dict(uniform=True),
    "budget-per-layer": dict(uniform=False),
}


class PhaseClock:
    """Exclusive time per phase: a wrapped call's time less that of timed calls inside it."""

    def __init__(self) -> None:
        self.seconds = {p: 0.0 for p in PHASES}
        self.calls = {p: 0 for p in PHASES}
        self._stack: list[list[float]] = []

    def wrap(self, phase: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append([0.0])
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                inner = self._stack.pop()[0]
                self.seconds[phase] += spent - inner
                self.calls[phase] += 1
                if self._stack:
                    self._stack[-1][0] += spent

        return timed

    def patch(self, owner: Any, name: str, phase: str) -> None:
        setattr(owner, name, self.wrap(phase, getattr(owner, name)))


def instrument(clock: PhaseClock) -> None:
    """Wrap the package's functions by phase, in every module that imported them by name."""
    from slicegpt.core import block, corrections, modules, neurons, pca, refit, slicing, spread

    clock.patch(modules.SlicedBlock, "attn_branch", "attention")
    clock.patch(modules.SlicedBlock, "mlp_branch", "MLP")
    clock.patch(pca.Covariance, "add", "covariances")
    clock.patch(refit.Moments, "add", "moments")
    clock.patch(pca.Covariance, "pca", "eigendecompositions")
    # module attributes: callers inside a module (neurons.greedy_neurons, refit.refit) look the
    # name up in their module, and modules that imported it by name get the wrapper too
    greedy = clock.wrap("neuron selection", neurons.greedy_order)
    neurons.greedy_order = spread.greedy_order = greedy
    refit.refit = clock.wrap("refits", refit.refit)
    clock.patch(corrections.WriterInputs, "output", "writers alone")
    block.slice_block = slicing.slice_block = clock.wrap("rotate and slice", block.slice_block)


def one_run(job: dict) -> dict:
    import torch

    import slicegpt
    from slicegpt.sources import calibration_rows_for

    torch.manual_seed(0)
    model, tokenizer, name = load_source(job["model"])
    shipped = slicegpt.count_parameters(model)
    settings = METHODS[job["method"]]
    config = slicegpt.SliceConfig(
        target_params=job["target"],
        nsamples=job["nsamples"],
        seqlen=job["seqlen"],
        calib="wiki",
        fast_matmul=job.get("fast_matmul", False),  # runs from before the setting ran without
        **settings,
    )

    rows = calibration_rows_for(model, tokenizer, "wiki", config)
    probed = probe(model, config)
    report, timing = timed_compression(model, tokenizer, rows, config)
    return dict(
        job,
        source_model=name,
        params_shipped=shipped,
        params=report.params_after,
        mlp_neurons=[w.mlp for w in report.widths.layers],
        weights_sha256=weights_sha256(model),
        probed=probed,
        **timing,
    )


def probe(model: Any, config: Any) -> dict:
    """What ``slicegpt plan --measure`` times on this machine for these settings, in the run's
    process just before its compression (the same machine, the same load)."""
    from slicegpt.evaluation.probe import probe_run

    return probe_run(model.config, config).to_dict()


def weights_sha256(model: Any) -> str:
    """sha256 of the compressed weights (names, shapes, bytes): two runs that print the same made the
    same model bit for bit (taken after the timed compression)."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def timed_compression(model: Any, tokenizer: Any, rows: Any, config: Any) -> tuple[Any, dict]:
    """Compress ``model`` on ``rows`` with every phase timed; also time the unit, one dense forward
    pass over every row, batch by batch as slicing batches them. Returns the report and the
    timing fields of a result (seconds, phases, calls, threads)."""
    import torch

    import slicegpt

    from slicegpt.core.precision import asks_fast_float32, bfloat16_units, fast_float32, fast_float32_available

    start = time.perf_counter()
    # the unit in the precision the compression runs in
    with torch.no_grad(), fast_float32(asks_fast_float32(config)):
        for ids, mask in rows.batches(config.batch_size):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    dense_forward = time.perf_counter() - start
    clock = PhaseClock()
    instrument(clock)
    start = time.perf_counter()
    report = slicegpt.slice_model(model, tokenizer, rows, config, progress=False)
    total = time.perf_counter() - start
    return report, dict(
        dense_forward_seconds=dense_forward,
        total_seconds=total,
        phases=dict(clock.seconds, other=total - sum(clock.seconds.values())),
        calls=clock.calls,
        torch_threads=torch.get_num_threads(),
        # the machine's facts the plan's rates follow: its bfloat16 units, and whether its fast
        # float32 products keep float32's accuracy (they ran where also asked for; not on AMX)
        bf16_units=bfloat16_units(),
        fast_float32=fast_float32_available(),
    )


def fast_cell(run: dict) -> str:
    """Whether the run's float32 products went through the CPU's bfloat16 units: asked for and
    used, asked for where the CPU's mode would not keep float32 (an AMX Xeon), or not asked."""
    if not run.get("fast_matmul"):
        return "no"
    return "asked, off (not float32 here)" if run.get("fast_float32") is False else "yes"


def table(runs: list[dict]) -> str:
    cols = [*PHASES, "other"]
    out = [
        "| model | method | rows | fast float32 | total s | x dense forward | " + " | ".join(cols) + " |",
        "|---|---|---:|---|---:|---:|" + "---:|" * len(cols),
    ]
    for r in runs:
        unit = r["dense_forward_seconds"]
        cells = [f"{r['phases'].get(c, 0):.0f} s ({r['phases'].get(c, 0) / unit:.1f})" for c in cols]
        fast = fast_cell(r)
        out.append(
            f"| {r['source_model']} | {r['method']} | {r['nsamples']} | {fast} | {r['total_seconds']:.0f} | "
            f"{r['total_seconds'] / unit:.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(out)


# plan's time terms and the measured phases they predict (slicegpt.evaluation.plan.TimeEstimate)
PLAN_TERMS = {
    "forward": ("attention", "MLP", "writers alone"),
    "statistics": ("covariances", "moments"),
    "eigh": ("eigendecompositions",),
    "solves": ("refits",),
    "selection": ("neuron selection",),
    "rotations": ("rotate and slice",),
    "other": ("other",),
}


def plan_cells(t: Any, run: dict, digits: int = 0, unit: str = " s") -> list[str]:
    """Table cells: each of plan's time terms (``t``, a TimeEstimate) beside the phases it predicts,
    "planned / measured", then the totals (less the disk, not timed here) and their ratio."""
    cells = [
        f"{getattr(t, term):.{digits}f} / {sum(run['phases'].get(p, 0.0) for p in phases):.{digits}f}{unit}"
        for term, phases in PLAN_TERMS.items()
    ]
    total = t.total - t.disk
    cells.append(f"{total:.{digits}f} / {run['total_seconds']:.{digits}f} s ({total / run['total_seconds']:.2f})")
    return cells


def rates_cell(rates: Any) -> str:
    """A ProbedRates in a table cell: forward / moments / float64 TFLOP/s, and the solves' (final,
    strengths tried) at the widest width probed where it timed them."""
    cell = f"{rates.forward_tflops:.3f} / {rates.moments_tflops:.3f} / {rates.fp64_tflops:.3f}"
    if rates.final_solve is not None and rates.trial_solve is not None:
        cell += f", solves {rates.final_solve.tflops[-1]:.3f} / {rates.trial_solve.tflops[-1]:.3f}"
    return cell


def rates_source(plan: Any, probe_here: bool) -> str:
    """Where a plan's rates came from, for the tables: the defaults, the run's own probe, or a
    probe made now (``probe_here``), with the rates."""
    if plan.probed is None:
        return "defaults"
    return ("probed here, " if probe_here else "probed, ") + rates_cell(plan.probed)


def plan_check(runs: list[dict], probe_here: bool = False) -> str:
    """Each run's phases beside what ``slicegpt plan`` predicts for the same settings: seconds
    predicted / measured, per term, and the total (less the disk, not timed here). A run that
    probed its machine's rates (``plan --measure``, ``probed`` in the run) is planned with them,
    the default CPU rates' total beside; older runs with the default rates alone. ``probe_here``:
    every run planned with rates probed now, on this machine (for runs recorded on a machine of
    this kind before the probe timed what it times now)."""
    from slicegpt import SliceConfig
    from slicegpt.evaluation.plan import plan_model
    from slicegpt.evaluation.probe import ProbedRates
    from slicegpt.io.fetch import materialise

    out = [
        "| model | method | rows | fast float32 | rates | "
        + " | ".join(f"{t} plan / measured" for t in PLAN_TERMS)
        + " | total | total, default rates |",
        "|---|---|---:|---|---|" + "---:|" * (len(PLAN_TERMS) + 2),
    ]
    for r in runs:
        config = SliceConfig(
            target_params=r["target"],
            nsamples=r["nsamples"],
            seqlen=r["seqlen"],
            fast_matmul=r.get("fast_matmul", False),
            calib="wiki",  # what the runs calibrate on (a chat model's default would add its own conversations)
            **METHODS[r["method"]],
        )
        # the rates of the machine that ran it (runs from before the field ran fast where asked: it had the units)
        units = r.get("bf16_units", r.get("fast_matmul", False))
        accurate = r.get("fast_float32")  # runs from before the field: as their units
        folder = str(materialise(r["model"])) if r["model"] else None
        default = plan_model(folder, config, bf16_units=units, fast_float32=accurate).time
        rates = None if probe_here or r.get("probed") is None else ProbedRates.from_dict(r["probed"])
        plan = plan_model(folder, config, bf16_units=units, fast_float32=accurate, probed=rates, measure=probe_here)
        how = rates_source(plan, probe_here)
        cells = plan_cells(plan.time, r)
        default_total = default.total - default.disk
        cells.append(f"{default_total:.0f} s ({default_total / r['total_seconds']:.2f})")
        fast = fast_cell(r)
        out.append(
            f"| {r['source_model']} | {r['method']} | {r['nsamples']} | {fast} | {how} | " + " | ".join(cells) + " |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="hub id, folder, .gguf or a PyPI-shipped name; default: SmolLM2")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated among {', '.join(METHODS)}")
    p.add_argument("--nsamples", default="32", help="calibration rows, comma-separated for several runs")
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--target", type=float, default=0.75)
    p.add_argument(
        "--fast-matmul",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the CPU's fast float32 products (the package's default; --no-fast-matmul: IEEE float32 throughout)",
    )
    p.add_argument("--out", default=str(RESULTS / "cost_phases.json"))
    add_one(p)
    p.add_argument("--tables", action="store_true", help="print the tables of the runs in --out and stop")
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
        return
    if answer_one(args, one_run):
        return
    out = Path(args.out)
    runs: list[dict] = json.loads(out.read_text())["runs"] if out.exists() else []
    for n in (int(x) for x in args.nsamples.split(",")):
        for method in args.methods.split(","):
            job = dict(
                model=args.model,
                method=method,
                nsamples=n,
                seqlen=args.seqlen,
                target=args.target,
                fast_matmul=args.fast_matmul,
            )
            print(f"== {method}, {n} rows", file=sys.stderr, flush=True)
            r = run_fresh(__file__, job, f"{method} at {n} rows")
            runs = replace_runs(runs, [r], tuple(job))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
            print(table([r]).splitlines()[-1], flush=True)
    print(table(runs))
    print()
    print(plan_check(runs))


if __name__ == "__main__":
    main()
