"""What happens when async code touches a lazy-loaded relationship, and how many
statements does each fix (selectinload, joinedload, awaitable_attrs, lazy="raise",
WriteOnlyMapped) send to load N parents and all their children?

``User.track_points`` is a plain ``lazy="select"`` relationship: the collection
is loaded by a SELECT the first time it is touched. Under an ``AsyncSession``
that implicit SELECT cannot run (the attribute access is synchronous code, and
the driver needs to await), so SQLAlchemy raises ``MissingGreenlet`` at the
attribute access. The fixes differ in where the IO happens and how many
statements they send for N parents:

- ``selectinload``: the parents, then one ``SELECT ... WHERE user_id IN (...)``
  (2 statements; ``subqueryload`` is also 2);
- ``joinedload``: one ``LEFT OUTER JOIN`` (1 statement), whose result must be
  de-duplicated with ``.unique()``;
- ``AsyncAttrs.awaitable_attrs``: the lazy load, awaited, per parent (1 + N);
- ``raiseload`` / ``lazy="raise"``: no fix, but the error names the relationship
  at the access, before any IO is attempted;
- ``WriteOnlyMapped``: the collection is never loaded implicitly; the children
  are queried explicitly (``collection.select()``) and added without loading.

Every scenario reads the same N users with M track points each (a fixture),
each load in a fresh session (an empty identity map). Statements are counted
with an engine event (``Lab.statements``). Observed, not in the docs: the
refused lazy SELECT still reaches ``before_cursor_execute`` (an event-based
counter counts it); the joinedload-without-unique() error comes from ``.all()``,
after the query ran; ``refresh(obj, ["track_points"])`` sends 2 statements (the
row's id, then the collection).

Sources: SQLAlchemy asyncio docs, "Preventing Implicit IO when Using AsyncSession"
(eager loaders, ``lazy="raise"``, ``AsyncAttrs.awaitable_attrs``, write-only
collections, ``run_sync``); ORM docs "Relationship Loading Techniques"
(``selectinload``, ``joinedload`` — "The unique() method must be invoked" for
joined eager loads of collections —, ``subqueryload``, ``raiseload``);
"Working with Large Collections" / "Write Only Relationships"
(``WriteOnlyMapped``, ``WriteOnlyCollection.select()/add()``); error reference
``xd2s`` (MissingGreenlet: "nearly always due to the use of lazy loading");
asyncio example ``async_orm_writeonly``. Issue threads (sqlalchemy/sqlalchemy):
#6782 (how to keep lazy loading under asyncio); #9627 (MissingGreenlet on a
relationship that was not eager-loaded on that path: "expected behavior");
#10765 (the full 2.0 message, "can't call await_only() here"; 2.1, observed
here, says "await_()"); #7176 (``lazy='raise'`` and objects already in the
identity map); #9298 (a relationship named in ``session.refresh(obj, [name])``
is loaded). Also czpython/druks#564, a project PR that states
``awaitable_attrs`` "cannot bypass lazy='raise'": observed here.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, insert, select
from sqlalchemy.ext.asyncio import AsyncAttrs, AsyncSession
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    WriteOnlyMapped,
    joinedload,
    raiseload,
    relationship,
    selectinload,
    subqueryload,
)
from sqlalchemy.orm.interfaces import ORMOption

from .lab import BadSizes, Lab, describe, experiment, on, outcome, prefix
from .models import TrackPoint, User


@dataclass(frozen=True)
class Sizes:
    users: int = 20
    """Parents (users) the loads read."""
    points: int = 5
    """Children (track points) per user."""

    def __post_init__(self) -> None:
        if self.users < 1 or self.points < 1:
            raise BadSizes(
                f"users ({self.users}) and points ({self.points}) must be at least 1: "
                "with no parent or no child there is nothing to load"
            )


run = experiment(7, "Relationship loading: lazy loads and their fixes", Sizes)


class _PrivateRegistry(AsyncAttrs, DeclarativeBase):
    pass


class WritePoint(_PrivateRegistry):
    """The ``track_points`` table again, in a private registry."""

    __table__ = TrackPoint.__table__

    id: Mapped[int]
    user_id: Mapped[int]
    lat: Mapped[float]
    lon: Mapped[float]
    date: Mapped[datetime]


class WriteOnlyUser(_PrivateRegistry):
    """The ``users`` table with ``track_points`` as a write-only collection."""

    __table__ = User.__table__

    id: Mapped[int]
    username: Mapped[str]
    # overlaps: the models' User.track_points / TrackPoint.user write the same column
    track_points: WriteOnlyMapped[WritePoint] = relationship(
        passive_deletes=True, overlaps="track_points,user"
    )


class RaiseUser(_PrivateRegistry):
    """The ``users`` table with ``track_points`` mapped ``lazy="raise"``."""

    __table__ = User.__table__

    id: Mapped[int]
    username: Mapped[str]
    track_points: Mapped[list[WritePoint]] = relationship(lazy="raise", viewonly=True)


def missing_greenlet(error: str, await_name: str) -> str:
    return (
        f"{error}: greenlet_spawn has not been called; can't call {await_name}() here. "
        "Was IO attempted in an unexpected place?"
    )


# what a lazy load raises: the message names 2.0's await_only() or 2.1's await_(); with
# psycopg on 2.1 the await happens while the cursor is created, inside the statement's
# execution, so the MissingGreenlet arrives wrapped in a StatementError
MISSING_GREENLET = on(
    asyncpg=on(
        sa20=missing_greenlet("MissingGreenlet", "await_only"),
        sa21=missing_greenlet("MissingGreenlet", "await_"),
    ),
    psycopg=on(
        sa20=missing_greenlet("MissingGreenlet", "await_only"),
        sa21=missing_greenlet("StatementError(MissingGreenlet)", "await_"),
    ),
)


def not_available(attribute: str) -> str:
    """The error a ``lazy="raise"`` relationship raises at the access."""
    return f"InvalidRequestError: '{attribute}' is not available due to lazy='raise'"


# "Relationship Loading Techniques", Select IN loading: the parents' keys go into
# the IN clause in batches of 500
SELECTIN_BATCH = 500


@dataclass(frozen=True)
class Dataset:
    """The users every scenario reads, and the query that selects them in order."""

    prefix: str
    users: int
    points: int
    parents: Select[User]
    raise_parents: Select[RaiseUser]
    write_only_parents: Select[WriteOnlyUser]

    @property
    def children(self) -> int:
        return self.users * self.points

    @property
    def selectin_batches(self) -> int:
        """SELECT ... IN statements selectinload sends: one per 500 parents."""
        return -(-self.users // SELECTIN_BATCH)

    def loaded(self, statements: int) -> dict[str, Any]:
        """What :meth:`Loaded.observed` shows for a load that found every row."""
        return {
            "statements": statements,
            "parents": self.users,
            "children": self.children,
            "raised": "nothing",
        }


@asynccontextmanager
async def dataset(lab: Lab[Sizes]) -> AsyncIterator[Dataset]:
    """N users with M track points each (their rows go with the run's cleanup)."""
    name = lab.name("u-")
    await seed(lab, name, lab.sizes.users, lab.sizes.points)
    yield Dataset(
        name,
        lab.sizes.users,
        lab.sizes.points,
        select(User).where(User.username.startswith(name)).order_by(User.id),
        select(RaiseUser).where(RaiseUser.username.startswith(name)).order_by(RaiseUser.id),
        select(WriteOnlyUser)
        .where(WriteOnlyUser.username.startswith(name))
        .order_by(WriteOnlyUser.id),
    )


async def seed(lab: Lab[Sizes], name: str, users: int, points: int) -> None:
    """``users`` users named ``name + number`` with ``points`` track points each, inserted
    with Core (executemany, batched)."""
    now = datetime.now(UTC)
    users_table = User.metadata.tables["users"]
    points_table = User.metadata.tables["track_points"]
    async with lab.engine.begin() as conn:
        ids = (
            await conn.scalars(
                insert(users_table).returning(users_table.c.id),
                [{"username": f"{name}{i:05d}"} for i in range(users)],
            )
        ).all()
        await conn.execute(
            insert(points_table),
            [
                {"user_id": uid, "lat": 45.0 + j / 1e3, "lon": 5.0, "date": now}
                for uid in ids
                for j in range(points)
            ],
        )


@dataclass
class Loaded:
    """What one loading strategy did: rows it produced, statements it sent, its error."""

    parents: int = 0
    children: int = 0
    statements: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""
    raised: BaseException | None = None

    def observed(self) -> dict[str, Any]:
        return {
            "statements": len(self.statements),
            "parents": self.parents,
            "children": self.children,
            "raised": self.error or "nothing",
        }


Loader = Callable[[AsyncSession], Awaitable[tuple[int, int]]]


async def measure(lab: Lab[Sizes], name: str, load: Loader) -> Loaded:
    """Run ``load`` in a fresh session (empty identity map), counting its statements;
    its statement count and time are figures."""
    found = Loaded()
    async with lab.sessions() as session:
        await session.connection()  # checkout (and pre-ping) happen before the count
        started = time.perf_counter()
        with lab.statements() as sent:
            try:
                found.parents, found.children = await load(session)
            except Exception as err:
                found.error = describe(err)
                found.raised = err
        found.seconds = time.perf_counter() - started
        found.statements = list(sent)
    lab.figure(f"statements: {name} (N={lab.sizes.users})", len(found.statements), "statements")
    if not found.error:
        lab.figure(f"time: {name}", found.seconds, "s")
    return found


def eager(query: Select[Any], option: ORMOption) -> Loader:
    """Load the parents with ``option``, then touch every collection."""

    async def load(session: AsyncSession) -> tuple[int, int]:
        found = (await session.scalars(query.options(option))).all()
        return len(found), sum(touch(u) for u in found)

    return load


def touch(user: User | RaiseUser) -> int:
    """Read a user's collection the way sync code would: a plain attribute access."""
    return len(user.track_points)


def raised_in(err: BaseException | None) -> str:
    """The innermost function of this module on the exception's traceback."""
    if err is None:
        return "nothing raised"
    ours = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == __file__]
    return f"{ours[-1].name}()" if ours else "outside this module"


