"""Alembic environment for the control plane's store, driven from code.

`standby.store.db` builds the Alembic Config in Python and passes an open connection in
`config.attributes["connection"]`; there is no alembic.ini and no URL here. Migrations
render in batch mode so that SQLite (which cannot ALTER most things) gets a table
rebuild where PostgreSQL gets an ALTER.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection

from standby.store import models  # noqa: F401  (registers every table on the metadata)
from standby.store.base import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | bool:
    """Migrations must not import the models (they change; a migration must not): render
    the store's own column types as the plain SQLAlchemy types they stand for."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        render_item=_render_item,
        transaction_per_migration=False,
    )


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("standby.store migrations run through standby.store.db (no connection was given)")
    if context.is_offline_mode():
        raise RuntimeError("offline (SQL script) migrations are not supported")
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


run()
