"""What an agent does for a task of the control plane (docs/control-plane.md, "Tasks").

`DISPATCH` maps each task kind to the function that runs it; `execute` runs one task and
turns any outcome into the result the agent posts: `{ok: true, result}` or
`{ok: false, error, error_type}` (error_type the `standby.errors` class name, or the
exception's class name for a bug). A task never takes the agent down.

| kind | side | what |
| --- | --- | --- |
| cycle | primary | `replicate_vm` of a VM this agent owns to the peer agent |
| prune | secondary | retention on the replica store (`DiskReplica.prune`) |
| delete_replica | secondary | remove replica disks (refused while a point is materialized) |
| list_points | secondary | the recovery points of replica disks |
| seed_export | primary | an offline seed of each disk of a VM, from a point-in-time view |
| seed_import | secondary | import such seeds as the disks' first points |

Each kind's parameters are a model of `standby.contract` (`CycleParams`, `PruneParams`,
`DiskIdsParams`, `SeedExportParams`, `SeedImportParams`), read with `parse_params`: bad
parameters are a BadInput naming the one at fault.

Recovery's kinds (docs/recovery.md, "Wiring") are in `agent/recovery.py`: materialize,
release, define_vm, start_vm, stop_vm, undefine_vm, create_network, delete_network,
adopt_disk, restore_disk.

Every task is safe to run again (an agent restarted mid-task gets it again): a cycle
starts from the checkpoint the last complete cycle left; prune, delete and listing are
idempotent; a seed export refuses a non-empty destination directory and an import
refuses a disk that already has points.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from standby.agent.recovery import RECOVERY_TASKS
from standby.contract import (CycleParams, DiskIdsParams, PruneParams, SeedExportParams, SeedImportParams,
                              parse_params)
from standby.errors import BadInput, Conflict, NotFound, Refused, StandbyError
from standby.replication.store import ReplicaStore

if TYPE_CHECKING:
    from standby.drivers.base import HypervisorDriver
    from standby.replication.changes import ChangeSource

log = logging.getLogger("standby.agent")


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat().replace("+00:00", "Z")


class TaskProgress:
    """What a running task reports. The runtime posts it (at most once a second) and sets
    `cancel_requested` from the answer; tasks look at it where stopping is safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.percent = 0
        self.message = ""
        self.bytes_done = 0
        self.total_bytes = 0
        self.cancel_requested = False
        self.changed = threading.Event()

    def set(self, percent: int | None = None, message: str | None = None) -> None:
        with self._lock:
            if percent is not None:
                self.percent = max(0, min(100, int(percent)))
            if message is not None:
                self.message = message[:500]
        self.changed.set()

    def add_bytes(self, n: int) -> None:
        """Bytes examined so far (called from the sender's threads)."""
        with self._lock:
            self.bytes_done += n
            if self.total_bytes > 0:
                self.percent = min(99, self.bytes_done * 100 // self.total_bytes)
        self.changed.set()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"progress": self.percent, "message": self.message, "bytes_done": self.bytes_done}


@dataclass
class TaskEnv:
    """What tasks run against: this agent's replica store and state, its libvirt driver
    (opened on first use) and its TLS client context for replication peers."""

    store: ReplicaStore
    state_dir: Path
    driver: Callable[[], HypervisorDriver]
    client_context: Callable[[], ssl.SSLContext]
    owns: Callable[[str], bool] = field(default=lambda vm: True)
    # The bandwidth every cycle of this agent shares (the site pair's schedule; None: no limit).
    limiter: Any = None
    _vm_locks: dict[str, threading.Lock] = field(default_factory=dict, repr=False)
    _locks_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def vm_lock(self, vm: str) -> threading.Lock:
        """One cycle of a VM at a time (its own timer's and a job's final sync share it)."""
        with self._locks_lock:
            lock = self._vm_locks.get(vm)
            if lock is None:
                lock = self._vm_locks[vm] = threading.Lock()
            return lock


@dataclass(frozen=True)
class Outcome:
    ok: bool
    result: dict[str, Any]
    error: str | None = None
    error_type: str | None = None

    def body(self) -> dict[str, Any]:
        """The body of POST /agent/tasks/{id}/result."""
        d: dict[str, Any] = {"ok": self.ok, "result": self.result}
        if not self.ok:
            d["error"] = self.error
            d["error_type"] = self.error_type
        return d


# ---------------------------------------------------------------------------- helpers


def _open_disk(store: ReplicaStore, disk_id: str) -> Any:
    try:
        return store.disk(disk_id)
    except NotFound:
        return None


# ---------------------------------------------------------------------------- primary


