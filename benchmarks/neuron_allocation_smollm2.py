"""Spread the MLP neurons unevenly over the layers: how much does it gain over the same number in every layer?

    .venv/bin/python benchmarks/neuron_allocation_smollm2.py                  # allocate, compress, measure
    .venv/bin/python benchmarks/neuron_allocation_smollm2.py --only-allocate  # the allocation alone (minutes)

The budget's uniform model of SmolLM2-135M-Instruct at 25% removed keeps 880 of 1536 MLP neurons
in each of the 30 layers (a standard checkpoint needs one intermediate_size). A per-layer model
could keep different numbers. This measures what that is worth at the same parameter count:

1. one pass of the dense model over --curve-rows 'wiki' calibration rows (1024 tokens) gathers
   each layer's MLP moments, every token weighted by 1 / the mean square of the layer's output
   (what the next norm sees of an error is its size relative to the stream);
2. a greedy least-squares selection run to every width gives each layer's error against the
   neurons it keeps (:func:`slicegpt.core.neurons.greedy_order`), and the neurons go, 8 at a
   time from a floor of --floor each, where they lower the summed error most, until the total is
   30 x --neurons;
3. the model is compressed with those widths, the rest as the budget does it (neurons chosen
   greedily with the down projection refit toward the dense stream, attention refit, --nsamples
   calibration rows), in memory (a standard config cannot hold per-layer widths); then perplexity
   on all 'wiki' evaluation rows and on 64 'lambada' rows (novels, not calibrated on).

Results: benchmarks/results/neuron_allocation_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def error_curves(model, tokenizer, rows: int) -> list[list[float]]:
    """Per layer: the weighted least-squares error of its MLP output kept on j neurons, j = 0..n."""
    from slicegpt.config import SliceConfig
    from slicegpt.core.neurons import greedy_order
    from slicegpt.data import calibration_rows_for

    ids = calibration_rows_for(model, tokenizer, "wiki", SliceConfig(nsamples=rows, seqlen=1024)).input_ids
    layers = model.model.layers
    n, d = model.config.intermediate_size, model.config.hidden_size
    xx = [torch.zeros(n, n, dtype=torch.float64) for _ in layers]
    xt = [torch.zeros(n, d, dtype=torch.float64) for _ in layers]
    tt = [0.0 for _ in layers]
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_down(i: int):
        def hook(module, args, out):
            seen[i] = (args[0].reshape(-1, n).double(), out.reshape(-1, d).double())
        return hook

    def on_layer(i: int):
        def hook(module, args, out):
            x = (out[0] if isinstance(out, tuple) else out).reshape(-1, d).double()
            wt = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-12)
            h, y = seen.pop(i)
            h, y = h * wt, y * wt
            xx[i] += h.t() @ h
            xt[i] += h.t() @ y
            tt[i] += float(y.pow(2).sum())
        return hook

    hooks = [m.mlp.down_proj.register_forward_hook(on_down(i)) for i, m in enumerate(layers)]
    hooks += [m.register_forward_hook(on_layer(i)) for i, m in enumerate(layers)]
    try:
        for r in range(ids.shape[0]):
            model(input_ids=ids[r : r + 1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    tokens = ids.numel()
    curves = []
    for i, layer in enumerate(layers):
        _, gains = greedy_order(xx[i] / tokens, layer.mlp.down_proj.weight.double(), n, cross=xt[i] / tokens)
        curves.append([tt[i] / tokens, *(tt[i] / tokens - torch.cumsum(gains, 0)).tolist()])
    return curves


def allocate(curves: list[list[float]], total: int, step: int = 8, floor: int = 256) -> list[int]:
    """Neurons per layer summing to ``total``: from ``floor`` each, ``step`` at a time to the layer
    whose error they lower most."""
    k = [floor] * len(curves)
    while sum(k) < total:
        gain = [c[w] - c[w + step] if w + step < len(c) else float("-inf") for c, w in zip(curves, k)]
        best = max(range(len(k)), key=gain.__getitem__)
        k[best] += step
    return k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--neurons", type=int, default=880, help="the uniform model's neurons per layer (the budget's at 25%% removed)")
    p.add_argument("--curve-rows", type=int, default=8)
    p.add_argument("--floor", type=int, default=256)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--books-rows", type=int, default=64)
    p.add_argument("--only-allocate", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "neuron_allocation_smollm2.json"))
    args = p.parse_args()

    import slicegpt
    from slicegpt.arch import spec_for_config
    from slicegpt.core.widths import ConstantWidth, fit_widths

    model, tokenizer, _ = slicegpt.load_model(None)
    start = time.perf_counter()
    curves = error_curves(model, tokenizer, args.curve_rows)
    layers = len(curves)
    k = allocate(curves, args.neurons * layers, floor=args.floor)
    result = {"neurons_uniform": args.neurons, "allocation": k, "curve_rows": args.curve_rows, "floor": args.floor,
              "allocation_seconds": time.perf_counter() - start,
              "weighted_error_uniform": sum(c[args.neurons] for c in curves),
              "weighted_error_allocated": sum(c[w] for c, w in zip(curves, k))}
    print(json.dumps(result), flush=True)
    if args.only_allocate:
        return
    spec = spec_for_config(model.config)

    class PerLayerNeurons:
        """The residual width kept whole (no rotation needed), k[i] neurons in layer i."""

        def widths(self, hidden: int, num_layers: int, topology: str):
            base = fit_widths(ConstantWidth(0.0, 1, True, width=hidden).widths(hidden, num_layers, topology), spec)
            return replace(base, layers=tuple(replace(w, mlp=n) for w, n in zip(base.layers, k)))

    config = slicegpt.SliceConfig(uniform=True, correct=True, nsamples=args.nsamples, seqlen=1024)
    report = slicegpt.slice_model(model, tokenizer, "wiki", config, policy=PerLayerNeurons())
    result.update(params=report.params_after, nsamples=args.nsamples, slicing_seconds=report.seconds)
    result["wiki"] = slicegpt.perplexity(model, tokenizer, "wiki", seqlen=1024).perplexity
    result["books"] = slicegpt.perplexity(model, tokenizer, "lambada", seqlen=1024, max_rows=args.books_rows).perplexity
    print(json.dumps(result), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
