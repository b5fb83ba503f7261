"""What does PostgreSQL make of a bound parameter whose type nobody stated (``text()`` with
``:p IS NULL``, ``SELECT :x``, a string for an integer column, an int for a text column,
``IN`` with a list), through asyncpg and through psycopg, and which spelling states the
type so that both drivers agree?

Both drivers send the parameters apart from the SQL (server-side binds, ``$1``), so the
server has to give every parameter a type. asyncpg prepares each statement and takes the
types the server infers from the SQL alone, then encodes each Python value for that type
(and refuses one that does not fit); psycopg sends each value with a type of its own
choosing (a ``str`` as "unknown", an ``int`` as the smallest integer type it fits, ``None``
as "unknown") and lets the server cast. Every cell below runs one statement in its own
transaction on a scratch table ``(n integer, s text)`` with the rows 1, 2, 3 and records
the rows returned or the error, with the driver named in the expectation where the two
differ. A last scenario runs the same ``text()`` SQL with and without an expanding
``bindparam`` on fresh engines, one order each, to see whether SQLAlchemy's compiled
cache tells them apart.

Observed: a parameter the SQL gives no type (``$1 IS NULL``) fails on both drivers with
``None`` ("could not determine data type of parameter $1"); with an int, psycopg's int
type answers and asyncpg still fails. ``SELECT :x`` is inferred as text, so asyncpg
refuses an int ("expected str, got int") while psycopg returns it. A string compared with
an integer column in ``text()`` works on psycopg (the server casts the unknown literal)
and is refused by asyncpg; an int for a text column is refused by asyncpg, fails on psycopg
in a comparison (``text = smallint``) and is accepted in an ``INSERT`` (an assignment
cast). In Core, SQLAlchemy types such a bind from the Python value and renders the cast
(``$1::VARCHAR``), so ``integer = character varying`` fails on both drivers. ``IN :ids``
with a list is a syntax error on both: only an expanding ``bindparam`` (or ``= ANY(:ids)``,
or Core's ``in_()``) works, empty lists included. The fixes that make both drivers agree:
``bindparam(..., type_=...)`` in ``text().bindparams()`` (SQLAlchemy renders
``$1::INTEGER``), ``CAST(:x AS integer)``, ``literal()``, and Python values of the
column's type. And SQLAlchemy's compiled cache does not key on ``expanding``: on a fresh
engine, whichever of the two ``text()`` statements runs first decides how the other is
rendered (the plain one then works, the expanding one then fails), on both drivers and
both SQLAlchemy lines; ``compiled_cache=None`` avoids it.

Sources: PostgreSQL docs, "PREPARE" (a parameter whose type is not specified is inferred
from the context it is first used in) and 10.3/10.5 "Type Conversion" (an unknown literal
takes the type of the other operand; assignment casts in ``INSERT``); asyncpg FAQ "Why am
I getting prepared statement errors / type errors" and MagicStack/asyncpg#975, #998
(asyncpg encodes with the type the server inferred and does not convert between Python
types: confirmed, "expected str, got int" / "'str' object cannot be interpreted as an
integer"); psycopg 3 docs, "Server-side binding" and "Adapting basic Python types"
(strings dumped as unknown, ints as the smallest fitting type: confirmed by ``text =
smallint``); SQLAlchemy docs, ``text()`` - ``TextClause.bindparams`` (typed and expanding
binds) and sqlalchemy#6364 (``:p IS NULL`` on asyncpg, "could not determine data type":
confirmed, and psycopg fails the same way with ``None``); sqlalchemy#7517 ("expanding not
being part of the cache key ... is a bug", open): confirmed for ``text()`` on 2.0 and 2.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import (
    Column,
    Executable,
    Integer,
    MetaData,
    Table,
    Text,
    bindparam,
    literal,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from .lab import Lab, NoSizes, describe, experiment, on, prefix

run = experiment(18, "Parameter types with server-side binds")

NO_TYPE = prefix("ProgrammingError: could not determine data type of parameter $1")
IN_LIST = prefix('ProgrammingError: syntax error at or near "$1"')


def not_str(value: int) -> Any:
    """How asyncpg refuses an int where the server inferred text."""
    return prefix(
        f"DBAPIError: invalid input for query argument $1: {value} (expected str, got int)"
    )


def not_int(value: str) -> Any:
    """How asyncpg refuses a str where the server inferred integer."""
    return prefix(
        f"DBAPIError: invalid input for query argument $1: {value!r} ('str' object cannot be "
        "interpreted as an integer)"
    )


def no_operator(left: str, right: str) -> Any:
    return prefix(f"ProgrammingError: operator does not exist: {left} = {right}")


def scratch(lab: Lab[NoSizes]) -> Table:
    return Table(
        f"{lab.tag.replace('-', '_')}params",
        MetaData(),
        Column("n", Integer, primary_key=True, autoincrement=False),
        Column("s", Text),
    )


@asynccontextmanager
async def rows_1_2_3(lab: Lab[NoSizes]) -> AsyncIterator[Table]:
    """The scratch table with (1, '1'), (2, '2'), (3, '3'), dropped after the run."""
    table = scratch(lab)
    async with lab.engine.begin() as conn:
        await conn.run_sync(table.metadata.create_all)
        await conn.execute(table.insert(), [{"n": i, "s": str(i)} for i in (1, 2, 3)])
    try:
        yield table
    finally:
        async with lab.engine.begin() as conn:
            await conn.run_sync(table.metadata.drop_all)


async def attempt(
    statement: Executable, params: dict[str, Any] | None = None, *, engine: AsyncEngine
) -> Any:
    """The rows ``statement`` returns (as lists), or the error, in a transaction rolled
    back afterwards (an ``INSERT`` leaves nothing behind)."""
    async with engine.connect() as conn:
        try:
            result = await conn.execute(statement, params or {})
            return [list(row) for row in result.all()]
        except Exception as exc:
            return describe(exc)
        finally:
            await conn.rollback()


def sql(table: Table, template: str) -> str:
    return template.format(t=table.name)


@run.scenario
async def a_parameter_the_sql_does_not_type(lab: Lab[NoSizes]) -> None:
    """text("SELECT :p IS NULL") with None and with 1; then the same with the type stated:
    bindparam("p", type_=Integer) and CAST(:p AS integer)."""
    is_null = "SELECT :p IS NULL"
    lab.check(
        ":p IS NULL",
        "Nothing in '$1 IS NULL' gives the parameter a type. With None both drivers fail "
        "(psycopg sends None as unknown). With 1 psycopg's int type answers, while asyncpg "
        "asks the server first and fails the same way whatever the value (sqlalchemy#6364).",
        expected={"None": NO_TYPE, "1": on(asyncpg=NO_TYPE, psycopg=[[False]])},
        observed={
            "None": await attempt(text(is_null), {"p": None}, engine=lab.engine),
            "1": await attempt(text(is_null), {"p": 1}, engine=lab.engine),
        },
    )
    typed = text(is_null).bindparams(bindparam("p", type_=Integer))
    lab.check(
        "fix: the type stated in the SQL",
        "A typed bindparam makes SQLAlchemy render the cast ($1::INTEGER on both drivers), "
        "and an explicit CAST in the SQL does the same by hand: None is then true on both.",
        expected={"bindparam(type_=Integer)": [[True]], "CAST(:p AS integer)": [[True]]},
        observed={
            "bindparam(type_=Integer)": await attempt(typed, {"p": None}, engine=lab.engine),
            "CAST(:p AS integer)": await attempt(
                text("SELECT CAST(:p AS integer) IS NULL"), {"p": None}, engine=lab.engine
            ),
        },
    )


@run.scenario
async def a_bare_parameter_in_the_select_list(lab: Lab[NoSizes]) -> None:
    """text("SELECT :x") with 1 and with 'a'; then bindparam("x", type_=Integer) and
    select(literal(1))."""
    bare = "SELECT :x"
    lab.check(
        "SELECT :x",
        "The server resolves an untyped parameter in the select list as text. asyncpg then "
        "refuses the int 1 (it encodes for text and does not convert: asyncpg#975); psycopg "
        "sends its own int type and gets 1 back. A string comes back on both.",
        expected={
            "1": on(
                asyncpg=prefix(
                    "DBAPIError: invalid input for query argument $1: 1 (expected str, got int)"
                ),
                psycopg=[[1]],
            ),
            "'a'": [["a"]],
        },
        observed={
            "1": await attempt(text(bare), {"x": 1}, engine=lab.engine),
            "'a'": await attempt(text(bare), {"x": "a"}, engine=lab.engine),
        },
    )
    lab.check(
        "fix: a typed bind or a literal",
        "bindparam(type_=Integer) in text().bindparams() and Core's literal(1) both give the "
        "parameter its type (SQLAlchemy renders the cast): 1 comes back as an int on both.",
        expected={"bindparam(type_=Integer)": [[1]], "literal(1)": [[1]]},
        observed={
            "bindparam(type_=Integer)": await attempt(
                text(bare).bindparams(bindparam("x", type_=Integer)), {"x": 1}, engine=lab.engine
            ),
            "literal(1)": await attempt(select(literal(1)), engine=lab.engine),
        },
    )


@run.scenario
async def a_string_for_an_integer_column(lab: Lab[NoSizes]) -> None:
    """The string '2' compared with the integer column in text() and in Core
    (table.c.n == '2'), and '5' inserted into it through text()."""
    table = await lab.use(rows_1_2_3)
    where = text(sql(table, "SELECT n FROM {t} WHERE n = :v"))
    insert = text(sql(table, "INSERT INTO {t} (n) VALUES (:v) RETURNING n"))
    lab.check(
        "a str for an integer column",
        "In text() the server infers integer for $1: asyncpg refuses the str, psycopg sends it "
        "as unknown and the server casts it (row 2; the INSERT stores 5). In Core SQLAlchemy "
        "types the bind from the Python value and renders $1::VARCHAR, so integer = "
        "character varying fails on both drivers.",
        expected={
            "text() WHERE n = '2'": on(asyncpg=not_int("2"), psycopg=[[2]]),
            "text() INSERT '5'": on(asyncpg=not_int("5"), psycopg=[[5]]),
            "Core n == '2'": no_operator("integer", "character varying"),
        },
        observed={
            "text() WHERE n = '2'": await attempt(where, {"v": "2"}, engine=lab.engine),
            "text() INSERT '5'": await attempt(insert, {"v": "5"}, engine=lab.engine),
            "Core n == '2'": await attempt(
                select(table.c.n).where(table.c.n == "2"), engine=lab.engine
            ),
        },
    )


@run.scenario
async def an_int_for_a_text_column(lab: Lab[NoSizes]) -> None:
    """The int 2 compared with the text column in text() and in Core (table.c.s == 2), and
    9 inserted into it through text(); then the fix, CAST(:v AS text) and a str value."""
    table = await lab.use(rows_1_2_3)
    where = sql(table, "SELECT n FROM {t} WHERE s = ")
    insert = text(sql(table, "INSERT INTO {t} (n, s) VALUES (9, :v) RETURNING s"))
    lab.check(
        "an int for a text column",
        "asyncpg refuses the int wherever the server inferred text. psycopg sends 2 as a "
        "smallint, so text = smallint has no operator; in the INSERT the server's assignment "
        "cast to text accepts it ('9'). Core renders $1::INTEGER from the Python value: text "
        "= integer on both.",
        expected={
            "text() WHERE s = 2": on(asyncpg=not_str(2), psycopg=no_operator("text", "smallint")),
            "text() INSERT 9": on(asyncpg=not_str(9), psycopg=[["9"]]),
            "Core s == 2": no_operator("text", "integer"),
        },
        observed={
            "text() WHERE s = 2": await attempt(text(where + ":v"), {"v": 2}, engine=lab.engine),
            "text() INSERT 9": await attempt(insert, {"v": 9}, engine=lab.engine),
            "Core s == 2": await attempt(
                select(table.c.n).where(table.c.s == 2), engine=lab.engine
            ),
        },
    )
    lab.check(
        "fix: a cast in the SQL, or a value of the column's type",
        "CAST(:v AS text) makes the parameter text for the server: asyncpg still wants a str "
        "for it (it encodes, never converts), psycopg casts its smallint; a str value works "
        "on both, in text() and in Core.",
        expected={
            "text() CAST(:v AS text), 2": on(asyncpg=not_str(2), psycopg=[[2]]),
            "text() s = '2'": [[2]],
            "Core s == '2'": [[2]],
        },
        observed={
            "text() CAST(:v AS text), 2": await attempt(
                text(where + "CAST(:v AS text)"), {"v": 2}, engine=lab.engine
            ),
            "text() s = '2'": await attempt(text(where + ":v"), {"v": "2"}, engine=lab.engine),
            "Core s == '2'": await attempt(
                select(table.c.n).where(table.c.s == "2"), engine=lab.engine
            ),
        },
    )


@run.scenario
async def in_with_a_list(lab: Lab[NoSizes]) -> None:
    """n IN :ids with [1, 2] in plain text(); then = ANY(:ids), an expanding bindparam
    (with [1, 2] and with []) and Core's in_()."""
    table = await lab.use(rows_1_2_3)
    plain = sql(table, "SELECT n FROM {t} WHERE n IN :ids ORDER BY n")
    # other SQL than `plain`, so the compiled cache cannot hand one the other's
    # compilation (the last scenario shows it would)
    expanding = text(sql(table, "SELECT n FROM {t} WHERE n IN :ids ORDER BY n /* expanding */"))
    expanding = expanding.bindparams(bindparam("ids", expanding=True))
    ordered = select(table.c.n).order_by(table.c.n)
    lab.check(
        "IN with a list",
        "A list bound to one parameter is one value: IN $1 is a syntax error on both drivers. "
        "= ANY(:ids) sends it as an array (both drivers map a list of ints to an integer "
        "array); an expanding bindparam renders one parameter per item (IN ($1, $2)); an "
        "empty list gives no rows instead of an error; Core's in_() is expanding already.",
        expected={
            "text() IN :ids": IN_LIST,
            "text() = ANY(:ids)": [[1], [2]],
            "expanding, [1, 2]": [[1], [2]],
            "expanding, []": [],
            "Core in_([1, 2])": [[1], [2]],
            "Core in_([])": [],
        },
        observed={
            "text() IN :ids": await attempt(text(plain), {"ids": [1, 2]}, engine=lab.engine),
            "text() = ANY(:ids)": await attempt(
                text(plain.replace("IN :ids", "= ANY(:ids)")), {"ids": [1, 2]}, engine=lab.engine
            ),
            "expanding, [1, 2]": await attempt(expanding, {"ids": [1, 2]}, engine=lab.engine),
            "expanding, []": await attempt(expanding, {"ids": []}, engine=lab.engine),
            "Core in_([1, 2])": await attempt(
                ordered.where(table.c.n.in_([1, 2])), engine=lab.engine
            ),
            "Core in_([])": await attempt(ordered.where(table.c.n.in_([])), engine=lab.engine),
        },
    )


