"""What the server says about our connections: small queries experiments share.

Each probe runs on its own short connection from the engine given (usually
``lab.engine``), so it never disturbs the sessions it observes.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

_BACKENDS = text(
    """
    SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database()
      AND pid <> pg_backend_pid()
      AND application_name = :app
      AND (CAST(:state AS text) IS NULL OR state = :state)
      AND (CAST(:query AS text) IS NULL OR query LIKE :query)
    """
)


async def backends(
    engine: AsyncEngine,
    application_name: str,
    *,
    state: str | None = None,
    query_like: str | None = None,
) -> int:
    """Server connections with this ``application_name`` (optionally in ``state`` /
    running a query ``LIKE query_like``), the probe's own connection excluded."""
    async with engine.connect() as conn:
        found = await conn.scalar(
            _BACKENDS, {"app": application_name, "state": state, "query": query_like}
        )
    return int(found or 0)


async def backend_pids(engine: AsyncEngine, application_name: str) -> list[int]:
    """PIDs of the server processes behind this ``application_name``'s connections."""
    async with engine.connect() as conn:
        rows = await conn.scalars(
            text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND application_name = :app ORDER BY pid"
            ),
            {"app": application_name},
        )
        return list(rows)
