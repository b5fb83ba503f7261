"""The models on the real schema, each test inside a rolled-back transaction."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import selectinload
from sqlalchemy.orm.exc import StaleDataError

from orm_async_tests.db import create_session_factory
from orm_async_tests.models import Group, Job, JobStatus, TrackPoint, User, UserStatus


async def test_server_defaults(session: AsyncSession) -> None:
    user = User(username="defaults")
    session.add(user)
    await session.flush()
    assert user.status is UserStatus.active
    assert user.profile == {}
    assert user.login_count == 0
    assert user.created_at == user.updated_at
    assert user.created_at.tzinfo is not None


async def test_one_to_many_and_many_to_many(session: AsyncSession) -> None:
    walkers = Group(name="walkers")
    user = User(username="ramble", groups=[walkers])
    user.track_points = [
        TrackPoint(lat=45.1, lon=5.7, date=datetime(2024, 1, 1, tzinfo=UTC)),
        TrackPoint(lat=45.2, lon=5.8, date=datetime(2024, 1, 2, tzinfo=UTC)),
    ]
    session.add(user)
    await session.commit()  # a savepoint here: rolled back after the test
    session.expunge_all()
    loaded = await session.scalar(
        select(User)
        .where(User.username == "ramble")
        .options(selectinload(User.track_points), selectinload(User.groups))
    )
    assert loaded is not None
    assert [p.lat for p in loaded.track_points] == [45.1, 45.2]
    assert [g.name for g in loaded.groups] == ["walkers"]
    members = await session.scalar(
        select(Group).where(Group.name == "walkers").options(selectinload(Group.members))
    )
    assert members is not None
    assert [m.username for m in members.members] == ["ramble"]


async def test_deleting_a_user_cascades_in_the_database(session: AsyncSession) -> None:
    """With the points not loaded, the ORM leaves them to ON DELETE CASCADE
    (``passive_deletes``): had they been loaded, it would delete them itself."""
    user = User(username="gone")
    user.track_points = [TrackPoint(lat=1, lon=2, date=datetime.now(UTC))]
    session.add(user)
    await session.flush()
    points = select(func.count()).where(TrackPoint.user_id == user.id)
    assert await session.scalar(points) == 1
    session.expunge_all()
    await session.delete(await session.get_one(User, user.id))
    await session.flush()
    assert await session.scalar(points) == 0


async def test_jsonb_and_enum_round_trip(session: AsyncSession) -> None:
    job = Job(queue="q", payload={"points": [1, 2], "nested": {"ok": True}})
    session.add(job)
    await session.flush()
    session.expunge_all()
    again = await session.get_one(Job, job.id)
    assert again.payload == {"points": [1, 2], "nested": {"ok": True}}
    assert again.status is JobStatus.queued
    found = await session.scalar(select(Job.id).where(Job.payload["nested"]["ok"].as_boolean()))
    assert found == job.id


async def test_version_column_detects_a_concurrent_update(engine: AsyncEngine) -> None:
    """Two sessions load version 1; the second to flush gets StaleDataError."""
    sessions = create_session_factory(engine)
    async with sessions.begin() as setup:
        job = Job(queue="test-version")
        setup.add(job)
    try:
        async with sessions() as first, sessions() as second:
            a = await first.get_one(Job, job.id)
            b = await second.get_one(Job, job.id)
            a.attempts += 1
            await first.commit()
            assert a.version == 2
            b.attempts += 1
            with pytest.raises(StaleDataError):
                await second.commit()
    finally:
        async with sessions.begin() as cleanup:
            await cleanup.delete(await cleanup.get_one(Job, job.id))


async def test_savepoint_fixture_isolates_tests(session: AsyncSession) -> None:
    """Rows made by other tests (rolled back) are never seen; random order stays safe."""
    assert (
        await session.scalar(
            select(func.count()).select_from(User).where(User.username.in_(["defaults", "ramble"]))
        )
        == 0
    )
