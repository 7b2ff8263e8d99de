"""Each constant several parts of bytetune share is defined in one module, and the checks that
read a value as a local path or a ``pypi:`` package are written once: the package's files are
parsed (not imported) and every definition or literal of them is listed."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bytetune"

# name -> the one module (path under bytetune/) that assigns it
HOMES = {
    "INT8_MAX": "kernels/constants.py",
    "IGNORE_INDEX": "kernels/constants.py",
    "DEFAULT_RECIPE": "recipe/schema.py",
    "LOCAL_PATH_PREFIXES": "recipe/schema.py",
    "PYPI_PREFIX": "recipe/schema.py",
}
PATH_PREFIXES = ("/", "./", "../", "~")


def _files():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (a module's, class's or function's)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def definitions() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {name: [] for name in HOMES}
    for name, tree in _files():
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for target in targets:
                if isinstance(target, ast.Name) and target.id in found:
                    found[target.id].append(name)
    return found


def literals(wanted) -> list[str]:
    """``file:line`` of every non-docstring string constant for which ``wanted(value)`` holds,
    and of every tuple of constants that holds all the local-path prefixes (``wanted(tuple)``)."""
    hits = []
    for name, tree in _files():
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                value = node.value
            elif isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts):
                value = tuple(e.value for e in node.elts)
            else:
                continue
            if wanted(value):
                hits.append(f"{name}:{node.lineno}")
    return hits


def _line_of(path: str, text: str) -> str:
    lines = (PACKAGE / path).read_text().splitlines()
    return f"{path}:{next(i for i, line in enumerate(lines, 1) if line.startswith(text))}"


def test_each_shared_constant_is_defined_once():
    found = definitions()
    wrong = {name: where for name, where in found.items() if where != [HOMES[name]]}
    assert not wrong, f"defined elsewhere or more than once (one home each, see HOMES): {wrong}"


def test_path_prefixes_pypi_and_the_default_recipe_are_written_once():
    assert literals(lambda v: isinstance(v, str) and v.startswith("pypi:")) == [
        _line_of("recipe/schema.py", 'PYPI_PREFIX = "pypi:"')]
    assert literals(lambda v: isinstance(v, tuple) and set(PATH_PREFIXES) <= set(v)) == [
        _line_of("recipe/schema.py", "LOCAL_PATH_PREFIXES = (")]
    assert literals(lambda v: v == "smollm2_lora8") == [_line_of("recipe/schema.py", 'DEFAULT_RECIPE = "smollm2_lora8"')]


def test_the_scanner_sees_definitions_and_literals():
    # The walkers themselves, on code they must catch: a docstring is skipped, a literal is not.
    tree = ast.parse('"""doc: pypi:x"""\nA = ("/", "./", "../", "~")\nB = "pypi:y"\n')
    skip = _docstrings(tree)
    constants = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in skip]
    assert "pypi:y" in constants and "doc: pypi:x" not in constants
    assert "kernels/groupwise.py" not in definitions()["INT8_MAX"]
    assert literals(lambda v: v == "ignore_index") == [] and literals(lambda v: v == "bytetune_zeroquant")
