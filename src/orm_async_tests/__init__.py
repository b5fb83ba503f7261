"""orm-async-tests: the executable field guide to async SQLAlchemy on PostgreSQL."""
