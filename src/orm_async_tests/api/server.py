"""``poetry run api``: serve the API with uvicorn on ``API_HOST``:``API_PORT`` (127.0.0.1:8000)."""

from __future__ import annotations

import sys

import uvicorn

from ..settings import Settings, SettingsError
from .app import create_app


def main() -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"orm-async-tests API on http://{settings.api_host}:{settings.api_port} "
        f"(OpenAPI docs at /docs)",
        file=sys.stderr,
    )
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port)
    return 0
