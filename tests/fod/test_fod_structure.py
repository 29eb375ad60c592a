"""The shape of the code: no import circle among the modules of fod/ and fod_kernels/ (imports inside
functions count: they hide a circle, they do not remove it), and no function in fod/ over 100 lines."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fod", "fod_kernels")
MAX_FUNCTION_LINES = 100


def module_files(root: Path = ROOT) -> dict:
    out = {}
    for pkg in PACKAGES:
        for p in (root / pkg).rglob("*.py"):
            parts = list(p.relative_to(root).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _targets(module: str, is_package: bool, node, modules) -> list:
    """The modules an import statement names (``from . import x``: the module x if there is one, else the
    package whose name x is)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        target = base + ("." + node.module if node.module else "")
    else:
        target = node.module or ""
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]


def import_graph(root: Path = ROOT) -> dict:
    """{module: the package modules it imports anywhere in its file}."""
    modules = module_files(root)
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _targets(name, path.name == "__init__.py", node, modules):
                    while t not in modules and "." in t:  # fod.model.FOD -> fod.model
                        t = t.rpartition(".")[0]
                    if t in modules and t != name:
                        deps.add(t)
        graph[name] = deps
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
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
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def long_functions(root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list:
    out = []
    for path in sorted((root / "fod").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_cycle_finder_finds_a_circle_and_only_circles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
    assert sorted(cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}})) == [["a", "b"], ["c", "d"]]


def test_graph_counts_imports_inside_functions(tmp_path):
    (tmp_path / "fod").mkdir()
    (tmp_path / "fod_kernels").mkdir()
    (tmp_path / "fod" / "__init__.py").write_text("")
    (tmp_path / "fod_kernels" / "__init__.py").write_text("")
    (tmp_path / "fod" / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "fod" / "b.py").write_text("from . import a\n")
    assert cycles(import_graph(tmp_path)) == [["fod.a", "fod.b"]]


def test_no_import_circle():
    graph = import_graph()
    assert "fod.train" in graph and "fod_kernels.functional" in graph
    assert cycles(graph) == []


def test_no_long_function_in_fod():
    assert long_functions() == []


def test_readme_is_a_landing_page_whose_links_resolve():
    """README.md stays a landing page (at most 200 lines); every relative link of it and of docs/*.md names a
    file or folder of the repository."""
    import re
    readme = ROOT / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= 200
    broken = []
    for page in [readme, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []
