"""Failover jobs on SQLite and PostgreSQL with the real job runner and scheduler; the two
sites' agents are played through the task protocol (`recovery_helpers.Sites`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cp_helpers import build  # noqa: E402
from recovery_helpers import PREFIX, PRIMARY, SECONDARY, Host, Sites, utcnow  # noqa: E402

from standby.domain.failover import Kind, workflow  # noqa: E402
from standby.domain.lifecycle import TransitionRefused  # noqa: E402
from standby.errors import BadInput, Refused  # noqa: E402
from standby.orchestration import failover, protection  # noqa: E402
from standby.orchestration.runner import JobRunner  # noqa: E402
from standby.orchestration.scheduler import Scheduler  # noqa: E402
from standby.orchestration.settings import ServerSettings  # noqa: E402
from standby.store import Store  # noqa: E402
from standby.store.repo import agents, items, jobs  # noqa: E402

ENDED = ("succeeded", "failed", "errored", "cancelled")


def handlers() -> dict[str, Any]:
    return {**protection.handlers(), **failover.handlers()}


@pytest.fixture
def settings(tmp_path: Path) -> ServerSettings:
    return ServerSettings(data_dir=tmp_path, tick_seconds=0.02, heartbeat_seconds=60, heartbeat_timeout=3600,
                          runner_workers=4)


@pytest.fixture
def runner(store: Store, settings: ServerSettings) -> Iterator[JobRunner]:
    r = JobRunner(store, settings, handlers())
    r.start()
    yield r
    r.stop()


@pytest.fixture
def sites(store: Store, settings: ServerSettings) -> Sites:
    build(store, now=utcnow())
    return Sites(store, Scheduler(store, settings))


def item(store: Store, item_id: int) -> SimpleNamespace:
    with store.read() as s:
        row = items.get(s, item_id)
        return SimpleNamespace(state=row.state, details=dict(row.details or {}), error=row.error,
                               point=row.last_recovery_point_id)


def job(store: Store, job_id: int) -> SimpleNamespace:
    with store.read() as s:
        j = jobs.get(s, job_id)
        return SimpleNamespace(state=j.state, error=j.error, result=j.result, payload=dict(j.payload or {}),
                               attempts=j.attempts)


def run_job(sites: Sites, job_id: int) -> SimpleNamespace:
    return sites.until(lambda: (j := job(sites.store, job_id)).state in ENDED and j, f"job {job_id} to end")


def protect(sites: Sites, runner: JobRunner, vm: str = "web01") -> int:
    item_id, job_id = protection.enable_protection(sites.store, runner, vm=vm, created_by="test")
    assert run_job(sites, job_id).state == "succeeded"
    assert item(sites.store, item_id).state == "protected"
    return item_id


def keep_recent_points(store: Store, minutes: int = 60) -> None:
    """Every policy keeps the last `minutes` of points (retention 0 alone keeps the latest only)."""
    from sqlalchemy import update

    from standby.store.models import Policy

    with store.transaction() as s:
        s.execute(update(Policy).values(keep_all_points_minutes=minutes))


def step_states(j: SimpleNamespace) -> dict[str, str]:
    return {st["name"]: st["status"] for st in j.payload["run"]["steps"]}


# ---------------------------------------------------------------- test failover


def test_test_failover_runs_beside_replication_and_is_cleaned_up_with_notes(
        store: Store, runner: JobRunner, sites: Sites) -> None:
    item_id = protect(sites, runner)
    assert item(store, item_id).details["domain_xml"].startswith("<domain")
    _, job_id = failover.start_test_failover(store, runner, item="web01", network="isolated")
    # One test failover per VM at a time (a job running, then the lifecycle says so).
    with pytest.raises(Refused, match="test_failover job running"):
        failover.start_test_failover(store, runner, item="web01")
    done = run_job(sites, job_id)
    assert done.state == "succeeded", done.error
    assert done.result["test_vm"] == f"{PREFIX}web01-test"
    assert all(st["status"] == "done" for st in done.result["steps"])
    assert all(st["seconds"] is not None for st in done.result["steps"])
    sec = sites.hosts[SECONDARY]
    assert f"{PREFIX}web01-test" in sec.running and "web01" in sites.hosts[PRIMARY].running
    net = f"sb-test-{item_id}"
    assert net in sec.networks and f"test-{item_id}" in sec.overlays
    (_, define), = sites.kinds("define_vm")
    assert define["networks"] == [net] and define["isolated_network"] == net
    assert define["disks"] == {"vda": f"/replicas/overlays/test-{item_id}/vda.qcow2"}
    (_, mat), = sites.kinds("materialize")
    assert mat["purpose"] == "test" and mat["tag"] == f"test-{item_id}" and mat["disk_ids"] == {"vda": "web01-vda"}
    it = item(store, item_id)
    assert it.state == "test_failover_in_progress" and it.details["test_failover_active"] is True
    with pytest.raises(TransitionRefused, match="one test failover per VM"):
        failover.start_test_failover(store, runner, item="web01")
    # Replication keeps running during the test.
    cycles = len(sites.kinds("cycle"))
    with store.transaction() as s:
        items.schedule(s, item_id, utcnow())
    sites.until(lambda: len(sites.kinds("cycle")) > cycles, "a cycle during the test")

    _, job_id = failover.cleanup_test_failover(store, runner, item=item_id, notes="app answered on :443")
    done = run_job(sites, job_id)
    assert done.state == "succeeded", done.error
    assert done.result["notes"] == "app answered on :443"
    it = item(store, item_id)
    assert it.state == "protected" and it.details["test_failover_active"] is False
    assert it.details["last_test_failover"]["notes"] == "app answered on :443"
    assert not sec.running and not sec.defined and not sec.networks and not sec.overlays
    assert "web01" in sites.hosts[PRIMARY].running
    with pytest.raises(Refused, match="no test failover"):
        failover.cleanup_test_failover(store, runner, item=item_id)


def test_a_point_pruned_between_choice_and_materialize_is_chosen_again(
        store: Store, runner: JobRunner, sites: Sites) -> None:
    item_id = protect(sites, runner)
    sec = sites.hosts[SECONDARY]
    chosen = sec.points["web01-vda"][-1]["id"]

    def cycle_and_prune(host: Host, _task: object) -> None:  # what replication does meanwhile
        newer = sites._point(host, "web01-vda", cycle="cp-meanwhile")
        host.points["web01-vda"] = [pt for pt in host.points["web01-vda"] if pt["id"] == newer]

    sites.before["materialize"] = cycle_and_prune
    _, job_id = failover.start_test_failover(store, runner, item=item_id, point="latest")
    done = run_job(sites, job_id)
    assert done.state == "succeeded", done.error
    mats = sites.kinds("materialize")
    assert [m["point"]["web01-vda"] for _, m in mats] == [chosen, sec.points["web01-vda"][-1]["id"]]
    step = next(st for st in done.result["steps"] if st["name"].startswith("materialize"))
    assert "choosing again" in step["note"]


def test_a_named_point_pruned_before_materialize_fails_the_test_failover(
        store: Store, runner: JobRunner, sites: Sites) -> None:
    keep_recent_points(store)
    item_id = protect(sites, runner)
    named = sites.hosts[SECONDARY].points["web01-vda"][-1]["cycle"]
    sites.before["materialize"] = lambda host, _t: host.points["web01-vda"].clear()
    _, job_id = failover.start_test_failover(store, runner, item=item_id, point=named)
    done = run_job(sites, job_id)
    assert done.state == "failed", done.error
    step = next(st for st in done.result["steps"] if st["name"].startswith("materialize"))
    assert "NotFound" in step["error"], step
    assert len(sites.kinds("materialize")) == 1  # the operator's named point is not replaced
    assert item(store, item_id).state == "protected"


def test_a_failed_test_failover_step_rolls_back(store: Store, runner: JobRunner, sites: Sites) -> None:
    item_id = protect(sites, runner)
    sites.fail[("start_vm", f"{PREFIX}web01-test")] = "qemu: could not open disk"
    _, job_id = failover.start_test_failover(store, runner, item=item_id, network="none")
    done = run_job(sites, job_id)
    assert done.state == "failed" and "rolled back after: start the test VM" in done.error
    assert done.result["outcome"] == "rolled_back"
    sec = sites.hosts[SECONDARY]
    assert not sec.running and not sec.defined and not sec.overlays
    it = item(store, item_id)
    assert it.state == "protected" and it.details["test_failover_active"] is False


# ---------------------------------------------------------------- planned failover, commit, reverse, failback


def test_planned_failover_is_refused_before_initial_replication(store: Store, runner: JobRunner,
                                                                 sites: Sites) -> None:
    sites.hold.add("cycle")  # the first cycle never ends: initial replication stays in progress
    item_id, _ = protection.enable_protection(store, runner, vm="web01")
    sites.until(lambda: item(store, item_id).state == "initial_replication_in_progress", "initial replication")
    with pytest.raises(TransitionRefused, match="start a planned failover of VM web01"):
        failover.start_failover(store, runner, item="web01", type="planned")
    with pytest.raises(BadInput):
        failover.start_failover(store, runner, item="web01", type="planned", point="latest_processed")
    with pytest.raises(BadInput):
        failover.start_failover(store, runner, item="web01", type="sideways")


def test_planned_failover_commit_reverse_replication_and_failback(store: Store, runner: JobRunner,
                                                                  sites: Sites) -> None:
    item_id = protect(sites, runner)
    _, job_id = failover.start_failover(store, runner, item="web01", type="planned")
    done = run_job(sites, job_id)
    assert done.state == "succeeded", done.error
    pri, sec = sites.hosts[PRIMARY], sites.hosts[SECONDARY]
    assert "web01" not in pri.running and f"{PREFIX}web01" in sec.running
    # Zero loss: the point failed over to is the one the final sync (a cycle with the VM off) committed.
    final = [p for h, p in sites.kinds("cycle") if p.get("final_sync")]
    assert len(final) == 1 and final[0]["vm"] == "web01"
    newest = sec.points["web01-vda"][-1]["id"]
    assert done.result["point"]["disks"] == {"web01-vda": newest} and done.result["point"]["how"] == "final sync"
    steps = {st["name"]: st for st in done.result["steps"]}
    assert steps["replicate the last changes"]["bytes"] == 65536 and done.result["bytes_moved"] == 65536
    (_, define), = sites.kinds("define_vm")
    assert define["name"] == f"{PREFIX}web01" and define["networks"] == ["prod-dr"]
    assert define["template_xml"].startswith("<domain")
    it = item(store, item_id)
    assert it.state == "commit_pending" and it.details["failover"]["replica_vm"] == f"{PREFIX}web01"

    _, job_id = failover.commit_failover(store, runner, item=item_id)
    assert run_job(sites, job_id).state == "succeeded"
    assert item(store, item_id).state == "failed_over"
    assert [pt["id"] for pt in sec.points["web01-vda"]] == [newest]  # older points released

    _, job_id = failover.reverse_replicate(store, runner, item=item_id)
    done = run_job(sites, job_id)
    assert done.state == "succeeded", done.error
    it = item(store, item_id)
    assert it.state == "reverse_replicating" and it.details["reverse_in_sync"] is True
    (host, adopt), = sites.kinds("adopt_disk")
    assert host == PRIMARY and adopt == {"disk_id": "web01-vda", "image": "/var/lib/libvirt/images/web01.qcow2"}
    reverse = [(h, p) for h, p in sites.kinds("cycle") if h == SECONDARY]
    assert reverse and reverse[0][1]["vm"] == f"{PREFIX}web01" and reverse[0][1]["disk_ids"] == {"vda": "web01-vda"}
    assert reverse[0][1]["force_hash_scan"] is True
    assert done.result["bytes_moved"] == 4096  # the hash scan: only differing blocks

    _, job_id = failover.failback(store, runner, item=item_id)
    done = run_job(sites, job_id)
    assert done.state == "succeeded", done.error
    assert "web01" in pri.running and f"{PREFIX}web01" not in sec.running and f"{PREFIX}web01" not in sec.defined
    last = [p for h, p in sites.kinds("cycle") if h == SECONDARY and p.get("final_sync")]
    assert len(last) == 1
    assert pri.restored == {"/var/lib/libvirt/images/web01.qcow2": pri.points["web01-vda"][-1]["id"]}
    assert [h for h, p in sites.kinds("adopt_disk")] == [PRIMARY, SECONDARY]
    it = item(store, item_id)
    assert it.state == "protected" and "replica_vm" not in it.details
    forward = [p for h, p in sites.kinds("cycle") if h == PRIMARY][-1]
    assert forward["force_hash_scan"] is True and "disk_ids" not in forward
    steps = {st["name"]: st for st in done.result["steps"]}
    assert steps["resynchronize forward to the secondary"]["bytes"] == 4096
    # Over the network: the final sync and the forward hash scan; the restore is local.
    assert done.result["bytes_moved"] == 65536 + 4096 and done.result["bytes_restored"] == 8192
    assert not sites.violations


def test_a_failed_planned_failover_rolls_back_and_restarts_the_source(store: Store, runner: JobRunner,
                                                                      sites: Sites) -> None:
    item_id = protect(sites, runner)
    sites.fail[("start_vm", f"{PREFIX}web01")] = "not enough memory"
    _, job_id = failover.start_failover(store, runner, item=item_id, type="planned")
    done = run_job(sites, job_id)
    assert done.state == "failed" and done.result["outcome"] == "rolled_back"
    pri, sec = sites.hosts[PRIMARY], sites.hosts[SECONDARY]
    assert "web01" in pri.running and not sec.running and not sec.defined and not sec.overlays
    st = step_states(done)
    assert st["start the replica VM"] == "undone" and st["shut down the source VM"] == "undone"
    assert item(store, item_id).state == "error"  # failover_failed
    # The rollback stopped the target before it started the source again.
    order = [(h, k, p.get("name")) for h, k, p in sites.log if k in ("stop_vm", "start_vm", "undefine_vm")]
    assert order.index((SECONDARY, "undefine_vm", f"{PREFIX}web01")) < order.index((PRIMARY, "start_vm", "web01"))


# ---------------------------------------------------------------- unplanned failover and cancel


def test_unplanned_failover_continues_when_the_source_cannot_be_shut_down(store: Store, runner: JobRunner,
                                                                          sites: Sites) -> None:
    item_id = protect(sites, runner)
    older = sites.hosts[SECONDARY].points["web01-vda"][-1]["id"]
    sites.fail[("stop_vm", "web01")] = "the host does not answer"
    _, job_id = failover.start_failover(store, runner, item="web01", type="unplanned", point="latest_processed",
                                        shutdown_source=True)
    done = run_job(sites, job_id)
    assert done.state == "succeeded", done.error
    st = step_states(done)
    assert st["try to shut down the source VM"] == "failed"
    assert st["try to replicate the last changes"] == "skipped"
    assert st["power off the source VM or declare it lost"] == "done"
    assert done.result["point"]["disks"] == {"web01-vda": older}
    assert "web01" not in sites.hosts[PRIMARY].running and f"{PREFIX}web01" in sites.hosts[SECONDARY].running
    assert item(store, item_id).state == "commit_pending"

    _, job_id = failover.cancel_failover(store, runner, item=item_id)
    done = run_job(sites, job_id)
    assert done.state == "succeeded", done.error
    assert "web01" in sites.hosts[PRIMARY].running and not sites.hosts[SECONDARY].running
    assert item(store, item_id).state == "paused"
    assert not sites.violations


def test_unplanned_failover_to_a_given_point(store: Store, runner: JobRunner, sites: Sites) -> None:
    keep_recent_points(store)
    item_id = protect(sites, runner)
    first = sites.hosts[SECONDARY].points["web01-vda"][-1]
    with store.transaction() as s:
        items.schedule(s, item_id, utcnow())
    sites.until(lambda: len(sites.hosts[SECONDARY].points["web01-vda"]) == 2, "a second point")
    _, job_id = failover.start_failover(store, runner, item=item_id, type="unplanned", point=first["cycle"],
                                        shutdown_source=False)
    done = run_job(sites, job_id)
    assert done.state == "succeeded", done.error
    assert done.result["point"]["id"] == first["cycle"]
    (_, mat), = sites.kinds("materialize")
    assert mat["point"] == {"web01-vda": first["id"]} and mat["purpose"] == "failover"


def test_unplanned_failover_to_a_given_point_after_a_final_sync_keeps_that_point(
        store: Store, runner: JobRunner, sites: Sites) -> None:
    """The final sync (shutdown_source) makes a newer point; the operator's choice stands."""
    keep_recent_points(store)
    item_id = protect(sites, runner)
    first = sites.hosts[SECONDARY].points["web01-vda"][-1]
    _, job_id = failover.start_failover(store, runner, item=item_id, type="unplanned", point=first["cycle"],
                                        shutdown_source=True)
    done = run_job(sites, job_id)
    assert done.state == "succeeded", done.error
    assert step_states(done)["try to replicate the last changes"] == "done"
    assert len(sites.hosts[SECONDARY].points["web01-vda"]) >= 2  # the final sync's point exists
    assert done.result["point"]["id"] == first["cycle"]
    (_, mat), = sites.kinds("materialize")
    assert mat["point"] == {"web01-vda": first["id"]}


