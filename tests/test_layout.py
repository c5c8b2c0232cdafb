"""The shape the code promises (README "The code"), checked on the source: only the model
sessions know a model API's wire format, and the product's modules import each other without
cycles (function-level imports included: a cycle hidden in a function is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parent.parent / "server"


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = SERVER.parent.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """Import nodes under `if TYPE_CHECKING:`: never run, so never a cycle."""
    skipped: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skipped.update(ast.walk(inner))
    return skipped


def imports(path: Path) -> set[str]:
    """The server modules `path` imports at run time."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = type_checking_only(tree)
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("server"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if not base.startswith("server"):
                continue
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.add(name if is_module(name) else base)
    found.discard(here)
    return found


def product_graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(SERVER.rglob("*.py"))
            if "testing" not in p.relative_to(SERVER).parts}


def test_only_the_model_sessions_know_a_model_apis_wire_format() -> None:
    graph = product_graph()
    users = {wire: sorted(m for m, deps in graph.items() if wire in deps)
             for wire in ("server.wire.realtime", "server.wire.live")}
    assert users == {"server.wire.realtime": ["server.models.realtime"],
                     "server.wire.live": ["server.models.live"]}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_the_products_modules_import_each_other_without_cycles() -> None:
    graph = product_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the walk found the code
    assert find_cycles(graph) == []


def test_the_checks_can_fail() -> None:
    """The walk sees a feature's imports (relative and absolute), and a cycle is found."""
    found = imports(SERVER / "call" / "features" / "tools.py")
    assert {"server.wire.twilio", "server.models.events", "server.call.features.base"} <= found
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
