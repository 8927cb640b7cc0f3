"""The shape of the code base, read from the source with `ast`.

- Dependencies point one way: `keras_moe` (the layer library) <- `keras_moe.models`
  <- `keras_moe.pipelines`, and no two modules import each other, directly or
  through others (imports inside functions count: they are cycles all the same).
- No module imports `keras.src`, and no code outside `keras_moe/_compat.py`
  reads or writes an underscore attribute of an object it does not own
  (`self._x` and `cls._x` are the class's own; NamedTuple's documented
  `_replace`, `_asdict` and `_fields` are public API).
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Source folder -> the import name it installs under (setup.py's package_dir).
PACKAGES = {"keras_moe": "keras_moe", "models": "keras_moe.models",
            "pipelines": "keras_moe.pipelines"}
LAYER = {"keras_moe": 0, "keras_moe.models": 1, "keras_moe.pipelines": 2}
PUBLIC_UNDERSCORE = {"_replace", "_asdict", "_fields", "_make"}


def modules():
    """`{module name: path}` of every module of the three packages."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def package_of(module):
    for package in ("keras_moe.pipelines", "keras_moe.models"):
        if module == package or module.startswith(package + "."):
            return package
    return "keras_moe"


def imported(module, path, known):
    """The project modules `module` imports (anywhere in the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")
                parent = parent if is_package else parent[:-1]
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            # `from package import module` imports the module; `from module
            # import name` the module itself.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        for name in names:
            # The longest known module the name starts with.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {m: imported(m, p, known) for m, p in known.items()}


def test_the_three_packages_hold_the_modules_we_expect():
    names = modules()
    # A few fixed points, so that a broken walk cannot pass the tests below vacuously.
    for name in ("keras_moe.moe", "keras_moe.models.lm", "keras_moe.pipelines.cli",
                 "keras_moe.pipelines.lm.train", "keras_moe.pipelines.translate.train"):
        assert name in names
    assert len(names) > 50


def test_dependencies_point_from_pipelines_to_models_to_the_layer_library(graph):
    wrong = sorted(
        f"{m} imports {d}" for m, deps in graph.items() for d in deps
        if LAYER[package_of(d)] > LAYER[package_of(m)]
    )
    assert wrong == []


def test_no_import_cycles(graph):
    # Tarjan's strongly connected components; any component of two or more is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def private_uses(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n == "keras.src" or n.startswith("keras.src.") for n in names):
                uses.append(f"{path.name}:{node.lineno} imports keras.src")
        elif isinstance(node, ast.Attribute):
            attr = node.attr
            if (attr.startswith("_") and not attr.startswith("__")
                    and attr not in PUBLIC_UNDERSCORE
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                uses.append(f"{path.relative_to(REPO)}:{node.lineno} .{attr}")
    return uses


def test_no_keras_internals_outside_compat():
    uses = []
    for path in modules().values():
        if path.name != "_compat.py":
            uses += private_uses(path)
    # Every private attribute reached from outside its own class lives in _compat.py.
    assert uses == []


def test_the_checker_sees_private_uses(tmp_path):
    # The rule itself, on a file written here: it must flag what it is meant to flag.
    path = tmp_path / "sample.py"
    path.write_text(
        "from keras.src.optimizers import base_optimizer\n"
        "def f(model, routing, self):\n"
        "    model._flatten_layers()\n"
        "    self._ok = routing._replace(a=1)\n",
        encoding="utf-8",
    )
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        found = private_uses(path)
    finally:
        REPO = saved
    assert found == ["sample.py:1 imports keras.src", "sample.py:3 ._flatten_layers"]


def own_private_names(paths):
    """`(used, defined)`: the `self._x`/`cls._x` names read, and those our code defines.

    A name defined nowhere in our code (no `self._x = ...`, no `def _x`, no
    class attribute `_x = ...`) comes from a Keras or TensorFlow base class:
    using it is using that framework's private member.
    """
    used, defined = {}, set()
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in ("self", "cls") and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                if isinstance(node.ctx, ast.Store):
                    defined.add(node.attr)
                else:
                    used.setdefault(node.attr, f"{path.relative_to(REPO)}:{node.lineno}")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Assign):
                defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                defined.add(node.target.id)
    return used, defined


def test_no_private_members_inherited_from_keras():
    used, defined = own_private_names(modules().values())
    inherited = sorted(f"{where} self.{name}" for name, where in used.items()
                       if name not in defined)
    assert inherited == []


def test_the_inherited_member_check_sees_one(tmp_path):
    path = tmp_path / "sample.py"
    path.write_text(
        "class M:\n"
        "    def _mine(self):\n"
        "        self._state = 1\n"
        "        return self._state + self._loss_tracker.result()\n",
        encoding="utf-8",
    )
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        used, defined = own_private_names([path])
    finally:
        REPO = saved
    assert sorted(n for n in used if n not in defined) == ["_loss_tracker"]