@run.scenario
async def expanding_is_not_in_the_cache_key(lab: Lab[NoSizes]) -> None:
    """The same text() SQL, "... n IN :ids", plain and with an expanding bindparam, each on
    a fresh engine (its own compiled cache), in both orders; then the wrong order again with
    compiled_cache=None."""
    table = await lab.use(rows_1_2_3)
    same = sql(table, "SELECT n FROM {t} WHERE n IN :ids ORDER BY n")
    expanding = text(same).bindparams(bindparam("ids", expanding=True))
    ids = {"ids": [1, 2]}
    plain_first, expanding_first = lab.engine_with(), lab.engine_with()
    seen = {"plain first": await attempt(text(same), ids, engine=plain_first)}
    seen["then expanding"] = await attempt(expanding, ids, engine=plain_first)
    seen["expanding first"] = await attempt(expanding, ids, engine=expanding_first)
    seen["then plain"] = await attempt(text(same), ids, engine=expanding_first)
    uncached = plain_first.execution_options(compiled_cache=None)
    seen["then expanding, compiled_cache=None"] = await attempt(expanding, ids, engine=uncached)
    lab.check(
        "the first statement decides how the second is compiled",
        "SQLAlchemy's cache key of a text() is its SQL and its binds' names and types, not "
        "'expanding' (sqlalchemy#7517): on one engine whichever runs first is compiled and "
        "reused for the other. After the plain one the expanding one fails with the plain "
        "one's syntax error; after the expanding one the plain one is silently expanded and "
        "works. Without the compiled cache the expanding statement works again.",
        expected={
            "plain first": IN_LIST,
            "then expanding": IN_LIST,
            "expanding first": [[1], [2]],
            "then plain": [[1], [2]],
            "then expanding, compiled_cache=None": [[1], [2]],
        },
        observed=seen,
    )
