"""The control-plane commands of the CLI without a control plane: argument validation
(exit 2 naming the option, before any request), the formatting helpers, following a job,
and the request bodies and outputs against a small scripted HTTP server on loopback.
End-to-end runs against the real control plane are in tests/api/test_cli_e2e.py."""

from __future__ import annotations

import datetime as dt
import io
import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from standby.cli import control_cmds as cc
from standby.cli import server_cmds
from standby.cli.main import run
from standby.client import ApiClient
from standby.errors import Refused, RemoteError


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = run(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture()
def closed_url() -> str:
    """A URL nothing listens on: validation must fail before any request is made."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STANDBY_URL", "STANDBY_TOKEN", "STANDBY_TOKEN_FILE", "STANDBY_CA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cc, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(cc, "console", Console(width=250))  # tables unfolded, so the tests can read them


# ---------------------------------------------------------------------------- argument validation


@pytest.mark.parametrize(("args", "option"), [
    (["policy", "create", "gold", "--copy-frequency", "1m"], "--copy-frequency"),
    (["policy", "create", "gold", "--retention-hours", "-1"], "--retention-hours"),
    (["policy", "create", "gold", "--app-consistent-hours", "9000"], "--app-consistent-hours"),
    (["policy", "create", "gold", "--initial", "later"], "--initial"),
    (["policy", "create", "gold", "--replication-port", "70000"], "--replication-port"),
    (["policy", "create", "gold", "--rpo-alert-seconds", "0"], "--rpo-alert-seconds"),
    (["policy", "create", "gold", "--authentication", "password"], "--authentication"),
    (["policy", "update", "gold", "--copy-frequency", "10s"], "--copy-frequency"),
    (["tokens", "create", "ci", "--role", "admin"], "--role"),
    (["tokens", "create", "ci"], "--role"),
    (["keys", "create", "--days", "6"], "--days"),
    (["jobs", "--state", "done"], "--state"),
    (["jobs", "--limit", "0"], "--limit"),
    (["webhooks", "add", "ops", "https://x.example/hook", "--min-severity", "fatal"], "--min-severity"),
    (["network", "create", "prod"], "--site"),
    (["jobs", "show", "abc"], "JOB_ID"),
])
def test_bad_arguments_exit_2_naming_the_option(capsys: pytest.CaptureFixture[str], closed_url: str,
                                                 args: list[str], option: str) -> None:
    rc, out, err = invoke(capsys, *args, "--url", closed_url)
    assert rc == 2, err
    assert option in err or option.lower() in err.lower()
    assert "Traceback" not in err and "cannot reach" not in err  # refused before any request


@pytest.mark.parametrize(("args", "message"), [
    (["policy", "create", "gold", "--initial", "scheduled"], "--initial scheduled needs --initial-at"),
    (["policy", "create", "gold", "--initial", "offline", "--export-path", "/x"],
     "--initial offline needs --export-path and --import-path"),
    (["policy", "create", "gold", "--initial", "scheduled", "--initial-at", "tomorrow"], "--initial-at: 'tomorrow'"),
    (["policy", "update", "gold"], "give at least one setting"),
    (["webhooks", "add", "ops", "ftp://x.example/hook"], "must start with http:// or https://"),
    (["webhooks", "add", "ops", "https://x.example/hook", "--secret-file", "/nonexistent/secret"], "--secret-file"),
])
def test_inconsistent_arguments_are_bad_input(capsys: pytest.CaptureFixture[str], closed_url: str,
                                              args: list[str], message: str) -> None:
    rc, _out, err = invoke(capsys, *args, "--url", closed_url)
    assert rc == 2
    assert message in err
    assert "cannot reach" not in err


def test_an_unreachable_control_plane_is_exit_5_naming_the_url(capsys: pytest.CaptureFixture[str],
                                                               closed_url: str) -> None:
    rc, out, err = invoke(capsys, "status", "--url", closed_url)
    assert rc == 5
    assert f"cannot reach the control plane at {closed_url}/api/v1/status" in err
    assert "Traceback" not in err and out == ""


def test_url_comes_from_the_environment_and_a_group_passes_its_options_down(
        capsys: pytest.CaptureFixture[str], closed_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANDBY_URL", closed_url)
    rc, _out, err = invoke(capsys, "items")
    assert rc == 5 and closed_url in err
    monkeypatch.delenv("STANDBY_URL")
    rc, _out, err = invoke(capsys, "jobs", "--url", closed_url, "show", "3")
    assert rc == 5 and f"{closed_url}/api/v1/jobs/3" in err


def test_every_documented_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = [["status"], ["items"], ["readiness"], ["protect"], ["unprotect"], ["pause"], ["resume"],
                ["replicate-now"], ["resync"], ["jobs"], ["jobs", "show"], ["jobs", "watch"], ["jobs", "cancel"],
                ["alerts"], ["alerts", "clear"], ["policy", "create"], ["policy", "list"], ["policy", "show"],
                ["policy", "update"], ["policy", "delete"], ["pair"], ["pairings"], ["unpair"], ["network", "map"],
                ["network", "list"], ["network", "unmap"], ["network", "create"], ["inventory", "clouds"],
                ["inventory", "hosts"], ["inventory", "vms"], ["agents"], ["agents", "revoke"], ["keys", "create"],
                ["keys", "list"], ["keys", "revoke"], ["tokens", "create"], ["tokens", "list"], ["tokens", "revoke"],
                ["webhooks", "add"], ["webhooks", "list"], ["webhooks", "remove"], ["server", "init"],
                ["server", "run"]]
    for cmd in commands:
        rc, out, _err = invoke(capsys, *cmd, "--help")
        assert rc == 0, cmd
        assert "Usage: standby " + " ".join(cmd) in out, cmd
        if cmd[0] != "server":
            assert "--url" in out and "--json" in out and "STANDBY_URL" in out, cmd


# ---------------------------------------------------------------------------- helpers


def test_policy_body_maps_options_to_the_api_fields() -> None:
    body = cc.policy_body(copy_frequency=cc.CopyFrequency.CONTINUOUS, retention_hours=24, app_consistent_hours=4,
                          compression=False, initial=cc.Initial.SCHEDULED, initial_at="2026-12-01T02:00:00+01:00",
                          delete_replica_on_disable=True, rpo_alert_seconds=120, keep_all_points_minutes=15,
                          creating=True)
    assert body == {"copy_frequency_seconds": 0, "recovery_point_retention_hours": 24,
                    "app_consistent_interval_hours": 4, "compression": False, "initial_replication": "scheduled",
                    "initial_replication_at": "2026-12-01T02:00:00+01:00", "delete_replica_on_disable": True,
                    "rpo_alert_seconds": 120, "keep_all_points_minutes": 15}
    assert cc.policy_body(keep_all_points_minutes=0) == {"keep_all_points_minutes": 0}  # 0 is a value, sent
    assert [cc.policy_body(copy_frequency=f)["copy_frequency_seconds"] for f in cc.CopyFrequency] == [30, 300, 900, 0]
    assert cc.policy_body() == {}  # nothing given: nothing sent (an update changes only what is given)


def test_initial_at_without_a_zone_is_local_time() -> None:
    text = cc.parse_initial_at("2026-12-01T02:00")
    assert text is not None
    t = dt.datetime.fromisoformat(text)
    assert t.tzinfo is not None
    assert t.replace(tzinfo=None) == dt.datetime(2026, 12, 1, 2, 0)
    assert t.utcoffset() == dt.datetime(2026, 12, 1, 2, 0).astimezone().utcoffset()


@pytest.mark.parametrize(("n", "text"), [(None, "-"), (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                         (5 * 2**30, "5.0 GiB"), (3 * 2**40, "3.0 TiB")])
def test_fmt_bytes(n: int | None, text: str) -> None:
    assert cc.fmt_bytes(n) == text


@pytest.mark.parametrize(("s", "text"), [(None, "-"), (0, "0s"), (59.4, "59s"), (61, "1m 01s"), (3599, "59m 59s"),
                                         (3600, "1h 00m"), (7800, "2h 10m"), (90000, "1d 1h")])
def test_fmt_duration(s: float | None, text: str) -> None:
    assert cc.fmt_duration(s) == text


def test_fmt_time_and_age() -> None:
    now = dt.datetime(2026, 11, 26, 18, 0, 0, tzinfo=dt.timezone.utc)
    assert cc.fmt_age("2026-11-26T17:55:00Z", now) == "5m 00s ago"
    assert cc.fmt_age("2026-11-26T17:59:30", now) == "30s ago"  # no zone: the API's UTC
    assert cc.fmt_age("2026-11-26T18:00:45+00:00", now) == "in 45s"
    assert cc.fmt_age(None, now) == "never"
    assert cc.fmt_time("2026-11-26T17:55:00Z", dt.timezone(dt.timedelta(hours=1))) == "2026-11-26 18:55:00"
    assert cc.fmt_time(None) == "-"
    assert cc.fmt_frequency(0) == "continuous" and cc.fmt_frequency(300) == "5m" and cc.fmt_frequency(77) == "77s"


def _job(state: str, steps: list[tuple[str, str]], **kw: Any) -> dict[str, Any]:
    return {"id": 7, "kind": "protect", "target": "item:1", "state": state, "progress": kw.pop("progress", 0),
            "steps": [{"position": n, "name": name, "state": st, "progress": 0, "message": ""}
                      for n, (name, st) in enumerate(steps)], **kw}


def test_job_events_print_each_change_once() -> None:
    names = ["check readiness", "place replica"]
    j0 = _job("queued", [(names[0], "pending"), (names[1], "pending")])
    j1 = _job("running", [(names[0], "running"), (names[1], "pending")], progress=10)
    j2 = _job("running", [(names[0], "succeeded"), (names[1], "running")], progress=50)
    j3 = _job("failed", [(names[0], "succeeded"), (names[1], "failed")], error="no secondary host has an agent")
    assert cc.job_events(None, j0) == ["job 7 protect item:1: queued"]
    assert cc.job_events(j0, j1) == ["  step check readiness: running", "job 7 protect item:1: running (10%)"]
    assert cc.job_events(j1, j2) == ["  step check readiness: succeeded", "  step place replica: running"]
    assert cc.job_events(j2, j2) == []
    assert cc.job_events(j2, j3) == ["  step place replica: failed",
                                     "job 7 protect item:1: failed: no secondary host has an agent"]


def test_job_outcome() -> None:
    assert cc.job_outcome(_job("succeeded", [])) is None
    failed = cc.job_outcome(_job("failed", [], error="refused"))
    assert isinstance(failed, Refused) and failed.exit_code == 1 and "job 7 (protect) failed: refused" in failed.message
    errored = cc.job_outcome(_job("errored", [], error="control plane restarted"))
    assert isinstance(errored, RemoteError) and errored.exit_code == 5
    named = cc.job_outcome(_job("failed", [], error="disk full", result={"error_type": "OutOfSpace", "exit_code": 7}))
    assert named is not None and type(named).__name__ == "OutOfSpace" and named.exit_code == 7
    assert cc.job_outcome(_job("cancelled", [])).exit_code == 1  # type: ignore[union-attr]


def test_render_findings_like_check() -> None:
    out = Console(record=True, width=200, force_terminal=False)
    cc.render_findings([{"rule": "kvm.libvirt-version", "severity": "error", "subject": "host/kvm1",
                         "message": "libvirt 6.0 is too old", "remedy": "upgrade libvirt"},
                        {"rule": "kvm.storage", "severity": "warning", "subject": "host/kvm1",
                         "message": "8% free", "remedy": "free some space"}], "web01 cannot be protected", out)
    text = out.export_text()
    for part in ("web01 cannot be protected", "host/kvm1", "kvm.libvirt-version", "remedy: upgrade libvirt",
                 "NOT READY", "1 error, 1 warning, 0 info"):
        assert part in text


def test_server_init_env_lines() -> None:
    assert server_cmds.client_url("0.0.0.0:8443") == "https://127.0.0.1:8443"
    assert server_cmds.client_url("[::]:9000") == "https://[::1]:9000"
    assert server_cmds.client_url("cp.example:8443") == "https://cp.example:8443"
    line = server_cmds.env_lines("https://127.0.0.1:8443", Path("/d d/ca/ca.crt"), Path("/d d/admin.token"))
    assert line == ("export STANDBY_URL=https://127.0.0.1:8443 STANDBY_CA='/d d/ca/ca.crt' "
                    "STANDBY_TOKEN_FILE='/d d/admin.token'")


# ---------------------------------------------------------------------------- against a scripted server


class Scripted:
    """A tiny HTTP server: `routes[(method, path)]` is a body or a function of the request
    (and how many times the route was hit) returning (status, body)."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Any] = {}
        self.requests: list[dict[str, Any]] = []
        self.hits: dict[tuple[str, str], int] = {}


def _handler(script: Scripted) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _do(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            path, _, query = self.path.partition("?")
            path = path.removeprefix("/api/v1")
            key = (self.command, path)
            script.hits[key] = script.hits.get(key, 0) + 1
            script.requests.append({"method": self.command, "path": path, "query": query, "json": body,
                                    "auth": self.headers.get("Authorization")})
            route = script.routes.get(key, (404, {"error": {"type": "NotFound", "message": f"no route {path}",
                                                            "exit_code": 3, "details": {}}}))
            status, out = route(body, script.hits[key]) if callable(route) else route
            data = b"" if out is None else json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = _do

    return H


@pytest.fixture()
def scripted() -> Iterator[tuple[Scripted, str]]:
    script = Scripted()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    try:
        yield script, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join()


ITEM = {"id": 1, "vm": "web01", "state": "enabling", "health": "normal", "health_reason": "", "rpo_seconds": None,
        "last_recovery_point_at": None, "bytes_replicated": 0}
STEPS = ["check readiness", "place replica", "initial replication", "wait for first recovery point",
         "finalize protection"]


def _progressing_job(final: str = "succeeded", error: str | None = None) -> Callable[[Any, int], tuple[int, Any]]:
    """GET /jobs/7: each poll finishes one more step."""

    def route(_body: Any, hit: int) -> tuple[int, Any]:
        done = min(hit, len(STEPS))
        steps = [(n, "succeeded" if i < done else ("running" if i == done else "pending")) for i, n in enumerate(STEPS)]
        state = "running" if done < len(STEPS) else final
        if state == "failed":
            steps[-1] = (STEPS[-1], "failed")
        return 200, _job(state, steps, progress=done * 20, error=error if state == "failed" else None)

    return route


def test_protect_follows_the_job_with_plain_lines_without_a_tty(capsys: pytest.CaptureFixture[str],
                                                                scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    script.routes[("POST", "/items")] = (202, {"item": ITEM, "job": _job("queued", [(n, "pending") for n in STEPS])})
    script.routes[("GET", "/jobs/7")] = _progressing_job()
    script.routes[("GET", "/items/1")] = (200, {**ITEM, "state": "protected"})
    rc, out, err = invoke(capsys, "protect", "web01", "--policy", "gold", "--url", url, "--token", "sbt_x")
    assert rc == 0, err
    assert script.requests[0]["json"] == {"vm": "web01", "policy": "gold"}
    assert script.requests[0]["auth"] == "Bearer sbt_x"
    assert "protecting web01: job 7" in out
    assert "web01: protected; state protected (job 7: succeeded)" in out
    for name in STEPS:  # one line per step change, in order, on stderr
        assert f"step {name}: succeeded" in err
    assert err.index("step check readiness: succeeded") < err.index("step finalize protection: succeeded")
    assert "job 7 protect item:1: succeeded" in err


def test_protect_json_is_one_document_and_a_failed_job_exits_nonzero(capsys: pytest.CaptureFixture[str],
                                                                     scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    script.routes[("POST", "/items")] = (202, {"item": ITEM, "job": _job("queued", [(n, "pending") for n in STEPS])})
    script.routes[("GET", "/jobs/7")] = _progressing_job("failed", "no recovery point within 600 s")
    script.routes[("GET", "/items/1")] = (200, {**ITEM, "state": "error"})
    rc, out, err = invoke(capsys, "protect", "web01", "--json", "--url", url)
    assert rc == 1
    doc = json.loads(out)  # exactly one JSON document
    assert doc["job"]["state"] == "failed" and doc["item"]["state"] == "error"
    assert "job 7 (protect) failed: no recovery point within 600 s" in err
    assert "step" not in err  # no progress lines with --json


def test_protect_no_wait_prints_the_job_and_returns(capsys: pytest.CaptureFixture[str],
                                                    scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    script.routes[("POST", "/items")] = (202, {"item": ITEM, "job": _job("queued", [])})
    rc, out, _err = invoke(capsys, "protect", "web01", "--no-wait", "--url", url)
    assert rc == 0
    assert "protecting web01: job 7" in out
    assert ("GET", "/jobs/7") not in script.hits


def test_a_readiness_refusal_prints_the_findings_and_exits_1(capsys: pytest.CaptureFixture[str],
                                                              scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    findings = [{"rule": "kvm.vm-disk-format", "severity": "error", "subject": "vm/kvm1/web01",
                 "message": "disk vdb is a raw file", "remedy": "convert it to qcow2"}]
    script.routes[("POST", "/items")] = (409, {"error": {"type": "NotReady", "message": "web01 is not ready",
                                                         "exit_code": 1, "details": {"findings": findings}}})
    rc, out, err = invoke(capsys, "protect", "web01", "--url", url)
    assert rc == 1
    assert "vm/kvm1/web01" in out and "remedy: convert it to qcow2" in out and "NOT READY" in out
    assert "error: web01 is not ready" in err
    rc, out, err = invoke(capsys, "protect", "web01", "--url", url, "--json")
    assert rc == 1
    assert json.loads(out)["error"]["details"]["findings"] == findings


def test_unprotect_sends_the_replica_choice(capsys: pytest.CaptureFixture[str], scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    job = _job("succeeded", [("remove replica", "succeeded")], kind="disable_protection")
    script.routes[("DELETE", "/items/web%2001")] = (202, {"item": {**ITEM, "vm": "web 01"}, "job": job})
    script.routes[("GET", "/items/1")] = (404, {"error": {"type": "NotFound", "message": "gone", "exit_code": 3}})
    rc, out, err = invoke(capsys, "unprotect", "web 01", "--delete-replica", "--url", url)
    assert rc == 0, err
    assert script.requests[0]["query"] == "delete_replica=true"
    assert "web 01: protection disabled" in out
    rc, _out, _err = invoke(capsys, "unprotect", "web 01", "--no-wait", "--url", url)
    assert script.requests[-1]["query"] == ""  # not given: the policy decides


def test_policy_create_sends_every_field_given(capsys: pytest.CaptureFixture[str],
                                               scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    policy = {"name": "gold", "copy_frequency_seconds": 30, "recovery_point_retention_hours": 24,
              "app_consistent_interval_hours": 0, "compression": False, "authentication": "certificate",
              "replication_port": 7443, "initial_replication": "offline", "offline_export_path": "/seed/out",
              "offline_import_path": "/seed/in", "delete_replica_on_disable": True, "rpo_alert_seconds": 90,
              "pairings": []}
    script.routes[("POST", "/policies")] = (201, policy)
    rc, out, err = invoke(capsys, "policy", "create", "gold", "--copy-frequency", "30s", "--retention-hours", "24",
                          "--no-compression", "--initial", "offline", "--export-path", "/seed/out", "--import-path",
                          "/seed/in", "--delete-replica-on-disable", "--rpo-alert-seconds", "90", "--url", url)
    assert rc == 0, err
    assert script.requests[0]["json"] == {
        "name": "gold", "copy_frequency_seconds": 30, "recovery_point_retention_hours": 24, "compression": False,
        "initial_replication": "offline", "offline_export_path": "/seed/out", "offline_import_path": "/seed/in",
        "delete_replica_on_disable": True, "rpo_alert_seconds": 90}
    assert "30s" in out and "24 h of recovery points" in out and "delete the replica" in out


def test_jobs_list_filters_and_json(capsys: pytest.CaptureFixture[str], scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    script.routes[("GET", "/jobs")] = (200, {"items": [_job("running", [], progress=40)]})
    rc, out, _err = invoke(capsys, "jobs", "--state", "running", "--state", "queued", "--kind", "protect",
                           "--url", url, "--json")
    assert rc == 0
    assert json.loads(out)[0]["id"] == 7
    assert script.requests[0]["query"] == "kind=protect&limit=50&state=running&state=queued"
    rc, out, _err = invoke(capsys, "jobs", "--url", url)
    assert rc == 0 and "protect" in out and "40%" in out


def test_tokens_create_prints_the_token_alone_on_stdout(capsys: pytest.CaptureFixture[str],
                                                        scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    script.routes[("POST", "/tokens")] = (201, {"name": "ci", "role": "viewer", "prefix": "sbt_ab",
                                                "expires_at": None, "token": "sbt_abcdef0123"})
    rc, out, err = invoke(capsys, "tokens", "create", "ci", "--role", "viewer", "--url", url)
    assert rc == 0
    assert out == "sbt_abcdef0123\n"  # so that `standby tokens create ... > file` captures just the token
    assert "shown only now" in err
    assert script.requests[0]["json"] == {"name": "ci", "role": "viewer"}


def test_webhooks_add_reads_the_secret_from_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                   scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    script.routes[("POST", "/webhooks")] = (201, {"name": "ops", "url": "https://hooks.example/x"})
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    rc, _out, err = invoke(capsys, "webhooks", "add", "ops", "https://hooks.example/x", "--secret-file", str(secret),
                           "--kind", "rpo_breach", "--kind", "heartbeat_lost", "--min-severity", "warning",
                           "--url", url)
    assert rc == 0, err
    assert script.requests[0]["json"] == {"name": "ops", "url": "https://hooks.example/x", "secret": "s3cret",
                                          "kinds": ["rpo_breach", "heartbeat_lost"], "min_severity": "warning"}


def test_status_renders_counts_and_items(capsys: pytest.CaptureFixture[str], scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    now = dt.datetime.now(dt.timezone.utc)
    script.routes[("GET", "/status")] = (200, {
        "version": "0.1", "items": {"total": 2, "by_health": {"normal": 1, "warning": 0, "critical": 1},
                                    "by_state": {"protected": 1, "resync_required": 1}},
        "agents": [{"name": "kvm1", "state": "active", "last_heartbeat_at": now.isoformat(), "heartbeat_ok": True},
                   {"name": "kvm2", "state": "active", "last_heartbeat_at": None, "heartbeat_ok": False}],
        "open_alerts": 1, "running_jobs": 0})
    script.routes[("GET", "/health")] = (200, {"status": "ok", "version": "0.1", "role": "active", "name": "cp-b",
                                               "epoch": 2, "active_url": "https://cp-b:8443", "reason": None})
    script.routes[("GET", "/items")] = (200, {"items": [
        {**ITEM, "state": "protected", "rpo_seconds": 42.0,
         "last_recovery_point_at": (now - dt.timedelta(seconds=40)).isoformat(), "bytes_replicated": 3 * 2**30},
        {**ITEM, "id": 2, "vm": "db01", "state": "resync_required", "health": "critical",
         "health_reason": "resynchronization required"}]})
    rc, out, _err = invoke(capsys, "status", "--url", url)
    assert rc == 0
    for part in ("cp-b active (epoch 2)", "items", "2 (normal 1, warning 0, critical 1)", "kvm2", "never",
                 "open alerts", "web01",
                 "protected", "42s", "3.0 GiB", "db01", "resynchronization required", "none"):
        assert part in out, part
    rc, out, _err = invoke(capsys, "status", "--url", url, "--json")
    doc = json.loads(out)
    assert doc["status"]["open_alerts"] == 1 and [i["vm"] for i in doc["items"]] == ["web01", "db01"]


def test_readiness_exit_code_follows_the_verdict(capsys: pytest.CaptureFixture[str],
                                                 scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    script.routes[("GET", "/readiness")] = (200, {"ready": True, "findings": []})
    rc, out, _err = invoke(capsys, "readiness", "--url", url)
    assert rc == 0 and "READY" in out and "No findings" in out
    script.routes[("GET", "/readiness")] = (200, {"ready": False, "findings": [
        {"rule": "fabric.pairing", "severity": "error", "subject": "cloud/gold", "message": "not paired",
         "remedy": "standby pair gold silver"}]})
    rc, out, _err = invoke(capsys, "readiness", "--url", url, "--json")
    assert rc == 1 and json.loads(out)["ready"] is False


def test_unauthorized_and_forbidden_say_what_to_do(capsys: pytest.CaptureFixture[str],
                                                   scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    script.routes[("GET", "/items")] = (401, {"error": {"type": "Unauthorized", "message": "this request needs an "
                                                        "API token", "exit_code": 1, "details": {}}})
    script.routes[("DELETE", "/policies/gold")] = (403, {"error": {"type": "Forbidden", "message": "token 'ro' is a "
                                                                   "viewer's", "exit_code": 1, "details": {}}})
    rc, _out, err = invoke(capsys, "items", "--url", url)
    assert rc == 1 and "set STANDBY_TOKEN" in err
    rc, _out, err = invoke(capsys, "policy", "delete", "gold", "--url", url, "--token", "ro")
    assert rc == 1 and "this token's role is viewer" in err


def test_on_a_terminal_each_step_gets_a_bar(scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    script.routes[("GET", "/jobs/7")] = _progressing_job()
    buf = io.StringIO()
    out = Console(file=buf, force_terminal=True, width=140)
    with ApiClient(url) as api:
        job = cc.follow_job(api, _job("queued", [(n, "pending") for n in STEPS]), out=out)
    assert job["state"] == "succeeded"
    text = buf.getvalue()
    assert "\x1b[" in text  # drawn live, with terminal control codes
    for name in STEPS:
        assert name in text
    assert "100%" in text and "succeeded" in text


def test_jobs_watch_exit_codes_and_timeout(capsys: pytest.CaptureFixture[str], scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    script.routes[("GET", "/jobs/7")] = _progressing_job("failed", "the agent refused")
    rc, out, err = invoke(capsys, "jobs", "watch", "7", "--url", url)
    assert rc == 1
    assert "step place replica: succeeded" in err and "job 7 (protect) failed: the agent refused" in err
    assert "failed" in out  # the job as it ended
    script.hits.clear()
    script.routes[("GET", "/jobs/7")] = (200, _job("running", [("check readiness", "running")]))
    rc, _out, err = invoke(capsys, "jobs", "watch", "7", "--timeout", "1", "--url", url)
    assert rc == 5
    assert "job 7 has not ended after 1 s" in err and "standby jobs watch 7" in err


@pytest.mark.parametrize(("action", "verb"), [("pause", "paused"), ("resume", "resumed"),
                                              ("replicate-now", "replication started"),
                                              ("resync", "resynchronization started")])
def test_item_actions_post_to_their_route(capsys: pytest.CaptureFixture[str], scripted: tuple[Scripted, str],
                                          action: str, verb: str) -> None:
    script, url = scripted
    job = _job("queued", [("act", "pending")], kind=action.replace("-", "_"))
    script.routes[("POST", f"/items/web01/{action}")] = (202, {"item": {**ITEM, "state": "paused"}, "job": job})
    script.routes[("GET", "/jobs/7")] = (200, {**job, "state": "succeeded", "steps": [
        {"position": 0, "name": "act", "state": "succeeded", "progress": 100, "message": ""}]})
    script.routes[("GET", "/items/1")] = (200, {**ITEM, "state": "protected"})
    rc, out, _err = invoke(capsys, action, "web01", "--url", url)
    assert rc == 0
    assert f"web01: {verb}; state paused (job 7: queued)" in out
    assert ("GET", "/jobs/7") not in script.hits  # no --wait: not followed
    rc, out, err = invoke(capsys, action, "web01", "--wait", "--url", url, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["job"]["state"] == "succeeded" and doc["item"]["state"] == "protected"


def test_jobs_cancel_and_show(capsys: pytest.CaptureFixture[str], scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    running = _job("running", [("check readiness", "succeeded"), ("place replica", "running")], progress=50,
                   cancel_requested_at="2026-11-26T18:00:00Z", started_at="2026-11-26T17:59:00Z")
    script.routes[("POST", "/jobs/7/cancel")] = (200, running)
    script.routes[("GET", "/jobs/7")] = (200, running)
    rc, out, _err = invoke(capsys, "jobs", "cancel", "7", "--url", url)
    assert rc == 0 and "job 7: running (cancel requested)" in out
    rc, out, _err = invoke(capsys, "jobs", "show", "7", "--url", url)
    assert rc == 0
    for part in ("protect", "running (50%)", "cancel", "check readiness", "place replica", "succeeded"):
        assert part in out, part
