"""The package's layering: imports point one way (no cycle), and only the edge imports the edge."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "project"
EDGE = {"commands", "cli", "__main__"}  # parse, call one function, print, exit


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports anywhere (module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("project."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("project."))
    return names


def import_graph() -> dict[str, set[str]]:
    return {path.stem: project_imports(path) for path in PACKAGE.glob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None."""
    done, on_path = set(), []

    def visit(module: str) -> list[str] | None:
        if module in on_path:
            return on_path[on_path.index(module):] + [module]
        if module in done:
            return None
        on_path.append(module)
        for target in sorted(graph.get(module, ())):
            if cycle := visit(target):
                return cycle
        on_path.pop()
        done.add(module)
        return None

    return next((c for m in sorted(graph) if (c := visit(m))), None)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_project_imports_have_no_cycle():
    graph = import_graph()
    assert {"model", "checkpoint", "hf", "commands"} <= set(graph)  # the walk sees the package
    assert find_cycle(graph) is None


def test_only_the_edge_imports_the_edge():
    offenders = {module: sorted(targets & EDGE) for module, targets in import_graph().items()
                 if module not in EDGE and targets & EDGE}
    assert not offenders
