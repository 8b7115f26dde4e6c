"""One replication cycle of a VM, end to end: the driver's point-in-time view of each disk,
sent by the data plane's sender to the secondary's agent, then the driver told that the
point is committed.

    result = replicate_vm(driver, "web01", "10.0.0.2:7443", tls_context, state_dir)

Per disk, the driver's change source decides the cycle kind: the changed extents since
the base checkpoint, or a hash scan of the whole disk when that disk's change tracking
is broken (`DiskChanges.resync_reason`). Before sending, the agent is asked for the
replica's latest point: changed extents are only valid on top of the point this VM's
previous cycle produced (recorded in `state_dir`); on any other replica state the disk is
hash-scanned instead, and an empty replica gets a (resumable) seed.

A cycle completes (the driver keeps the new checkpoint and drops older ones) only when
every disk's point was acknowledged. A disk that fails does not stop the others; the
cycle then raises, and the next one starts again from the previous checkpoint (whose
changes include this cycle's: safe for the disks that did commit).
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from standby.contract import disk_id_for
from standby.domain import vm_point
from standby.domain.vm_point import VmManifest
from standby.errors import Conflict, StandbyError
from standby.replication.changes import ChangeSource
from standby.replication.protocol import Consistency, CycleKind
from standby.replication.sender import CycleResult, Endpoint, SenderOptions, probe, run_cycle

if TYPE_CHECKING:
    from standby.drivers.base import HypervisorDriver



@dataclass
class VmReplicationState:
    """What this side remembers of a VM's replication (`<state_dir>/vm-<vm>.json`): the
    checkpoint the last complete cycle was taken at, and the latest point each disk's
    replica got from this VM's cycles."""

    path: Path
    checkpoint: str | None = None
    points: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, state_dir: Path, vm: str) -> VmReplicationState:
        path = state_dir / f"vm-{disk_id_for(vm, 'state')}.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path)
        return cls(path, d.get("checkpoint"), dict(d.get("points") or {}))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"checkpoint": self.checkpoint, "points": self.points, "saved_at": time.time()}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


@dataclass
class DiskCycle:
    target: str
    disk_id: str
    kind: str  # seed, extents, hash_scan
    resync_reason: str | None
    result: CycleResult | None = None
    error: str | None = None
    nbd_bytes_read: int | None = None  # what the source read from the hypervisor, when it says

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "disk_id": self.disk_id, "kind": self.kind,
                "resync_reason": self.resync_reason, "error": self.error, "nbd_bytes_read": self.nbd_bytes_read,
                "result": self.result.as_dict() if self.result else None}


@dataclass
class VmCycleResult:
    vm: str
    checkpoint: str
    base_checkpoint: str | None
    consistency: str
    completed: bool
    seconds: float
    disks: list[DiskCycle]
    notes: list[str]
    manifest: VmManifest | None = None  # what every disk point of the cycle carries

    def disk(self, target: str) -> DiskCycle:
        return next(d for d in self.disks if d.target == target)

    def as_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "checkpoint": self.checkpoint, "base_checkpoint": self.base_checkpoint,
                "consistency": self.consistency, "completed": self.completed, "seconds": round(self.seconds, 3),
                "notes": self.notes, "disks": [d.as_dict() for d in self.disks]}


class CycleFailed(StandbyError):
    """Some disks of a VM's cycle failed; `result` tells which, and which committed."""

    exit_code = 5
    http_status = 502

    def __init__(self, message: str, result: VmCycleResult, cause: BaseException) -> None:
        super().__init__(message)
        self.result = result
        self.cause = cause


def _with_kind(source: ChangeSource, kind: CycleKind) -> ChangeSource | None:
    fn = getattr(source, "with_kind", None)
    return fn(kind) if callable(fn) else None


def _manifest(driver: HypervisorDriver, vm: str, session: Any, disk_ids: Mapping[str, str] | None,
              recovery: Mapping[str, Any] | None) -> VmManifest | None:
    """The cycle's VM manifest; None (with a note on the session) when the VM's definition
    cannot be read: the cycle goes on, its points then need the control plane to fail over."""
    rec = recovery or {}
    disks = {dc.target: (disk_ids or {}).get(dc.target) or disk_id_for(vm, dc.target) for dc in session.disks}
    try:
        xml = driver.domain_xml(vm)
        nics = [(n.mac, n.network) for n in driver.vm(vm).nics]
    except (StandbyError, AttributeError, OSError) as exc:
        session.notes.append(f"the VM's definition could not be read ({exc}); this point needs the control "
                             "plane to fail over")
        return None
    if len(xml) > vm_point.MAX_DOMAIN_XML:
        session.notes.append(f"the VM's definition is {len(xml)} characters, over the "
                             f"{vm_point.MAX_DOMAIN_XML} a point carries; this point needs the control plane "
                             "to fail over")
    item_id = rec.get("item_id")
    try:
        return vm_point.build(vm, session.checkpoint or "", disks, xml, nics=nics,
                              network_map=rec.get("network_map") or {}, policy=rec.get("policy") or {},
                              item_id=item_id if isinstance(item_id, int) else None)
    except StandbyError as exc:
        session.notes.append(f"no VM manifest for this point: {exc}")
        return None


