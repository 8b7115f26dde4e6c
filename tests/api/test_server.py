"""`init_data_dir`, `load_settings` and `serve`: the data dir's files and modes, the first
operator token written once, settings read back, and a server process that stops
cleanly (exit 0) on SIGTERM and on SIGINT."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from standby.api.server import ControlPlaneServer, _url_without_password, init_data_dir, load_settings, parse_listen
from standby.errors import BadInput, Conflict, NotFound, StandbyError
from standby.orchestration.service import ControlPlaneServices
from standby.orchestration.settings import ServerSettings
from standby.store import open_store
from standby.store.repo import tokens as tokens_repo

from api_helpers import API, fast_settings


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_makes_the_data_dir(tmp_path: Path) -> None:
    d = tmp_path / "cp"
    res = init_data_dir(ServerSettings(data_dir=d, listen="127.0.0.1:9443", sans=("cp.example",)))
    assert res.admin_token_created
    assert set(res.created) == {"ca", "server certificate", "admin token", "server.json"}
    for f in ("ca/ca.crt", "ca/ca.key", "server.crt", "server.key", "control-plane.db", "admin.token", "server.json"):
        assert (d / f).is_file(), f
    for secret in ("ca/ca.key", "server.key", "admin.token"):
        assert mode(d / secret) == 0o600, secret
    assert mode(d) == 0o700
    doc = json.loads((d / "server.json").read_text())
    assert doc["listen"] == "127.0.0.1:9443" and doc["db_url"] is None and doc["sans"] == ["cp.example"]

    token = (d / "admin.token").read_text().strip()
    assert token.startswith("sbt_") and token not in (d / "server.json").read_text()
    with open_store(res.db_url) as store, store.read() as s:
        admin = tokens_repo.authenticate(s, token)
        assert admin is not None and (admin.name, admin.role) == ("admin", "operator")


def test_init_again_is_refused_and_force_keeps_the_ca_the_store_and_the_token(tmp_path: Path) -> None:
    d = tmp_path / "cp"
    init_data_dir(ServerSettings(data_dir=d))
    ca, token = (d / "ca" / "ca.crt").read_bytes(), (d / "admin.token").read_text()
    with pytest.raises(Conflict, match="--force"):
        init_data_dir(ServerSettings(data_dir=d))
    res = init_data_dir(ServerSettings(data_dir=d, listen="0.0.0.0:8444"), force=True)
    assert not res.admin_token_created and res.created == ("server.json",)
    assert (d / "ca" / "ca.crt").read_bytes() == ca and (d / "admin.token").read_text() == token
    assert load_settings(d).listen == "0.0.0.0:8444"


def test_load_settings_reads_server_json_with_overrides(tmp_path: Path) -> None:
    d = tmp_path / "cp"
    init_data_dir(ServerSettings(data_dir=d, listen="127.0.0.1:9443", sans=("a.example",)))
    s = load_settings(d)
    assert (s.data_dir, s.listen, s.db_url, s.sans) == (d.resolve(), "127.0.0.1:9443", None, ("a.example",))
    s = load_settings(d, listen="127.0.0.1:0", tick_seconds=0.5)
    assert (s.listen, s.tick_seconds) == ("127.0.0.1:0", 0.5)
    with pytest.raises(BadInput, match="unknown server setting"):
        load_settings(d, colour="red")
    with pytest.raises(NotFound, match="server init"):
        load_settings(tmp_path / "elsewhere")


def test_a_database_password_is_not_written_down() -> None:
    url, had = _url_without_password("postgresql+psycopg://standby:hunter2@db.example:5432/standby")
    assert had and "hunter2" not in url and url == "postgresql+psycopg://standby@db.example:5432/standby"
    assert _url_without_password("sqlite:////var/lib/standby/control-plane.db") == (
        "sqlite:////var/lib/standby/control-plane.db", False)


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8443") == ("127.0.0.1", 8443)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8443", "host:", ":8443", "host:99999", "host:port"):
        with pytest.raises(BadInput):
            parse_listen(bad)


SERVE = "import sys; from standby.api.server import serve, load_settings; serve(load_settings(sys.argv[1]))"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    d = tmp_path / "cp"
    # A fixed free port: the child binds what server.json says.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    init_data_dir(fast_settings(d, listen=f"127.0.0.1:{port}"))
    log = (tmp_path / "server.log").open("w+")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(d)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        ctx = ssl.create_default_context(cafile=str(d / "ca" / "ca.crt"))
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                r = httpx.get(f"https://127.0.0.1:{port}{API}/health", verify=ctx, timeout=2)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not answer"
            time.sleep(0.1)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0, (tmp_path / "server.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_a_failed_start_of_the_services_is_raised_by_start(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path / "cp")
    init_data_dir(settings)
    used = ControlPlaneServices(settings)
    used.start()
    used.stop()  # stopped services refuse a second start: the app's lifespan fails
    server = ControlPlaneServer(settings, services=used)
    with pytest.raises(StandbyError, match="did not start: RuntimeError: control plane services are stopped"):
        server.start(timeout=30)
    # Nothing is left listening.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0
