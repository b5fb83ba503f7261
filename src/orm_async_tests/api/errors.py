"""How database failures become HTTP responses: never a 500 with a traceback.

| what happened | status |
|---|---|
| a unique constraint (23505) | 409, the endpoint names what is taken |
| a value PostgreSQL refuses (SQLSTATE class 22: out of range, bad encoding, ...) | 422 |
| the schema is not migrated (42P01) | 503, "run alembic upgrade head" |
| the server is down, refuses or times out; the pool is exhausted | 503 |
| anything else | 500 with a one-line body; the traceback goes to the server log only |
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, SQLAlchemyError, TimeoutError as PoolTimeoutError

from ..errors import MIGRATE_HINT, explain, first_line, sqlstate

log = logging.getLogger("orm_async_tests.api")


def status_and_detail(exc: BaseException, request: Request) -> tuple[int, str]:
    state = sqlstate(exc)
    if state == "23505":
        return 409, "already exists (unique constraint)"
    if state == "23503":
        return 409, "refers to a row that does not exist (foreign key)"
    if state is not None and state.startswith("22"):
        return 422, f"the database refused a value: {server_message(exc)}"
    if state in ("42P01", "3F000"):
        return 503, f"the database is not migrated: {MIGRATE_HINT}"
    if isinstance(exc, PoolTimeoutError):
        return 503, "no database connection free in time (pool exhausted); try again"
    target = getattr(request.app.state, "target", None)
    line = explain(exc, target)
    if line is not None:
        return 503, f"database unavailable: {line}"
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return 503, f"database connection lost: {server_message(exc)}"
    if isinstance(exc, OSError):  # TimeoutError included
        return 503, f"database unavailable: {type(exc).__name__}"
    return 500, "internal error (see the server log)"


def server_message(exc: BaseException) -> str:
    """The driver's message, without SQLAlchemy's class prefix and SQL echo."""
    text = first_line(exc)
    return text.split(") ", 1)[1] if text.startswith("(") and ") " in text else text


def install(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        status, detail = status_and_detail(exc, request)
        if status >= 500:
            log.error(
                "%s %s -> %d: %s",
                request.method,
                request.url.path,
                status,
                detail,
                exc_info=status == 500,
            )
        if status == 422:  # the same shape as FastAPI's own validation errors
            body: Any = [{"loc": ["body"], "msg": detail, "type": "database_refused"}]
            return JSONResponse({"detail": body}, status_code=status)
        return JSONResponse({"detail": detail}, status_code=status)

    # the specific classes are handled in place; Exception alone goes to Starlette's
    # ServerErrorMiddleware, which answers and then re-raises (TimeoutError is an OSError)
    for kind in (SQLAlchemyError, OSError, Exception):
        app.add_exception_handler(kind, handle)
