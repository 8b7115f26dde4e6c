"""Retention rules, without disks: pure functions over (id, created_at, consistency)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from standby.domain.retention import (
    HOUR,
    RetentionPolicy,
    latest_point,
    points_to_keep,
    points_to_remove,
)

T0 = 1_800_000_000.0  # a whole hour (divisible by 3600)


def pts(*specs: tuple[float, str]) -> list[tuple[str, float, str]]:
    return [(f"{i + 1:04d}", t, c) for i, (t, c) in enumerate(specs)]


def test_t0_is_on_an_hour() -> None:
    assert T0 % HOUR == 0


def test_no_points() -> None:
    assert points_to_keep([], RetentionPolicy(24), T0) == set()


def test_zero_retention_keeps_only_latest() -> None:
    p = pts((T0, "crash"), (T0 + 60, "app"), (T0 + 120, "crash"))
    assert points_to_keep(p, RetentionPolicy(0), T0 + 130) == {"0003"}
    assert points_to_remove(p, RetentionPolicy(0), T0 + 130) == ["0001", "0002"]


def test_latest_kept_even_outside_window() -> None:
    p = pts((T0, "crash"), (T0 + 60, "crash"))
    assert points_to_keep(p, RetentionPolicy(1), T0 + 100 * HOUR) == {"0002"}


def test_one_point_per_hour_the_latest_of_each_hour() -> None:
    # every 15 minutes over 4 hours
    p = pts(*[(T0 + k * 900, "crash") for k in range(16)])
    now = T0 + 16 * 900
    keep = points_to_keep(p, RetentionPolicy(24), now)
    # latest of each hour: k = 3, 7, 11, 15
    assert keep == {"0004", "0008", "0012", "0016"}


def test_window_bounds_hourly() -> None:
    p = pts(*[(T0 + k * HOUR + 1800, "crash") for k in range(10)])
    now = T0 + 10 * HOUR
    keep = points_to_keep(p, RetentionPolicy(3), now)
    # window starts at now - 3h = T0 + 7h: points at 7.5h, 8.5h, 9.5h
    assert keep == {"0008", "0009", "0010"}


def test_app_consistent_points_kept_within_their_window() -> None:
    p = pts((T0 + 60, "app"), (T0 + 120, "crash"), (T0 + 180, "app"), (T0 + 240, "crash"),
            (T0 + 5 * HOUR, "crash"))
    now = T0 + 5 * HOUR + 10
    keep = points_to_keep(p, RetentionPolicy(24), now)
    assert keep == {"0001", "0003", "0004", "0005"}
    # app window of 1 hour: the early app points fall out, the hourly one stays
    keep = points_to_keep(p, RetentionPolicy(24, app_consistent_hours=1), now)
    assert keep == {"0004", "0005"}
    # app window of 0: app points are treated like any other
    assert points_to_keep(p, RetentionPolicy(24, app_consistent_hours=0), now) == {"0004", "0005"}


def test_app_window_capped_by_retention_window() -> None:
    p = pts((T0, "app"), (T0 + 10 * HOUR, "crash"))
    keep = points_to_keep(p, RetentionPolicy(2, app_consistent_hours=48), T0 + 10 * HOUR)
    assert keep == {"0002"}


def test_keep_all_recent_minutes() -> None:
    p = pts(*[(T0 + k * 300, "crash") for k in range(12)])  # every 5 minutes within one hour
    now = T0 + 11 * 300 + 1
    assert points_to_keep(p, RetentionPolicy(24), now) == {"0012"}
    keep = points_to_keep(p, RetentionPolicy(24, keep_all_minutes=16), now)
    assert keep == {"0009", "0010", "0011", "0012"}


def test_keep_all_minutes_capped_by_window() -> None:
    p = pts((T0, "crash"), (T0 + 1800, "crash"), (T0 + 3000, "crash"))
    keep = points_to_keep(p, RetentionPolicy(0.25, keep_all_minutes=120), T0 + 3000)
    assert keep == {"0003"}


def test_pinned_always_kept_even_outside_window_and_unknown_pins_ignored() -> None:
    p = pts((T0, "crash"), (T0 + 60, "crash"), (T0 + 120, "crash"))
    keep = points_to_keep(p, RetentionPolicy(0), T0 + 1000 * HOUR, pinned={"0001", "nope"})
    assert keep == {"0001", "0003"}


def test_future_points_count_inside_window() -> None:
    p = pts((T0 + 2 * HOUR, "crash"), (T0 + 3 * HOUR, "crash"))
    assert points_to_keep(p, RetentionPolicy(1), T0) == {"0001", "0002"}


def test_latest_tie_broken_by_id() -> None:
    p = [("a", T0, "crash"), ("b", T0, "crash")]
    assert latest_point(p) == "b"
    assert points_to_keep(p, RetentionPolicy(0), T0) == {"b"}


def test_remove_is_oldest_first_and_complements_keep() -> None:
    p = pts(*[(T0 + k * 600, "crash") for k in range(20)])
    now = T0 + 20 * 600
    pol = RetentionPolicy(2)
    keep = points_to_keep(p, pol, now)
    rem = points_to_remove(p, pol, now)
    assert set(rem) | keep == {x[0] for x in p}
    assert not set(rem) & keep
    assert rem == sorted(rem)


@pytest.mark.parametrize("bad", [
    dict(retention_hours=-1), dict(retention_hours=math.nan), dict(retention_hours=math.inf),
    dict(keep_all_minutes=-5), dict(app_consistent_hours=-1), dict(app_consistent_hours=math.nan),
])
def test_policy_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        RetentionPolicy(**bad)


point_lists = st.lists(
    st.tuples(st.floats(min_value=T0 - 100 * HOUR, max_value=T0 + 2 * HOUR, allow_nan=False),
              st.sampled_from(["crash", "app"])),
    max_size=60,
).map(lambda specs: [(f"p{i:03d}", t, c) for i, (t, c) in enumerate(specs)])

policies = st.builds(
    RetentionPolicy,
    retention_hours=st.floats(min_value=0, max_value=200, allow_nan=False),
    app_consistent_hours=st.one_of(st.none(), st.floats(min_value=0, max_value=300, allow_nan=False)),
    keep_all_minutes=st.floats(min_value=0, max_value=600, allow_nan=False),
)


@settings(max_examples=400, deadline=None)
@given(points=point_lists, policy=policies, data=st.data())
def test_property_latest_and_pinned_kept_nothing_outside_window(points, policy, data) -> None:
    ids = [p[0] for p in points]
    pinned = set(data.draw(st.lists(st.sampled_from(ids), max_size=5))) if ids else set()
    now = T0
    keep = points_to_keep(points, policy, now, pinned)
    assert keep <= set(ids)
    if points:
        assert latest_point(points) in keep
    assert pinned <= keep
    window_start = now - policy.retention_hours * HOUR
    latest = latest_point(points)
    for pid, created, _c in points:
        if pid in keep and pid not in pinned and pid != latest:
            assert policy.retention_hours > 0
            assert created >= window_start
    # within the window there is at most... and at least one point per hour that has points
    in_window = [p for p in points if p[1] >= window_start]
    if policy.retention_hours > 0:
        hours = {math.floor(p[1] / HOUR) for p in in_window}
        kept_hours = {math.floor(p[1] / HOUR) for p in in_window if p[0] in keep}
        assert hours == kept_hours
    # idempotent: applying the rules to what is kept removes nothing more
    kept_points = [p for p in points if p[0] in keep]
    assert points_to_keep(kept_points, policy, now, pinned) == keep
