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
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from standby.store import Store, open_store
from standby.store.db import DB_FILENAME

PG_USER = "postgres"  # the OS user that runs the server when the tests run as root
BACKENDS = ["sqlite", "postgresql"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgresql: runs against a real PostgreSQL (started by the tests)")


def find_pg_bindir() -> Path | None:
    """Debian's server binaries (initdb, pg_ctl), newest major version first."""
    env = os.environ.get("STANDBY_PG_BINDIR")
    candidates = (
        [Path(env)]
        if env
        else sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
            reverse=True,
        )
    )
    for d in candidates:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    return None


@dataclass
class PgServer:
    """A PostgreSQL server the tests may create and drop databases on."""

    host: str  # a socket directory, or a host name
    user: str
    port: int = 5432
    password: str | None = None

    def url(self, database: str) -> str:
        cred = self.user if self.password is None else f"{self.user}:{self.password}"
        if self.host.startswith("/"):
            return f"postgresql+psycopg://{cred}@/{database}?host={self.host}&port={self.port}"
        return f"postgresql+psycopg://{cred}@{self.host}:{self.port}/{database}"

    def _admin(self):  # type: ignore[no-untyped-def]
        import psycopg

        return psycopg.connect(
            host=self.host, port=self.port, user=self.user, password=self.password, dbname="postgres", autocommit=True
        )

    def create_database(self, name: str) -> str:
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 STRATEGY FILE_COPY')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class PgCluster:
    """initdb + pg_ctl in a temporary directory; the socket lives there too."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="standby-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        if self.as_root:
            shutil.chown(self.root, user=PG_USER)
        self.root.chmod(0o700)

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        if self.as_root:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def start(self) -> PgServer:
        r = self._run(
            self.bindir / "initdb",
            "-D",
            self.data,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
            "--no-instructions",
        )
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        opts = (
            f"-k {self.root} -c listen_addresses='' -c fsync=off -c full_page_writes=off "
            "-c synchronous_commit=off -c max_connections=200"
        )
        r = self._run(self.bindir / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o", opts, "start")
        if r.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed ({r.returncode}): {r.stderr.strip()}\n{log}")
        return PgServer(host=str(self.root), user="postgres")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _server_from_env(url: str) -> PgServer:
    from sqlalchemy import make_url

    u = make_url(url)
    host = u.host or str(u.query.get("host", "/var/run/postgresql"))
    return PgServer(host=host, user=u.username or "postgres", port=u.port or 5432, password=u.password)


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
