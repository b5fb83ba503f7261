"""The lab: everything an experiment module uses, and nothing it should repeat.

An experiment imports its toolbox from here::

    from .lab import Lab, at_least, describe, experiment, prefix

- :mod:`.registry` — ``experiment(N, "Title", Sizes)`` and ``@run.scenario``;
- :mod:`.context` — :class:`Lab`: the database, the sizes, ``check``/``figure``/
  ``note``/``skip``, engine presets (``engine_with``, ``one_connection``,
  ``unpooled``), fixtures (``lab.use``);
- :mod:`.checks` — the comparators (``at_least(1)``, ``prefix("InterfaceError")``,
  ``between(a, b)``, ``one_of(...)``, ``each(...)``, ``where(rule, predicate)``);
- :mod:`.outcomes` — ``describe(exc)``, ``outcome(awaitable)``, ``one_transaction``;
- :mod:`.probes` (what the server and the pool say, :class:`~.probes.Sampler`),
  :mod:`.capture` (warnings and logs), :mod:`.child` (a function in a child
  process), :mod:`.server` (a child server), imported as submodules;
- :mod:`.catalogue`, :mod:`.scripts`, :mod:`.runner`, :mod:`.report`,
  :mod:`.results` — how experiments are found, run and reported.

The names are imported when first used, so ``testN --help`` and ``orm-async-tests
list`` (which need only :mod:`.catalogue`) do not import SQLAlchemy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers (imported lazily at run time)
    from .cells import (
        not_here as not_here,
        on as on,
    )
    from .checks import (
        Expect as Expect,
        at_least as at_least,
        at_most as at_most,
        between as between,
        contains as contains,
        each as each,
        less_than as less_than,
        matches as matches,
        more_than as more_than,
        not_ as not_,
        one_of as one_of,
        prefix as prefix,
        where as where,
    )
    from .context import (
        Execution as Execution,
        Lab as Lab,
        Skip as Skip,
    )
    from .env import free_port as free_port
    from .outcomes import (
        describe as describe,
        driver_error as driver_error,
        first_line as first_line,
        one_transaction as one_transaction,
        outcome as outcome,
        sqlstate as sqlstate,
    )
    from .registry import (
        BadSizes as BadSizes,
        Experiment as Experiment,
        NoSizes as NoSizes,
        Scenario as Scenario,
        experiment as experiment,
    )

_HOMES = {
    "cells": ("not_here", "on"),
    "checks": (
        "Expect",
        "at_least",
        "at_most",
        "between",
        "contains",
        "each",
        "less_than",
        "matches",
        "more_than",
        "not_",
        "one_of",
        "prefix",
        "where",
    ),
    "context": ("Execution", "Lab", "Skip"),
    "env": ("free_port",),
    "registry": ("BadSizes", "Experiment", "NoSizes", "Scenario", "experiment"),
    "outcomes": (
        "describe",
        "driver_error",
        "first_line",
        "one_transaction",
        "outcome",
        "sqlstate",
    ),
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