IN_CLAUSE = "WHERE track_points.user_id IN ("
JOIN = "FROM users LEFT OUTER JOIN track_points"


def with_text(statements: list[str], part: str) -> int:
    """How many of ``statements`` have ``part`` in their text."""
    return sum(part in s for s in statements)


def shapes(statements: list[str]) -> list[str]:
    """Each statement as its verb and first table: ``"SELECT FROM users"``,
    ``"INSERT INTO track_points"``."""
    found = []
    for statement in statements:
        verb = statement.split(" ", 1)[0]
        if verb == "SELECT":
            found.append(f"SELECT FROM {statement.partition(' FROM ')[2].split(' ', 1)[0]}")
        elif verb == "INSERT":
            found.append(" ".join(statement.split(" ", 3)[:3]))
        else:
            found.append(verb)
    return found


@run.scenario
async def plain_lazy_load(lab: Lab[Sizes]) -> None:
    """select(User), then a plain read of user.track_points in async code: what is raised,
    where, and what the engine saw."""
    data = await lab.use(dataset)
    async with lab.sessions() as session:
        await session.connection()
        with lab.statements() as before_access:
            loaded_users = (await session.scalars(data.parents)).all()
        with lab.statements() as at_access:
            try:
                touch(loaded_users[0])
                lazy_error: BaseException | None = None
            except Exception as err:
                lazy_error = err
        survived = await outcome(session.scalar(select(1)))
    lab.check(
        "lazy load in async raises MissingGreenlet",
        "After a plain select(User), touching user.track_points needs a SELECT that "
        "synchronous attribute access cannot await: sqlalchemy.exc.MissingGreenlet "
        "(error xd2s). SQLAlchemy 2.1 says 'can't call await_() here', 2.0 says "
        "'await_only()' (as quoted in issue threads #9627, #10765). With psycopg on 2.1 "
        "it is a StatementError wrapping the MissingGreenlet: `except MissingGreenlet` "
        "misses it there.",
        expected=MISSING_GREENLET,
        observed=describe(lazy_error) if lazy_error else "no error",
    )
    lab.check(
        "MissingGreenlet is raised at the attribute access",
        "The select(User) itself succeeds (1 statement, N users); the error comes from "
        "the later attribute access (innermost frame of ours: touch()), not from the query.",
        expected={"query statements": 1, "users loaded": data.users, "raised in": "touch()"},
        observed={
            "query statements": len(before_access),
            "users loaded": len(loaded_users),
            "raised in": raised_in(lazy_error),
        },
    )
    lab.check(
        "the lazy SELECT reaches the engine event, then is refused",
        "Observed: the lazy loader builds its SELECT and the engine's before_cursor_execute "
        "event sees it (so event-based statement counters count it), but the driver call "
        "needs an await and is refused; the session stays usable afterwards. Not with "
        "psycopg on SQLAlchemy 2.1: its adapter already awaits to create the cursor, "
        "before the event, so the event never sees that SELECT.",
        expected={
            "seen at the access": on(
                asyncpg=["SELECT FROM track_points"],
                psycopg=on(sa20=["SELECT FROM track_points"], sa21=[]),
            ),
            "next query": "ok",
        },
        observed={"seen at the access": shapes(at_access), "next query": survived},
    )


