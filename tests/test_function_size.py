"""No function or method in the installed package is longer than 60 lines (issue #26's rule).

Read with `ast` over every file of `mlx_gemma` (its subpackages and the `convert/` folder that is
installed as `mlx_gemma.convert` included), nested functions and methods counted on their own.
A function's length is `end_lineno - lineno + 1`: from its `def` line to its last line, docstring
and comments included, decorators not. A failure lists `file:function:lines` for each offender:
split it into parts with one job each, not at an arbitrary line.
"""

import ast
from pathlib import Path

import mlx_gemma
import mlx_gemma.convert

MAX_LINES = 60

# Functions over the limit in files another branch owns, each with the reason it waits (delete an
# entry once its function is split; the test fails on an entry that no longer applies).
KNOWN_LONG: dict = {}  # {(file, function): reason}; none today


def package_files() -> list:
    """Every .py file of mlx_gemma and mlx_gemma.convert (a mapped folder), as paths."""
    folders = [Path(p) for p in mlx_gemma.__path__] + [Path(p) for p in mlx_gemma.convert.__path__]
    return sorted({f for folder in folders for f in folder.rglob("*.py")})


def long_functions(path: Path, root: Path) -> list:
    """[(relative file, qualified function name, lines)] for each function over MAX_LINES."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = child.end_lineno - child.lineno + 1
                    if lines > MAX_LINES:
                        found.append((path.relative_to(root).as_posix(), name, lines))
                name += "."
            visit(child, name)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), "")
    return found


def test_lengths_are_measured_from_def_to_last_line(tmp_path):
    """The counter itself: a 61-line function (nested in a method) is caught, a 60-line one is not."""
    body = "\n".join(f"        x{i} = {i}" for i in range(59))
    source = (f"class A:\n    def ok(self):\n{body}\n\n"
              f"    def outer(self):\n        def inner():\n{body.replace('        ', '            ')}\n"
              f"            return 1\n        return inner\n")
    path = tmp_path / "m.py"
    path.write_text(source)
    found = long_functions(path, tmp_path)
    assert ("m.py", "A.outer.inner", 61) in found
    assert ("m.py", "A.outer", 63) in found
    assert not any(name == "A.ok" for _, name, _ in found)


def test_no_function_over_60_lines():
    files = package_files()
    assert any(f.name == "app.py" and f.parent.name == "serve" for f in files)
    assert any(f.name == "gguf.py" for f in files)  # convert/ is read too
    root = Path(mlx_gemma.__path__[0]).parent
    found = [hit for f in files for hit in long_functions(f, root)]
    offenders = [f"{file}:{name}:{lines}" for file, name, lines in found if (file, name) not in KNOWN_LONG]
    assert not offenders, f"functions over {MAX_LINES} lines (split each by job): " + ", ".join(offenders)
    stale = set(KNOWN_LONG) - {(file, name) for file, name, _ in found}
    assert not stale, f"KNOWN_LONG entries no longer over {MAX_LINES} lines, delete them: {sorted(stale)}"
