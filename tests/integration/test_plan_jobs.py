"""Recovery plans on SQLite and PostgreSQL: stored plans, dry runs, and plan runs with the
real job runner, scheduler and scripts; agents played through the task protocol."""

from __future__ import annotations

import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cp_helpers import build, host_report, vm_report  # noqa: E402
from recovery_helpers import PREFIX, PRIMARY, SECONDARY, Sites, utcnow  # noqa: E402
from test_failover_jobs import item, job, run_job  # noqa: E402

from standby.domain import plans as plan_rules  # noqa: E402
from standby.domain.plans import PlanError  # noqa: E402
from standby.errors import BadInput, Conflict, NotFound, Refused  # noqa: E402
from standby.orchestration import failover, plans, protection  # noqa: E402
from standby.orchestration.runner import JobRunner  # noqa: E402
from standby.orchestration.scheduler import Scheduler  # noqa: E402
from standby.orchestration.settings import ServerSettings  # noqa: E402
from standby.store import Store  # noqa: E402
from standby.store.repo import jobs  # noqa: E402

VMS = ("db01", "app01", "web01")
PLAN: dict[str, Any] = {
    "name": "erp",
    "groups": [
        {"name": "db", "vms": ["db01"], "pre": [{"path": "pre.sh", "args": ["--force"]}]},
        {"name": "app", "vms": ["app01"], "post": [{"path": "check.sh", "timeout_seconds": 30}]},
        {"name": "web", "vms": ["web01"], "manual_actions": [{"text": "Point DNS at the secondary"}]},
    ],
}


@pytest.fixture
def settings(tmp_path: Path) -> ServerSettings:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name, body in (("pre.sh", f'echo "$STANDBY_GROUP $STANDBY_FAILOVER_TYPE $STANDBY_VMS $1" >> {tmp_path}/ran\n'),
                       ("check.sh", "echo the app does not answer; exit 3\n")):
        p = scripts / name
        p.write_text("#!/bin/sh\n" + body)
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return ServerSettings(data_dir=tmp_path, tick_seconds=0.02, heartbeat_seconds=60, heartbeat_timeout=3600,
                          runner_workers=6)


@pytest.fixture
def runner(store: Store, settings: ServerSettings) -> Iterator[JobRunner]:
    r = JobRunner(store, settings, {**protection.handlers(), **failover.handlers(), **plans.handlers()})
    r.start()
    yield r
    r.stop()


@pytest.fixture
def sites(store: Store, settings: ServerSettings) -> Sites:
    build(store, now=utcnow(), primary_hosts=[host_report("kvm-a", ip="10.0.1.1", free_gib=200, group="hg-a",
                                                          vms=[vm_report(v) for v in VMS])])
    return Sites(store, Scheduler(store, settings), vms=VMS)


def protect_all(sites: Sites, runner: JobRunner) -> dict[str, int]:
    ids = {}
    for vm in VMS:
        ids[vm], job_id = protection.enable_protection(sites.store, runner, vm=vm)
        assert run_job(sites, job_id).state == "succeeded"
    return ids


def numbers(kind: str, ftype: str) -> list[int]:
    return [s.number for s in plan_rules.expand(plan_rules.load_plan(PLAN), ftype) if s.kind == kind]


def test_plans_are_validated_stored_listed_and_deleted(store: Store) -> None:
    with pytest.raises(PlanError, match="groups.1.vms.0: VM db01 is already in groups.0"):
        plans.create_plan(store, {"name": "bad", "groups": [{"vms": ["db01"]}, {"vms": ["db01"]}]})
    made = plans.create_plan(store, PLAN, created_by="ops")
    assert made["name"] == "erp" and made["document"]["groups"][0]["pre"][0]["timeout_seconds"] == 600
    with pytest.raises(Conflict):
        plans.create_plan(store, PLAN)
    plans.create_plan(store, {**PLAN, "description": "ERP"}, replace=True)
    assert plans.get_plan(store, "erp")["document"]["description"] == "ERP"
    assert [p["name"] for p in plans.list_plans(store)] == ["erp"]
    plans.delete_plan(store, "erp")
    assert plans.list_plans(store) == []
    with pytest.raises(NotFound):
        plans.get_plan(store, "erp")


