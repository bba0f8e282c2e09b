"""The package's layers, lowest first, and the check that its imports run one way.

A module may import modules of its own layer or of a lower one, never of a higher one, and no chain of
imports may lead back to where it started (a circle). The stages (data, model, merge, evaluate, search) take
the recipe's sub-specs and the values they use, never the whole `Recipe`. Every import counts, also one
inside a function or under TYPE_CHECKING: each says what a module needs. Registries name their entries by
strings (mergemix.catalog), which are no imports.

    python -m mergemix.layers      # prints the layers and every import that breaks them (exit 1 if any)

tests/test_layers.py runs the same check in the suite.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("errors", "registry", "catalog", "artifacts", "progress", "collective", "feasible",
                    "proposal", "hostmem")),
    ("recipe", ("recipe",)),
    ("data", ("data",)),
    ("model", ("model",)),
    ("merge", ("merge",)),
    ("evaluate", ("evaluate",)),
    ("search", ("search",)),
    ("run", ("run",)),
    ("pipelines", ("pipelines",)),
    ("report", ("report",)),
    ("interface", ("cli", "api", "__main__", "__init__", "layers", "reference")),
)
STAGES = ("data", "model", "merge", "evaluate", "search")

ROOT = Path(__file__).parent


def module_name(path: Path) -> str:
    """`mergemix/search/driver.py` → `mergemix.search.driver`; a package's `__init__.py` → the package."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The index in LAYERS of a module `mergemix.X...` (the package itself is the interface)."""
    parts = module.split(".")
    first = parts[1] if len(parts) > 1 else "__init__"
    for i, (_, members) in enumerate(LAYERS):
        if first in members:
            return i
    raise KeyError(f"{module}: in no layer of mergemix.layers.LAYERS; add it to one")


def _resolve(name: str, known: set[str]) -> str:
    """The module an import of `name` loads: `name` itself, or for `from pkg import sub` the submodule."""
    return name if name in known else name.rsplit(".", 1)[0]


def imports(path: Path, known: set[str]) -> list[tuple[int, str, list[str]]]:
    """(line, module, names taken) of every import of a mergemix module in the file at `path`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("mergemix")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mergemix"):
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            out += [(node.lineno, s, []) for s in subs]
            rest = [a.name for a in node.names if f"{node.module}.{a.name}" not in known]
            if rest:
                out.append((node.lineno, node.module, rest))
    return out


def graph() -> dict[str, list[tuple[int, str, list[str]]]]:
    """module → its imports of mergemix modules (line, module, names)."""
    files = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    known = set(files)
    return {m: [(line, _resolve(name, known), names) for line, name, names in imports(p, known)]
            for m, p in files.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), and self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def problems() -> list[str]:
    """Every import that goes up a layer, every circle, every stage that takes the whole Recipe."""
    g = graph()
    out = []
    for m, deps in sorted(g.items()):
        for line, dep, names in deps:
            if layer_of(dep) > layer_of(m):
                out.append(f"{m}:{line} imports {dep}, a higher layer ({LAYERS[layer_of(dep)][0]} above "
                           f"{LAYERS[layer_of(m)][0]})")
            if LAYERS[layer_of(m)][0] in STAGES and dep == "mergemix.recipe" and "Recipe" in names:
                out.append(f"{m}:{line} takes the whole Recipe; a stage takes its sub-specs")
    for comp in circles({m: {d for _, d, _ in deps} for m, deps in g.items()}):
        out.append(f"circle: {' <-> '.join(comp)}")
    return out


def main() -> int:
    for name, members in LAYERS:
        print(f"{name:<11} {', '.join(members)}")
    found = problems()
    print("\n".join(found) if found else "\nevery import runs one way, no circle")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
