"""A replica store seen per VM: which replica disks belong to a VM, its whole recovery
points, and the manifest each carries (`domain/vm_point.py`).

The store itself knows disks, not VMs; a VM's disks are found through their points'
meta (`vm_point.vm`, or `vm` in points written before manifests). This is what a
secondary needs when no control plane answers (`standby points show --vm`, the agent's
break-glass failover).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from standby.domain import vm_point
from standby.domain.recovery_points import (
    DiskPoint,
    Selection,
    VmPoint,
    choose_point,
    parse_choice,
    vm_points,
)
from standby.domain.vm_point import VmManifest
from standby.errors import IntegrityError, NotFound
from standby.replication.store import RecoveryPoint, ReplicaStore, meta_digest


def _vm_of(meta: dict[str, Any]) -> str | None:
    raw = meta.get(vm_point.META_KEY)
    if isinstance(raw, dict) and isinstance(raw.get("vm"), str):
        return str(raw["vm"])
    vm = meta.get("vm")
    return str(vm) if isinstance(vm, str) else None


def vms(store: ReplicaStore) -> dict[str, list[str]]:
    """Every VM with points in the store -> its replica disk ids (by their latest point)."""
    out: dict[str, list[str]] = {}
    for disk_id in store.disks():
        latest = store.disk(disk_id).latest()
        vm = _vm_of(latest.meta) if latest is not None else None
        if vm is not None:
            out.setdefault(vm, []).append(disk_id)
    return out


@dataclass(frozen=True)
class VmRecoveryPoint:
    """One whole VM point: its per-disk points and the manifest they carry."""

    vm: str
    point: VmPoint
    records: dict[str, RecoveryPoint]  # disk id -> the disk's point of this cycle
    manifest: VmManifest | None  # None: written before manifests (needs the control plane)

    @property
    def id(self) -> str:
        return self.point.id

    def as_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {"vm": self.vm, "point": self.point.id, "created_at": self.point.created_at,
                "consistency": "app" if self.point.app_consistent else "crash",
                "disks": {d: r.id for d, r in sorted(self.records.items())},
                "manifest": m.as_dict() if m is not None else None,
                "startable": bool(m is not None and m.startable)}


def _records(store: ReplicaStore, disk_ids: list[str]) -> dict[str, list[RecoveryPoint]]:
    return {d: store.disk(d).points() for d in disk_ids}


def _collect(store: ReplicaStore, vm: str) -> tuple[list[str], list[DiskPoint], dict[str, list[RecoveryPoint]]]:
    """The VM's current disks, their points as DiskPoints, and the records per disk."""
    disk_ids = vms(store).get(vm)
    if not disk_ids:
        raise NotFound(f"no replica of VM {vm} in {store.root}")
    records = _records(store, disk_ids)
    # the VM's disk set is the one its newest manifest names (a disk added later, or
    # one left from an older definition, does not make every point partial)
    newest: tuple[float, VmManifest] | None = None
    for d in disk_ids:
        if records[d]:
            last = records[d][-1]
            m = vm_point.of_meta(last.meta)
            if m is not None and (newest is None or last.created_at > newest[0]):
                newest = (last.created_at, m)
    disks = sorted(set(newest[1].disks.values()) & set(disk_ids)) if newest else sorted(disk_ids)
    flat = [DiskPoint(disk_id=d, point_id=p.id, created_at=p.created_at, consistency=p.consistency,
                      cycle=str(p.meta.get("checkpoint") or ""))
            for d in disks for p in records[d]]
    return disks, flat, records


def _whole(vm: str, vp: VmPoint, records: dict[str, list[RecoveryPoint]]) -> VmRecoveryPoint:
    recs = {d: next(p for p in records[d] if p.id == pid) for d, pid in vp.disks.items()}
    manifest = None
    for disk_id, rec in sorted(recs.items()):
        if rec.meta_digest is not None and meta_digest(rec.meta) != rec.meta_digest:
            raise IntegrityError(f"point {rec.id} of disk {disk_id}: its meta does not match its seal; "
                                 "check it with standby points verify before failing over")
        manifest = manifest or vm_point.of_meta(rec.meta)
    return VmRecoveryPoint(vm, vp, recs, manifest)


def vm_recovery_points(store: ReplicaStore, vm: str) -> list[VmRecoveryPoint]:
    """The VM's whole points, oldest first, with their manifests (checked against the
    seal: a manifest that does not match it is an IntegrityError, never used)."""
    disks, flat, records = _collect(store, vm)
    return [_whole(vm, vp, records) for vp in vm_points(flat, disks) if vp.whole]


def choose(store: ReplicaStore, vm: str, choice: str = "latest", *, now: float) -> VmRecoveryPoint:
    """The VM point a failover takes: `latest`, `latest_app_consistent`, or a point id
    (the rules of `domain.recovery_points.choose_point`, on what this store holds)."""
    disks, flat, records = _collect(store, vm)
    sel: Selection = choose_point(flat, parse_choice(choice), now=now, disks=disks)
    return _whole(vm, sel.point, records)
