"""The package's structure: no import cycles, layers never import the injection code, every
module imports on its own, private dependency APIs stay where they are expected."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "moelora"


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _top_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """moelora modules imported at module level (not inside functions) by ``name``."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    deps = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t in known and t != name:
                deps.add(t)
    return deps


def test_no_import_cycles_in_moelora():
    mods = _modules()
    graph = {n: _top_level_imports(n, p, set(mods)) for n, p in mods.items()}
    # A package __init__ that re-exports its children is not a cycle with them.
    for n in graph:
        graph[n] = {d for d in graph[n] if not n.startswith(d + ".")}
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_layers_and_methods_never_import_the_injection_code():
    """Dependencies point one way: the API (inject, io, hooks, generation) uses the methods and
    layers, never the reverse, also not through the top package."""
    api = ("inject", "io", "hooks", "generation")
    for n, p in _modules().items():
        if not n.startswith(("moelora.layers", "moelora.methods")):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                assert mod.split(".")[-1] not in api and mod != "moelora" \
                    and not any(a.name in api for a in node.names), f"{n} imports {mod or '.' * node.level}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.split(".")[-1] in api or a.name == "moelora" for a in node.names), n


@pytest.mark.parametrize("module", sorted(m for m in _modules() if not m.startswith("moelora.eval.tasks")))
def test_every_module_imports_on_its_own(module):
    res = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
