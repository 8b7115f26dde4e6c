"""Suite-wide pytest plugins (fixtures that several test directories share)."""

# tests/store_fixtures.py: store / store_url / empty_store_url over SQLite and a real PostgreSQL.
pytest_plugins = ["store_fixtures"]
