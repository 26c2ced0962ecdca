"""The refits' final solve in float32 against float64, and both against the moments' own rounding.

    .venv/bin/python benchmarks/final_solve_precision.py                            # SmolLM2, every writer
    .venv/bin/python benchmarks/final_solve_precision.py --model qwen2.5-coder-0.5b --writers 16

A float32 model's refits solve in float32 (``slicegpt.core.refit.refit``): the strengths tried and
the final solve on every row. Its moments are float64 sums of float32 products, so they already
carry float32's rounding; a float32 solve adds its own, about float32's epsilon times the shifted
moment's condition number. This compresses the model once (uniform budget, in a fresh process)
and, at each of the first ``--writers`` refits, sums beside the package's moments a copy made of
float64 products of the same activations (the moments without the products' rounding), then
solves the final system at the package's strength three ways: float32 and float64 on the
package's moments, float64 on the float64 products'. Per writer: the weights' relative distances
(Frobenius) between the three, each solve's seconds, and the condition number of the shifted
moment (float64 eigenvalues). Results: a table on stdout and --out (JSON).
"""  # noqa: E501 - the usage examples are one command per line, printed as they are by --help

from __future__ import annotations

import time
from pathlib import Path

from cost_phases import METHODS
from fresh import answer_one, compression_parser, load_source, record_fresh

RESULTS = Path(__file__).resolve().parent / "results"


def one_run(job: dict) -> dict:
    import torch

    import slicegpt
    from slicegpt.core import neurons, refit

    torch.manual_seed(0)
    model, tokenizer, name = load_source(job["model"])
    plain_add, plain_refit, plain_greedy = refit.Moments.add, refit.refit, neurons.greedy_neurons
    kept: dict[str, torch.Tensor] = {}
    writers: list[dict] = []

    def add(self: refit.Moments, x: torch.Tensor, t: torch.Tensor | None) -> None:
        plain_add(self, x, t)
        # the same rows' sums of float64 products, beside the package's
        shadow = self.__dict__.setdefault("float64_products", refit.Moments())
        plain_add(shadow, x.double(), None if t is None else t.double())

    def greedy(*args, **kwargs) -> torch.Tensor:  # the kept neurons, to cut the float64 copy as the package cuts
        kept["index"] = plain_greedy(*args, **kwargs)
        return kept["index"]

    class Enough(Exception):
        pass

    def checked(moments: refit.FitMoments, w0: torch.Tensor, *args, **kwargs):
        out = plain_refit(moments, w0, *args, **kwargs)
        if not moments.held.count:
            return out
        rel, n = out[1], w0.shape[1]
        w64 = w0.to(torch.float64)

        def sums(m: refit.Moments) -> tuple[torch.Tensor, torch.Tensor]:
            copy = m.__dict__["float64_products"]
            if copy.xx.shape[0] == n:
                return copy.xx, copy.xt
            index = kept["index"]
            return copy.xx[index[:, None], index], copy.xt[index]

        def final(fit: tuple, held: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
            start = time.perf_counter()
            cross = refit.add_into(fit[1].clone(), held[1])
            w = refit.ridge(fit[0], cross, w64, rel, dtype, extra=held[0])
            return w.to(torch.float64), time.perf_counter() - start

        package = (moments.fit.xx, moments.fit.xt), (moments.held.xx, moments.held.xt)
        w32, s32 = final(*package, torch.float32)
        w64_, s64 = final(*package, torch.float64)
        exact, _ = final(sums(moments.fit), sums(moments.held), torch.float64)
        every = sums(moments.fit)[0] + sums(moments.held)[0]
        lam = rel * every.diagonal().mean()
        eig = torch.linalg.eigvalsh(every)

        def dist(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a - b).norm() / b.norm())

        writers.append(
            dict(
                n=n,
                d=int(w0.shape[0]),
                rel=rel,
                condition=float((eig[-1] + lam) / (eig[0].clamp_min(0) + lam)),
                float32_to_float64=dist(w32, w64_),
                float64_to_exact=dist(w64_, exact),
                float32_to_exact=dist(w32, exact),
                seconds64=s64,
                seconds32=s32,
            )
        )
        if job["writers"] and len(writers) >= job["writers"]:
            raise Enough
        return out

    refit.Moments.add, refit.refit, neurons.greedy_neurons = add, checked, greedy
    config = slicegpt.SliceConfig(
        target_params=job["target"], nsamples=job["nsamples"], seqlen=job["seqlen"], **METHODS["budget-uniform"]
    )
    try:
        slicegpt.slice_model(model, tokenizer, None, config, source_model=name, progress=False)
    except Enough:
        pass
    return dict(job, source_model=name, writers=writers, torch_threads=torch.get_num_threads())


def table(runs: list[dict]) -> str:
    out = [
        "| model | rows | writers | condition (largest) | float32 solve to float64 solve: largest (median) | "
        "float64 solve to float64 products': largest (median) | float32 solve to float64 products': largest "
        "(median) | float64 s | float32 s | ratio |",
        "|---|---:|---:|---:|---|---|---|---:|---:|---:|",
    ]
    for r in runs:
        w = r["writers"]
        if not w:
            continue

        def cell(key: str) -> str:
            values = sorted(x[key] for x in w)
            return f"{values[-1]:.1e} ({values[len(values) // 2]:.1e})"

        s64, s32 = sum(x["seconds64"] for x in w), sum(x["seconds32"] for x in w)
        out.append(
            f"| {r['source_model']} | {r['nsamples']} | {len(w)} | {max(x['condition'] for x in w):.1e} | "
            f"{cell('float32_to_float64')} | {cell('float64_to_exact')} | {cell('float32_to_exact')} | "
            f"{s64:.1f} | {s32:.1f} | {s64 / max(s32, 1e-9):.2f} |"
        )
    out += ["", "Where the condition is large (the weakest ridges), per writer:", ""]
    out += [
        "| model | writer | kept inputs | ridge | condition | float32 to float64 | float64 to exact "
        "| float32 to exact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        for i, x in enumerate(r["writers"]):
            if x["condition"] >= 1e4:
                out.append(
                    f"| {r['source_model']} | {i} | {x['n']} | {x['rel']:g} | {x['condition']:.1e} | "
                    f"{x['float32_to_float64']:.1e} | {x['float64_to_exact']:.1e} | {x['float32_to_exact']:.1e} |"
                )
    return "\n".join(out)


def main() -> None:
    p = compression_parser(__doc__, RESULTS / "final_solve_precision.json")
    p.add_argument("--writers", type=int, default=0, help="stop after this many refits (0: every one)")
    args = p.parse_args()
    if answer_one(args, one_run):
        return
    job = dict(model=args.model, writers=args.writers, nsamples=args.nsamples, seqlen=args.seqlen, target=args.target)
    print(table(record_fresh(__file__, job, args.out, ("model", "nsamples", "seqlen", "target"))))


if __name__ == "__main__":
    main()
