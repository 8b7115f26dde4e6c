"""The CLI against a real control plane: `standby server init` makes a data dir,
`standby server run` serves it as a subprocess, and every other command runs as
`python -m standby.cli.main ... --json` with the environment `init` printed. Asserts
exit codes and JSON documents, and the 401 / 403 paths an operator meets first."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from standby.cli.main import run
from standby.client import ApiClient
from standby.errors import StandbyError
from standby.replication.tls import make_key_and_csr

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "standby.cli.main"]


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.rc == 0, f"exit {self.rc}: {self.err}"
        return json.loads(self.out)  # exactly one JSON document, or this fails


@dataclass
class Plane:
    data_dir: Path
    env: dict[str, str]  # STANDBY_URL, STANDBY_CA, STANDBY_TOKEN_FILE as `init` printed them
    proc: subprocess.Popen[bytes]
    log: Path

    def run(self, *args: str, env: dict[str, str] | None = None, drop: tuple[str, ...] = (),
            proc: bool = False) -> Result:
        """`standby ARGS` with the environment `init` printed (plus `env`, less `drop`): in
        this process through the CLI's entry point (`cli.main.run`, what the `standby`
        script calls), or with `proc` as a real process (its exit status)."""
        full = {k: v for k, v in os.environ.items() if not k.startswith("STANDBY_")}
        full.update(self.env)
        full.update(env or {})
        for k in drop:
            full.pop(k, None)
        if proc:
            p = subprocess.run([*CLI, *args], env=full, capture_output=True, text=True, timeout=120)
            result = Result(p.returncode, p.stdout, p.stderr)
        else:
            out, err = io.StringIO(), io.StringIO()
            with mock.patch.dict(os.environ, full, clear=True), redirect_stdout(out), redirect_stderr(err):
                rc = run(list(args))
            result = Result(rc, out.getvalue(), err.getvalue())
        assert "Traceback" not in result.err, result.err
        return result

    def api(self, **kw: Any) -> ApiClient:
        return ApiClient(self.env["STANDBY_URL"], ca=self.env["STANDBY_CA"], **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    base = tmp_path_factory.mktemp("cli-e2e")
    data_dir = base / "cp"
    listen = f"127.0.0.1:{_free_port()}"
    env0 = {k: v for k, v in os.environ.items() if not k.startswith("STANDBY_")}
    init = subprocess.run([*CLI, "server", "init", "--data-dir", str(data_dir), "--listen", listen, "--json"],
                          env=env0, capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    doc = json.loads(init.stdout)
    assert doc["admin_token_created"] is True
    assert Path(doc["admin_token_file"]).stat().st_mode & 0o777 == 0o600
    env = doc["env"]
    assert env == {"STANDBY_URL": f"https://{listen}", "STANDBY_CA": str(data_dir / "ca" / "ca.crt"),
                   "STANDBY_TOKEN_FILE": str(data_dir / "admin.token")}
    log = base / "server.log"
    with log.open("wb") as f:
        proc = subprocess.Popen([*CLI, "server", "run", "--data-dir", str(data_dir), "--tick-seconds", "0.2",
                                 "--heartbeat-seconds", "1", "--heartbeat-timeout", "3"],
                                env=env0, stdout=f, stderr=subprocess.STDOUT)
    p = Plane(data_dir, env, proc, log)
    try:
        deadline = time.monotonic() + 60
        with p.api(timeout=5) as api:
            while True:
                try:
                    api.get("/health")
                    break
                except StandbyError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"the control plane did not start:\n{log.read_text()}")
                    time.sleep(0.2)
        yield p
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _register(plane: Plane, key: str, name: str, site: str, cloud: str, tmp: Path) -> tuple[Path, Path]:
    """What `standby agent register` does, done by hand (the agent is not under test here)."""
    key_pem, csr_pem = make_key_and_csr(name)
    with plane.api() as api:
        reg = api.post("/agents/register", json={
            "key": key, "name": name, "kind": "agent", "host": f"{name}-host", "site": site,
            "server": f"{site}-vmm", "cloud": cloud, "address": "127.0.0.1:7443", "csr_pem": csr_pem.decode(),
            "version": "test"})
    crt, k = tmp / f"{name}.crt", tmp / f"{name}.key"
    crt.write_text(reg["cert_pem"])
    k.write_bytes(key_pem)
    return crt, k


def test_init_refuses_an_existing_data_dir(plane: Plane) -> None:
    r = plane.run("server", "init", "--data-dir", str(plane.data_dir), proc=True)
    assert r.rc == 4 and "--force" in r.err


def test_operator_workflow(plane: Plane, tmp_path: Path) -> None:
    # registration keys: printed once, listed by prefix, usable by agents
    key = plane.run("keys", "create", "--days", "2", "--description", "e2e", "--json").json()
    assert key["key"].startswith(key["prefix"])
    plain = plane.run("keys", "create", "--description", "plain")
    assert plain.rc == 0 and plain.out.count("\n") == 1  # the key alone on stdout
    keys = plane.run("keys", "list", "--json").json()
    assert {k["description"] for k in keys} >= {"e2e", "plain"}
    assert all("key" not in k for k in keys)
    plain_id = next(k["id"] for k in keys if k["description"] == "plain")
    revoked = plane.run("keys", "revoke", str(plain_id), "--json").json()
    assert revoked["revoked_at"] is not None

    # two agents make the clouds, sites and hosts the rest needs
    crt_a, key_a = _register(plane, key["key"], "agent-a", "site1", "gold-primary", tmp_path)
    _register(plane, key["key"], "agent-b", "site2", "gold-secondary", tmp_path)
    agents = plane.run("agents", "--json").json()
    assert {a["name"] for a in agents} == {"agent-a", "agent-b"}
    clouds = plane.run("inventory", "clouds", "--json").json()
    assert {c["name"] for c in clouds} == {"gold-primary", "gold-secondary"}
    assert plane.run("inventory", "hosts", "--cloud", "gold-primary", "--json").rc == 0
    assert plane.run("inventory", "vms", "--json").json() == []

    # policies
    pol = plane.run("policy", "create", "gold", "--copy-frequency", "30s", "--retention-hours", "24",
                    "--app-consistent-hours", "4", "--rpo-alert-seconds", "120", "--keep-all-points-minutes", "15",
                    "--json").json()
    assert (pol["name"], pol["copy_frequency_seconds"], pol["recovery_point_retention_hours"],
            pol["app_consistent_interval_hours"], pol["compression"], pol["rpo_alert_seconds"],
            pol["keep_all_points_minutes"]) == ("gold", 30, 24, 4, True, 120, 15)
    pol = plane.run("policy", "update", "gold", "--no-compression", "--copy-frequency", "continuous",
                    "--keep-all-points-minutes", "45", "--json").json()
    assert (pol["compression"], pol["copy_frequency_seconds"], pol["recovery_point_retention_hours"],
            pol["keep_all_points_minutes"]) == (False, 0, 24, 45)
    assert plane.run("policy", "show", "gold", "--json").json()["compression"] is False
    shown = plane.run("policy", "show", "gold")
    assert shown.rc == 0 and "continuous" in shown.out and "last 45 min" in shown.out
    assert plane.run("policy", "update", "gold", "--keep-all-points-minutes", "1441").rc == 2  # out of range
    assert plane.run("policy", "create", "gold", "--json").rc == 4  # exists: conflict
    r = plane.run("policy", "show", "nope")
    assert r.rc == 3 and "nope" in r.err
    r = plane.run("policy", "create", "sched", "--initial", "scheduled", "--initial-at", "2030-01-01T02:00",
                  "--json")
    assert r.json()["initial_replication"] == "scheduled"
    assert plane.run("policy", "delete", "sched", "--json").json() == {"deleted": "sched"}
    assert [p["name"] for p in plane.run("policy", "list", "--json").json()] == ["gold"]

    # pairing
    pairing = plane.run("pair", "gold-primary", "gold-secondary", "--policy", "gold", "--json").json()
    assert (pairing["primary_cloud"], pairing["secondary_cloud"], pairing["policies"]) == (
        "gold-primary", "gold-secondary", ["gold"])
    assert plane.run("pair", "gold-primary", "gold-secondary").rc == 4
    assert plane.run("pair", "gold-primary", "nowhere").rc == 3
    assert [p["id"] for p in plane.run("pairings", "--json").json()] == [pairing["id"]]

    # networks
    assert plane.run("network", "create", "prod", "--site", "site1", "--json").json()["site"] == "site1"
    assert plane.run("network", "create", "dr", "--site", "site2", "--json").rc == 0
    m = plane.run("network", "map", "prod", "dr", "--json").json()
    assert (m["primary"], m["secondary"]) == ("prod", "dr")
    nets = plane.run("network", "list", "--json").json()
    assert [(x["primary"], x["secondary"]) for x in nets["mappings"]] == [("prod", "dr")]
    assert plane.run("network", "unmap", "prod", "--json").json() == {"unmapped": "prod"}

    # webhooks
    secret = tmp_path / "hook.secret"
    secret.write_text("hmac-secret\n")
    w = plane.run("webhooks", "add", "ops", "http://127.0.0.1:9/hook", "--secret-file", str(secret), "--kind",
                  "heartbeat_lost", "--min-severity", "warning", "--json").json()
    assert (w["has_secret"], w["kinds"], w["min_severity"]) == (True, ["heartbeat_lost"], "warning")
    assert [x["name"] for x in plane.run("webhooks", "list", "--json").json()] == ["ops"]
    assert plane.run("webhooks", "remove", "ops", "--json").rc == 0
    assert plane.run("webhooks", "list", "--json").json() == []

    # status, jobs, readiness
    status = plane.run("status", "--json", proc=True).json()
    assert status["status"]["items"]["total"] == 0 and status["items"] == []
    assert {a["name"] for a in status["status"]["agents"]} == {"agent-a", "agent-b"}
    assert isinstance(plane.run("jobs", "--limit", "5", "--json").json(), list)
    r = plane.run("jobs", "show", "999999")
    assert r.rc == 3
    ready = plane.run("readiness", "--json")
    assert ready.rc in (0, 1) and json.loads(ready.out)["ready"] is (ready.rc == 0)
    r = plane.run("protect", "no-such-vm", "--json")
    assert r.rc == 3 and "no-such-vm" in r.err and r.out == ""

    # protect: agent-a reports a VM whose host lacks what readiness needs -> refused, findings shown
    with plane.api(cert=(crt_a, key_a)) as agent:
        agent.put("/agent/inventory", json={"hosts": [{"name": "agent-a-host", "vms": [
            {"name": "web01", "uuid": "e2e-web01", "power_state": "running", "disks": {}, "nics": []}]}]})
    assert [v["name"] for v in plane.run("inventory", "vms", "--cloud", "gold-primary", "--json").json()] == ["web01"]
    r = plane.run("protect", "web01")
    assert r.rc == 1, r.err
    for part in ("web01 cannot be protected", "host/agent-a-host", "remedy:", "NOT READY"):
        assert part in r.out, part
    assert "not ready for protection" in r.err
    r = plane.run("protect", "web01", "--json")
    assert r.rc == 1
    err = json.loads(r.out)["error"]
    assert err["type"] in ("NotReady", "Refused") and err["exit_code"] == 1  # the contract: refused, 409
    assert any(f["subject"] == "host/agent-a-host" and f["severity"] == "error" for f in err["details"]["findings"])
    assert plane.run("items", "--json").json() == []

    # alerts: agent-a sends one heartbeat, then goes silent past --heartbeat-timeout 3
    with plane.api(cert=(crt_a, key_a)) as agent:
        agent.post("/agent/heartbeat", json={"version": "test", "storage_free_bytes": 10**10,
                                            "storage_total_bytes": 10**11, "facts": {}})
    deadline = time.monotonic() + 30
    lost: list[dict[str, Any]] = []
    while not lost and time.monotonic() < deadline:
        time.sleep(0.5)
        lost = [a for a in plane.run("alerts", "--json").json() if a["kind"] == "heartbeat_lost"
                and "agent-a" in a["subject"]]
    assert lost, "no heartbeat_lost alert for agent-a within 30 s"
    cleared = plane.run("alerts", "clear", str(lost[0]["id"]), "--json").json()
    assert cleared["id"] == lost[0]["id"] and cleared["cleared_at"] is not None
    assert any(a["id"] == lost[0]["id"] for a in plane.run("alerts", "--all", "--json").json())

    # agents: revoke
    assert plane.run("agents", "revoke", "agent-b", "--json").json()["state"] == "revoked"
    r = plane.run("unpair", str(pairing["id"]), "--json")
    assert r.json() == {"deleted": pairing["id"]}


def test_tokens_and_roles(plane: Plane) -> None:
    # 401: no token at all
    r = plane.run("status", drop=("STANDBY_TOKEN_FILE",), proc=True)
    assert r.rc == 1 and "set STANDBY_TOKEN" in r.err and r.out == ""
    r = plane.run("status", env={"STANDBY_TOKEN": "sbt_not_a_token"}, drop=("STANDBY_TOKEN_FILE",))
    assert r.rc == 1 and "unknown, revoked or expired" in r.err

    viewer = plane.run("tokens", "create", "viewer1", "--role", "viewer", "--json").json()
    assert viewer["role"] == "viewer" and viewer["token"]
    plain = plane.run("tokens", "create", "op1", "--role", "operator")
    assert plain.rc == 0 and plain.out.strip() and "\n" not in plain.out.strip()
    names = {t["name"]: t for t in plane.run("tokens", "list", "--json").json()}
    assert {"admin", "viewer1", "op1"} <= set(names) and all("token" not in t for t in names.values())

    as_viewer = {"STANDBY_TOKEN": viewer["token"]}
    assert plane.run("policy", "list", "--json", env=as_viewer).rc == 0  # a viewer reads
    r = plane.run("policy", "create", "silver", env=as_viewer, proc=True)  # ... and may not change anything
    assert r.rc == 1 and "this token's role is viewer" in r.err
    r = plane.run("tokens", "create", "sneaky", "--role", "operator", env=as_viewer)
    assert r.rc == 1

    # STANDBY_TOKEN wins over STANDBY_TOKEN_FILE; --token wins over both
    assert plane.run("tokens", "revoke", "viewer1", "--json").json()["revoked_at"] is not None
    r = plane.run("status", env=as_viewer)
    assert r.rc == 1 and "unknown, revoked or expired" in r.err
    admin = (plane.data_dir / "admin.token").read_text().strip()
    assert plane.run("status", "--json", "--token", admin, env=as_viewer).rc == 0


def test_untrusted_and_unreachable(plane: Plane, tmp_path: Path) -> None:
    r = plane.run("status", drop=("STANDBY_CA",), proc=True)
    assert r.rc == 5 and "STANDBY_CA" in r.err and plane.env["STANDBY_URL"] in r.err
    r = plane.run("status", "--url", f"https://127.0.0.1:{_free_port()}")
    assert r.rc == 5 and "cannot reach the control plane" in r.err


def test_server_init_prints_what_an_operator_needs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "cp"
    capsys.readouterr()
    assert run(["server", "init", "--data-dir", str(d), "--listen", "0.0.0.0:9443", "--san", "cp.example"]) == 0
    out = capsys.readouterr().out
    assert f"admin token  {d / 'admin.token'} (mode 0600, role operator)" in out
    assert f"export STANDBY_URL=https://127.0.0.1:9443 STANDBY_CA={d / 'ca' / 'ca.crt'} " \
           f"STANDBY_TOKEN_FILE={d / 'admin.token'}" in out
    assert f"standby server run --data-dir {d}" in out
    token = (d / "admin.token").read_text()
    assert run(["server", "init", "--data-dir", str(d)]) == 4
    assert "--force" in capsys.readouterr().err
    assert run(["server", "init", "--data-dir", str(d), "--listen", "127.0.0.1:9444", "--force"]) == 0
    out = capsys.readouterr().out
    assert "exists already" in out and "STANDBY_URL=https://127.0.0.1:9444" in out
    assert (d / "admin.token").read_text() == token  # --force keeps the token
    assert json.loads((d / "server.json").read_text())["listen"] == "127.0.0.1:9444"
    assert run(["server", "init", "--data-dir", str(tmp_path / "x"), "--listen", "nope"]) == 2
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_server_stops_cleanly_on_sigterm(plane: Plane) -> None:
    # Last in the module (pytest runs tests in file order): the fixture's server goes away.
    plane.proc.send_signal(signal.SIGTERM)
    assert plane.proc.wait(30) == 0, plane.log.read_text()
