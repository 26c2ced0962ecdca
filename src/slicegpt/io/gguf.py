"""Export a standard Hugging Face Llama-family folder to a GGUF file (llama.cpp, ollama, LM Studio ...).

Only *standard* checkpoints can be exported: a dense model, or a model sliced in the uniform mode
(one rotation for the whole residual stream, so it is an ordinary model of the same family with a
smaller ``hidden_size``, an explicit ``head_dim`` and rescaled RMSNorm weights). Per-layer sliced
folders need a shortcut matrix on every residual connection, which no standard runtime has.

The file is written with the ``gguf`` package alone (no llama.cpp checkout), one tensor at a time
so that memory stays at one tensor beyond the writer's bookkeeping. The layout follows llama.cpp's
``convert_hf_to_gguf.py``:

Which families can be exported is the family's :class:`~slicegpt.arch.ArchSpec`'s ``gguf_arch``
(llama.cpp's architecture for a standard checkpoint of it; None: not exportable). For the
``llama`` spec (Llama, Mistral, Qwen2, Qwen3):

* ``llama``/``mistral`` become the ``llama`` architecture, whose RoPE rotates interleaved pairs,
  so the rows of q and k are permuted from Hugging Face's half-split layout into pairs;
* ``qwen3`` becomes ``qwen3`` (NeoX RoPE, no permutation, per-head q/k norms);
* ``qwen2`` becomes ``qwen2`` (NeoX RoPE, biases) when ``num_heads * head_dim == hidden_size``.
  llama.cpp's qwen2 graph assumes that equality (its q and o projections are n_embd x n_embd), which
  a sliced model breaks, so a sliced qwen2 is written as ``llama`` instead: the llama graph sizes
  attention by ``key_length`` and reads optional q/k/v biases, and permuting q/k (biases included)
  turns NeoX RoPE into the interleaved RoPE that graph applies. The two are the same function.

``{arch}.attention.key_length``/``value_length`` always carry ``head_dim``, which is how llama.cpp
learns a head size other than ``n_embd / n_head``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..arch import ArchSpec, UnsupportedModelError, spec_for_config, supported_architectures
from .folders import verify_files
from .format import METADATA, read_metadata

log = logging.getLogger(__name__)

#: The block every quantized GGUF type splits a row into, at least: a matrix whose rows are not a
#: multiple of it stays f16 in the file (``compress --gguf`` rounds MLP neurons to it).
QUANT_BLOCK = 32

#: Output types (llama.cpp's names) written here, by the gguf package: the type of the weight
#: matrices; norms and biases stay f32, and a matrix whose rows do not split into the type's
#: blocks is written f16 (as llama.cpp's converter does).
DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
#: Output types made by llama.cpp's own quantizer from an f16 export (its k-quant mixes and
#: importance-free i-quants), through llama-cpp-python: ``pip install 'slicegpt[gguf-quant]'``.
LLAMA_CPP_TYPES = (
    "q2_k",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
    "iq4_nl",
    "iq4_xs",
)
OUTTYPES = DIRECT_TYPES + LLAMA_CPP_TYPES
Dtype = str  # one of OUTTYPES


class ExportError(ValueError):
    """A folder cannot be exported to GGUF (unsupported family, per-layer slicing, odd tokenizer ...)."""


# --------------------------------------------------------------------------- config


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path.parent} is not a Hugging Face model folder (no {path.name})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} is unreadable: {exc}") from exc


def slicing_metadata(config: dict[str, Any], folder: Path) -> dict[str, Any] | None:
    """The folder's slicegpt metadata, read and version-checked by :func:`slicegpt.io.format.read_metadata`;
    None for a folder slicegpt did not write (no ``slicegpt`` key in config.json, no slicegpt.json)."""
    if "slicegpt" not in config and not (folder / METADATA).is_file():
        return None
    return read_metadata(folder)


def _spec(config: dict[str, Any]) -> ArchSpec | None:
    """The family's spec, from a transformers config built of config.json; None if slicegpt has none."""
    from transformers import AutoConfig

    try:
        return spec_for_config(AutoConfig.for_model(**config))
    except (UnsupportedModelError, ValueError):  # ValueError: a model_type transformers does not know
        return None


def exportable_model_types() -> list[str]:
    """The ``model_type`` values whose :class:`~slicegpt.arch.ArchSpec` names a llama.cpp architecture."""
    return [t for t in supported_architectures() if (spec := _spec({"model_type": t})) is not None and spec.gguf_arch]


