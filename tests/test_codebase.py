"""Shape of the code itself: file length and import cycles (checked statically, so they cannot creep back)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "histolight"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _import_edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> histolight modules it imports anywhere (module level or inside functions; not ``if TYPE_CHECKING``).

    Deferred imports count too: a cycle hidden inside a function is still two modules that need each other."""
    edges: dict[str, set[str]] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        typing_only = {
            id(n) for b in ast.walk(tree) if isinstance(b, ast.If) and "TYPE_CHECKING" in ast.unparse(b.test) for n in ast.walk(b)
        }
        deps: set[str] = set()
        for sub in ast.walk(tree):
            if id(sub) in typing_only:
                continue
            targets = []
            if isinstance(sub, ast.Import):
                targets = [a.name for a in sub.names]
            elif isinstance(sub, ast.ImportFrom):
                base = _resolve(mod, path.name == "__init__.py", sub)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in sub.names]
            for t in targets:
                while t and t not in mods:  # `histolight.x.y` where y is a name, not a module
                    t = t.rpartition(".")[0]
                if t.startswith("histolight") and t != mod:
                    deps.add(t)
        edges[mod] = deps
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            # importing a submodule first imports its parent packages: an edge into a package's own child is not a cycle
            if m.startswith(d + "."):
                continue
            if state.get(d) == 1:
                found.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def test_no_source_file_over_the_limit():
    long = {str(p.relative_to(SRC)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by concern): {long}"


def test_no_import_cycles():
    cycles = _cycles(_import_edges(_modules()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"p.x": {"p"}, "p": {"p.x"}}) == []  # a package importing its submodule, and back, at import time
