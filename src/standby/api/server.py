"""Running the control plane: its data dir (`init_data_dir`), its settings
(`load_settings`) and its HTTPS listener (`serve`, or `ControlPlaneServer` in a thread).

    result = init_data_dir(ServerSettings(data_dir=D, listen="127.0.0.1:8443"))
    serve(load_settings(D))                       # blocks; SIGTERM / SIGINT stop it cleanly

    with ControlPlaneServer(load_settings(D, listen="127.0.0.1:0")) as cp:   # tests, embedding
        httpx.get(cp.url + "/api/v1/health", verify=str(cp.ca_cert))

One listener serves operators and agents (docs/control-plane.md, "Processes"): TLS with
the server certificate, client certificates requested (CERT_OPTIONAL) and verified
against the control plane's CA. `TLSH11Protocol` hands the peer's certificate to the app
as `scope["extensions"]["tls"]["client_cert_der"]` (None without one).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from sqlalchemy import make_url, select
from sqlalchemy.engine import URL
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from standby import __version__
from standby.api.app import create_app
from standby.errors import BadInput, Conflict, NotFound, StandbyError
from standby.orchestration.registration import init_ca_and_server_cert
from standby.orchestration.role import in_recovery
from standby.orchestration.settings import ServerSettings
from standby.replication import tls
from standby.store import open_store
from standby.store.models import ApiToken
from standby.store.repo import tokens as tokens_repo

log = logging.getLogger("standby.server")

SERVER_JSON = "server.json"
ADMIN_TOKEN_NAME = "admin"
GC_YOUNG_THRESHOLD = 20000  # allocations between young collections (CPython: 700)
# What server.json may hold (settings chosen at init); anything else in it is ignored.
_JSON_SETTINGS = ("listen", "db_url", "sans", "name", "public_url")


# ---------------------------------------------------------------- data dir


@dataclass(frozen=True)
class InitResult:
    data_dir: Path
    ca_cert: Path
    server_cert: Path
    server_json: Path
    db_url: str  # password masked
    admin_token_file: Path
    admin_token_created: bool  # False: an "admin" token existed already; the file was left alone
    created: tuple[str, ...]  # what this call made: "ca", "server certificate", "store", "admin token", ...




def _url_without_password(url: str) -> tuple[str, bool]:
    u = make_url(url)
    if u.password is None:
        return url, False
    # (URL.set(password=None) keeps the password: None there means "unchanged".)
    bare = URL.create(u.drivername, username=u.username, host=u.host, port=u.port, database=u.database, query=u.query)
    return bare.render_as_string(hide_password=False), True


def _ensure_admin_token(store: Any, settings: ServerSettings) -> str | None:
    """Create the `admin` operator token unless the store has one; its secret (written to
    admin.token before the commit: a token that exists must be in the file), or None."""
    with store.transaction() as s:
        admin = s.scalars(select(ApiToken).where(ApiToken.name == ADMIN_TOKEN_NAME)).one_or_none()
        secret = None
        if admin is None:
            _token, secret = tokens_repo.create_token(s, ADMIN_TOKEN_NAME, role="operator", created_by="init")
        if secret is not None:
            tls.write_atomic(settings.admin_token_file, (secret + "\n").encode(), 0o600)
    return secret


def init_data_dir(settings: ServerSettings, *, force: bool = False) -> InitResult:
    """Make a control plane's data dir: the CA and server certificate, the store (created
    or migrated), the first operator token `admin` in `admin.token` (0600; only when the
    store has no `admin` token) and `server.json` (listen address, db URL; no secrets: a
    PostgreSQL password is left out, give it with PGPASSWORD or ~/.pgpass).

    A data dir that has a `server.json` is refused unless `force`: then its settings are
    written again and the rest is kept (the CA, certificates, store and tokens)."""
    d = settings.data_dir
    server_json = d / SERVER_JSON
    if server_json.exists() and not force:
        raise Conflict(f"{d} is already a control plane data dir ({SERVER_JSON} exists): use --force to rewrite its settings")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)  # keys and the admin token live here
    pki = init_ca_and_server_cert(settings)
    created = list(pki.created)

    store = open_store(settings.url, migrate="unless-standby")  # creates the database or migrates it
    try:
        if in_recovery(store):
            # The standby site: its database replays the active one's (tokens included).
            log.warning("the database is a standby (in recovery): nothing written to it; copy the active "
                        "site's admin.token here if this site's operators need one")
            secret = None
        else:
            secret = _ensure_admin_token(store, settings)
        db_url = store.url
    finally:
        store.close()
    if secret is not None:
        created.append("admin token")

    stored_url = None
    if settings.db_url is not None:
        stored_url, had_password = _url_without_password(settings.db_url)
        if had_password:
            log.warning("the database password is not written to %s: give it with PGPASSWORD or ~/.pgpass", server_json)
    doc = {"version": __version__, "listen": settings.listen, "db_url": stored_url, "sans": list(settings.sans),
           "name": settings.name, "public_url": settings.public_url}
    tls.write_atomic(server_json, (json.dumps(doc, indent=2) + "\n").encode(), 0o644)
    created.append(SERVER_JSON)
    return InitResult(
        data_dir=d,
        ca_cert=pki.ca_cert,
        server_cert=pki.server_cert,
        server_json=server_json,
        db_url=db_url,
        admin_token_file=settings.admin_token_file,
        admin_token_created=secret is not None,
        created=tuple(created),
    )


def load_settings(data_dir: str | Path, **overrides: Any) -> ServerSettings:
    """The settings `init` wrote to D/server.json, with `overrides` (any ServerSettings
    field: listen, db_url, tick_seconds ...) on top."""
    d = Path(data_dir).resolve()
    path = d / SERVER_JSON
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"{d} is not a control plane data dir (no {SERVER_JSON}): run `standby server init` first") from None
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: cannot read it: {e}") from None
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: not a JSON object")
    values: dict[str, Any] = {k: doc[k] for k in _JSON_SETTINGS if doc.get(k) is not None}
    if "sans" in values:
        values["sans"] = tuple(values["sans"])
    values.update(overrides)
    try:
        return ServerSettings(data_dir=d, **values)
    except TypeError as e:
        raise BadInput(f"unknown server setting: {e}") from None


def parse_listen(listen: str) -> tuple[str, int]:
    """("127.0.0.1", 8443) from "127.0.0.1:8443"; "[::1]:8443" for IPv6; port 0: any free port."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise BadInput(f"listen address {listen!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    n = int(port)
    if not 0 <= n <= 65535:
        raise BadInput(f"listen address {listen!r}: port {n} is not between 0 and 65535")
    return host, n


# ---------------------------------------------------------------- the listener


class TLSH11Protocol(H11Protocol):
    """uvicorn's h11 protocol that puts the TLS peer certificate in every request's scope.

    asyncio calls `connection_made` once the TLS handshake is done, so the peer certificate
    (verified against the CA by the handshake) is known for the whole connection."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der: bytes | None = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        inner = self.app

        async def app_with_tls(scope: Scope, receive: Receive, send: Send) -> None:
            # A fresh dict per request: nothing a client sends can set this.
            scope["extensions"] = {**scope.get("extensions", {}), "tls": {"client_cert_der": der}}
            await inner(scope, receive, send)

        self.app = app_with_tls


def uvicorn_config(settings: ServerSettings, app: FastAPI, *, log_level: str | None = None) -> uvicorn.Config:
    host, port = parse_listen(settings.listen)
    ca = settings.ca_dir / tls.CA_CERT
    for f in (settings.server_cert, settings.server_key, ca):
        if not f.exists():
            raise NotFound(f"{f} is missing: run `standby server init --data-dir {settings.data_dir}`")
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=str(settings.server_cert),
        ssl_keyfile=str(settings.server_key),
        ssl_ca_certs=str(ca),
        ssl_cert_reqs=ssl.CERT_OPTIONAL,
        http=TLSH11Protocol,
        ws="none",
        lifespan="on",
        log_config=None,  # the caller (the CLI) configures logging
        log_level=log_level,
        proxy_headers=False,  # nothing sits in front: client addresses are the peers'
        server_header=False,
        timeout_graceful_shutdown=10,
        # Longer than clients keep idle connections (standby.client: 4 s), so a client never
        # sends on a connection the server is closing at that very moment.
        timeout_keep_alive=30,
    )


def _bind(settings: ServerSettings) -> socket.socket:
    host, port = parse_listen(settings.listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as e:
        raise Conflict(f"cannot listen on {settings.listen}: {e.strerror or e}") from None
    # Accepted connections inherit TCP_NODELAY from the listener. Without it a small TLS
    # response waits on Nagle + delayed ACK: 45 ms per request on loopback, 7 ms with it.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _startup_failure(app: FastAPI) -> StandbyError:
    exc = getattr(app.state, "startup_error", None)
    if isinstance(exc, StandbyError):
        return exc
    detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
    return StandbyError(f"the control plane did not start{detail} (see its log)")


class ControlPlaneServer:
    """The control plane (services + HTTPS listener) on a thread of this process.

    `settings.listen` may use port 0; `port` and `url` tell the port chosen. `start()`
    returns once the listener accepts connections (services started), or raises what
    kept it from starting."""

    def __init__(self, settings: ServerSettings, *, services: Any = None, log_level: str | None = None) -> None:
        self.settings = settings
        if services is None:
            from standby.orchestration.service import ControlPlaneServices

            services = ControlPlaneServices(settings)
        self.services = services
        self.app = create_app(services)
        self._config = uvicorn_config(settings, self.app, log_level=log_level)
        self._server = uvicorn.Server(self._config)
        self.app.state.uvicorn = self._server  # long-polls end when it starts to exit
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.host, self.port = parse_listen(settings.listen)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        return f"https://{host}:{self.port}"

    @property
    def ca_cert(self) -> Path:
        return self.settings.ca_dir / tls.CA_CERT

    def start(self, timeout: float = 60.0) -> ControlPlaneServer:
        self._sock = _bind(self.settings)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._run, name=f"control-plane:{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                self._close_socket()
                raise _startup_failure(self.app)
            if time.monotonic() > deadline:
                self.stop()
                raise StandbyError(f"the control plane did not start within {timeout:g} s")
            self._thread.join(0.02)
        return self

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock] if self._sock is not None else None)
        except SystemExit:  # uvicorn exits on a startup failure; the reason is in app.state
            pass

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, finish requests in flight, stop the services (the lifespan)."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout)
        self._close_socket()

    def __enter__(self) -> ControlPlaneServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextmanager
def _quiet_after_exit_signals() -> Iterator[None]:
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, with the handlers
    that were installed before it ran. Installing no-op handlers around it turns a signal
    into a clean stop: the process returns from `serve` and exits 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(settings: ServerSettings, *, services: Any = None, log_level: str | None = None,
          workers: int = 1, sock: socket.socket | None = None) -> None:
    """Run the control plane in this thread until SIGTERM or SIGINT (then stop cleanly:
    requests in flight finish, the services stop, and this returns). `workers` > 1: that
    many processes on PostgreSQL (`api/workers.py`); `sock`: a bound listener to serve on
    (a worker's, left open)."""
    if workers > 1:
        from standby.api.workers import serve_workers

        serve_workers(settings, workers, log_level=log_level)
        return
    if services is None:
        from standby.orchestration.service import ControlPlaneServices

        services = ControlPlaneServices(settings)
    app = create_app(services)
    server = uvicorn.Server(uvicorn_config(settings, app, log_level=log_level))
    app.state.uvicorn = server  # long-polls end when it starts to exit
    # What is loaded by now (modules, models, schemas, routes: most of the heap) lives as
    # long as the process: out of the cyclic collector's sight, whose full passes over it
    # stopped every thread and the event loop for ~150 ms every few seconds under load.
    # Requests allocate much that dies young: a larger first generation lets it die before
    # it is promoted, so full passes come less often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    owned = sock is None
    sock = sock or _bind(settings)
    log.info("control plane %s listening on https://%s (data dir %s)", __version__, settings.listen, settings.data_dir)
    try:
        with _quiet_after_exit_signals():
            try:
                server.run(sockets=[sock])
            except SystemExit:
                raise _startup_failure(app) from None
        if not server.started:
            raise _startup_failure(app)
    finally:
        if owned:
            sock.close()