#: Families whose per-layer budget folders (original basis, a different MLP width per layer)
#: export to llama.cpp's ``deci`` architecture, which reads one feed-forward width per layer.
PER_LAYER_TYPES = ("llama", "mistral")


def per_layer_widths(meta: dict[str, Any] | None) -> list[int | None] | None:
    """The MLP width of each layer of a per-layer folder that kept its basis (no shortcut
    matrices, the residual stream whole); None for any other folder."""
    if meta is None or meta.get("mode") == "uniform":
        return None
    widths = meta.get("widths") or {}
    layers = widths.get("layers") or []
    if not layers or widths.get("embedding") != widths.get("hidden"):
        return None
    if any(w.get("attn_shortcut") or w.get("mlp_shortcut") or w.get("d_out") != widths.get("hidden") for w in layers):
        return None
    return [w.get("mlp") for w in layers]


def check_exportable(config: dict[str, Any], folder: Path) -> ArchSpec:
    """Refuse folders and families llama.cpp would not run like transformers; the family's spec.

    Uniform folders are standard checkpoints; a per-layer budget folder that kept its basis
    (MLP neurons alone, no shortcut matrices) goes to llama.cpp's ``deci`` architecture (Llama
    families); per-layer folders with shortcut matrices have no standard runtime."""
    meta = slicing_metadata(config, folder)
    if meta is not None and meta.get("mode") != "uniform":
        if per_layer_widths(meta) is None:
            raise ExportError(
                f"{folder} is a per-layer sliced folder: its layers need shortcut matrices that no standard runtime "
                "(llama.cpp, GGUF) has; slice with --uniform, or a per-layer budget on MLP neurons alone (--axes mlp), "
                "to get an exportable model"
            )
        if config.get("model_type") not in PER_LAYER_TYPES:
            raise ExportError(
                f"{folder} keeps a different MLP width per layer, which llama.cpp reads (its deci architecture) "
                f"for {', '.join(PER_LAYER_TYPES)} only, not {config.get('model_type')!r}; slice with --uniform "
                "to get an exportable model"
            )
    model_type = config.get("model_type")
    spec = _spec(config)
    if spec is None or spec.gguf_arch is None:
        raise ExportError(
            f"cannot export model_type {model_type!r} to GGUF; supported: {', '.join(exportable_model_types())}"
        )
    if config.get("mlp_bias"):
        raise ExportError("cannot export a model with MLP biases (mlp_bias=true): llama.cpp's llama graph has none")
    if config.get("hidden_act", "silu") != "silu":
        raise ExportError(
            f"cannot export hidden_act={config.get('hidden_act')!r}: llama.cpp's llama-family graphs use SiLU"
        )
    if meta is not None:
        # what load checks, export checks: sizes and sha256 of every weights file as saved
        verify_files(folder, meta)
    return spec


@dataclass
class _Hparams:
    model_type: str
    arch_name: str  # gguf architecture string: llama, qwen2, qwen3
    permute_qk: bool  # llama arch: HF half-split RoPE rows -> interleaved pairs
    hidden: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    rope: dict[str, Any]
    tied: bool
    vocab_size: int
    n_ff_layers: list[int] | None = None  # deci: each layer's MLP width


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 keeps theta and scaling together in rope_parameters; older configs use
    # rope_theta plus an optional rope_scaling dict (with 'type' or 'rope_type').
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" in params:  # per-attention-type form
        params = dict(params["full_attention"])
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    if "rope_theta" not in params:
        params["rope_theta"] = config.get("rope_theta", 10000.0)
    return params


