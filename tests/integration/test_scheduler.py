"""The scheduler and the agent service on the store (SQLite and PostgreSQL): dispatch of
cycle tasks, results (recovery point, next cycle, lifecycle, prune), failures, resync,
expiry, heartbeats, health and alerts, and how many queries a tick costs."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

sys.path.insert(0, str(Path(__file__).parent))

from cp_helpers import T0, at  # noqa: E402
from cp_helpers import items_fabric as _fabric  # noqa: E402

from standby.errors import Refused
from standby.orchestration import agents as agent_svc
from standby.orchestration.livefabric import live_readiness_for
from standby.orchestration.scheduler import Scheduler
from standby.orchestration.settings import ServerSettings
from standby.store import Store
from standby.store.models import AgentTask, ProtectedItem
from standby.store.repo import agents, alerts, inventory, items, policies, tasks

def _settings(tmp_path: Path, heartbeat_timeout: float = 3600) -> ServerSettings:
    """Agents stay fresh for an hour unless a test is about heartbeats."""
    return ServerSettings(
        data_dir=tmp_path, heartbeat_seconds=10, heartbeat_timeout=heartbeat_timeout, task_deadline_seconds=600
    )


def _item(store: Store, item_id: int) -> ProtectedItem:
    """The item's columns as they are now (detached: a read session rolls back)."""
    with store.read() as s:
        item = items.get(s, item_id)
        s.expunge(item)
        return item


def _open_alerts(store: Store) -> set[tuple[str, str]]:
    with store.read() as s:
        return {(a.kind, a.subject) for a in alerts.list_alerts(s, open_only=True)}


def _heartbeat(store: Store, name: str, now: datetime, *, free: int = 80, total: int = 100) -> None:
    with store.transaction() as s:
        agent_svc.heartbeat(
            s, agents.get_agent(s, name), version="1", storage_free_bytes=free, storage_total_bytes=total,
            facts={"libvirt": "9"}, now=now,
        )


def _run_cycle(store: Store, sched: Scheduler, agent_id: int, *, claim_at: datetime, done_at: datetime,
               ok: bool = True, result: dict[str, Any] | None = None, error: str | None = None,
               error_type: str | None = None) -> AgentTask:
    """What the agent API does: claim, then the result and apply_task_result in one transaction."""
    with store.transaction() as s:
        (task,) = tasks.claim(s, agent_id, max=1, now=claim_at)
        task_id = task.id
    with store.transaction() as s:
        task, changed = tasks.finish(s, agent_id, task_id, ok=ok, result=result, error=error,
                                     error_type=error_type, now=done_at)
        assert changed
        sched.apply_task_result(s, task, done_at)
        return task


def _ok_result(point: str = "p-20260301-0001", point_at: datetime = T0, nbytes: int = 1000) -> dict[str, Any]:
    return {"points": {"vm0000-vda": point}, "point_at": point_at.isoformat(), "bytes_sent": nbytes,
            "consistency": "crash", "completed": True}


# ---------------------------------------------------------------- dispatch and results


def test_a_due_item_gets_one_cycle_task_and_its_result_schedules_the_next(store: Store, tmp_path: Path) -> None:
    fab = _fabric(store, state="initial_replication_in_progress")
    sched = Scheduler(store, _settings(tmp_path), clock=lambda: T0)
    r = sched.tick(at(1))
    assert r.cycles_dispatched == 1
    with store.read() as s:
        (task,) = tasks.list_tasks(s)
        assert task.agent_id == fab.primary_agent and task.kind == "cycle" and task.item_id == fab.item_ids[0]
        assert task.params == {
            "item_id": fab.item_ids[0], "vm": "vm0000", "peer": {"name": "agent-h9", "address": "10.0.0.9:7443"},
            "consistency": "crash", "compress": True, "force_hash_scan": False, "timeout_seconds": 60,
            "recovery": {"network_map": {}, "policy": {"name": "p", "copy_frequency_seconds": 300,
                                                       "retention_hours": 0, "app_consistent_interval_hours": 0}},
        }
        assert task.deadline_at == at(601)
    assert _item(store, fab.item_ids[0]).next_cycle_at is None
    assert sched.tick(at(2)).cycles_dispatched == 0  # one open cycle per item

    _run_cycle(store, sched, fab.primary_agent, claim_at=at(3), done_at=at(20),
               result=_ok_result(point_at=at(4), nbytes=5000))
    item = _item(store, fab.item_ids[0])
    assert item.state == "protected"  # initial replication completed
    assert item.last_recovery_point_id == "p-20260301-0001" and item.last_recovery_point_at == at(4)
    assert item.bytes_replicated == 5000 and item.rpo_seconds == 16.0 and item.error is None
    assert item.next_cycle_at == at(303)  # the cycle's start (claimed at 3) + 300 s
    assert item.details["disk_ids"] == ["vm0000-vda"]
    _heartbeat(store, "agent-h1", at(300))
    _heartbeat(store, "agent-h9", at(300))
    assert sched.tick(at(302)).cycles_dispatched == 0
    assert sched.tick(at(303)).cycles_dispatched == 1


