"""Loads a slicegpt per-layer folder through transformers' Auto classes.

This file is copied into every sliced folder so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

works. It holds no model code: the sliced model is the source family's own model with its
decoder layers rewired, rebuilt by the installed ``slicegpt`` package (``pip install slicegpt``).
"""

from transformers import PreTrainedModel


class SlicedForCausalLM(PreTrainedModel):
    """Entry point only: ``from_pretrained`` returns the rebuilt source-family model."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):  # type: ignore[override]
        try:
            import slicegpt
        except ImportError as exc:  # pragma: no cover - the message is the point
            raise ImportError("this is a slicegpt sliced model: pip install slicegpt to load it") from exc
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return slicegpt.load(
            pretrained_model_name_or_path,
            dtype=None if dtype in (None, "auto") else dtype,
            device_map=kwargs.get("device_map"),
        )
