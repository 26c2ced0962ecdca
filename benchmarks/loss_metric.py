"""An experiment, from outside the package: choose each layer's MLP neurons for the error the loss sees.

The budget method keeps the neurons whose removal its refit can best make up for, the error counted
alike in every direction of the residual stream (each token weighted by its stream's size). The
loss does not read every direction alike. Here one backward pass of the dense model over the
calibration rows gives, at every layer's output, F = E[(r g)(r g)^T] ([D, D]; g the gradient of the
next-token loss there, r the token's stream root mean square, so that the direction alone counts,
the size being the package's token weighting already). The greedy selection then measures the error
in the metric F^(1/2) (normalised to trace D, blended with the identity: ``blend`` 1 is F alone, 0 is
today's choice); the refit itself is unchanged (an unconstrained least-squares fit is the same in
every metric). Only the neurons chosen change.

Used by ``chat_smollm2.py --metric-blend B`` (the job computes F on its own calibration rows, then
installs this around the package's functions for its compression): nothing in the package changes.
"""

from __future__ import annotations

from typing import Any

import torch


def loss_metrics(model: Any, rows: torch.Tensor, batch_size: int = 2) -> torch.Tensor:
    """F for every layer's output ([L, D, D], float64) from one backward pass over ``rows`` ([N, T] ids)."""
    layers = model.model.layers
    d = model.config.hidden_size
    out = torch.zeros(len(layers), d, d, dtype=torch.float64)
    seen: dict[int, torch.Tensor] = {}

    def keep(i: int):
        def hook(_m, _a, o) -> None:
            x = o[0] if isinstance(o, tuple) else o
            x.retain_grad()
            seen[i] = x

        return hook

    hooks = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)  # a graph for the stream's gradients
    tokens = 0
    try:
        for b in range(0, len(rows), batch_size):
            ids = rows[b : b + batch_size]
            loss = model(ids, labels=ids).loss
            (loss * ids[:, 1:].numel()).backward()  # summed over tokens
            for i in range(len(layers)):
                x, g = seen[i].detach().double(), seen[i].grad.double()
                g = (g * x.pow(2).mean(-1, keepdim=True).sqrt()).reshape(-1, d)
                out[i] += g.t() @ g
            tokens += ids.numel()
            model.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
        for p, r in zip(model.parameters(), grads):
            p.requires_grad_(r)
    return out / tokens


def metric_roots(f: torch.Tensor, blend: float) -> torch.Tensor:
    """(blend F / (tr F / D) + (1 - blend) I)^(1/2) for every layer ([L, D, D])."""
    d = f.shape[-1]
    roots = []
    for m in f:
        m = blend * m * (d / m.trace()) + (1 - blend) * torch.eye(d, dtype=m.dtype)
        e, v = torch.linalg.eigh(m)
        roots.append((v * e.clamp_min(0).sqrt()) @ v.t())
    return torch.stack(roots)


def install(roots: torch.Tensor) -> None:
    """Wrap the package's MLP refit and greedy selection (this process only) so that layer i's
    neurons are chosen in the metric ``roots[i]``: the selection's cross moment E[h^T t] ([n, D])
    becomes E[h^T t] roots[i]."""
    from slicegpt.core import corrections, neurons

    layer: list[int] = []
    refit_mlp, greedy = corrections.refit_mlp, neurons.greedy_neurons

    def refit_mlp_at(block, spec, inputs, to_input, targets, keep, device, record, point, *a, **k):
        layer[:] = [int(point.split(".")[1])]  # "layer.{i}.mlp"
        return refit_mlp(block, spec, inputs, to_input, targets, keep, device, record, point, *a, **k)

    def greedy_in_metric(cov, w_ref, k, cross=None, dtype=torch.float64):
        if cross is not None and layer:
            cross = cross @ roots[layer[0]].to(cross.dtype)
        return greedy(cov, w_ref, k, cross=cross, dtype=dtype)

    corrections.refit_mlp = refit_mlp_at
    neurons.greedy_neurons = greedy_in_metric