def test_a_dry_run_prints_the_steps_and_acts_on_nothing(store: Store, runner: JobRunner, sites: Sites) -> None:
    plans.create_plan(store, PLAN)
    out = plans.run_plan(store, runner, "erp", "planned", dry_run=True)
    assert isinstance(out, dict)
    assert out["text"] == plan_rules.dry_run(plan_rules.load_plan(PLAN), "planned")
    assert [s["kind"] for s in out["steps"]][:3] == ["shutdown"] * 3
    with store.read() as s:
        assert jobs.list_jobs(s) == []
    with pytest.raises(BadInput):
        plans.run_plan(store, runner, "erp", "sideways")
    with pytest.raises(NotFound):
        plans.run_plan(store, runner, "nope", "test")


def test_a_planned_plan_stops_at_the_failing_post_script(store: Store, runner: JobRunner, sites: Sites,
                                                         tmp_path: Path) -> None:
    ids = protect_all(sites, runner)
    plans.create_plan(store, PLAN)
    job_id = plans.run_plan(store, runner, "erp", "planned", created_by="ops")
    assert isinstance(job_id, int)
    done = run_job(sites, job_id)
    post = numbers("post_script", "planned")[0]
    assert done.state == "failed" and f"stopped at step {post}" in done.error
    assert "exited with code 3" in done.error and "the app does not answer" in done.error
    res = done.result
    assert res["failed"] == [post] and res["not_run"] == [post + 1, post + 2]
    assert (tmp_path / "ran").read_text() == "db planned db01 --force\n"
    # Groups 1 and 2 moved; group 3's VM was shut down first (the last group first) and stays off.
    assert item(store, ids["db01"]).state == item(store, ids["app01"]).state == "commit_pending"
    assert item(store, ids["web01"]).state == "protected"
    pri, sec = sites.hosts[PRIMARY], sites.hosts[SECONDARY]
    assert pri.running == set() and sec.running == {f"{PREFIX}db01", f"{PREFIX}app01"}
    stops = [p["name"] for h, p in sites.kinds("stop_vm") if h == PRIMARY]
    assert stops[:3] == ["web01", "app01", "db01"]
    assert not sites.violations


def test_an_unplanned_plan_goes_on_reports_every_failure_and_waits_for_the_manual_action(
        store: Store, runner: JobRunner, sites: Sites) -> None:
    ids = protect_all(sites, runner)
    plans.create_plan(store, PLAN)
    job_id = plans.run_plan(store, runner, "erp", "unplanned", point="latest_processed")
    assert isinstance(job_id, int)
    manual = numbers("manual_action", "unplanned")[0]
    post = numbers("post_script", "unplanned")[0]
    with pytest.raises(Refused, match="not waiting"):
        plans.confirm_manual_action(store, job_id, manual, by="ops")
    sites.until(lambda: job(store, job_id).payload["statuses"][manual - 1] == "waiting", "the manual action")
    with pytest.raises(BadInput, match="not a manual action"):
        plans.confirm_manual_action(store, job_id, post, by="ops")
    assert job(store, job_id).state == "running"
    with pytest.raises(Refused, match="already running"):
        plans.run_plan(store, runner, "erp", "unplanned")
    with pytest.raises(Refused, match="is running"):
        plans.delete_plan(store, "erp")
    confirmed = plans.confirm_manual_action(store, job_id, manual, by="ops")
    assert confirmed["by"] == "ops"
    done = run_job(sites, job_id)
    assert done.state == "failed" and "completed with errors" in done.error
    res = done.result
    assert res["failed"] == [post] and res["not_run"] == []
    steps = {s["number"]: s for s in res["steps"]}
    assert steps[manual]["status"] == "done" and steps[manual]["confirmed_by"] == "ops"
    assert steps[post]["script"]["returncode"] == 3
    assert all(item(store, i).state == "commit_pending" for i in ids.values())
    assert sites.hosts[SECONDARY].running == {PREFIX + v for v in VMS}
    # Already failed over: a second run skips them and names them.
    out = plans.run_plan(store, runner, "erp", "unplanned", dry_run=True)
    assert isinstance(out, dict) and "skipped, already failed over: db01" in out["text"]
    assert not sites.violations


def test_a_test_plan_fails_the_vms_over_in_test_mode(store: Store, runner: JobRunner, sites: Sites) -> None:
    protect_all(sites, runner)
    plans.create_plan(store, {"name": "drill", "groups": [{"vms": ["db01", "app01"]}, {"vms": ["web01"]}]})
    job_id = plans.run_plan(store, runner, "drill", "test")
    assert isinstance(job_id, int)
    done = run_job(sites, job_id)
    assert done.state == "succeeded", done.error
    assert sites.hosts[SECONDARY].running == {f"{PREFIX}{v}-test" for v in VMS}
    assert sites.hosts[PRIMARY].running == set(VMS)
    assert len(done.result["steps"][0]["jobs"]) == 2