def test_continuous_replication_is_due_again_when_a_cycle_ends(store: Store, tmp_path: Path) -> None:
    fab = _fabric(store, freq=0)
    sched = Scheduler(store, _settings(tmp_path))
    sched.tick(at(0))
    _run_cycle(store, sched, fab.primary_agent, claim_at=at(1), done_at=at(2), result=_ok_result(point_at=at(1)))
    assert _item(store, fab.item_ids[0]).next_cycle_at == at(2)
    assert sched.tick(at(2)).cycles_dispatched == 1


def test_a_failed_cycle_is_retried_after_a_backoff(store: Store, tmp_path: Path) -> None:
    fab = _fabric(store)
    sched = Scheduler(store, _settings(tmp_path))
    sched.tick(at(0))
    _run_cycle(store, sched, fab.primary_agent, claim_at=at(1), done_at=at(5), ok=False, result={},
               error="connection refused", error_type="RemoteError")
    item = _item(store, fab.item_ids[0])
    assert item.state == "protected" and item.error == "connection refused"
    assert item.next_cycle_at == at(35) and item.details["failed_cycles"] == 1
    assert sched.tick(at(34)).cycles_dispatched == 0
    assert sched.tick(at(35)).cycles_dispatched == 1


def test_an_integrity_failure_starts_a_resync_by_hash_scan(store: Store, tmp_path: Path) -> None:
    fab = _fabric(store)
    sched = Scheduler(store, _settings(tmp_path))
    sched.tick(at(0))
    _run_cycle(store, sched, fab.primary_agent, claim_at=at(1), done_at=at(5), ok=False, result={},
               error="digest mismatch on vda block 7", error_type="IntegrityError")
    item = _item(store, fab.item_ids[0])
    assert item.state == "resynchronizing" and item.error == "digest mismatch on vda block 7"
    assert item.details["resync_reason"] == "digest mismatch on vda block 7"
    sched.tick(at(6))
    assert ("resync_required", "item:vm0000") in _open_alerts(store)
    assert sched.tick(at(35)).cycles_dispatched == 1
    with store.read() as s:
        task = tasks.open_task_for_item(s, fab.item_ids[0], "cycle")
        assert task is not None and task.params["force_hash_scan"] is True
    _run_cycle(store, sched, fab.primary_agent, claim_at=at(36), done_at=at(50), result=_ok_result(point_at=at(36)))
    item = _item(store, fab.item_ids[0])
    assert item.state == "protected" and "resync_reason" not in item.details and "force_hash_scan" not in item.details
    sched.tick(at(51))
    assert ("resync_required", "item:vm0000") not in _open_alerts(store)


def test_automatic_resyncs_stop_after_three_failures_in_a_row(store: Store, tmp_path: Path) -> None:
    fab = _fabric(store)
    sched = Scheduler(store, _settings(tmp_path))
    t = 0.0
    states = []
    for _ in range(4):
        assert sched.tick(at(t)).cycles_dispatched == 1
        _run_cycle(store, sched, fab.primary_agent, claim_at=at(t + 1), done_at=at(t + 2), ok=False, result={},
                   error="digest mismatch", error_type="IntegrityError")
        item = _item(store, fab.item_ids[0])
        states.append(item.state)
        t = (item.next_cycle_at - T0).total_seconds() if item.next_cycle_at else t + 100
    assert states == ["resynchronizing"] * 3 + ["resynchronization_required"]
    item = _item(store, fab.item_ids[0])
    assert item.next_cycle_at is None and "failed 3 times in a row" in (item.error or "")
    assert sched.tick(at(t + 500)).cycles_dispatched == 0
    assert ("resync_required", "item:vm0000") in _open_alerts(store)


