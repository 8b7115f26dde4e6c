"""The scheduler's pure decisions (orchestration.scheduler), without a database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from standby.contract import prune_params
from standby.domain import lifecycle
from standby.domain.health import Finding
from standby.domain.lifecycle import Health, Site, State
from standby.domain.retention import RetentionPolicy, points_to_keep
from standby.orchestration.scheduler import (
    RESYNC_REQUIRED,
    RPO_BREACH,
    STORAGE_LOW,
    consistency_for,
    cycle_sites,
    item_alerts,
    item_subject,
    needs_resync,
    next_cycle_after,
    parse_time,
    resync_pending,
    retry_at,
    should_prune,
    summary_point_id,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_consistency_is_app_when_the_policy_takes_app_points_and_one_is_due() -> None:
    assert consistency_for(0, None, T0) == "crash"
    assert consistency_for(0, T0 - timedelta(days=9), T0) == "crash"
    assert consistency_for(1, None, T0) == "app"
    assert consistency_for(1, T0 - timedelta(minutes=59), T0) == "crash"
    assert consistency_for(1, T0 - timedelta(hours=1), T0) == "app"
    assert consistency_for(4, T0 - timedelta(hours=3, minutes=59), T0) == "crash"


def test_next_cycle_is_the_previous_start_plus_the_frequency() -> None:
    start = T0
    assert next_cycle_after(start, 300, start + timedelta(seconds=20)) == start + timedelta(seconds=300)
    assert next_cycle_after(start, 30, start + timedelta(seconds=45)) == start + timedelta(seconds=45)  # overran
    assert next_cycle_after(start, 0, start + timedelta(seconds=3)) == start + timedelta(seconds=3)  # continuous


@pytest.mark.parametrize(("freq", "wait"), [(30, 30), (300, 30), (900, 30), (0, 10)])
def test_a_failed_cycle_is_retried_after_min_frequency_30s(freq: int, wait: int) -> None:
    assert retry_at(freq, T0) == T0 + timedelta(seconds=wait)


def test_needs_resync() -> None:
    assert needs_resync("IntegrityError", None)
    assert needs_resync("CycleFailed", {"resync_required": True})
    assert needs_resync(None, {"needs_resync": True})
    assert not needs_resync("RemoteError", {})
    assert not needs_resync(None, None)
    assert not needs_resync("OutOfSpace", {"resync_required": False})


def test_summary_point_id_is_the_newest_disk_point() -> None:
    assert summary_point_id({"web-vda": "p-20260301T120000-0002", "web-vdb": "p-20260301T120000-0009"}) == (
        "p-20260301T120000-0009"
    )
    assert summary_point_id({}) is None
    assert summary_point_id({"d": ""}) is None
    assert len(summary_point_id({"d": "x" * 200}) or "") == 80


def test_parse_time() -> None:
    assert parse_time("2026-03-01T12:00:00Z") == T0
    assert parse_time("2026-03-01T14:00:00+02:00") == T0
    assert parse_time("2026-03-01T12:00:00") == T0  # naive: UTC
    assert parse_time("2026-03-01T14:00:00+02:00").tzinfo is not None  # type: ignore[union-attr]
    assert parse_time("yesterday") is None and parse_time(None) is None and parse_time(5) is None
    assert parse_time(datetime(2026, 3, 1, 13, tzinfo=timezone(timedelta(hours=1))).isoformat()) == T0


def test_should_prune_after_every_cycle_unless_a_failover_holds_the_points() -> None:
    # Retention 0 prunes too (to the latest point): otherwise the replica's chain only grows.
    assert should_prune(State.PROTECTED)
    assert should_prune(State.RESYNCHRONIZING)
    assert not should_prune(State.COMMIT_PENDING)
    assert not should_prune(State.FAILOVER_IN_PROGRESS)


def test_prune_params_carry_keep_all_minutes_and_a_window_covering_them() -> None:
    assert prune_params(["d"], 24, 2) == {
        "disk_ids": ["d"], "retention_hours": 24, "app_consistent_interval_hours": 2, "keep_all_minutes": 0}
    # The retention rules keep recent points only inside the window: it is widened to cover them.
    assert prune_params(["d"], 0, 0, 15) == {
        "disk_ids": ["d"], "retention_hours": 0.25, "app_consistent_interval_hours": 0, "keep_all_minutes": 15}
    assert prune_params(["d"], 1, 0, 120)["retention_hours"] == 2
    assert prune_params(["d"], 24, 0, 120)["retention_hours"] == 24  # already covered


@pytest.mark.parametrize(("retention", "keep_all"), [(0, 15), (1, 120), (24, 30), (2, 0)])
def test_the_agent_keeps_the_hourly_points_plus_every_point_of_the_last_minutes(retention: int,
                                                                               keep_all: int) -> None:
    # What the agent's prune does with the params (agent.tasks.run_prune builds the same
    # RetentionPolicy) against the policy's meaning, over 5 h of points every 5 minutes.
    now = 1_000_000 * 3600.0 + 1234.0
    points = [(f"p{i:03d}", now - i * 300.0, "crash") for i in range(60)]
    params = prune_params(["d"], retention, 0, keep_all)
    kept = points_to_keep(points, RetentionPolicy(params["retention_hours"], 0.0, params["keep_all_minutes"]), now)
    hourly = points_to_keep(points, RetentionPolicy(retention, 0.0), now)
    recent = {pid for pid, created, _c in points if created >= now - keep_all * 60}
    assert kept == hourly | recent


@pytest.mark.parametrize("state", list(State))
def test_cycle_sites_follow_the_lifecycle(state: State) -> None:
    sites = cycle_sites(state)
    if not lifecycle.is_replicating(state):
        assert sites is None
    else:
        assert sites is not None and sites[1] is lifecycle.replicates_to(state) and sites[0] is not sites[1]
    assert cycle_sites(State.REVERSE_REPLICATING) == (Site.SECONDARY, Site.PRIMARY)
    assert cycle_sites(State.PROTECTED) == (Site.PRIMARY, Site.SECONDARY)


def test_item_alerts_follow_the_findings_and_the_resync_state() -> None:
    rpo = Finding(Health.WARNING, "rpo_breach", "RPO is above the 90 s threshold")
    rpo_crit = Finding(Health.CRITICAL, "rpo_critical", "RPO is above 3 x the 90 s threshold")
    storage = Finding(Health.WARNING, "storage_low", "low")
    agent = Finding(Health.CRITICAL, "heartbeat_lost", "the primary host's agent lost its heartbeat")
    assert item_alerts(State.PROTECTED, [], {}) == {}
    assert item_alerts(State.PROTECTED, [rpo], {}) == {RPO_BREACH: rpo.reason}
    assert item_alerts(State.PROTECTED, [rpo_crit, storage], {}) == {RPO_BREACH: rpo_crit.reason, STORAGE_LOW: "low"}
    assert item_alerts(State.PROTECTED, [agent], {}) == {}  # the agent has its own alert
    assert RESYNC_REQUIRED in item_alerts(State.RESYNC_REQUIRED, [], {})
    # A resync forced by a failure keeps the alert open until it completes ...
    want = item_alerts(State.RESYNCHRONIZING, [], {"resync_reason": "digest mismatch"})
    assert want == {RESYNC_REQUIRED: "resynchronization required: digest mismatch"}
    # ... an operator's verification resync does not raise it.
    assert item_alerts(State.RESYNCHRONIZING, [], {}) == {}
    assert not resync_pending(State.PROTECTED, {"resync_reason": "old"})
    assert item_subject("web01") == "item:web01"
