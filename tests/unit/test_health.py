"""domain.health: the health rules of docs/control-plane.md over every lifecycle state."""

from __future__ import annotations

import itertools

import pytest

from standby.domain import lifecycle
from standby.domain.health import (
    Finding,
    findings,
    item_health,
    needed_sites,
    rpo_threshold,
)
from standby.domain.lifecycle import Health, Site, State

REPLICATING = [s for s in State if lifecycle.is_replicating(s)]
NOT_REPLICATING = [s for s in State if not lifecycle.is_replicating(s)]


def health(state: State, **kw: object) -> tuple[Health, str]:
    args: dict[str, object] = {"rpo_seconds": None, "copy_frequency_seconds": 300}
    args.update(kw)
    return item_health(state, **args)  # type: ignore[arg-type]


# ---------------------------------------------------------------- threshold


@pytest.mark.parametrize(
    ("freq", "alert", "expected"),
    [(30, None, 90.0), (300, None, 900.0), (900, None, 2700.0), (0, None, 60.0), (300, 120, 120.0), (0, 5, 5.0)],
)
def test_rpo_threshold(freq: int, alert: int | None, expected: float) -> None:
    assert rpo_threshold(freq, alert) == expected


def test_rpo_threshold_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        rpo_threshold(300, 0)
    with pytest.raises(ValueError):
        rpo_threshold(-1)


# ---------------------------------------------------------------- states alone


@pytest.mark.parametrize("state", list(State))
def test_a_healthy_item_takes_its_states_health_and_reason(state: State) -> None:
    assert health(state) == (lifecycle.health(state), lifecycle.health_reason(state))


def test_the_state_contributions_cover_the_contract() -> None:
    assert health(State.RESYNC_REQUIRED)[0] is Health.CRITICAL
    assert health(State.ERROR)[0] is Health.CRITICAL
    assert health(State.PAUSED) == (Health.WARNING, "replication paused")
    assert health(State.PROTECTED) == (Health.NORMAL, "protected")


# ---------------------------------------------------------------- RPO


@pytest.mark.parametrize("state", REPLICATING)
@pytest.mark.parametrize("freq", [0, 30, 300, 900])
def test_rpo_against_the_threshold_while_replicating(state: State, freq: int) -> None:
    t = rpo_threshold(freq)
    base = lifecycle.health(state)
    assert health(state, copy_frequency_seconds=freq, rpo_seconds=t)[0] is base  # not above: no finding
    h, reason = health(state, copy_frequency_seconds=freq, rpo_seconds=t + 0.5)
    assert h is Health.WARNING and reason.startswith("RPO ") and "threshold" in reason
    assert health(state, copy_frequency_seconds=freq, rpo_seconds=3 * t)[0] is Health.WARNING
    h, reason = health(state, copy_frequency_seconds=freq, rpo_seconds=3 * t + 0.5)
    assert h is Health.CRITICAL and "3 x" in reason


def test_the_policy_threshold_replaces_the_default() -> None:
    assert health(State.PROTECTED, rpo_seconds=100, rpo_alert_seconds=90)[0] is Health.WARNING
    assert health(State.PROTECTED, rpo_seconds=100)[0] is Health.NORMAL  # default 900 s
    assert health(State.PROTECTED, rpo_seconds=271, rpo_alert_seconds=90)[0] is Health.CRITICAL


@pytest.mark.parametrize("state", NOT_REPLICATING)
def test_rpo_is_not_judged_when_no_cycle_runs(state: State) -> None:
    # A paused or failed-over item's last point ages by design; its state says why.
    assert health(state, rpo_seconds=10**7) == (lifecycle.health(state), lifecycle.health_reason(state))


def test_no_recovery_point_yet_is_not_an_rpo_breach() -> None:
    assert health(State.INITIAL_REPLICATION, rpo_seconds=None)[0] is Health.NORMAL


# ---------------------------------------------------------------- agents


def test_needed_sites() -> None:
    assert needed_sites(State.PROTECTED) == {Site.PRIMARY, Site.SECONDARY}
    assert needed_sites(State.REVERSE_REPLICATING) == {Site.PRIMARY, Site.SECONDARY}
    assert needed_sites(State.PAUSED) == {Site.PRIMARY}
    assert needed_sites(State.FAILED_OVER) == {Site.SECONDARY}
    assert needed_sites(State.DISABLED) == frozenset()


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize(("primary_ok", "secondary_ok"), [(False, True), (True, False), (False, False)])
def test_a_lost_agent_the_item_needs_is_critical(state: State, primary_ok: bool, secondary_ok: bool) -> None:
    sites = needed_sites(state)
    h, reason = health(state, primary_agent_ok=primary_ok, secondary_agent_ok=secondary_ok)
    lost_needed = (not primary_ok and Site.PRIMARY in sites) or (not secondary_ok and Site.SECONDARY in sites)
    if lost_needed:
        assert h is Health.CRITICAL
        if lifecycle.health(state) is not Health.CRITICAL:  # the state's own reason comes first
            assert "lost its heartbeat" in reason
    else:
        assert (h, reason) == (lifecycle.health(state), lifecycle.health_reason(state))


