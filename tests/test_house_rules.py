"""The house rules, checked on the source (no import of qeval itself, so no torch: unit tier).

- sub-packages by stage, dependencies pointing one way (LAYERS, lowest first);
- no import cycle between modules, function-level imports included;
- no import of another module's `_private` names;
- no module over 500 lines; README.md at most 200 lines;
- every package folder is listed in pyproject's `packages` (the wheel ships what it lists).
"""
from __future__ import annotations

import ast
import re
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "qeval"

# Lowest first: a package may import itself and any package before it, never one after it.
LAYERS = ["core", "store", "data", "quant", "models", "eval", "train", "stats", "run", "gates", "bench",
          "report", "cli"]
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every qeval import, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "qeval":
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in MODULES else (mod, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "qeval"]
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package root (qeval/__init__, __main__)
    if parts[1] == "cli":
        return "cli"
    return parts[1] if parts[1] in LAYERS else None


def test_packages_import_downwards_only():
    bad = []
    for name, path in MODULES.items():
        mine = _layer(name)
        if mine is None:
            continue
        for mod, _, line in _imports(name, path):
            theirs = _layer(mod)
            if theirs is not None and LAYERS.index(theirs) > LAYERS.index(mine):
                bad.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {mod} ({theirs})")
    assert not bad, "imports pointing up the layers:\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in MODULES.items():
        for mod, _, _ in _imports(name, path):
            if mod in MODULES and mod != name:
                graph[name].add(mod)
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_import_of_another_modules_private_names():
    bad = []
    for name, path in {**MODULES, **{f"tests.{p.stem}": p for p in (ROOT / "tests").glob("*.py")}}.items():
        for mod, imported, line in _imports(name, path):
            if imported.startswith("_") and not (imported.startswith("__") and imported.endswith("__")) \
                    and mod != name:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}.{imported}")
    assert not bad, "imports of private names:\n" + "\n".join(bad)


def test_no_private_attribute_of_another_qeval_module_is_read():
    # `from qeval.run import cells` then `cells._helper(...)` is the same breach as importing it
    bad = []
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        aliases = {}
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qeval"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for alias, mod in aliases.items():
            for m in re.finditer(rf"\b{re.escape(alias)}\._[a-z]\w*", text):
                bad.append(f"{path.relative_to(ROOT)}: {m.group(0)} ({mod})")
    assert not bad, "\n".join(bad)


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_readme_is_a_front_door():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 200, f"README.md has {n} lines; reference and measurements belong in docs/"


def test_every_package_folder_is_listed_for_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in PKG.rglob("__init__.py")}
    assert folders <= listed, f"package folders missing from pyproject's packages: {sorted(folders - listed)}"


def test_top_level_layout():
    assert (ROOT / "suites" / "default.yaml").is_file() and (ROOT / "suites" / "tasks").is_dir()
    assert not (PKG / "data" / "suites").exists()