def _hparams(config: dict[str, Any], spec: ArchSpec, per_layer: list[int | None] | None = None) -> _Hparams:
    model_type = config["model_type"]
    hidden = int(config["hidden_size"])
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or hidden // n_head)
    if per_layer is not None:  # a different MLP width per layer: llama's graph with per-layer widths
        arch_name, permute = "deci", True
    elif model_type == "qwen3":
        arch_name, permute = "qwen3", False
    elif model_type == "qwen2" and n_head * head_dim == hidden:
        arch_name, permute = "qwen2", False
    elif spec.gguf_arch == "llama":  # llama, mistral, and qwen2 whose attention width differs from hidden_size
        arch_name, permute = "llama", True  # (see the module's doc)
    else:  # pragma: no cover - a spec naming an architecture this writer does not know
        raise ExportError(f"GGUF architecture {spec.gguf_arch!r} of model_type {model_type!r} has no writer here")
    if head_dim % 2:
        raise ExportError(f"head_dim {head_dim} is odd; RoPE needs an even head size")
    return _Hparams(
        model_type=model_type,
        arch_name=arch_name,
        permute_qk=permute,
        hidden=hidden,
        n_layer=int(config["num_hidden_layers"]),
        n_ff=int(config["intermediate_size"]),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ctx=int(config.get("max_position_embeddings") or 2048),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(_rope_parameters(config)["rope_theta"]),
        rope=_rope_parameters(config),
        # transformers' default for these families is untied when the key is absent
        tied=bool(config.get("tie_word_embeddings", False)),
        vocab_size=int(config["vocab_size"]),
        n_ff_layers=None
        if per_layer is None
        else [int(config["intermediate_size"]) if k is None else int(k) for k in per_layer],
    )


# --------------------------------------------------------------------------- tensors


class _Weights:
    """The folder's safetensors tensors by name, single file or sharded, read lazily."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if single.is_file():
            files = {single}
            self._where: dict[str, Path] = {}
        elif index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
            self._where = {k: folder / v for k, v in weight_map.items()}
            files = set(self._where.values())
        else:
            raise ExportError(f"{folder} has no model.safetensors (or model.safetensors.index.json)")
        try:
            self._handles = {f: safe_open(str(f), framework="pt") for f in sorted(files)}
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
            raise ExportError(
                f"cannot read the weights in {folder}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
            ) from None
        if not self._where:
            (only,) = self._handles.values()
            self._where = {k: single for k in only.keys()}

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)


# Hugging Face module suffix -> gguf.MODEL_TENSOR member name, per layer and outside the layers.
_LAYER_MAP = {
    "input_layernorm": "ATTN_NORM",
    "post_attention_layernorm": "FFN_NORM",
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT",
    "self_attn.q_norm": "ATTN_Q_NORM",
    "self_attn.k_norm": "ATTN_K_NORM",
    "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP",
    "mlp.down_proj": "FFN_DOWN",
}
_GLOBAL_MAP = {"model.embed_tokens": "TOKEN_EMBD", "model.norm": "OUTPUT_NORM", "lm_head": "OUTPUT"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(.+)\.(weight|bias)")
# Buffers some checkpoints carry that are recomputed at load time.
_SKIP_RE = re.compile(r".*rotary_emb\.inv_freq$")


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (or bias) from HF's half-split RoPE layout to llama.cpp's pairs.

    Within each head, HF rotates dimension i with i + head_dim/2; llama.cpp's ``llama`` graph rotates
    2i with 2i+1. Interleaving the two halves makes the same computation (llama.cpp's ``permute``).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_qk` (for reading a GGUF back into HF layout)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class _Item:
    gguf_name: str
    shape: tuple[int, ...]  # the tensor's own shape (torch order: rows, then row length)
    qtype: Any  # gguf.GGMLQuantizationType
    load: Callable[[], torch.Tensor]

    @property
    def byte_shape(self) -> tuple[int, ...]:
        from gguf.quants import quant_shape_to_byte_shape

        return tuple(quant_shape_to_byte_shape(self.shape, self.qtype))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.byte_shape))

    def encode(self) -> np.ndarray:
        """The tensor as written: float32/float16 values, or the type's blocks as bytes."""
        import gguf
        from gguf import quants

        array = self.load().numpy().astype(np.float32)
        if tuple(array.shape) != tuple(self.shape):
            raise ExportError(f"{self.gguf_name}: shape {tuple(array.shape)} differs from the header's {self.shape}")
        if self.qtype == gguf.GGMLQuantizationType.F32:
            return array
        if self.qtype == gguf.GGMLQuantizationType.F16:
            half = array.astype(np.float16)
            if not np.isfinite(half).all():
                raise ExportError(f"{self.gguf_name} overflows float16; export with --outtype f32 or bf16")
            return half
        return quants.quantize(array, self.qtype)


def _qtype(outtype: str) -> Any:
    import gguf

    return {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1,
        "q5_0": gguf.GGMLQuantizationType.Q5_0,
        "q5_1": gguf.GGMLQuantizationType.Q5_1,
    }[outtype]


