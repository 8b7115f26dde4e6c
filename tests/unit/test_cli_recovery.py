"""The recovery commands of the CLI without a control plane: argument validation (exit 2
naming the option, before any request), the request bodies, the rendering of points,
plans and dry runs, and following a plan's job (a manual action announced with the
command that confirms it), against a small scripted HTTP server on loopback."""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from standby.cli import control_cmds as cc
from standby.cli import recovery_cmds as rc_
from standby.cli.main import run
from standby.client import ApiClient
from standby.domain import plans as plan_rules
from standby.errors import BadInput


def invoke(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


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
    wide = Console(width=250)  # tables unfolded, so the tests can read them
    monkeypatch.setattr(cc, "console", wide)
    monkeypatch.setattr(rc_, "console", wide)


class Scripted:
    """`routes[(method, path)]`: (status, body), or a function (request body, hit count) -> that."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Any] = {}
        self.requests: list[dict[str, Any]] = []
        self.hits: dict[tuple[str, str], int] = {}


@pytest.fixture()
def scripted() -> Iterator[tuple[Scripted, str]]:
    script = Scripted()

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _do(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            path, _, query = self.path.partition("?")
            key = (self.command, path.removeprefix("/api/v1"))
            script.hits[key] = script.hits.get(key, 0) + 1
            script.requests.append({"method": self.command, "path": key[1], "query": query, "json": body})
            route = script.routes.get(key, (404, {"error": {"type": "NotFound", "message": f"no route {key[1]}",
                                                            "exit_code": 3, "details": {}}}))
            status, out = route(body, script.hits[key]) if callable(route) else route
            data = b"" if out is None else json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _do

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    try:
        yield script, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join()


# ---------------------------------------------------------------------------- argument validation


@pytest.mark.parametrize(("args", "option"), [
    (["failover", "web01"], "--type"),
    (["failover", "web01", "--type", "sideways"], "--type"),
    (["plan", "failover", "erp"], "--type"),
    (["plan", "failover", "erp", "--type", "drill"], "--type"),
    (["jobs", "confirm", "7"], "STEP"),
    (["jobs", "confirm", "7", "0"], "STEP"),
    (["jobs", "confirm", "x", "1"], "JOB_ID"),
    (["recovery-points", "web01", "--agent-timeout", "500"], "--agent-timeout"),
    (["test-failover", "web01", "--timeout", "0"], "--timeout"),
])
def test_bad_arguments_exit_2_naming_the_option(capsys: pytest.CaptureFixture[str], closed_url: str,
                                                 args: list[str], option: str) -> None:
    code, _out, err = invoke(capsys, *args, "--url", closed_url)
    assert code == 2, err
    assert option in err or option.lower() in err.lower()
    assert "Traceback" not in err and "cannot reach" not in err  # refused before any request


@pytest.mark.parametrize(("args", "message"), [
    (["failover", "web01", "--type", "planned", "--point", "latest_processed"], "--point: a planned failover"),
    (["failover", "web01", "--type", "planned", "--no-shutdown"], "--no-shutdown: a planned failover always"),
    (["plan", "failover", "erp", "--type", "planned", "--point", "p-1"], "--point: a planned failover"),
    (["test-failover", "web01", "--network", " "], "--network: give isolated, none or the name"),
    (["test-failover-cleanup", "web01", "--notes", "x" * 4001], "--notes: at most 4000"),
    (["plan", "create", "/nonexistent/plan.yaml"], "plan file /nonexistent/plan.yaml"),
])
def test_inconsistent_arguments_are_bad_input(capsys: pytest.CaptureFixture[str], closed_url: str,
                                              args: list[str], message: str) -> None:
    code, _out, err = invoke(capsys, *args, "--url", closed_url)
    assert code == 2, err
    assert message in err
    assert "cannot reach" not in err and "Traceback" not in err


def test_plan_files_are_read_as_json_or_yaml(tmp_path: Path) -> None:
    doc = {"name": "erp", "groups": [{"vms": ["db01"]}]}
    (tmp_path / "p.json").write_text(json.dumps(doc))
    (tmp_path / "p.yaml").write_text("name: erp\ngroups:\n  - vms: [db01]\n")
    assert rc_.read_plan_file(tmp_path / "p.json") == doc
    assert rc_.read_plan_file(tmp_path / "p.yaml") == doc
    (tmp_path / "bad.yaml").write_text("name: erp\ngroups: [{vms: [db01]\n")
    with pytest.raises(BadInput, match="not YAML"):
        rc_.read_plan_file(tmp_path / "bad.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(BadInput, match="not JSON"):
        rc_.read_plan_file(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(BadInput, match="mapping"):
        rc_.read_plan_file(tmp_path / "list.yaml")


def test_request_bodies() -> None:
    assert rc_.test_network_body("isolated") == {"mode": "isolated"}
    assert rc_.test_network_body("none") == {"mode": "none"}
    assert rc_.test_network_body("lab-net") == {"mode": "existing", "name": "lab-net"}
    assert rc_.failover_body(rc_.FailoverType.PLANNED, None, True) == {"type": "planned"}
    assert rc_.failover_body(rc_.FailoverType.PLANNED, "latest", True) == {"type": "planned"}
    assert rc_.failover_body(rc_.FailoverType.UNPLANNED, None, False) == {
        "type": "unplanned", "point": "latest", "shutdown_source": False}
    assert rc_.failover_body(rc_.FailoverType.UNPLANNED, "p-7", True)["point"] == "p-7"


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in (["test-failover"], ["test-failover-cleanup"], ["failover"], ["commit"], ["cancel-failover"],
                ["reverse-replicate"], ["failback"], ["recovery-points"], ["plan", "create"], ["plan", "list"],
                ["plan", "show"], ["plan", "delete"], ["plan", "failover"], ["jobs", "confirm"]):
        code, out, _err = invoke(capsys, *cmd, "--help")
        assert code == 0 and "--json" in out, cmd


# ---------------------------------------------------------------------------- against a scripted server

ITEM = {"id": 1, "vm": "web01", "state": "protected", "health": "normal"}


def _job(state: str, kind: str = "test_failover", **kw: Any) -> dict[str, Any]:
    return {"id": 7, "kind": kind, "target": "item:1", "state": state, "progress": 100 if state == "succeeded" else 0,
            "steps": [{"position": 0, "name": "run workflow", "state": "succeeded" if state == "succeeded" else
                       "running", "progress": 0, "message": ""}], **kw}


def test_test_failover_sends_the_point_and_network_and_follows_the_job(capsys: pytest.CaptureFixture[str],
                                                                       scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    script.routes[("POST", "/items/web01/test-failover")] = (202, {"item": ITEM, "job": _job("queued")})
    script.routes[("GET", "/jobs/7")] = lambda _b, hit: (200, _job("running" if hit < 2 else "succeeded"))
    script.routes[("GET", "/items/1")] = (200, {**ITEM, "state": "test_failover_in_progress"})
    code, out, err = invoke(capsys, "test-failover", "web01", "--point", "p-3", "--network", "lab", "--url", url)
    assert code == 0, err
    assert script.requests[0]["json"] == {"point": "p-3", "network": {"mode": "existing", "name": "lab"}}
    assert "web01: test failover; state test_failover_in_progress (job 7: succeeded)" in out
    assert "job 7 test_failover item:1: succeeded" in err


@pytest.mark.parametrize(("args", "path", "body"), [
    (["failover", "web01", "--type", "planned"], "/items/web01/failover", {"type": "planned"}),
    (["failover", "web01", "--type", "unplanned", "--point", "latest_app_consistent", "--no-shutdown"],
     "/items/web01/failover", {"type": "unplanned", "point": "latest_app_consistent", "shutdown_source": False}),
    (["test-failover-cleanup", "web01", "--notes", "app answered"], "/items/web01/test-failover/cleanup",
     {"notes": "app answered"}),
    (["commit", "web01"], "/items/web01/commit", None),
    (["cancel-failover", "web01"], "/items/web01/cancel-failover", None),
    (["reverse-replicate", "web01"], "/items/web01/reverse-replicate", None),
    (["failback", "web01"], "/items/web01/failback", None),
])
def test_item_operations_post_to_their_route(capsys: pytest.CaptureFixture[str], scripted: tuple[Scripted, str],
                                             args: list[str], path: str, body: Any) -> None:
    script, url = scripted
    script.routes[("POST", path)] = (202, {"item": ITEM, "job": _job("queued")})
    code, out, err = invoke(capsys, *args, "--no-wait", "--json", "--url", url)
    assert code == 0, err
    assert script.requests[0]["json"] == body
    assert json.loads(out)["job"]["state"] == "queued"  # one document, not followed
    assert ("GET", "/jobs/7") not in script.hits


def test_a_refusal_is_one_line_with_its_exit_code(capsys: pytest.CaptureFixture[str],
                                                  scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    msg = "VM web01: planned_failover_started refused in state initial_replication_in_progress"
    script.routes[("POST", "/items/web01/failover")] = (409, {"error": {"type": "TransitionRefused", "message": msg,
                                                                       "exit_code": 1, "details": {}}})
    code, out, err = invoke(capsys, "failover", "web01", "--type", "planned", "--url", url)
    assert code == 1 and out == ""
    assert msg in err and "Traceback" not in err


def test_a_failed_failover_job_exits_nonzero(capsys: pytest.CaptureFixture[str],
                                             scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    script.routes[("POST", "/items/web01/failover")] = (202, {"item": ITEM, "job": _job("queued")})
    script.routes[("GET", "/jobs/7")] = (200, _job("failed", kind="unplanned_failover",
                                                   error="no recovery point on every disk"))
    script.routes[("GET", "/items/1")] = (200, ITEM)
    code, _out, err = invoke(capsys, "failover", "web01", "--type", "unplanned", "--url", url)
    assert code == 1
    assert "job 7 (unplanned_failover) failed: no recovery point on every disk" in err


def test_recovery_points_table(capsys: pytest.CaptureFixture[str], scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    points = {"item_id": 1, "secondary_host": "kvm-b", "points": {"web01-vda": [
        {"id": "p-0001", "created_at": "2026-11-26T10:00:00+00:00", "consistency": "crash", "kind": "cycle",
         "bytes_changed": 2048},
        {"id": "p-0002", "created_at": "2026-11-26T10:05:00+00:00", "consistency": "app", "kind": "cycle",
         "bytes_changed": 0, "pinned": True}]}}
    script.routes[("GET", "/items/web01/points")] = (200, points)
    code, out, err = invoke(capsys, "recovery-points", "web01", "--url", url)
    assert code == 0, err
    assert "recovery points on kvm-b" in out
    assert out.index("p-0002") < out.index("p-0001")  # newest first
    assert "2.0 KiB" in out and "app" in out and "yes" in out
    assert script.requests[0]["query"] == "timeout=30.0"
    code, out, _err = invoke(capsys, "recovery-points", "web01", "--url", url, "--json")
    assert json.loads(out) == points


PLAN_DOC = {"name": "erp", "description": "ERP", "groups": [
    {"name": "db", "vms": ["db01", "db02"], "pre": [{"path": "stop.sh", "args": ["--now"], "timeout_seconds": 60}],
     "post": [], "manual_actions": [{"text": "Repoint DNS", "failover_types": ["planned"]}]},
    {"name": None, "vms": ["web01"], "pre": [], "post": [], "manual_actions": []}]}
PLAN = {"name": "erp", "document": PLAN_DOC, "created_by": "admin", "created_at": "2026-11-26T10:00:00Z",
        "updated_at": "2026-11-26T10:00:00Z"}


def test_plan_create_list_show_delete(capsys: pytest.CaptureFixture[str], scripted: tuple[Scripted, str],
                                      tmp_path: Path) -> None:
    script, url = scripted
    f = tmp_path / "erp.yaml"
    f.write_text("name: erp\ngroups:\n  - {name: db, vms: [db01, db02]}\n  - vms: [web01]\n")
    script.routes[("POST", "/plans")] = (201, PLAN)
    script.routes[("GET", "/plans")] = (200, {"items": [PLAN]})
    script.routes[("GET", "/plans/erp")] = (200, PLAN)
    script.routes[("DELETE", "/plans/erp")] = (204, None)
    code, out, err = invoke(capsys, "plan", "create", str(f), "--replace", "--url", url)
    assert code == 0, err
    assert script.requests[-1]["json"] == {"name": "erp", "groups": [{"name": "db", "vms": ["db01", "db02"]},
                                                                     {"vms": ["web01"]}]}
    assert script.requests[-1]["query"] == "replace=true"
    assert "recovery plan erp" in out and "db01, db02" in out
    code, out, _err = invoke(capsys, "plan", "list", "--url", url)
    assert code == 0 and "erp" in out and "ERP" in out
    row = next(line for line in out.splitlines() if " erp " in line)
    assert [cell.strip() for cell in row.split("│")][1:4] == ["erp", "2", "3"]  # groups, VMs
    code, out, _err = invoke(capsys, "plan", "show", "erp", "--url", url)
    assert code == 0
    for part in ("stop.sh --now (60 s)", "Repoint DNS (planned)", "group 2", "web01"):
        assert part in out, part
    code, out, _err = invoke(capsys, "plan", "delete", "erp", "--url", url, "--json")
    assert code == 0 and json.loads(out) == {"deleted": "erp"}


def test_an_invalid_plan_prints_every_problem(capsys: pytest.CaptureFixture[str], scripted: tuple[Scripted, str],
                                              tmp_path: Path) -> None:
    script, url = scripted
    f = tmp_path / "erp.json"
    f.write_text(json.dumps({"name": "erp", "groups": []}))
    message = "recovery plan erp: invalid\n  - groups: a plan needs at least one group"
    script.routes[("POST", "/plans")] = (422, {"error": {"type": "InvalidPlan", "message": message, "exit_code": 2,
                                                         "details": {"problems": ["groups: a plan needs ..."]}}})
    code, out, err = invoke(capsys, "plan", "create", str(f), "--url", url)
    assert code == 2 and out == ""
    assert "groups: a plan needs at least one group" in err and "Traceback" not in err


def test_plan_dry_run_prints_the_steps(capsys: pytest.CaptureFixture[str], scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    plan = plan_rules.load_plan(PLAN_DOC)
    text = plan_rules.dry_run(plan, "planned")
    dry = {"plan": "erp", "type": "planned", "text": text,
           "steps": [s.as_dict() for s in plan_rules.expand(plan, "planned")]}
    script.routes[("POST", "/plans/erp/failover")] = (200, dry)
    code, out, err = invoke(capsys, "plan", "failover", "erp", "--type", "planned", "--dry-run", "--url", url)
    assert code == 0, err
    assert script.requests[0]["json"] == {"type": "planned", "dry_run": True}
    assert out == text  # exactly the domain's rendering
    assert "manual action, wait for confirmation: Repoint DNS" in out
    code, out, _err = invoke(capsys, "plan", "failover", "erp", "--type", "planned", "--dry-run", "--json",
                             "--url", url)
    assert json.loads(out) == dry


def _plan_job(state: str, statuses: list[str], result: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": 9, "kind": "plan_failover", "target": "plan:erp", "state": state, "progress": 0, "message": "",
            "error": None if state != "failed" else "recovery plan erp: completed with errors",
            "steps": [{"position": 0, "name": "run plan", "state": state, "progress": 0, "message": ""}],
            "payload": {"plan": "erp", "document": PLAN_DOC, "type": "planned", "skip": [], "statuses": statuses,
                        "info": {"1": {"seconds": 1.5}}},
            "result": result}


PLANNED = ["shutdown", "shutdown", "pre_script", "failover", "manual_action", "failover"]


def _progress(hit: int) -> tuple[int, Any]:
    """Each poll moves the plan on; at hits 3-4 it waits on step 5 (the manual action)."""
    done = min(hit + 1, 6)
    if 3 <= hit <= 4:
        return 200, _plan_job("running", ["done"] * 4 + ["waiting", "pending"])
    if hit < 3:
        return 200, _plan_job("running", ["done"] * done + ["running"] + ["pending"] * (5 - done))
    steps = [{**s.as_dict(), "status": "done", "seconds": 2.0}
             for s in plan_rules.expand(plan_rules.load_plan(PLAN_DOC), "planned")]
    steps[5].update(status="failed", error="web01: failed: no agent")
    return 200, _plan_job("failed", ["done"] * 5 + ["failed"], {"ok": False, "message": "completed with errors",
                                                                "failed": [6], "steps": steps})


def test_plan_failover_follows_the_job_and_announces_the_manual_action(capsys: pytest.CaptureFixture[str],
                                                                       scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    script.routes[("POST", "/plans/erp/failover")] = (202, {"job": _plan_job("queued", ["pending"] * 6)})
    script.routes[("GET", "/jobs/9")] = lambda _b, hit: _progress(hit)
    code, out, err = invoke(capsys, "plan", "failover", "erp", "--type", "planned", "--url", url)
    assert code == 1, err  # the run failed at step 6
    assert "recovery plan erp: planned failover: job 9" in out
    assert err.count("step 5 waits for you: Repoint DNS") == 1  # announced once, while it waits
    assert "confirm it: standby jobs confirm 9 5" in err
    assert "step 1. group 2: shut down web01 on the primary: done" in err
    assert "step 6. group 2: planned failover of web01: failed: web01: failed: no agent" in err
    assert "job 9 (plan_failover) failed" in err
    for part in ("plan steps", "Repoint DNS", "failed", "completed with errors"):
        assert part in out, part


def test_plan_steps_come_from_the_payload_while_running() -> None:
    steps = rc_.plan_steps(_plan_job("running", ["done", "running", "pending", "pending", "pending", "pending"]))
    assert [s["kind"] for s in steps] == PLANNED
    assert [s["status"] for s in steps][:3] == ["done", "running", "pending"]
    assert steps[0]["seconds"] == 1.5  # the step's recorded info
    assert rc_.plan_step_events(None, steps) == [
        "  step 1. group 2: shut down web01 on the primary: done",
        "  step 2. group 1 (db): shut down db01, db02 on the primary: running"]
    assert rc_.plan_step_events(steps, steps) == []


def test_on_a_terminal_each_plan_step_gets_a_bar(scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    script.routes[("GET", "/jobs/9")] = lambda _b, hit: _progress(hit)
    buf = io.StringIO()
    out = Console(file=buf, force_terminal=True, width=160)
    with ApiClient(url) as api:
        job = rc_.follow_plan_job(api, _plan_job("queued", ["pending"] * 6), interval=0.01, out=out)
    assert job["state"] == "failed"
    text = buf.getvalue()
    assert "\x1b[" in text
    assert "shut down db01, db02 on the primary" in text and "standby jobs confirm 9 5" in text


def test_jobs_confirm(capsys: pytest.CaptureFixture[str], scripted: tuple[Scripted, str]) -> None:
    script, url = scripted
    script.routes[("POST", "/jobs/9/confirm")] = (200, {"job": _plan_job("running", ["waiting"] * 6), "step": 5,
                                                        "confirmed_by": "ops", "confirmed_at": "2026-11-26T10:00Z"})
    code, out, err = invoke(capsys, "jobs", "confirm", "9", "5", "--url", url)
    assert code == 0, err
    assert script.requests[0]["json"] == {"step": 5}
    assert "job 9: step 5 confirmed by ops" in out
    msg = "step 4 of job 9 is pending, not waiting for a confirmation"
    script.routes[("POST", "/jobs/9/confirm")] = (409, {"error": {"type": "Refused", "message": msg, "exit_code": 1,
                                                                  "details": {}}})
    code, out, err = invoke(capsys, "jobs", "confirm", "9", "4", "--url", url)
    assert code == 1 and msg in err and out == ""
