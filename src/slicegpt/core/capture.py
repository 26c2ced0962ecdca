"""Capturing what the model hands each decoder layer, so the walk can run one layer at a time.

A recorder stands in for every layer during one forward of the model and keeps the hidden
states layer 0 reads and every other argument each layer receives (masks, positions, rotary
tables, cache arguments). No transformers forward is copied: whatever a new version passes is
passed on as is. Activations stay on the host and travel to the device one batch at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..arch import ArchSpec
from ..data import Rows
from .ops import is_identity
from .pca import Covariance
from .surgery import get_layers, get_path


class _Captured(Exception):
    pass


def _to(obj: Any, device: torch.device | str, memo: dict[int, tuple[Any, Any]] | None = None) -> Any:
    """Move every tensor inside nested tuples/lists/dicts.

    With ``memo``, a tensor met again (layers of one kind share their mask and rotary tables) is
    moved once and shared; the memo keeps the original alive so that its id cannot be reused.
    """
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        hit = memo.get(id(obj))
        if hit is None:
            hit = memo[id(obj)] = (obj, obj.to(device))
        return hit[1]
    if isinstance(obj, tuple):
        return tuple(_to(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _non_layer_modules(model: nn.Module, spec: ArchSpec) -> list[nn.Module]:
    """Everything the model runs before its first layer: the siblings of the layer list."""
    parent_path, _, name = spec.layers.rpartition(".")
    parent = get_path(model, parent_path) if parent_path else model
    return [m for n, m in parent.named_children() if n != name]


@dataclass
class LayerInputs:
    """Calibration inputs, kept on the host, one entry per batch.

    ``hidden`` holds the current layer's input; ``calls[batch][layer]`` the other arguments the
    model hands each layer. They differ between layers where layer kinds differ (Gemma 2/3:
    sliding-window and global layers get different masks and rotary tables).
    """

    hidden: list[torch.Tensor]  # [B, T, width]
    calls: list[list[tuple[tuple, dict[str, Any]]]]
    masks: list[torch.Tensor | None]  # [B, T]
    # The dense model's stream entering the current layer (original basis), when corrections
    # refit writers toward it.
    reference: list[torch.Tensor] | None = None
    # Makes the lists that hold activations (hidden, reference, the dense layer's outputs): host
    # lists, or lists kept on disk (slicegpt.io.offload) for runs whose activations exceed memory.
    store: Callable[[], Any] = list
    # The batch whose rows choose the refits' ridge strengths instead of being fitted on (-1:
    # none here); set by the walk, which knows where these rows sit among all processes' rows.
    held: int = -1

    def new(self, items: Iterable[torch.Tensor] = ()) -> Any:
        """An empty activation list of this run's kind, filled with ``items``."""
        out = self.store()
        for t in items:
            out.append(t)
        return out

    def layer_call(self, layer: int, batch: int, device: torch.device) -> tuple[tuple, dict[str, Any]]:
        args, kwargs = self.calls[batch][layer]
        return _to(args, device), _to(kwargs, device)

    def covariance(self, signal: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> Covariance:
        """The covariance of ``signal`` of the stored hidden states (float64, padding masked)."""
        cov = Covariance(self.hidden[0].shape[-1], device)
        for i, x in stream(self.hidden, device):
            cov.add(signal(x), self.masks[i])
        return cov

    def project(self, q: torch.Tensor, device: torch.device) -> None:
        """Replace every stored batch by its coordinates in the kept basis ``q`` (D, d)."""
        if is_identity(q, q.shape[1]):  # the basis kept: the coordinates are the stored ones
            return
        # activations are kept in the model's dtype: the product runs in it (float32 for half
        # models), the basis being float64 only where the model is
        dtype = torch.float64 if self.hidden[0].dtype == torch.float64 else torch.float32
        q = q.to(dtype)
        for i, x in stream(self.hidden, device):
            self.hidden[i] = (x.to(dtype) @ q).to(x.dtype).cpu()


class _Recorder(nn.Module):
    """Stands in for one decoder layer while capturing: records its arguments, passes x on."""

    def __init__(self, index: int, sink: list, returns_tuple: bool, last: bool) -> None:
        super().__init__()
        self.index, self.sink, self.returns_tuple, self.last = index, sink, returns_tuple, last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.sink.append((self.index, hidden, tuple(args[1:]), kwargs))
        if self.last:  # nothing after the layers is needed: skip the final norm and the head
            raise _Captured
        return (hidden,) if self.returns_tuple else hidden


@torch.inference_mode()
def capture_layer_inputs(
    model: nn.Module, spec: ArchSpec, rows: Rows, batch_size: int, device: torch.device, store: Callable[[], Any] = list
) -> LayerInputs:
    """Run the model with its layers stood in for by recorders; keep what each layer receives.

    The model's own forward computes the hidden states layer 0 reads and every argument it hands
    each layer (masks, positions, rotary embeddings, cache arguments): no transformers forward
    is copied, and whatever a new version passes is passed on as is. The recorders cost nothing,
    and the forward stops at the last one.
    """
    layers = get_layers(model, spec)
    originals = list(layers)
    front = _non_layer_modules(model, spec)
    for m in front:
        m.to(device)
    captured = LayerInputs(store(), [], [], store=store)
    sink: list = []
    for i in range(len(layers)):
        layers[i] = _Recorder(i, sink, spec.layer_returns_tuple, last=i == len(layers) - 1)
    try:
        for ids, mask in rows.batches(batch_size):
            captured.masks.append(mask)
            sink.clear()
            try:
                model(
                    input_ids=ids.to(device),
                    attention_mask=None if mask is None else mask.to(device),
                    use_cache=False,
                )
            except _Captured:
                pass
            if [entry[0] for entry in sink] != list(range(len(layers))):
                raise RuntimeError(
                    f"the model called its layers in an unexpected order: {[entry[0] for entry in sink]}"
                )
            memo: dict[int, tuple[Any, Any]] = {}
            captured.hidden.append(sink[0][1].detach().to("cpu"))
            captured.calls.append([(_to(a, "cpu", memo), _to(k, "cpu", memo)) for _, _, a, k in sink])
    finally:
        sink.clear()
        for i, layer in enumerate(originals):
            layers[i] = layer
        for m in front:
            m.to("cpu")
    return captured


def stream(items: list[torch.Tensor], device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """(batch index, batch on ``device``) for every stored batch."""
    for i, t in enumerate(items):
        yield i, t.to(device)
