"""Opening the store: engines for SQLite and PostgreSQL, migrations, transactions.

    store = open_store(sqlite_url(data_dir))           # the embedded default
    store = open_store("postgresql+psycopg://standby@/standby?host=/run/postgresql")

`open_store` upgrades the schema to the newest migration before it returns (Alembic,
configured in code: no alembic.ini). Then:

    with store.transaction() as s:      # one write transaction; commits or rolls back
        job = jobs.create(s, kind="protect", target="item:7", on_commit=runner.submit)
    # runner.submit(job.id) runs here, after the commit (never for a rolled-back job)

    with store.read() as s:             # a read-only session (rolled back at the end)
        ...

SQLite: the file lives under the control plane's data dir; WAL, foreign keys on, a
30 s busy timeout, and write transactions start with BEGIN IMMEDIATE so that two
writers queue on the lock instead of failing on a stale snapshot.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, create_engine, event, exc, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from standby.errors import Conflict, StandbyError

log = logging.getLogger(__name__)

DB_FILENAME = "control-plane.db"
SQLITE_BUSY_TIMEOUT_S = 30.0
# pg_advisory_xact_lock key serializing concurrent upgrades of one PostgreSQL database.
_PG_MIGRATION_LOCK = 0x5374616E6462  # "Standb"


class StoreError(StandbyError):
    """The store cannot be opened or migrated."""


def sqlite_url(data_dir: str | Path) -> str:
    """The embedded store's URL: a SQLite file in the control plane's data dir."""
    return f"sqlite:///{Path(data_dir).resolve() / DB_FILENAME}"


def _on_commit_callbacks(session: Session) -> list[Callable[[], Any]]:
    return session.info.setdefault("standby_on_commit", [])


def on_commit(session: Session, fn: Callable[[], Any]) -> None:
    """Run `fn()` after `session`'s transaction commits (never if it rolls back).

    Only sessions from `Store.transaction` run these callbacks; that is how a job is
    handed to a runner only once the row that describes it is committed."""
    if "standby_store" not in session.info:
        raise RuntimeError("on_commit needs a session from Store.transaction()")
    _on_commit_callbacks(session).append(fn)


@dataclass
class Store:
    """An open store: an engine, its sessions, and the URL (password masked) it came from."""

    engine: Engine
    _write: sessionmaker[Session] = field(init=False, repr=False)
    _read: sessionmaker[Session] = field(init=False, repr=False)
    # SQLite has one writer at a time: this process's writers queue here, woken in turn,
    # rather than in SQLite's busy handler, which sleeps and retries (up to 100 ms a try)
    # and let a heartbeat starve for seconds behind a stream of report batches.
    _write_lock: threading.RLock | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        write_engine = self.engine
        if self.dialect == "sqlite":
            write_engine = self.engine.execution_options(standby_sqlite_begin="IMMEDIATE")
            self._write_lock = threading.RLock()
        self._write = sessionmaker(write_engine, expire_on_commit=False, info={"standby_store": True})
        self._read = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def write_sessions(self) -> sessionmaker[Session]:
        """The factory of `transaction()`'s sessions (for session events)."""
        return self._write

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A write transaction. Commits when the block ends, rolls back on an exception;
        a broken uniqueness or reference rule becomes `Conflict`. Callbacks registered
        with `on_commit` run after the commit, in order."""
        lock = self._write_lock
        # past the busy timeout, SQLite's own locking decides (and reports "database is locked")
        queued = lock is not None and lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_S)
        session = self._write()
        try:
            try:
                yield session
                session.commit()
            except exc.IntegrityError as e:
                session.rollback()
                raise Conflict(f"the store refused the change: {_integrity_message(e)}") from e
            except BaseException:
                session.rollback()
                raise
            callbacks = list(_on_commit_callbacks(session))
        finally:
            session.info.pop("standby_on_commit", None)
            session.close()
            if queued:
                lock.release()  # type: ignore[union-attr]
        for fn in callbacks:
            fn()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading; whatever it changed is rolled back at the end."""
        session = self._read()
        try:
            yield session
        finally:
            session.rollback()
            session.close()

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _integrity_message(e: exc.IntegrityError) -> str:
    orig = e.orig
    diag = getattr(orig, "diag", None)  # psycopg: constraint name and detail
    if diag is not None and getattr(diag, "message_primary", None):
        parts = [diag.message_primary]
        if getattr(diag, "message_detail", None):
            parts.append(diag.message_detail)
        return " ".join(parts)
    return str(orig)


