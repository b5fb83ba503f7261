"""The FastAPI service: endpoints over a rolled-back session, errors, fuzzing, a real server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Err, Ok
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import NullPool

from orm_async_tests.api import create_app
from orm_async_tests.api.app import session_dependency
from orm_async_tests.api.errors import status_and_detail
from orm_async_tests.db import Database, Target, open_database
from orm_async_tests.lab import server
from orm_async_tests.lab.env import environment, free_port
from orm_async_tests.lab.probes import checked_out
from orm_async_tests.settings import Settings

from .commands import SCRIPTS

POINT = {"lat": 45.19, "lon": 5.72, "date": "2024-05-01T10:00:00+02:00"}


@pytest.fixture
async def client(database: Database, session: AsyncSession) -> AsyncIterator[httpx.AsyncClient]:
    """The app with each request's session replaced by the test's SAVEPOINT-isolated one."""
    app = create_app(database=database)

    async def same_session() -> AsyncIterator[AsyncSession]:
        yield session

    app.dependency_overrides[session_dependency] = same_session
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        yield http


async def test_create_get_list_users(client: httpx.AsyncClient) -> None:
    created = await client.post("/users", json={"username": "api-ada", "tags": ["x"]})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["username"] == "api-ada"
    assert body["status"] == "active"
    assert body["tags"] == ["x"]
    got = await client.get(f"/users/{body['id']}")
    assert got.json() == body
    listed = await client.get("/users", params={"limit": 500})
    assert body in listed.json()


async def test_track_points_bulk_and_pages(client: httpx.AsyncClient) -> None:
    user = (await client.post("/users", json={"username": "api-walker"})).json()
    points = [{**POINT, "lat": 45 + i / 1000} for i in range(25)]
    added = await client.post(f"/users/{user['id']}/track-points", json=points)
    assert added.status_code == 201
    assert added.json() == {"inserted": 25}
    seen: list[float] = []
    after = 0
    while True:
        page = (
            await client.get(
                f"/users/{user['id']}/track-points", params={"after": after, "limit": 10}
            )
        ).json()
        seen += [p["lat"] for p in page["items"]]
        if page["next_after"] is None:
            break
        after = page["next_after"]
    assert seen == [p["lat"] for p in points]
    stats = (await client.get("/stats")).json()
    assert stats["track_points"] >= 25
    assert stats["users"] >= 1


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/users", {"username": "has space"}),
        ("post", "/users", {"username": ""}),
        ("post", "/users", {"username": "x" * 65}),
        ("post", "/users/1/track-points", [{**POINT, "lat": 91}]),
        ("post", "/users/1/track-points", [{**POINT, "date": "2024-05-01T10:00:00"}]),
        ("get", "/users/0", None),
        ("get", f"/users/{2**63}", None),
        ("get", "/users?limit=0", None),
    ],
)
async def test_bad_input_is_422(
    client: httpx.AsyncClient, method: str, path: str, body: object
) -> None:
    response = await client.request(method, path, json=body)
    assert response.status_code == 422, response.text


async def test_missing_rows_are_404(client: httpx.AsyncClient) -> None:
    for response in (
        await client.get("/users/987654321"),
        await client.post("/users/987654321/track-points", json=[POINT]),
        await client.get("/users/987654321/track-points"),
    ):
        assert response.status_code == 404
        assert response.json() == {"detail": "no user 987654321"}


async def test_unique_violation_is_409_and_the_session_goes_on(client: httpx.AsyncClient) -> None:
    assert (await client.post("/users", json={"username": "api-twin"})).status_code == 201
    again = await client.post("/users", json={"username": "api-twin"})
    assert again.status_code == 409
    assert again.json() == {"detail": "username 'api-twin' is already taken"}
    assert (await client.post("/users", json={"username": "api-third"})).status_code == 201


async def test_nul_characters_are_refused_up_front(client: httpx.AsyncClient) -> None:
    """PostgreSQL refuses NUL in text and jsonb; the schema refuses it first."""
    for body in (
        {"username": "api-nul", "profile": {"a": "\0"}},
        {"username": "a", "tags": ["\0"]},
    ):
        response = await client.post("/users", json=body)
        assert response.status_code == 422
        assert response.json()["detail"][0]["type"] == "string_pattern_mismatch"


async def test_values_postgres_refuses_map_to_422(session: AsyncSession) -> None:
    """The safety net: a data exception (SQLSTATE class 22) from the server is a 422."""
    with pytest.raises(DBAPIError) as caught:
        await session.execute(text("SELECT CAST(:v AS text)"), {"v": "a\0"})
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(target=None)))
    status, detail = status_and_detail(caught.value, request)  # type: ignore[arg-type]
    assert status == 422
    assert "invalid byte sequence" in detail


async def test_database_down_is_503_with_a_clear_body() -> None:
    dead = Settings.from_env({"DATABASE_URL": "postgresql://me:s3cr3t@127.0.0.1:1/nowhere"})
    assert dead.database_url is not None
    async with open_database(dead, target=Target(dead.database_url)) as db:
        app = create_app(database=db)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            for path in ("/health", "/users", "/stats"):
                response = await http.get(path)
                assert response.status_code == 503
                detail = response.json()["detail"]
                assert detail.startswith("database unavailable: cannot reach PostgreSQL")
                assert "s3cr3t" not in response.text
        assert checked_out(db.engine) == 0


async def test_no_connection_leaks_after_errors(database: Database) -> None:
    """Without the test override: 201, 409, 404, 422 and 422-from-PostgreSQL all return
    their connection."""
    app = create_app(database=database)
    transport = httpx.ASGITransport(app=app)
    name = f"api-leak-{time.monotonic_ns()}"
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        statuses = [
            (await http.post("/users", json={"username": name})).status_code,
            (await http.post("/users", json={"username": name})).status_code,
            (await http.get("/users/987654321")).status_code,
            (
                await http.post("/users", json={"username": f"{name}-b", "profile": {"a": "\0"}})
            ).status_code,
        ]
    assert statuses == [201, 409, 404, 422]
    assert checked_out(database.engine) == 0


@pytest.fixture(scope="module")
def fuzz_app(settings: Settings, target: Target) -> FastAPI:
    """Schemathesis drives the app from its own thread and event loop: NullPool, so no
    connection crosses loops (experiment 12)."""
    db = open_database(settings, target=target, poolclass=NullPool)
    return create_app(database=db)


def test_fuzz_no_server_errors(fuzz_app: FastAPI) -> None:
    """Schemathesis against the app's own OpenAPI schema, every operation, bounded
    examples: never a 5xx, and every response matches the schema."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    calls: list[str] = []
    found = list(schema.get_all_operations())
    assert [f.err() for f in found if isinstance(f, Err)] == []  # the app's schema is valid
    operations = [f.ok() for f in found if isinstance(f, Ok)]
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def fuzz(case: schemathesis.Case[Any]) -> None:
            response = case.call()
            calls.append(f"{case.method} {case.path}")
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
            )
            case.validate_response(response)

        fuzz()
    assert len(set(calls)) == len(operations) == 7  # every operation was exercised


async def test_real_uvicorn_serves_openapi_and_requests(
    database: Database,  # the run's schema, migrated: an external server is not migrated for us
    tmp_path: Path,
) -> None:
    """`poetry run api` as a user starts it: a real server on a free loopback port."""
    port = free_port()
    async with (
        server.serving(
            [str(SCRIPTS / "api")],
            port=port,
            env=environment({"API_PORT": str(port)}),
            log=tmp_path / "api.log",
            name="api",
        ) as api,
        api.client() as http,
    ):
        openapi = (await http.get("/openapi.json")).json()
        assert "/users/{user_id}/track-points" in openapi["paths"]
        name = f"api-real-{datetime.now(UTC).timestamp()}"
        created = await http.post("/users", json={"username": name})
        assert created.status_code == 201, created.text
        docs = await http.get("/docs")
        assert docs.status_code == 200
    # stopped with SIGTERM: a graceful shutdown, the lifespan's exit ran
    assert "Application shutdown complete." in api.log_text(), api.log_text()
