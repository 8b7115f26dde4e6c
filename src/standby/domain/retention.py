"""Recovery-point retention: which points to keep. Pure: no I/O, time passed in.

Modeled on the reference's replication policy: "recovery point retention" (hours of
history kept, one point per hour) and "app-consistent snapshot frequency" (app-consistent
points kept within the window), plus every point of the most recent copy-frequency
window so the newest few cycles stay individually selectable.

Rules, for `points_to_keep(points, policy, now, pinned)`:

1. the latest point (greatest created_at, ties broken by id) is always kept;
2. pinned points (materialized for a failover or a test) are always kept;
3. within the window `created_at >= now - retention_hours * 3600`:
   - the latest point of each clock hour (hours counted from the epoch, UTC);
   - every app-consistent point created within `app_consistent_hours` (capped at the
     window; `None` means the whole window);
   - every point created within the last `keep_all_minutes`;
4. nothing else. `retention_hours == 0` keeps only the latest (and pinned) points.

Points dated in the future (clock skew) count as inside every window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

HOUR = 3600.0

CRASH = "crash"
APP = "app"
CONSISTENCIES = (CRASH, APP)


@dataclass(frozen=True)
class RetentionPolicy:
    retention_hours: float = 0.0
    app_consistent_hours: float | None = None
    keep_all_minutes: float = 0.0

    def __post_init__(self) -> None:
        for name in ("retention_hours", "keep_all_minutes"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        a = self.app_consistent_hours
        if a is not None and not (isinstance(a, (int, float)) and math.isfinite(a) and a >= 0):
            raise ValueError(f"app_consistent_hours must be a finite number >= 0 or None, got {a!r}")


PointInfo = tuple[str, float, str]  # (id, created_at, consistency)


def latest_point(points: Iterable[PointInfo]) -> str | None:
    best: tuple[float, str] | None = None
    for pid, created, _c in points:
        key = (created, pid)
        if best is None or key > best:
            best = key
    return None if best is None else best[1]


def points_to_keep(points: list[PointInfo], policy: RetentionPolicy, now: float,
                   pinned: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """Ids of the points to keep (see the module docstring for the rules)."""
    ids = {p[0] for p in points}
    keep: set[str] = {p for p in pinned if p in ids}
    latest = latest_point(points)
    if latest is None:
        return keep
    keep.add(latest)
    if policy.retention_hours <= 0:
        return keep
    window_start = now - policy.retention_hours * HOUR
    app_hours = policy.retention_hours if policy.app_consistent_hours is None else \
        min(policy.app_consistent_hours, policy.retention_hours)
    app_start = now - app_hours * HOUR
    recent_start = max(window_start, now - policy.keep_all_minutes * 60.0)
    hourly: dict[int, tuple[float, str]] = {}
    for pid, created, consistency in points:
        if created < window_start:
            continue
        bucket = math.floor(created / HOUR)
        key = (created, pid)
        if bucket not in hourly or key > hourly[bucket]:
            hourly[bucket] = key
        if consistency == APP and app_hours > 0 and created >= app_start:
            keep.add(pid)
        if policy.keep_all_minutes > 0 and created >= recent_start:
            keep.add(pid)
    keep.update(pid for _c, pid in hourly.values())
    return keep


def points_to_remove(points: list[PointInfo], policy: RetentionPolicy, now: float,
                     pinned: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Ids not kept, oldest first."""
    keep = points_to_keep(points, policy, now, pinned)
    return [pid for pid, _c, _k in sorted(points, key=lambda p: (p[1], p[0])) if pid not in keep]