def test_a_cycle_that_was_not_a_hash_scan_does_not_complete_a_resync(store: Store, tmp_path: Path) -> None:
    fab = _fabric(store)
    sched = Scheduler(store, _settings(tmp_path))
    sched.tick(at(0))  # an ordinary cycle is queued ...
    with store.transaction() as s:  # ... then an operator asks for a resync
        items.set_state(s, fab.item_ids[0], "resynchronizing")
        items.update_details(s, fab.item_ids[0], force_hash_scan=True)
    _run_cycle(store, sched, fab.primary_agent, claim_at=at(1), done_at=at(2), result=_ok_result(point_at=at(1)))
    item = _item(store, fab.item_ids[0])
    assert item.state == "resynchronizing" and item.details["force_hash_scan"] is True
    assert item.last_recovery_point_at == at(1)  # the point itself is real
    sched.tick(item.next_cycle_at)
    with store.read() as s:
        task = tasks.open_task_for_item(s, fab.item_ids[0], "cycle")
        assert task is not None and task.params["force_hash_scan"] is True


def test_an_expired_cycle_counts_as_a_failed_one(store: Store, tmp_path: Path) -> None:
    fab = _fabric(store)
    sched = Scheduler(store, _settings(tmp_path))
    sched.tick(at(0))
    with store.transaction() as s:
        tasks.claim(s, fab.primary_agent, max=1, now=at(1))
    _heartbeat(store, "agent-h1", at(590))
    _heartbeat(store, "agent-h9", at(590))
    r = sched.tick(at(600))
    assert r.tasks_expired == 1
    item = _item(store, fab.item_ids[0])
    assert "deadline" in (item.error or "") and item.next_cycle_at == at(630)
    with store.read() as s:
        assert tasks.list_tasks(s)[0].state == "expired"


def test_items_that_cannot_run_are_skipped_with_a_reason(store: Store, tmp_path: Path) -> None:
    fab = _fabric(store, n=2, secondary_agent=False)
    with store.transaction() as s:
        items.set_state(s, fab.item_ids[1], "paused")
    sched = Scheduler(store, _settings(tmp_path))
    r = sched.tick(at(1))
    assert r.cycles_dispatched == 0 and r.dispatch_skipped == 2
    missing, paused = _item(store, fab.item_ids[0]), _item(store, fab.item_ids[1])
    assert "no active agent is registered on host h9" in (missing.error or "")
    assert missing.next_cycle_at == at(31)
    assert paused.next_cycle_at is None and paused.error is None  # off the queue
    with store.read() as s:
        assert tasks.list_tasks(s) == []


def test_app_consistent_points_follow_the_policy_interval(store: Store, tmp_path: Path) -> None:
    fab = _fabric(store, app_hours=1, freq=900)
    sched = Scheduler(store, _settings(tmp_path))
    sched.tick(at(0))
    with store.read() as s:
        assert tasks.list_tasks(s)[0].params["consistency"] == "app"
    _run_cycle(store, sched, fab.primary_agent, claim_at=at(1), done_at=at(9), result=_ok_result(point_at=at(2)))
    assert _item(store, fab.item_ids[0]).details["last_app_consistent_at"] == at(2).isoformat()
    for agent in ("agent-h1", "agent-h9"):
        _heartbeat(store, agent, at(900))
    sched.tick(at(901))
    with store.read() as s:
        assert tasks.list_tasks(s)[0].params["consistency"] == "crash"  # the last app point is 15 min old


def test_a_successful_cycle_queues_one_prune_when_the_policy_keeps_history(store: Store, tmp_path: Path) -> None:
    fab = _fabric(store, retention=24, app_hours=2, freq=30)
    sched = Scheduler(store, _settings(tmp_path))
    sched.tick(at(0))
    _run_cycle(store, sched, fab.primary_agent, claim_at=at(1), done_at=at(3), result=_ok_result(point_at=at(1)))
    with store.read() as s:
        (prune,) = tasks.list_tasks(s, kind="prune")
        assert prune.agent_id == fab.secondary_agent and prune.item_id == fab.item_ids[0]
        assert prune.params == {"disk_ids": ["vm0000-vda"], "retention_hours": 24, "app_consistent_interval_hours": 2,
                                "keep_all_minutes": 0}
    sched.tick(at(31))
    _run_cycle(store, sched, fab.primary_agent, claim_at=at(32), done_at=at(33), result=_ok_result("p-2", at(32)))
    with store.read() as s:
        assert len(tasks.list_tasks(s, kind="prune")) == 1  # the open one prunes up to now


