"""Point-in-time NBD exports of a VM's disks: a libvirt pull-mode backup for a running
VM, `qemu-nbd -r` for a powered-off one.

Running VM: `backupBegin(backup_xml, checkpoint_xml)` creates the new checkpoint and
starts the backup job atomically; QEMU serves every disk over NBD on a unix socket
(export name = the disk's target), copying a block's old content to a scratch image
before the guest overwrites it, so the export stays the disk as of the checkpoint while
the guest keeps writing. Each disk is either `incremental` from the base checkpoint
(the export then carries `qemu:dirty-bitmap:backup-<target>`) or `full`. `stop()` ends
the job (`abortJob`; there is nothing to "finish" in pull mode).

Powered-off VM: libvirt 9.0 cannot create checkpoints of an inactive domain, so the new
checkpoint is made by hand: `qemu-img bitmap --add --enable` in each qcow2 image, then
the checkpoint metadata `REDEFINE`d. Each disk is served by `qemu-nbd -r` (which takes
the image's lock: the VM cannot start and write while the cycle reads, so the view is
consistent); an incremental disk exports the base checkpoint's bitmap (`-B`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from standby.errors import Conflict, RemoteError
from standby.drivers.libvirt.nbd import NbdExport
from standby.drivers.libvirt.tracking import DomainDisk


@dataclass
class DiskPlan:
    disk: DomainDisk
    size: int
    incremental: bool  # read the changes since the base checkpoint
    reason: str | None  # why not incremental
    tracked: bool  # the new checkpoint gets a bitmap in this disk (qcow2)


def backup_xml(socket: str, plans: list[DiskPlan], base: str | None, scratch_dir: Path,
               skip: Sequence[str] = ()) -> str:
    """A pull-mode backup over a unix socket, per disk incremental from `base` or full;
    the disks in `skip` (not replicated: CD-ROMs, read-only, network) left out."""
    root = ET.Element("domainbackup", {"mode": "pull"})
    ET.SubElement(root, "server", {"transport": "unix", "socket": socket})
    disks = ET.SubElement(root, "disks")
    for p in plans:
        attrs = {"name": p.disk.target, "backup": "yes", "type": "file"}
        if p.incremental and base:
            attrs.update({"backupmode": "incremental", "incremental": base})
        else:
            attrs["backupmode"] = "full"
        d = ET.SubElement(disks, "disk", attrs)
        ET.SubElement(d, "scratch", {"file": str(scratch_dir / f"scratch-{p.disk.target}.qcow2")})
    for target in skip:
        ET.SubElement(disks, "disk", {"name": target, "backup": "no"})
    return ET.tostring(root, encoding="unicode")


def short_run_dir(prefix: str = "sbnbd-") -> Path:
    """A private directory for NBD sockets: unix socket paths are limited to 107 bytes."""
    base = "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


@dataclass
class Exports:
    """The running exports of one cycle; `stop()` ends them (idempotent)."""

    by_target: dict[str, NbdExport]
    run_dir: Path
    dom: Any = None  # online: the domain whose backup job to end
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    scratch_dir: Path | None = None
    stopped: bool = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.dom is not None:
            _end_job(self.dom)
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stderr is not None:
                p.stderr.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.scratch_dir is not None:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)


def _end_job(dom: Any) -> None:
    import libvirt

    try:
        if dom.isActive():
            dom.abortJob()
    except libvirt.libvirtError:
        pass  # no job (the VM stopped, or the job failed): nothing to end


def start_online(dom: Any, vm: str, plans: list[DiskPlan], base: str | None, checkpoint: str | None,
                 scratch_root: Path, skip: Sequence[str] = ()) -> Exports:
    """Begin the pull-mode backup (and create `checkpoint` with it). The caller holds
    the guest frozen around this call for an app-consistent point."""
    import libvirt

    from standby.drivers.libvirt.tracking import checkpoint_xml

    run_dir = short_run_dir()
    scratch_dir = Path(tempfile.mkdtemp(prefix=f"{vm[:40]}-", dir=scratch_root))
    sock = str(run_dir / "nbd.sock")
    tracked = {p.disk.target: p.tracked for p in plans} | {t: False for t in skip}
    cp_xml = checkpoint_xml(checkpoint, tracked) if checkpoint else None
    try:
        dom.backupBegin(backup_xml(sock, plans, base, scratch_dir, skip), cp_xml, 0)
    except libvirt.libvirtError as exc:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(scratch_dir, ignore_errors=True)
        raise exc
    exports = Exports({}, run_dir, dom=dom, scratch_dir=scratch_dir)
    try:
        desc = ET.fromstring(dom.backupGetXMLDesc(0))
        for d in desc.findall("./disks/disk"):
            if d.get("backup") != "yes":
                continue
            target = d.get("name", "")
            bitmap = d.get("exportbitmap")
            exports.by_target[target] = NbdExport(sock, d.get("exportname") or target,
                                                  f"qemu:dirty-bitmap:{bitmap}" if bitmap else None,
                                                  f"VM {vm} disk {target}")
    except BaseException:
        exports.stop()
        raise
    return exports


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise RemoteError(f"qemu-nbd for {what} exited ({proc.returncode}): {err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RemoteError(f"qemu-nbd for {what} did not open its socket within {timeout:.0f} s")
        time.sleep(0.02)


def start_offline(vm: str, plans: list[DiskPlan], base: str | None) -> Exports:
    """Serve each disk of a powered-off VM read-only with qemu-nbd (the base checkpoint's
    bitmap exported for the incremental disks)."""
    run_dir = short_run_dir()
    exports = Exports({}, run_dir)
    try:
        for p in plans:
            sock = run_dir / f"{p.disk.target}.sock"
            cmd = ["qemu-nbd", "--read-only", "--persistent", "--shared=64", "--format", p.disk.format,
                   "--socket", str(sock), "--export-name", p.disk.target]
            ctx = None
            if p.incremental and base:
                cmd += ["--bitmap", base]
                ctx = f"qemu:dirty-bitmap:{base}"
            assert p.disk.path is not None
            cmd.append(p.disk.path)
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            exports.procs.append(proc)
            what = f"VM {vm} disk {p.disk.target}"
            _wait_socket(sock, proc, what)
            exports.by_target[p.disk.target] = NbdExport(str(sock), p.disk.target, ctx, what)
    except BaseException:
        exports.stop()
        raise
    return exports


def add_bitmap(path: str, name: str) -> None:
    r = subprocess.run(["qemu-img", "bitmap", "--add", "--enable", path, name], capture_output=True, text=True)
    if r.returncode != 0:
        raise RemoteError(f"qemu-img bitmap --add {name} on {path} failed: {r.stderr.strip()}")


def remove_bitmap(path: str, name: str) -> bool:
    """Remove a bitmap from an image not in use (also an inconsistent one); False when
    it could not be removed (missing, or the image is in use)."""
    r = subprocess.run(["qemu-img", "bitmap", "--remove", path, name], capture_output=True, text=True)
    return r.returncode == 0


def image_format(path: str) -> tuple[str, int]:
    """(format, virtual size) of a disk image, by `qemu-img info`. The image must not be
    in use: qemu-img takes its lock, and a running VM's writable image refuses it."""
    r = subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True, text=True)
    if r.returncode != 0:
        err = r.stderr.strip()
        if "lock" in err:
            raise Conflict(f"disk image {path} is in use (a running VM?): {err}")
        raise RemoteError(f"qemu-img info {path} failed: {err}")
    info = json.loads(r.stdout)
    return str(info["format"]), int(info["virtual-size"])


def serve_image(path: str, fmt: str, what: str) -> Exports:
    """Serve one image not in use read-only with qemu-nbd (export name "image"); `stop()`
    ends it. The export's block status gives its zero ranges."""
    disk = DomainDisk(target="image", path=path, format=fmt, source_type="file", device="disk", readonly=True)
    return start_offline(what, [DiskPlan(disk, 0, False, None, False)], None)
