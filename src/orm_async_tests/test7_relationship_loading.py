"""Experiment 7: relationship loading — lazy loads under asyncio and their fixes.

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

Statements are counted with an engine event (``Lab.statements``). Observed, not
in the docs: the refused lazy SELECT still reaches ``before_cursor_execute``
(an event-based counter counts it); the joinedload-without-unique() error comes
from ``.all()``, after the query ran; ``refresh(obj, ["track_points"])`` sends 2
statements (the row's id, then the collection).

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Select, exc, insert, select
from sqlalchemy.ext.asyncio import AsyncAttrs, AsyncSession
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    WriteOnlyCollection,
    WriteOnlyMapped,
    joinedload,
    raiseload,
    relationship,
    selectinload,
    subqueryload,
)
from sqlalchemy.orm.interfaces import ORMOption

from .harness import Lab, describe, experiment, outcome
from .models import TrackPoint, User


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


MISSING_GREENLET = (
    "greenlet_spawn has not been called; can't call await_() here. "
    "Was IO attempted in an unexpected place?"
)


# "Relationship Loading Techniques", Select IN loading: the parents' keys go into
# the IN clause in batches of 500
SELECTIN_BATCH = 500


@dataclass
class Loaded:
    """What one loading strategy did: rows it produced, statements it sent, its error."""

    parents: int = 0
    children: int = 0
    statements: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""
    raised: BaseException | None = None

    def summary(self) -> str:
        if self.error:
            return f"{self.error} (after {len(self.statements)} statement(s))"
        return (
            f"{len(self.statements)} statement(s), {self.parents} parents, {self.children} children"
        )


Loader = Callable[[AsyncSession], Awaitable[tuple[int, int]]]


async def measure(lab: Lab, load: Loader) -> Loaded:
    """Run ``load`` in a fresh session (empty identity map), counting its statements."""
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
    return found


def touch(user: User | RaiseUser) -> int:
    """Read a user's collection the way sync code would: a plain attribute access."""
    return len(user.track_points)


def raised_in(err: BaseException | None) -> str:
    """The innermost function of this module on the exception's traceback."""
    if err is None:
        return "nothing raised"
    ours = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == __file__]
    return f"{ours[-1].name}()" if ours else "outside this module"


