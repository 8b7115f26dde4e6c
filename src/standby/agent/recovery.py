"""The agent's recovery tasks (docs/recovery.md, "Wiring"): recovery points as overlays,
replica VMs and test networks, and a VM's disk images taken into or written back from
the replica store.

Parameters are `standby.contract`'s models (the control plane builds them from the same):

| kind | params | result |
| --- | --- | --- |
| materialize | `MaterializeParams` | `{overlays: {target: path}, points: {disk_id: point_id}, tag, purpose}` |
| release | `ReleaseParams` | `{released: [overlay paths], points: {disk_id: point_id}}` |
| define_vm | `DefineVmParams` | `{name, uuid, power_state, existed}` |
| start_vm | `StartVmParams` | `{power_state, was_running}` |
| stop_vm | `StopVmParams` | `{power_state, forced, was_running, autostart_was?}` |
| undefine_vm | `VmParams` | `{power_state: "absent", removed}` |
| create_network | `NamedParams` | `{name, attach}` |
| delete_network | `NamedParams` | `{name, removed}` |
| adopt_disk | `AdoptDiskParams` | `{point_id, bytes, digest, blocks_changed, reused, size, format}` |
| restore_disk | `RestoreDiskParams` | `{bytes, point_id, digest, format, size}` |

Overlays live in `<replica store>/overlays/<tag>/<target>.qcow2` beside the tag's
manifest (`materialized.json`, written before any point is pinned), so a `release` of
the tag finds every overlay and pin even after a crash in the middle of `materialize`.

Every task is idempotent, because a restarted agent gets its claimed, unfinished tasks
again: a materialize of a tag already made returns the same overlays (pinned to the same
points); a release of a tag that is gone releases nothing; define_vm keeps an existing
domain of that name when it has the same disks; stop_vm and undefine_vm of a VM that is
off or gone succeed; networks are created and deleted idempotently; adopt_disk of an
image the replica already holds adds no point; restore_disk writes the same content
again. A VM task refuses a domain outside the agent's domain filter (two agents may
share one libvirtd: neither touches the other's VMs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from standby.contract import (AdoptDiskParams, DefineVmParams, MaterializeParams, NamedParams, ReleaseParams,
                              RestoreDiskParams, StartVmParams, StopVmParams, VmParams, parse_params)
from standby.errors import BadInput, Conflict, NotFound, Refused, RemoteError

if TYPE_CHECKING:
    from standby.agent.tasks import TaskEnv, TaskProgress
    from standby.drivers.base import VmInfo
    from standby.replication.store import DiskReplica

MANIFEST = "materialized.json"
MANIFEST_FORMAT = "standby-materialized/1"

# Materialize and release of one agent run one at a time (two workers): a tag's manifest,
# overlays and pins change together.
_OVERLAYS_LOCK = threading.Lock()


# ---------------------------------------------------------------------------- helpers


def overlays_root(env: TaskEnv) -> Path:
    return env.store.root / "overlays"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        d = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RemoteError(f"{root / MANIFEST}: unreadable ({exc})") from None
    if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT or not isinstance(d.get("disks"), dict):
        raise RemoteError(f"{root / MANIFEST}: not a manifest of format {MANIFEST_FORMAT}")
    return d


def _image(path: str) -> Path:
    p = Path(path)
    if not p.is_file() and not p.is_block_device():
        raise NotFound(f"disk image {path} does not exist")
    return p


def _replica(env: TaskEnv, disk_id: str) -> DiskReplica:
    return env.store.disk(disk_id)  # NotFound: no replica of that disk here


def _owned(env: TaskEnv, name: str) -> str:
    if not env.owns(name):
        raise Refused(f"VM {name} is not in this agent's domain filter")
    return name


def _find_vm(env: TaskEnv, name: str) -> VmInfo | None:
    try:
        return env.driver().vm(name)
    except NotFound:
        return None


def _users_of(env: TaskEnv, paths: set[str], *, under: Path | None = None) -> list[str]:
    """Domains of this libvirt host (any agent's) with a disk at one of `paths` or under `under`."""
    users = []
    for vm in env.driver().list_vms():
        for d in vm.disks:
            p = os.path.abspath(d.path)
            if p in paths or (under is not None and Path(p).is_relative_to(under)):
                users.append(vm.name)
                break
    return users


def _net_driver(env: TaskEnv) -> Any:
    drv = env.driver()
    if not all(hasattr(drv, m) for m in ("create_network", "delete_network", "isolated_attachment")):
        raise Refused(f"this agent's hypervisor driver ({type(drv).__name__}) does not manage networks")
    return drv


# ---------------------------------------------------------------------------- points as overlays


def run_materialize(env: TaskEnv, params: Mapping[str, Any], progress: TaskProgress) -> dict[str, Any]:
    """A writable qcow2 overlay per disk over the chosen recovery points (pinned)."""
    p = parse_params(MaterializeParams, params)
    tag, vm, disks, purpose, points_in = p.tag, p.vm, p.disk_ids, p.purpose, p.point or {}
    root = overlays_root(env) / tag
    with _OVERLAYS_LOCK:
        manifest = _read_manifest(root)
        if manifest is None:
            entries: dict[str, dict[str, str]] = {}
            for target, disk_id in sorted(disks.items()):
                disk = _replica(env, disk_id)
                pid = points_in.get(disk_id)
                if pid is None:
                    latest = disk.latest()
                    if latest is None:
                        raise NotFound(f"replica {disk_id} has no recovery point yet")
                    pid = latest.id
                else:
                    disk.point(pid)  # NotFound when the point is not (or no longer) retained
                entries[target] = {"disk_id": disk_id, "point": pid, "path": str(root / f"{target}.qcow2")}
            # The manifest first: a release finds the pins of a materialize that died midway.
            manifest = {"format": MANIFEST_FORMAT, "tag": tag, "vm": vm, "purpose": purpose,
                        "created_at": time.time(), "disks": entries}
            _write_json(root / MANIFEST, manifest)
        else:
            have = {t: e["disk_id"] for t, e in manifest["disks"].items()}
            chosen = {e["disk_id"]: e["point"] for e in manifest["disks"].values()}
            if have != disks or manifest.get("vm") != vm or manifest.get("purpose") != purpose or \
                    any(chosen.get(d) != p for d, p in points_in.items()):
                raise Conflict(f"tag {tag} is already materialized for VM {manifest.get('vm')} "
                               f"({manifest.get('purpose')}) at {chosen}; release it first")
        for i, (target, e) in enumerate(sorted(manifest["disks"].items())):
            progress.set(i * 100 // len(manifest["disks"]), f"overlay of {e['disk_id']} at point {e['point']}")
            _ensure_overlay(_replica(env, e["disk_id"]), e["point"], Path(e["path"]))
    return {"overlays": {t: e["path"] for t, e in sorted(manifest["disks"].items())},
            "points": {e["disk_id"]: e["point"] for e in manifest["disks"].values()},
            "tag": tag, "purpose": purpose}


def _ensure_overlay(disk: DiskReplica, point: str, path: Path) -> None:
    pinned = disk.pinned().get(str(path))
    if pinned is not None and pinned != point:
        raise Conflict(f"{path} is the overlay of point {pinned} of {disk.disk_id}, not of {point}")
    if path.exists():
        if pinned is None:
            # The store pins before it creates, and a release deletes before it unpins:
            # an unpinned overlay here was not made by this agent.
            raise Conflict(f"{path} exists and is not a materialized overlay of {disk.disk_id}")
        return  # made by an earlier attempt (it may hold a test VM's writes: kept)
    disk.materialize(point, path)  # also repairs a pin whose overlay was never created


def run_release(env: TaskEnv, params: Mapping[str, Any], progress: TaskProgress) -> dict[str, Any]:
    """Delete a tag's overlays and drop their pins; refused while a VM uses one of them."""
    tag = parse_params(ReleaseParams, params).tag
    root = overlays_root(env) / tag
    with _OVERLAYS_LOCK:
        if not root.exists():
            return {"released": [], "points": {}}
        users = _users_of(env, set(), under=root.absolute())
        if users:
            raise Conflict(f"the overlays of {tag} are the disks of VM {', '.join(users)}: remove the VM first")
        manifest = _read_manifest(root)
        released: list[str] = []
        points: dict[str, str] = {}
        for e in (manifest or {}).get("disks", {}).values():
            path = Path(e["path"])
            # Delete, then unpin: a pin without its overlay is harmless, the reverse is not.
            if path.exists():
                path.unlink()
                released.append(str(path))
            try:
                _replica(env, e["disk_id"]).release(path)
                points[e["disk_id"]] = e["point"]
            except NotFound:
                pass  # the pin is gone (an earlier attempt), or the replica was deleted
        (root / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)  # console logs of VMs that ran on the overlays
    return {"released": sorted(released), "points": points}


# ---------------------------------------------------------------------------- VMs


def _nic_count(template: str | None) -> int:
    if not template:
        return 0
    try:
        root = ET.fromstring(template)
    except ET.ParseError as exc:
        raise BadInput(f"task parameter 'template_xml' is not well-formed XML ({exc})") from None
    return len(root.findall("./devices/interface"))


def run_define_vm(env: TaskEnv, params: Mapping[str, Any], progress: TaskProgress) -> dict[str, Any]:
    """Define (not start) a VM on the given disk images, shaped like `template_xml`."""
    from standby.drivers.base import VmSpec

    p = parse_params(DefineVmParams, params)
    name, template, isolated = _owned(env, p.name), p.template_xml, p.isolated_network
    disks = {t: os.path.abspath(path) for t, path in p.disks.items()}
    networks: list[str | None] = p.networks or []
    nics = _nic_count(template)
    drv = env.driver()
    existing = _find_vm(env, name)
    if existing is not None:
        have = {d.target: os.path.abspath(d.path) for d in existing.disks}
        if have != disks:
            raise Conflict(f"a VM named {name} already exists here with other disks ({have})")
        return {"name": existing.name, "uuid": existing.uuid, "power_state": existing.state.value, "existed": True}
    if isolated is not None:
        # A test VM: every NIC on the isolated network (as created: a libvirt network or its bridge).
        att = drv.isolated_attachment(isolated) if hasattr(drv, "isolated_attachment") else isolated
        networks = [att] * max(len(networks), nics)
    info = drv.define_vm(VmSpec(name=name, disks={t: Path(p) for t, p in disks.items()}, networks=list(networks),
                                template_xml=template))
    return {"name": info.name, "uuid": info.uuid, "power_state": info.state.value, "existed": False}


def run_start_vm(env: TaskEnv, params: Mapping[str, Any], progress: TaskProgress) -> dict[str, Any]:
    from standby.drivers.base import VmState

    # timeout_seconds is accepted for symmetry: libvirt's start returns once QEMU runs
    p = parse_params(StartVmParams, params)
    name, autostart = _owned(env, p.name), p.autostart
    info = _find_vm(env, name)
    if info is None:
        raise NotFound(f"no VM named {name} on this host")
    if autostart:
        env.driver().set_autostart(name, True)
    if info.state in (VmState.RUNNING, VmState.PAUSED):
        return {"power_state": info.state.value, "was_running": True}
    env.driver().start_vm(name)
    return {"power_state": env.driver().vm(name).state.value, "was_running": False}


def run_stop_vm(env: TaskEnv, params: Mapping[str, Any], progress: TaskProgress) -> dict[str, Any]:
    """Graceful shutdown (ACPI), powered off at `timeout_seconds`; `force`: power off now."""
    from standby.drivers.base import VmState

    p = parse_params(StopVmParams, params)
    name, timeout, force, no_autostart = _owned(env, p.name), p.timeout_seconds, p.force, p.disable_autostart
    info = _find_vm(env, name)
    if info is None:
        return {"power_state": "absent", "forced": False, "was_running": False}
    drv = env.driver()
    autostart_was = drv.set_autostart(name, False) if no_autostart else None
    extra = {"autostart_was": autostart_was} if no_autostart else {}
    if info.state not in (VmState.RUNNING, VmState.PAUSED, VmState.OTHER):
        return {"power_state": info.state.value, "forced": False, "was_running": False, **extra}
    if force or timeout == 0:
        drv.destroy_vm(name)
        forced = True
    else:
        progress.set(None, f"shutting down {name} (powered off after {timeout:g} s)")
        forced = drv.shutdown_vm(name, timeout) is False
    return {"power_state": drv.vm(name).state.value, "forced": forced, "was_running": True, **extra}


def run_undefine_vm(env: TaskEnv, params: Mapping[str, Any], progress: TaskProgress) -> dict[str, Any]:
    """Remove a stopped VM's definition (its disk images stay); a running VM is refused."""
    name = _owned(env, parse_params(VmParams, params).name)
    if _find_vm(env, name) is None:
        return {"power_state": "absent", "removed": False}
    try:
        env.driver().undefine_vm(name)  # Conflict while it runs
    except NotFound:
        return {"power_state": "absent", "removed": False}  # removed meanwhile
    return {"power_state": "absent", "removed": True}


# ---------------------------------------------------------------------------- networks


def run_create_network(env: TaskEnv, params: Mapping[str, Any], progress: TaskProgress) -> dict[str, Any]:
    """An isolated network (no uplink, no DHCP) for test VMs; idempotent."""
    name = parse_params(NamedParams, params).name
    return {"name": name, "attach": _net_driver(env).create_network(name)}


def run_delete_network(env: TaskEnv, params: Mapping[str, Any], progress: TaskProgress) -> dict[str, Any]:
    """Remove an isolated network Standby made; refused while a defined VM is attached."""
    from standby.drivers.libvirt.domains import bridge_name_for

    name = parse_params(NamedParams, params).name
    drv = _net_driver(env)
    on = {name, bridge_name_for(name)}
    users = sorted(vm.name for vm in drv.list_vms() if any(n.network in on for n in vm.nics))
    if users:
        raise Conflict(f"network {name} is attached to VM {', '.join(users)}: remove the VM first")
    return {"name": name, "removed": bool(drv.delete_network(name))}


# ---------------------------------------------------------------------------- disk images


def run_adopt_disk(env: TaskEnv, params: Mapping[str, Any], progress: TaskProgress) -> dict[str, Any]:
    """The image's content becomes the latest point of replica `disk_id` (created when
    missing), staging only the blocks that differ from its latest point: the base a
    hash-scan cycle compares against, so a reverse replication sends only what differs."""
    from standby.drivers.libvirt.backup import image_format, serve_image
    from standby.drivers.libvirt.nbd import NbdChangeSource
    from standby.replication.protocol import CycleKind
    from standby.replication.seeding import adopt_source

    p = parse_params(AdoptDiskParams, params)
    disk_id, image = p.disk_id, _image(p.image)
    fmt, size = image_format(str(image))  # Conflict when a running VM holds the image
    progress.total_bytes = size
    progress.set(0, f"reading {image} ({fmt}) into replica {disk_id}")
    exports = serve_image(str(image), fmt, f"image {image}")
    try:
        source = NbdChangeSource.open(exports.by_target["image"], CycleKind.HASH_SCAN, False)
        out = adopt_source(env.store, disk_id, source, meta={"adopted_from": str(image), "format": fmt},
                           progress=progress.add_bytes)
    finally:
        exports.stop()
    return {"point_id": out["point"], "bytes": out["bytes"], "digest": out["digest"],
            "blocks_changed": out["blocks_changed"], "reused": out["reused"], "size": out["size"], "format": fmt}


def _data_bytes(image: Path) -> int:
    r = subprocess.run(["qemu-img", "map", "--output=json", str(image)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RemoteError(f"qemu-img map {image} failed: {r.stderr.strip()}")
    return sum(int(e["length"]) for e in json.loads(r.stdout) if e.get("data"))


def run_restore_disk(env: TaskEnv, params: Mapping[str, Any], progress: TaskProgress) -> dict[str, Any]:
    """Write a point of replica `disk_id` (default its latest) over a VM's disk image in
    place, keeping the image's format (and its file, so the VM definition still fits).
    The VM must be off."""
    from standby.drivers.libvirt.backup import image_format

    p = parse_params(RestoreDiskParams, params)
    disk_id, image, pid = p.disk_id, _image(p.image), p.point
    disk = _replica(env, disk_id)
    point = disk.point(pid) if pid else disk.latest()
    if point is None:
        raise NotFound(f"replica {disk_id} has no recovery point yet")
    users = _users_of(env, {os.path.abspath(image)})
    running = [n for n in users if env.driver().vm(n).state.value in ("running", "paused")]
    if running:
        raise Conflict(f"disk image {image} belongs to running VM {', '.join(running)}: stop it first")
    fmt, size = image_format(str(image))  # Conflict when something else holds its lock
    want = disk.point_size(point)
    if size != want:
        raise Conflict(f"disk image {image} is {size} bytes, point {point.id} of {disk_id} is {want}")
    # A fixed overlay per disk: one left by a crashed attempt is found and replaced.
    tmp = overlays_root(env) / ".restore" / f"{disk_id}.qcow2"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    _drop_overlay(disk, tmp)
    progress.set(1, f"writing point {point.id} of {disk_id} into {image} ({fmt})")
    disk.materialize(point.id, tmp)
    try:
        data = _data_bytes(tmp)
        # -n: write into the existing image (its format, file and bitmaps kept); the zero
        # areas of the point are written as zeros, so no old data survives.
        r = subprocess.run(["qemu-img", "convert", "-n", "-f", "qcow2", "-O", fmt, str(tmp), str(image)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            err = r.stderr.strip()
            if "lock" in err:
                raise Conflict(f"disk image {image} is in use: {err}")
            raise RemoteError(f"qemu-img convert of point {point.id} into {image} failed: {err}")
    finally:
        _drop_overlay(disk, tmp)
    return {"bytes": data, "point_id": point.id, "digest": point.digest, "format": fmt, "size": size}


def _drop_overlay(disk: DiskReplica, path: Path) -> None:
    path.unlink(missing_ok=True)
    try:
        disk.release(path)
    except NotFound:
        pass


RECOVERY_TASKS = {
    "materialize": run_materialize,
    "release": run_release,
    "define_vm": run_define_vm,
    "start_vm": run_start_vm,
    "stop_vm": run_stop_vm,
    "undefine_vm": run_undefine_vm,
    "create_network": run_create_network,
    "delete_network": run_delete_network,
    "adopt_disk": run_adopt_disk,
    "restore_disk": run_restore_disk,
}