def test_keeping_the_last_minutes_points_alone_queues_a_prune_that_keeps_them(store: Store, tmp_path: Path) -> None:
    fab = _fabric(store, retention=0, keep_all=30)
    sched = Scheduler(store, _settings(tmp_path))
    sched.tick(at(0))
    _run_cycle(store, sched, fab.primary_agent, claim_at=at(1), done_at=at(3), result=_ok_result(point_at=at(1)))
    with store.read() as s:
        (prune,) = tasks.list_tasks(s, kind="prune")
        # retention_hours widened to the 30 minutes: the retention rules keep recent points in the window only
        assert prune.params == {"disk_ids": ["vm0000-vda"], "retention_hours": 0.5,
                                "app_consistent_interval_hours": 0, "keep_all_minutes": 30}


def test_retention_zero_prunes_to_the_latest_point(store: Store, tmp_path: Path) -> None:
    fab = _fabric(store, retention=0)
    sched = Scheduler(store, _settings(tmp_path))
    sched.tick(at(0))
    _run_cycle(store, sched, fab.primary_agent, claim_at=at(1), done_at=at(3), result=_ok_result(point_at=at(1)))
    with store.read() as s:
        (prune,) = tasks.list_tasks(s, kind="prune")  # without it the replica's chain only grows
        assert prune.params["retention_hours"] == 0


def test_a_result_for_an_item_paused_meanwhile_keeps_the_point_but_no_next_cycle(store: Store, tmp_path: Path) -> None:
    fab = _fabric(store)
    sched = Scheduler(store, _settings(tmp_path))
    sched.tick(at(0))
    with store.transaction() as s:
        items.set_state(s, fab.item_ids[0], "paused")
    _run_cycle(store, sched, fab.primary_agent, claim_at=at(1), done_at=at(3), result=_ok_result(point_at=at(1)))
    item = _item(store, fab.item_ids[0])
    assert item.state == "paused" and item.last_recovery_point_at == at(1) and item.next_cycle_at is None


# ---------------------------------------------------------------- heartbeats, health and alerts


def test_heartbeat_lost_is_raised_cleared_and_makes_items_critical(store: Store, tmp_path: Path) -> None:
    fab = _fabric(store, point_at=T0)
    sched = Scheduler(store, _settings(tmp_path, heartbeat_timeout=30))
    with store.transaction() as s:
        items.schedule(s, fab.item_ids[0], None)
    r = sched.tick(at(31))
    assert r.agents_stale == 2
    assert {("heartbeat_lost", "agent:agent-h1"), ("heartbeat_lost", "agent:agent-h9")} <= _open_alerts(store)
    item = _item(store, fab.item_ids[0])
    assert item.health == "critical" and item.health_reason == "the primary host's agent lost its heartbeat"
    assert sched.tick(at(32)).alerts_raised == 0  # already open

    _heartbeat(store, "agent-h1", at(40))  # clears its alert at once
    assert ("heartbeat_lost", "agent:agent-h1") not in _open_alerts(store)
    _heartbeat(store, "agent-h9", at(40))
    sched.tick(at(41))
    item = _item(store, fab.item_ids[0])
    assert (item.health, item.health_reason) == ("normal", "protected")
    assert not any(kind == "heartbeat_lost" for kind, _ in _open_alerts(store))


def test_a_cycle_task_carries_the_network_mapping_its_points_record(store: Store, tmp_path: Path) -> None:
    """The VM manifest of every point (domain/vm_point.py) holds the network mapping in
    force: the scheduler hands it over with the cycle, for the VM's own networks only."""
    fab = _fabric(store, state="protected")
    with store.transaction() as s:
        for name, site in (("prod", None), ("backup", None), ("dr-prod", None), ("other", None)):
            inventory.ensure_network(s, name, site=site)
        policies.map_network(s, "prod", "dr-prod")
        item = s.get(ProtectedItem, fab.item_ids[0])
        item.vm.nics = [{"mac": "52:54:00:00:00:01", "network": "prod"},
                        {"mac": "52:54:00:00:00:02", "network": "backup"}, {"mac": "52:54:00:00:00:03"}]
        items.schedule(s, fab.item_ids[0], at(0))
    Scheduler(store, _settings(tmp_path)).tick(at(1))
    with store.read() as s:
        (task,) = tasks.list_tasks(s)
        assert task.params["recovery"]["network_map"] == {"backup": None, "prod": "dr-prod"}


