"""A control plane per site (issue 10): active and passive by the database's replication
role, promotion, epochs, and never two active control planes on one database.

Real PostgreSQL streaming replication (a primary and a hot standby made with
pg_basebackup, both throwaway clusters of this machine) and real control planes over
HTTPS."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from standby.api.server import ControlPlaneServer, init_data_dir
from standby.cli.main import run
from standby.testing.postgres import PgCluster, reason_unavailable, replicated_pair

from api_helpers import ControlPlane, error_of, fast_settings  # noqa: E402


def _wait(pred: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def pg_pair() -> Iterator[tuple[PgCluster, PgCluster, str, str]]:
    """A primary and its hot standby, with one database."""
    why = reason_unavailable()
    if why:
        pytest.skip(why)
    with replicated_pair("standby_roles") as pair:
        yield pair


def _health(cp: ControlPlane) -> dict[str, Any]:
    r = cp.client().get("/health")
    assert r.status_code == 200, r.text
    return r.json()


def _start(tmp_path: Path, name: str, db_url: str, ca_from: Path | None = None) -> ControlPlane:
    settings = fast_settings(tmp_path / name, db_url=db_url, name=name)
    if ca_from is not None:  # the standby site shares the active site's CA (server init --ca-from)
        settings.ca_dir.mkdir(parents=True)
        for f in ("ca.crt", "ca.key"):
            (settings.ca_dir / f).write_bytes((ca_from / f).read_bytes())
    result = init_data_dir(settings)
    token = result.admin_token_file.read_text().strip() if result.admin_token_created else ""
    server = ControlPlaneServer(settings).start()
    return ControlPlane(server, settings, token)


@pytest.mark.slow
@pytest.mark.postgresql
def test_standby_control_plane_is_passive_then_promoted(tmp_path: Path, pg_pair: Any,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    primary, standby, url_a, url_b = pg_pair
    a = _start(tmp_path, "cp-a", url_a)
    running = [a]
    try:
        assert _health(a)["role"] == "active" and _health(a)["epoch"] == 1
        # the standby has replayed A's store (its tables, A's admin token, A as the active one)
        b = _start(tmp_path, "cp-b", url_b, ca_from=a.settings.ca_dir)
        running.append(b)
        b.admin_token = a.admin_token  # replicated with the database (the file is copied by hand)
        h = _health(b)
        assert h["role"] == "passive" and h["active_url"] == a.settings.advertised_url, h
        assert "standby (in recovery)" in h["reason"]
        # reads are served from the replica; a change is refused with 503 naming the active one
        r = a.admin().post("/policies", json={"name": "gold", "copy_frequency_seconds": 300})
        assert r.status_code == 201, r.text
        _wait(lambda: b.admin().get("/policies").json()["items"], 30, "the policy to reach the standby")
        r = b.admin().post("/policies", json={"name": "silver", "copy_frequency_seconds": 300})
        err = error_of(r)
        assert r.status_code == 503 and err["type"] == "Passive", r.text
        assert a.settings.advertised_url in err["message"] and err["details"]["active_name"] == "cp-a"
        # an agent's heartbeat to the passive one is a 503 as well (it moves on to the next)
        assert b.client().post("/agent/heartbeat", json={}).status_code == 503

        # the disaster: the active site's control plane and database are gone
        a.close_clients()
        a.server.stop()
        running.remove(a)
        primary.kill()
        t0 = time.monotonic()
        assert run(["server", "promote", "--data-dir", str(b.settings.data_dir), "--url", b.url, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["was_standby"] and out["promoted"] and out["control_plane"]["role"] == "active", out
        assert time.monotonic() - t0 < 60
        h = _health(b)
        assert h["role"] == "active" and h["epoch"] == 2 and h["active_url"] == b.settings.advertised_url, h
        r = b.admin().post("/policies", json={"name": "silver", "copy_frequency_seconds": 300})
        assert r.status_code == 201, r.text
        assert {p["name"] for p in b.admin().get("/policies").json()["items"]} == {"gold", "silver"}

        # a second control plane on the (now primary) database cannot be active too
        c = _start(tmp_path, "cp-c", url_b, ca_from=a.settings.ca_dir)
        running.append(c)
        c.admin_token = a.admin_token
        h = _health(c)
        assert h["role"] == "passive" and "another control plane holds the active role" in h["reason"], h
        assert "cp-b" in h["reason"]
        r = c.admin().post("/policies", json={"name": "bronze", "copy_frequency_seconds": 300})
        assert r.status_code == 503 and "cp-b" in error_of(r)["message"]
        # ... until the active one stops: then it takes over (a new epoch)
        b.close_clients()
        b.server.stop()
        running.remove(b)
        h = _wait(lambda: (lambda x: x if x["role"] == "active" else None)(_health(c)), 30, "cp-c to take over")
        assert h["epoch"] == 3, h
    finally:
        for cp in running:
            cp.close_clients()
            cp.server.stop()


def test_promote_refuses_a_database_that_is_not_a_standby(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path / "cp")
    init_data_dir(settings)
    assert run(["server", "promote", "--data-dir", str(settings.data_dir)]) == 2  # SQLite: nothing to promote


def test_two_control_planes_on_one_sqlite_file(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path / "cp", name="one")
    result = init_data_dir(settings)
    token = result.admin_token_file.read_text().strip()
    first = ControlPlane(ControlPlaneServer(settings).start(), settings, token)
    second_settings = fast_settings(tmp_path / "cp", name="two")
    second = ControlPlane(ControlPlaneServer(second_settings).start(), second_settings, token)
    try:
        h = second.client().get("/health").json()
        assert h["role"] == "passive" and "another control plane runs on this data dir" in h["reason"], h
        r = second.admin().post("/policies", json={"name": "x", "copy_frequency_seconds": 300})
        assert r.status_code == 503
        assert first.client().get("/health").json()["role"] == "active"
    finally:
        for cp in (second, first):
            cp.close_clients()
            cp.server.stop()


def test_agent_client_follows_the_active_control_plane(tmp_path: Path) -> None:
    """The agent's control-plane client (agent/runtime.py): a passive or dead control plane
    moves it to the next; a control plane of a lower epoch than it has seen is not
    followed."""
    from standby.agent.config import AgentConfig
    from standby.agent.runtime import ControlPlane as AgentCp
    from standby.agent.runtime import ControlPlaneDown

    (tmp_path / "agent").mkdir()
    cfg = AgentConfig(data_dir=tmp_path / "agent", name="a", server_url="https://cp-a.example:8443", site="s",
                      server="m", cloud="c", host="h", listen="127.0.0.1:7443",
                      standby_urls=["https://cp-b.example:8443"])
    answers: dict[str, Any] = {"https://cp-a.example:8443": httpx.ConnectError("down"),
                               "https://cp-b.example:8443": {"heartbeat_seconds": 1, "epoch": 2}}

    class Client:
        def __init__(self, url: str) -> None:
            self.url = url

        def request(self, method: str, path: str, json: Any = None) -> Any:
            from standby.errors import RemoteError

            a = answers[self.url]
            if isinstance(a, Exception):
                raise RemoteError(f"cannot reach the control plane at {self.url}")
            return a

        def close(self) -> None:
            pass

    cp = AgentCp(cfg)
    cp._client = lambda url: Client(url)  # type: ignore[method-assign]  # the answers above, no network
    with pytest.raises(ControlPlaneDown):
        cp.call("POST", "/agent/heartbeat", {})
    assert cp.url == "https://cp-b.example:8443"  # moved on
    ans = cp.call("POST", "/agent/heartbeat", {})
    cp.check_epoch(ans["epoch"])
    assert cp.epoch == 2 and (cfg.data_dir / "control-plane-epoch").read_text().strip() == "2"
    # the old site's control plane comes back believing it is active, at epoch 1
    answers["https://cp-a.example:8443"] = {"role": "active", "epoch": 1}
    answers["https://cp-b.example:8443"] = {"role": "active", "epoch": 2}
    cp.probe()
    assert cp.url == "https://cp-b.example:8443"
    with pytest.raises(ControlPlaneDown, match="stale"):
        cp.check_epoch(1, "https://cp-a.example:8443")
    # a restarted agent remembers the epoch it had seen
    assert AgentCp(cfg).epoch == 2
