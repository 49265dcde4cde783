"""The module layering: mlx_gemma's internal imports form no cycle, function-level imports included,
and every module imports in a fresh interpreter in dependency order.

A cycle hidden behind a function-level import works until someone moves that import; this test
reads every module's imports with `ast` (top level and inside functions), builds the graph of
imports between mlx_gemma's own modules and asserts it is acyclic. Only `cli.py` and
`__init__.py` may import lazily for start-up time, and since nothing imports them back they
cannot close a cycle; they are in the graph too.
"""

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import mlx_gemma
import mlx_gemma.convert
import mlx_gemma.data

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
