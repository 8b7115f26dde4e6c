"""The recovery routes over real HTTPS (docs/recovery.md, "REST API for recovery"): roles
(401 without a token, 403 for a viewer's change, viewers read plans), validation (422
naming the field, for the item bodies and for plan documents in JSON or YAML), refusals
with their reasons (a planned failover before the initial replication completed, an
unknown VM or plan), plans CRUD, a plan's dry run (the domain's text, nothing started),
and a plan job waiting on manual actions: confirmations through the API, a step that is
not waiting refused with 409."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from standby.domain import plans as plan_rules

from api_helpers import ControlPlane, error_of
from test_items import job_ended, setup, wait_for

ITEM_ROUTES = [
    ("POST", "/items/web01/test-failover", {}),
    ("POST", "/items/web01/test-failover/cleanup", {"notes": "fine"}),
    ("POST", "/items/web01/failover", {"type": "unplanned"}),
    ("POST", "/items/web01/commit", None),
    ("POST", "/items/web01/cancel-failover", None),
    ("POST", "/items/web01/reverse-replicate", None),
    ("POST", "/items/web01/failback", None),
]
PLAN = {
    "name": "erp",
    "description": "ERP, database first",
    "groups": [
        {"name": "db", "vms": ["erp-db01", "erp-db02"],
         "pre": [{"path": "stop-batch.sh", "args": ["--force"]}],
         "manual_actions": [{"text": "Point erp-db at the secondary", "failover_types": ["planned", "unplanned"]}]},
        {"vms": ["erp-web01"], "post": [{"path": "check-web.sh", "timeout_seconds": 120}]},
    ],
}
PLAN_YAML = """\
name: drill
groups:
  - name: db
    vms: [db01]
    manual_actions:
      - {text: Check the database answers}
  - name: web
    vms: [web09]
    manual_actions:
      - {text: Check the shop's front page}
"""
PLAN_ROUTES = [
    ("POST", "/plans", PLAN),
    ("DELETE", "/plans/erp", None),
    ("POST", "/plans/erp/failover", {"type": "test"}),
    ("POST", "/jobs/1/confirm", {"step": 1}),
]


def fields(r: httpx.Response, type_: str = "BadInput") -> list[str]:
    assert r.status_code == 422, r.text
    err = error_of(r)
    assert err["type"] == type_ and err["exit_code"] == 2
    return [e["field"] for e in err["details"]["errors"]]


def post_yaml(client: httpx.Client, text: str, **params: Any) -> httpx.Response:
    return client.post("/plans", content=text.encode(), headers={"Content-Type": "application/yaml"}, params=params)


def test_recovery_routes_need_a_token_and_an_operators_role(cp: ControlPlane) -> None:
    anonymous = cp.client()
    viewer = cp.client(cp.new_token("viewer", "viewer"))
    for method, path, body in ITEM_ROUTES + PLAN_ROUTES:
        r = anonymous.request(method, path, json=body)
        assert r.status_code == 401, (method, path, r.text)
        r = viewer.request(method, path, json=body)
        assert r.status_code == 403, (method, path, r.text)
        assert error_of(r)["type"] == "Forbidden"
    for path in ("/plans", "/plans/erp"):
        assert anonymous.get(path).status_code == 401
    assert viewer.get("/plans").json() == {"items": []}  # a viewer reads; the refused create stored nothing
    assert viewer.get("/plans/erp").status_code == 404


def test_bad_bodies_are_422_naming_the_field(cp: ControlPlane) -> None:
    admin = cp.admin()
    assert fields(admin.post("/items/web01/failover", json={})) == ["type"]
    assert fields(admin.post("/items/web01/failover", json={"type": "sideways"})) == ["type"]
    r = admin.post("/items/web01/failover", json={"type": "planned", "point": "p-0001"})
    assert fields(r) == ["point"] and "final sync" in error_of(r)["message"]
    assert fields(admin.post("/items/web01/failover", json={"type": "unplanned", "point": "two words"})) == ["point"]
    assert fields(admin.post("/items/web01/failover", json={"type": "unplanned", "shutdown": False})) == ["shutdown"]
    r = admin.post("/items/web01/test-failover", json={"network": {"mode": "existing"}})
    assert fields(r) == ["network"] and "must be named" in error_of(r)["message"]
    assert fields(admin.post("/items/web01/test-failover", json={"network": {"mode": "bridged"}})) == ["network.mode"]
    assert fields(admin.post("/items/web01/test-failover/cleanup", json={"notes": "x" * 4001})) == ["notes"]
    assert fields(admin.post("/plans/erp/failover", json={"type": "drill"})) == ["type"]
    assert fields(admin.post("/plans/erp/failover", json={"type": "planned", "point": "latest_processed"})) == [
        "point"]
    assert fields(admin.post("/jobs/1/confirm", json={"step": 0})) == ["step"]
    assert fields(admin.post("/jobs/1/confirm", json={})) == ["step"]


def test_plan_documents_are_validated_field_by_field_in_json_and_yaml(cp: ControlPlane) -> None:
    admin = cp.admin()
    bad = {"name": "erp", "groups": [{"vms": ["a", "b"]}, {"vms": ["b"], "pre": [{"path": "../x.sh"}]}, {"vms": []}]}
    r = admin.post("/plans", json=bad)
    assert set(fields(r, "InvalidPlan")) == {"groups.1.vms.0", "groups.1.pre.0.path", "groups.2.vms"}, r.text
    err = error_of(r)
    assert "VM b is already in groups.0" in err["message"]
    assert len(err["details"]["problems"]) == 3
    r = post_yaml(admin, "name: erp\ngroups: [{vms: [a]\n")
    assert r.status_code == 422 and "not YAML" in error_of(r)["message"]
    r = post_yaml(admin, "name: erp\ngroups: [{vms: [a]}]\ndescription: 2026-13-45\n")  # not a date: ValueError
    assert r.status_code == 422 and "not YAML" in error_of(r)["message"]
    r = post_yaml(admin, "- just\n- a list\n")
    assert r.status_code == 422 and "mapping" in error_of(r)["message"]
    r = admin.post("/plans", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "not JSON" in error_of(r)["message"]
    r = admin.post("/plans", content=b"name: x", headers={"Content-Type": "text/csv"})
    assert r.status_code == 415 and "application/yaml" in error_of(r)["message"]
    assert admin.get("/plans").json() == {"items": []}


def test_plans_crud(cp: ControlPlane) -> None:
    admin = cp.admin()
    r = admin.post("/plans", json=PLAN)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["name"] == "erp" and created["created_by"] == "admin"
    # Stored as validated: defaults filled in (a script's timeout, a group without a name).
    assert created["document"]["groups"][0]["pre"][0]["timeout_seconds"] == 600
    assert created["document"]["groups"][1]["name"] is None
    r = admin.post("/plans", json=PLAN)
    assert r.status_code == 409 and error_of(r)["type"] == "Conflict" and "already exists" in error_of(r)["message"]
    changed = {**PLAN, "description": "changed"}
    r = admin.post("/plans", json=changed, params={"replace": "true"})
    assert r.status_code == 201 and r.json()["document"]["description"] == "changed"

    r = post_yaml(admin, PLAN_YAML)
    assert r.status_code == 201, r.text
    assert [g["vms"] for g in r.json()["document"]["groups"]] == [["db01"], ["web09"]]

    viewer = cp.client(cp.new_token("viewer", "viewer"))
    assert [p["name"] for p in viewer.get("/plans").json()["items"]] == ["drill", "erp"]
    shown = viewer.get("/plans/erp").json()
    assert shown["document"]["description"] == "changed" and shown["document"]["groups"][0]["vms"] == [
        "erp-db01", "erp-db02"]
    assert admin.delete("/plans/erp").status_code == 204
    for method, path, body in (("GET", "/plans/erp", None), ("DELETE", "/plans/erp", None),
                               ("POST", "/plans/erp/failover", {"type": "test"})):
        r = admin.request(method, path, json=body)
        assert r.status_code == 404, (method, path, r.text)
        err = error_of(r)
        assert err["type"] == "NotFound" and "erp" in err["message"]


@pytest.mark.parametrize("ftype", ["test", "planned", "unplanned"])
def test_a_dry_run_lists_the_domains_steps_and_starts_nothing(cp: ControlPlane, ftype: str) -> None:
    admin = cp.admin()
    assert admin.post("/plans", json=PLAN).status_code == 201
    r = admin.post("/plans/erp/failover", json={"type": ftype, "dry_run": True})
    assert r.status_code == 200, r.text
    out = r.json()
    plan = plan_rules.load_plan(PLAN)
    assert out["text"] == plan_rules.dry_run(plan, ftype)
    assert out["steps"] == [s.as_dict() for s in plan_rules.expand(plan, ftype)]
    kinds = [s["kind"] for s in out["steps"]]
    if ftype == "planned":  # every source shut down first, the last group first
        assert kinds[:2] == ["shutdown", "shutdown"] and out["steps"][0]["vms"] == ["erp-web01"]
    assert ("manual_action" in kinds) == (ftype != "test")  # the action is for planned and unplanned only
    assert f"{ftype} failover" in out["text"] and "1. " in out["text"]
    assert admin.get("/jobs", params={"kind": "plan_failover"}).json()["items"] == []


def test_planned_failover_is_refused_until_the_initial_replication_completed(cp: ControlPlane,
                                                                           tmp_path: Path) -> None:
    admin, _agent_a, _agent_b = setup(cp, tmp_path)
    r = admin.post("/items/nosuchvm/failover", json={"type": "planned"})
    assert r.status_code == 404 and error_of(r)["type"] == "NotFound"

    r = admin.post("/items", json={"vm": "web01"})
    assert r.status_code == 202, r.text
    # The protect job places the replica and starts the initial replication; the primary's
    # agent is never answered here, so it does not complete.
    wait_for("the initial replication", lambda: admin.get("/items/web01").json()["state"]
             == "initial_replication_in_progress")
    r = admin.post("/items/web01/failover", json={"type": "planned"})
    assert r.status_code == 409, r.text
    err = error_of(r)
    assert err["type"] in ("Refused", "TransitionRefused") and err["exit_code"] == 1
    assert "initial replication" in err["message"], err["message"]
    # Nothing was started: no failover job for the item.
    item_id = admin.get("/items/web01").json()["id"]
    jobs = admin.get("/jobs", params={"target": f"item:{item_id}"}).json()["items"]
    assert [j["kind"] for j in jobs] == ["protect"]
    r = admin.post("/items/web01/test-failover/cleanup", json={})
    assert r.status_code == 409 and "no test failover" in error_of(r)["message"]


def waiting_on(admin: httpx.Client, job_id: int, step: int) -> dict[str, Any] | None:
    job = admin.get(f"/jobs/{job_id}").json()
    return job if job["payload"]["statuses"][step - 1] == "waiting" else None


def test_a_plan_job_waits_on_its_manual_actions_until_they_are_confirmed(cp: ControlPlane) -> None:
    admin = cp.admin()
    assert post_yaml(admin, PLAN_YAML).status_code == 201
    # A test failover goes on through errors: db01 and web09 are not protected, so their
    # failover steps (1, 3) fail and the manual actions (2, 4) still wait.
    r = admin.post("/plans/drill/failover", json={"type": "test"})
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    assert (job["kind"], job["target"], job["created_by"]) == ("plan_failover", "plan:drill", "admin")
    r = admin.post("/plans/drill/failover", json={"type": "test"})
    assert r.status_code == 409 and "already running" in error_of(r)["message"]
    r = admin.delete("/plans/drill")
    assert r.status_code == 409 and "running" in error_of(r)["message"]

    wait_for("the first manual action", lambda: waiting_on(admin, job["id"], 2))
    r = admin.post(f"/jobs/{job['id']}/confirm", json={"step": 4})
    assert r.status_code == 409, r.text
    assert "not waiting" in error_of(r)["message"]
    r = admin.post(f"/jobs/{job['id']}/confirm", json={"step": 3})
    assert r.status_code in (400, 409) and "not a manual action" in error_of(r)["message"]
    r = admin.post(f"/jobs/{job['id']}/confirm", json={"step": 2})
    assert r.status_code == 200, r.text
    assert r.json()["step"] == 2 and r.json()["confirmed_by"] == "admin" and r.json()["job"]["id"] == job["id"]
    r = admin.post(f"/jobs/{job['id']}/confirm", json={"step": 2})
    assert r.status_code == 409 and "already confirmed" in error_of(r)["message"]

    wait_for("the second manual action", lambda: waiting_on(admin, job["id"], 4))
    viewer = cp.client(cp.new_token("viewer", "viewer"))
    assert viewer.post(f"/jobs/{job['id']}/confirm", json={"step": 4}).status_code == 403
    assert admin.post(f"/jobs/{job['id']}/confirm", json={"step": 4}).status_code == 200
    ended = wait_for("the plan job", lambda: job_ended(admin, job["id"]))
    assert ended["state"] == "failed", ended
    assert ended["result"]["failed"] == [1, 3]
    steps = ended["result"]["steps"]
    assert [s["status"] for s in steps] == ["failed", "done", "failed", "done"]
    assert steps[1]["confirmed_by"] == "admin" and "db01" in steps[0]["error"]
    r = admin.post(f"/jobs/{job['id']}/confirm", json={"step": 4})
    assert r.status_code == 409 and "has ended" in error_of(r)["message"]


def test_confirm_refuses_jobs_that_are_not_plan_runs(cp: ControlPlane, tmp_path: Path) -> None:
    admin, _agent_a, _agent_b = setup(cp, tmp_path)
    r = admin.post("/jobs/999999/confirm", json={"step": 1})
    assert r.status_code == 404 and error_of(r)["type"] == "NotFound"
    job = admin.post("/items", json={"vm": "web01"}).json()["job"]
    r = admin.post(f"/jobs/{job['id']}/confirm", json={"step": 1})
    assert r.status_code == 409 and "not a recovery plan run" in error_of(r)["message"]


def test_the_cli_against_the_real_api(cp: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's requests and the API's answers agree: plan create from YAML, a dry run,
    a run announced on a manual action and confirmed with `jobs confirm`."""
    from standby.cli.main import run

    conn = ["--url", cp.url, "--ca", str(cp.ca_cert), "--token", cp.admin_token]

    def cli(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = run([*args, *conn])
        out, err = capsys.readouterr()
        return code, out, err

    plan = tmp_path / "drill.yaml"
    plan.write_text(PLAN_YAML)
    code, out, err = cli("plan", "create", str(plan), "--json")
    assert code == 0, err
    assert json.loads(out)["name"] == "drill"
    code, out, err = cli("plan", "failover", "drill", "--type", "unplanned", "--dry-run")
    assert code == 0, err
    assert out == plan_rules.dry_run(plan_rules.load_plan(yaml.safe_load(PLAN_YAML)), "unplanned")
    code, _out, err = cli("plan", "failover", "drill", "--type", "planned", "--point", "p-1")
    assert code == 2 and "--point" in err
    code, out, err = cli("plan", "failover", "drill", "--type", "test", "--no-wait", "--json")
    assert code == 0, err
    job_id = json.loads(out)["id"]
    admin = cp.admin()
    wait_for("the manual action", lambda: waiting_on(admin, job_id, 2))
    code, out, err = cli("jobs", "confirm", str(job_id), "4")
    assert code == 1 and "not waiting" in err and "Traceback" not in err
    code, out, err = cli("jobs", "confirm", str(job_id), "2")
    assert code == 0 and f"job {job_id}: step 2 confirmed by admin" in out
    code, _out, err = cli("failover", "nosuchvm", "--type", "planned")
    assert code == 3 and "nosuchvm" in err
    code, out, err = cli("plan", "delete", "nosuch")
    assert code == 3 and "nosuch" in err
