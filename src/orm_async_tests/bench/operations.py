"""The operations every implementation runs, what one op is, and how its results are checked.

One *op* is one unit of work an application would do: a single-row insert is
committed on its own, a batch or a bulk insert is one atomic write, a read
returns its rows materialised (objects, records or tuples with every column the
operation asks for). Each :class:`Operation` makes the inputs of ``n`` ops
(:meth:`~Operation.items`; seeding rows first when it needs to, e.g. the rows a
*delete* removes), checks what the ops returned and left in the database
(:meth:`~Operation.check`), and clears what they wrote (:meth:`~Operation.reset`).
None of that is timed.

The check compares values, not just counts, and reads the database through the
project's own engine, so an implementation that returns too few rows, the wrong
rows, undecoded JSON, or writes nothing, fails its cell.
"""

from __future__ import annotations

import enum
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from typing import Any, ClassVar, NamedTuple

from .dataset import Dataset, date_of, lat_of

GROUPS = {"reads": "Reads", "writes": "Writes"}


class SmallFilter(NamedTuple):
    """The points of one user from ``since`` on."""

    user_id: int
    since: datetime


class Update(NamedTuple):
    """Set ``login_count`` of one user (``updated_at`` moves with it)."""

    user_id: int
    login_count: int


def field(obj: Any, name: str) -> Any:
    """``obj.name``, or ``obj[name]`` for asyncpg records and dicts."""
    try:
        return getattr(obj, name)
    except AttributeError:
        return obj[name]


def plain(value: Any) -> Any:
    """An enum's value (``UserStatus.active`` → ``"active"``), anything else as it is."""
    return value.value if isinstance(value, enum.Enum) else value


class Operation(ABC):
    key: ClassVar[str]
    title: ClassVar[str]
    group: ClassVar[str]
    one_op: ClassVar[str]
    """What one op does, for the report."""

    @abstractmethod
    async def items(self, data: Dataset, n: int, concurrency: int) -> list[Any]:
        """Inputs of ``n`` ops; op ``i`` runs in task ``i % concurrency``."""

    @abstractmethod
    async def check(self, data: Dataset, items: Sequence[Any], results: Sequence[Any]) -> list[str]:
        """What is wrong with these results (and the database after them): empty when right."""

    async def reset(self, data: Dataset) -> None:  # noqa: B027 (most operations write nothing)
        """Remove what the ops wrote, so the next run starts from the same rows."""

    def describe(self, data: Dataset) -> str:
        return self.one_op.format(s=data.sizes)


OPERATIONS: dict[str, Operation] = {}
"""In the order they run and are reported: reads first, on freshly seeded and analysed
tables, then writes, bulk insert last (it leaves the most dead rows behind)."""


def operation(cls: type[Operation]) -> type[Operation]:
    """Register an operation (runs and reports keep this order)."""
    OPERATIONS[cls.key] = cls()
    return cls


def first_problems(problems: list[str], limit: int = 2) -> list[str]:
    if len(problems) <= limit:
        return problems
    return [*problems[:limit], f"… and {len(problems) - limit} more"]


def expect_points(
    label: str, rows: Sequence[Any], user_id: int, ks: Sequence[int], *, full: bool = True
) -> list[str]:
    """``rows`` are exactly points ``ks`` of ``user_id`` (any order) with the right values;
    ``full``: with every column (``created_at`` included)."""
    if len(rows) != len(ks):
        return [f"{label}: {len(rows)} rows, expected {len(ks)}"]
    wrong: list[str] = []
    seen = set()
    for row in rows:
        k = int(field(row, "lon"))
        seen.add(k)
        if field(row, "user_id") != user_id:
            wrong.append(f"{label}: a row of user {field(row, 'user_id')}, expected {user_id}")
        elif field(row, "lat") != lat_of(k) or field(row, "date") != date_of(k):
            wrong.append(f"{label}: point {k}: lat/date {field(row, 'lat')}/{field(row, 'date')}")
        elif not isinstance(field(row, "id"), int):
            wrong.append(f"{label}: point {k} has no integer id")
        elif full and not isinstance(field(row, "created_at"), datetime):
            wrong.append(f"{label}: point {k} has no created_at")
        if wrong:
            break
    if not wrong and seen != set(ks):
        wrong.append(f"{label}: points {sorted(seen)[:5]}…, expected {list(ks)[:5]}…")
    return wrong


# -- reads ----------------------------------------------------------------------------------


