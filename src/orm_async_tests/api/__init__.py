"""A FastAPI service over the users/track-points domain, on the shared db module.

``create_app()`` builds it; ``poetry run api`` serves it with uvicorn.
"""

from .app import create_app

__all__ = ["create_app"]
