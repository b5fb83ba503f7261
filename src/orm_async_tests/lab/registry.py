"""The experiment type, its scenarios and the registry.

An experiment is one module ``testN_<subject>.py`` directly under the package::

    '''Can two tasks, each with its own AsyncSession, ...?      <- the question

    What it does, and its sources (docs, issue threads).
    '''
    @dataclass(frozen=True)
    class Sizes:
        users: int = 200
        '''Users the loader inserts.'''                           <- ``--users N``

    run = experiment(1, "Concurrent loader and dependent reader", Sizes)

    @run.scenario
    async def one_session_per_task(lab: Lab[Sizes]) -> None:
        '''A loader and a reader, one session each, under gather.'''
        ...
        lab.check("users committed", "Every user is committed once.",
                  expected=lab.sizes.users, observed=count)

The module docstring's first paragraph is the question; the scenarios run in
the order they are defined, on one :class:`Lab` (its record is kept per
scenario; ``lab.use(fixture)`` shares what several of them need); the checks are
the answer. :mod:`.catalogue` reads the same facts from the source without
importing it (for ``--help`` and ``list``), and a test keeps the two equal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from .catalogue import SIZE_TYPES, ExperimentError, SizeField, class_field_docs, split_doc
from .checks import shown
from .results import Result, ScenarioResult

if TYPE_CHECKING:
    from ..db import Database
    from .context import Lab

S = TypeVar("S")


class BadSizes(ValueError):
    """Sizes that do not fit together: raised in a ``Sizes.__post_init__`` with the reason
    (``poetry run testN`` shows it as one line, exit status 2)."""


@dataclass(frozen=True)
class NoSizes:
    """The sizes of an experiment that has none."""


@dataclass(frozen=True)
class Scenario(Generic[S]):
    """One step of an experiment: a docstring-led async function of the lab."""

    name: str
    doc: str
    body: Callable[[Lab[S]], Awaitable[None]]

    @property
    def title(self) -> str:
        return self.name.replace("_", " ")


@dataclass
class Experiment(Generic[S]):
    number: int
    title: str
    sizes_type: type[S]
    module: str
    question: str
    details: str
    scenarios: list[Scenario[S]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"test{self.number}"

    @property
    def sizes(self) -> list[SizeField]:
        return size_fields(self.sizes_type)

    def scenario(self, body: Callable[[Lab[S]], Awaitable[None]]) -> Scenario[S]:
        """Register ``body`` as this experiment's next scenario (its docstring says what
        it does)."""
        doc = inspect.cleandoc(body.__doc__ or "")
        if not doc:
            raise ExperimentError(f"{self.name}: scenario {body.__name__} needs a docstring")
        if any(s.name == body.__name__ for s in self.scenarios):
            raise ExperimentError(f"{self.name}: two scenarios named {body.__name__}")
        found = Scenario(body.__name__, doc, body)
        self.scenarios.append(found)
        return found

    def make_sizes(self, overrides: Mapping[str, Any] | None = None) -> S:
        """The sizes with ``overrides``; :class:`BadSizes` when they do not fit together
        (a ``Sizes.__post_init__`` raises it) or name no size."""
        known = {f.name for f in dataclasses.fields(self.sizes_type)}  # type: ignore[arg-type]
        unknown = set(overrides or {}) - known
        if unknown:
            raise BadSizes(f"{self.name} has no size(s) {', '.join(sorted(unknown))}")
        try:
            return self.sizes_type(**dict(overrides or {}))
        except BadSizes as exc:
            raise BadSizes(f"{self.name}: {exc}") from None

    async def run(
        self,
        db: Database,
        sizes: Mapping[str, Any] | None = None,
        *,
        only: Sequence[str] | None = None,
    ) -> Result:
        """Run the scenarios (all, or those named in ``only``) on ``db``, in order."""
        from .context import Lab, Skip

        chosen = self.scenarios if not only else [s for s in self.scenarios if s.name in only]
        missing = set(only or ()) - {s.name for s in self.scenarios}
        if missing:
            raise TypeError(f"{self.name} has no scenario(s) {', '.join(sorted(missing))}")
        values = self.make_sizes(sizes)
        lab = Lab(db, self.number, values)
        result = Result(self.name, self.title, self.question, sizes_of(values))
        result.cell = lab.cell.label()
        started = time.perf_counter()
        try:
            for scenario in chosen:
                part = ScenarioResult(scenario.name, scenario.title, scenario.doc)
                result.scenarios.append(part)
                lab.begin(part)
                begun = time.perf_counter()
                try:
                    await scenario.body(lab)
                except Skip as why:
                    part.skipped = str(why)
                except Exception as exc:
                    part.error = _describe(exc)
                    part.traceback = traceback.format_exc()
                except asyncio.CancelledError as exc:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise  # this run is being cancelled (Ctrl-C): not the scenario's doing
                    part.error = f"CancelledError leaked out of the scenario: {exc}".rstrip(": ")
                    part.traceback = traceback.format_exc()
                finally:
                    part.seconds = time.perf_counter() - begun
        finally:
            lab.begin(None)
            try:
                await lab.close()
            except Exception as exc:
                result.error = f"cleanup: {_describe(exc)}"
                result.traceback = traceback.format_exc()
        result.seconds = time.perf_counter() - started
        return result


def _describe(exc: BaseException) -> str:
    from .outcomes import describe

    return describe(exc)


def size_fields(sizes_type: type[Any]) -> list[SizeField]:
    """The sizes of a ``Sizes`` dataclass: each field needs a default, one of the
    :data:`SIZE_TYPES`; its docstring is the string right after it."""
    if not dataclasses.is_dataclass(sizes_type):
        raise ExperimentError(f"{sizes_type.__name__} must be a dataclass")
    docs = _field_docs(sizes_type)
    found = []
    for f in dataclasses.fields(sizes_type):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "?")
        if annotation not in SIZE_TYPES:
            raise ExperimentError(
                f"{sizes_type.__name__}.{f.name}: a size is one of {', '.join(SIZE_TYPES)}"
            )
        if f.default is dataclasses.MISSING:
            raise ExperimentError(f"{sizes_type.__name__}.{f.name} needs a default")
        found.append(SizeField(f.name, annotation, f.default, docs.get(f.name, "")))
    return found


def _field_docs(sizes_type: type[Any]) -> dict[str, str]:
    """The attribute docstrings of a class (read from its source by :mod:`.catalogue`)."""
    try:
        source = inspect.getsource(sizes_type)
    except (OSError, TypeError):
        return {}
    return class_field_docs(source)


def sizes_of(values: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        return dataclasses.asdict(values)
    return {}


REGISTRY: dict[int, Experiment[Any]] = {}


@overload
def experiment(number: int, title: str) -> Experiment[NoSizes]: ...
@overload
def experiment(number: int, title: str, sizes: type[S]) -> Experiment[S]: ...
def experiment(number: int, title: str, sizes: type[Any] = NoSizes) -> Experiment[Any]:
    """Declare the calling module's experiment ``number`` with its sizes dataclass.

    The question is the module docstring's first paragraph (it must end with "?");
    the rest of the docstring is what the experiment does and its sources.
    """
    caller = sys._getframe(1).f_globals
    module = str(caller.get("__name__", "?"))
    question, details = split_doc(str(caller.get("__doc__") or ""))
    if not question.endswith("?"):
        raise ExperimentError(
            f"experiment {number} ({module}): the module docstring must open with the "
            "question, a paragraph ending with '?'"
        )
    size_fields(sizes)  # the shape is checked at import, not at the first run
    if number in REGISTRY and REGISTRY[number].module != module:
        raise ExperimentError(f"experiment number {number} is taken by {REGISTRY[number].module}")
    found: Experiment[Any] = Experiment(number, title, sizes, module, question, details)
    REGISTRY[number] = found
    return found


def load(module: str) -> Experiment[Any]:
    """Import one experiment module and return the experiment it declares."""
    imported = importlib.import_module(module)
    for value in vars(imported).values():
        if isinstance(value, Experiment) and value.module == module:
            return value
    raise ExperimentError(f"{module} declares no experiment")


def discover() -> dict[int, Experiment[Any]]:
    """Import every ``testN_*`` module of the package; each registers its experiment."""
    from .catalogue import catalogue

    for entry in catalogue().values():
        load(entry.module)
    return dict(sorted(REGISTRY.items()))


def format_sizes(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={shown(v)}" for k, v in values.items())
