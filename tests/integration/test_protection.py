"""Protection operations on SQLite and PostgreSQL, with the real job runner and scheduler.
Agents are played by the test through the task protocol itself (`repo.tasks.claim` /
`finish`, then `Scheduler.apply_task_result` as the agent API does): what an agent would
answer, not a stand-in for the control plane's parts."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cp_helpers import GIB, build, host_report, vm_report  # noqa: E402

from standby.domain.lifecycle import TransitionRefused  # noqa: E402
from standby.errors import BadInput, NotFound, Refused  # noqa: E402
from standby.orchestration import protection  # noqa: E402
from standby.orchestration.runner import JobRunner  # noqa: E402
from standby.orchestration.scheduler import Scheduler  # noqa: E402
from standby.orchestration.settings import ServerSettings  # noqa: E402
from standby.store import Store  # noqa: E402
from standby.store.models import AgentTask, Job, ProtectedItem  # noqa: E402
from standby.store.repo import agents, alerts, inventory, items, jobs, policies, tasks  # noqa: E402

TIMEOUT = 30.0


def utcnow() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def settings(tmp_path: Path) -> ServerSettings:
    return ServerSettings(data_dir=tmp_path, tick_seconds=0.05, heartbeat_seconds=60, heartbeat_timeout=3600,
                          runner_workers=3)


@pytest.fixture
def runner(store: Store, settings: ServerSettings) -> Iterator[JobRunner]:
    r = JobRunner(store, settings, protection.handlers())
    r.start()
    yield r
    r.stop()


@pytest.fixture
def scheduler(store: Store, settings: ServerSettings) -> Scheduler:
    return Scheduler(store, settings)


def _snap(row: Any) -> SimpleNamespace:
    values = {c.name: getattr(row, c.name) for c in type(row).__table__.columns}
    if isinstance(row, Job):
        values["steps"] = [SimpleNamespace(name=st.name, state=st.state, message=st.message) for st in row.steps]
    return SimpleNamespace(**values)


def wait_for(fn: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def item(store: Store, item_id: int) -> SimpleNamespace:
    with store.read() as s:
        return _snap(items.get(s, item_id))


def job(store: Store, job_id: int) -> SimpleNamespace:
    with store.read() as s:
        return _snap(jobs.get(s, job_id))


def job_ended(store: Store, job_id: int) -> SimpleNamespace:
    return wait_for(lambda: (j := job(store, job_id)).state in ("succeeded", "failed", "errored", "cancelled") and j,
                    f"job {job_id} to end")


def agent_answers(store: Store, scheduler: Scheduler, host: str, kind: str, *, ok: bool = True,
                  result: dict[str, Any] | Callable[[AgentTask], dict[str, Any]] | None = None,
                  error: str | None = None, error_type: str | None = None) -> SimpleNamespace:
    """Play agent-<host>: wait for a task of `kind`, claim it, report its result (and let the
    scheduler apply it in the same transaction, as the agent API does)."""

    def claim() -> SimpleNamespace | None:
        with store.transaction() as s:
            agent = agents.get_agent(s, f"agent-{host}")
            mine = [t for t in tasks.list_tasks(s, agent_id=agent.id, kind=kind, states=["queued", "claimed"])]
            if not mine:
                return None
            claimed = {t.id: t for t in tasks.claim(s, agent.id, max=50)}
            task = claimed[mine[-1].id]
            body = result(task) if callable(result) else (result or {})
            done, _changed = tasks.finish(s, agent.id, task.id, ok=ok, result=body, error=error,
                                          error_type=error_type)
            scheduler.apply_task_result(s, done, utcnow())
            return _snap(done)

    return wait_for(claim, f"a {kind} task for agent-{host}")


def cycle_result(task: AgentTask) -> dict[str, Any]:
    vm = task.params["vm"]
    return {"points": {f"{vm}-vda": f"20260301T120000-{task.id:04d}"}, "point_at": utcnow().isoformat(),
            "bytes_sent": 1000}


def tick_until_cycle(scheduler: Scheduler, store: Store, item_id: int) -> None:
    def dispatched() -> bool:
        scheduler.tick()
        with store.read() as s:
            return tasks.open_task_for_item(s, item_id, "cycle") is not None

    wait_for(dispatched, "a cycle task")


def protect(store: Store, runner: JobRunner, scheduler: Scheduler, vm: str = "web01") -> int:
    """Enable protection and play the first cycle: the item ends protected."""
    item_id, job_id = protection.enable_protection(store, runner, vm=vm, created_by="test")
    wait_for(lambda: item(store, item_id).state == "initial_replication_in_progress", "initial replication")
    tick_until_cycle(scheduler, store, item_id)
    agent_answers(store, scheduler, "kvm-a", "cycle", result=cycle_result)
    done = job_ended(store, job_id)
    assert done.state == "succeeded", done
    return item_id


# ---------------------------------------------------------------- enable protection


def test_enable_protection_runs_the_protect_job_to_a_protected_item(store: Store, runner: JobRunner,
                                                                    scheduler: Scheduler) -> None:
    build(store, now=utcnow())
    item_id, job_id = protection.enable_protection(store, runner, vm="web01", created_by="ops")
    wait_for(lambda: item(store, item_id).state == "initial_replication_in_progress", "initial replication")
    it = item(store, item_id)
    assert it.next_cycle_at is not None and it.next_cycle_at <= utcnow()
    with store.read() as s:
        # Placement: the secondary host with a live agent and the most free storage.
        assert items.get(s, item_id).secondary_host.name == "kvm-b2"
        j = jobs.get(s, job_id)
        assert j.kind == "protect" and j.target == f"item:{item_id}" and j.created_by == "ops" and j.resumable
        assert [st.name for st in j.steps] == ["check readiness", "place replica", "initial replication",
                                               "wait for first recovery point", "finalize protection"]
    tick_until_cycle(scheduler, store, item_id)
    with store.read() as s:
        task = tasks.open_task_for_item(s, item_id, "cycle")
        assert task is not None
        assert task.params["peer"] == {"name": "agent-kvm-b2", "address": "10.0.2.2:7443"}
        assert task.params["vm"] == "web01" and task.params["force_hash_scan"] is False
    agent_answers(store, scheduler, "kvm-a", "cycle", result=cycle_result)
    done = job_ended(store, job_id)
    assert done.state == "succeeded", done
    assert [st.state for st in done.steps] == ["succeeded"] * 5
    assert done.result["state"] == "protected" and done.result["secondary_host"] == "kvm-b2"
    it = item(store, item_id)
    assert it.state == "protected" and it.last_recovery_point_id is not None
    assert it.details["placed_on"] == "kvm-b2" and it.details["protect_job"] == job_id


def test_enable_protection_is_refused_with_the_readiness_findings(store: Store, runner: JobRunner) -> None:
    build(store, now=utcnow(), primary_hosts=[
        host_report("kvm-a", ip="10.0.1.1", free_gib=200, libvirt="6.0.0", group="hg-a",
                    vms=[vm_report("web01"),
                         vm_report("db01", disks={"vda": {"format": "vhdx", "size": GIB, "size_gib": 1.0}})])])
    with pytest.raises(Refused) as info:
        protection.enable_protection(store, runner, vm="web01")
    err = info.value
    assert err.http_status == 409 and "VM web01 is not ready for protection" in err.message
    findings = err.details["findings"]
    assert {"rule", "severity", "subject", "message", "remedy"} == set(findings[0])
    assert any(f["rule"] == "kvm.host-versions" and f["severity"] == "error" and f["subject"] == "host/kvm-a"
               for f in findings)
    # Another VM's problem is not this VM's.
    assert not any(f["subject"].startswith("vm/kvm-a/db01") for f in findings)
    with store.read() as s:
        assert items.list_items(s) == [] and jobs.list_jobs(s) == []


def test_enable_protection_checks_its_inputs(store: Store, runner: JobRunner) -> None:
    dep = build(store, now=utcnow())
    with pytest.raises(NotFound, match="'nope' is not in the inventory"):
        protection.enable_protection(store, runner, vm="nope")
    with pytest.raises(NotFound):
        protection.enable_protection(store, runner, vm="web01", host="kvm-b1")
    with pytest.raises(Refused, match="'kvm-a2' is not in the secondary cloud"):
        protection.enable_protection(store, runner, vm="web01", secondary_host="kvm-a2")
    with pytest.raises(NotFound, match="policy 'silver'"):
        protection.enable_protection(store, runner, vm="web01", policy="silver")
    with store.transaction() as s:
        policies.create_policy(s, "silver")
    with pytest.raises(Refused, match="'silver' is not associated"):
        protection.enable_protection(store, runner, vm="web01", policy="silver")
    with store.transaction() as s:
        policies.associate(s, "silver", dep.pairing_id)
    with pytest.raises(BadInput, match=r"several policies .* \(gold, silver\)"):
        protection.enable_protection(store, runner, vm="web01")
    # A VM on a host of the secondary (unpaired as a primary) cloud.
    with store.transaction() as s:
        inventory.sync_cloud(s, "cloud-b", [host_report("kvm-b1", ip="10.0.2.1", free_gib=100, group="hg-b",
                                                        vms=[vm_report("dr-only")]),
                                            host_report("kvm-b2", ip="10.0.2.2", free_gib=400, group="hg-b")])
    with pytest.raises(Refused, match="in no cloud paired as a primary"):
        protection.enable_protection(store, runner, vm="dr-only")
    item_id, _job = protection.enable_protection(store, runner, vm="web01", policy="silver")
    with pytest.raises(Refused, match=f"already protected \\(item {item_id}"):
        protection.enable_protection(store, runner, vm="web01", policy="silver")


def test_placement(store: Store, settings: ServerSettings) -> None:
    now = utcnow()
    dep = build(store, now=now, secondary_hosts=[
        host_report("kvm-b1", ip="10.0.2.1", free_gib=100, group="hg-b"),
        host_report("kvm-b2", ip="10.0.2.2", free_gib=400, group="hg-b"),
        host_report("kvm-b3", ip="10.0.2.3", free_gib=900, group="hg-b"),
        host_report("kvm-b4", ip="10.0.2.4", free_gib=900, group="hg-b"),
    ])
    with store.transaction() as s:
        pairing = policies.get_pairing(s, dep.pairing_id)
        # Most free storage; a tie goes to the first name.
        assert protection.place_replica(s, settings, pairing, now=now).name == "kvm-b3"
        agents.revoke_agent(s, "agent-kvm-b3")
        assert protection.place_replica(s, settings, pairing, now=now).name == "kvm-b4"
        # An agent whose heartbeat is older than the timeout cannot receive a replica.
        later = now + timedelta(seconds=settings.heartbeat_timeout + 1)
        agents.heartbeat(s, "agent-kvm-b1", now=later)
        assert protection.place_replica(s, settings, pairing, now=later).name == "kvm-b1"
        assert protection.place_replica(s, settings, pairing, requested="kvm-b1", now=later).name == "kvm-b1"
        with pytest.raises(Refused, match="'kvm-b2' cannot hold the replica: no active agent with a current"):
            protection.place_replica(s, settings, pairing, requested="kvm-b2", now=later)
        agents.revoke_agent(s, "agent-kvm-b1")
        with pytest.raises(Refused, match=r"no host of the secondary cloud 'cloud-b' can hold the replica \(kvm-b1"):
            protection.place_replica(s, settings, pairing, now=later)


def test_an_explicit_secondary_host_is_used(store: Store, runner: JobRunner, scheduler: Scheduler) -> None:
    build(store, now=utcnow())
    item_id, job_id = protection.enable_protection(store, runner, vm="web01", secondary_host="kvm-b1")
    wait_for(lambda: item(store, item_id).state == "initial_replication_in_progress", "initial replication")
    with store.read() as s:
        assert items.get(s, item_id).secondary_host.name == "kvm-b1"


def test_a_protect_job_that_fails_before_replication_withdraws_protection(
    store: Store, settings: ServerSettings, scheduler: Scheduler
) -> None:
    build(store, now=utcnow())
    idle = JobRunner(store, settings, protection.handlers())  # not started: the job waits in the queue
    item_id, job_id = protection.enable_protection(store, idle, vm="web01")
    with store.transaction() as s:  # meanwhile, every secondary agent goes away
        agents.revoke_agent(s, "agent-kvm-b1")
        agents.revoke_agent(s, "agent-kvm-b2")
    runner = JobRunner(store, settings, protection.handlers())
    runner.start()
    try:
        done = job_ended(store, job_id)
        assert done.state == "failed" and "not ready for protection" in done.error
        it = item(store, item_id)
        assert it.state == "disabled" and "protect job" in it.error
        with store.read() as s:
            assert alerts.open_alert(s, "job_failed", f"job:{job_id}") is not None
        # Once the secondary is back, protection can be enabled again (a new item).
        with store.transaction() as s:
            for h in ("kvm-b1", "kvm-b2"):
                agents.register_agent(s, name=f"agent-{h}", host_name=h, address=f"10.0.2.{h[-1]}:7443",
                                      cert_fingerprint=f"fp2-{h}")
        new_item, _ = protection.enable_protection(store, runner, vm="web01")
        assert new_item != item_id
    finally:
        runner.stop()


# ---------------------------------------------------------------- offline initial replication


def test_offline_initial_replication_exports_imports_then_catches_up(store: Store, runner: JobRunner,
                                                                     scheduler: Scheduler) -> None:
    build(store, now=utcnow(), policy={"initial_replication": "offline", "offline_export_path": "/seed/out",
                                       "offline_import_path": "/seed/in"})
    item_id, job_id = protection.enable_protection(store, runner, vm="web01")
    export = agent_answers(store, scheduler, "kvm-a", "seed_export", result={"bytes": 123})
    assert export.params == {"vm": "web01", "disk_ids": ["web01-vda"], "path": "/seed/out"}
    assert export.job_id == job_id and export.item_id == item_id
    it = item(store, item_id)
    assert it.state == "initial_replication_in_progress" and it.next_cycle_at is None  # not before the import
    imp = agent_answers(store, scheduler, "kvm-b2", "seed_import", result={"bytes": 123})
    assert imp.params == {"vm": "web01", "disk_ids": ["web01-vda"], "path": "/seed/in"}
    tick_until_cycle(scheduler, store, item_id)
    agent_answers(store, scheduler, "kvm-a", "cycle", result=cycle_result)
    assert job_ended(store, job_id).state == "succeeded"
    it = item(store, item_id)
    assert it.state == "protected" and it.details["seeded"] is True and it.details["seed_bytes"] == 123


def test_a_failed_seed_export_fails_initial_replication(store: Store, runner: JobRunner,
                                                        scheduler: Scheduler) -> None:
    build(store, now=utcnow(), policy={"initial_replication": "offline", "offline_export_path": "/seed/out",
                                       "offline_import_path": "/seed/in"})
    item_id, job_id = protection.enable_protection(store, runner, vm="web01")
    agent_answers(store, scheduler, "kvm-a", "seed_export", ok=False, error="no space left on /seed/out",
                  error_type="OutOfSpace")
    done = job_ended(store, job_id)
    assert done.state == "failed"
    assert done.error == "the seed export failed on agent agent-kvm-a: no space left on /seed/out (OutOfSpace)"
    it = item(store, item_id)
    assert it.state == "error" and "no space left" in it.error
    with store.read() as s:
        assert tasks.list_tasks(s, kind="seed_import") == []


def test_scheduled_initial_replication_waits_for_its_time(store: Store, runner: JobRunner) -> None:
    at = (utcnow() + timedelta(hours=3)).replace(microsecond=0)
    build(store, now=utcnow(), policy={"initial_replication": "scheduled", "initial_replication_at": at})
    item_id, _job = protection.enable_protection(store, runner, vm="web01")
    wait_for(lambda: item(store, item_id).state == "initial_replication_in_progress", "initial replication")
    assert item(store, item_id).next_cycle_at == at


# ---------------------------------------------------------------- pause, resume, replicate now, resync, disable


def test_pause_and_resume(store: Store, runner: JobRunner, scheduler: Scheduler) -> None:
    build(store, now=utcnow())
    item_id = protect(store, runner, scheduler)
    with store.transaction() as s:  # the next cycle is due (not in 300 s): one is open when the operator pauses
        items.schedule(s, item_id, utcnow())
    tick_until_cycle(scheduler, store, item_id)
    _, job_id = protection.pause(store, runner, item="web01", created_by="ops")
    assert job_ended(store, job_id).state == "succeeded"
    it = item(store, item_id)
    assert it.state == "paused" and it.next_cycle_at is None
    with store.read() as s:
        assert tasks.open_task_for_item(s, item_id, "cycle") is None  # cancelled
        assert scheduler.tick().cycles_dispatched == 0
    with pytest.raises(TransitionRefused, match="VM web01"):
        protection.pause(store, runner, item=item_id)
    with pytest.raises(Refused, match="cannot replicate VM web01 now: it is paused"):
        protection.replicate_now(store, runner, item=item_id)

    before = utcnow()
    _, job_id = protection.resume(store, runner, item=str(item_id))
    assert job_ended(store, job_id).state == "succeeded"
    it = item(store, item_id)
    assert it.state == "protected" and before <= it.next_cycle_at <= utcnow()
    with pytest.raises(TransitionRefused):
        protection.resume(store, runner, item=item_id)


def test_replicate_now_waits_for_the_cycle(store: Store, runner: JobRunner, scheduler: Scheduler) -> None:
    build(store, now=utcnow())
    item_id = protect(store, runner, scheduler)
    with store.transaction() as s:
        items.schedule(s, item_id, utcnow() + timedelta(hours=1))
    _, job_id = protection.replicate_now(store, runner, item="web01")
    wait_for(lambda: job(store, job_id).steps[1].state == "running", "the wait step")
    tick_until_cycle(scheduler, store, item_id)
    agent_answers(store, scheduler, "kvm-a", "cycle", result=cycle_result)
    done = job_ended(store, job_id)
    assert done.state == "succeeded" and done.result["bytes_sent"] == 1000
    # A failing cycle fails the job with the agent's reason.
    _, job_id = protection.replicate_now(store, runner, item=item_id)
    tick_until_cycle(scheduler, store, item_id)
    agent_answers(store, scheduler, "kvm-a", "cycle", ok=False, error="peer unreachable", error_type="RemoteError")
    done = job_ended(store, job_id)
    assert done.state == "failed" and done.error == "the replication cycle failed: peer unreachable"


def test_replicate_now_does_not_count_a_cycle_already_running(store: Store, runner: JobRunner,
                                                              scheduler: Scheduler) -> None:
    build(store, now=utcnow())
    item_id = protect(store, runner, scheduler)
    with store.transaction() as s:
        items.schedule(s, item_id, utcnow())
    tick_until_cycle(scheduler, store, item_id)
    with store.read() as s:
        running = tasks.open_task_for_item(s, item_id, "cycle").id  # type: ignore[union-attr]
    _, job_id = protection.replicate_now(store, runner, item=item_id)
    wait_for(lambda: job(store, job_id).steps[1].state == "running", "the wait step")
    first = agent_answers(store, scheduler, "kvm-a", "cycle", result=cycle_result)
    assert first.id == running
    # That cycle's point predates the request: another cycle is asked for at once.
    tick_until_cycle(scheduler, store, item_id)
    second = agent_answers(store, scheduler, "kvm-a", "cycle", result=cycle_result)
    done = job_ended(store, job_id)
    assert done.state == "succeeded" and done.result["task_id"] == second.id != running


def test_replicate_now_fails_when_no_cycle_can_start(store: Store, runner: JobRunner,
                                                     scheduler: Scheduler) -> None:
    build(store, now=utcnow())
    item_id = protect(store, runner, scheduler)
    with store.transaction() as s:
        agents.revoke_agent(s, "agent-kvm-a")
    _, job_id = protection.replicate_now(store, runner, item=item_id)
    wait_for(lambda: job(store, job_id).steps[1].state == "running", "the wait step")

    def ended_after_tick() -> SimpleNamespace | None:
        scheduler.tick()
        j = job(store, job_id)
        return j if j.state != "running" else None

    done = wait_for(ended_after_tick, "the job to fail")
    assert done.state == "failed"
    assert done.error == "replication cycle not started: no active agent is registered on host kvm-a"


def test_resync_forces_a_hash_scan_and_ends_protected(store: Store, runner: JobRunner,
                                                     scheduler: Scheduler) -> None:
    build(store, now=utcnow())
    item_id = protect(store, runner, scheduler)
    with store.transaction() as s:
        items.schedule(s, item_id, utcnow())
    tick_until_cycle(scheduler, store, item_id)  # an ordinary cycle is queued when the resync is asked for
    with store.read() as s:
        ordinary = tasks.open_task_for_item(s, item_id, "cycle").id  # type: ignore[union-attr]
    _, job_id = protection.resync(store, runner, item="web01")
    wait_for(lambda: item(store, item_id).state == "resynchronizing", "resynchronizing")
    with store.read() as s:
        assert tasks.get(s, ordinary).state == "cancelled"  # its success would not be a resync
    tick_until_cycle(scheduler, store, item_id)
    with store.read() as s:
        assert tasks.open_task_for_item(s, item_id, "cycle").params["force_hash_scan"] is True  # type: ignore[union-attr]
    agent_answers(store, scheduler, "kvm-a", "cycle", result=cycle_result)
    assert job_ended(store, job_id).state == "succeeded"
    assert item(store, item_id).state == "protected"


def test_disable_keeping_or_deleting_the_replica(store: Store, runner: JobRunner, scheduler: Scheduler) -> None:
    build(store, now=utcnow())
    item_id = protect(store, runner, scheduler)
    # Default: the policy's setting (keep).
    _, job_id = protection.disable_protection(store, runner, item="web01")
    done = job_ended(store, job_id)
    assert done.state == "succeeded" and done.result == {"replica": "kept"}
    assert item(store, item_id).state == "disabled" and item(store, item_id).next_cycle_at is None
    with store.read() as s:
        assert tasks.list_tasks(s, kind="delete_replica") == []
    with pytest.raises(TransitionRefused):
        protection.disable_protection(store, runner, item=item_id)

    # Enabled again (a new item), then disabled with the replica deleted.
    item_id = protect(store, runner, scheduler)
    _, job_id = protection.disable_protection(store, runner, item=item_id, delete_replica=True)
    task = agent_answers(store, scheduler, "kvm-b2", "delete_replica", result={"deleted": ["web01-vda"]})
    assert task.params == {"disk_ids": ["web01-vda"]}
    done = job_ended(store, job_id)
    assert done.state == "succeeded" and done.result == {"replica": "deleted", "deleted": ["web01-vda"]}
    assert item(store, item_id).details["replica_deleted"] == ["web01-vda"]


def test_disable_cancels_a_protect_job_that_waits(store: Store, runner: JobRunner, scheduler: Scheduler) -> None:
    build(store, now=utcnow())
    item_id, protect_job = protection.enable_protection(store, runner, vm="web01")
    wait_for(lambda: job(store, protect_job).steps[3].state == "running", "the wait for the first point")
    tick_until_cycle(scheduler, store, item_id)
    _, job_id = protection.disable_protection(store, runner, item=item_id)
    assert job_ended(store, job_id).state == "succeeded"
    assert job_ended(store, protect_job).state == "cancelled"
    with store.read() as s:
        assert tasks.open_task_for_item(s, item_id, "cycle") is None
        assert items.get(s, item_id).state == "disabled"


def test_a_protect_job_resumes_after_a_control_plane_restart(store: Store, settings: ServerSettings,
                                                             scheduler: Scheduler) -> None:
    build(store, now=utcnow())
    first = JobRunner(store, settings, protection.handlers(), name="cp-1")
    first.start()
    item_id, job_id = protection.enable_protection(store, first, vm="web01")
    wait_for(lambda: job(store, job_id).steps[3].state == "running", "the wait for the first point")
    first.stop()
    second = JobRunner(store, settings, protection.handlers(), name="cp-2")
    assert second.start() == [job_id]
    try:
        tick_until_cycle(scheduler, store, item_id)
        agent_answers(store, scheduler, "kvm-a", "cycle", result=cycle_result)
        done = job_ended(store, job_id)
    finally:
        second.stop()
    assert done.state == "succeeded" and done.attempts == 2
    with store.read() as s:
        # Placement and initial replication were not done twice.
        assert len(tasks.list_tasks(s, item_id=item_id, kind="cycle")) == 1
        assert items.get(s, item_id).state == "protected"


def test_items_are_found_by_id_or_vm_name(store: Store, runner: JobRunner, scheduler: Scheduler) -> None:
    build(store, now=utcnow())
    item_id, _ = protection.enable_protection(store, runner, vm="web01")
    with store.read() as s:
        assert protection.resolve_item(s, item_id).id == item_id
        assert protection.resolve_item(s, str(item_id)).id == item_id
        assert protection.resolve_item(s, "web01").id == item_id
        with pytest.raises(NotFound, match="no protected item for VM 'db01'"):
            protection.resolve_item(s, "db01")
        assert isinstance(items.get(s, item_id), ProtectedItem)
