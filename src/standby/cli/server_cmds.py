"""`standby server init|run`: make a control plane's data dir, and run the control plane.

    standby server init --data-dir /var/lib/standby/cp [--listen 0.0.0.0:8443] [--san cp.example]
    standby server run --data-dir /var/lib/standby/cp

The server modules are imported inside the commands: the rest of the CLI (a client of
the REST API) never loads them.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)

server_app = typer.Typer(help="The control plane: initialize its data dir, run it.", no_args_is_help=True)

_DATA_DIR = typer.Option(..., "--data-dir", envvar="STANDBY_DATA_DIR",
                         help="The control plane's data dir (CA, certificates, SQLite store, admin token).")


def client_url(listen: str) -> str:
    """The URL a CLI on this machine uses for a listen address (a wildcard address is
    reached on loopback, which the server certificate names)."""
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"https://{host}:{port}"


def env_lines(url: str, ca: Path, token_file: Path) -> str:
    return (f"export STANDBY_URL={shlex.quote(url)} STANDBY_CA={shlex.quote(str(ca))} "
            f"STANDBY_TOKEN_FILE={shlex.quote(str(token_file))}")


@server_app.command("init")
def server_init(
    data_dir: Path = _DATA_DIR,
    listen: str = typer.Option("127.0.0.1:8443", "--listen", metavar="HOST:PORT",
                               help="Where `standby server run` listens (0.0.0.0:8443 for every interface)."),
    db: str = typer.Option(None, "--db", metavar="URL",
                           help="Database URL (default: SQLite in the data dir; postgresql+psycopg://... for "
                                "PostgreSQL, the password from PGPASSWORD or ~/.pgpass)."),
    san: list[str] = typer.Option(None, "--san", metavar="NAME",
                                  help="Extra DNS name or IP address for the server certificate (repeatable)."),
    name: str = typer.Option(None, "--name", help="This control plane's name (default: the host name); with a "
                                                  "control plane per site, each has its own."),
    public_url: str = typer.Option(None, "--public-url", metavar="URL",
                                   help="The URL agents and operators reach it at (default: https://LISTEN)."),
    ca_from: Path = typer.Option(None, "--ca-from", metavar="DIR",
                                 help="Use this CA (a copy of the active site's DATA_DIR/ca) instead of making one: "
                                      "the standby site's control plane must share the CA."),
    force: bool = typer.Option(False, "--force", help="Rewrite the settings of an existing data dir (keeps the CA, "
                                                      "certificates, store and tokens)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Create the data dir: CA, server certificate, store, the first operator token
    (DATA_DIR/admin.token) and server.json. Prints what an operator needs to connect.
    On the standby site (its database a replica of the active one's), nothing is written
    to the database: the tokens and everything else come from the active site."""
    from standby.api.server import init_data_dir, parse_listen
    from standby.orchestration.settings import ServerSettings

    parse_listen(listen)  # a bad address fails before anything is written
    settings = ServerSettings(data_dir=data_dir.expanduser().resolve(), db_url=db, listen=listen,
                              sans=tuple(san or ()), name=name, public_url=public_url)
    if ca_from is not None:
        _copy_ca(ca_from, settings.ca_dir)
    result = init_data_dir(settings, force=force)
    url = client_url(listen)
    env = {"STANDBY_URL": url, "STANDBY_CA": str(result.ca_cert), "STANDBY_TOKEN_FILE": str(result.admin_token_file)}
    if as_json:
        print(json.dumps({"data_dir": str(result.data_dir), "ca_cert": str(result.ca_cert),
                          "server_cert": str(result.server_cert), "server_json": str(result.server_json),
                          "db_url": result.db_url, "admin_token_file": str(result.admin_token_file),
                          "admin_token_created": result.admin_token_created, "created": list(result.created),
                          "listen": listen, "env": env}, indent=2))
        return
    def say(text: str, markup: bool = True) -> None:
        # soft_wrap: paths and the export line must stay on one line to be copied.
        console.print(text, highlight=False, soft_wrap=True, markup=markup)

    say(f"control plane data dir {escape(str(result.data_dir))}"
        + (f" (made: {escape(', '.join(result.created))})" if result.created else ""))
    say(f"  database     {escape(result.db_url)}")
    say(f"  CA           {escape(str(result.ca_cert))}")
    if result.admin_token_created:
        say(f"  admin token  {escape(str(result.admin_token_file))} (mode 0600, role operator)")
    else:
        say(f"  admin token  exists already; {escape(str(result.admin_token_file))} was left alone")
    say(f"  listen       {escape(listen)}")
    say("")
    say(f"start it:  standby server run --data-dir {shlex.quote(str(result.data_dir))}", markup=False)
    say("then, for the CLI:")
    say(env_lines(url, result.ca_cert, result.admin_token_file), markup=False)


def _copy_ca(src: Path, dest: Path) -> None:
    import shutil

    from standby.errors import BadInput, Conflict
    from standby.replication import tls

    for f in (tls.CA_CERT, tls.CA_KEY):
        if not (src / f).is_file():
            raise BadInput(f"--ca-from {src}: no {f} there (give a copy of the active site's DATA_DIR/ca)")
    if (dest / tls.CA_CERT).exists():
        if (dest / tls.CA_CERT).read_bytes() != (src / tls.CA_CERT).read_bytes():
            raise Conflict(f"{dest} holds another CA already")
        return
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.copyfile(src / tls.CA_CERT, dest / tls.CA_CERT)
    tls.write_atomic(dest / tls.CA_KEY, (src / tls.CA_KEY).read_bytes(), 0o600)