@operation
class GetByPk(Operation):
    key = "get_by_pk"
    title = "get by primary key"
    group = "reads"
    one_op = "read one user (every column) by id"

    async def items(self, data: Dataset, n: int, concurrency: int) -> list[Any]:
        ids = data.read_ids
        return [ids[i % len(ids)] for i in range(n)]

    async def check(self, data: Dataset, items: Sequence[Any], results: Sequence[Any]) -> list[str]:
        index = {uid: i for i, uid in enumerate(data.read_ids)}
        problems = []
        for uid, user in zip(items, results, strict=True):
            i = index[uid]
            got = {
                "id": field(user, "id"),
                "username": field(user, "username"),
                "login_count": field(user, "login_count"),
                "status": plain(field(user, "status")),
                "profile": field(user, "profile"),
                "tags": list(field(user, "tags")),
                "public_id is a UUID": isinstance(field(user, "public_id"), uuid.UUID),
                "created_at is a datetime": isinstance(field(user, "created_at"), datetime),
                "updated_at is a datetime": isinstance(field(user, "updated_at"), datetime),
            }
            want = {
                "id": uid,
                "username": f"{data.tag}r{i:05d}",
                "login_count": i,
                "status": "active",
                "profile": {},
                "tags": [],
            }
            wrong = {k: v for k, v in got.items() if v != want.get(k, True)}
            if wrong:
                expected = {k: want.get(k, True) for k in wrong}
                problems.append(f"user {uid}: {wrong}, expected {expected}")
        return first_problems(problems)


@operation
class GetNarrow(Operation):
    key = "get_narrow"
    title = "get by primary key, narrow row"
    group = "reads"
    one_op = "read one group (two columns: id, name) by id"

    async def items(self, data: Dataset, n: int, concurrency: int) -> list[Any]:
        ids = data.group_ids
        return [ids[i % len(ids)] for i in range(n)]

    async def check(self, data: Dataset, items: Sequence[Any], results: Sequence[Any]) -> list[str]:
        index = {gid: i for i, gid in enumerate(data.group_ids)}
        problems = []
        for gid, group in zip(items, results, strict=True):
            got = (field(group, "id"), field(group, "name"))
            want = (gid, f"{data.tag}g{index[gid]:05d}")
            if got != want:
                problems.append(f"group {gid}: (id, name) = {got}, expected {want}")
        return first_problems(problems)


@operation
class FilterSmall(Operation):
    key = "filter_small"
    title = "small filter"
    group = "reads"
    one_op = "a user's track points since a date: {s.small} of its {s.children}"

    async def items(self, data: Dataset, n: int, concurrency: int) -> list[Any]:
        s = data.sizes
        since = date_of(s.children - s.small)
        return [SmallFilter(data.parent_ids[i % s.parents], since) for i in range(n)]

    async def check(self, data: Dataset, items: Sequence[Any], results: Sequence[Any]) -> list[str]:
        s = data.sizes
        ks = range(s.children - s.small, s.children)
        problems = []
        for item, rows in zip(items, results, strict=True):
            problems += expect_points(f"user {item.user_id}", rows, item.user_id, ks)
        return first_problems(problems)


@operation
class FilterLarge(Operation):
    key = "filter_large"
    title = "large filter"
    group = "reads"
    one_op = "all {s.large:,} track points of a user, every column"

    async def items(self, data: Dataset, n: int, concurrency: int) -> list[Any]:
        return [data.big_id] * n

    async def check(self, data: Dataset, items: Sequence[Any], results: Sequence[Any]) -> list[str]:
        ks = range(data.sizes.large)
        problems = []
        for i, rows in enumerate(results):
            problems += expect_points(f"op {i}", rows, data.big_id, ks)
        return first_problems(problems)


@operation
class FilterTuples(Operation):
    key = "filter_tuples"
    title = "filter → tuples"
    group = "reads"
    one_op = "(id, lat, lon, date) of a user's {s.large:,} track points, as plain tuples"

    async def items(self, data: Dataset, n: int, concurrency: int) -> list[Any]:
        return [data.big_id] * n

    async def check(self, data: Dataset, items: Sequence[Any], results: Sequence[Any]) -> list[str]:
        ks = range(data.sizes.large)
        columns = ("id", "lat", "lon", "date")
        problems = []
        for i, rows in enumerate(results):
            as_points = [
                dict(zip(columns, row, strict=True)) | {"user_id": data.big_id} for row in rows
            ]
            problems += expect_points(f"op {i}", as_points, data.big_id, ks, full=False)
        return first_problems(problems)


@operation
class Relationship(Operation):
    key = "relationship"
    title = "relationship load"
    group = "reads"
    one_op = "{s.parents_per_load} users by id, each with its {s.children} track points"

    async def items(self, data: Dataset, n: int, concurrency: int) -> list[Any]:
        per = data.sizes.parents_per_load
        groups = [data.parent_ids[j : j + per] for j in range(0, data.sizes.parents, per)]
        return [groups[i % len(groups)] for i in range(n)]

    async def check(self, data: Dataset, items: Sequence[Any], results: Sequence[Any]) -> list[str]:
        ks = range(data.sizes.children)
        problems: list[str] = []
        for ids, loaded in zip(items, results, strict=True):
            parents = sorted(field(parent, "id") for parent, _ in loaded)
            if parents != sorted(ids):
                problems.append(f"parents {parents[:3]}…, expected {sorted(ids)[:3]}…")
                continue
            for parent, children in loaded:
                uid = field(parent, "id")
                problems += expect_points(f"user {uid}", list(children), uid, ks)
        return first_problems(problems)


