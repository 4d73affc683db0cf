"""The house rules a reader relies on to find their way (issue 24), read from the source with ast:
no import loop inside icl_router (imports inside functions count), no public class name defined
in two modules and no one-letter module aliases."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "platform" / "icl_router"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} of every module of the package under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The package module ``name`` is (or is inside: a name imported from it)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the package modules it imports anywhere in its body, functions included}."""
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]  # a submodule, or a name inside ``base``
            else:
                continue
            for name in names:
                target = _target(name, modules)
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_loop_counting_imports_inside_functions():
    loops = cycles(import_graph(module_files()))
    assert loops == [], f"modules that import each other in a loop: {loops}"


def test_the_loop_check_sees_an_import_inside_a_function(tmp_path):
    pkg = tmp_path / "icl_router"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from icl_router.sub.b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import g\n    return g\n")
    (pkg / "c.py").write_text("import icl_router.a\n")
    assert cycles(import_graph(module_files(pkg))) == [["icl_router.a", "icl_router.sub.b"]]


def test_no_public_class_name_is_defined_in_two_modules():
    where = defaultdict(list)
    for mod, path in module_files().items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where[node.name].append(mod)
    twice = {name: mods for name, mods in where.items() if len(mods) > 1}
    assert twice == {}, f"public class names defined in more than one module: {twice}"


def test_no_one_letter_module_alias():
    found = []
    for mod, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                found += [f"{mod}:{node.lineno} {a.name} as {a.asname}" for a in node.names if a.asname and len(a.asname) == 1]
    assert found == [], "one-letter aliases hide what a name is; import the module by its name: " + "; ".join(found)


MAX_FUNCTION_LINES = 80


def long_functions(modules: dict[str, Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'module.qualified.name (lines)' of every function or method longer than ``limit`` lines, decorators aside."""
    found = []

    def walk(node: ast.AST, mod: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef) and child.end_lineno - child.lineno + 1 > limit:
                    found.append(f"{mod}.{name} ({child.end_lineno - child.lineno + 1})")
                walk(child, mod, f"{name}.")
            else:
                walk(child, mod, prefix)

    for mod, path in modules.items():
        walk(ast.parse(path.read_text()), mod, "")
    return found


def test_no_function_is_longer_than_80_lines():
    assert long_functions(module_files()) == [], "cut these into named steps"


def test_the_length_check_counts_nested_functions_and_methods(tmp_path):
    pkg = tmp_path / "icl_router"
    pkg.mkdir()
    body = "\n".join(f"        x{i} = {i}" for i in range(80))
    (pkg / "m.py").write_text(f"class C:\n    def short(self):\n        return 1\n\n    def long(self):\n{body}\n")
    (pkg / "n.py").write_text("def outer():\n    def inner():\n" + body.replace("        ", "        ") + "\n    return inner\n")
    assert long_functions(module_files(pkg)) == ["icl_router.m.C.long (81)", "icl_router.n.outer (83)", "icl_router.n.outer.inner (81)"]


def test_every_module_is_named_in_the_design_map():
    design = (PACKAGE.parents[1] / "docs" / "design.md").read_text()
    start = design.index("## 6. Layout")
    section = design[start : design.index("\n## ", start + 1)]
    missing = [str(p.relative_to(PACKAGE)) for p in module_files().values() if str(p.relative_to(PACKAGE)) not in section]
    assert missing == [], f"docs/design.md §6 does not name {missing}: add each to the module map"