@run.scenario
async def eager_loaders(lab: Lab[Sizes]) -> None:
    """selectinload, subqueryload and joinedload (without and with .unique()), each in a
    fresh session: statements sent, parents and children loaded, what was raised."""
    data = await lab.use(dataset)
    selectin = await measure(
        lab, "selectinload", eager(data.parents, selectinload(User.track_points))
    )
    lab.check(
        "selectinload: 2 statements (N <= 500)",
        "selectinload loads the N parents, then all their children with one "
        "SELECT ... WHERE track_points.user_id IN (...): 2 statements whatever N (one more "
        "per further 500 parents), and touching the collections afterwards needs no IO.",
        expected={
            **data.loaded(1 + data.selectin_batches),
            "tables": ["SELECT FROM users"] + ["SELECT FROM track_points"] * data.selectin_batches,
            f"statements with {IN_CLAUSE}": data.selectin_batches,
        },
        observed={
            **selectin.observed(),
            "tables": shapes(selectin.statements),
            f"statements with {IN_CLAUSE}": with_text(selectin.statements, IN_CLAUSE),
        },
    )
    subquery = await measure(
        lab, "subqueryload", eager(data.parents, subqueryload(User.track_points))
    )
    lab.check(
        "subqueryload: 2 statements",
        "subqueryload also sends 2 statements: the parents, then the children joined to "
        "the parent query repeated as a subquery.",
        expected=data.loaded(2),
        observed=subquery.observed(),
    )

    stage = ["before the query"]

    async def joined_without_unique(session: AsyncSession) -> tuple[int, int]:
        result = await session.scalars(data.parents.options(joinedload(User.track_points)))
        stage[0] = "at .all(), after the query returned"
        found = result.all()
        stage[0] = "not raised"
        return len(found), sum(touch(u) for u in found)

    async def joined_with_unique(session: AsyncSession) -> tuple[int, int]:
        result = await session.scalars(data.parents.options(joinedload(User.track_points)))
        found = result.unique().all()
        return len(found), sum(touch(u) for u in found)

    bare = await measure(lab, "joinedload without unique()", joined_without_unique)
    lab.check(
        "joinedload of a collection without unique() is refused",
        "Joined eager loading of a collection returns one row per child; SQLAlchemy 2.x "
        "refuses to hand back those duplicated parents unless the result is uniqued: "
        "InvalidRequestError, 'The unique() method must be invoked ...'. The query itself "
        "runs (1 statement); the error comes when the rows are fetched (.all()).",
        expected={
            "raised": prefix("InvalidRequestError: The unique() method must be invoked"),
            "when": "at .all(), after the query returned",
            "statements": 1,
        },
        observed={
            "raised": bare.error or "nothing",
            "when": stage[0],
            "statements": len(bare.statements),
        },
    )
    joined = await measure(lab, "joinedload + unique()", joined_with_unique)
    lab.check(
        "joinedload + unique(): 1 statement",
        "joinedload with .unique() on the result loads parents and children in one "
        "SELECT ... LEFT OUTER JOIN track_points: 1 statement.",
        expected={**data.loaded(1), f"statements with {JOIN}": 1},
        observed={
            **joined.observed(),
            f"statements with {JOIN}": with_text(joined.statements, JOIN),
        },
    )