def test_the_reason_names_which_agent() -> None:
    assert "primary" in health(State.PROTECTED, primary_agent_ok=False)[1]
    assert "secondary" in health(State.PROTECTED, secondary_agent_ok=False)[1]


# ---------------------------------------------------------------- storage


def test_secondary_storage_below_ten_percent_is_a_warning() -> None:
    assert health(State.PROTECTED, secondary_free_fraction=0.10)[0] is Health.NORMAL
    h, reason = health(State.PROTECTED, secondary_free_fraction=0.0999)
    assert h is Health.WARNING and "storage" in reason and "10%" in reason
    assert health(State.PROTECTED, secondary_free_fraction=0.2, storage_low_fraction=0.25)[0] is Health.WARNING
    # The secondary's storage does not matter to an item that does not use the secondary.
    assert health(State.PAUSED, secondary_free_fraction=0.01) == (Health.WARNING, "replication paused")
    assert health(State.DISABLED, secondary_free_fraction=0.01)[0] is Health.NORMAL


# ---------------------------------------------------------------- the worst finding wins


def test_the_reason_names_the_worst_finding() -> None:
    # warning RPO + storage low + critical agent: the agent
    h, reason = health(State.PROTECTED, rpo_seconds=1000, secondary_free_fraction=0.01, primary_agent_ok=False)
    assert h is Health.CRITICAL and "primary host's agent" in reason
    # critical RPO beats the warnings that come before it in rule order
    h, reason = health(State.RESYNCHRONIZING, rpo_seconds=10_000, secondary_free_fraction=0.01)
    assert h is Health.CRITICAL and reason.startswith("RPO")
    # the state's critical reason comes first among criticals
    h, reason = health(State.RESYNC_REQUIRED, primary_agent_ok=False)
    assert (h, reason) == (Health.CRITICAL, lifecycle.health_reason(State.RESYNC_REQUIRED))
    # warnings in rule order: RPO before the state before storage
    assert health(State.RESYNCHRONIZING, rpo_seconds=1000, secondary_free_fraction=0.01)[1].startswith("RPO")
    assert health(State.RESYNCHRONIZING, secondary_free_fraction=0.01)[1] == lifecycle.health_reason(
        State.RESYNCHRONIZING
    )


@pytest.mark.parametrize(
    ("state", "rpo", "p_ok", "s_ok", "free"),
    list(
        itertools.product(
            list(State), [None, 100.0, 1000.0, 5000.0], [True, False], [True, False], [None, 0.05, 0.5]
        )
    ),
)
def test_health_is_the_worst_finding_of_all_combinations(
    state: State, rpo: float | None, p_ok: bool, s_ok: bool, free: float | None
) -> None:
    kw = dict(rpo_seconds=rpo, copy_frequency_seconds=300, primary_agent_ok=p_ok, secondary_agent_ok=s_ok,
              secondary_free_fraction=free)
    found = findings(state, **kw)  # type: ignore[arg-type]
    h, reason = item_health(state, **kw)  # type: ignore[arg-type]
    ranks = {Health.NORMAL: 0, Health.WARNING: 1, Health.CRITICAL: 2}
    if not found:
        assert (h, reason) == (Health.NORMAL, lifecycle.health_reason(state))
        return
    assert all(isinstance(f, Finding) for f in found)
    worst = max(ranks[f.health] for f in found)
    assert ranks[h] == worst and found[0] == Finding(h, found[0].code, reason)
    assert [ranks[f.health] for f in found] == sorted((ranks[f.health] for f in found), reverse=True)
    # never better than the state itself
    assert ranks[h] >= ranks[lifecycle.health(state)]


def test_heard_from_and_the_grace_after_a_control_plane_start() -> None:
    from datetime import UTC, datetime, timedelta

    from standby.domain.health import heard_from

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    minute = timedelta(seconds=60)
    assert heard_from(t0, t0 + minute, minute)
    assert not heard_from(t0, t0 + minute + timedelta(seconds=1), minute)
    assert not heard_from(None, t0, minute)
    # a control plane that started 10 s ago has not had the chance to hear anyone
    started = t0 + timedelta(hours=1)
    assert heard_from(t0, started + timedelta(seconds=10), minute, started)
    assert heard_from(None, started + timedelta(seconds=10), minute, started)
    assert not heard_from(t0, started + minute, minute, started)  # the grace is one timeout
    # a clock before the start (replayed times) gets no grace
    assert not heard_from(t0, started - timedelta(seconds=1), minute, started)