@server_app.command("promote")
def server_promote(
    data_dir: Path = _DATA_DIR,
    timeout: float = typer.Option(60.0, "--timeout", min=1, help="Seconds to wait for the promotion."),
    url: str = typer.Option(None, "--url", help="The control plane to watch become active (default: its public "
                                                "URL, or its listen address)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Declare the disaster on the standby site: promote this control plane's database (a
    PostgreSQL hot standby) to primary. The control plane running on it becomes active
    within a second (scheduler, job runner; jobs in flight resume or fail), and agents
    follow it. Make sure the old active site is down or cut off first."""
    import time

    from sqlalchemy import text

    from standby.api.server import load_settings
    from standby.errors import BadInput, RemoteError
    from standby.store.db import create_store_engine

    declared = time.time()
    settings = load_settings(data_dir.expanduser())
    engine = create_store_engine(settings.url)
    if engine.dialect.name != "postgresql":
        raise BadInput("promote is for a control plane on a PostgreSQL standby: this one runs on "
                       f"{engine.dialect.name}, with no standby to promote")
    try:
        with engine.connect() as conn:
            standby = bool(conn.execute(text("SELECT pg_is_in_recovery()")).scalar())
            promoted = False
            if standby:
                promoted = bool(conn.execute(text("SELECT pg_promote(true, :t)"), {"t": int(timeout)}).scalar())
                if not promoted:
                    raise RemoteError(f"PostgreSQL did not finish the promotion within {timeout:g} s "
                                      "(see its log)")
    finally:
        engine.dispose()
    db_s = time.time() - declared
    health = _wait_active(url or settings.public_url or client_url(settings.listen), settings, timeout)
    out = {"declared_at": declared, "promoted": promoted, "was_standby": standby, "database_seconds": round(db_s, 2),
           "active_seconds": round(time.time() - declared, 2), "control_plane": health}
    if as_json:
        print(json.dumps(out, indent=2))
        return
    if not standby:
        console.print("the database is not a standby (it accepts writes already): nothing to promote")
    else:
        console.print(f"database promoted in {db_s:.1f} s")
    if health is None:
        console.print("[yellow]no control plane answers on this data dir's listen address: start it "
                      f"(standby server run --data-dir {escape(str(data_dir))}); it starts active[/]")
    else:
        console.print(f"control plane {escape(str(health.get('name')))} is {health.get('role')} "
                      f"(epoch {health.get('epoch')}) {out['active_seconds']:.1f} s after the declaration")


def _wait_active(url: str, settings: Any, timeout: float) -> dict[str, Any] | None:
    """The control plane's /health once it says active (None: it does not answer)."""
    import time

    from standby.client import ApiClient
    from standby.errors import StandbyError

    client = ApiClient(url, ca=settings.ca_dir / "ca.crt", timeout=5.0)
    end = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    try:
        while time.monotonic() < end:
            try:
                last = client.request("GET", "/health")
            except StandbyError:
                last = None
                if time.monotonic() > end - timeout + 5:  # not there after 5 s: not running
                    return None
            if isinstance(last, dict) and last.get("role") == "active":
                return last
            time.sleep(0.2)
    finally:
        client.close()
    return last


@server_app.command("run")
def server_run(
    data_dir: Path = _DATA_DIR,
    listen: str = typer.Option(None, "--listen", metavar="HOST:PORT", help="Override the listen address of init."),
    db: str = typer.Option(None, "--db", metavar="URL", help="Override the database URL of init."),
    tick_seconds: float = typer.Option(None, "--tick-seconds", min=0.01, help="Scheduler period (default 1)."),
    heartbeat_seconds: float = typer.Option(None, "--heartbeat-seconds", min=0.01,
                                            help="How often agents are told to send a heartbeat (default 10)."),
    heartbeat_timeout: float = typer.Option(None, "--heartbeat-timeout", min=0.01,
                                            help="No heartbeat for this long: the agent is stale, alert "
                                                 "heartbeat_lost (default 30)."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    workers: int = typer.Option(1, "--workers", min=1, max=64,
                                help="Processes serving the API (PostgreSQL only; one leads the scheduler "
                                     "and job runner, another takes over if it dies)."),
) -> None:
    """Run the control plane (API, scheduler, job runner) until SIGTERM or Ctrl-C."""
    from standby.api.server import load_settings, serve
    from standby.errors import BadInput

    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise BadInput(f"--log-level: {log_level!r} is not one of debug, info, warning, error")
    overrides: dict[str, Any] = {k: v for k, v in (("listen", listen), ("db_url", db), ("tick_seconds", tick_seconds),
                                                  ("heartbeat_seconds", heartbeat_seconds),
                                                  ("heartbeat_timeout", heartbeat_timeout)) if v is not None}
    settings = load_settings(data_dir.expanduser(), **overrides)
    fmt = "%(asctime)s %(levelname)s %(name)s" + ("[%(process)d]" if workers > 1 else "") + ": %(message)s"
    logging.basicConfig(stream=sys.stderr, level=level, format=fmt)
    serve(settings, log_level=log_level.lower(), workers=workers)


def register(app: typer.Typer) -> None:
    app.add_typer(server_app, name="server")