@run.scenario
async def per_parent_loads(lab: Lab[Sizes]) -> None:
    """The lazy load made to work: awaited through awaitable_attrs, and as plain sync code
    inside run_sync; each in a fresh session, timed against selectinload."""
    data = await lab.use(dataset)

    async def awaitable(session: AsyncSession) -> tuple[int, int]:
        found = (await session.scalars(data.parents)).all()
        children = 0
        for user in found:
            children += len(await user.awaitable_attrs.track_points)
        return len(found), children

    def sync_lazy(session: Session) -> tuple[int, int]:
        found = session.scalars(data.parents).all()
        return len(found), sum(touch(u) for u in found)

    async def in_run_sync(session: AsyncSession) -> tuple[int, int]:
        return await session.run_sync(sync_lazy)

    awaited = await measure(lab, "awaitable_attrs", awaitable)
    lab.check(
        "awaitable_attrs: 1 + N statements",
        "await user.awaitable_attrs.track_points runs the same lazy load, but awaited: it "
        "works under asyncio and costs one SELECT per parent — the N+1 pattern.",
        expected=data.loaded(1 + data.users),
        observed=awaited.observed(),
    )
    synced = await measure(lab, "lazy load inside run_sync", in_run_sync)
    lab.check(
        "plain lazy loading works inside run_sync: 1 + N",
        "Inside AsyncSession.run_sync the same sync code (plain attribute access) lazy "
        "loads without MissingGreenlet, since it runs in SQLAlchemy's greenlet; it is "
        "still N+1.",
        expected=data.loaded(1 + data.users),
        observed=synced.observed(),
    )
    fast = await measure(
        lab, "selectinload (for comparison)", eager(data.parents, selectinload(User.track_points))
    )
    if fast.seconds > 0 and not fast.error:
        lab.figure(
            "time: awaitable_attrs (N+1) / selectinload", awaited.seconds / fast.seconds, "x"
        )


