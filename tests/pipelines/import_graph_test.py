"""The modules of keras_moe.pipelines import one another without a cycle.

Every import counts, a function's deferred one included: a deferred import
that closes a cycle still ties the two modules into one.
"""

import ast
import pathlib

PIPELINES = pathlib.Path(__file__).resolve().parents[2] / "pipelines"
PACKAGE = "keras_moe.pipelines"


def module_name(path):
    parts = path.relative_to(PIPELINES).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def import_graph():
    """{module: the pipelines modules it imports}, from each file's syntax tree."""
    files = {module_name(path): path for path in PIPELINES.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph):
    """One cycle of `graph` as a list of modules (first == last), or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_find_cycle_on_hand_made_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b2"}, "b2": {"b"}}) == ["b", "b2", "b"]


def test_the_graph_sees_deferred_imports():
    graph = import_graph()
    # translate.train imports translate.export inside `export` only.
    assert f"{PACKAGE}.translate.export" in graph[f"{PACKAGE}.translate.train"]
    assert f"{PACKAGE}.data.vocabulary" in graph[f"{PACKAGE}.data.wordpiece"]


def test_pipelines_modules_import_without_a_cycle():
    assert find_cycle(import_graph()) is None
