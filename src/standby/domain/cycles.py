"""When a VM's replication cycles run: pure timing rules, shared by the control plane's
scheduler (cycle tasks) and the agents that run their cycles themselves (`agent/cycles.py`).

- the next cycle starts one copy interval after the previous one started (continuous
  replication: as soon as it ended); a cycle longer than the interval makes the next due
  at once, never in the past;
- a failed cycle is tried again after min(interval, 30 s) (continuous: after 10 s, so a
  cycle that fails at once does not spin);
- a cycle is app-consistent when the policy takes such points and one is due.
"""

from __future__ import annotations

from datetime import datetime, timedelta

FAILURE_BACKOFF_MAX = 30.0  # a failed cycle is retried after min(frequency, this)
CONTINUOUS_FAILURE_BACKOFF = 10.0  # continuous replication retries a failed cycle after this


def consistency_for(app_interval_hours: int, last_app_consistent_at: datetime | None, now: datetime) -> str:
    """'app' when the policy takes app-consistent points and one is due, else 'crash'."""
    if app_interval_hours <= 0:
        return "crash"
    if last_app_consistent_at is None:
        return "app"
    return "app" if now - last_app_consistent_at >= timedelta(hours=app_interval_hours) else "crash"


def next_cycle_after(started_at: datetime, frequency_seconds: int, now: datetime) -> datetime:
    """Next cycle = the previous cycle's start + frequency (continuous: now). A cycle that
    took longer than the frequency makes the next one due now, not in the past."""
    if frequency_seconds <= 0:
        return now
    return max(started_at + timedelta(seconds=frequency_seconds), now)


def retry_at(frequency_seconds: int, now: datetime) -> datetime:
    """When a failed cycle is tried again: after min(frequency, 30 s); continuous after 10 s
    (not at once: a cycle that fails at once would otherwise spin)."""
    wait = CONTINUOUS_FAILURE_BACKOFF if frequency_seconds <= 0 else min(float(frequency_seconds), FAILURE_BACKOFF_MAX)
    return now + timedelta(seconds=wait)