@run.scenario
async def lazy_raise(lab: Lab[Sizes]) -> None:
    """lazy="raise" as a query option (raiseload) and in a mapping, the mapping overridden
    by selectinload, then awaitable_attrs and session.refresh on that mapping."""
    data = await lab.use(dataset)

    async def raise_option(session: AsyncSession) -> tuple[int, int]:
        found = (await session.scalars(data.parents.options(raiseload(User.track_points)))).all()
        return len(found), sum(touch(u) for u in found)

    async def raise_mapping(session: AsyncSession) -> tuple[int, int]:
        found = (await session.scalars(data.raise_parents)).all()
        return len(found), sum(touch(u) for u in found)

    for name, attribute, load in (
        ("raiseload option", "User.track_points", raise_option),
        ('lazy="raise" mapping', "RaiseUser.track_points", raise_mapping),
    ):
        loaded = await measure(lab, name, load)
        lab.check(
            f"{name}: error at the access, no IO attempted",
            "With lazy='raise' (as an option or in the mapping) the parents load (1 "
            "statement), and touching the collection raises InvalidRequestError naming the "
            "relationship, in touch(), before any SQL is built: no second statement.",
            expected={"raised": not_available(attribute), "statements": 1, "raised in": "touch()"},
            observed={
                "raised": loaded.error or "nothing",
                "statements": len(loaded.statements),
                "raised in": raised_in(loaded.raised),
            },
        )
    overridden = await measure(
        lab,
        'lazy="raise" + selectinload',
        eager(data.raise_parents, selectinload(RaiseUser.track_points)),
    )
    lab.check(
        'lazy="raise" mapping + selectinload option: loads (2 statements)',
        "lazy='raise' is only the default: a query that asks for the collection with "
        "selectinload gets it (2 statements), so the mapping forces each query to say "
        "how it loads the relationship.",
        expected=data.loaded(1 + data.selectin_batches),
        observed=overridden.observed(),
    )

    async with lab.sessions() as session:
        user = (await session.scalars(data.raise_parents.limit(1))).one()
        try:
            awaited: Any = len(await user.awaitable_attrs.track_points)
        except Exception as err:
            awaited = describe(err)
        with lab.statements() as sent:
            await session.refresh(user, ["track_points"])
        try:
            refreshed: Any = touch(user)
        except Exception as err:
            refreshed = describe(err)
    lab.check(
        'lazy="raise": awaitable_attrs does not bypass it, refresh(obj, [name]) does',
        "awaitable_attrs only runs the attribute's own loader in a greenlet, so on a "
        "lazy='raise' relationship it raises the same InvalidRequestError; naming the "
        "relationship in await session.refresh(obj, ['track_points']) loads it: observed 2 "
        "statements, SELECT users.id for the row, then the collection FROM track_points.",
        expected={
            "awaitable_attrs": not_available("RaiseUser.track_points"),
            "refresh sent": ["SELECT FROM users", "SELECT FROM track_points"],
            "children after the refresh": data.points,
        },
        observed={
            "awaitable_attrs": awaited,
            "refresh sent": shapes(sent),
            "children after the refresh": refreshed,
        },
    )