def _file_type(outtype: str) -> Any:
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
        "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    }[outtype]


def _llama3_rope_factors(hp: _Hparams) -> torch.Tensor:
    # Llama 3.1+ frequency scaling, as llama.cpp's converter computes it into rope_freqs.weight.
    p = hp.rope
    dim, base = hp.head_dim, hp.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = p.get("factor", 8.0)
    low, high = p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old_ctx = p.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _plan_tensors(weights: _Weights, hp: _Hparams, arch: Any, dtype: Dtype) -> list[_Item]:
    import gguf

    allowed = set(gguf.MODEL_TENSORS[arch])
    names = weights.names()
    if not hp.tied and "lm_head.weight" not in names:
        raise ExportError("config says tie_word_embeddings=false but the checkpoint has no lm_head.weight")
    items: list[_Item] = []
    unsplit: list[tuple[str, int, int]] = []  # (tensor, row length, block) written f16 instead

    def add(hf_name: str, key: str, bid: int | None, suffix: str) -> None:
        member = getattr(gguf.MODEL_TENSOR, key)
        if member not in allowed:
            raise ExportError(f"tensor {hf_name} has no place in GGUF architecture {hp.arch_name!r}")
        gguf_name = gguf.TENSOR_NAMES[member].format(bid=bid) + "." + suffix
        shape = weights.shape(hf_name)
        # Norms and biases (1-D) stay float32 whatever the type, as in llama.cpp's converter:
        # they are tiny and the sliced norms carry scales that f16 would round. A matrix whose
        # rows do not split into the type's blocks is written f16.
        qtype = _qtype(dtype) if len(shape) > 1 else gguf.GGMLQuantizationType.F32
        if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            unsplit.append((gguf_name, shape[-1], gguf.GGML_QUANT_SIZES[qtype][0]))
            qtype = gguf.GGMLQuantizationType.F16
        heads = {"ATTN_Q": hp.n_head, "ATTN_K": hp.n_head_kv}.get(key) if hp.permute_qk else None

        def load(hf_name: str = hf_name, heads: int | None = heads) -> torch.Tensor:
            t = weights.get(hf_name).to(torch.float32)
            if heads is not None:
                t = permute_qk(t, heads)
            return t

        items.append(_Item(gguf_name, shape, qtype, load))

    for name in names:
        if _SKIP_RE.fullmatch(name):
            continue
        if m := _LAYER_RE.fullmatch(name):
            bid, module, suffix = int(m[1]), m[2], m[3]
            if module not in _LAYER_MAP or bid >= hp.n_layer:
                raise ExportError(f"unexpected tensor {name}: not part of a standard {hp.model_type} checkpoint")
            add(name, _LAYER_MAP[module], bid, suffix)
        elif (m := _GLOBAL_RE.fullmatch(name)) and m[1] in _GLOBAL_MAP:
            if m[1] == "lm_head" and hp.tied:
                continue  # llama.cpp reuses token_embd when output.weight is absent
            add(name, _GLOBAL_MAP[m[1]], None, m[2])
        else:
            raise ExportError(f"unexpected tensor {name}: not part of a standard {hp.model_type} checkpoint")

    if hp.n_ff_layers is not None:
        # A per-layer folder's norms are weightless (their scales folded into the matrices that
        # read them): llama.cpp's graph multiplies by a norm weight, so it gets ones.
        ones = torch.ones(hp.hidden, dtype=torch.float32)
        for bid in range(hp.n_layer):
            for key in ("ATTN_NORM", "FFN_NORM"):
                name = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, key)].format(bid=bid) + ".weight"
                items.append(_Item(name, (hp.hidden,), gguf.GGMLQuantizationType.F32, lambda: ones))

    rope_type = str(hp.rope.get("rope_type") or "default").lower()
    if rope_type == "llama3":
        factors = _llama3_rope_factors(hp)
        items.append(
            _Item(
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                tuple(factors.shape),
                gguf.GGMLQuantizationType.F32,
                lambda: factors,
            )
        )

    # Tensor order: embeddings, then block by block, the rest last (cosmetic; readers look tensors up by name).
    def order(item: _Item) -> tuple[int, str]:
        m = re.match(r"blk\.(\d+)\.", item.gguf_name)
        return (int(m[1]) if m else (-1 if item.gguf_name.startswith("token_embd") else 1 << 30), item.gguf_name)

    items.sort(key=order)
    got = {i.gguf_name for i in items}
    for bid in range(hp.n_layer):
        for key in (
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ):
            if f"blk.{bid}.{key}.weight" not in got:
                raise ExportError(f"the checkpoint lacks the weights of blk.{bid}.{key} (layer {bid})")
    for key in ("token_embd.weight", "output_norm.weight"):
        if key not in got:
            raise ExportError(f"the checkpoint lacks {key}")
    if unsplit:
        name, row, block = unsplit[0]
        log.warning(
            f"warning: {len(unsplit)} matrices stay f16 in the GGUF, their rows not a multiple of the type's "
            f"{block}-value blocks (e.g. {name}: {row}): slice with `round_to={block}` (compress --gguf does) "
            "for a smaller file"
        )
    return items


