"""Model cards: a README.md in every output folder, ready for ``hf upload`` as it stands.

Hugging Face metadata first (base_model, library_name, tags, pipeline_tag, license carried from
the source when known), then in plain words what was done (method, parameters before and after,
widths, calibration and recovery data with their hashes), every measured result the run or a
later ``slicegpt eval --update-card`` produced, how to load it (transformers, llama.cpp), and
the command that remakes it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .format import is_standard
from .models import DEFAULT_MODEL_NAME, default_model_gguf, find_gguf
from .recipe import RECIPE

CARD = "README.md"
RESULTS = "results.json"  # the measured results a card shows, kept beside it


def source_license(name: str | None) -> str | None:
    """The source model's license, where it says: a GGUF's general.license, a folder's README front matter."""
    if not name:
        return None
    path = Path(name)
    try:
        gguf_file = (
            default_model_gguf()
            if name == DEFAULT_MODEL_NAME and not path.exists()
            else (find_gguf(path) if path.exists() else None)
        )
    except ValueError:
        gguf_file = None
    if gguf_file is not None:
        import gguf

        try:
            field = gguf.GGUFReader(gguf_file).fields.get("general.license")
            return str(field.contents()) if field is not None else None
        except Exception:  # noqa: BLE001 - an unreadable header: unknown
            return None
    card = path / CARD if path.is_dir() else None
    if card is not None and card.is_file():
        m = re.search(r"^---\s*\n(.*?)\n---", card.read_text(encoding="utf-8", errors="replace"), re.S | re.M)
        if m:
            lic = re.search(r"^license:\s*(\S+)", m.group(1), re.M)
            return lic.group(1).strip("'\"") if lic else None
    return None


def _front_matter(meta: dict[str, Any], license_: str | None) -> str:
    base = meta.get("source_model")
    lines = ["---"]
    if base and not os.path.isabs(str(base)):
        lines.append(f"base_model: {base}")
    lines += ["library_name: transformers", "pipeline_tag: text-generation"]
    if license_:
        lines.append(f"license: {license_}")
    tags = ["slicegpt", "pruned", "compressed", meta.get("model_type") or ""]
    if not is_standard(meta):
        tags.append("custom_code")
    if meta.get("recovery"):
        tags.append("distillation")
    lines.append("tags:")
    lines += [f"- {t}" for t in tags if t]
    lines.append("---")
    return "\n".join(lines)


def _what(meta: dict[str, Any]) -> list[str]:
    settings = meta.get("settings") or {}
    widths = meta.get("widths") or {}
    before, after = meta.get("params_before"), meta.get("params_after")
    out = []
    if meta.get("target_params"):
        axes = ", ".join((meta.get("allocation") or {}).get("axes") or [])
        out.append(
            f"- **Method**: slicegpt's parameter budget ({axes}): at most {meta['target_params']:,} parameters, "
            + (
                "one rotation for the whole network, a standard checkpoint"
                if meta.get("mode") == "uniform"
                else "per-layer widths"
            )
            + ("; closed-form corrections refit each branch's output" if meta.get("corrections") else "")
            + "."
        )
    else:
        out.append(
            f"- **Method**: SliceGPT (Ashkboos et al., ICLR 2024), {meta.get('mode')}, sparsity "
            f"{settings.get('sparsity')}."
        )
    if before and after:
        out.append(
            f"- **Parameters**: {before / 1e6:.2f}M as shipped -> {after / 1e6:.2f}M "
            f"({100 * (1 - after / before):.1f}% removed; tied weights counted once)."
        )
    neurons = (meta.get("allocation") or {}).get("mlp_neurons_per_layer")
    out.append(
        f"- **Widths**: residual stream {widths.get('hidden')} -> {widths.get('embedding')}"
        + (
            f"; MLP neurons per layer {min(neurons)}-{max(neurons)}"
            if neurons
            else f"; MLP neurons {(meta.get('allocation') or {}).get('mlp_neurons') or 'all'}"
        )
        + "."
    )
    out.append(
        f"- **Calibration**: `{settings.get('calib')}`, {settings.get('nsamples')} rows of {settings.get('seqlen')} "
        f"tokens ({meta.get('calibration_tokens'):,} tokens, sha256 `{str(meta.get('calibration_sha256'))[:16]}`)."
    )
    rec = meta.get("recovery")
    if rec:
        s = rec.get("settings") or {}
        out.append(
            f"- **Recovery**: {rec.get('loss')} loss, {rec.get('train')} weights, {rec.get('tokens'):,} tokens of "
            f"`{rec.get('data')}` ({rec.get('steps')} steps, {rec.get('seconds', 0) / 60:.0f} min)"
            + (f", teacher `{rec.get('teacher')}`" if rec.get("teacher") else "")
            + (f", training data sha256 `{rec['data_sha256'][:16]}`" if rec.get("data_sha256") else "")
            + (f"; loss on {s.get('loss_on')} tokens" if s.get("loss_on") not in (None, "auto") else "")
            + "."
        )
    out.append(
        f"- **Made with**: slicegpt {meta.get('slicegpt_version')}"
        + (f", from weights with fingerprint `{meta['source_fingerprint']}`" if meta.get("source_fingerprint") else "")
        + "."
    )
    return out