# ---------------------------------------------------------------- a runner restart at every step


PLANNED_STEPS = len(workflow(Kind.PLANNED_FAILOVER).steps)


@pytest.mark.parametrize("k", range(PLANNED_STEPS))
def test_a_planned_failover_survives_a_runner_restart_after_any_step(
        k: int, store: Store, settings: ServerSettings, sites: Sites) -> None:
    first = JobRunner(store, settings, handlers(), name="cp-1")
    first.start()
    try:
        item_id = protect(sites, first)
        _, job_id = failover.start_failover(store, first, item=item_id, type="planned")

        def steps_done() -> bool:
            j = job(store, job_id)  # started (k = 0: the runner may not have taken it yet)
            return j.state != "queued" and sum(st["status"] == "done" for st in j.payload["run"]["steps"]) >= k

        sites.until(steps_done, f"{k} steps done")
    finally:
        first.stop()
    was = job(store, job_id)
    assert was.state in ("running", "succeeded")
    second = JobRunner(store, settings, handlers(), name="cp-2")
    second.start()
    try:
        done = run_job(sites, job_id)
    finally:
        second.stop()
    assert done.state == "succeeded", done.error
    assert done.result["outcome"] == "completed"
    pri, sec = sites.hosts[PRIMARY], sites.hosts[SECONDARY]
    assert "web01" not in pri.running and f"{PREFIX}web01" in sec.running
    assert not sites.violations
    assert item(store, item_id).state == "commit_pending"
    # Zero loss across the restart: the point failed over to is the final sync's.
    assert done.result["point"]["disks"] == {"web01-vda": sec.points["web01-vda"][-1]["id"]}
    assert len([p for h, p in sites.kinds("cycle") if p.get("final_sync")]) == 1


