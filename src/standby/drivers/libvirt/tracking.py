"""Changed-block tracking bookkeeping: checkpoints, their bitmaps, and when to distrust them.

Every replication cycle of a VM creates a libvirt checkpoint `standby-<seq>`: one
persistent QEMU dirty bitmap of the same name in each qcow2 disk. Libvirt (>= 6.10) keeps
every checkpoint's bitmap recording, so the bitmap of checkpoint N holds all writes since
N; the next cycle reads the changes since the checkpoint the replica's latest point was
taken at (its *base*). After the secondary commits the point, the new checkpoint becomes
the base and older ones are deleted (one bitmap per disk remains).

What can break the chain, and how it shows (measured on libvirt 9.0 / QEMU 7.2):

- VM killed or crashed (QEMU gone without closing the image): a bitmap already stored
  in the qcow2 stays flagged `in-use` (`qemu-img info`), and QEMU loads it as
  `inconsistent` (query-block); a bitmap created during that QEMU run was never stored
  and is missing. libvirt then refuses an incremental backup from it.
- Checkpoint metadata lost (transient domain, domain re-defined, libvirt state lost)
  while the bitmap sits intact in the qcow2: redefined from the XML saved here
  (`checkpointCreateXML(..., REDEFINE)`; libvirt needs `creationTime` and a parent that
  exists, so the saved XML is redefined without `<parent>`).
- Disk resized (libvirt `blockResize`): the bitmap keeps recording, the grown area is not
  marked dirty: detected by comparing the disk size with the size at the checkpoint.
- Disk added, image replaced, bitmap disabled (edited offline with recording off),
  raw image (no persistent bitmaps at all): no bitmap, wrong path, not recording.

Each of those makes that one disk's next cycle a hash scan of its point-in-time view
(`assess_disk` says why); the VM's other disks stay incremental.

The tracking state (one JSON file per VM under the driver's state directory) keeps, per
checkpoint Standby created, its libvirt XML and each disk's path, size and bitmap.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from standby.errors import BadInput, RemoteError

PREFIX = "standby-"
_SEQ = re.compile(r"^standby-(\d+)$")


def checkpoint_name(seq: int) -> str:
    return f"{PREFIX}{seq}"


def checkpoint_seq(name: str) -> int | None:
    m = _SEQ.match(name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------- domain XML


@dataclass(frozen=True)
class DomainDisk:
    target: str
    path: str | None
    format: str
    source_type: str  # file, block, network, volume
    device: str  # disk, cdrom, floppy, lun
    readonly: bool
    alias: str | None = None

    @property
    def protected(self) -> bool:
        """Whether Standby replicates this disk: a writable disk with a local source."""
        return self.device == "disk" and not self.readonly and bool(self.path) and self.source_type in ("file", "block")

    @property
    def has_bitmaps(self) -> bool:
        return self.format == "qcow2"


def _xml(text: str, what: str) -> ET.Element:
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise BadInput(f"{what}: not valid XML: {exc}") from None


def domain_disks(xml: str) -> list[DomainDisk]:
    root = _xml(xml, "domain XML")
    out = []
    for d in root.findall("./devices/disk"):
        target = d.find("target")
        if target is None or not target.get("dev"):
            continue
        src = d.find("source")
        path = None
        if src is not None:
            path = src.get("file") or src.get("dev") or src.get("name")
        drv = d.find("driver")
        alias = d.find("alias")
        out.append(DomainDisk(
            target=target.get("dev", ""), path=path, format=(drv.get("type") if drv is not None else None) or "raw",
            source_type=d.get("type", "file"), device=d.get("device", "disk"), readonly=d.find("readonly") is not None,
            alias=alias.get("name") if alias is not None else None))
    return out


def agent_channel_state(xml: str) -> str | None:
    """None when the domain has no QEMU guest agent channel, else its state as libvirt
    reports it on a running domain ("connected", "disconnected"; "" when not reported)."""
    root = _xml(xml, "domain XML")
    for ch in root.findall("./devices/channel"):
        t = ch.find("target")
        if t is not None and t.get("name") == "org.qemu.guest_agent.0":
            return t.get("state", "")
    return None


# ---------------------------------------------------------------------------- bitmaps


@dataclass(frozen=True)
class BitmapInfo:
    name: str
    consistent: bool
    recording: bool
    granularity: int = 0


@dataclass
class ImageBitmaps:
    """What one disk image holds: its virtual size and its persistent bitmaps."""

    size: int
    bitmaps: dict[str, BitmapInfo] = field(default_factory=dict)


def parse_image_info(info: dict[str, Any]) -> ImageBitmaps:
    """From `qemu-img info --output=json` (an image not in use by a running VM)."""
    data = (info.get("format-specific") or {}).get("data") or {}
    maps = {}
    for b in data.get("bitmaps") or []:
        flags = b.get("flags") or []
        maps[b["name"]] = BitmapInfo(b["name"], "in-use" not in flags, "auto" in flags, int(b.get("granularity", 0)))
    return ImageBitmaps(int(info.get("virtual-size", 0)), maps)


def parse_query_block(reply: dict[str, Any], disks: list[DomainDisk]) -> dict[str, ImageBitmaps]:
    """From QMP `query-block` on a running VM, per disk target (matched by the device
    alias in qdev, else by the image's file name)."""
    out: dict[str, ImageBitmaps] = {}
    for entry in reply.get("return", []):
        inserted = entry.get("inserted")
        if not inserted:
            continue
        qdev = entry.get("qdev", "") or ""
        image = inserted.get("image") or {}
        target = None
        for d in disks:
            if d.alias and (qdev == d.alias or f"/{d.alias}/" in qdev or qdev.endswith(f"/{d.alias}")):
                target = d.target
                break
        if target is None:
            fname = inserted.get("file") or image.get("filename")
            target = next((d.target for d in disks if d.path and d.path == fname), None)
        if target is None:
            continue
        maps = {}
        for b in inserted.get("dirty-bitmaps") or []:
            if not b.get("persistent", True):
                continue
            maps[b["name"]] = BitmapInfo(b["name"], not b.get("inconsistent", False), bool(b.get("recording", False)),
                                         int(b.get("granularity", 0)))
        out[target] = ImageBitmaps(int(image.get("virtual-size", 0)), maps)
    return out


def image_bitmaps(path: str, fmt: str = "qcow2") -> ImageBitmaps:
    """The bitmaps stored in an image file (not opened by a running VM; -U so that a
    VM starting meanwhile is not blocked)."""
    r = subprocess.run(["qemu-img", "info", "-U", "--output=json", "-f", fmt, path], capture_output=True, text=True)
    if r.returncode != 0:
        raise RemoteError(f"qemu-img info {path} failed: {r.stderr.strip()}")
    return parse_image_info(json.loads(r.stdout))


def running_bitmaps(dom: Any, disks: list[DomainDisk]) -> dict[str, ImageBitmaps]:
    """The bitmaps QEMU has loaded for a running domain's disks (read-only QMP query;
    libvirt logs the domain as tainted by a monitor command)."""
    import libvirt
    import libvirt_qemu

    try:
        raw = libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-block"}', 0)
    except libvirt.libvirtError as exc:
        raise RemoteError(f"query-block on {dom.name()} failed: {exc.get_error_message() or exc}") from None
    return parse_query_block(json.loads(raw), disks)


# ---------------------------------------------------------------------------- state


@dataclass
class DiskRecord:
    target: str
    path: str
    format: str
    size: int
    bitmap: str | None  # None: this disk is not tracked by the checkpoint (raw image)


@dataclass
class CheckpointRecord:
    name: str
    seq: int
    created_at: float
    xml: str  # for REDEFINE
    disks: dict[str, DiskRecord]
    consistency: str = "crash"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["disks"] = {t: asdict(r) for t, r in self.disks.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CheckpointRecord:
        return cls(d["name"], int(d["seq"]), float(d["created_at"]), d["xml"],
                   {t: DiskRecord(**r) for t, r in d["disks"].items()}, d.get("consistency", "crash"))


@dataclass
class TrackingState:
    """One VM's checkpoints as Standby knows them (`<state_dir>/<uuid>.json`)."""

    path: Path
    vm: str
    uuid: str
    seq: int = 0
    committed: CheckpointRecord | None = None
    pending: dict[str, CheckpointRecord] = field(default_factory=dict)

    @classmethod
    def load(cls, state_dir: Path, vm: str, uuid: str) -> TrackingState:
        path = state_dir / f"{uuid}.json"
        st = cls(path, vm, uuid)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            return st
        except (OSError, ValueError) as exc:
            raise BadInput(f"tracking state {path} is unreadable ({exc}); move it away to start over "
                           "(the next cycle then hash-scans every disk)") from None
        st.seq = int(d.get("seq", 0))
        if d.get("committed"):
            st.committed = CheckpointRecord.from_json(d["committed"])
        st.pending = {n: CheckpointRecord.from_json(r) for n, r in (d.get("pending") or {}).items()}
        return st

    def record(self, name: str) -> CheckpointRecord | None:
        if self.committed is not None and self.committed.name == name:
            return self.committed
        return self.pending.get(name)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        body = {"vm": self.vm, "uuid": self.uuid, "seq": self.seq, "saved_at": time.time(),
                "committed": self.committed.to_json() if self.committed else None,
                "pending": {n: r.to_json() for n, r in self.pending.items()}}
        with open(tmp, "w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


@contextmanager
def vm_lock(state_dir: Path, uuid: str) -> Iterator[None]:
    """One cycle of a VM at a time on this host (an flock on `<uuid>.lock`)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / f"{uuid}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            from standby.errors import Conflict

            raise Conflict(f"a replication cycle of VM {uuid} is already running on this host") from None
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- decisions


def assess_disk(disk: DomainDisk, size: int, base: CheckpointRecord | None,
                image: ImageBitmaps | None, image_error: str | None = None) -> str | None:
    """Why `disk` cannot be read incrementally from checkpoint `base` (None: it can).

    `size`: the disk's current virtual size; `image`: the bitmaps its image holds (None
    when they could not be read: `image_error` says why)."""
    if base is None:
        return "first cycle: no checkpoint yet"
    if not disk.has_bitmaps:
        return f"{disk.format} image: no persistent dirty bitmap, every cycle is a hash scan"
    rec = base.disks.get(disk.target)
    if rec is None:
        return f"disk added since checkpoint {base.name}"
    if rec.bitmap is None:
        return f"disk not tracked by checkpoint {base.name}"
    if rec.path != disk.path:
        return f"disk image replaced since checkpoint {base.name} (was {rec.path})"
    if rec.size != size:
        return f"disk resized from {rec.size} to {size} bytes since checkpoint {base.name}"
    if image is None:
        return f"cannot read the bitmaps of {disk.path}: {image_error or 'unknown error'}"
    bm = image.bitmaps.get(rec.bitmap)
    if bm is None:
        return (f"bitmap {rec.bitmap} missing from the image (the VM was killed or crashed before it was "
                "saved, or the image was replaced or edited offline)")
    if not bm.consistent:
        return f"bitmap {rec.bitmap} inconsistent: the VM crashed or was killed while it was in use"
    if not bm.recording:
        return f"bitmap {rec.bitmap} disabled: writes were not recorded (image edited offline?)"
    if image.size and image.size != size:
        return f"disk resized from {image.size} to {size} bytes"
    return None


def checkpoint_xml(name: str, disks: dict[str, bool], creation_time: int | None = None) -> str:
    """A checkpoint definition: a bitmap named after the checkpoint in each disk whose
    value is True, no bitmap in the others."""
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    if creation_time is not None:
        ET.SubElement(root, "creationTime").text = str(int(creation_time))
    el = ET.SubElement(root, "disks")
    for target, bitmap in disks.items():
        attrs = {"name": target, "checkpoint": "bitmap" if bitmap else "no"}
        if bitmap and creation_time is not None:
            attrs["bitmap"] = name
        ET.SubElement(el, "disk", attrs)
    return ET.tostring(root, encoding="unicode")


def redefinable(xml: str, created_at: float | None = None) -> str:
    """A saved checkpoint XML fit for REDEFINE: without `<parent>` (libvirt requires the
    parent to exist, and Standby keeps only one checkpoint) and with a creationTime."""
    root = _xml(xml, "checkpoint XML")
    for p in root.findall("parent"):
        root.remove(p)
    if root.find("creationTime") is None:
        ct = ET.Element("creationTime")
        ct.text = str(int(created_at if created_at is not None else time.time()))
        root.insert(1, ct)
    return ET.tostring(root, encoding="unicode")


_BROKEN = re.compile(r"bitmap '([^']+)' for disk '([^']+)'")


def broken_disk_in_error(message: str) -> tuple[str, str] | None:
    """(bitmap, disk) from libvirt's "checkpoint inconsistent: missing or broken bitmap
    'X' for disk 'Y'" refusal of an incremental backup."""
    m = _BROKEN.search(message)
    return (m.group(1), m.group(2)) if m else None


# ---------------------------------------------------------------------------- guest agent


class GuestAgent(Protocol):
    """What an app-consistent point needs from the guest: a QEMU guest agent that answers
    and freezes/thaws the guest's filesystems."""

    def channel_state(self) -> str | None: ...

    def ping(self) -> None: ...

    def freeze(self) -> int: ...

    def thaw(self) -> None: ...


class LibvirtGuestAgent:
    """The guest agent of a libvirt domain. `ping` asks for the guest's time (an agent
    command libvirt offers without tainting the domain; libvirt's guest-sync bounds it
    when the agent does not answer)."""

    def __init__(self, dom: Any) -> None:
        self.dom = dom

    def channel_state(self) -> str | None:
        return agent_channel_state(self.dom.XMLDesc(0))

    def ping(self) -> None:
        self.dom.getTime()

    def freeze(self) -> int:
        return int(self.dom.fsFreeze())

    def thaw(self) -> None:
        self.dom.fsThaw()


@dataclass
class Quiesce:
    consistency: str  # "app" or "crash"
    note: str  # why (for the point's metadata and the log)
    frozen: int = 0  # filesystems frozen


def _err(exc: BaseException) -> str:
    get = getattr(exc, "get_error_message", None)
    return (get() if callable(get) else None) or str(exc)


@contextmanager
def quiesced(agent: GuestAgent | None, requested: str = "auto", thaw_attempts: int = 3) -> Iterator[Quiesce]:
    """Freeze the guest's filesystems around the block (the checkpoint's creation) when
    `requested` is "auto" or "app" and the guest agent answers; always thaw after, also
    when the block raises. Yields the consistency to record: "app" only when frozen."""
    if requested not in ("auto", "app", "crash"):
        raise BadInput(f"consistency must be auto, app or crash, not {requested!r}")
    if requested == "crash":
        yield Quiesce("crash", "crash-consistent point requested")
        return
    if agent is None:
        yield Quiesce("crash", "the VM is not running: no guest agent to freeze its filesystems")
        return
    try:
        state = agent.channel_state()
    except Exception as exc:  # noqa: BLE001 - any failure means: no app-consistent point
        yield Quiesce("crash", f"cannot read the guest agent channel: {_err(exc)}")
        return
    if state is None:
        yield Quiesce("crash", "no QEMU guest agent channel in the domain")
        return
    if state == "disconnected":
        yield Quiesce("crash", "the QEMU guest agent is not connected (not running in the guest)")
        return
    try:
        agent.ping()
    except Exception as exc:  # noqa: BLE001
        yield Quiesce("crash", f"the QEMU guest agent does not answer: {_err(exc)}")
        return
    try:
        frozen = agent.freeze()
    except Exception as exc:  # noqa: BLE001
        _thaw(agent, thaw_attempts)  # a freeze that failed half-way may have frozen some
        yield Quiesce("crash", f"freezing the guest's filesystems failed: {_err(exc)}")
        return
    thaw_error: str | None = None
    try:
        yield Quiesce("app", f"{frozen} guest filesystem(s) frozen during the checkpoint", frozen)
    finally:
        thaw_error = _thaw(agent, thaw_attempts)
    if thaw_error is not None:
        raise RemoteError(f"the guest's filesystems could not be thawed after the checkpoint: {thaw_error}")


def _thaw(agent: GuestAgent, attempts: int) -> str | None:
    last = None
    for i in range(max(1, attempts)):
        try:
            agent.thaw()
            return None
        except Exception as exc:  # noqa: BLE001
            last = _err(exc)
            time.sleep(0.2 * (i + 1))
    return last
