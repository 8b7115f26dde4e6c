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
    force: bool = typer.Option(False, "--force", help="Rewrite the settings of an existing data dir (keeps the CA, "
                                                      "certificates, store and tokens)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Create the data dir: CA, server certificate, store, the first operator token
    (DATA_DIR/admin.token) and server.json. Prints what an operator needs to connect."""
    from standby.api.server import init_data_dir, parse_listen
    from standby.orchestration.settings import ServerSettings

    parse_listen(listen)  # a bad address fails before anything is written
    settings = ServerSettings(data_dir=data_dir.expanduser().resolve(), db_url=db, listen=listen,
                              sans=tuple(san or ()))
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
    logging.basicConfig(stream=sys.stderr, level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(settings, log_level=log_level.lower())


def register(app: typer.Typer) -> None:
    app.add_typer(server_app, name="server")