@experiment(7, "Relationship loading: lazy loads and their fixes")
async def run(lab: Lab, *, users: int = 20, points: int = 5) -> None:
    """What happens when async code touches a lazy-loaded relationship, and how many
    statements does each fix (selectinload, joinedload, awaitable_attrs, lazy="raise",
    WriteOnlyMapped) send to load N parents and all their children?"""
    prefix = f"{lab.tag}u-"
    await seed(lab, prefix, users, points)
    expected_children = users * points
    parents = select(User).where(User.username.startswith(prefix)).order_by(User.id)

    # 1. the plain lazy load: MissingGreenlet at the attribute access
    async with lab.sessions() as session:
        await session.connection()
        with lab.statements() as before_access:
            loaded_users = (await session.scalars(parents)).all()
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
        "(error xd2s). SQLAlchemy 2.1 says 'can't call await_() here'; the 2.0 message "
        "quoted in issue threads (#9627, #10765) said 'await_only()'.",
        expected=f"MissingGreenlet: {MISSING_GREENLET}",
        observed=describe(lazy_error) if lazy_error else "no error",
        passed=isinstance(lazy_error, exc.MissingGreenlet)
        and describe(lazy_error) == f"MissingGreenlet: {MISSING_GREENLET}",
    )
    lab.check(
        "MissingGreenlet is raised at the attribute access",
        "The select(User) itself succeeds (1 statement, N users); the error comes from "
        "the later attribute access (innermost frame of ours: touch()), not from the query.",
        expected=f"query: 1 statement, {users} users; raised in touch()",
        observed=f"query: {len(before_access)} statement(s), {len(loaded_users)} users; "
        f"raised in {raised_in(lazy_error)}",
        passed=len(before_access) == 1
        and len(loaded_users) == users
        and raised_in(lazy_error) == "touch()",
    )
    lab.check(
        "the lazy SELECT reaches the engine event, then is refused",
        "Observed: the lazy loader builds its SELECT and the engine's before_cursor_execute "
        "event sees it (so event-based statement counters count it), but the driver call "
        "needs an await and is refused; the session stays usable afterwards.",
        expected="1 statement seen at the access (FROM track_points); next query: ok",
        observed=f"{len(at_access)} statement(s) seen at the access"
        f"{' (FROM track_points)' if at_access and 'FROM track_points' in at_access[0] else ''}"
        f"; next query: {survived}",
        passed=len(at_access) == 1 and "FROM track_points" in at_access[0] and survived == "ok",
    )

    # 2. the fixes, each in a fresh session, counted and checked for the right children
    results: dict[str, Loaded] = {}

    def eager(option: ORMOption) -> Loader:
        async def load(session: AsyncSession) -> tuple[int, int]:
            found = (await session.scalars(parents.options(option))).all()
            return len(found), sum(touch(u) for u in found)

        return load

    results["selectinload"] = await measure(lab, eager(selectinload(User.track_points)))
    results["subqueryload"] = await measure(lab, eager(subqueryload(User.track_points)))

    stage = ["before the query"]

    async def joined_without_unique(session: AsyncSession) -> tuple[int, int]:
        result = await session.scalars(parents.options(joinedload(User.track_points)))
        stage[0] = "at .all(), after the query returned"
        found = result.all()
        stage[0] = "not raised"
        return len(found), sum(touch(u) for u in found)

    async def joined_with_unique(session: AsyncSession) -> tuple[int, int]:
        result = await session.scalars(parents.options(joinedload(User.track_points)))
        found = result.unique().all()
        return len(found), sum(touch(u) for u in found)

    results["joinedload without unique()"] = await measure(lab, joined_without_unique)
    results["joinedload + unique()"] = await measure(lab, joined_with_unique)

    async def awaitable(session: AsyncSession) -> tuple[int, int]:
        found = (await session.scalars(parents)).all()
        children = 0
        for user in found:
            children += len(await user.awaitable_attrs.track_points)
        return len(found), children

    results["awaitable_attrs"] = await measure(lab, awaitable)

    def sync_lazy(session: Session) -> tuple[int, int]:
        found = session.scalars(parents).all()
        return len(found), sum(touch(u) for u in found)

    async def in_run_sync(session: AsyncSession) -> tuple[int, int]:
        return await session.run_sync(sync_lazy)

    results["lazy load inside run_sync"] = await measure(lab, in_run_sync)

    async def raise_option(session: AsyncSession) -> tuple[int, int]:
        found = (await session.scalars(parents.options(raiseload(User.track_points)))).all()
        return len(found), sum(touch(u) for u in found)

    results["raiseload option"] = await measure(lab, raise_option)
    raise_parents = (
        select(RaiseUser).where(RaiseUser.username.startswith(prefix)).order_by(RaiseUser.id)
    )

    async def raise_mapping(session: AsyncSession) -> tuple[int, int]:
        found = (await session.scalars(raise_parents)).all()
        return len(found), sum(touch(u) for u in found)

    async def raise_mapping_selectin(session: AsyncSession) -> tuple[int, int]:
        query = raise_parents.options(selectinload(RaiseUser.track_points))
        found = (await session.scalars(query)).all()
        return len(found), sum(touch(u) for u in found)

    results['lazy="raise" mapping'] = await measure(lab, raise_mapping)
    results['lazy="raise" + selectinload'] = await measure(lab, raise_mapping_selectin)

    check_fixes(lab, results, users, expected_children, joined_stage=stage[0])
    await raise_and_per_object_loads(lab, raise_parents, points)
    await write_only(lab, prefix, users, points, results)

    for name, loaded in results.items():
        lab.figure(f"statements: {name} (N={users})", len(loaded.statements), "statements")
    for name, loaded in results.items():
        if not loaded.error:
            lab.figure(f"time: {name}", loaded.seconds, "s")
    fast = results["selectinload"].seconds
    if fast > 0:
        lab.figure(
            "time: awaitable_attrs (N+1) / selectinload",
            results["awaitable_attrs"].seconds / fast,
            "x",
        )