def test_a_restarted_control_plane_gives_agents_one_timeout_to_report_in(store: Store, tmp_path: Path) -> None:
    """The agents' last heartbeats are old because the control plane was down, not the
    agents: no heartbeat_lost alert, and hosts stay live for readiness and dispatch, until
    one heartbeat_timeout after the start; an agent silent after that is lost."""
    _fabric(store, point_at=T0)  # agents last heard from at T0
    settings = ServerSettings(data_dir=tmp_path, heartbeat_seconds=10, heartbeat_timeout=30,
                              task_deadline_seconds=600, started_at=at(600))  # down for ten minutes
    sched = Scheduler(store, settings)
    r = sched.tick(at(601))
    assert r.agents_stale == 0 and not any(kind == "heartbeat_lost" for kind, _ in _open_alerts(store))
    with store.read() as s:
        report = live_readiness_for(s, settings, now=at(601))
        assert not [f for f in report.findings if "cannot reach the control plane" in f.message], report.findings
    _heartbeat(store, "agent-h1", at(605))  # one agent reports in; the other never does
    assert sched.tick(at(629)).agents_stale == 0
    r = sched.tick(at(631))
    assert r.agents_stale == 1 and ("heartbeat_lost", "agent:agent-h9") in _open_alerts(store)
    with store.read() as s:
        report = live_readiness_for(s, settings, now=at(631))
        lost = {f.subject for f in report.findings if "cannot reach the control plane" in f.message}
    assert lost == {"host/h9"}, lost


def test_rpo_breach_and_storage_low_alerts_follow_the_item(store: Store, tmp_path: Path) -> None:
    fab = _fabric(store, freq=30, point_at=T0)
    sched = Scheduler(store, _settings(tmp_path))
    with store.transaction() as s:
        items.schedule(s, fab.item_ids[0], None)  # no cycles in this test
    _heartbeat(store, "agent-h1", at(95))
    _heartbeat(store, "agent-h9", at(95), free=5, total=100)
    r = sched.tick(at(100))  # RPO 100 s > 90 s threshold (3 x 30 s)
    assert r.health_changed == 1 and r.alerts_raised == 2
    item = _item(store, fab.item_ids[0])
    assert (item.health, item.health_reason) == ("warning", "RPO is above the 90 s threshold")
    assert {("rpo_breach", "item:vm0000"), ("storage_low", "item:vm0000")} <= _open_alerts(store)
    with store.read() as s:
        (rpo_alert,) = alerts.list_alerts(s, kind="rpo_breach")
        assert rpo_alert.severity == "warning" and rpo_alert.item_id == fab.item_ids[0]
    r = sched.tick(at(101))
    assert r.health_changed == 0 and r.alerts_raised == 0 and r.alerts_cleared == 0  # nothing rewritten

    _heartbeat(store, "agent-h9", at(110), free=50, total=100)
    _heartbeat(store, "agent-h1", at(110))
    with store.transaction() as s:
        items.record_cycle(items.get(s, fab.item_ids[0], lock=True), recovery_point_id="p-1",
                           recovery_point_at=at(105), bytes_sent=1, next_cycle_at=None, now=at(110))
    r = sched.tick(at(111))
    assert r.alerts_cleared == 2 and r.health_changed == 1
    assert _item(store, fab.item_ids[0]).health == "normal"
    assert not {k for k, _ in _open_alerts(store)} & {"rpo_breach", "storage_low"}
    r = sched.tick(at(111 + 271))  # RPO 277 s > 3 x 90 s: critical
    assert _item(store, fab.item_ids[0]).health == "critical"


def test_alerts_of_a_deleted_item_are_cleared(store: Store, tmp_path: Path) -> None:
    fab = _fabric(store, freq=30, point_at=T0)
    sched = Scheduler(store, _settings(tmp_path))
    with store.transaction() as s:
        items.schedule(s, fab.item_ids[0], None)
    _heartbeat(store, "agent-h1", at(195))
    _heartbeat(store, "agent-h9", at(195))
    sched.tick(at(200))
    assert ("rpo_breach", "item:vm0000") in _open_alerts(store)
    with store.transaction() as s:
        items.set_state(s, fab.item_ids[0], "disabled")
    sched.tick(at(201))
    assert ("rpo_breach", "item:vm0000") not in _open_alerts(store)


@contextmanager
def _count_queries(store: Store) -> Iterator[list[str]]:
    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", before)


