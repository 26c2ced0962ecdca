"""Two ideas for the budget method's closed-form step, measured layer by layer before building either.

    .venv/bin/python benchmarks/refit_options.py                      # SmolLM2, 16 x 512 rows of wiki+self
    .venv/bin/python benchmarks/refit_options.py --nsamples 32 --out benchmarks/results/refit_options.json

The budget default (25% of SmolLM2's parameters, all from MLP neurons) keeps 888 of each layer's
1536 neurons and refits the down projection on them. On the dense model's own activations (the
calibration rows' tokens, three quarters to fit, the last quarter held out), for every layer:

* **intercept**: the held-out error of that refit with a constant column beside the kept neurons
  (a bias on the down projection: mean compensation), against without;
* **query heads**: the same parameters spent differently: one query head of each key/value group
  removed (its q rows and o columns; 128 neurons' worth in SmolLM2) and that many more neurons
  kept, each writer refit on what it keeps, against the neurons alone.

Errors are what the next norm sees: each token's squared error divided by the mean square of the
stream the layer writes into (the package's own weighting, ``core.refit.stream_weights``), summed
over the stream's coordinates and averaged over held-out tokens.
They are local (each layer on the dense model's inputs, the errors of different layers simply
added), a first look, not a compression. Results: a table on stdout, per-layer figures in --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def weighted_fit(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, fit: slice, lam: float = 1e-4) -> torch.Tensor:
    """Least squares of y on x over the ``fit`` rows, each row weighted by w ([N, 1]), a small ridge."""
    xf, yf = x[fit] * w[fit].sqrt(), y[fit] * w[fit].sqrt()
    g = xf.t() @ xf
    g += lam * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
    return torch.linalg.solve(g, xf.t() @ yf)


def held_error(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, fit: slice, held: slice) -> float:
    """Weighted held-out error of the refit of y on x: mean over held-out tokens of w ||e||^2."""
    e = x[held] @ weighted_fit(x, y, w, fit) - y[held]
    return float((w[held] * e.pow(2)).sum(-1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calib", default="wiki+self", help="calibration source (never evaluation text)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--keep", type=int, default=888, help="neurons each layer keeps (the budget default's)")
    p.add_argument("--out", default=str(HERE / "results" / "refit_options.json"))
    args = p.parse_args()

    import slicegpt
    from slicegpt import sources
    from slicegpt.core.neurons import greedy_order
    from slicegpt.core.refit import stream_weights

    torch.manual_seed(0)
    model, tokenizer, name = slicegpt.load_model()
    cfg = model.config
    rows = sources.calibration_rows(
        model, tokenizer, args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=42, progress=False
    ).input_ids
    heads, groups = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per_group = heads // groups
    # one head per group: q rows and o columns, 2 x head_dim x hidden; one neuron of a gated MLP: 3 x hidden
    neurons_per_heads = 2 * groups * head_dim // 3

    captured: dict[tuple[int, str], list[torch.Tensor]] = {}

    def keep(i: int, what: str):
        def hook(_m, a, o) -> None:
            # a writer's input; for the layer, its output: the stream the MLP writes into
            x = (o[0] if isinstance(o, tuple) else o) if what == "stream" else a[0]
            captured.setdefault((i, what), []).append(x.detach().reshape(-1, x.shape[-1]).float())

        return hook

    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks += [
            layer.register_forward_hook(keep(i, "stream")),
            layer.mlp.down_proj.register_forward_hook(keep(i, "mlp")),
            layer.self_attn.o_proj.register_forward_hook(keep(i, "attn")),
        ]
    with torch.no_grad():
        for b in range(0, len(rows), 4):
            model(rows[b : b + 4])
    for h in hooks:
        h.remove()

    layers = []
    for i, layer in enumerate(model.model.layers):
        w = stream_weights(torch.cat(captured.pop((i, "stream"))).double())  # [N, 1]
        n = w.shape[0]
        fit, held = slice(0, n * 3 // 4), slice(n * 3 // 4, n)
        h = torch.cat(captured.pop((i, "mlp"))).double()  # [N, intermediate]
        down = layer.mlp.down_proj.weight.detach().double()
        y = h @ down.t()
        order, _ = greedy_order((h[fit] * w[fit]).t() @ h[fit] / n, down, h.shape[1])
        kept = h[:, order[: args.keep]]
        plain = held_error(kept, y, w, fit, held)
        with_bias = held_error(torch.cat([kept, torch.ones(n, 1, dtype=h.dtype)], 1), y, w, fit, held)
        more = held_error(h[:, order[: args.keep + neurons_per_heads]], y, w, fit, held)

        a = torch.cat(captured.pop((i, "attn"))).double()  # [N, heads * head_dim]
        ya = a @ layer.self_attn.o_proj.weight.detach().double().t()
        dropped: list[int] = []
        for g in range(groups):  # one head per group, each the one whose removal costs least given the others
            best = None
            for j in range(per_group):
                out = set(dropped + [g * per_group + j])
                cols = torch.cat([torch.arange(k * head_dim, (k + 1) * head_dim) for k in range(heads) if k not in out])
                e = held_error(a[:, cols], ya, w, fit, held)
                if best is None or e < best[0]:
                    best = (e, g * per_group + j)
            dropped.append(best[1])
        heads_err = best[0]  # the last group's best: every group's head dropped
        layers.append(
            dict(
                layer=i,
                neurons_kept=args.keep,
                mlp_error=plain,
                mlp_error_with_intercept=with_bias,
                mlp_error_more_neurons=more,
                heads_dropped=dropped,
                heads_error=heads_err,
            )
        )
        print(
            f"layer {i:2d}: MLP {plain:.5f}, with intercept {with_bias:.5f} | "
            f"{args.keep + neurons_per_heads} neurons {more:.5f} + heads {heads_err:.5f} = {more + heads_err:.5f}",
            flush=True,
        )
    total = {
        k: sum(r[k] for r in layers)
        for k in ("mlp_error", "mlp_error_with_intercept", "mlp_error_more_neurons", "heads_error")
    }
    split = total["mlp_error_more_neurons"] + total["heads_error"]
    # the better of the two spends in each layer (a per-layer axis)
    either = sum(min(r["mlp_error"], r["mlp_error_more_neurons"] + r["heads_error"]) for r in layers)
    bias_gain = (1 - total["mlp_error_with_intercept"] / total["mlp_error"]) * 100
    print(
        f"\nsum over {len(layers)} layers: neurons alone {total['mlp_error']:.4f}; with an intercept "
        f"{total['mlp_error_with_intercept']:.4f} ({bias_gain:.2f}% lower); "
        f"one query head per group and {neurons_per_heads} more neurons {split:.4f} "
        f"({(1 - split / total['mlp_error']) * 100:.1f}% lower); layers where the heads split is better: "
        f"{sum(r['mlp_error_more_neurons'] + r['heads_error'] < r['mlp_error'] for r in layers)} of {len(layers)}; "
        f"the better of the two in each layer {either:.4f} ({(1 - either / total['mlp_error']) * 100:.1f}% lower)"
    )
    result = dict(
        model=name,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        neurons_for_heads=neurons_per_heads,
        totals=dict(total, heads_split=split, better_per_layer=either),
        layers=layers,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