@run.scenario
async def write_only_collection(lab: Lab[Sizes]) -> None:
    """The same users mapped with a WriteOnlyMapped collection: read it, iterate it, query
    it per parent, add() to it (on a user of this scenario); then append() to the ordinary
    relationship for contrast."""
    data = await lab.use(dataset)
    async with lab.sessions() as session:
        owners = (await session.scalars(data.write_only_parents)).all()
        with lab.statements() as at_read:
            collection = owners[0].track_points
        try:
            iterated = f"iterated {len(list(collection))} items"
        except Exception as err:
            iterated = describe(err)
    lab.check(
        "WriteOnlyMapped: reading the attribute loads nothing",
        "A write-only collection is never loaded implicitly: reading user.track_points "
        "returns a WriteOnlyCollection without sending any statement.",
        expected={"type": "WriteOnlyCollection", "statements": 0},
        observed={"type": type(collection).__name__, "statements": len(at_read)},
    )
    lab.check(
        "WriteOnlyMapped: iterating the collection is refused",
        "Iterating a WriteOnlyCollection raises instead of loading: the caller must "
        "query it with collection.select().",
        expected=prefix("TypeError: WriteOnly collections don't support iteration"),
        observed=iterated,
    )

    async def explicit(session: AsyncSession) -> tuple[int, int]:
        found = (await session.scalars(data.write_only_parents)).all()
        children = 0
        for owner in found:
            children += len((await session.scalars(owner.track_points.select())).all())
        return len(found), children

    loaded = await measure(lab, "WriteOnlyMapped select() per parent", explicit)
    lab.check(
        "WriteOnlyMapped: explicit select() per parent, 1 + N",
        "await session.scalars(user.track_points.select()) loads one parent's children "
        "explicitly: 1 statement per parent, plus the parents' query.",
        expected=data.loaded(1 + data.users),
        observed=loaded.observed(),
    )

    # add(): INSERT only, no load of the existing children; on a user of its own, so the
    # shared dataset keeps M children per user
    name = lab.name("write-only-")
    await seed(lab, name, 1, data.points)
    async with lab.sessions() as session:
        owner = (
            await session.scalars(
                select(WriteOnlyUser).where(WriteOnlyUser.username.startswith(name))
            )
        ).one()
        with lab.statements() as sent:
            owner.track_points.add(WritePoint(lat=45.19, lon=5.72, date=datetime.now(UTC)))
            await session.commit()
        count = len((await session.scalars(owner.track_points.select())).all())
    lab.check(
        "WriteOnlyMapped: add() inserts without loading the collection",
        "user.track_points.add(point) then commit sends only the INSERT of the new child "
        "(no SELECT of the existing ones); the parent then has M + 1 children.",
        expected={"sent": ["INSERT INTO track_points"], "children": data.points + 1},
        observed={"sent": shapes(sent), "children": count},
    )

    # the same append on the ordinary relationship needs the collection loaded first
    async with lab.sessions() as session:
        user = (await session.scalars(data.parents.limit(1))).one()
        try:
            user.track_points.append(TrackPoint(lat=45.19, lon=5.72, date=datetime.now(UTC)))
            appended = "ok"
        except Exception as err:
            appended = describe(err)
        await session.rollback()
    lab.check(
        "ordinary relationship: append() needs a load, MissingGreenlet",
        "Contrast: appending to an unloaded lazy='select' collection first loads it, which "
        "under asyncio raises MissingGreenlet — the reason write-only collections exist.",
        expected=MISSING_GREENLET,
        observed=appended,
    )
