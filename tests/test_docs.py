"""The documentation stays true: the CLI reference matches the parser, every relative link and
anchor resolves, and the README's command lines parse."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from slicegpt.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Pages linked before they are written (by work in progress elsewhere): accepted while absent,
# checked like any other once they exist.
PENDING: set[Path] = set()

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _cli_docs():
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_what_the_parser_prints_now():
    module = _cli_docs()
    expected = module.render()
    actual = module.OUT.read_text() if module.OUT.exists() else ""
    assert actual == expected, "docs/cli.md is out of date with slicegpt's --help: run `python scripts/cli_docs.py`"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"[`*~]|<[^>]+>", "", text)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    text = CODE_SPAN.sub("`code`", text)  # code is not a link, and link text may be code
    return LINK.findall(text)


def test_the_documents_exist():
    for doc in DOCS:
        assert doc.is_file(), f"{doc.relative_to(ROOT)} is missing"
    assert (ROOT / "docs" / "cli.md") in DOCS


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        if not dest.exists():
            if dest not in PENDING:
                broken.append(f"{target} (no such file)")
            continue
        if anchor and dest.suffix == ".md" and dest.is_file() and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with that anchor in {dest.relative_to(ROOT)})")
    assert not broken, f"broken links in {doc.relative_to(ROOT)}: " + "; ".join(broken)


def _readme_commands() -> list[str]:
    """Every `slicegpt ...` line in the README's code blocks, comments and continuation lines dropped."""
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("slicegpt "):
                commands.append(line)
    return commands


def test_the_readme_shows_commands():
    assert len(_readme_commands()) >= 3


@pytest.mark.parametrize("line", _readme_commands())
def test_every_readme_command_parses(line):
    try:
        build_parser().parse_args(shlex.split(line)[1:])
    except SystemExit as exc:  # argparse's way of refusing
        pytest.fail(f"README command no longer parses ({exc}): {line}")


def test_architecture_names_every_module():
    """ARCHITECTURE.md stays true to the code: every module under src/slicegpt is named in it
    (its path relative to the package, or its file name in the row of its folder)."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    package = ROOT / "src" / "slicegpt"
    missing = [
        str(p.relative_to(package))
        for p in sorted(package.rglob("*.py"))
        if str(p.relative_to(package)) not in text and f"`{p.name}`" not in text
    ]
    assert not missing, f"ARCHITECTURE.md does not name {', '.join(missing)}"
