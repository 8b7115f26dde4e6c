"""Store fixtures: the same test body on SQLite and on a real PostgreSQL.

Registered by tests/conftest.py (`pytest_plugins`). Fixtures:

- `store_backend`: "sqlite" or "postgresql" (parametrized: a test using any fixture
  below runs once per backend; the PostgreSQL run carries the `postgresql` mark, so
  `-m "not postgresql"` runs SQLite only);
- `empty_store_url`: a URL to a new, empty database of that backend;
- `store_url`: an empty database already migrated to head, so a test pays no migration
  (SQLite: a copy of a per-session template file; PostgreSQL: one per-session database,
  every table truncated before each test);
- `store`: an open `Store` on `store_url`, closed at the end;
- `postgresql_server` (session): a throwaway PostgreSQL cluster.

PostgreSQL comes from Debian's packages (scripts/bootstrap.sh installs `postgresql`): the
session initdb's a cluster in a temporary directory, runs it on a unix socket in that
directory with no TCP listener (as the `postgres` user when the tests run as root: root
cannot run postgres), and removes it at the end. Durability is off in that cluster
(fsync, full-page writes): it is thrown away. PostgreSQL tests skip, saying why, only
when the server binaries are missing. STANDBY_TEST_PG_URL=postgresql+psycopg://...
points the tests at an existing server instead (a role that may CREATE DATABASE).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from standby.store import Store, open_store
from standby.store.db import DB_FILENAME

# The cluster itself lives in src/standby/testing/postgres.py (the benchmarks use it too);
# these names stay importable from here.
from standby.testing.postgres import PG_USER, PgCluster, PgServer, find_pg_bindir, server_from_url

__all__ = ["PG_USER", "PgCluster", "PgServer", "find_pg_bindir"]

BACKENDS = ["sqlite", "postgresql"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgresql: runs against a real PostgreSQL (started by the tests)")


_server_from_env = server_from_url


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[PgServer]:
    external = os.environ.get("STANDBY_TEST_PG_URL")
    if external:
        yield _server_from_env(external)
        return
    bindir = find_pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): run scripts/bootstrap.sh")
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam(PG_USER)
        except KeyError:
            pytest.skip(f"running as root and there is no {PG_USER!r} user to run PostgreSQL as")
    cluster = PgCluster(bindir)
    try:
        server = cluster.start()
        yield server
    finally:
        cluster.stop()


def _db_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture(
    params=[p if p == "sqlite" else pytest.param(p, marks=[pytest.mark.postgresql, pytest.mark.slow]) for p in BACKENDS]
)
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def empty_store_url(store_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new, empty database (no tables) of the backend under test."""
    if store_backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty' / DB_FILENAME}"
        return
    server: PgServer = request.getfixturevalue("postgresql_server")
    name = _db_name("standby_empty")
    url = server.create_database(name)
    try:
        yield url
    finally:
        server.drop_database(name)


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("store-template")
    open_store(f"sqlite:///{d / DB_FILENAME}").close()
    return d / DB_FILENAME


@pytest.fixture(scope="session")
def _pg_database(postgresql_server: PgServer) -> Iterator[str]:
    """One migrated PostgreSQL database per session, emptied before each test (TRUNCATE is
    much cheaper than CREATE DATABASE from a template, which checkpoints)."""
    name = _db_name("standby_test")
    url = postgresql_server.create_database(name)
    open_store(url).close()
    try:
        yield url
    finally:
        postgresql_server.drop_database(name)


def _truncate_all(url: str) -> None:
    from sqlalchemy import create_engine, text

    from standby.store.base import Base

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()


@pytest.fixture
def store_url(store_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A database of the backend under test, migrated to head and empty."""
    if store_backend == "sqlite":
        template: Path = request.getfixturevalue("_sqlite_template")
        target = tmp_path / "store" / DB_FILENAME
        target.parent.mkdir()
        shutil.copyfile(template, target)
        yield f"sqlite:///{target}"
        return
    url: str = request.getfixturevalue("_pg_database")
    _truncate_all(url)
    yield url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    try:
        yield s
    finally:
        s.close()