def create_store_engine(url: str | URL, **engine_kw: Any) -> Engine:
    """An engine with Standby's connection settings for SQLite or PostgreSQL."""
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(u, **engine_kw)
    if backend == "postgresql":
        if u.get_driver_name() not in ("psycopg", "psycopg2"):
            raise StoreError(f"{u.render_as_string()}: use the postgresql+psycopg:// driver")
        engine_kw.setdefault("pool_pre_ping", True)
        return create_engine(u, **engine_kw)
    raise StoreError(f"{u.render_as_string()}: the store runs on SQLite or PostgreSQL, not {backend}")


def _sqlite_engine(u: URL, **engine_kw: Any) -> Engine:
    memory = u.database in (None, "", ":memory:")
    if memory:
        engine_kw.setdefault("poolclass", StaticPool)
    else:
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
    engine_kw.setdefault("connect_args", {})
    engine_kw["connect_args"].setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
    engine_kw["connect_args"].setdefault("check_same_thread", False)
    engine = create_engine(u, **engine_kw)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below emit BEGIN instead of pysqlite.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("standby_sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


# ---------------------------------------------------------------- migrations


def alembic_config(connection: Connection | None = None, *, script_location: str | None = None) -> Config:
    """Alembic's configuration, built in code. With `connection`, commands run on it."""
    cfg = Config()
    cfg.set_main_option("script_location", script_location or "standby.store:migrations")
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision(*, script_location: str | None = None) -> str:
    head = ScriptDirectory.from_config(alembic_config(script_location=script_location)).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head", *, script_location: str | None = None) -> None:
    """Upgrade the schema in one transaction (DDL is transactional on both backends).

    PostgreSQL: an advisory lock serializes control planes starting together. SQLite:
    the write lock is taken first (BEGIN IMMEDIATE), and foreign keys are off while
    migrations run, because a batch migration rebuilds a table by dropping it and with
    foreign keys on that drop would cascade into the rows that refer to it; the foreign
    keys are checked before the commit instead."""
    scripts = ScriptDirectory.from_config(alembic_config(script_location=script_location))
    known = {s.revision for s in scripts.walk_revisions()}
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        raw: Any = None
        if sqlite:
            conn.execution_options(standby_sqlite_begin="IMMEDIATE")
            raw = conn.connection.dbapi_connection
            raw.execute("PRAGMA foreign_keys=OFF")  # outside a transaction, or it is ignored
        try:
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
                current = MigrationContext.configure(conn).get_current_revision()
                if current is not None and current not in known:
                    raise StoreError(
                        f"the database's schema is at revision {current}, which this version of Standby does "
                        "not know (it was written by a newer Standby): upgrade Standby or use another database"
                    )
                try:
                    command.upgrade(alembic_config(conn, script_location=script_location), revision)
                except CommandError as e:
                    raise StoreError(f"cannot migrate the store: {e}") from e
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise StoreError(f"migration left rows with dangling references: {broken[:5]}")
        finally:
            if raw is not None:
                raw.execute("PRAGMA foreign_keys=ON")


def _in_recovery(engine: Engine) -> bool:
    if engine.dialect.name != "postgresql":
        return False
    with engine.connect() as conn:
        return bool(conn.execute(text("SELECT pg_is_in_recovery()")).scalar())


def open_store(url: str | URL, *, migrate: bool | str = True, **engine_kw: Any) -> Store:
    """Open the store at `url` and bring its schema to the newest migration.

    `migrate="unless-standby"`: a PostgreSQL hot standby (in recovery, read-only) is not
    migrated, its schema is checked instead: it must be the one this Standby writes (the
    active site's control plane migrates, and the standby replays that)."""
    engine = create_store_engine(url, **engine_kw)
    try:
        if migrate == "unless-standby" and _in_recovery(engine):
            current, head = current_revision(engine), head_revision()
            if current != head:
                raise StoreError(f"the standby database's schema is at revision {current}, this Standby writes "
                                 f"{head}: run the same Standby version at both sites (the active one migrates)")
        elif migrate:
            upgrade(engine)
    except exc.OperationalError as e:
        engine.dispose()
        raise StoreError(f"cannot open the store at {engine.url.render_as_string()}: {e.orig}") from e
    except BaseException:
        engine.dispose()
        raise
    return Store(engine)


def migrations_dir() -> Path:
    return Path(str(resources.files("standby.store") / "migrations"))
