"""The shape of `experiments/`: imports one way (no cycle, lazy imports included), small modules and
functions, one base class for user-facing errors, one reader of what a trial stores."""

import ast
import inspect
import pkgutil
from pathlib import Path

import pytest

import experiments
from registry import MixerlabError

ROOT = Path(experiments.__file__).parent
MAX_MODULE_LINES = 550
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The experiments modules ``name`` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    """A -> B when A imports B, and A -> each package above B that is not above A (importing B runs it)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        edges = set()
        for target in imports_of(name, path, set(mods)):
            edges.add(target)
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in mods and not (name == parent or name.startswith(parent + ".")):
                    edges.add(parent)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_among_experiments_modules():
    graph = import_graph()
    assert "experiments.study.ledger" in graph["experiments.report.records"]  # the graph sees real edges
    assert "experiments.study" in graph["experiments.report.records"]  # and the package a submodule runs
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_lazy_cycle(tmp_path):
    """Two modules importing each other, one lazily inside a function (as measure and probes once did),
    make a cycle the check finds."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from experiments.b import x\n")
    b.write_text("def f():\n    from experiments.a import y\n")
    known = {"experiments", "experiments.a", "experiments.b"}
    graph = {"experiments.a": imports_of("experiments.a", a, known),
             "experiments.b": imports_of("experiments.b", b, known)}
    assert find_cycle(graph) == ["experiments.a", "experiments.b", "experiments.a"]


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_and_functions_are_small(name):
    path = modules()[name]
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path} has {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name} has {length} lines"


def test_every_user_facing_error_derives_from_one_base():
    """Every exception class experiments (and archs, registry) define for users is a MixerlabError, so the
    command's one `except MixerlabError` catches them all."""
    import archs.model
    import archs.pattern
    import archs.positions
    import registry

    mods = [registry, archs.model, archs.pattern, archs.positions]
    for info in pkgutil.walk_packages(experiments.__path__, "experiments."):
        if info.name != "experiments.__main__":
            mods.append(__import__(info.name, fromlist=["_"]))
    errors = {obj for mod in mods for _, obj in inspect.getmembers(mod, inspect.isclass)
              if issubclass(obj, Exception) and obj.__module__ == mod.__name__ and obj.__name__.endswith("Error")}
    assert len(errors) >= 10
    assert [e.__name__ for e in errors if not issubclass(e, MixerlabError)] == []


def test_the_cli_catches_the_base_class_not_names():
    source = (ROOT / "cli" / "__init__.py").read_text()
    assert "except MixerlabError" in source and "__name__" not in source


def test_one_module_reads_what_a_trial_stores():
    """Trial attributes (summary, config, fail reason, ...) are read in the ledger alone; everything else
    reads `TrialRecord`s."""
    hits = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py") if "user_attrs" in p.read_text())
    assert hits == ["study/ledger.py"]
