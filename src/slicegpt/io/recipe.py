"""Recipes: the whole run that made a folder, in one YAML file that remakes it.

Every folder ``slice``, ``recover`` and ``compress`` write holds ``recipe.yaml``::

    # Remake this folder: slicegpt compress --recipe recipe.yaml --out DIR
    slicegpt_version: 0.1.0
    model: SmolLM2-135M-Instruct        # as recorded: the default's name, an absolute path, a hub id
    source_fingerprint: 9a0c...         # the weights it was made from (checked when remade)
    slice: {target_params: 0.75, uniform: true, calib: wiki, nsamples: 128, ...}   # SliceConfig
    save_dtype: bfloat16
    recover: {tokens: 2000000, data: self, ...}                                   # RecoverConfig, or absent
    export: {outtype: q4_k_m}                                                     # or absent

``slice`` and ``recover`` take the settings as they are named in :class:`SliceConfig` and
:class:`RecoverConfig` (the single source of every default), so a recipe holds every setting,
defaults included: a later release with other defaults remakes the same run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .._version import __version__
from ..config import RecoverConfig, SliceConfig

RECIPE = "recipe.yaml"


class RecipeError(ValueError):
    """A recipe file is missing, unreadable or names settings that do not exist."""


@dataclass
class Recipe:
    """A whole run: the source model, how it is sliced, saved, recovered and exported."""

    model: str | None
    slice: dict[str, Any]
    save_dtype: str = "auto"
    recover: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    source_fingerprint: str | None = None
    slicegpt_version: str = field(default=__version__)

    def slice_config(self) -> SliceConfig:
        return SliceConfig(**_known(self.slice, SliceConfig, "slice"))

    def recover_config(self) -> RecoverConfig | None:
        return None if self.recover is None else RecoverConfig(**_known(self.recover, RecoverConfig, "recover"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"slicegpt_version": self.slicegpt_version, "model": self.model}
        if self.source_fingerprint:
            out["source_fingerprint"] = self.source_fingerprint
        out["slice"] = dict(self.slice)
        out["save_dtype"] = self.save_dtype
        if self.recover is not None:
            out["recover"] = dict(self.recover)
        if self.export is not None:
            out["export"] = dict(self.export)
        return out

    def write(self, folder: str | os.PathLike) -> Path:
        import yaml

        path = Path(folder) / RECIPE
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)
        path.write_text(
            f"# Remake this folder: slicegpt compress --recipe {RECIPE} --out DIR\n" + text, encoding="utf-8"
        )
        return path


def absolute_sources(source: Any) -> Any:
    """A data source with every file part made absolute (a recipe remakes the run from anywhere)."""
    if not isinstance(source, str):
        return source
    parts = source.split("+")
    return "+".join(str(Path(p).resolve()) if os.path.exists(p) else p for p in parts)


def _known(values: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise RecipeError(
            f"the recipe's {where} section names unknown settings: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(names))})"
        )
    return dict(values)


def read_recipe(path: str | os.PathLike) -> Recipe:
    """The recipe in ``path`` (a recipe.yaml, or a folder holding one), checked setting by setting."""
    import yaml

    path = Path(path)
    if path.is_dir():
        path = path / RECIPE
    if not path.is_file():
        raise RecipeError(f"no recipe at {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"cannot read the recipe {path}: {str(exc).strip().splitlines()[0]}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("slice", {}), dict):
        raise RecipeError(f"{path} is not a slicegpt recipe (a mapping with model, slice, ...)")
    unknown = sorted(set(raw) - {f.name for f in fields(Recipe)})
    if unknown:
        raise RecipeError(f"{path} names unknown sections: {', '.join(unknown)}")
    recipe = Recipe(
        model=raw.get("model"),
        slice=raw.get("slice") or {},
        save_dtype=str(raw.get("save_dtype") or "auto"),
        recover=raw.get("recover"),
        export=raw.get("export"),
        source_fingerprint=raw.get("source_fingerprint"),
        slicegpt_version=str(raw.get("slicegpt_version") or __version__),
    )
    recipe.slice_config()  # every setting checked now, not after the slice
    recipe.recover_config()
    return recipe


def recipe_of(folder: str | os.PathLike, meta: dict[str, Any] | None = None) -> Recipe | None:
    """The recipe a folder holds; for a folder written before recipes, the one its metadata implies."""
    folder = Path(folder)
    if (folder / RECIPE).is_file():
        return read_recipe(folder)
    if meta is None or "settings" not in meta:
        return None
    names = {f.name for f in fields(SliceConfig)}
    return Recipe(
        model=meta.get("source_model"),
        slice={k: v for k, v in meta["settings"].items() if k in names},
        source_fingerprint=meta.get("source_fingerprint"),
    )