# --------------------------------------------------------------------------- tokenizer

# Byte-level BPE pre-tokenizers, recognised from tokenizer.json's structure and mapped to the
# names llama.cpp knows (llama-vocab.cpp). llama.cpp's own converter hashes the token ids of a
# test string instead, which only recognises tokenizers it has seen on the hub; the structure is
# what decides how text is split, and a folder converted from GGUF (like slicegpt's default model)
# can differ from the hub tokenizer it came from.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_REGEXES = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


def _bpe_pre_name(pre: dict[str, Any] | None) -> str:
    steps = (pre.get("pretokenizers") if pre and pre.get("type") == "Sequence" else [pre]) or []
    kinds = [s.get("type") if s else None for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # each digit alone, then GPT-2's regex (SmolLM, SmolLM2)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _SPLIT_REGEXES and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            return _SPLIT_REGEXES[regex]
    raise ExportError(
        f"unsupported tokenizer pre-tokenizer {json.dumps(pre)[:200]}; "
        "known: GPT-2 byte level, SmolLM (digits + byte level), Llama 3 and Qwen2 regex splits"
    )


def _looks_special(token: str) -> bool:
    # Added tokens some models forget to flag as special (llama.cpp's does_token_look_special).
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


@dataclass
class _Vocab:
    model: str  # tokenizer.ggml.model: gpt2 (byte-level BPE) or llama (SentencePiece-style)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    add_space_prefix: bool | None = None


def _vocab(folder: Path, n_vocab: int) -> _Vocab:
    import gguf

    tj = _read_json(folder / "tokenizer.json")
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(
            f"unsupported tokenizer model {model.get('type')!r} (tokenizer.json); only BPE vocabularies are exported"
        )
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {a["id"]: a for a in tj.get("added_tokens") or []}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    if max(vocab.values(), default=-1) >= n_vocab:
        raise ExportError(
            f"the tokenizer has token ids up to {max(vocab.values())} but the model only {n_vocab} embeddings"
        )
    reverse = {i: t for t, i in vocab.items()}
    byte_fallback = bool(model.get("byte_fallback"))

    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):  # embedding rows beyond the tokenizer are padding, as in llama.cpp
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
            # Before the added-token test: some tokenizers list their byte tokens as special added
            # tokens, and llama.cpp decodes a byte token to its byte only when typed BYTE.
            tokens.append(tok)
            types.append(gguf.TokenType.BYTE)
        elif i in added:
            tokens.append(tok)
            special = added[i].get("special") or _looks_special(tok)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)

    if not byte_fallback:
        return _Vocab("gpt2", _bpe_pre_name(tj.get("pre_tokenizer")), tokens, types)

    # SentencePiece-style BPE (Llama 2, Mistral): llama.cpp's SPM tokenizer merges the pair with the
    # highest score first, so a token made by merge number r scores -r: that replays BPE's merge order.
    merges = model.get("merges") or []
    scores = [0.0] * n_vocab
    for rank, pair in enumerate(merges):
        left, right = pair.split(" ", 1) if isinstance(pair, str) else pair
        tid = vocab.get(left + right)
        if tid is not None and scores[tid] == 0.0:
            scores[tid] = -float(rank + 1)
    for i, t in enumerate(types):
        if t != gguf.TokenType.NORMAL:
            scores[i] = 0.0
    text = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")])
    add_space_prefix = (
        '"Prepend"' in text or '"prepend_scheme": "first"' in text or '"prepend_scheme": "always"' in text
    )
    return _Vocab("llama", "default", tokens, types, scores, add_space_prefix)