def run_cycle(env: TaskEnv, params: Mapping[str, Any], progress: TaskProgress) -> dict[str, Any]:
    """One replication cycle of a VM to its peer (`replicate_vm`). `disk_ids` ({target:
    disk_id}) names the replica disks (default `<vm>-<target>`): a failed-over replica VM
    replicates back into the disks named after the original VM. The result carries the
    VM's definition (`domain_xml`) as of this cycle: a failover defines the replica from it."""
    from standby.agent.replicate import CycleFailed, replicate_vm
    from standby.replication.sender import Endpoint, SenderOptions

    p = parse_params(CycleParams, params)
    vm = p.vm
    if not env.owns(vm):
        raise Refused(f"VM {vm} is not in this agent's domain filter")
    endpoint = Endpoint.parse(p.peer.address)
    opts = SenderOptions(compress=p.compress_mode, timeout=p.timeout_seconds, limiter=env.limiter,
                         meta={"item_id": p.item_id} if p.item_id is not None else {})
    # What the cycle's points carry for a failover without the control plane (the VM manifest).
    recovery = {**p.recovery.model_dump(), "item_id": p.item_id}
    taken: dict[str, Any] = {}
    driver = env.driver()

    def on_session(session: Any) -> None:
        # The point holds the disks as of this moment (the checkpoint): that is its time.
        taken["at"] = time.time()
        total = 0
        for dc in session.disks:
            try:
                total += int(dc.source.total_bytes())
            except (StandbyError, OSError):
                pass
        progress.total_bytes = total
        progress.set(1, f"checkpoint {session.checkpoint or '(none)'} taken ({session.consistency}); sending")

    try:
        with env.vm_lock(vm):
            res = replicate_vm(driver, vm, endpoint, env.client_context(), env.state_dir,
                               consistency=p.consistency, options=opts, on_session=on_session,
                               disk_ids=p.disk_ids or {}, force_hash_scan=p.force_hash_scan,
                               progress=progress.add_bytes, recovery=recovery)
    except CycleFailed as exc:
        # Some disks committed: the control plane gets which, with the failure.
        exc.partial = _cycle_result(exc.result, taken.get("at"))  # type: ignore[attr-defined]
        raise
    return _cycle_result(res, taken.get("at"))


def _cycle_result(res: Any, taken_at: float | None) -> dict[str, Any]:
    out = res.as_dict()
    out["points"] = {d.disk_id: d.result.point_id for d in res.disks if d.result is not None}
    out["point_at"] = iso(taken_at) if taken_at is not None else None
    out["bytes_sent"] = sum(d.result.wire_bytes for d in res.disks if d.result is not None)
    # the VM's definition as of this cycle: a failover defines the replica from it
    out["domain_xml"] = res.manifest.domain_xml if res.manifest is not None else None
    return out


