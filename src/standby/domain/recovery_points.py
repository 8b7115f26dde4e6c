"""Choosing the recovery point a VM fails over to. Pure: no I/O, time passed in.

A VM's disks are replicated as separate replica disks, each with its own points (ids
are per-disk sequence numbers, `replication/store.py`). One replication cycle of a VM
gives one point on each disk, all cut at the same instant (the driver's point-in-time
view of every disk, `agent/replicate.py`); those per-disk points carry the same
cycle key (the cycle's checkpoint name, recorded in each point's `meta`). So:

- a **VM recovery point** (`VmPoint`) is the set of per-disk points with one cycle key;
  its id is that key; it is taken at the newest `created_at` of its disk points (the
  moment the last disk committed); it is app-consistent only if every disk's point is.
- it is **whole** when it has a point on every disk of the VM. Only a whole point can be
  failed over to: mixing disks of different cycles gives a VM whose disks disagree
  (a database on one disk, its log on another), torn across disks.

A cycle is committed disk by disk, so the newest cycle may be on some disks only: it is
still being sent, or one of its disks failed. Such a partial cycle is never chosen.

Choices, mapped to the reference's recovery point options:

- `latest_processed` ("latest processed", lowest RTO): the newest whole point as the
  secondary holds it now, without waiting for anything.
- `latest` ("latest", lowest RPO: the reference processes all data already sent before
  failing over): the newest whole point once the data in flight has landed. Standby's
  secondary has no unprocessed log to apply (a point exists whole or not at all), so the
  difference is the cycle in flight: when a newer cycle is on some disks only, the
  selection says so (`wait_for_newer`), and the workflow lets that cycle finish (or runs
  its final sync) and chooses again; if it cannot finish, the point chosen here stands.
  With nothing in flight, `latest` and `latest_processed` are the same point.
- `latest_app_consistent`: the newest whole point that is app-consistent on every disk.
- a given point id ("custom"): a VM point id (the cycle key), or a per-disk point id
  when it names one VM point only; it must be whole.

Errors (all `StandbyError`s, so the API and CLI map them): `NoRecoveryPoint`,
`NoAppConsistentPoint` (refused: exit 1, HTTP 409), `UnknownPoint` (not found: exit 3,
HTTP 404), `IncompletePoint` (refused), `AmbiguousPoint` (bad input: exit 2, HTTP 400).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from standby.errors import BadInput, NotFound, Refused

__all__ = [
    "AmbiguousPoint",
    "DiskPoint",
    "IncompletePoint",
    "NoAppConsistentPoint",
    "NoRecoveryPoint",
    "PointChoice",
    "Selection",
    "UnknownPoint",
    "VmPoint",
    "choose_point",
    "disk_points_from_listing",
    "parse_choice",
    "point_of_cycle",
    "vm_points",
]

APP = "app"


class PointChoice(StrEnum):
    LATEST = "latest"
    LATEST_PROCESSED = "latest_processed"
    LATEST_APP_CONSISTENT = "latest_app_consistent"


class NoRecoveryPoint(Refused):
    """The VM has no recovery point whole on every disk."""


class NoAppConsistentPoint(Refused):
    """The VM has no app-consistent recovery point whole on every disk."""


class UnknownPoint(NotFound):
    """No recovery point of the VM has the id asked for."""


class IncompletePoint(Refused):
    """The point asked for is not present on every disk of the VM."""


class AmbiguousPoint(BadInput):
    """A per-disk point id that names points of different cycles."""


@dataclass(frozen=True)
class DiskPoint:
    """One replica disk's recovery point, as the secondary lists it.

    `cycle` is the VM cycle the point belongs to (the same on every disk of one cycle);
    empty when unknown (records written before cycles were named): such a point is a VM
    point on its own, whole only for a single-disk VM.
    """

    disk_id: str
    point_id: str
    created_at: float
    consistency: str = "crash"
    cycle: str = ""

    @property
    def key(self) -> str:
        return self.cycle or f"{self.disk_id}/{self.point_id}"


@dataclass(frozen=True)
class VmPoint:
    """A VM recovery point: the per-disk points of one cycle (`disks`: disk id -> point id)."""

    id: str
    created_at: float
    app_consistent: bool
    disks: Mapping[str, str]
    missing: tuple[str, ...]  # disks of the VM without a point of this cycle

    @property
    def whole(self) -> bool:
        return not self.missing

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "created_at": self.created_at,
                "consistency": APP if self.app_consistent else "crash",
                "disks": dict(self.disks), "whole": self.whole, "missing": list(self.missing)}


@dataclass(frozen=True)
class Selection:
    """What `choose_point` chose, and why the workflow might choose again."""

    point: VmPoint
    choice: str                  # the choice as asked (a PointChoice value or the id)
    age_seconds: float | None    # now - point.created_at (never negative); None without `now`
    newer_partial: tuple[str, ...]  # ids of newer cycles present on some disks only
    wait_for_newer: bool         # `latest` with a cycle in flight: let it land, then choose again


def _order(p: VmPoint) -> tuple[float, str]:
    return (p.created_at, p.id)


def vm_points(points: Iterable[DiskPoint], disks: Sequence[str] | None = None) -> list[VmPoint]:
    """Group per-disk points into VM points, oldest first.

    `disks` is the VM's list of replica disks; by default every disk that has a point
    (a disk with no point at all would then go unnoticed: pass `disks` when known).
    """
    pts = list(points)
    all_disks = tuple(sorted(set(disks) if disks is not None else {p.disk_id for p in pts}))
    groups: dict[str, list[DiskPoint]] = {}
    for p in pts:
        if disks is not None and p.disk_id not in all_disks:
            continue  # a disk no longer part of the VM: its points do not count
        groups.setdefault(p.key, []).append(p)
    out = []
    for key, members in groups.items():
        per_disk: dict[str, DiskPoint] = {}
        for m in members:
            # One cycle gives one point per disk; should a disk show two (a record
            # rewritten), the newer one is what the cycle left.
            if m.disk_id not in per_disk or (m.created_at, m.point_id) > (per_disk[m.disk_id].created_at,
                                                                            per_disk[m.disk_id].point_id):
                per_disk[m.disk_id] = m
        out.append(VmPoint(
            id=key,
            created_at=max(m.created_at for m in per_disk.values()),
            app_consistent=all(m.consistency == APP for m in per_disk.values()),
            disks={d: per_disk[d].point_id for d in sorted(per_disk)},
            missing=tuple(d for d in all_disks if d not in per_disk),
        ))
    return sorted(out, key=_order)


def parse_choice(value: str) -> PointChoice | str:
    """A `PointChoice` when `value` names one, else the value as a point id."""
    try:
        return PointChoice(value)
    except ValueError:
        if not value.strip():
            raise BadInput("recovery point: give latest, latest_processed, latest_app_consistent "
                           "or a point id") from None
        return value


def _resolve_id(wanted: str, every: list[VmPoint]) -> VmPoint:
    for p in every:
        if p.id == wanted:
            return p
    by_disk = [p for p in every if wanted in p.disks.values()]
    if len(by_disk) == 1:
        return by_disk[0]
    if by_disk:
        raise AmbiguousPoint(f"recovery point {wanted!r} is a per-disk id that names several VM points "
                             f"({', '.join(p.id for p in by_disk)}): give the VM point id")
    known = ", ".join(p.id for p in every[-5:]) or "none"
    raise UnknownPoint(f"no recovery point {wanted!r} (newest: {known})", point=wanted)


def choose_point(points: Iterable[DiskPoint], choice: PointChoice | str, *, now: float | None = None,
                 disks: Sequence[str] | None = None) -> Selection:
    """The VM point to fail over to (see the module docstring for each choice).

    `choice` is a `PointChoice` (or its value) or a point id; `disks` the VM's replica
    disks (default: every disk that has a point); `now` gives the point's age.
    """
    if isinstance(choice, str) and not isinstance(choice, PointChoice):
        choice = parse_choice(choice)
    every = vm_points(points, disks)
    whole = [p for p in every if p.whole]
    if isinstance(choice, PointChoice):
        if not whole:
            partial = f" ({len(every)} on some disks only)" if every else ""
            raise NoRecoveryPoint(f"no recovery point is complete on every disk{partial}")
        if choice is PointChoice.LATEST_APP_CONSISTENT:
            app = [p for p in whole if p.app_consistent]
            if not app:
                raise NoAppConsistentPoint(
                    f"no app-consistent recovery point is complete on every disk "
                    f"({len(whole)} crash-consistent point(s); newest {whole[-1].id})")
            chosen = app[-1]
        else:
            chosen = whole[-1]
    else:
        chosen = _resolve_id(choice, every)
        if not chosen.whole:
            raise IncompletePoint(f"recovery point {chosen.id} is not on every disk "
                                  f"(missing on {', '.join(chosen.missing)})", point=chosen.id)
    newer_partial = tuple(p.id for p in every if not p.whole and _order(p) > _order(chosen))
    age = None if now is None else max(0.0, now - chosen.created_at)
    return Selection(point=chosen, choice=str(choice), age_seconds=age, newer_partial=newer_partial,
                     wait_for_newer=choice is PointChoice.LATEST and bool(newer_partial))


def point_of_cycle(points: Iterable[DiskPoint], committed: Mapping[str, str], *,
                   disks: Sequence[str] | None = None) -> VmPoint:
    """The VM point a cycle committed, given its per-disk point ids (a `cycle` task's
    `points` result): a planned failover fails over to exactly the point of its final
    sync, so that no write is lost. Refused when those ids are not one whole VM point
    (a disk missing, or ids of different cycles)."""
    every = vm_points(points, disks)
    wanted = dict(committed)
    for p in every:
        if dict(p.disks) == wanted and p.whole:
            return p
    holders = sorted({p.id for p in every for d, pid in wanted.items() if p.disks.get(d) == pid})
    if not holders:
        raise UnknownPoint(f"no recovery point holds the points the cycle committed "
                           f"({', '.join(f'{d}: {pid}' for d, pid in sorted(wanted.items()))})")
    if len(holders) > 1:
        raise IncompletePoint(f"the points the cycle committed belong to different cycles ({', '.join(holders)})")
    p = next(p for p in every if p.id == holders[0])
    missing = sorted(set(p.missing) | {d for d in p.disks if d not in wanted} | {d for d in wanted if d not in p.disks})
    raise IncompletePoint(f"recovery point {p.id} is not the whole cycle (missing on {', '.join(missing)})",
                          point=p.id)


def disk_points_from_listing(listing: Mapping[str, Iterable[Mapping[str, Any]]]) -> list[DiskPoint]:
    """`DiskPoint`s from a `list_points` task result (`{disk_id: [{id, created_at,
    consistency, cycle?, meta?}]}`); the cycle key is `cycle`, else `meta.checkpoint`."""
    out = []
    for disk_id, rows in listing.items():
        for r in rows:
            meta = r.get("meta") or {}
            cycle = r.get("cycle") or meta.get("checkpoint") or ""
            out.append(DiskPoint(disk_id=disk_id, point_id=str(r["id"]), created_at=float(r["created_at"]),
                                 consistency=str(r.get("consistency") or "crash"), cycle=str(cycle)))
    return out