def test_a_planned_failover_rolls_back_after_a_restart_when_the_replica_cannot_start(
        store: Store, settings: ServerSettings, sites: Sites) -> None:
    first = JobRunner(store, settings, handlers(), name="cp-1")
    first.start()
    try:
        item_id = protect(sites, first)
        sites.hold.add("start_vm")
        _, job_id = failover.start_failover(store, first, item=item_id, type="planned")
        sites.until(lambda: step_states(job(store, job_id))["start the replica VM"] == "running",
                    "the replica VM starting")
    finally:
        first.stop()
    sites.hold.clear()
    sites.fail_always[("start_vm", f"{PREFIX}web01")] = "no such device"
    second = JobRunner(store, settings, handlers(), name="cp-2")
    second.start()
    try:
        done = run_job(sites, job_id)
    finally:
        second.stop()
    assert done.state == "failed" and done.result["outcome"] == "rolled_back"
    assert "web01" in sites.hosts[PRIMARY].running and not sites.hosts[SECONDARY].running
    assert not sites.violations



def test_an_unplanned_failover_declares_a_source_whose_agent_is_gone_lost(store: Store, runner: JobRunner,
                                                                         sites: Sites) -> None:
    item_id = protect(sites, runner)
    # The primary site is gone: its host (and the VM on it) down, its agent not answering.
    sites.hosts[PRIMARY].running.clear()
    with store.transaction() as s:
        agents.revoke_agent(s, f"agent-{PRIMARY}")
    before = len(sites.log)
    _, job_id = failover.start_failover(store, runner, item=item_id, type="unplanned", shutdown_source=True)
    done = run_job(sites, job_id)
    assert done.state == "succeeded", done.error
    st = step_states(done)
    assert st["try to shut down the source VM"] == "failed" and st["try to replicate the last changes"] == "skipped"
    assert done.result["declared_lost"] is True
    assert f"{PREFIX}web01" in sites.hosts[SECONDARY].running
    assert not [h for h, _k, _p in sites.log[before:] if h == PRIMARY]  # nothing was sent to the lost site
    assert item(store, item_id).state == "commit_pending"


def test_an_operators_cancel_rolls_a_planned_failover_back(store: Store, runner: JobRunner, sites: Sites) -> None:
    item_id = protect(sites, runner)
    sites.hold.add("define_vm")
    _, job_id = failover.start_failover(store, runner, item=item_id, type="planned")
    sites.until(lambda: step_states(job(store, job_id))["define the replica VM"] == "running", "the define step")
    assert "web01" not in sites.hosts[PRIMARY].running
    with store.transaction() as s:
        jobs.request_cancel(s, job_id)
    sites.hold.clear()
    done = run_job(sites, job_id)
    assert done.state == "cancelled" and done.result["outcome"] == "cancelled"
    st = step_states(done)
    assert st["shut down the source VM"] == "undone" and st["materialize the point as an overlay"] == "undone"
    assert "web01" in sites.hosts[PRIMARY].running and not sites.hosts[SECONDARY].running
    assert not sites.hosts[SECONDARY].overlays
    assert item(store, item_id).state == "paused"  # cancel_failover: replication stays paused
    assert not sites.violations