def replicate_vm(driver: HypervisorDriver, vm: str, endpoint: Endpoint | str, context: ssl.SSLContext,
                 state_dir: Path | str, *, consistency: str = "auto", options: SenderOptions | None = None,
                 disk_ids: Mapping[str, str] | None = None,
                 on_session: Callable[[Any], None] | None = None, force_hash_scan: bool = False,
                 progress: Callable[[int], None] | None = None,
                 recovery: Mapping[str, Any] | None = None) -> VmCycleResult:
    """Run one replication cycle of `vm` to the agent at `endpoint`.

    `state_dir` keeps this VM's replication state and the sender's per-disk state;
    `disk_ids` maps a disk target to its replica disk id (default `<vm>-<target>`);
    `on_session` is called with the open cycle session before anything is sent (tests
    use it to look at the point-in-time view); `force_hash_scan` compares every block
    with the replica's digests even where the changed extents are trusted (an operator's
    resync: it repairs a replica that missed writes the change tracking did not report);
    `progress` gets the bytes examined, from the sender's threads; `recovery` is what the
    control plane knows that a failover needs ({network_map: {primary: secondary},
    policy: {...}, item_id}): with the VM's definition and disks it becomes the cycle's
    manifest (`domain.vm_point`), carried by every disk point, so the secondary can start
    the VM from its replica store alone."""
    state_dir = Path(state_dir)
    if isinstance(endpoint, str):
        endpoint = Endpoint.parse(endpoint)
    opts = options or SenderOptions()
    st = VmReplicationState.load(state_dir, vm)
    base = st.checkpoint
    started = time.perf_counter()
    disks: list[DiskCycle] = []
    first_error: BaseException | None = None
    with driver.begin_cycle(vm, base, consistency) as session:
        taken_at = time.time()  # the disks as of this moment (the checkpoint): the point's time
        if on_session is not None:
            on_session(session)
        cons = Consistency.APP if session.consistency == "app" else Consistency.CRASH
        manifest = _manifest(driver, vm, session, disk_ids, recovery)
        for dc in session.disks:
            disk_id = (disk_ids or {}).get(dc.target) or disk_id_for(vm, dc.target)
            source, reason = dc.source, dc.resync_reason
            item = DiskCycle(dc.target, disk_id, source.kind.name.lower(), reason)
            disks.append(item)
            try:
                hello = probe(endpoint, context, disk_id, source.size, timeout=opts.timeout)
                latest = hello.latest_point
                if source.kind is CycleKind.EXTENTS and latest != st.points.get(disk_id):
                    scan = _with_kind(source, CycleKind.HASH_SCAN)
                    if scan is None:
                        raise Conflict(f"the replica of {disk_id} is at point {latest}, not at "
                                       f"{st.points.get(disk_id)} which the changed extents are relative to, "
                                       "and the change source cannot be rescanned")
                    source = scan
                    reason = (f"the replica's latest point is {latest or 'none'}, not "
                              f"{st.points.get(disk_id) or 'none'} as this VM's last cycle left it")
                if force_hash_scan and source.kind is CycleKind.EXTENTS:
                    scan = _with_kind(source, CycleKind.HASH_SCAN)
                    if scan is None:
                        raise Conflict(f"a hash scan of {disk_id} was asked for and its change source cannot "
                                       "be rescanned")
                    source, reason = scan, "a hash scan was asked for (resync)"
                if source.kind is CycleKind.HASH_SCAN and latest is None:
                    source = _with_kind(source, CycleKind.SEED) or source
                item.kind, item.resync_reason = source.kind.name.lower(), reason
                meta = {"vm": vm, "disk": dc.target, "checkpoint": session.checkpoint, "cycle_kind": item.kind,
                        "taken_at": round(taken_at, 3)}
                if reason:
                    meta["resync_reason"] = reason[:500]
                if session.notes:
                    meta["notes"] = [n[:300] for n in session.notes[:8]]
                if manifest is not None:
                    meta[vm_point.META_KEY] = manifest.as_dict()
                res = run_cycle(source, endpoint, context, disk_id,
                                replace(opts, state_dir=state_dir / "sender", consistency=cons,
                                        meta={**opts.meta, **meta}), progress=progress)
                item.result = res
                st.points[disk_id] = res.point_id
                st.save()
            except StandbyError as exc:
                item.error = exc.message
                first_error = first_error or exc
            read = getattr(source, "bytes_read", None)
            item.nbd_bytes_read = int(read) if isinstance(read, int) else None
        result = VmCycleResult(vm, session.checkpoint, base, session.consistency, False, 0.0, disks,
                               list(session.notes), manifest)
        if first_error is None:
            # Record the new base first: if we stop between the two steps, the next cycle
            # starts from the new checkpoint, which the driver still has (pending).
            st.checkpoint = session.checkpoint or None
            st.save()
            driver.complete_cycle(session)
            result.completed = True
    result.seconds = time.perf_counter() - started
    if first_error is not None:
        failed = ", ".join(f"{d.target}: {d.error}" for d in disks if d.error)
        raise CycleFailed(f"replication cycle of VM {vm} failed ({failed})", result, first_error)
    return result
