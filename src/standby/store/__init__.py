"""Persistence for the control plane: SQLAlchemy, SQLite by default, PostgreSQL in production.

`open_store(url)` opens (and migrates) a store; `sqlite_url(data_dir)` is the embedded
default's URL. Models are in `standby.store.models`, job states in
`standby.store.states`, the repository functions in `standby.store.repo`.
"""

from standby.store.db import Store, StoreError, on_commit, open_store, sqlite_url

__all__ = ["Store", "StoreError", "on_commit", "open_store", "sqlite_url"]
