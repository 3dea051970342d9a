"""The package's floors (docs/extending.md, "How rltk is built"): no module imports a module on a higher
floor, and no code outside ``rltk.algos`` compares a stage's name. Read from the source, so a new import
anywhere in a function body counts as much as one at the top."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import its own floor and every floor below it
FLOORS = [
    ("ground", ["rltk.schema", "rltk.io", "rltk.describe", "rltk.batching"]),
    ("libraries", ["rltk.algos", "rltk.data", "rewards", "rltk.models", "rltk.engines", "rltk.memory",
                   "rltk.precision"]),
    ("validation", ["rltk.validate", "rltk.eval"]),
    ("trainer", ["rltk.trainer", "rltk.launch_check"]),  # rltk check meets the launch layout the trainer sees
    ("workflows", ["rltk.workflows"]),
    ("cli", ["rltk.cli", "rltk.__main__", "rltk"]),
]


def floor_of(module: str) -> int:
    best, level = -1, None
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    assert level is not None, f"{module} is on no floor: add it to FLOORS"
    return level


def modules():
    for package in ("rltk", "rewards"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path, ast.parse(path.read_text())


def imported(name: str, tree: ast.AST):
    """Every module ``name`` imports; ``from package import module`` counts as importing that module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            for alias in node.names:
                if (ROOT / Path(*node.module.split("."), alias.name + ".py")).is_file():
                    yield f"{node.module}.{alias.name}"


def test_no_module_imports_a_higher_floor():
    violations = []
    for name, path, tree in modules():
        own = floor_of(name)
        for target in imported(name, tree):
            if target.split(".")[0] not in ("rltk", "rewards") or target == "rltk":
                continue
            if floor_of(target) > own:
                violations.append(f"{path.relative_to(ROOT)}: {name} ({FLOORS[own][0]}) imports {target} "
                                  f"({FLOORS[floor_of(target)][0]})")
    assert not violations, "\n".join(violations)


def test_no_import_circles_but_the_stage_registry_bootstrap():
    """Module imports form no circle, except that the registry imports the built-in stages (which
    import the registry to register themselves) the first time a stage is looked up."""
    known = {name for name, _, _ in modules()}
    graph = {}
    for name, _, tree in modules():
        targets = {t for t in imported(name, tree) if t in known and t != name}
        if name == "rltk.algos.registry":
            targets.discard("rltk.algos.builtin")
        graph[name] = targets - ({"rltk.algos"} if name.startswith("rltk.algos.") else set())
    cycles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append(" -> ".join(path[path.index(node):] + [node]))
            return
        if node in done:
            return
        for target in sorted(graph.get(node, ())):
            visit(target, path + [node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
    assert not cycles, "\n".join(cycles)


def test_the_schema_imports_nothing_of_rltk():
    tree = ast.parse((ROOT / "rltk" / "schema.py").read_text())
    assert [t for t in imported("rltk.schema", tree) if t.split(".")[0] in ("rltk", "rewards")] == []


def test_no_stage_name_is_compared_outside_algos():
    """A fact about a stage (uses a group baseline, resamples whole groups, emits answer-SFT weights) is
    declared where the stage is registered, never tested by its name elsewhere: no comparison of a
    ``.name`` with a stage name, and no collection of stage names, outside ``rltk.algos``."""
    from rltk.algos.registry import KINDS, registered

    names = {name for kind in KINDS for name in registered(kind)}

    def stage_names(node) -> list[str]:
        values = node.elts if isinstance(node, (ast.Set, ast.Tuple, ast.List)) else [node]
        return [v.value for v in values if isinstance(v, ast.Constant) and v.value in names]

    found = []
    for name, path, tree in modules():
        if name.startswith("rltk.algos"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Attribute) and s.attr == "name" for s in sides):
                    found += [f"{path.relative_to(ROOT)}:{node.lineno} compares a stage's name with {n!r}"
                              for s in sides for n in stage_names(s)]
            elif isinstance(node, (ast.Set, ast.Tuple, ast.List)) and len(stage_names(node)) >= 2:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} lists stage names {stage_names(node)}")
    assert not found, "\n".join(found)
