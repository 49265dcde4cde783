"""The module layering: every module sits on one row of ARCHITECTURE.md's picture and imports only
modules on its own row or lower ones; mlx_gemma's internal imports form no cycle, function-level
imports included, and every module imports in a fresh interpreter in dependency order.

A cycle hidden behind a function-level import works until someone moves that import; this test
reads every module's imports with `ast` (top level and inside functions), builds the graph of
imports between mlx_gemma's own modules and asserts it is acyclic. Only `cli.py` and
`__init__.py` may import lazily for start-up time, and since nothing imports them back they
cannot close a cycle; they are in the graph too.
"""

import ast
import re
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import mlx_gemma
import mlx_gemma.convert
import mlx_gemma.data

ARCHITECTURE = Path(__file__).resolve().parents[1] / "ARCHITECTURE.md"

# Edges not yet removed, each with the reason (delete an entry once its edge is gone).
KNOWN_EDGES: set = set()  # (importer, imported) edges a test may excuse; none today


def module_files() -> dict:
    """{module name: file} for every module of mlx_gemma and its subpackages (mapped dirs included)."""
    found = {}

    def walk(package: str, folders):
        for folder in map(Path, folders):
            for path in sorted(folder.glob("*.py")):
                name = package if path.stem == "__init__" else f"{package}.{path.stem}"
                found[name] = path
            for sub in sorted(p for p in folder.iterdir() if (p / "__init__.py").is_file()):
                walk(f"{package}.{sub.name}", [sub])

    walk("mlx_gemma", mlx_gemma.__path__)
    walk("mlx_gemma.convert", mlx_gemma.convert.__path__)  # installed from convert/
    walk("mlx_gemma.data", mlx_gemma.data.__path__)  # installed from data/
    return found


def imported_modules(name: str, path: Path, known: set) -> set:
    """The mlx_gemma modules `name` imports anywhere in its file (`from .x import y` counts as
    x.y when that is a module, else as x)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def import_graph() -> dict:
    files = module_files()
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def test_every_module_is_found():
    graph = import_graph()
    for name in ("mlx_gemma.model", "mlx_gemma.quant.layers", "mlx_gemma.quant.gptq", "mlx_gemma.convert.gguf",
                 "mlx_gemma.training.trainer", "mlx_gemma.loading"):
        assert name in graph
    assert "mlx_gemma.quant.layers" in graph["mlx_gemma.loading"] or "mlx_gemma.quant.quantize" in graph[
        "mlx_gemma.loading"]  # the parser sees `from .quant.quantize import ...`


def test_the_parser_sees_a_function_level_cycle(tmp_path):
    """The check can fail: two modules that import each other inside functions form a cycle."""
    (tmp_path / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "b.py").write_text("def g():\n    from .a import f\n")
    known = {"pkg.a", "pkg.b"}
    graph = {n: imported_modules(n, tmp_path / f"{n[4:]}.py", known) for n in known}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError:
        return
    raise AssertionError("a cycle went unnoticed")


def dependency_order() -> list:
    graph = import_graph()
    for a, b in KNOWN_EDGES:
        graph.get(a, set()).discard(b)
    try:
        return list(TopologicalSorter(graph).static_order())  # each module after what it imports
    except CycleError as exc:
        raise AssertionError(f"import cycle among mlx_gemma modules: {' -> '.join(exc.args[1])}") from None


def test_mlx_gemma_imports_form_no_cycle():
    dependency_order()


def test_every_module_imports_in_a_fresh_interpreter_in_dependency_order():
    order = [name for name in dependency_order() if name != "mlx_gemma.__main__"]
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", script, *order], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def architecture_rows(text: str) -> list:
    """The rows of the picture in ARCHITECTURE.md, top (commands) first: each a list of entries,
    `name.py` / `folder/name.py` for a module, `folder/` for every module under it (parenthesised
    descriptions are skipped)."""
    picture = text.split("```", 2)[1]
    rows: list = []
    for line in picture.splitlines():
        if not line.strip() or set(line.strip()) == {"─"}:
            continue
        if not line.startswith("   "):  # a row label starts a new row
            rows.append([])
        entries = re.sub(r"\([^()]*\)", " ", line)
        rows[-1] += re.findall(r"(?<![\w./])((?:[a-z_0-9]+/)*(?:[a-z_0-9]+\.py|[a-z_0-9]+/))(?![\w/])", entries)
    return rows


def entry_modules(entry: str, names) -> set:
    """The module names an entry of the picture stands for."""
    if entry.endswith("/"):
        package = "mlx_gemma." + entry.rstrip("/").replace("/", ".")
        return {n for n in names if n == package or n.startswith(package + ".")}
    path = entry[:-3].replace("/", ".")
    if path.endswith("__init__"):
        path = path[:-len("__init__")].rstrip(".")
    name = "mlx_gemma" + ("." + path if path else "")
    return {name} & set(names)


def module_rows(rows: list, names) -> tuple:
    """({module: row index}, [entries that name no module]); a file entry wins over its folder's."""
    row_of, stale, by_folder = {}, [], {}
    for index, entries in enumerate(rows):
        for entry in entries:
            found = entry_modules(entry, names)
            if not found:
                stale.append(entry)
            for name in found:
                if entry.endswith("/"):
                    by_folder.setdefault(name, index)
                else:
                    row_of[name] = index
    return {**by_folder, **row_of}, stale


def upward_imports(graph: dict, row_of: dict) -> list:
    """'a (row i) imports b (row j)' for every import that points to a higher row (j < i)."""
    return [f"{a} (row {row_of[a]}) imports {b} (row {row_of[b]})"
            for a, targets in sorted(graph.items()) for b in sorted(targets)
            if a in row_of and b in row_of and row_of[b] < row_of[a]]


def test_every_module_has_a_row_and_imports_only_its_own_row_or_lower():
    graph = import_graph()
    rows = architecture_rows(ARCHITECTURE.read_text(encoding="utf-8"))
    assert len(rows) == 5, [r[:3] for r in rows]  # commands, applications, library, network, foundations
    row_of, stale = module_rows(rows, graph)
    missing = sorted(set(graph) - set(row_of) - {"mlx_gemma.__main__"})
    assert not missing, f"modules missing from ARCHITECTURE.md's rows (add each to its row): {missing}"
    assert not stale, f"ARCHITECTURE.md lists modules that do not exist: {stale}"
    upward = upward_imports(graph, row_of)
    assert not upward, "imports that point to a higher row:\n" + "\n".join(upward)


def test_the_row_check_can_fail():
    """A picture where a foundation imports the network is caught; a file entry beats its folder."""
    text = "```\n top       a.py\n           pkg/\n bottom    b.py (x.py in words is skipped)\n" \
           "           pkg/low.py\n```\n"
    rows = architecture_rows(text)
    assert rows == [["a.py", "pkg/"], ["b.py", "pkg/low.py"]]
    names = {"mlx_gemma.a", "mlx_gemma.b", "mlx_gemma.pkg", "mlx_gemma.pkg.low"}
    row_of, stale = module_rows(rows, names)
    assert row_of == {"mlx_gemma.a": 0, "mlx_gemma.pkg": 0, "mlx_gemma.b": 1, "mlx_gemma.pkg.low": 1} and not stale
    graph = {"mlx_gemma.b": {"mlx_gemma.a"}, "mlx_gemma.a": {"mlx_gemma.pkg.low"}, "mlx_gemma.pkg.low": set()}
    assert upward_imports(graph, row_of) == ["mlx_gemma.b (row 1) imports mlx_gemma.a (row 0)"]
