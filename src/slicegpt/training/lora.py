"""LoRA adapters through peft (an optional extra, imported when used), on the linear layers an
architecture spec names, so every family works without a list of module names per family."""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from ..arch import ArchSpec
from ..config import RecoverConfig

# Which spec fields each target group reads (paths inside one decoder layer).
GROUP_FIELDS = {"attn_in": "attn_inputs", "attn_out": "attn_outputs", "mlp_in": "mlp_inputs", "mlp_out": "mlp_outputs"}


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise ImportError("`train=lora` needs peft: pip install 'slicegpt[finetune]'") from exc
    return peft


def target_names(model: nn.Module, spec: ArchSpec, groups: Iterable[str]) -> list[str]:
    """Full names of the ``nn.Linear`` modules of ``groups`` in every layer (optional paths skipped where absent).

    A group with no linear layer anywhere (fused MoE experts store 3-D parameters) is an error:
    LoRA cannot adapt it.
    """
    names: list[str] = []
    modules = dict(model.named_modules())
    n_layers = len(modules[spec.layers]) if spec.layers in modules else 0
    for group in groups:
        found = []
        for path in getattr(spec, GROUP_FIELDS[group]):
            path = path.rstrip("?")
            for i in range(n_layers):
                name = f"{spec.layers}.{i}.{path}"
                if isinstance(modules.get(name), nn.Linear):
                    found.append(name)
        if not found:
            raise ValueError(f"LoRA target group {group!r} has no linear layer in this {spec.name} model")
        names.extend(found)
    return names


def wrap(model: nn.Module, spec: ArchSpec, config: RecoverConfig) -> nn.Module:
    """``model`` with LoRA adapters (peft), everything else frozen but the shortcut matrices."""
    peft = _peft()
    lora = peft.LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_names(model, spec, config.target_groups),
        bias="none",
    )
    wrapped = peft.get_peft_model(model, lora)
    for name, p in wrapped.named_parameters():
        # The residual path's small matrices are cheap and carry the basis change: trained too.
        if name.endswith(("attn_shortcut", "mlp_shortcut")):
            p.requires_grad_(True)
    return wrapped


def merge(wrapped: nn.Module) -> nn.Module:
    """The base model with the adapters merged into its weights (peft's ``merge_and_unload``)."""
    return wrapped.merge_and_unload()


def save_adapter(wrapped: nn.Module, folder: str) -> None:
    wrapped.save_pretrained(folder)
