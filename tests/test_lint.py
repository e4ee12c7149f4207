"""The tree stays ruff-clean (lint and format), as configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_ruff_check_and_format():
    for args in (["check", "."], ["format", "--check", "."]):
        res = subprocess.run(
            [sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True
        )
        assert res.returncode == 0, res.stdout + res.stderr


PRODUCT = ("crossmae", "cls", "det", "seg", "tools")
TASK_PACKAGES = ("cls", "det", "seg", "tools")


def imports_of(path) -> set[str]:
    """Top-level names of every module a file imports (lazily imported ones included)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_library_imports_no_task_package_and_tasks_import_no_other():
    """crossmae/ (library and application) names no task package: tasks are found through
    their entry points; each task package imports the library and never another task package."""
    for path in sorted((REPO / "crossmae").rglob("*.py")):
        assert not imports_of(path) & set(TASK_PACKAGES), path
    for package in ("cls", "det", "seg"):
        others = set(TASK_PACKAGES) - {package}
        for path in sorted((REPO / package).rglob("*.py")):
            assert not imports_of(path) & others, path


def test_no_function_is_longer_than_80_lines():
    import ast

    long = []
    for root in PRODUCT:
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1
                    if n > 80:
                        long.append(f"{path.relative_to(REPO)}:{node.name} ({n} lines)")
    assert not long, long


def test_no_import_circle():
    """No file of the product reaches itself through the modules it imports (lazy imports
    included): the layers of docs/architecture.md hold."""
    import ast

    files = {".".join(p.relative_to(REPO).with_suffix("").parts): p
             for root in PRODUCT for p in (REPO / root).rglob("*.py")}  # fmt: skip
    modules = {m.removesuffix(".__init__"): m for m in files}

    def target(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return modules.get(name)

    edges = {}
    for mod, path in files.items():
        package = (
            mod.removesuffix(".__init__") if mod.endswith("__init__") else mod.rsplit(".", 1)[0]
        )
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {target(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                found |= {target(f"{base}.{a.name}") or target(base) for a in node.names}
        edges[mod] = found - {None, mod}

    def reaches(start: str) -> bool:
        seen, todo = set(), list(edges[start])
        while todo:
            m = todo.pop()
            if m == start:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(edges[m])
        return False

    assert not [m for m in edges if reaches(m)]


def test_no_command_example_in_a_docstring_loses_its_line_break():
    """A lone backslash at the end of a line of a (non-raw) docstring joins the two lines, so a
    multi-line command example in ``--help`` prints as one run-on line: it must be ``\\\\``."""
    import io
    import re
    import tokenize

    joined = []
    for pkg in PRODUCT:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
                prefix = re.match(r"[A-Za-z]*", tok.string).group().lower()
                if tok.type == tokenize.STRING and "r" not in prefix and re.search(
                        r"(?<!\\)(\\\\)*\\\n", tok.string):  # fmt: skip
                    joined.append(f"{path.relative_to(REPO)}:{tok.start[0]}")
    assert not joined, joined