def check_fixes(
    lab: Lab, results: dict[str, Loaded], users: int, children: int, *, joined_stage: str
) -> None:
    def expect(statements: int) -> str:
        """What ``Loaded.summary()`` says when the load sent ``statements`` and found all rows."""
        return f"{statements} statement(s), {users} parents, {children} children"

    in_batches = -(-users // SELECTIN_BATCH)  # ceil: 1 for N <= 500
    selectin = results["selectinload"]
    has_in = len(selectin.statements) > 1 and " IN " in selectin.statements[1]
    lab.check(
        "selectinload: 2 statements (N <= 500)",
        "selectinload loads the N parents, then all their children with one "
        "SELECT ... WHERE track_points.user_id IN (...): 2 statements whatever N (one more "
        "per further 500 parents), and touching the collections afterwards needs no IO.",
        expected=expect(1 + in_batches) + "; 2nd has IN",
        observed=selectin.summary() + ("; 2nd has IN" if has_in else ""),
    )
    subquery = results["subqueryload"]
    lab.check(
        "subqueryload: 2 statements",
        "subqueryload also sends 2 statements: the parents, then the children joined to "
        "the parent query repeated as a subquery.",
        expected=expect(2),
        observed=subquery.summary(),
    )
    bare = results["joinedload without unique()"]
    lab.check(
        "joinedload of a collection without unique() is refused",
        "Joined eager loading of a collection returns one row per child; SQLAlchemy 2.x "
        "refuses to hand back those duplicated parents unless the result is uniqued: "
        "InvalidRequestError, 'The unique() method must be invoked ...'. The query itself "
        "runs (1 statement); the error comes when the rows are fetched (.all()).",
        expected="InvalidRequestError: The unique() method must be invoked on this Result, ...; "
        "raised at .all(), after the query returned; 1 statement(s)",
        observed=f"{bare.error or bare.summary()}; raised {joined_stage}; "
        f"{len(bare.statements)} statement(s)",
        passed=joined_stage == "at .all(), after the query returned"
        and len(bare.statements) == 1
        and isinstance(bare.raised, exc.InvalidRequestError)
        and "unique() method must be invoked" in bare.error,
    )
    joined = results["joinedload + unique()"]
    lab.check(
        "joinedload + unique(): 1 statement",
        "joinedload with .unique() on the result loads parents and children in one "
        "SELECT ... LEFT OUTER JOIN track_points: 1 statement.",
        expected=expect(1) + "; LEFT OUTER JOIN",
        observed=joined.summary()
        + ("; LEFT OUTER JOIN" if any("LEFT OUTER JOIN" in s for s in joined.statements) else ""),
    )
    awaited = results["awaitable_attrs"]
    lab.check(
        "awaitable_attrs: 1 + N statements",
        "await user.awaitable_attrs.track_points runs the same lazy load, but awaited: it "
        "works under asyncio and costs one SELECT per parent — the N+1 pattern.",
        expected=expect(1 + users),
        observed=awaited.summary(),
    )
    synced = results["lazy load inside run_sync"]
    lab.check(
        "plain lazy loading works inside run_sync: 1 + N",
        "Inside AsyncSession.run_sync the same sync code (plain attribute access) lazy "
        "loads without MissingGreenlet, since it runs in SQLAlchemy's greenlet; it is "
        "still N+1.",
        expected=expect(1 + users),
        observed=synced.summary(),
    )
    for name, attribute in (
        ("raiseload option", "User.track_points"),
        ('lazy="raise" mapping', "RaiseUser.track_points"),
    ):
        loaded = results[name]
        message = f"InvalidRequestError: '{attribute}' is not available due to lazy='raise'"
        lab.check(
            f"{name}: error at the access, no IO attempted",
            "With lazy='raise' (as an option or in the mapping) the parents load (1 "
            "statement), and touching the collection raises InvalidRequestError naming the "
            "relationship, in touch(), before any SQL is built: no second statement.",
            expected=f"{message}; 1 statement; raised in touch()",
            observed=f"{loaded.error or 'no error'}; {len(loaded.statements)} statement(s); "
            f"raised in {raised_in(loaded.raised)}",
            passed=isinstance(loaded.raised, exc.InvalidRequestError)
            and loaded.error == message
            and len(loaded.statements) == 1
            and raised_in(loaded.raised) == "touch()",
        )
    overridden = results['lazy="raise" + selectinload']
    lab.check(
        'lazy="raise" mapping + selectinload option: loads (2 statements)',
        "lazy='raise' is only the default: a query that asks for the collection with "
        "selectinload gets it (2 statements), so the mapping forces each query to say "
        "how it loads the relationship.",
        expected=expect(1 + in_batches),
        observed=overridden.summary(),
    )


async def raise_and_per_object_loads(lab: Lab, query: Select[RaiseUser], points: int) -> None:
    """On a lazy="raise" mapping: awaitable_attrs versus an explicit session.refresh()."""
    async with lab.sessions() as session:
        user = (await session.scalars(query.limit(1))).one()
        try:
            awaited = f"loaded {len(await user.awaitable_attrs.track_points)}"
        except Exception as err:
            awaited = describe(err)
        with lab.statements() as sent:
            await session.refresh(user, ["track_points"])
        try:
            refreshed = f"loaded {touch(user)} children with {len(sent)} statement(s)"
        except Exception as err:
            refreshed = describe(err)
        last_from = sent[-1].partition(" FROM ")[2].split(" ", 1)[0] if sent else "-"
    message = "InvalidRequestError: 'RaiseUser.track_points' is not available due to lazy='raise'"
    lab.check(
        'lazy="raise": awaitable_attrs does not bypass it, refresh(obj, [name]) does',
        "awaitable_attrs only runs the attribute's own loader in a greenlet, so on a "
        "lazy='raise' relationship it raises the same InvalidRequestError; naming the "
        "relationship in await session.refresh(obj, ['track_points']) loads it: observed 2 "
        "statements, SELECT users.id for the row, then the collection FROM track_points.",
        expected=f"awaitable_attrs: {message}; refresh: loaded {points} children with "
        "2 statement(s), the last FROM track_points",
        observed=f"awaitable_attrs: {awaited}; refresh: {refreshed}, the last FROM {last_from}",
        passed=awaited == message
        and refreshed == f"loaded {points} children with 2 statement(s)"
        and last_from == "track_points",
    )


async def write_only(
    lab: Lab, prefix: str, users: int, points: int, results: dict[str, Loaded]
) -> None:
    """WriteOnlyMapped: never loaded implicitly, queried explicitly, appended without a load."""
    query = (
        select(WriteOnlyUser)
        .where(WriteOnlyUser.username.startswith(prefix))
        .order_by(WriteOnlyUser.id)
    )
    async with lab.sessions() as session:
        owners = (await session.scalars(query)).all()
        with lab.statements() as at_read:
            collection = owners[0].track_points
        read_type = type(collection).__name__
        try:
            iterated = f"iterated {len(list(collection))} items"
        except Exception as err:
            iterated = describe(err)
    lab.check(
        "WriteOnlyMapped: reading the attribute loads nothing",
        "A write-only collection is never loaded implicitly: reading user.track_points "
        "returns a WriteOnlyCollection without sending any statement.",
        expected="WriteOnlyCollection, 0 statements",
        observed=f"{read_type}, {len(at_read)} statements",
        passed=isinstance(collection, WriteOnlyCollection) and not at_read,
    )
    lab.check(
        "WriteOnlyMapped: iterating the collection is refused",
        "Iterating a WriteOnlyCollection raises instead of loading: the caller must "
        "query it with collection.select().",
        expected="TypeError: WriteOnly collections don't support iteration in-place; ...",
        observed=iterated,
        passed=iterated.startswith("TypeError: WriteOnly collections don't support iteration"),
    )

    async def explicit(session: AsyncSession) -> tuple[int, int]:
        found = (await session.scalars(query)).all()
        children = 0
        for owner in found:
            children += len((await session.scalars(owner.track_points.select())).all())
        return len(found), children

    loaded = await measure(lab, explicit)
    results["WriteOnlyMapped select() per parent"] = loaded
    lab.check(
        "WriteOnlyMapped: explicit select() per parent, 1 + N",
        "await session.scalars(user.track_points.select()) loads one parent's children "
        "explicitly: 1 statement per parent, plus the parents' query.",
        expected=f"{1 + users} statement(s), {users} parents, {users * points} children",
        observed=loaded.summary(),
    )

    # add(): INSERT only, no load of the existing children
    async with lab.sessions() as session:
        owner = (await session.scalars(query.limit(1))).one()
        with lab.statements() as sent:
            owner.track_points.add(WritePoint(lat=45.19, lon=5.72, date=datetime.now(UTC)))
            await session.commit()
        count = len((await session.scalars(owner.track_points.select())).all())
    kinds = [s.split(" ", 1)[0] for s in sent]
    lab.check(
        "WriteOnlyMapped: add() inserts without loading the collection",
        "user.track_points.add(point) then commit sends only the INSERT of the new child "
        "(no SELECT of the existing ones); the parent then has M + 1 children.",
        expected=f"['INSERT']; {points + 1} children",
        observed=f"{kinds}; {count} children",
        passed=kinds == ["INSERT"] and "track_points" in sent[0] and count == points + 1,
    )

    # the same append on the ordinary relationship needs the collection loaded first
    async with lab.sessions() as session:
        user = (
            await session.scalars(
                select(User).where(User.username.startswith(prefix)).order_by(User.id).limit(1)
            )
        ).one()
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
        expected=f"MissingGreenlet: {MISSING_GREENLET}",
        observed=appended,
    )


async def seed(lab: Lab, prefix: str, users: int, points: int) -> None:
    """N users with M track points each, inserted with Core (executemany, batched)."""
    now = datetime.now(UTC)
    users_table = User.metadata.tables["users"]
    points_table = User.metadata.tables["track_points"]
    async with lab.engine.begin() as conn:
        ids = (
            await conn.scalars(
                insert(users_table).returning(users_table.c.id),
                [{"username": f"{prefix}{i:05d}"} for i in range(users)],
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