def export_source_seed(source: ChangeSource, dest: Path, disk_id: str, consistency: str,
                       created_at: float, meta: dict[str, Any]) -> tuple[Any, Any, int]:
    """Stage every data block of `source` as the first point of a scratch store beside
    `dest` and export that point as a seed directory (the format of `ReplicaStore.
    export_seed`, imported with `ReplicaStore.import_seed`). Returns (point, digest table,
    data bytes). The same steps as `seeding.export_image_seed`, from a hypervisor's
    point-in-time view instead of a raw image file."""
    from standby.replication.digest import BLOCK_SIZE, HashTable, block_digest

    size = source.size
    scratch = dest.parent / f".{dest.name}.seed-scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    table = HashTable(size)
    data_bytes = 0
    zero = bytes(BLOCK_SIZE)
    try:
        disk = ReplicaStore(scratch).create_disk(disk_id, size)
        writer = disk.begin_cycle("seed-export", None)
        reader = source.open_reader()
        try:
            for ext in source.extents():
                if ext.hole:
                    continue
                for offset in range(ext.offset, ext.end, BLOCK_SIZE):
                    length = min(BLOCK_SIZE, size - offset)
                    data = reader.pread(offset, length)
                    if data == zero[:length]:
                        continue
                    table.set(offset // BLOCK_SIZE, block_digest(data))
                    writer.write(offset, data)
                    data_bytes += length
        finally:
            reader.close()
        point = writer.commit(table.disk_digest(), consistency, created_at, meta)
        disk.export_seed(point.id, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return point, table, data_bytes


def run_seed_export(env: TaskEnv, params: Mapping[str, Any], progress: TaskProgress) -> dict[str, Any]:
    """Offline initial replication, primary side: a seed of each disk of `vm` under
    `path/<disk_id>/`, taken from one point-in-time view of the VM. The cycle's checkpoint
    becomes the VM's base and the sender state records each seed's digest table, so once
    the seeds are imported at the secondary the next cycle sends only the changes since."""
    from standby.agent.replicate import VmReplicationState, disk_id_for
    from standby.replication.protocol import CycleKind
    from standby.replication.sender import SenderState

    p = parse_params(SeedExportParams, params)
    vm = p.vm
    if not env.owns(vm):
        raise Refused(f"VM {vm} is not in this agent's domain filter")
    root = Path(p.path)
    wanted = p.disk_ids or []
    driver = env.driver()
    st = VmReplicationState.load(env.state_dir, vm)
    total = 0
    exported: dict[str, Any] = {}
    with driver.begin_cycle(vm, st.checkpoint, p.consistency) as session:
        taken_at = time.time()
        disks = [(dc, disk_id_for(vm, dc.target)) for dc in session.disks]
        unknown = set(wanted) - {d for _, d in disks}
        if unknown:
            raise NotFound(f"VM {vm} has no disk with id {', '.join(sorted(unknown))}")
        chosen = [(dc, d) for dc, d in disks if not wanted or d in wanted]
        for dc, _ in chosen:
            progress.total_bytes += dc.source.size
        for i, (dc, disk_id) in enumerate(chosen):
            dest = root / disk_id
            if dest.exists() and any(dest.iterdir()):
                raise Conflict(f"seed destination {dest} exists and is not empty")
            dest.parent.mkdir(parents=True, exist_ok=True)
            source = getattr(dc.source, "with_kind", lambda k: dc.source)(CycleKind.SEED)
            progress.set(None, f"exporting {disk_id} ({i + 1}/{len(chosen)})")
            point, table, data_bytes = export_source_seed(
                source, dest, disk_id, session.consistency, taken_at,
                {"vm": vm, "disk": dc.target, "checkpoint": session.checkpoint, "cycle_kind": "seed"})
            progress.add_bytes(source.size)
            SenderState(disk_id, source.size, point.id, table.disk_digest().hex(), None,
                        table).save(env.state_dir / "sender")
            st.points[disk_id] = point.id
            st.save()
            total += data_bytes
            exported[disk_id] = {"point": point.id, "digest": point.digest, "bytes": data_bytes,
                                 "path": str(dest)}
        if len(chosen) == len(disks):
            # Every disk has its seed: the checkpoint is the base of the first catch-up cycle.
            # With only some disks, the old base stays (its changes are a superset).
            st.checkpoint = session.checkpoint or None
            st.save()
            driver.complete_cycle(session)
    return {"bytes": total, "disks": exported, "checkpoint": session.checkpoint, "point_at": iso(taken_at)}


# ---------------------------------------------------------------------------- secondary


def run_prune(env: TaskEnv, params: Mapping[str, Any], progress: TaskProgress) -> dict[str, Any]:
    """Retention: remove the points the policy does not keep (latest, pinned and `keep` stay)."""
    from standby.domain.retention import RetentionPolicy

    p = parse_params(PruneParams, params)
    # App-consistent points are kept over the whole retention window when the policy takes
    # them at all (the reference's "app-consistent snapshot frequency"); an explicit
    # app_consistent_hours narrows that.
    app_hours = p.app_consistent_hours
    if app_hours is None and not p.app_consistent_interval_hours:
        app_hours = 0.0
    try:
        policy = RetentionPolicy(p.retention_hours or 0.0, app_hours, p.keep_all_minutes or 0.0)
    except ValueError as exc:
        raise BadInput(f"retention policy: {exc}") from None
    # `keep`: {disk_id: point_id} kept whatever the policy says (a committed failover's point).
    keep = p.keep or {}
    now = time.time()
    removed: dict[str, list[str]] = {}
    missing: list[str] = []
    for disk_id in p.disk_ids:
        disk = _open_disk(env.store, disk_id)
        if disk is None:
            missing.append(disk_id)  # not replicated yet: nothing to prune
            continue
        removed[disk_id] = disk.prune(policy, now, keep=[keep[disk_id]] if disk_id in keep else [])
    return {"removed": removed, "missing": missing}


def delete_disk(store: ReplicaStore, disk_id: str) -> bool:
    """Remove a replica disk and every point of it; False when there was none. Refused
    while a point of it is materialized (a failed-over or test VM runs on it)."""
    disk = _open_disk(store, disk_id)
    if disk is None:
        return False
    # Under the disk's lock (an flock: the receiver, another task or another process wait),
    # so no cycle commits into a directory being removed.
    with disk._locked():  # noqa: SLF001 - the store has no delete yet; its lock is the contract
        pins = disk.pinned()
        if pins:
            raise Conflict(f"replica {disk_id} has materialized point(s) "
                           f"({', '.join(f'{p} at {d}' for d, p in sorted(pins.items()))}): release them first")
        # Rename first (atomic): a crash mid-delete leaves no half disk under disks/.
        trash = store.root / f".deleted-{disk_id}-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(disk.path, trash)
    with store._lock:  # noqa: SLF001 - forget the cached handle (a new disk of that id starts clean)
        store._disks.pop(disk_id, None)  # noqa: SLF001
    shutil.rmtree(trash, ignore_errors=True)
    return True


def run_delete_replica(env: TaskEnv, params: Mapping[str, Any], progress: TaskProgress) -> dict[str, Any]:
    ids = parse_params(DiskIdsParams, params).disk_ids
    # Check every disk before removing any: a refusal leaves all of them.
    for disk_id in ids:
        disk = _open_disk(env.store, disk_id)
        if disk is not None and disk.pinned():
            pins = disk.pinned()
            raise Conflict(f"replica {disk_id} has materialized point(s) "
                           f"({', '.join(f'{p} at {d}' for d, p in sorted(pins.items()))}): release them first")
    deleted = [d for d in ids if delete_disk(env.store, d)]
    return {"deleted": deleted, "absent": [d for d in ids if d not in deleted]}


def run_list_points(env: TaskEnv, params: Mapping[str, Any], progress: TaskProgress) -> dict[str, Any]:
    ids = parse_params(DiskIdsParams, params).disk_ids
    out: dict[str, list[dict[str, Any]]] = {}
    for disk_id in ids:
        disk = _open_disk(env.store, disk_id)
        if disk is None:
            out[disk_id] = []
            continue
        pinned = set(disk.pinned().values())
        out[disk_id] = [{"id": p.id, "created_at": iso(p.created_at), "consistency": p.consistency,
                         "kind": (p.meta or {}).get("cycle_kind") or ("seed" if (p.meta or {}).get("imported_seed")
                                                                        else None),
                         "bytes_changed": p.bytes_changed, "digest": p.digest, "pinned": p.id in pinned}
                        for p in disk.points()]
    return {"points": out}


def run_seed_import(env: TaskEnv, params: Mapping[str, Any], progress: TaskProgress) -> dict[str, Any]:
    """Offline initial replication, secondary side: import `path/<disk_id>/` as each disk's
    first point (checked block by block against the seed's digest)."""
    p = parse_params(SeedImportParams, params)
    root, ids = Path(p.path), p.disk_ids
    total = 0
    imported: dict[str, Any] = {}
    for i, disk_id in enumerate(ids):
        src = root / disk_id
        if not (src / "seed.json").is_file():
            raise NotFound(f"no seed of disk {disk_id} at {src} (seed.json missing)")
        disk = _open_disk(env.store, disk_id)
        if disk is not None and disk.latest() is not None:
            latest = disk.latest()
            from standby.replication.store import read_seed_info

            if latest.digest == read_seed_info(src)["digest"]:
                # Imported by an earlier attempt of this task: done.
                imported[disk_id] = {"point": latest.id, "digest": latest.digest, "bytes": latest.bytes_changed}
                total += latest.bytes_changed
                continue
        progress.set(i * 100 // len(ids), f"importing {disk_id} ({i + 1}/{len(ids)})")
        point = env.store.import_seed(src, disk_id)
        imported[disk_id] = {"point": point.id, "digest": point.digest, "bytes": point.bytes_changed}
        total += point.bytes_changed
    return {"bytes": total, "disks": imported}


# ---------------------------------------------------------------------------- dispatch

TaskFn = Callable[[TaskEnv, Mapping[str, Any], TaskProgress], dict[str, Any]]

DISPATCH: dict[str, TaskFn] = {
    "cycle": run_cycle,
    "prune": run_prune,
    "delete_replica": run_delete_replica,
    "list_points": run_list_points,
    "seed_export": run_seed_export,
    "seed_import": run_seed_import,
    **RECOVERY_TASKS,
}


def execute(env: TaskEnv, task: Mapping[str, Any], progress: TaskProgress | None = None) -> Outcome:
    """Run one task (`{id, kind, params, ...}` as claimed) and say how it ended. Never raises
    for the task's own failure: that is the outcome."""
    progress = progress or TaskProgress()
    kind = task.get("kind")
    params = task.get("params") or {}
    fn = DISPATCH.get(kind) if isinstance(kind, str) else None
    if fn is None:
        return Outcome(False, {}, f"this agent does not know task kind {kind!r} (known: {', '.join(DISPATCH)})",
                       BadInput.__name__)
    if not isinstance(params, Mapping):
        return Outcome(False, {}, f"task parameters must be an object, not {type(params).__name__}",
                       BadInput.__name__)
    try:
        return Outcome(True, fn(env, params, progress))
    except StandbyError as exc:
        partial = getattr(exc, "partial", None)
        return Outcome(False, partial if isinstance(partial, dict) else {}, exc.message, type(exc).__name__)
    except Exception as exc:  # noqa: BLE001 - a bug in a task must not end the agent
        log.exception("task %s (%s) failed unexpectedly", task.get("id"), kind)
        return Outcome(False, {}, f"{type(exc).__name__}: {exc}", type(exc).__name__)
