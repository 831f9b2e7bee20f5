"""The curate package has no import cycle, and every module imports alone in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import clipforge.curate

PKG = Path(clipforge.curate.__file__).parent
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")


def imports_of(module: str) -> set[str]:
    """curate modules imported anywhere in ``module`` (top level and inside functions)."""
    tree = ast.parse((PKG / f"{module}.py").read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "clipforge.curate":
                out |= {a.name for a in node.names}
            elif node.module.startswith("clipforge.curate."):
                out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("clipforge.curate.")}
    return out & set(MODULES)


def test_no_import_cycle_inside_curate():
    graph = {m: imports_of(m) for m in MODULES}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"import cycle: {' -> '.join([*path, m, n])}"
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [])


def test_each_module_imports_alone():
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module('clipforge.curate.' + m)\n"
    for m in MODULES:  # one fresh interpreter per module: an order-dependent import fails here
        r = subprocess.run([sys.executable, "-c", code, m], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"clipforge.curate.{m}: {r.stderr[-2000:]}"


def test_lazy_exports_resolve():
    import clipforge.curate as c

    for name in c.__all__:
        assert getattr(c, name) is not None
