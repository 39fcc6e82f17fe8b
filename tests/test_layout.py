"""The package layout: its import graph, read from the source with ast, has no cycle, and the
kernels import nothing above them. Every import counts, at module level or inside a function,
TYPE_CHECKING included: a lazy import hides a cycle, it does not remove it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folders and the package each is installed as (pyproject's package-dir).
SOURCES = {"moa_flex": ROOT / "moa_flex", "moa_flex.passes": ROOT / "passes", "moa_flex.plans": ROOT / "plans"}


def modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of the installed packages."""
    out = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "moa_flex" and parts and parts[0] in ("passes", "plans"):
                continue  # not a folder of the moa_flex package (installed from passes/ and plans/)
            out[name] = path
    return out


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """Absolute name of a relative import ``from <level dots><target> import ...``."""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """moa_flex modules a module imports (with the packages whose __init__ the import runs,
    unless the importer lives inside that package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.level, node.module) if node.level else (node.module or "")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    edges = set()
    for target in found:
        if not target.startswith("moa_flex"):
            continue
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix not in known or prefix == name:
                continue
            if name.startswith(prefix + "."):
                continue  # a package the importer lives in: already being initialized
            edges.add(prefix)
    return edges


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in g.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_every_module_and_known_edges() -> None:
    g = graph()
    assert {"moa_flex", "moa_flex.runtime.compile", "moa_flex.passes.attention_pass", "moa_flex.plans",
            "moa_flex.kernels.decode", "moa_flex.optimize.milp"} <= set(g)
    assert "moa_flex.passes.attention_pass" in g["moa_flex.runtime.compile"]  # module level
    assert "moa_flex.runtime.ops" in g["moa_flex.passes.attention_pass"]
    assert "moa_flex.runtime" in g["moa_flex.passes.attention_pass"]  # the package __init__ it runs
    assert "moa_flex.runtime.compile" in g["moa_flex.optimize.validate"]  # an import inside a function


def test_no_import_cycles() -> None:
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", sorted(n for n in modules() if n.startswith("moa_flex.kernels")))
def test_kernels_import_nothing_above_them(name: str) -> None:
    above = sorted(t for t in graph()[name] if not t.startswith("moa_flex.kernels"))
    assert not above, f"{name} imports {above}; kernels import only torch, triton and each other"


def test_ops_are_registered_in_one_module() -> None:
    """Every torch.library op of the package is defined in moa_flex/runtime/ops.py."""
    where = {}
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if "torch.library.custom_op(" in text or "torch.library.define(" in text:
            where[name] = text.count("torch.library.custom_op(")
    assert list(where) == ["moa_flex.runtime.ops"], where


def test_no_test_module_imports_another() -> None:
    """Shared test code lives in helper modules (tests/tiny_models.py, reference.py,
    conversation.py, ...): importing a test module runs its module-level set-up and ties two
    files' tests together."""
    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name} imports {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert not found, found