def _results(results: dict[str, Any]) -> list[str]:
    if not results:
        return [
            "No measurement yet: `slicegpt eval THIS_FOLDER --ppl wiki,lambada --chat --update-card` adds them here."
        ]
    out = ["| measure | this model | source model |", "|---|---:|---:|"]
    for name, row in results.items():
        ours, theirs = row.get("model"), row.get("source")
        fmt = (
            (lambda v: "" if v is None else f"{100 * v:.1f}%")
            if row.get("percent")
            else (lambda v: "" if v is None else f"{v:.3g}")
        )
        out.append(f"| {name} | {fmt(ours)} | {fmt(theirs)} |")
    return out


def write_card(folder: str | os.PathLike, meta: dict[str, Any], *, results: dict[str, Any] | None = None) -> Path:
    """Write (or rewrite) the folder's model card; ``results`` join the measured ones kept beside it
    ({measure: {"model": x, "source": y, "percent": bool}})."""
    folder = Path(folder)
    known = json.loads((folder / RESULTS).read_text()) if (folder / RESULTS).is_file() else {}
    known.update(results or {})
    if known:
        (folder / RESULTS).write_text(json.dumps(known, indent=2) + "\n")
    name = folder.resolve().name
    source = meta.get("source_model") or "its source model"
    load_hf = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f'model = AutoModelForCausalLM.from_pretrained("{name}"'
        + (")" if is_standard(meta) else ", trust_remote_code=True)")
        + f'\ntokenizer = AutoTokenizer.from_pretrained("{name}")'
    )
    llama = (
        "slicegpt export . --gguf model.gguf --outtype q4_k_m   # then: llama-cli -m model.gguf"
        if is_standard(meta)
        else "# per-layer widths: transformers with trust_remote_code=True, or slicegpt.load(FOLDER)"
    )
    text = "\n".join(
        [
            _front_matter(meta, source_license(meta.get("source_model"))),
            "",
            f"# {name}",
            "",
            f"`{Path(str(source)).name}` compressed after training by slicegpt: rows and columns of its weights "
            "deleted after a rotation by the principal components of its activations (SliceGPT)"
            + (", MLP neurons pruned with closed-form corrections" if meta.get("target_params") else "")
            + ", so that it is smaller and faster with no special kernels.",
            "",
            "## What was done",
            "",
            *_what(meta),
            "",
            "## Measured",
            "",
            *_results(known),
            "",
            "## Use it",
            "",
            "```python",
            load_hf,
            "```",
            "",
            "```",
            llama,
            "```",
            "",
            "## Remake it",
            "",
            "```",
            f"slicegpt compress --recipe {RECIPE} --out {name}",
            "```",
            "",
            f"`{RECIPE}` holds every setting of the run; the source model is checked against the fingerprint recorded.",
            "",
        ]
    )
    path = folder / CARD
    path.write_text(text, encoding="utf-8")
    return path