# -- writes ------------------------------------------------------------------------------


@operation
class InsertSingle(Operation):
    key = "insert_single"
    title = "single insert"
    group = "writes"
    one_op = "insert one user, committed on its own, its id returned"

    async def items(self, data: Dataset, n: int, concurrency: int) -> list[Any]:
        return [f"{data.tag}n{data.serial():08d}" for _ in range(n)]

    async def check(self, data: Dataset, items: Sequence[Any], results: Sequence[Any]) -> list[str]:
        found = await data.users_named(items)
        problems = [
            f"{name}: returned id {got!r}, the database has {found.get(name)!r}"
            for name, got in zip(items, results, strict=True)
            if found.get(name) is None or got != found[name]
        ]
        return first_problems(problems)

    async def reset(self, data: Dataset) -> None:
        await data.clear_new_users()


@operation
class UpdatePartial(Operation):
    key = "update_partial"
    title = "partial update"
    group = "writes"
    one_op = "set one column of one user by id (and updated_at = now()), committed"

    async def items(self, data: Dataset, n: int, concurrency: int) -> list[Any]:
        ids = data.update_ids
        # id i % len(ids) always lands in task i % concurrency: no two tasks lock one row
        ids = ids[: len(ids) - len(ids) % concurrency] or ids
        return [Update(ids[i % len(ids)], data.serial()) for i in range(n)]

    async def check(self, data: Dataset, items: Sequence[Any], results: Sequence[Any]) -> list[str]:
        last = {item.user_id: item.login_count for item in items}
        found = await data.counters(list(last))
        problems = [
            f"user {uid}: login_count {found.get(uid, (None,))[0]}, expected {value} "
            f"(updated_at moved: {found.get(uid, (0, False))[1]})"
            for uid, value in last.items()
            if found.get(uid) != (value, True)
        ]
        return first_problems(problems)

    async def reset(self, data: Dataset) -> None:
        # updated_at back to created_at: the check then sees whether THIS cell's ops
        # moved it, not an earlier cell's
        await data.unmove_updated_at(data.update_ids)


@operation
class Delete(Operation):
    key = "delete"
    title = "delete"
    group = "writes"
    one_op = "delete one track point by id, committed"
    canaries = 3

    async def items(self, data: Dataset, n: int, concurrency: int) -> list[Any]:
        await data.clear_points([data.deleter_id])
        ids = await data.seed_points(data.deleter_id, n + self.canaries)
        return ids[: -self.canaries]

    async def check(self, data: Dataset, items: Sequence[Any], results: Sequence[Any]) -> list[str]:
        left = await data.point_ids(data.deleter_id)
        if len(left) == self.canaries and not set(left) & set(items):
            return []
        gone = self.canaries - len(set(left) - set(items))
        return [
            f"{len(set(left) & set(items))} of {len(items)} points still there, "
            f"{gone} of {self.canaries} points that were not to be deleted are gone"
        ]

    async def reset(self, data: Dataset) -> None:
        await data.clear_points([data.deleter_id])


class _PointsInsert(Operation):
    group = "writes"

    def size(self, data: Dataset) -> int:
        raise NotImplementedError

    async def items(self, data: Dataset, n: int, concurrency: int) -> list[Any]:
        writers = data.writer_ids[:concurrency]
        return [data.rows(writers[i % concurrency], self.size(data)) for i in range(n)]

    async def check(self, data: Dataset, items: Sequence[Any], results: Sequence[Any]) -> list[str]:
        size = self.size(data)
        writers = sorted({rows[0]["user_id"] for rows in items})
        expected = (
            len(items) * size,
            size,
            0.0,
            float(size - 1),
            len(items) * sum(lat_of(k) for k in range(size)),
        )
        got = await data.point_stats(writers)
        exact, sums = got[:4] == expected[:4], abs(got[4] - expected[4]) < 1e-6 * expected[4]
        if exact and sums:
            return []
        return [
            f"count, distinct lon, min, max, sum(lat) = {got}, expected "
            f"{(*expected[:4], round(expected[4], 3))}"
        ]

    async def reset(self, data: Dataset) -> None:
        await data.clear_points(data.writer_ids)


@operation
class InsertBatch(_PointsInsert):
    key = "insert_batch"
    title = "batch insert"
    one_op = "insert {s.batch} track points given as dicts, one atomic write"

    def size(self, data: Dataset) -> int:
        return data.sizes.batch


@operation
class InsertBulk(_PointsInsert):
    key = "insert_bulk"
    title = "bulk insert"
    one_op = "insert {s.bulk:,} track points given as dicts, one atomic write"

    def size(self, data: Dataset) -> int:
        return data.sizes.bulk
