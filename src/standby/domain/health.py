"""A protected item's health: pure rules over facts the scheduler reads from the store.

    health, reason = item_health(state, rpo_seconds=..., copy_frequency_seconds=300, ...)

Rules (docs/control-plane.md, "Scheduler and health"):

- critical: the lifecycle state says so (resynchronization required, error); an agent
  the item needs lost its heartbeat; RPO above 3 x the threshold;
- warning: RPO above the threshold; the state says so (paused, resynchronizing, ...);
  the secondary's storage below 10 % free;
- normal otherwise. The reason names the worst finding (the first of the worst
  severity, in the order above).

Reasons do not quote the live RPO (it changes every second; the item shows it): a
reason changes only when the finding does, so health is rewritten only then.

The threshold is the policy's `rpo_alert_seconds`, by default 3 x the copy frequency
(60 s for continuous replication). RPO is judged only while cycles run: a paused or
failed-over item's last point ages by design, and its state already says so.

Which agents an item needs follows its state: those of the sites where its VM may run
and of the site replication writes to (a paused item needs only its primary's agent, a
disabled one none).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from standby.domain.lifecycle import Health, Site, State, replicates_to, runs_on
from standby.domain.lifecycle import health as state_health
from standby.domain.lifecycle import health_reason as state_health_reason

CONTINUOUS_RPO_THRESHOLD_SECONDS = 60
THRESHOLD_FREQUENCY_FACTOR = 3  # default threshold: this many copy intervals
CRITICAL_RPO_FACTOR = 3  # RPO above this many thresholds is critical
STORAGE_LOW_FRACTION = 0.10

_RANK = {Health.NORMAL: 0, Health.WARNING: 1, Health.CRITICAL: 2}


@dataclass(frozen=True)
class Finding:
    """One reason for a health: `code` is stable (state, heartbeat_lost, rpo_critical,
    rpo_breach, storage_low), `reason` is for the operator."""

    health: Health
    code: str
    reason: str


def rpo_threshold(copy_frequency_seconds: int, rpo_alert_seconds: int | None = None) -> float:
    """RPO above which an item is in warning (and, above 3 x this, critical)."""
    if rpo_alert_seconds is not None:
        if rpo_alert_seconds <= 0:
            raise ValueError(f"rpo_alert_seconds must be positive, not {rpo_alert_seconds}")
        return float(rpo_alert_seconds)
    if copy_frequency_seconds < 0:
        raise ValueError(f"copy frequency cannot be negative ({copy_frequency_seconds})")
    if copy_frequency_seconds == 0:
        return float(CONTINUOUS_RPO_THRESHOLD_SECONDS)
    return float(THRESHOLD_FREQUENCY_FACTOR * copy_frequency_seconds)


def needed_sites(state: State) -> frozenset[Site]:
    """Sites whose agent the item needs in this state."""
    target = replicates_to(state)
    return runs_on(state) | ({target} if target is not None else frozenset())


def findings(
    state: State | str,
    *,
    rpo_seconds: float | None,
    copy_frequency_seconds: int,
    rpo_alert_seconds: int | None = None,
    primary_agent_ok: bool = True,
    secondary_agent_ok: bool = True,
    secondary_free_fraction: float | None = None,
    storage_low_fraction: float = STORAGE_LOW_FRACTION,
) -> list[Finding]:
    """Everything wrong with the item (empty: normal), most severe first, in rule order."""
    state = State(state)
    out: list[Finding] = []
    sites = needed_sites(state)
    s_health = state_health(state)
    if s_health is Health.CRITICAL:
        out.append(Finding(Health.CRITICAL, "state", state_health_reason(state)))
    if Site.PRIMARY in sites and not primary_agent_ok:
        out.append(Finding(Health.CRITICAL, "heartbeat_lost", "the primary host's agent lost its heartbeat"))
    if Site.SECONDARY in sites and not secondary_agent_ok:
        out.append(Finding(Health.CRITICAL, "heartbeat_lost", "the secondary host's agent lost its heartbeat"))
    threshold = rpo_threshold(copy_frequency_seconds, rpo_alert_seconds)
    judged = replicates_to(state) is not None and rpo_seconds is not None
    if judged and rpo_seconds is not None and rpo_seconds > CRITICAL_RPO_FACTOR * threshold:
        out.append(
            Finding(
                Health.CRITICAL,
                "rpo_critical",
                f"RPO is above {CRITICAL_RPO_FACTOR} x the {_secs(threshold)} threshold",
            )
        )
    elif judged and rpo_seconds is not None and rpo_seconds > threshold:
        out.append(
            Finding(Health.WARNING, "rpo_breach", f"RPO is above the {_secs(threshold)} threshold")
        )
    if s_health is Health.WARNING:
        out.append(Finding(Health.WARNING, "state", state_health_reason(state)))
    if (
        Site.SECONDARY in sites
        and secondary_free_fraction is not None
        and secondary_free_fraction < storage_low_fraction
    ):
        out.append(
            Finding(
                Health.WARNING,
                "storage_low",
                f"the secondary's storage is below {storage_low_fraction:.0%} free",
            )
        )
    out.sort(key=lambda f: -_RANK[f.health])  # stable: rule order within a severity
    return out


def item_health(
    state: State | str,
    *,
    rpo_seconds: float | None,
    copy_frequency_seconds: int,
    rpo_alert_seconds: int | None = None,
    primary_agent_ok: bool = True,
    secondary_agent_ok: bool = True,
    secondary_free_fraction: float | None = None,
    storage_low_fraction: float = STORAGE_LOW_FRACTION,
) -> tuple[Health, str]:
    """(health, reason): the worst finding, or normal with the state's own description."""
    found = findings(
        state,
        rpo_seconds=rpo_seconds,
        copy_frequency_seconds=copy_frequency_seconds,
        rpo_alert_seconds=rpo_alert_seconds,
        primary_agent_ok=primary_agent_ok,
        secondary_agent_ok=secondary_agent_ok,
        secondary_free_fraction=secondary_free_fraction,
        storage_low_fraction=storage_low_fraction,
    )
    if found:
        return found[0].health, found[0].reason
    return Health.NORMAL, state_health_reason(State(state))


def _secs(seconds: float) -> str:
    return f"{seconds:.0f} s"


def heard_from(seen: datetime | None, now: datetime, timeout: timedelta,
               listening_since: datetime | None = None) -> bool:
    """Whether an agent counts as alive: heard from (a heartbeat, or its registration)
    within `timeout`, or the control plane itself has been listening for less than
    `timeout`. While a control plane is down no agent can reach it, so the silence from
    before its start says nothing about the agents: a restart must not make every host
    look unreachable (readiness refusing protection, a heartbeat_lost alert per agent)
    before each has had a heartbeat interval to report in."""
    if listening_since is not None and timedelta(0) <= now - listening_since < timeout:
        return True
    return seen is not None and now - seen <= timeout
