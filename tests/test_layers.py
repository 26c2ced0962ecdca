"""The package's layers import one way only, and no import of a slicegpt module hides inside a function.

base (config, data, memory, _version, arch/) <- core/ <- io/ <- evaluation/ <- training/ <- cli/
(``remote/`` is copied into saved folders and imports slicegpt only through its public API.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import slicegpt

ROOT = Path(slicegpt.__file__).parent
RANK = {"base": 0, "core": 1, "io": 2, "evaluation": 3, "training": 4, "cli": 5}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself re-exports the public API from every layer
        return "api"
    if parts[1] == "__main__":  # `python -m slicegpt` is the command line
        return "cli"
    return parts[1] if parts[1] in RANK else "base"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported slicegpt module, imported inside a function) for every import in a file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.startswith("slicegpt"):
                    if child.module is None or target == package:  # "from . import x": x is a module
                        found.extend((f"{target}.{a.name}", in_function) for a in child.names)
                    else:
                        found.append((target, in_function))
            elif isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.startswith("slicegpt"))
            visit(child, nested)

    visit(tree, False)
    return found


def _files() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if "remote" not in p.parts]


def test_layers_import_one_way_only() -> None:
    wrong = []
    for path in _files():
        me = _layer(_module_name(path))
        if me == "api":
            continue
        for target, _ in _imports(path):
            other = _layer(target)
            if other == "api" and target == "slicegpt":
                wrong.append(f"{_module_name(path)} imports the package root")
            elif other != "api" and RANK[other] > RANK[me]:
                wrong.append(f"{_module_name(path)} ({me}) imports {target} ({other})")
    assert not wrong, "\n".join(wrong)


def test_no_slicegpt_import_hides_inside_a_function() -> None:
    hidden = [f"{_module_name(p)} -> {t}" for p in _files() for t, inside in _imports(p) if inside]
    assert not hidden, "\n".join(hidden)