# --------------------------------------------------------------------------- writer


def _display_name(folder: Path, config: dict[str, Any]) -> str:
    """The model's own name: a compressed folder's name (not its source's), else the model's."""
    if slicing_metadata(config, folder) is not None:
        return Path(folder).resolve().name
    base = str(config.get("_name_or_path") or config.get("_model_name_or_path") or folder.name)
    return Path(base).name or folder.name


def check_output_file(out: str | os.PathLike, overwrite: bool) -> Path:
    """Fail before any work when ``out`` exists and may not be replaced."""
    path = Path(out)
    if path.is_dir():
        raise FileExistsError(f"output path {path} is a folder; give a .gguf file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output file {path} exists; pass --overwrite to replace it")
    return path


def export_gguf(
    folder: str | Path, out: str | Path, *, outtype: str = "f16", overwrite: bool = False, dtype: str | None = None
) -> Path:
    """Write the standard HF Llama-family model in ``folder`` to the GGUF file ``out``; returns ``out``.

    ``outtype`` (llama.cpp's names, :data:`OUTTYPES`) is the type of the weight matrices
    (embeddings included); norms and biases are always f32. :data:`DIRECT_TYPES` are written
    here; :data:`LLAMA_CPP_TYPES` (k-quants) by llama.cpp's own quantizer from an f16 export,
    through llama-cpp-python. The file appears atomically (written beside ``out`` and renamed),
    and an existing ``out`` is replaced only with ``overwrite``. ``dtype``: the old name of ``outtype``.
    """
    outtype = str(dtype or outtype).lower()
    if outtype not in OUTTYPES:
        raise ExportError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    folder = Path(folder)
    out = check_output_file(out, overwrite)
    if outtype in LLAMA_CPP_TYPES:
        quantize = llama_cpp_quantizer()  # before any work: a missing extra is one line
        out.parent.mkdir(parents=True, exist_ok=True)
        base = out.with_name(f".{out.name}.f16-{os.getpid()}-{secrets.token_hex(4)}.gguf")
        try:
            _write_gguf(folder, base, "f16", outtype)
            _atomically(out, lambda tmp: quantize(base, tmp, outtype))
        finally:
            base.unlink(missing_ok=True)
        return out
    _write_gguf(folder, out, outtype, outtype)
    return out


