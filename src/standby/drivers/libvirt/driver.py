"""`LibvirtDriver`: the `HypervisorDriver` for KVM/QEMU hosts through libvirt.

Replication cycles (`begin_cycle` / `complete_cycle`) are implemented here on top of
`tracking` (checkpoints and their bitmaps), `backup` (point-in-time NBD exports) and
`nbd` (the change source the data plane reads). Host facts and VM lifecycle are
delegated to `discovery` and `domains`.

One cycle of a VM:

1. Look at what there is: the domain's disks and sizes, the libvirt checkpoints, the
   bitmaps in the images (QMP query-block for a running VM, `qemu-img info` for a
   powered-off one), and the tracking state saved by earlier cycles.
2. The base is the checkpoint the caller names (the one the replica's latest point was
   taken at). If libvirt lost it but its bitmaps are still in the images, redefine it
   from the saved XML. Delete every other `standby-*` checkpoint and stray bitmap.
3. Per disk, `assess_disk` says whether its changes since the base can be trusted; a disk
   that cannot (first cycle, crash, resize, added, replaced, raw) is read whole and sent
   as a hash scan against the replica: only that disk.
4. Create the new checkpoint `standby-<seq>` with the point-in-time exports: guest
   filesystems frozen around it when the guest agent answers (app-consistent), else
   crash-consistent. Save it as pending in the tracking state.
5. The caller sends each disk; when the secondary committed them all it calls
   `complete_cycle`, which makes the new checkpoint the committed one and deletes the
   older ones. Without it, the next cycle starts again from the old base (the changes
   since an older checkpoint are a superset: always safe).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from standby.drivers.base import CycleSession, DiskChanges, VmInfo, VmSpec
from standby.drivers.libvirt import backup as bk
from standby.drivers.libvirt.connection import call, open_connection, translate
from standby.drivers.libvirt.nbd import NbdChangeSource
from standby.drivers.libvirt.tracking import (
    PREFIX,
    CheckpointRecord,
    DiskRecord,
    DomainDisk,
    ImageBitmaps,
    LibvirtGuestAgent,
    TrackingState,
    assess_disk,
    broken_disk_in_error,
    checkpoint_name,
    checkpoint_seq,
    checkpoint_xml,
    domain_disks,
    image_bitmaps,
    quiesced,
    redefinable,
    running_bitmaps,
    vm_lock,
)
from standby.domain.fabric import Host
from standby.errors import BadInput, Conflict, RemoteError
from standby.replication.protocol import CycleKind

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/standby/tracking")


class LibvirtDriver:
    """A libvirt host (`uri`). `state_dir` keeps the tracking state of the VMs it
    replicates (checkpoint XML and disk facts, a few KB per VM); `scratch_dir` the backup
    jobs' scratch images (they hold the old content of blocks the guest overwrites during
    a cycle: put them where there is room)."""

    def __init__(self, uri: str = "qemu:///system", state_dir: Path | str = DEFAULT_STATE_DIR,
                 scratch_dir: Path | str | None = None, conn: Any = None) -> None:
        self.uri = uri
        self.state_dir = Path(state_dir)
        self.scratch_dir = Path(scratch_dir) if scratch_dir is not None else self.state_dir / "scratch"
        self._conn = conn
        self._own_conn = conn is None
        self._held: set[str] = set()
        self._open: set[str] = set()  # VMs (uuid) with a cycle session open

    # ------------------------------------------------------------------ connection

    @property
    def conn(self) -> Any:
        if self._conn is None:
            self._conn = open_connection(self.uri)
        return self._conn

    def close(self) -> None:
        if self._conn is not None and self._own_conn:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001
                pass
        self._conn = None

    def __enter__(self) -> LibvirtDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ delegated

    def host_facts(self, only: Callable[[str], bool] | None = None) -> Host:
        from standby.drivers.libvirt.discovery import host_facts

        return host_facts(self.conn, only=only)

    def list_vms(self, only: Callable[[str], bool] | None = None) -> list[VmInfo]:
        from standby.drivers.libvirt.domains import list_vms

        return list_vms(self.conn, only=only)

    def vm(self, name: str) -> VmInfo:
        from standby.drivers.libvirt.domains import vm_info

        return vm_info(self.conn, name)

    def define_vm(self, spec: VmSpec) -> VmInfo:
        from standby.drivers.libvirt.domains import define_vm

        return define_vm(self.conn, spec)

    def start_vm(self, name: str) -> None:
        from standby.drivers.libvirt.domains import start_vm

        start_vm(self.conn, name)

    def set_autostart(self, name: str, on: bool) -> bool:
        """Whether the host starts the VM when it boots; returns the previous setting."""
        from standby.drivers.libvirt.domains import set_autostart

        return set_autostart(self.conn, name, on)

    def shutdown_vm(self, name: str, timeout: float = 60.0) -> bool:
        """Graceful shutdown, powered off at `timeout`; True when the guest stopped by itself."""
        from standby.drivers.libvirt.domains import shutdown_vm

        return shutdown_vm(self.conn, name, timeout)

    def destroy_vm(self, name: str) -> None:
        from standby.drivers.libvirt.domains import destroy_vm

        destroy_vm(self.conn, name)

    def undefine_vm(self, name: str) -> None:
        from standby.drivers.libvirt.domains import undefine_vm

        undefine_vm(self.conn, name)

    def domain_xml(self, name: str) -> str:
        """The VM's persistent (inactive) definition: what a replica VM is defined from."""
        import libvirt

        dom = self._lookup(name)
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if dom.isPersistent() else 0
        return str(call(f"VM {name}: XML", dom.XMLDesc, flags))

    def create_network(self, name: str) -> str:
        """An isolated network (idempotent); returns what NICs attach to (see domains)."""
        from standby.drivers.libvirt.domains import create_isolated_network

        return create_isolated_network(self.conn, name)

    def delete_network(self, name: str) -> bool:
        """Remove an isolated network Standby made; False when there is none."""
        from standby.drivers.libvirt.domains import remove_isolated_network

        return remove_isolated_network(self.conn, name)

    def isolated_attachment(self, name: str) -> str:
        """What to attach a NIC to for isolated network `name` (`network:N` or `bridge:B`)."""
        from standby.drivers.libvirt.domains import isolated_attachment

        return isolated_attachment(self.conn, name)

    def events(self) -> Iterator[str]:
        raise NotImplementedError("libvirt domain events are not implemented yet")

    # ------------------------------------------------------------------ tracking state

    def _lookup(self, vm: str) -> Any:
        return call(f"VM {vm}", self.conn.lookupByName, vm)

    def tracking_state(self, vm: str) -> TrackingState:
        dom = self._lookup(vm)
        return TrackingState.load(self.state_dir, vm, dom.UUIDString())

    def last_checkpoint(self, vm: str) -> str | None:
        """The checkpoint the replica's latest complete point was taken at, as this host
        recorded it (None before the first completed cycle)."""
        st = self.tracking_state(vm)
        return st.committed.name if st.committed else None

    @contextmanager
    def _locked(self, uuid: str) -> Iterator[None]:
        if uuid in self._held:
            yield
            return
        with vm_lock(self.state_dir, uuid):
            self._held.add(uuid)
            try:
                yield
            finally:
                self._held.discard(uuid)

    # ------------------------------------------------------------------ the cycle

    @contextmanager
    def begin_cycle(self, vm: str, last_checkpoint: str | None,
                    consistency: str = "auto") -> Iterator[CycleSession]:
        import libvirt

        dom = self._lookup(vm)
        uuid = dom.UUIDString()
        with self._locked(uuid):
            st = TrackingState.load(self.state_dir, vm, uuid)
            active = bool(dom.isActive())
            every = domain_disks(call(f"VM {vm}: XML", dom.XMLDesc, 0))
            disks = [d for d in every if d.protected]
            skip = [d.target for d in every if not d.protected]
            if not disks:
                raise BadInput(f"VM {vm} has no writable local disk to replicate")
            sizes = {d.target: self._disk_size(dom, d) for d in disks}
            images, image_errors = self._image_bitmaps(dom, active, disks)
            notes: list[str] = []

            base = st.record(last_checkpoint) if last_checkpoint else None
            base_problem = None
            if last_checkpoint and base is None:
                base_problem = f"checkpoint {last_checkpoint} is not in this host's tracking state"
            cps = self._checkpoints(dom)
            if base is not None and base.name not in cps:
                if any(r.bitmap and images.get(t) and r.bitmap in images[t].bitmaps for t, r in base.disks.items()):
                    try:
                        dom.checkpointCreateXML(redefinable(base.xml, base.created_at),
                                                libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
                        notes.append(f"checkpoint {base.name} was missing from libvirt: redefined from saved metadata")
                    except libvirt.libvirtError as exc:
                        base_problem = (f"checkpoint {base.name} is missing from libvirt and could not be "
                                        f"redefined: {exc.get_error_message() or exc}")
                cps = self._checkpoints(dom)

            plans = []
            for d in disks:
                reason = assess_disk(d, sizes[d.target], base, images.get(d.target), image_errors.get(d.target))
                if reason is None and base_problem:
                    reason = base_problem
                plans.append(bk.DiskPlan(d, sizes[d.target], reason is None, reason, d.has_bitmaps))
            base_name = base.name if base is not None and any(p.incremental for p in plans) else None

            # Only the base survives: stale checkpoints (uncompleted cycles, crashed runs)
            # and stray bitmaps go, so that QEMU does not keep recording into them.
            self._sweep(dom, active, disks, images, keep={base_name} if base_name else set(), notes=notes)
            seen = [st.seq, *(s for s in map(checkpoint_seq, cps) if s is not None)]
            for im in images.values():
                seen += [s for s in map(checkpoint_seq, im.bitmaps) if s is not None]
            seq = max(seen) + 1
            name: str | None = checkpoint_name(seq) if any(p.tracked for p in plans) else None

            if active:
                exports, cons, qnote = self._start_online(dom, vm, plans, base_name, name, consistency, skip)
            else:
                exports, cons, qnote = self._start_offline(dom, vm, plans, base_name, name, consistency, skip)
            notes.append(qnote)
            try:
                if name is not None:
                    xml = call(f"VM {vm}: checkpoint {name}", dom.checkpointLookupByName, name).getXMLDesc(0)
                    st.pending = {n: r for n, r in st.pending.items() if n == base_name}
                    st.pending[name] = CheckpointRecord(
                        name, seq, time.time(), xml,
                        {p.disk.target: DiskRecord(p.disk.target, p.disk.path or "", p.disk.format, p.size,
                                                   name if p.tracked else None) for p in plans}, cons)
                    st.seq = seq
                    st.save()
                changes = []
                for p in plans:
                    export = exports.by_target[p.disk.target]
                    if p.incremental:
                        src = NbdChangeSource.open(export, CycleKind.EXTENTS, True)
                    else:
                        src = NbdChangeSource.open(export, CycleKind.HASH_SCAN, False)
                    changes.append(DiskChanges(p.disk.target, src, p.reason))
                session = CycleSession(vm, name or "", cons, changes, notes=notes)
                for n in notes:
                    log.info("VM %s cycle %s: %s", vm, name, n)
                self._open.add(uuid)
                try:
                    yield session
                finally:
                    self._open.discard(uuid)
            finally:
                exports.stop()
            if session.completed and session.checkpoint:
                # completed inside the session: older checkpoints go now that the backup
                # job (or qemu-nbd, which locks the images) is over
                self._prune(dom, seq)

    def complete_cycle(self, session: CycleSession) -> None:
        """The secondary committed every disk of the session's point: its checkpoint
        becomes the base of the next cycle, older checkpoints are deleted (when the
        session is still open, as it closes: the backup job may still use them, and a
        powered-off VM's images are locked by qemu-nbd until then)."""
        dom = self._lookup(session.vm)
        uuid = dom.UUIDString()
        with self._locked(uuid):
            st = TrackingState.load(self.state_dir, session.vm, uuid)
            if not session.checkpoint:  # no disk with a bitmap: nothing to keep
                session.completed = True
                return
            rec = st.record(session.checkpoint)
            if rec is None:
                raise Conflict(f"checkpoint {session.checkpoint} of VM {session.vm} is not pending on this host "
                               "(completed already, or made by another host)")
            st.committed = rec
            st.pending = {n: r for n, r in st.pending.items() if r.seq > rec.seq}
            st.save()
            session.completed = True
            if uuid not in self._open:
                self._prune(dom, rec.seq)

    def _prune(self, dom: Any, seq: int) -> None:
        """Delete the checkpoints older than `standby-<seq>` (and their bitmaps)."""
        active = bool(dom.isActive())
        disks = [d for d in domain_disks(dom.XMLDesc(0)) if d.protected]
        for n in self._checkpoints(dom):
            s = checkpoint_seq(n)
            if s is not None and s < seq:
                self._delete_checkpoint(dom, n, active, disks)

    # ------------------------------------------------------------------ helpers

    def _disk_size(self, dom: Any, d: DomainDisk) -> int:
        import libvirt

        try:
            return int(dom.blockInfo(d.target)[0])
        except libvirt.libvirtError:
            pass
        if d.path and d.has_bitmaps:
            return image_bitmaps(d.path, d.format).size
        raise RemoteError(f"cannot read the size of disk {d.target} of VM {dom.name()}")

    def _image_bitmaps(self, dom: Any, active: bool, disks: list[DomainDisk]
                       ) -> tuple[dict[str, ImageBitmaps], dict[str, str]]:
        images: dict[str, ImageBitmaps] = {}
        errors: dict[str, str] = {}
        tracked = [d for d in disks if d.has_bitmaps]
        if not tracked:
            return images, errors
        if active:
            try:
                images = running_bitmaps(dom, tracked)
            except RemoteError as exc:
                errors = {d.target: exc.message for d in tracked}
            for d in tracked:
                if d.target not in images and d.target not in errors:
                    errors[d.target] = "not found in QEMU's block devices"
            return images, errors
        for d in tracked:
            try:
                images[d.target] = image_bitmaps(d.path or "", d.format)
            except RemoteError as exc:
                errors[d.target] = exc.message
        return images, errors

    @staticmethod
    def _checkpoints(dom: Any) -> dict[str, Any]:
        return {c.getName(): c for c in call(f"VM {dom.name()}: checkpoints", dom.listAllCheckpoints, 0)}

    def _delete_checkpoint(self, dom: Any, name: str, active: bool, disks: list[DomainDisk]) -> None:
        """Delete a checkpoint and its bitmaps. Online libvirt removes the bitmaps (also
        inconsistent ones); when a bitmap is already gone it refuses, and only the metadata
        is removed. Offline (libvirt cannot) the metadata goes and qemu-img removes the
        bitmaps."""
        import libvirt

        try:
            cp = dom.checkpointLookupByName(name)
        except libvirt.libvirtError:
            return
        if active:
            try:
                cp.delete(0)
                return
            except libvirt.libvirtError as exc:
                log.info("VM %s: deleting checkpoint %s: %s; removing its metadata only", dom.name(), name,
                         exc.get_error_message())
        try:
            cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        except libvirt.libvirtError as exc:
            raise translate(exc, f"VM {dom.name()}: deleting checkpoint {name}") from None
        if not active:
            for d in disks:
                if d.has_bitmaps and d.path:
                    bk.remove_bitmap(d.path, name)

    def _sweep(self, dom: Any, active: bool, disks: list[DomainDisk], images: dict[str, ImageBitmaps],
               keep: set[str], notes: list[str]) -> None:
        import libvirt

        before = set(self._checkpoints(dom))
        for n in before:
            if n.startswith(PREFIX) and n not in keep:
                self._delete_checkpoint(dom, n, active, disks)
        # Bitmaps without a checkpoint (metadata lost, or left behind by a deletion that
        # could only remove metadata); those of the checkpoints just deleted are gone, or
        # are left for the next cycle when libvirt could not remove them.
        known = before | set(self._checkpoints(dom))
        strays: dict[str, list[DomainDisk]] = {}
        for d in disks:
            for b in (images.get(d.target).bitmaps if d.target in images else {}):
                if b.startswith(PREFIX) and b not in keep and b not in known:
                    strays.setdefault(b, []).append(d)
        for b, ds in strays.items():
            if not active:
                for d in ds:
                    if d.path:
                        bk.remove_bitmap(d.path, b)
                continue
            # A running VM's bitmap is removed through libvirt: define a checkpoint
            # for it, then delete that checkpoint.
            try:
                dom.checkpointCreateXML(checkpoint_xml(b, {d.target: True for d in ds}, int(time.time())),
                                        libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
                dom.checkpointLookupByName(b).delete(0)
            except libvirt.libvirtError as exc:
                notes.append(f"stray bitmap {b} could not be removed: {exc.get_error_message() or exc}")

    def _start_online(self, dom: Any, vm: str, plans: list[bk.DiskPlan], base: str | None, name: str | None,
                      consistency: str, skip: list[str]) -> tuple[bk.Exports, str, str]:
        import libvirt

        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(len(plans) + 1):
            with quiesced(LibvirtGuestAgent(dom), consistency) as q:
                try:
                    exports = bk.start_online(dom, vm, plans, base if any(p.incremental for p in plans) else None,
                                              name, self.scratch_dir, skip)
                    return exports, q.consistency, q.note
                except libvirt.libvirtError as exc:
                    msg = exc.get_error_message() or str(exc)
                    hit = broken_disk_in_error(msg)
                    plan = next((p for p in plans if hit and p.disk.target == hit[1] and p.incremental), None)
                    if plan is None:
                        raise translate(exc, f"VM {vm}: starting the backup") from None
                    plan.incremental = False
                    plan.reason = f"libvirt refused an incremental backup: {msg}"
        raise RemoteError(f"VM {vm}: libvirt kept refusing the backup")

    def _start_offline(self, dom: Any, vm: str, plans: list[bk.DiskPlan], base: str | None, name: str | None,
                       consistency: str, skip: list[str]) -> tuple[bk.Exports, str, str]:
        import libvirt

        added: list[DomainDisk] = []
        if name is not None:
            try:
                for p in plans:
                    if p.tracked and p.disk.path:
                        bk.add_bitmap(p.disk.path, name)
                        added.append(p.disk)
                dom.checkpointCreateXML(
                    checkpoint_xml(name, {p.disk.target: p.tracked for p in plans} | {t: False for t in skip},
                                   int(time.time())),
                    libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
            except (libvirt.libvirtError, RemoteError) as exc:
                for d in added:
                    bk.remove_bitmap(d.path or "", name)
                if isinstance(exc, libvirt.libvirtError):
                    raise translate(exc, f"VM {vm}: defining checkpoint {name}") from None
                raise
        exports = bk.start_offline(vm, plans, base)
        state, reason = dom.state()
        note = ("the VM is powered off: its disks are read at rest (crash-consistent unless the guest shut "
                f"down cleanly; libvirt state {state}/{reason})")
        if consistency == "app":
            note += "; an app-consistent point needs a running guest agent"
        return exports, "crash", note
