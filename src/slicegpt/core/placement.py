"""Where each layer lives when one process uses several devices (``--device-map``).

A model too large for one accelerator is spread over several: layer ``i`` is calibrated and
sliced on the device that holds it and stays there; the embeddings sit with the first layer, the
final norm and an untied head with the last. The sliced (or dense) model is then *dispatched*:
accelerate's hooks move the hidden states from one device to the next, so it runs as one model
(perplexity, zero-shot tasks, saving). Calibration activations stay on the host and travel to
each layer's device one batch at a time, as with one ``--device``.

The spec says which modules are the layers, embeddings, final norm and head, so every family is
placed the same way. ``accelerate`` is imported only when a model is dispatched over more than one
device.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from ..arch import ArchSpec, spec_for_config
from ..config import check_device, parse_device_map
from .surgery import get_layers, is_tied


def spread(n: int, devices: Sequence[torch.device]) -> list[torch.device]:
    """``n`` layers over ``devices`` in order, in contiguous runs whose sizes differ by at most one
    (the first devices take the extra layers)."""
    if not devices:
        raise ValueError("no devices to spread the layers over")
    k = len(devices)
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    return [dev for dev, size in zip(devices, sizes) for _ in range(size)]


def _hf_device(value: Any) -> torch.device:
    """A device as ``hf_device_map`` writes it: 0 (a CUDA index), 'cuda:1', 'cpu', 'mps', 'disk'."""
    if isinstance(value, int):
        return torch.device("cuda", value)
    if value == "disk":  # offloaded weights are loaded back to the host
        return torch.device("cpu")
    return torch.device(value)


def _lookup(hf_map: dict[str, Any], path: str) -> Any:
    """The entry of ``hf_map`` for module ``path``: the longest key equal to it or a prefix of it."""
    best = None
    for key in hf_map:
        if key == "" or path == key or path.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
    if best is None:
        raise ValueError(f"the model's hf_device_map does not place {path}")
    return hf_map[best]


def layer_devices(
    model: nn.Module, spec: ArchSpec, device_map: str | None, device: str | torch.device
) -> list[torch.device]:
    """The device each layer is processed on: ``device`` for all without a map; with 'auto', the
    devices of the model's own ``hf_device_map`` (loaded with ``device_map=...``) or else every
    CUDA device; with a list, those devices."""
    n = len(get_layers(model, spec))
    wanted = parse_device_map(device_map)
    if wanted is None:
        return [check_device(device)] * n
    if wanted == "auto":
        hf_map = getattr(model, "hf_device_map", None)
        if hf_map:
            return [check_device(_hf_device(_lookup(hf_map, f"{spec.layers}.{i}"))) for i in range(n)]
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                "`device_map=auto` spreads the layers over the CUDA devices, and this machine has none; "
                "use `device` (or name the devices: `device_map=cpu`)"
            )
        return spread(n, [torch.device("cuda", i) for i in range(count)])
    return spread(n, [check_device(name) for name in wanted])


def module_map(model: nn.Module, spec: ArchSpec, devices: Sequence[torch.device]) -> dict[str, str]:
    """accelerate's ``device_map`` for ``model``: layer i on ``devices[i]``, the embeddings and
    whatever else runs before the layers on the first device, the final norm on the last, the head
    on the last (on the first when it shares the embeddings' weight). Every module path is named
    once, outermost first, so the map covers every parameter and buffer of the model."""
    first, last = str(devices[0]), str(devices[-1])
    fixed: dict[str, str] = {f"{spec.layers}.{i}": str(d) for i, d in enumerate(devices)}
    fixed[spec.final_norm] = last
    fixed[spec.head] = first if is_tied(model, spec) else last
    for path in spec.embeddings:
        fixed[path] = first
    out: dict[str, str] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        if any(True for _ in module.named_parameters(recurse=False)) or any(
            True for _ in module.named_buffers(recurse=False)
        ):
            raise ValueError(
                f"{prefix or 'the model'} holds tensors of its own beside its layers: it cannot be dispatched by module"
            )
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path in fixed:
                out[path] = fixed[path]
            elif any(key.startswith(path + ".") for key in fixed):
                visit(child, path + ".")  # holds the layers (or the head): place its children one by one
            else:
                out[path] = first

    visit(model, "")
    return out


def is_dispatched(model: nn.Module) -> bool:
    """Does ``model`` carry accelerate's device hooks (loaded or dispatched with a device map)?"""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


def undispatch(model: nn.Module) -> None:
    """Remove accelerate's hooks and bring every weight to the host, where slicing starts. A model
    whose weights were offloaded (meta tensors, read back by the hooks) is refused in one line."""
    if is_dispatched(model):
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(model, recurse=True)
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(
            f"the model's weight {meta} is not in memory (offloaded with device_map?): load it without "
            "offloading, or slice its folder with streaming (slicegpt slice MODEL)"
        )
    model.to("cpu")


def dispatch(model: nn.Module, spec: ArchSpec, devices: Sequence[torch.device]) -> nn.Module:
    """Place ``model`` as :func:`module_map` says and make it run across the devices (accelerate's
    hooks move each module's inputs to its device). ``devices``: one per layer, as
    :func:`layer_devices` gives them; a single device (no map) just moves the model there."""
    if len(devices) == 1:
        return model.to(devices[0])
    from accelerate import dispatch_model

    placed = module_map(model, spec, devices)
    # Hooks even where every name is one device ('cpu,cpu'): the same path as two GPUs, so that it
    # is what the CPU tests exercise. The logits come back on the first device, where the inputs were.
    # accelerate warns of weights "offloaded to the cpu" whenever the map names the host; with the
    # host as main device nothing is offloaded, so that warning is silenced.
    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    if devices[0].type == "cpu":
        log.setLevel(logging.ERROR)
    try:
        return dispatch_model(model, device_map=placed, main_device=str(devices[0]), force_hooks=True)
    finally:
        log.setLevel(level)


def spread_model(model: nn.Module, device_map: str, device: str | torch.device) -> list[torch.device]:
    """Dispatch ``model`` (dense or sliced) over the devices ``device_map`` names, to run it across
    them; the device of each layer (:func:`layer_devices`)."""
    spec = spec_for_config(model.config)
    devices = layer_devices(model, spec, device_map, device)
    dispatch(model, spec, devices)
    return devices