def test_a_tick_costs_a_few_queries_whatever_the_number_of_items(store: Store, tmp_path: Path) -> None:
    fab = _fabric(store, n=400, freq=30, point_at=T0)
    with store.transaction() as s:
        for item_id in fab.item_ids:
            s.get_one(ProtectedItem, item_id).next_cycle_at = None  # no dispatch: the health pass alone
    _heartbeat(store, "agent-h1", at(50))
    _heartbeat(store, "agent-h9", at(50))
    sched = Scheduler(store, _settings(tmp_path))
    sched.tick(at(60))  # settles health (normal) and the purge clock
    with _count_queries(store) as seen:
        r = sched.tick(at(61))
    assert r.items_checked == 400 and r.health_changed == 0
    assert len(seen) <= 12, seen
    # A quiet tick writes nothing and never takes SQLite's write lock.
    assert not [q for q in seen if q.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE", "BEGIN IMMEDIATE"))]
    with _count_queries(store) as seen:
        r = sched.tick(at(100))  # every item breaches: 400 health rows and 400 alerts change
    assert r.health_changed == 400 and r.alerts_raised == 400
    # One executemany for the health rows; each new alert is a few statements (its outbox too).
    updates = [q for q in seen if q.lstrip().upper().startswith("UPDATE PROTECTED_ITEMS")]
    assert len(updates) <= 2


# ---------------------------------------------------------------- the agent service


def test_heartbeat_keeps_registration_facts_and_refuses_a_revoked_agent(store: Store, tmp_path: Path) -> None:
    _fabric(store)
    with store.transaction() as s:
        agent = agents.get_agent(s, "agent-h9")
        agent_svc.heartbeat(s, agent, version="2.0", storage_free_bytes=30, storage_total_bytes=120,
                            facts={"cloud": "evil", "libvirt": "10"}, now=at(5))
    with store.read() as s:
        agent = agents.get_agent(s, "agent-h9")
        assert agent.facts["cloud"] == "gold-dr" and agent.facts["reported"] == {"cloud": "evil", "libvirt": "10"}
        assert agent.version == "2.0" and agent.last_heartbeat_at == at(5)
        assert agent_svc.storage_free_fraction(agent) == 0.25
        assert inventory.get_host(s, "h9").storage_free_bytes == 30
    with store.transaction() as s:
        agents.revoke_agent(s, "agent-h9")
    with pytest.raises(Refused), store.transaction() as s:
        agent_svc.heartbeat(s, agents.get_agent(s, "agent-h9"), version="2", storage_free_bytes=None,
                            storage_total_bytes=None, facts={}, now=at(6))


def test_inventory_of_one_agent_keeps_its_neighbours_in_the_cloud(store: Store, tmp_path: Path) -> None:
    _fabric(store)
    with store.transaction() as s:
        agents.register_agent(s, name="agent-h2", host_name="h2", address="10.0.0.2:7443",
                              facts={"site": "site-a", "server": "vmm-a", "cloud": "gold"}, now=T0)
        res = agent_svc.sync_inventory(
            s, agents.get_agent(s, "agent-h2"),
            [{"name": "h2", "platform": "kvm", "replication_address": "10.0.0.2", "storage_free_bytes": 10,
              "facts": {}, "vms": [{"name": "db", "uuid": "u-db", "power_state": "running",
                                    "disks": {"vda": {}}, "nics": []}]}],
            now=at(10),
        )
        assert res.hosts_added == ["h2"] and res.vms_added == ["h2/db"] and res.hosts_removed == []
        assert res.hosts_updated == [] and res.vms_updated == []  # h1 kept as it was, not news
    with store.read() as s:
        assert [h.name for h in inventory.list_hosts(s, cloud="gold")] == ["h1", "h2"]
        assert inventory.get_vm(s, "h1", "vm0000").uuid == "u-0"
    # A host no agent runs on any more leaves the cloud with the next report.
    with store.transaction() as s:
        agents.revoke_agent(s, "agent-h1")
        res = agent_svc.sync_inventory(s, agents.get_agent(s, "agent-h2"), [{"name": "h2", "vms": []}], now=at(20))
        assert res.hosts_removed == ["h1"] and res.vms_missing == []
        assert res.vms_removed == ["h2/db"]
    with pytest.raises(Refused), store.transaction() as s:
        agents.register_agent(s, name="agent-x", host_name="hx", facts={}, now=T0)
        agent_svc.sync_inventory(s, agents.get_agent(s, "agent-x"), [])
