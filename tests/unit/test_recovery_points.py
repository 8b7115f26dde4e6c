"""Choosing a VM's recovery point across its disks (domain/recovery_points.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from standby.domain.recovery_points import (
    AmbiguousPoint,
    DiskPoint,
    IncompletePoint,
    NoAppConsistentPoint,
    NoRecoveryPoint,
    PointChoice,
    UnknownPoint,
    choose_point,
    disk_points_from_listing,
    point_of_cycle,
    vm_points,
)

DISKS = ("web-vda", "web-vdb", "web-vdc")


def cycle(n: int, t: float, *, on: tuple[str, ...] = DISKS, app: bool = False,
          seqs: dict[str, int] | None = None) -> list[DiskPoint]:
    """Cycle `standby-<n>` committed at t (disk k a little later) on the disks `on`."""
    return [DiskPoint(d, f"{(seqs or {}).get(d, n):010d}", t + k * 0.5, "app" if app else "crash", f"standby-{n}")
            for k, d in enumerate(on)]


# ---- the choices ---------------------------------------------------------------------------

def test_latest_processed_is_the_newest_point_whole_on_every_disk() -> None:
    pts = cycle(1, 100) + cycle(2, 200) + cycle(3, 300, on=DISKS[:2])  # 3 is still landing
    sel = choose_point(pts, PointChoice.LATEST_PROCESSED, now=260.0)
    assert sel.point.id == "standby-2"
    assert sel.point.disks == {d: "0000000002" for d in DISKS}
    assert sel.point.created_at == 201.0          # when its last disk committed
    assert sel.age_seconds == 59.0
    assert sel.newer_partial == ("standby-3",)
    assert not sel.wait_for_newer                 # latest processed never waits


def test_latest_asks_to_wait_for_a_cycle_in_flight_and_otherwise_equals_latest_processed() -> None:
    pts = cycle(1, 100) + cycle(2, 200, on=DISKS[:1])
    sel = choose_point(pts, "latest")
    assert (sel.point.id, sel.wait_for_newer, sel.newer_partial) == ("standby-1", True, ("standby-2",))
    landed = pts + cycle(2, 200)[1:]
    sel = choose_point(landed, "latest")
    assert (sel.point.id, sel.wait_for_newer) == ("standby-2", False)
    assert choose_point(landed, "latest_processed").point == sel.point


def test_latest_app_consistent_needs_every_disk_app_consistent() -> None:
    pts = cycle(1, 100, app=True) + cycle(2, 200) + [
        DiskPoint("web-vda", "0000000003", 300, "app", "standby-3"),
        DiskPoint("web-vdb", "0000000003", 300, "crash", "standby-3"),  # one disk not quiesced
        DiskPoint("web-vdc", "0000000003", 300, "app", "standby-3"),
    ]
    assert choose_point(pts, PointChoice.LATEST_APP_CONSISTENT).point.id == "standby-1"
    assert not vm_points(pts)[-1].app_consistent


def test_a_given_point_by_vm_id_or_unambiguous_disk_id() -> None:
    pts = cycle(1, 100, seqs={"web-vdb": 11}) + cycle(2, 200, seqs={"web-vdb": 12})
    assert choose_point(pts, "standby-1").point.id == "standby-1"
    assert choose_point(pts, "0000000011").point.id == "standby-1"       # only web-vdb's id
    with pytest.raises(AmbiguousPoint, match="standby-1, standby-2"):
        choose_point(cycle(1, 100, seqs={"web-vdb": 2}) + cycle(2, 200), "0000000002")


def test_single_disk_points_without_a_cycle_key_are_vm_points() -> None:
    pts = [DiskPoint("db-vda", f"{i:010d}", float(i)) for i in (1, 2, 3)]
    assert choose_point(pts, "latest").point.disks == {"db-vda": "0000000003"}
    assert choose_point(pts, "0000000002").point.created_at == 2.0


def test_disks_given_a_disk_with_no_point_makes_every_point_partial() -> None:
    with pytest.raises(NoRecoveryPoint, match="1 on some disks only"):
        choose_point(cycle(1, 100, on=DISKS[:2]), "latest", disks=DISKS)
    # ... and the points of a disk the VM no longer has do not count
    pts = cycle(1, 100) + cycle(2, 200, on=DISKS[:2])
    assert choose_point(pts, "latest", disks=DISKS[:2]).point.id == "standby-2"


# ---- errors --------------------------------------------------------------------------------

def test_errors_name_what_is_missing() -> None:
    with pytest.raises(NoRecoveryPoint, match="no recovery point is complete on every disk$"):
        choose_point([], "latest")
    with pytest.raises(NoAppConsistentPoint, match=r"2 crash-consistent point\(s\); newest standby-2"):
        choose_point(cycle(1, 1) + cycle(2, 2), "latest_app_consistent")
    with pytest.raises(UnknownPoint, match="'standby-9'.*newest: standby-1, standby-2") as e:
        choose_point(cycle(1, 1) + cycle(2, 2), "standby-9")
    assert e.value.exit_code == 3
    with pytest.raises(IncompletePoint, match="standby-2 is not on every disk .missing on web-vdc") as r:
        choose_point(cycle(1, 1) + cycle(2, 2, on=DISKS[:2]), "standby-2")
    assert r.value.exit_code == 1 and r.value.http_status == 409


def test_listing_of_the_list_points_task() -> None:
    listing = {"web-vda": [{"id": "0000000004", "created_at": 5.5, "consistency": "app",
                            "meta": {"checkpoint": "standby-4"}}],
               "web-vdb": [{"id": "0000000009", "created_at": 6, "consistency": "app", "cycle": "standby-4"}]}
    pts = disk_points_from_listing(listing)
    sel = choose_point(pts, "latest_app_consistent")
    assert sel.point.as_dict() == {"id": "standby-4", "created_at": 6.0, "consistency": "app",
                                   "disks": {"web-vda": "0000000004", "web-vdb": "0000000009"},
                                   "whole": True, "missing": []}


# ---- properties ----------------------------------------------------------------------------

@st.composite
def histories(draw: st.DrawFn) -> tuple[tuple[str, ...], list[DiskPoint]]:
    """Cycles at increasing times, each committed on a random subset of the disks (pruning
    and failed disks make holes), with a random consistency per disk point."""
    disks = tuple(f"d{i}" for i in range(draw(st.integers(1, 4))))
    points: list[DiskPoint] = []
    t = 0.0
    for n in range(draw(st.integers(0, 8))):
        t += draw(st.floats(0.5, 1000))
        on = draw(st.lists(st.sampled_from(disks), unique=True, max_size=len(disks)))
        for d in on:
            points.append(DiskPoint(d, f"{n:010d}", t + draw(st.floats(0, 0.4)),
                                    draw(st.sampled_from(["app", "crash"])), f"c{n}"))
    return disks, draw(st.permutations(points))


@settings(max_examples=300, deadline=None)
@given(histories(), st.sampled_from(list(PointChoice)))
def test_choice_is_the_newest_qualifying_whole_point(h: tuple[tuple[str, ...], list[DiskPoint]],
                                                     choice: PointChoice) -> None:
    disks, points = h
    # Brute force: cycle -> disk -> point, then the newest complete (and app) cycle.
    by_cycle: dict[str, dict[str, DiskPoint]] = {}
    for p in points:
        by_cycle.setdefault(p.cycle, {})[p.disk_id] = p
    whole = {c: m for c, m in by_cycle.items() if set(m) == set(disks)}
    if choice is PointChoice.LATEST_APP_CONSISTENT:
        whole = {c: m for c, m in whole.items() if all(p.consistency == "app" for p in m.values())}
    if not whole:
        with pytest.raises((NoRecoveryPoint, NoAppConsistentPoint)):
            choose_point(points, choice, disks=disks)
        return
    expected = max(whole, key=lambda c: int(c[1:]))        # cycles are numbered in time order
    sel = choose_point(points, choice, disks=disks, now=1e9)
    assert sel.point.id == expected
    assert sel.point.disks == {d: p.point_id for d, p in whole[expected].items()}
    # Never a mix of cycles: every disk's point is the chosen cycle's.
    assert all(by_cycle[expected][d].point_id == pid for d, pid in sel.point.disks.items())
    newer_partial = [c for c, m in by_cycle.items() if set(m) != set(disks) and int(c[1:]) > int(expected[1:])]
    assert sorted(sel.newer_partial) == sorted(newer_partial)
    assert sel.wait_for_newer == (choice is PointChoice.LATEST and bool(newer_partial))
    assert sel.age_seconds is not None and sel.age_seconds >= 0
    # A given id picks the same point back, and order of the input does not matter.
    assert choose_point(points, expected, disks=disks).point == sel.point
    assert choose_point(list(reversed(points)), choice, disks=disks).point == sel.point


@settings(max_examples=200, deadline=None)
@given(histories(), st.data())
def test_a_given_id_is_accepted_only_when_whole(h: tuple[tuple[str, ...], list[DiskPoint]],
                                                data: st.DataObject) -> None:
    disks, points = h
    if not points:
        return
    p = data.draw(st.sampled_from(points))
    present = {q.disk_id for q in points if q.cycle == p.cycle}
    if present == set(disks):
        assert choose_point(points, p.cycle, disks=disks).point.id == p.cycle
    else:
        with pytest.raises(IncompletePoint, match=", ".join(d for d in disks if d not in present)):
            choose_point(points, p.cycle, disks=disks)


def test_point_of_cycle_is_exactly_what_the_final_sync_committed() -> None:
    pts = cycle(1, 100) + cycle(2, 200) + cycle(3, 300, on=DISKS[:2])
    final = {d: "0000000002" for d in DISKS}
    assert point_of_cycle(pts, final, disks=DISKS).id == "standby-2"
    with pytest.raises(IncompletePoint, match="standby-3 is not the whole cycle .missing on web-vdc"):
        point_of_cycle(pts, {d: "0000000003" for d in DISKS[:2]}, disks=DISKS)
    with pytest.raises(IncompletePoint, match="different cycles .standby-1, standby-2"):
        point_of_cycle(pts, {"web-vda": "0000000001", "web-vdb": "0000000002", "web-vdc": "0000000002"}, disks=DISKS)
    with pytest.raises(UnknownPoint, match="web-vda: 0000000009"):
        point_of_cycle(pts, {"web-vda": "0000000009"}, disks=DISKS)
    # a cycle that committed on fewer disks than the point it belongs to has
    with pytest.raises(IncompletePoint, match="missing on web-vdc"):
        point_of_cycle(pts, {d: "0000000002" for d in DISKS[:2]}, disks=DISKS)
