"""A throwaway PostgreSQL for tests and benchmarks, from Debian's server packages.

    cluster = PgCluster(find_pg_bindir())       # initdb in a temporary directory
    server = cluster.start()                    # pg_ctl start: unix socket only, no TCP
    url = server.create_database("standby_x")   # postgresql+psycopg://postgres@/standby_x?host=...
    ...
    cluster.stop()                              # pg_ctl stop, the directory removed

The cluster runs on a unix socket in its own directory with no TCP listener, as the
`postgres` user when the caller is root (root cannot run postgres). Durability is off
(fsync, full-page writes, synchronous commit): it is thrown away. `reason_unavailable()`
says why a cluster cannot be started here (no server binaries, root without a
`postgres` user), or None. `server_from_url()` wraps an existing server instead (a role
that may CREATE DATABASE). tests/store_fixtures.py and bench/control_plane.py use this.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PG_USER = "postgres"  # the OS user that runs the server when the caller is root


def find_pg_bindir() -> Path | None:
    """Debian's server binaries (initdb, pg_ctl), newest major version first
    (STANDBY_PG_BINDIR overrides)."""
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


def reason_unavailable() -> str | None:
    """None when a throwaway cluster can be started here, else why not."""
    if find_pg_bindir() is None:
        return "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): run scripts/bootstrap.sh"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root and there is no {PG_USER!r} user to run PostgreSQL as"
    return None


@dataclass
class PgServer:
    """A PostgreSQL server the caller may create and drop databases on."""

    host: str  # a socket directory, or a host name
    user: str
    port: int = 5432
    password: str | None = None

    def url(self, database: str) -> str:
        cred = self.user if self.password is None else f"{self.user}:{self.password}"
        if self.host.startswith("/"):
            return f"postgresql+psycopg://{cred}@/{database}?host={self.host}&port={self.port}"
        return f"postgresql+psycopg://{cred}@{self.host}:{self.port}/{database}"

    def _admin(self) -> Any:
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
    """initdb + pg_ctl in a temporary directory; the socket lives there too.

    By default a throwaway server: unix socket only, durability off. For the site-loss
    tests: `listen` (an address to serve TCP on), `prefix` (a command prefix such as
    `ip netns exec NS`: the server runs inside that network namespace), `replication`
    (WAL for a streaming standby; peers on `trust_net` may connect), `durable` (fsync on:
    a server that is SIGKILLed must come back with what it committed).
    `start_standby(host, port)` makes this cluster a hot standby of another
    (pg_basebackup -R), `promote()` and `kill()` do what they say."""

    def __init__(self, bindir: Path, *, max_connections: int = 200, listen: str = "", port: int = 5432,
                 prefix: list[str] | None = None, replication: bool = False, durable: bool = False,
                 trust_net: str | None = None) -> None:
        self.bindir = bindir
        self.max_connections = max_connections
        self.listen, self.port = listen, port
        self.prefix = list(prefix or [])
        self.replication, self.durable, self.trust_net = replication, durable, trust_net
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="standby-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        if self.as_root:
            shutil.chown(self.root, user=PG_USER)
        self.root.chmod(0o700)

    def _run(self, *args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        if self.as_root:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        return subprocess.run([*self.prefix, *cmd], capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def _options(self) -> str:
        opts = (f"-k {self.root} -c listen_addresses='{self.listen}' -p {self.port} "
                f"-c max_connections={self.max_connections}")
        if not self.durable:
            opts += " -c fsync=off -c full_page_writes=off -c synchronous_commit=off"
        if self.replication:
            opts += " -c wal_level=replica -c max_wal_senders=10 -c hot_standby=on -c wal_keep_size=256MB"
        return opts

    def _pg_ctl_start(self) -> None:
        r = self._run(self.bindir / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o",
                      self._options(), "start")
        if r.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed ({r.returncode}): {r.stderr.strip()}\n{log}")

    def server(self) -> PgServer:
        return PgServer(host=str(self.root), user="postgres", port=self.port)

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
        if self.trust_net:
            with open(self.data / "pg_hba.conf", "a") as f:
                f.write(f"host all all {self.trust_net} trust\nhost replication all {self.trust_net} trust\n")
        self._pg_ctl_start()
        return self.server()

    def start_standby(self, primary_host: str, primary_port: int = 5432) -> PgServer:
        """A hot standby of the server at primary_host:primary_port (streaming replication)."""
        r = self._run(self.bindir / "pg_basebackup", "-D", self.data, "-R", "-X", "stream", "-h", primary_host,
                      "-p", str(primary_port), "-U", "postgres", "-c", "fast", timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"pg_basebackup failed ({r.returncode}): {r.stderr.strip()}")
        self._pg_ctl_start()
        return self.server()

    def promote(self) -> None:
        r = self._run(self.bindir / "pg_ctl", "-D", self.data, "-w", "-t", "60", "promote")
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl promote failed ({r.returncode}): {r.stderr.strip()}")

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        """SIGKILL the postmaster (its backends exit when they see it gone): a crash."""
        import signal

        pid = self.pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", "immediate" if self.durable else "fast",
                          "-w", "-t", "60", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def server_from_url(url: str) -> PgServer:
    """An existing server, from a postgresql+psycopg:// URL (its database part is ignored)."""
    from sqlalchemy import make_url

    u = make_url(url)
    host = u.host or str(u.query.get("host", "/var/run/postgresql"))
    return PgServer(host=host, user=u.username or "postgres", port=u.port or 5432, password=u.password)


@contextmanager
def replicated_pair(database: str) -> Iterator[tuple[PgCluster, PgCluster, str, str]]:
    """A durable primary with `database` and its hot standby (streaming replication, unix
    sockets): (primary, standby, primary URL, standby URL). Both are removed at the end."""
    bindir = find_pg_bindir()
    if bindir is None:
        raise RuntimeError(reason_unavailable() or "no PostgreSQL server binaries")
    primary = PgCluster(bindir, replication=True, durable=True)
    standby: PgCluster | None = None
    try:
        url = primary.start().create_database(database)
        standby = PgCluster(bindir, replication=True, durable=True)
        standby.start_standby(str(primary.root), primary.port)
        yield primary, standby, url, standby.server().url(database)
    finally:
        if standby is not None:
            standby.stop()
        primary.stop()