def llama_cpp_quantizer() -> Callable[[Path, Path, str], None]:
    """llama.cpp's quantizer through llama-cpp-python: (f16 GGUF in, GGUF out, type name)."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            "k-quant types (q4_k_m, q5_k_m, q6_k, ...) are made by llama.cpp's own quantizer: "
            "pip install 'slicegpt[gguf-quant]' (llama-cpp-python), or use q8_0, q5_0, q4_0 here"
        ) from None

    def quantize(source: Path, target: Path, outtype: str) -> None:
        import gguf

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(getattr(gguf.LlamaFileType, "MOSTLY_" + outtype.upper()))
        params.nthread = max(1, os.cpu_count() or 1)
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
        if code != 0:
            raise ExportError(f"llama.cpp's quantizer failed on {source} (code {code})")

    return quantize


def _atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Write ``out`` through a hidden name beside it (same file system: the rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_gguf(folder: Path, out: Path, outtype: str, file_type: str) -> None:
    """The GGUF of ``folder`` with weight matrices of ``outtype``, labelled ``file_type``."""
    import gguf

    config = _read_json(folder / "config.json")
    spec = check_exportable(config, folder)
    hp = _hparams(config, spec, per_layer_widths(slicing_metadata(config, folder)))
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == hp.arch_name)
    weights = _Weights(folder)
    items = _plan_tensors(weights, hp, arch, outtype)
    n_vocab = weights.shape("model.embed_tokens.weight")[0]
    vocab = _vocab(folder, n_vocab)

    def write(tmp: Path) -> None:
        # opened by the writer with plain open(), so the file gets the usual umask permissions
        writer = gguf.GGUFWriter(tmp, hp.arch_name)
        try:
            _write_metadata(writer, hp, folder, config, vocab, n_vocab, file_type)
            for item in items:
                if item.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                    dt = np.float32 if item.qtype == gguf.GGMLQuantizationType.F32 else np.float16
                    writer.add_tensor_info(item.gguf_name, item.shape, np.dtype(dt), item.nbytes)
                else:
                    writer.add_tensor_info(
                        item.gguf_name, item.byte_shape, np.dtype(np.uint8), item.nbytes, raw_dtype=item.qtype
                    )
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for item in items:
                writer.write_tensor_data(item.encode())
        finally:
            writer.close()

    _atomically(out, write)


def _context_length(hp: _Hparams, config: dict[str, Any]) -> int:
    # Mistral v0.1 attends through a sliding window; llama.cpp's llama graph attends over the whole
    # context, so the trained context is capped where the two compute the same thing.
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", hp.model_type == "mistral")
    if window and uses_window and int(window) < hp.n_ctx:
        return int(window)
    return hp.n_ctx


def _write_metadata(
    writer: Any, hp: _Hparams, folder: Path, config: dict[str, Any], vocab: _Vocab, n_vocab: int, dtype: Dtype
) -> None:
    import gguf

    # (GGUFWriter writes general.architecture itself.)
    writer.add_type(gguf.GGUFType.MODEL)
    meta = slicing_metadata(config, folder)
    writer.add_name(_display_name(folder, config))
    if meta is not None:
        source = Path(str(meta.get("source_model") or "a model")).name
        writer.add_basename(source)
        settings = meta.get("settings") or {}
        widths = meta.get("widths") or {}
        before, after = meta.get("params_before"), meta.get("params_after")
        method = (
            f"parameter budget {settings.get('target_params')}"
            if meta.get("target_params")
            else f"SliceGPT sparsity {settings.get('sparsity')}"
        )
        writer.add_description(
            f"{source} compressed by slicegpt ({meta.get('mode')}, {method}): "
            + (f"{before / 1e6:.1f}M -> {after / 1e6:.1f}M parameters, " if before and after else "")
            + f"hidden size {widths.get('hidden', hp.hidden)} -> {hp.hidden}, MLP width {hp.n_ff}"
        )
        # provenance, for whoever finds the file alone
        writer.add_string("slicegpt.version", str(meta.get("slicegpt_version")))
        writer.add_string("slicegpt.source_model", str(meta.get("source_model")))
        if meta.get("source_fingerprint"):
            writer.add_string("slicegpt.source_fingerprint", str(meta["source_fingerprint"]))
        writer.add_string("slicegpt.settings", json.dumps(settings, sort_keys=True, default=str))
        if before and after:
            writer.add_uint64("slicegpt.params_before", int(before))
            writer.add_uint64("slicegpt.params_after", int(after))
        if meta.get("recovery"):
            writer.add_string(
                "slicegpt.recovery",
                json.dumps({k: v for k, v in meta["recovery"].items() if k != "curve"}, sort_keys=True, default=str),
            )
    writer.add_file_type(getattr(gguf.LlamaFileType, "ALL_F32" if dtype == "f32" else "MOSTLY_" + dtype.upper()))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_vocab_size(n_vocab)
    writer.add_context_length(_context_length(hp, config))
    writer.add_embedding_length(hp.hidden)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff if hp.n_ff_layers is None else hp.n_ff_layers)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    # The head size, independent of n_embd / n_head: the point of uniform slicing is that these differ.
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)

    rope_type = str(hp.rope.get("rope_type") or "default").lower()
    factor = hp.rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(hp.rope.get("original_max_position_embeddings") or hp.n_ctx))
    elif rope_type not in ("default", "llama3"):  # llama3 is carried by the rope_freqs tensor
        raise ExportError(f"unsupported RoPE scaling {rope_type!r} for GGUF export")
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    # Merges, bos/eos/unk/pad ids, add_bos/add_eos and the chat template, read as llama.cpp does.
    special = gguf.SpecialVocab(folder, load_merges=vocab.model == "gpt2", n_vocab=n_vocab)
    special.add_special_token.update(_adds_special_tokens(folder))
    special.add_to_gguf(writer, quiet=True)


def _adds_special_tokens(folder: Path) -> dict[str, bool]:
    """Whether transformers' tokenizer for ``folder`` puts BOS first / EOS last, asked of it directly.

    SpecialVocab infers this from tokenizer_config.json and simple post-processor templates only,
    and leaves it unset otherwise, when llama.cpp falls back to per-vocabulary defaults that need
    not match (SmolLM2 converted from GGUF adds no BOS; left unset llama.cpp would guess).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tok("Hello world")["input_ids"]
    flags = {"bos": tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id]}
    flags["eos"] = tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id]
    return flags
