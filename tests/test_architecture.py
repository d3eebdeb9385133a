"""The package's shape: no import circles, no private names imported across modules.

The import graph is read from the source with `ast`, never by importing: every `import` and
`from ... import` statement of a celldsl module counts, at module level and inside functions alike (a
function-level import only delays a circle to the first call; it does not remove it). An edge goes to
the module named; `from package import name` goes to the submodule `package.name` when that is a
module, else to the package's __init__. The implicit import of a module's parent packages is not an
edge (every module would depend on celldsl/__init__.py, which imports only the driver)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "celldsl"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported module, the names taken from it, line) for each celldsl import in a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "celldsl"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "celldsl":
                continue
            names = []
            for a in node.names:
                if f"{target}.{a.name}" in known:
                    found.append((f"{target}.{a.name}", [], node.lineno))
                else:
                    names.append(a.name)
            if names:
                found.append((target, names, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {n: {t for t, _, _ in imports(n, p, known) if t in known and t != n} for n, p in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a found circle."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [cycle_in(c, edges) for c in comps]


def cycle_in(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One concrete circle through the first module of a strongly connected component."""
    start, members = component[0], set(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(edges[path[-1]] & members):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return component


def test_no_import_circles():
    found = circles(graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_private_names_across_modules():
    known = modules()
    bad = [f"{known[n].relative_to(PACKAGE.parent)}:{line}: imports {x} from {t}"
           for n, p in known.items() for t, names, line in imports(n, p, known)
           for x in names if x.startswith("_") and not x.startswith("__")]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_the_graph_sees_imports():
    """The checks above would pass on an empty graph: make sure it holds edges of both kinds."""
    edges = graph()
    assert sum(len(v) for v in edges.values()) > 50
    assert "celldsl.compiler" in edges["celldsl"]


TARGETS = ("torch", "c", "triton")


def test_targets_are_reached_through_their_interface():
    """A target's modules are imported only inside its folder, by the registry (celldsl.targets), by
    the command line (celldsl compile is the Triton target's own tool) and by the exports (the
    standalone C library is the C target's kernels in a file of their own); a target never imports
    another target, nor the layers, the op, the driver or the exports."""
    bad = []
    for a, bs in graph().items():
        own = next((t for t in TARGETS if a.startswith(f"celldsl.targets.{t}")), None)
        for b in bs:
            into = next((t for t in TARGETS if b.startswith(f"celldsl.targets.{t}")), None)
            above = a == "celldsl.targets" or a.startswith(("celldsl.cli.", "celldsl.export."))
            if into and into != own and not above:
                bad.append(f"{a} imports {b}")
            if a.startswith("celldsl.targets") and b.startswith(
                    ("celldsl.nn", "celldsl.ops", "celldsl.compiler", "celldsl.cli", "celldsl.export")):
                bad.append(f"{a} imports {b}")
    assert not bad, "a target reached past its interface:\n" + "\n".join(bad)
