"""Agent tasks in the store (SQLite and PostgreSQL): enqueue, claim, progress, finish,
expiry, cancel; and migration 0002 (agent_tasks, policies.rpo_alert_seconds) over a
store that already holds rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from migration_helpers import insert_legacy_policy  # noqa: E402
from standby.errors import BadInput, Conflict, NotFound
from standby.store import Store, open_store
from standby.store.db import create_store_engine, current_revision, upgrade
from standby.store.models import Policy
from standby.store.repo import agents, jobs, policies, tasks

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _agents(store: Store) -> tuple[int, int]:
    with store.transaction() as s:
        a = agents.register_agent(s, name="agent-a", host_name="ha", cert_fingerprint="aa" * 32, now=T0).id
        b = agents.register_agent(s, name="agent-b", host_name="hb", cert_fingerprint="bb" * 32, now=T0)
        return a, b.id


def _enqueue(store: Store, agent_id: int, n: int = 1, *, kind: str = "cycle", start: float = 0,
             deadline: float = 600) -> list[int]:
    ids = []
    with store.transaction() as s:
        for i in range(n):
            ids.append(
                tasks.enqueue(
                    s, agent_id=agent_id, kind=kind, params={"n": i}, deadline_seconds=deadline, now=at(start + i)
                ).id
            )
    return ids


def test_enqueue_and_claim_hand_out_queued_tasks_oldest_first(store: Store) -> None:
    a, b = _agents(store)
    ids = _enqueue(store, a, 5)
    (other,) = _enqueue(store, b, 1)
    with store.transaction() as s:
        got = tasks.claim(s, a, max=3, now=at(10))
        assert [t.id for t in got] == ids[:3]
        assert all(t.state == "claimed" and t.attempt == 1 and t.claimed_at == at(10) for t in got)
        assert got[0].params == {"n": 0} and got[0].deadline_at == at(600)
    with store.transaction() as s:
        # The three claimed and unfinished come back first (as they are), then one queued.
        got = tasks.claim(s, a, max=4, now=at(20))
        assert [t.id for t in got] == ids[:4]
        assert [t.attempt for t in got] == [1, 1, 1, 1] and got[0].claimed_at == at(10)
    with store.read() as s:
        assert tasks.get(s, ids[4]).state == "queued"
        assert tasks.get(s, other).state == "queued"  # agent b's task is untouched
    with store.transaction() as s:  # max bounds the answer even when more are held
        assert [t.id for t in tasks.claim(s, a, max=2, now=at(30))] == ids[:2]
    with pytest.raises(BadInput), store.transaction() as s:
        tasks.claim(s, a, max=0)


def test_progress_and_finish_belong_to_the_agent_and_a_result_counts_once(store: Store) -> None:
    a, b = _agents(store)
    (tid,) = _enqueue(store, a)
    with store.transaction() as s:
        tasks.claim(s, a, max=1, now=at(1))
        t = tasks.progress(s, a, tid, 40, "copying", bytes_done=1024, now=at(2))
        assert (t.progress, t.message, t.bytes_done) == (40, "copying", 1024)
        assert tasks.cancel_requested(t) is False
    with pytest.raises(NotFound), store.transaction() as s:
        tasks.progress(s, b, tid, 50, "not mine")
    with pytest.raises(NotFound), store.transaction() as s:
        tasks.finish(s, b, tid, ok=True, result={})
    with pytest.raises(BadInput), store.transaction() as s:
        tasks.progress(s, a, tid, 101, "too much")

    with store.transaction() as s:
        t, changed = tasks.finish(s, a, tid, ok=True, result={"point_at": "x"}, now=at(5))
        assert changed and t.state == "succeeded" and t.progress == 100 and t.finished_at == at(5)
    with store.transaction() as s:
        t, changed = tasks.finish(s, a, tid, ok=False, result={}, error="late", error_type="RemoteError", now=at(6))
        assert not changed and t.state == "succeeded" and t.error is None and t.result == {"point_at": "x"}
        # Progress on a finished task changes nothing and tells the agent to stop.
        t = tasks.progress(s, a, tid, 10, "again", now=at(7))
        assert t.progress == 100 and tasks.cancel_requested(t)
    with store.read() as s:
        assert tasks.claim(s, a, max=4) == []  # finished work is not handed back


def test_failure_keeps_error_and_type(store: Store) -> None:
    a, _ = _agents(store)
    (tid,) = _enqueue(store, a)
    with store.transaction() as s:
        tasks.claim(s, a, max=1, now=at(1))
        t, changed = tasks.finish(
            s, a, tid, ok=False, result={"resync_required": True}, error="digest mismatch",
            error_type="IntegrityError", now=at(3),
        )
        assert changed and t.state == "failed" and t.error == "digest mismatch" and t.error_type == "IntegrityError"
        assert t.result == {"resync_required": True}
    with store.transaction() as s:
        (tid2,) = [tasks.enqueue(s, agent_id=a, kind="prune", params={}, deadline_seconds=60, now=at(4)).id]
        t, _ = tasks.finish(s, a, tid2, ok=False, result=None, now=at(5))  # result without a claim
        assert t.state == "failed" and t.error and t.attempt == 1 and t.claimed_at == at(5)


def test_overdue_tasks_expire_and_a_late_result_is_ignored(store: Store) -> None:
    a, _ = _agents(store)
    queued, claimed, later = _enqueue(store, a, 3, deadline=60)
    with store.transaction() as s:
        tasks.claim(s, a, max=2, now=at(1))
        tasks.get(s, later).deadline_at = at(500)
    with store.transaction() as s:  # deadlines: 60 and 61 (enqueued at 0 and 1, 60 s each)
        assert not tasks.any_overdue(s, at(59.5)) and tasks.any_overdue(s, at(60))
        assert tasks.expire(s, at(59.5)) == []
    with store.transaction() as s:
        assert [t.id for t in tasks.expire(s, at(60))] == [queued]
    with store.transaction() as s:
        expired = tasks.expire(s, at(62))
        assert [t.id for t in expired] == [claimed]
        assert expired[0].state == "expired" and expired[0].finished_at == at(62) and expired[0].error
    with store.read() as s:
        assert tasks.get(s, queued).state == "expired"
    with store.transaction() as s:
        t, changed = tasks.finish(s, a, claimed, ok=True, result={}, now=at(70))
        assert not changed and t.state == "expired"
        assert [t.id for t in tasks.claim(s, a, max=4, now=at(71))] == [later]


def test_cancel_ends_a_queued_task_and_asks_a_claimed_one_to_stop(store: Store) -> None:
    a, _ = _agents(store)
    t1, t2 = _enqueue(store, a, 2)
    with store.transaction() as s:
        tasks.claim(s, a, max=1, now=at(1))  # t1 claimed, t2 queued
        assert tasks.cancel(s, t2, now=at(2)).state == "cancelled"
        t = tasks.cancel(s, t1, now=at(2))
        assert t.state == "claimed" and tasks.cancel_requested(t)
        assert tasks.progress(s, a, t1, 50, "", now=at(3)).cancel_requested_at == at(2)
    with store.transaction() as s:
        t, changed = tasks.finish(s, a, t1, ok=False, result={}, error="cancelled by request", now=at(4))
        assert changed and t.state == "cancelled"
    with store.transaction() as s:
        assert tasks.cancel(s, t1, now=at(9)).finished_at == at(4)  # ended: unchanged
    with pytest.raises(NotFound), store.transaction() as s:
        tasks.cancel(s, 999_999)


def test_open_task_for_item_and_listing(store: Store) -> None:
    a, b = _agents(store)
    with store.transaction() as s:
        job = jobs.create(s, kind="protect", target="item:1")
        c1 = tasks.enqueue(s, agent_id=a, kind="cycle", params={}, job_id=job.id, deadline_seconds=60, now=at(0))
        p1 = tasks.enqueue(s, agent_id=b, kind="prune", params={}, deadline_seconds=60, now=at(0))
        ids = (c1.id, p1.id, job.id)
    c1_id, p1_id, job_id = ids
    with store.read() as s:
        assert [t.id for t in tasks.list_tasks(s, agent_id=a)] == [c1_id]
        assert [t.id for t in tasks.list_tasks(s, job_id=job_id)] == [c1_id]
        assert [t.id for t in tasks.list_tasks(s, kind="prune", states=["queued"])] == [p1_id]
        assert [t.id for t in tasks.list_tasks(s)] == [p1_id, c1_id]
        with pytest.raises(BadInput):
            tasks.list_tasks(s, states=["running"])
    with pytest.raises(BadInput), store.transaction() as s:
        tasks.enqueue(s, agent_id=a, kind="Cycle!", params={}, deadline_seconds=60)
    with pytest.raises(BadInput), store.transaction() as s:
        tasks.enqueue(s, agent_id=a, kind="cycle", params={}, deadline_seconds=0)
    with pytest.raises(Conflict), store.transaction() as s:  # the agent must exist
        tasks.enqueue(s, agent_id=987_654, kind="cycle", params={}, deadline_seconds=60)


def test_purge_finished_removes_only_old_ended_tasks(store: Store) -> None:
    a, _ = _agents(store)
    old, recent, open_ = _enqueue(store, a, 3)
    with store.transaction() as s:
        tasks.claim(s, a, max=3, now=at(1))
        tasks.finish(s, a, old, ok=True, result={}, now=at(10))
        tasks.finish(s, a, recent, ok=True, result={}, now=at(100))
    with store.transaction() as s:
        assert tasks.purge_finished(s, before=at(50)) == 1
    with store.read() as s:
        assert sorted(t.id for t in tasks.list_tasks(s)) == [recent, open_]


def test_policy_rpo_alert_threshold(store: Store) -> None:
    with store.transaction() as s:
        assert policies.create_policy(s, "p").rpo_alert_seconds is None
        assert policies.create_policy(s, "q", rpo_alert_seconds=120).rpo_alert_seconds == 120
        assert policies.update_policy(s, "p", rpo_alert_seconds=90).rpo_alert_seconds == 90
        assert policies.update_policy(s, "p", rpo_alert_seconds=None).rpo_alert_seconds is None
    for bad in (0, -5):
        with pytest.raises(BadInput, match="RPO alert"), store.transaction() as s:
            policies.update_policy(s, "q", rpo_alert_seconds=bad)
    with pytest.raises(Conflict), store.transaction() as s:  # the database's check backs it up
        s.add(Policy(name="raw", rpo_alert_seconds=0))


def test_migration_0002_over_a_populated_0001_store(empty_store_url: str) -> None:
    engine = create_store_engine(empty_store_url)
    try:
        upgrade(engine, "0001")
        with engine.begin() as conn:
            insert_legacy_policy(conn, T0)
        upgrade(engine, "0002")
        assert current_revision(engine) == "0002"
        upgrade(engine)  # and on to head: later migrations keep the row too
    finally:
        engine.dispose()
    store = open_store(empty_store_url)
    try:
        with store.read() as s:
            p = policies.get_policy(s, "old")
            assert p.copy_frequency_seconds == 300 and p.rpo_alert_seconds is None
        # The policies table's own checks survived the SQLite rebuild.
        with pytest.raises(Conflict), store.transaction() as s:
            s.add(Policy(name="bad", copy_frequency_seconds=60))
    finally:
        store.close()


def test_enqueue_many_queues_all_with_one_deadline_or_none(store: Store) -> None:
    a, b = _agents(store)
    with store.transaction() as s:
        n = tasks.enqueue_many(
            s,
            [tasks.NewTask(agent_id=a, kind="cycle", params={"i": 1}, item_id=None),
             tasks.NewTask(agent_id=b, kind="prune", params={"i": 2})],
            deadline_seconds=30,
            now=at(0),
        )
        assert n == 2 and tasks.enqueue_many(s, [], deadline_seconds=30) == 0
        made = sorted(tasks.list_tasks(s), key=lambda t: t.id)
        assert [(t.kind, t.agent_id, t.params, t.state) for t in made] == [
            ("cycle", a, {"i": 1}, "queued"), ("prune", b, {"i": 2}, "queued")]
        assert all(t.deadline_at == at(30) and t.created_at == at(0) and t.attempt == 0 for t in made)
    with pytest.raises(BadInput), store.transaction() as s:
        tasks.enqueue_many(
            s, [tasks.NewTask(agent_id=a, kind="ok", params={}), tasks.NewTask(agent_id=a, kind="BAD", params={})],
            deadline_seconds=30,
        )
    with store.read() as s:
        assert len(tasks.list_tasks(s)) == 2  # the refused batch left nothing
