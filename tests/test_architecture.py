"""The house rules, checked on the source: no import cycle in facecli/, short functions,
cli.py only assembling the app, and no code outside losses.py asking which loss it holds.

Each rule reads the code (AST), so it runs in milliseconds and names the offender.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO, cli

PACKAGE = REPO / "facecli"
MAX_FUNCTION_LINES = 60
MAX_CLI_LINES = 200


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports; every import statement counts, at any depth (lazy ones too)."""
    modules = {_module_name(root, p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    graph[module].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, successors = work[-1]
            w = next(successors, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def long_functions(root: Path, limit: int) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({length} lines)")
    return out


def loss_class_checks(root: Path) -> list[str]:
    """``isinstance(x, SomeLoss)`` outside losses.py: the engine should ask a loss's declared capabilities instead."""
    import facecli.losses as losses

    concrete = {cls.__name__ for cls in (*losses.LOSSES.values(), *losses.HEADS.values())}  # the registered losses
    out = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "losses.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance" and len(node.args) == 2:
                classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
                for cls in classes:
                    name = cls.attr if isinstance(cls, ast.Attribute) else getattr(cls, "id", None)
                    if name in concrete:
                        out.append(f"{path.relative_to(root.parent)}:{node.lineno} isinstance(..., {name})")
    return out


def test_no_import_cycles_in_facecli():
    assert cycles(import_graph(PACKAGE)) == []


def test_no_function_over_60_lines():
    assert long_functions(PACKAGE, MAX_FUNCTION_LINES) == []


def test_cli_only_assembles_the_app():
    lines = len((PACKAGE / "cli.py").read_text().splitlines())
    assert lines <= MAX_CLI_LINES, f"facecli/cli.py has {lines} lines: commands belong in facecli/commands/"
    imported = {m for m, deps in import_graph(PACKAGE).items() if "facecli.cli" in deps}
    assert imported <= {"facecli.__main__"}, f"these import facecli.cli (commands never do): {sorted(imported)}"


def test_no_isinstance_on_a_concrete_loss_outside_losses_py():
    assert loss_class_checks(PACKAGE) == []


def test_the_cli_builds_only_the_derived_command_it_runs_and_that_once(monkeypatch):
    """train/resume/demo compute their flags from the registries: never for another command, once for their own."""
    from facecli.commands import training

    built = []
    for name, (body, builder) in list(training.COMMANDS.items()):
        monkeypatch.setitem(training.COMMANDS, name, (body, lambda builder=builder, name=name: built.append(name) or builder()))
    listing = cli("--help")
    assert listing.exit_code == 0 and "train" in listing.output and "Continue a run" in listing.output and built == []
    assert cli("info", "missing.pt").exit_code == 2 and built == []
    assert "--margin" in cli("train", "--help").output and built == ["train"]


def test_the_rules_see_what_they_forbid(tmp_path):
    """Each checker finds a planted offence (so an empty answer above means something)."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n")  # lazy, inside a function
    (pkg / "sub" / "b.py").write_text("from .. import a\n" + "def long():\n" + "    x = 1\n" * 61)
    (pkg / "c.py").write_text("from pkg.a import f\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.sub.b"]]
    assert long_functions(pkg, MAX_FUNCTION_LINES) == ["pkg/sub/b.py:2 long (62 lines)"]
    (pkg / "d.py").write_text("from facecli import losses\ndef g(h):\n    return isinstance(h, losses.CurricularFace) or isinstance(h, (int, ArcFace))\n")
    assert loss_class_checks(pkg) == ["pkg/d.py:3 isinstance(..., CurricularFace)", "pkg/d.py:3 isinstance(..., ArcFace)"]
