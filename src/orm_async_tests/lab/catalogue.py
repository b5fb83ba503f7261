"""The experiments as their source declares them, read without importing them.

``orm-async-tests list`` and ``testN --help`` need each experiment's number,
title, question, sizes and scenarios, not SQLAlchemy, FastAPI or a database:
this module reads them from the module's syntax tree (``ast``), so those
commands start in a fraction of a second. ``tests/test_lab.py`` keeps this
reading equal to what the imported modules register.

Standard library only.
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent.parent
PACKAGE = "orm_async_tests"
MODULE_FILE = re.compile(r"test(\d+)_\w+\.py")
SIZE_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}
"""The types a size may have (each becomes a command-line option)."""


class ExperimentError(TypeError):
    """An experiment module does not follow the shape (the message says how)."""


@dataclass(frozen=True)
class SizeField:
    """One size of an experiment: a command-line option ``--name``."""

    name: str
    type: str
    default: Any
    doc: str


@dataclass(frozen=True)
class Entry:
    """One experiment, as its module's source declares it."""

    number: int
    title: str
    module: str
    path: Path
    question: str
    details: str
    sizes: tuple[SizeField, ...]
    scenarios: tuple[tuple[str, str], ...]
    """``(function name, docstring)`` of each scenario, in order."""

    @property
    def name(self) -> str:
        return f"test{self.number}"


@cache
def catalogue() -> dict[int, Entry]:
    """Every ``testN_*.py`` of the package, by number."""
    found: dict[int, Entry] = {}
    for path in sorted(PACKAGE_DIR.glob("test*_*.py")):
        if not MODULE_FILE.fullmatch(path.name):
            continue
        entry = read(path)
        if entry.number in found:
            raise ExperimentError(
                f"experiment number {entry.number} is declared by {found[entry.number].path.name}"
                f" and {path.name}"
            )
        found[entry.number] = entry
    return dict(sorted(found.items()))


def entry(number: int) -> Entry | None:
    """Experiment ``number`` (reading its module only), or ``None`` if there is none."""
    paths = [p for p in PACKAGE_DIR.glob(f"test{number}_*.py") if MODULE_FILE.fullmatch(p.name)]
    if len(paths) > 1:
        raise ExperimentError(f"two modules for experiment {number}: {paths[0]}, {paths[1]}")
    return read(paths[0]) if paths else None


def _numbered(path: Path, number: int) -> None:
    named = MODULE_FILE.fullmatch(path.name)
    if named is None or int(named.group(1)) != number:
        raise ExperimentError(f"{path.name} declares experiment {number}")


def split_doc(doc: str) -> tuple[str, str]:
    """A module docstring as (question: its first paragraph on one line, the rest)."""
    question, _, details = inspect.cleandoc(doc).partition("\n\n")
    return " ".join(question.split()), details.strip()


def read(path: Path) -> Entry:
    """The experiment that ``path`` declares, from its syntax tree."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    question, details = split_doc(ast.get_docstring(tree) or "")
    declared = _declaration(tree, path)
    variable, number, title, sizes_name = declared
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    sizes: tuple[SizeField, ...] = ()
    if sizes_name is not None:
        if sizes_name not in classes:
            raise ExperimentError(f"{path.name}: the sizes class {sizes_name} is not defined here")
        sizes = _sizes(classes[sizes_name], path)
    scenarios = tuple(
        (node.name, inspect.cleandoc(ast.get_docstring(node, clean=False) or ""))
        for node in tree.body
        if isinstance(node, ast.AsyncFunctionDef) and _is_scenario(node, variable)
    )
    _numbered(path, number)
    return Entry(
        number,
        title,
        f"{PACKAGE}.{path.stem}",
        path,
        question,
        details,
        sizes,
        scenarios,
    )


def _declaration(tree: ast.Module, path: Path) -> tuple[str, int, str, str | None]:
    """``run = experiment(1, "Title", Sizes)``: (run, 1, "Title", "Sizes")."""
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            continue
        call = node.value
        if not (isinstance(call.func, ast.Name) and call.func.id == "experiment"):
            continue
        target = node.targets[0]
        args = call.args
        if not (
            isinstance(target, ast.Name)
            and len(args) in (2, 3)
            and isinstance(args[0], ast.Constant)
            and isinstance(args[0].value, int)
            and isinstance(args[1], ast.Constant)
            and isinstance(args[1].value, str)
            and (len(args) == 2 or isinstance(args[2], ast.Name))
        ):
            raise ExperimentError(
                f"{path.name}:{node.lineno}: declare it as "
                '`run = experiment(N, "Title", Sizes)` with literal N and title'
            )
        sizes = args[2].id if len(args) == 3 and isinstance(args[2], ast.Name) else None
        return target.id, args[0].value, args[1].value, sizes
    raise ExperimentError(f'{path.name}: no `run = experiment(N, "Title", Sizes)` found')


def _sizes(node: ast.ClassDef, path: Path) -> tuple[SizeField, ...]:
    docs = _docs_after_fields(node)
    found = []
    for item in node.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        name = item.target.id
        annotation = ast.unparse(item.annotation).strip("'\"")
        if annotation not in SIZE_TYPES or item.value is None:
            raise ExperimentError(
                f"{path.name}: {node.name}.{name} must be one of {', '.join(SIZE_TYPES)} "
                "with a literal default"
            )
        try:
            default = ast.literal_eval(item.value)
        except ValueError:
            raise ExperimentError(
                f"{path.name}: {node.name}.{name} needs a literal default"
            ) from None
        found.append(SizeField(name, annotation, default, docs.get(name, "")))
    return tuple(found)


def _docs_after_fields(node: ast.ClassDef) -> dict[str, str]:
    docs: dict[str, str] = {}
    for item, after in zip(node.body, [*node.body[1:], None], strict=True):
        if (
            isinstance(item, ast.AnnAssign)
            and isinstance(item.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[item.target.id] = " ".join(after.value.value.split())
    return docs


def class_field_docs(source: str) -> dict[str, str]:
    """The attribute docstrings (a string right after a field) of the class in ``source``."""
    tree = ast.parse(inspect.cleandoc(source))
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            return _docs_after_fields(node)
    return {}


def _is_scenario(node: ast.AsyncFunctionDef, variable: str) -> bool:
    return any(
        isinstance(d, ast.Attribute)
        and d.attr == "scenario"
        and isinstance(d.value, ast.Name)
        and d.value.id == variable
        for d in node.decorator_list
    )
