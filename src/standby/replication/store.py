"""Replica store on the secondary host: replica disks and their atomic recovery points.

On-disk format (version 2)
==========================

::

    ROOT/disks/<disk_id>/
        disk.json                 {"format": "standby-replica/2", "disk_id", "size", "block_size"}
        lock                      flock(2) target: one mutating process at a time
        layers/<seq>.qcow2        one qcow2 v3 layer per retained point (seq = 10 digits)
        points/<seq>.json         the commit record of point <seq>
        hashes/<seq>.full         full block-digest table of point <seq>
        hashes/<seq>.delta        block digests changed by point <seq>
        staging/<cycle_id>/       a cycle being received (see below)
        pins/<key>.json           {"point": id, "dest": overlay path} while materialized

Points and layers
-----------------
Point ids are the zero-padded sequence number (`0000000007`), so they sort in time
order. Point <seq> owns exactly `layers/<seq>.qcow2`; that layer holds the blocks its
cycle changed (data clusters, or the qcow2 zero flag for zero runs) and is backed by the
layer of the previous retained point (relative name `<prev>.qcow2`, format qcow2); the
oldest retained point's layer has no backing. The content of a point is its layer's
backing chain, which `qemu-img` and QEMU open directly (see `qcow2.py` for the layer
format). The chain length equals the number of retained points up to that point.

A point exists once `points/<seq>.json` exists (written to a temp file, fsynced,
renamed, directory fsynced); it is renamed into place last, once the layer and the hash
files are durable. It records: id, seq, created_at,
consistency ("crash" | "app"), digest (hex disk digest, see digest.py), bytes_changed,
blocks_changed, layer, cycle_id, base (previous point id), meta and meta_digest (SHA-256
of the meta in canonical JSON: sorted keys, no spaces, UTF-8). A VM's points carry the
cycle's VM manifest in `meta["vm_point"]` (`domain/vm_point.py`): with the seal, what a
failover without the control plane reads is what the cycle committed; `verify` checks
the seal with the data.

Format 1 (records without meta_digest) is migrated when a disk is opened: each record
is sealed and rewritten atomically, then disk.json says format 2; an interrupted
migration runs again at the next open.

Hashes
------
`hashes/<seq>.delta` lists (block index, digest) pairs the cycle changed;
`hashes/<seq>.full` is a full table (16 bytes a block). Both end with an xxh3-64 of what
precedes and are fsynced before the point record. The latest point's table is the newest
`.full` plus the deltas after it, in order; a new `.full` is written when the deltas
since the last one exceed a quarter of a table, and older hash files are then deleted.
Deltas are kept across pruning (they describe the hash history, not the layers). A
loaded table must reproduce the latest point's digest, otherwise it is rebuilt by
reading the chain.

Staging (a cycle in progress)
-----------------------------
`staging/<cycle_id>/` holds `cycle.json` ({cycle_id, base, seq, size}), `data.qcow2`
(the future layer: data clusters appended from cluster 1 on, cluster 0 left empty so
the file is not a qcow2 yet) and `journal`: a 32-byte header (magic `SBYJRNL1`, seq,
size, reserved) then 48-byte records (kind u8 (1 data, 2 zero run), 7 pad, index u64,
host offset or run length u64, block digest 16 bytes, xxh3-64 of the previous 40 bytes).
A record is appended only after the data it names is fsynced (checkpoint), so every
valid record names durable data; replay stops at the first invalid record. Resuming a
cycle replays the journal, re-reads and re-hashes every staged block (a block that does
not match its record is dropped and must be sent again), and truncates the data file
after the last journaled cluster. `commit.json` is the commit intent (expected digest,
consistency, created_at, meta): when it exists on open the commit is rolled forward
(or the staging discarded if the digest does not match).

Checkpoints run on a background thread every CHECKPOINT_BYTES of staged data (writers
wait for one only when CHECKPOINT_LAG intervals are pending), and the same thread starts
the writeback of every WRITEBACK_BYTES of staged data (started, not waited for), so the
disk writes while data arrives, a checkpoint or a commit finds little left to flush, and
no receiving thread blocks on the disk. Creating a staging fsyncs nothing: until its
first checkpoint it holds nothing durable (a crash may leave it half-written, and it is
then started over); that checkpoint makes `cycle.json` and the directories durable.

Commit order: [cycles of at least ROLL_FORWARD_BYTES of data: checkpoint, then the
intent, durable]; digest check (base table + this cycle's digests); layer metadata and
header written; hard link to layers/<seq>.qcow2; hash delta (and full table when due)
and the point record's temp file written; fsync of the layer, the hash files, the temp
record and the layers and hashes directories (their writeback started together, so
ext4 commits them in about one journal transaction); the record renamed into place and
points/ fsynced; staging removed. The layer is published by the record alone, so its
header need not be written after its tables here (a merge, on a layer in use, does
that). A crash anywhere leaves the previous point, or the new one once its record is
durable; a smaller cycle without an intent is then simply sent again (its staging is
resumed from its last checkpoint, if any, or dropped).

Memory: a cycle in progress keeps, for each 512 MiB region it touches, its L2 table
(64 KiB) and its block digests (128 KiB), and `received` is a bitmap: a 1% delta of a
1 GiB disk costs under 400 KiB; a full seed of 1 TiB about 384 MiB. The latest point's
hash table is cached (16 bytes a block).

Pruning
-------
Removing point k (never the latest, never a pinned point) with next retained point u:
delete `points/k.json` (fsync), merge layer u into layer k in place (new data and
metadata appended, qcow2 header rewritten last: see qcow2.py; a fresh compacted file
instead when more than half of layer k would be garbage), then rename layer k over
`layers/u.qcow2`. Every retained point keeps its content at every step; a QEMU that has
the old files open keeps reading its unchanged old clusters. On open, a point whose
layer is backed by a layer no point owns has its interrupted merge finished.

Seeds (offline initial replication)
-----------------------------------
`export_seed(point, DIR)` writes a directory to carry: `seed.qcow2` (one standalone
qcow2 v3 layer, no backing: the point's whole content, zero blocks unallocated, readable
by qemu-img), `seed.hashes` (the full block-digest table, same encoding as `.full`) and
`seed.json` ({"format": "standby-seed/1", disk_id, size, block_size, point, digest,
created_at, consistency, meta, image, hashes}). The export re-reads the chain and refuses
to write a seed that does not match the point's digest. `import_seed(DIR)` stages the
image as an ordinary (resumable) cycle named `seed-<digest prefix>` on an empty disk and
commits it against the seed's digest, so it becomes point 1 only if every block matches;
the next cycle is a delta on top of it.

Recovery on open (under the lock): temp files removed, staging with an intent rolled
forward or discarded, interrupted merges finished, layers and hash files no point owns
deleted, pins of vanished points dropped.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, MutableSet
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from standby.domain.retention import RetentionPolicy, points_to_remove
from standby.errors import BadInput, Conflict, IntegrityError, NotFound, OutOfSpace, StandbyError
from standby.replication.digest import (
    BLOCK_SIZE,
    DIGEST_SIZE,
    HashTable,
    block_digest,
    block_length,
    n_blocks,
    zero_block_digest,
)
from standby.replication.qcow2 import (
    CLUSTER_SIZE,
    L2_ENTRIES,
    OFFSET_MASK,
    OFLAG_ZERO,
    Qcow2Chain,
    Qcow2Error,
    Qcow2Reader,
    Qcow2Writer,
)

log = logging.getLogger(__name__)

assert CLUSTER_SIZE == BLOCK_SIZE

FORMAT = "standby-replica/2"
FORMATS_READ = ("standby-replica/1", FORMAT)  # format 1 is migrated on open (see the module doc)
SEED_FORMAT = "standby-seed/1"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_ZERO_BLOCK = bytes(BLOCK_SIZE)

JOURNAL_MAGIC = b"SBYJRNL1"
_JHEAD = struct.Struct(">8sQQQ")  # magic, seq, size, reserved
_JREC = struct.Struct(">B7xQQ16s")
_JREC_LEN = _JREC.size + 8
REC_DATA = 1
REC_ZERO = 2

HASH_MAGIC_FULL = b"SBYHFUL1"
HASH_MAGIC_DELTA = b"SBYHDLT1"
_DELTA_ENTRY = struct.Struct(">Q16s")

CHECKPOINT_BYTES = 64 * 1024 * 1024
CHECKPOINT_LAG = 4  # writers wait once this many checkpoint intervals are staged but not durable
ROLL_FORWARD_BYTES = 64 * 1024 * 1024  # cycles with this much data get a commit intent
WRITEBACK_BYTES = 8 * 1024 * 1024  # staged data is pushed to the disk in steps of this size


def _point_id(seq: int) -> str:
    return f"{seq:010d}"


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(".tmp"):
        raise BadInput(f"invalid {kind} {name!r}: use 1-128 of A-Z a-z 0-9 . _ - (not starting with . or -)")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes, *, atomic: bool = True, sync_dir: bool = True,
                   sync: bool = True) -> None:
    """Write a file and fsync it; atomically (temp + rename) unless told otherwise.

    `sync=False` only writes it (in place): the caller fsyncs it later with others
    (`_fsync_paths`), after starting their writeback together."""
    target = path.with_name(path.name + ".tmp") if atomic and sync else path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        mv = memoryview(data)
        while mv:
            mv = mv[os.write(fd, mv):]
        if not sync:
            _kick_writeback(fd, 0, 0)
            return
        os.fsync(fd)
    finally:
        os.close(fd)
    if atomic:
        os.replace(target, path)
    if sync_dir:
        _fsync_dir(path.parent)


def _kick_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a file range's dirty pages back now, without waiting (and let the
    page cache drop them once clean): the fsync that follows has less left to do, and a
    batch of small files started together is committed by one journal transaction."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass


def _fsync_paths(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


@contextmanager
def _space_errors() -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfSpace(f"out of space on the replica store: {e}") from e
        raise


# ---------------------------------------------------------------------------------------
# Public value types
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecoveryPoint:
    id: str
    seq: int
    created_at: float
    consistency: str
    digest: str
    bytes_changed: int
    blocks_changed: int
    layer: Path
    meta: dict[str, Any] = field(default_factory=dict)
    cycle_id: str = ""
    base: str | None = None
    size: int | None = None  # the point's virtual size (None in records written before resizes)
    meta_digest: str | None = None  # seals `meta` (None only in format-1 records, before migration)

    def to_json(self) -> dict[str, Any]:
        d = {"format": 2, "id": self.id, "seq": self.seq, "created_at": self.created_at,
             "consistency": self.consistency, "digest": self.digest,
             "bytes_changed": self.bytes_changed, "blocks_changed": self.blocks_changed,
             "layer": self.layer.name, "cycle_id": self.cycle_id, "base": self.base,
             "meta": self.meta, "meta_digest": self.meta_digest or meta_digest(self.meta)}
        if self.size is not None:
            d["size"] = self.size
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], layers_dir: Path) -> RecoveryPoint:
        return cls(id=d["id"], seq=int(d["seq"]), created_at=float(d["created_at"]),
                   consistency=d["consistency"], digest=d["digest"],
                   bytes_changed=int(d["bytes_changed"]), blocks_changed=int(d["blocks_changed"]),
                   layer=layers_dir / d["layer"], meta=dict(d.get("meta") or {}),
                   cycle_id=d.get("cycle_id", ""), base=d.get("base"),
                   size=int(d["size"]) if d.get("size") is not None else None,
                   meta_digest=str(d["meta_digest"]) if d.get("meta_digest") is not None else None)


def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 (hex) of a point's meta in canonical JSON: the seal `verify` checks, so a
    VM manifest read back for a failover is the one the cycle committed."""
    canonical = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    point_id: str
    ok: bool
    expected_digest: str
    actual_digest: str
    blocks: int
    seconds: float
    mismatched_blocks: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class BlockSet(MutableSet[int]):
    """A set of block indexes stored as a bitmap (1 bit a block: bounded memory)."""

    def __init__(self, n: int, items: Any = ()) -> None:
        self.n = n
        self._bits = bytearray((n + 7) // 8)
        self._len = 0
        for i in items:
            self.add(i)

    def __contains__(self, i: object) -> bool:
        if not isinstance(i, int) or not 0 <= i < self.n:
            return False
        return bool(self._bits[i >> 3] & (1 << (i & 7)))

    def add(self, i: int) -> None:
        if not 0 <= i < self.n:
            raise IndexError(i)
        b = 1 << (i & 7)
        if not self._bits[i >> 3] & b:
            self._bits[i >> 3] |= b
            self._len += 1

    def discard(self, i: int) -> None:
        if i in self:
            self._bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
            self._len -= 1

    def add_range(self, start: int, count: int) -> None:
        for i in range(start, start + count):
            self.add(i)

    def __iter__(self) -> Iterator[int]:
        bits = self._bits
        for byte_i, v in enumerate(bits):
            if v:
                base = byte_i << 3
                for k in range(8):
                    if v & (1 << k):
                        yield base + k

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"BlockSet({len(self)} of {self.n})"


# ---------------------------------------------------------------------------------------
# Hash files
# ---------------------------------------------------------------------------------------

def _encode_full(table: HashTable) -> bytes:
    body = HASH_MAGIC_FULL + struct.pack(">Q", table.size) + table.to_bytes()
    return body + xxhash.xxh3_64_digest(body)


def _decode_full(raw: bytes, size: int) -> HashTable | None:
    if len(raw) < 24 or raw[:8] != HASH_MAGIC_FULL or xxhash.xxh3_64_digest(raw[:-8]) != raw[-8:]:
        return None
    if struct.unpack(">Q", raw[8:16])[0] != size:
        return None
    try:
        return HashTable(size, raw[16:-8])
    except ValueError:
        return None


def _encode_delta(entries: list[tuple[int, bytes]]) -> bytes:
    body = HASH_MAGIC_DELTA + struct.pack(">Q", len(entries)) + b"".join(
        _DELTA_ENTRY.pack(i, d) for i, d in entries)
    return body + xxhash.xxh3_64_digest(body)


def _decode_delta(raw: bytes) -> list[tuple[int, bytes]] | None:
    if len(raw) < 24 or raw[:8] != HASH_MAGIC_DELTA or xxhash.xxh3_64_digest(raw[:-8]) != raw[-8:]:
        return None
    n = struct.unpack(">Q", raw[8:16])[0]
    if len(raw) != 24 + n * _DELTA_ENTRY.size:
        return None
    return list(_DELTA_ENTRY.iter_unpack(raw[16:-8]))


# ---------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------

class ReplicaStore:
    """All replica disks under one root directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        (self.root / "disks").mkdir(parents=True, exist_ok=True)
        self._disks: dict[str, DiskReplica] = {}
        self._lock = threading.Lock()

    def create_disk(self, disk_id: str, size: int) -> DiskReplica:
        _check_name("disk id", disk_id)
        if not isinstance(size, int) or size <= 0 or size % 512:
            raise BadInput(f"disk size must be a positive multiple of 512 bytes, got {size!r}")
        with self._lock:
            d = self.root / "disks" / disk_id
            meta = d / "disk.json"
            if meta.exists():
                existing = self._open(disk_id)
                if existing.size != size:
                    raise Conflict(f"disk {disk_id} exists with size {existing.size}, not {size}")
                return existing
            d.mkdir(parents=True, exist_ok=True)
            _write_durable(meta, _json_bytes({"format": FORMAT, "disk_id": disk_id, "size": size,
                                              "block_size": BLOCK_SIZE}))
            _fsync_dir(d.parent)
            return self._open(disk_id)

    def disk(self, disk_id: str) -> DiskReplica:
        _check_name("disk id", disk_id)
        with self._lock:
            if not (self.root / "disks" / disk_id / "disk.json").exists():
                raise NotFound(f"no replica disk {disk_id} in {self.root}")
            return self._open(disk_id)

    def disks(self) -> list[str]:
        base = self.root / "disks"
        return sorted(p.name for p in base.iterdir() if (p / "disk.json").exists())

    def import_seed(self, src: Path | str, disk_id: str | None = None) -> RecoveryPoint:
        """Create the disk named in the seed (or `disk_id`) and import the seed as its first point."""
        info = read_seed_info(Path(src))
        disk = self.create_disk(disk_id or info["disk_id"], int(info["size"]))
        return disk.import_seed(src)

    def _open(self, disk_id: str) -> DiskReplica:
        r = self._disks.get(disk_id)
        if r is None:
            r = self._disks[disk_id] = DiskReplica(self.root / "disks" / disk_id)
        return r


class DiskReplica:
    """One replicated disk: its recovery points, the staging of the cycle in progress."""

    def __init__(self, path: Path) -> None:
        self.path = path
        info = json.loads((path / "disk.json").read_text())
        if info.get("format") not in FORMATS_READ:
            raise IntegrityError(f"{path}/disk.json: unknown format {info.get('format')!r}")
        self._format = str(info["format"])
        self.disk_id: str = info["disk_id"]
        # disk.json's size is the size at creation and is never rewritten: a grown disk's
        # size is carried by the point records (durable with the point that grew it)
        self.created_size: int = int(info["size"])
        self.size: int = self.created_size
        self.n_blocks = n_blocks(self.size)
        self.layers_dir = path / "layers"
        self.points_dir = path / "points"
        self.hashes_dir = path / "hashes"
        self.staging_dir = path / "staging"
        self.pins_dir = path / "pins"
        for d in (self.layers_dir, self.points_dir, self.hashes_dir, self.staging_dir, self.pins_dir):
            d.mkdir(exist_ok=True)
        self._tlock = threading.RLock()
        self._flock_depth = 0
        self._lock_fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        self._points: list[RecoveryPoint] = []
        self._record_cache: dict[str, tuple[tuple[int, int, int], RecoveryPoint]] = {}
        self._pending_size: int | None = None  # resize(): the size of the next point
        self._table: tuple[int, HashTable] | None = None
        self._deltas_since_full = 0
        self._active: CycleWriter | None = None
        with self._locked():
            self._recover()

    def __del__(self) -> None:
        fd = getattr(self, "_lock_fd", -1)
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    # -- locking --------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._tlock:
            if self._flock_depth == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._flock_depth += 1
            try:
                yield
            finally:
                self._flock_depth -= 1
                if self._flock_depth == 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- points ---------------------------------------------------------------------
    def _scan_points(self) -> list[RecoveryPoint]:
        # Records are written once (temp file + rename) and never changed in place, so a
        # record whose name, inode, mtime and size are unchanged since the last scan is
        # not read and parsed again (a cycle scans several times; a disk keeps hundreds).
        pts = []
        seen: dict[str, tuple[tuple[int, int, int], RecoveryPoint]] = {}
        with os.scandir(self.points_dir) as entries:
            for e in entries:
                if not e.name.endswith(".json") or e.name.startswith("."):
                    continue
                st = e.stat()
                key = (e.inode(), st.st_mtime_ns, st.st_size)
                hit = self._record_cache.get(e.name)
                if hit is not None and hit[0] == key:
                    pt = hit[1]
                else:
                    p = self.points_dir / e.name
                    try:
                        d = json.loads(p.read_text())
                        pt = RecoveryPoint.from_json(d, self.layers_dir)
                    except (ValueError, KeyError, TypeError) as exc:
                        raise IntegrityError(f"{p}: corrupt recovery point record: {exc}") from exc
                    if pt.id != p.stem:
                        raise IntegrityError(f"{p}: record names point {pt.id}")
                seen[e.name] = (key, pt)
                pts.append(pt)
        self._record_cache = seen
        pts.sort(key=lambda x: x.seq)
        self._points = pts
        current = self.point_size(pts[-1]) if pts else self.created_size
        self._set_size(max(current, self._pending_size or 0))
        return pts

    @property
    def committed_size(self) -> int:
        """The size of the latest point (the creation size while there is none): what a
        crash leaves, whatever `resize` set for the next point."""
        pts = self._points
        return self.point_size(pts[-1]) if pts else self.created_size

    def point_size(self, point: RecoveryPoint) -> int:
        """The virtual size of a point (a grown disk's older points keep their smaller size)."""
        return point.size if point.size is not None else self.created_size

    def _set_size(self, size: int) -> None:
        self.size = size
        self.n_blocks = n_blocks(size)

    def resize(self, new_size: int) -> None:
        """Grow the replica to `new_size` bytes: the next cycle's layer has that size, backed
        by the smaller previous layer (read beyond its end as zeros), and the block table
        grows with zero-block digests. The size becomes durable only with the point that
        the next cycle commits (a crash before that leaves the replica at its old size; a
        resumed cycle at the new size picks its staging up again). Shrinking below the
        committed size is refused; `resize(committed_size)` cancels a pending growth."""
        if not isinstance(new_size, int) or new_size <= 0 or new_size % 512:
            raise BadInput(f"disk size must be a positive multiple of 512 bytes, got {new_size!r}")
        with self._locked():
            pts = self._scan_points()
            current = self.point_size(pts[-1]) if pts else self.created_size
            if new_size < current:
                raise Conflict(f"the replica of disk {self.disk_id} is {current} bytes, the source is "
                               f"{new_size}: shrinking a protected disk is not supported")
            if new_size == self.size:
                return
            if self._active is not None:
                self._active._detach(keep=True)
                self._active = None
            self._pending_size = new_size if new_size > current else None
            self._set_size(new_size)
            log.info("disk %s: growing from %d to %d bytes with the next point", self.disk_id, current, new_size)

    def points(self) -> list[RecoveryPoint]:
        """Every retained point, oldest first."""
        with self._tlock:
            return list(self._scan_points())

    def latest(self) -> RecoveryPoint | None:
        pts = self.points()
        return pts[-1] if pts else None

    def point(self, point_id: str) -> RecoveryPoint:
        for p in self.points():
            if p.id == point_id:
                return p
        raise NotFound(f"disk {self.disk_id} has no recovery point {point_id}")

    def pinned(self) -> dict[str, str]:
        """{overlay path: point id} of every materialized overlay."""
        out = {}
        for p in self.pins_dir.glob("*.json"):
            try:
                d = json.loads(p.read_text())
                out[d["dest"]] = d["point"]
            except (ValueError, KeyError):
                continue
        return out

    # -- hashes ---------------------------------------------------------------------
    def block_hashes(self, size: int | None = None) -> HashTable:
        """Block digests of the latest point (an all-zero disk's table when there is none), at
        the disk's current size, or at `size` (at least the committed size; grown blocks
        read as zeros)."""
        with self._locked():
            pts = self._scan_points()
            if not pts:
                return HashTable(size or self.size)
            return self._grown(self._latest_table(pts[-1]), pts[-1], size or self.size)

    def grown_digest(self, size: int) -> bytes:
        """The disk digest of the latest point read at `size` (>= its size; grown blocks are
        zeros), computed without building the grown table (cheap for large growths)."""
        with self._locked():
            pts = self._scan_points()
            if not pts:
                return HashTable(size).disk_digest()
            table = self._latest_table(pts[-1])
            if table.size == size:
                return table.disk_digest()
            if table.size > size:
                raise IntegrityError(f"disk {self.disk_id}: block table of {table.size} bytes, disk {size}")
            if table.size % BLOCK_SIZE:
                return self._grown(table, pts[-1], size).disk_digest()  # a short last block changes
            h = xxhash.xxh3_128()
            h.update(table.to_bytes())
            new_n, old_n = n_blocks(size), table.n_blocks
            full = new_n - old_n - (1 if size % BLOCK_SIZE else 0)
            chunk = zero_block_digest(BLOCK_SIZE) * 65536
            while full > 0:
                k = min(full, 65536)
                h.update(chunk[:k * DIGEST_SIZE])
                full -= k
            if size % BLOCK_SIZE:
                h.update(zero_block_digest(size % BLOCK_SIZE))
            return h.digest()

    def _grown(self, table: HashTable, latest: RecoveryPoint | None, size: int | None = None) -> HashTable:
        """`table` (of `latest`) at `size` (default the disk's current size): new blocks read as zeros."""
        size = size or self.size
        if table.size == size:
            return table.copy()
        if table.size > size:
            raise IntegrityError(f"disk {self.disk_id}: block table of {table.size} bytes, disk {size}")
        old_n = table.n_blocks
        new_n = n_blocks(size)
        data = bytearray(table.to_bytes())
        data += bytes((new_n - old_n) * DIGEST_SIZE)
        for i in range(old_n, new_n):
            data[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] = zero_block_digest(block_length(size, i))
        if table.size % BLOCK_SIZE and old_n:
            # the old short last block is now longer: its tail reads as zeros
            last = old_n - 1
            with Qcow2Chain(latest.layer) as chain:  # type: ignore[union-attr]
                block = chain.read_block(last)
            block += bytes(block_length(size, last) - len(block))
            data[last * DIGEST_SIZE:(last + 1) * DIGEST_SIZE] = block_digest(block)
        return HashTable(size, data)

    def _latest_table(self, latest: RecoveryPoint | None) -> HashTable:
        if latest is None:
            return HashTable(self.size)
        if self._table is not None and self._table[0] == latest.seq:
            return self._table[1]
        table = self._load_table(latest)
        if table is None or table.disk_digest().hex() != latest.digest:
            log.warning("disk %s: hash table of point %s missing or stale; rebuilding from the chain",
                        self.disk_id, latest.id)
            table = self._table_from_chain(latest, self._points)
            if table.disk_digest().hex() != latest.digest:
                raise IntegrityError(f"disk {self.disk_id}: point {latest.id} does not match its digest")
            _write_durable(self.hashes_dir / f"{latest.id}.full", _encode_full(table))
            self._deltas_since_full = 0
            self._gc_hashes(latest.seq)
        self._table = (latest.seq, table)
        return table

    def _load_table(self, latest: RecoveryPoint) -> HashTable | None:
        fulls = sorted((int(p.stem) for p in self.hashes_dir.glob("*.full") if p.stem.isdigit()),
                       reverse=True)
        for f in fulls:
            if f > latest.seq:
                continue
            table = _decode_full((self.hashes_dir / f"{_point_id(f)}.full").read_bytes(),
                                 self.point_size(latest))
            if table is None:
                continue
            count = 0
            ok = True
            for s in range(f + 1, latest.seq + 1):
                p = self.hashes_dir / f"{_point_id(s)}.delta"
                entries = _decode_delta(p.read_bytes()) if p.exists() else None
                if entries is None:
                    ok = False
                    break
                for i, dg in entries:
                    if i >= table.n_blocks:
                        ok = False
                        break
                    table.set(i, dg)
                count += len(entries)
            if ok:
                self._deltas_since_full = count
                return table
        return None

    def _gc_hashes(self, full_seq: int) -> None:
        for p in self.hashes_dir.iterdir():
            stem = p.name.split(".")[0]
            if stem.isdigit() and int(stem) < full_seq:
                p.unlink(missing_ok=True)

    def _table_from_chain(self, point: RecoveryPoint, points: list[RecoveryPoint]) -> HashTable:
        size = self.point_size(point)
        data = bytearray(n_blocks(size) * DIGEST_SIZE)
        with Qcow2Chain(point.layer) as chain:
            self._check_chain(point, chain, points)
            for i in range(n_blocks(size)):
                loc = chain.locate(i)
                length = block_length(size, i)
                if loc is None:
                    d = zero_block_digest(length)
                else:
                    d = block_digest(loc[0].read_cluster(loc[1])[:length])
                data[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] = d
        return HashTable(size, data)

    def _check_chain(self, point: RecoveryPoint, chain: Qcow2Chain, points: list[RecoveryPoint]) -> None:
        """The chain of `point` must be exactly the layers of the points up to it."""
        expected = [p.layer.name for p in points if p.seq <= point.seq][::-1]
        got = [r.path.name for r in chain.layers]
        if got != expected:
            raise IntegrityError(f"disk {self.disk_id}: chain of point {point.id} is {got}, expected {expected}")
        sizes = {p.layer.name: self.point_size(p) for p in points}
        for r in chain.layers:
            if r.size != sizes.get(r.path.name):
                raise IntegrityError(f"{r.path}: virtual size {r.size}, its point's size {sizes.get(r.path.name)}")

    # -- cycles ---------------------------------------------------------------------
    def begin_cycle(self, cycle_id: str, base_point: str | None) -> CycleWriter:
        """Start (or resume) receiving a cycle on top of `base_point` (the latest point)."""
        _check_name("cycle id", cycle_id)
        with self._locked():
            pts = self._scan_points()
            latest = pts[-1] if pts else None
            latest_id = latest.id if latest else None
            if base_point != latest_id:
                raise Conflict(f"disk {self.disk_id}: cycle {cycle_id} is based on point {base_point}, "
                               f"the replica is at {latest_id}")
            if any(p.cycle_id == cycle_id for p in pts):
                raise Conflict(f"disk {self.disk_id}: cycle {cycle_id} is already committed")
            if self._active is not None:
                self._active._detach(keep=self._active.cycle_id == cycle_id)
                self._active = None
            for other in self.staging_dir.iterdir():
                if other.name != cycle_id:
                    shutil.rmtree(other, ignore_errors=True)
            seq = (latest.seq if latest else 0) + 1
            sdir = self.staging_dir / cycle_id
            w = None
            if sdir.exists():
                try:
                    w = CycleWriter._resume(self, cycle_id, sdir, base_point, seq)
                except (OSError, ValueError, KeyError, StandbyError) as e:
                    log.warning("disk %s: staging of cycle %s unusable (%s); starting it over",
                                self.disk_id, cycle_id, e)
                    shutil.rmtree(sdir, ignore_errors=True)
            if w is None:
                with _space_errors():
                    w = CycleWriter._create(self, cycle_id, sdir, base_point, seq)
            self._active = w
            return w

    def _commit_point(self, w: CycleWriter, expected_digest: bytes, consistency: str,
                      created_at: float, meta: dict[str, Any], *, rolling_forward: bool = False
                      ) -> RecoveryPoint:
        """Commit a staged cycle (disk lock held by the caller)."""
        pts = self._scan_points()
        latest = pts[-1] if pts else None
        if (latest.id if latest else None) != w.base_point:
            w._discard()
            raise Conflict(f"disk {self.disk_id}: the replica moved to {latest.id if latest else None} "
                           f"while cycle {w.cycle_id} was staged on {w.base_point}")
        base_table = self._latest_table(latest)
        resized = base_table.size != self.size
        if resized:
            base_table = self._grown(base_table, latest)
        table, changes, n_changed, bytes_changed = w._apply_changes(base_table, self.n_blocks // 4)
        digest = table.disk_digest()
        if digest != expected_digest:
            w._discard()
            raise IntegrityError(
                f"disk {self.disk_id}: cycle {w.cycle_id} gives disk digest {digest.hex()}, "
                f"the source sent {expected_digest.hex()}; the cycle is discarded and the replica "
                f"stays at point {latest.id if latest else None}")
        seq = w.seq
        pid = _point_id(seq)
        layer = self.layers_dir / f"{pid}.qcow2"
        point = RecoveryPoint(id=pid, seq=seq, created_at=float(created_at), consistency=consistency,
                              digest=digest.hex(), bytes_changed=bytes_changed,
                              blocks_changed=n_changed, layer=layer, meta=dict(meta),
                              cycle_id=w.cycle_id, base=w.base_point, size=self.size,
                              meta_digest=meta_digest(dict(meta)))
        with _space_errors():
            if not rolling_forward and w.data_bytes >= w.roll_forward_bytes:
                # a big cycle: the intent lets recovery finish this commit instead of
                # having the sender send it all again (commit() checkpointed first)
                _write_durable(w.dir / "commit.json", _json_bytes(
                    {"expected_digest": expected_digest.hex(), "consistency": consistency,
                     "created_at": created_at, "meta": meta}))
            # The layer, its hash files and the point record are written, then made
            # durable together (their writeback started at once, so one journal commit
            # carries most of it), and only then is the record renamed into place.
            w.qcow.finalize(header_last=False, sync=False)
            layer.unlink(missing_ok=True)
            os.link(w.dir / "data.qcow2", layer)
            full_due = latest is None or changes is None or resized or \
                self._deltas_since_full + n_changed > self.n_blocks // 4
            written: list[Path] = []
            if changes is not None:
                written.append(self.hashes_dir / f"{pid}.delta")
                _write_durable(written[-1], _encode_delta(changes), atomic=False, sync=False)
            if full_due:
                written.append(self.hashes_dir / f"{pid}.full")
                _write_durable(written[-1], _encode_full(table), atomic=False, sync=False)
            record_tmp = self.points_dir / f"{pid}.json.tmp"
            _write_durable(record_tmp, _json_bytes(point.to_json()), atomic=False, sync=False)
            os.fsync(w.qcow.fd)
            _fsync_paths(written + [record_tmp, self.layers_dir, self.hashes_dir])
            os.replace(record_tmp, self.points_dir / f"{pid}.json")
            _fsync_dir(self.points_dir)
        # committed
        self._points = pts + [point]
        self._table = (seq, table)
        self._deltas_since_full = 0 if full_due else self._deltas_since_full + n_changed
        w._close()
        shutil.rmtree(w.dir, ignore_errors=True)
        if full_due:
            self._gc_hashes(seq)
        if self._active is w:
            self._active = None
        return point

    # -- materialize ----------------------------------------------------------------
    def _pin_path(self, dest: Path) -> Path:
        key = hashlib.sha256(str(Path(dest).absolute()).encode()).hexdigest()[:32]
        return self.pins_dir / f"{key}.json"

    def materialize(self, point_id: str, dest: Path | str) -> Path:
        """A writable qcow2 overlay at `dest` over the point's layer; pins the point until release."""
        dest = Path(dest).absolute()
        with self._locked():
            self._scan_points()
            point = self.point(point_id)
            if dest.exists():
                raise Conflict(f"{dest} exists")
            pin = self._pin_path(dest)
            _write_durable(pin, _json_bytes({"point": point.id, "dest": str(dest)}))
            try:
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(point.layer.absolute()),
                                "-F", "qcow2", str(dest)], check=True, capture_output=True, text=True)
            except (OSError, subprocess.CalledProcessError) as e:
                pin.unlink(missing_ok=True)
                err = getattr(e, "stderr", "") or str(e)
                raise StandbyError(f"qemu-img create of overlay {dest} failed: {err.strip()}") from e
            return dest

    def release(self, dest: Path | str) -> None:
        """Unpin the point of an overlay (the overlay file itself is left to its owner)."""
        with self._locked():
            pin = self._pin_path(Path(dest))
            if not pin.exists():
                raise NotFound(f"{dest} is not a materialized overlay of disk {self.disk_id}")
            pin.unlink()
            _fsync_dir(self.pins_dir)

    # -- verify ---------------------------------------------------------------------
    def verify(self, point_id: str) -> VerifyResult:
        """Read the point's whole chain, recompute every block digest and the disk digest."""
        t0 = time.perf_counter()
        with self._tlock:
            self._scan_points()
            point = self.point(point_id)
            is_latest = point is self._points[-1]
            points_snapshot = list(self._points)
        problems: list[str] = []
        try:
            table = self._table_from_chain(point, points_snapshot)
        except (OSError, Qcow2Error, IntegrityError) as e:
            problems.append(str(e))
            return VerifyResult(point.id, False, point.digest, "", 0, time.perf_counter() - t0,
                                problems=problems)
        actual = table.disk_digest().hex()
        mismatched: list[int] = []
        if point.meta_digest is not None and meta_digest(point.meta) != point.meta_digest:
            problems.append(f"the point's meta (its VM manifest) does not match its seal {point.meta_digest}")
        if is_latest:
            try:
                with self._tlock:
                    stored = self._latest_table(point) if actual == point.digest else None
                if stored is not None:
                    mismatched = stored.differing_blocks(table)
            except IntegrityError as e:
                problems.append(str(e))
        if actual != point.digest:
            problems.append(f"disk digest {actual} differs from the recorded {point.digest}")
        return VerifyResult(point.id, actual == point.digest and not mismatched and not problems,
                            point.digest, actual, table.n_blocks, time.perf_counter() - t0,
                            mismatched, problems)

    # -- retention ------------------------------------------------------------------
    def prune(self, policy: RetentionPolicy, now: float, keep: Iterable[str] = ()) -> list[str]:
        """Remove the points the policy does not keep (pinned points and those in `keep`
        stay); returns their ids."""
        with self._locked():
            pts = self._scan_points()
            pinned = set(self.pinned().values()) | set(keep)
            remove = points_to_remove([(p.id, p.created_at, p.consistency) for p in pts], policy, now, pinned)
            for pid in remove:
                self._remove_point(pid)
            return remove

    def remove_point(self, point_id: str) -> None:
        """Remove one point (not the latest, not a pinned one), merging its layer."""
        with self._locked():
            self._scan_points()
            self._remove_point(point_id)

    def _remove_point(self, point_id: str) -> None:
        pts = self._points
        idx = next((i for i, p in enumerate(pts) if p.id == point_id), None)
        if idx is None:
            raise NotFound(f"disk {self.disk_id} has no recovery point {point_id}")
        if idx == len(pts) - 1:
            raise Conflict(f"point {point_id} is the latest of disk {self.disk_id}; it is never removed")
        if point_id in set(self.pinned().values()):
            raise Conflict(f"point {point_id} is materialized; release its overlay first")
        k, u = pts[idx], pts[idx + 1]
        (self.points_dir / f"{k.id}.json").unlink()
        _fsync_dir(self.points_dir)
        self._points = pts[:idx] + pts[idx + 1:]
        with _space_errors():
            self._merge_into(lower=k.layer, upper=u.layer)

    def _merge_into(self, lower: Path, upper: Path) -> None:
        """Fold layer `upper` into `lower` (whose point is gone), then `lower` takes `upper`'s name."""
        with Qcow2Reader(upper) as up:
            up_entries = list(up.iter_entries())
            w = Qcow2Writer.open_existing(lower)
            try:
                live = w.data_clusters()
                # a grown disk: the merged layer takes the upper's (larger) size, in a new file
                compact = w.size != up.size
                if not compact:
                    overridden = sum(1 for i, e in up_entries if w.entry(i) and not w.entry(i) & OFLAG_ZERO)
                    new_data = sum(1 for _i, e in up_entries if not e & OFLAG_ZERO)
                    garbage = w.garbage_clusters + overridden
                    compact = garbage > live - overridden + new_data
            except BaseException:
                w.close()
                raise
            if compact:
                w.close()
                self._merge_fresh(lower, up, up_entries, upper)
                return
            try:
                for i, e in up_entries:
                    if e & OFLAG_ZERO:
                        w.map_zero(i, 1)
                    else:
                        off = w.reserve()
                        _copy_cluster(up.fd, e & OFFSET_MASK, w.fd, off)
                        w.map_data(i, off)
                w.finalize()
            finally:
                w.close()
        os.replace(lower, upper)
        _fsync_dir(self.layers_dir)

    def _merge_fresh(self, lower: Path, up: Qcow2Reader, up_entries: list[tuple[int, int]],
                     upper: Path) -> None:
        """Compaction: write the merged layer as a new file, then rename it over `upper`."""
        tmp = upper.with_name(upper.name + ".merge.tmp")
        with Qcow2Reader(lower) as lo:
            w = Qcow2Writer(tmp, up.size, lo.backing)
            try:
                srcs = (lo, up)
                for i, which, e in _merge_entries(lo.iter_entries(), iter(up_entries)):
                    if e & OFLAG_ZERO:
                        w.map_zero(i, 1)
                    else:
                        off = w.reserve()
                        _copy_cluster(srcs[which].fd, e & OFFSET_MASK, w.fd, off)
                        w.map_data(i, off)
                w.finalize()
            finally:
                w.close()
        os.replace(tmp, upper)
        _fsync_dir(self.layers_dir)
        lower.unlink(missing_ok=True)

    # -- seeds ----------------------------------------------------------------------
    def export_seed(self, point_id: str, dest: Path | str) -> Path:
        """Write the point as a seed directory: seed.json, seed.qcow2 (standalone), seed.hashes."""
        dest = Path(dest)
        with self._tlock:
            self._scan_points()
            point = self.point(point_id)
            points_snapshot = list(self._points)
        dest.mkdir(parents=True, exist_ok=True)
        img = dest / "seed.qcow2"
        size = self.point_size(point)
        data = bytearray(n_blocks(size) * DIGEST_SIZE)
        with Qcow2Chain(point.layer) as chain:
            self._check_chain(point, chain, points_snapshot)
            with _space_errors(), Qcow2Writer(img, size, None) as w:
                for i in range(n_blocks(size)):
                    loc = chain.locate(i)
                    length = block_length(size, i)
                    if loc is None:
                        d = zero_block_digest(length)
                    else:
                        block = loc[0].read_cluster(loc[1])[:length]
                        d = block_digest(block)
                        if block != _ZERO_BLOCK[:length]:
                            w.write_block(i, block)
                    data[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] = d
                table = HashTable(size, data)
                if table.disk_digest().hex() != point.digest:
                    raise IntegrityError(f"disk {self.disk_id}: point {point.id} does not match its digest; "
                                         "not exporting a corrupt seed")
                w.finalize()
        _write_durable(dest / "seed.hashes", _encode_full(table))
        _write_durable(dest / "seed.json", _json_bytes({
            "format": SEED_FORMAT, "disk_id": self.disk_id, "size": size, "block_size": BLOCK_SIZE,
            "point": point.id, "digest": point.digest, "created_at": point.created_at,
            "consistency": point.consistency, "meta": point.meta, "image": "seed.qcow2",
            "hashes": "seed.hashes"}))
        return dest

    def import_seed(self, src: Path | str) -> RecoveryPoint:
        """Import a seed directory as the first point (the disk must have no point yet)."""
        src = Path(src)
        info = read_seed_info(src)
        if int(info["size"]) != self.size:
            raise Conflict(f"seed is for a disk of {info['size']} bytes, disk {self.disk_id} has {self.size}")
        if self.latest() is not None:
            raise Conflict(f"disk {self.disk_id} already has recovery points; a seed is only its first point")
        cycle_id = "seed-" + info["digest"][:16]
        w = self.begin_cycle(cycle_id, None)
        try:
            with Qcow2Chain(src / info.get("image", "seed.qcow2")) as chain:
                if len(chain.layers) != 1 or chain.size != self.size:
                    raise IntegrityError(f"{src}: the seed image must be one qcow2 of {self.size} bytes")
                for i in range(self.n_blocks):
                    if i in w.received:
                        continue
                    loc = chain.locate(i)
                    if loc is None:
                        continue  # a seed layer starts all zero
                    w.write(i * BLOCK_SIZE, loc[0].read_cluster(loc[1])[:block_length(self.size, i)])
            meta = dict(info.get("meta") or {})
            meta["imported_seed"] = {"from_point": info.get("point"), "disk_id": info.get("disk_id")}
            return w.commit(bytes.fromhex(info["digest"]), info.get("consistency", "crash"),
                            float(info.get("created_at", time.time())), meta)
        except BaseException:
            if not w._closed:
                w.checkpoint()
            raise

    # -- format migration -------------------------------------------------------------
    def _migrate(self) -> None:
        """Format 1 -> 2 (disk lock held): seal every point's meta (`meta_digest`), record
        by record (each rewritten atomically), then disk.json last. Interrupted, it runs
        again on the next open; a record already sealed is left as it is."""
        for p in sorted(self.points_dir.glob("*.json")):
            d = json.loads(p.read_text())
            if d.get("meta_digest") is not None:
                continue
            d["meta_digest"] = meta_digest(dict(d.get("meta") or {}))
            d["format"] = 2
            _write_durable(p, _json_bytes(d))
        _fsync_dir(self.points_dir)
        info = json.loads((self.path / "disk.json").read_text())
        info["format"] = FORMAT
        _write_durable(self.path / "disk.json", _json_bytes(info))
        log.info("disk %s: replica store format migrated to %s", self.disk_id, FORMAT)
        self._format = FORMAT
        self._record_cache.clear()

    # -- recovery -------------------------------------------------------------------
    def _recover(self) -> None:
        """Bring the directory back to a clean state after any crash (disk lock held)."""
        for d in (self.path, self.layers_dir, self.points_dir, self.hashes_dir, self.pins_dir):
            for p in d.iterdir():
                if p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)
        if self._format != FORMAT:
            self._migrate()
        for p in self.staging_dir.iterdir():
            if p.name.endswith(".tmp") or not p.is_dir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        pts = self._scan_points()
        # 1. interrupted merges (a point's layer backed by a layer no point owns)
        owned = {p.layer.name for p in pts}
        prev: RecoveryPoint | None = None
        for p in pts:
            if not p.layer.exists():
                raise IntegrityError(f"disk {self.disk_id}: layer {p.layer.name} of point {p.id} is missing")
            for _ in range(len(os.listdir(self.layers_dir)) + 1):
                with Qcow2Reader(p.layer) as r:
                    backing = r.backing
                want = prev.layer.name if prev else None
                if backing == want:
                    break
                if backing is None or backing in owned or not (self.layers_dir / backing).exists():
                    raise IntegrityError(f"disk {self.disk_id}: layer {p.layer.name} is backed by {backing!r}, "
                                         f"expected {want!r}")
                log.info("disk %s: finishing the merge of layer %s into %s", self.disk_id, p.layer.name, backing)
                self._merge_into(lower=self.layers_dir / backing, upper=p.layer)
            prev = p
        # 2. staging: drop what is committed, roll forward commit intents
        for sdir in list(self.staging_dir.iterdir()):
            if any(p.cycle_id == sdir.name for p in pts):
                shutil.rmtree(sdir, ignore_errors=True)
                continue
            if (sdir / "commit.json").exists():
                self._roll_forward(sdir)
                pts = self._scan_points()
        owned = {p.layer.name for p in pts}
        # 3. layers and hash files no point owns
        for f in self.layers_dir.iterdir():
            if f.name not in owned:
                f.unlink(missing_ok=True)
        latest_seq = pts[-1].seq if pts else 0
        for f in self.hashes_dir.iterdir():
            stem = f.name.split(".")[0]
            if not stem.isdigit() or int(stem) > latest_seq:
                f.unlink(missing_ok=True)
        # 4. pins of vanished points
        ids = {p.id for p in pts}
        for pin in self.pins_dir.glob("*.json"):
            try:
                if json.loads(pin.read_text())["point"] in ids:
                    continue
            except (ValueError, KeyError):
                pass
            pin.unlink(missing_ok=True)
        self._table = None

    def _roll_forward(self, sdir: Path) -> None:
        try:
            intent = json.loads((sdir / "commit.json").read_text())
            cyc = json.loads((sdir / "cycle.json").read_text())
            pts = self._points
            latest = pts[-1] if pts else None
            if int(cyc["size"]) > self.size:
                self._pending_size = int(cyc["size"])  # the cycle grows the disk
                self._set_size(int(cyc["size"]))
            w = CycleWriter._resume(self, sdir.name, sdir, latest.id if latest else None,
                                    (latest.seq if latest else 0) + 1, clear=False)
        except (OSError, ValueError, KeyError, StandbyError) as e:
            log.warning("disk %s: cannot roll cycle %s forward (%s); discarding it", self.disk_id, sdir.name, e)
            shutil.rmtree(sdir, ignore_errors=True)
            return
        del cyc
        try:
            self._commit_point(w, bytes.fromhex(intent["expected_digest"]), intent["consistency"],
                               float(intent["created_at"]), intent.get("meta") or {}, rolling_forward=True)
            log.info("disk %s: rolled the commit of cycle %s forward", self.disk_id, sdir.name)
        except IntegrityError:
            log.warning("disk %s: staged cycle %s does not match its digest; discarded", self.disk_id, sdir.name)
        except (OSError, StandbyError) as e:
            log.warning("disk %s: rolling cycle %s forward failed (%s); it stays staged", self.disk_id,
                        sdir.name, e)
            w._close()
            (sdir / "commit.json").unlink(missing_ok=True)


def _merge_entries(lower: Iterator[tuple[int, int]], upper: Iterator[tuple[int, int]]
                   ) -> Iterator[tuple[int, int, int]]:
    """Merge two index-ordered entry streams: (index, 0 lower / 1 upper, entry); upper wins."""
    lo = next(lower, None)
    up = next(upper, None)
    while lo is not None or up is not None:
        if up is None or (lo is not None and lo[0] < up[0]):
            assert lo is not None
            yield lo[0], 0, lo[1]
            lo = next(lower, None)
        else:
            yield up[0], 1, up[1]
            if lo is not None and lo[0] == up[0]:
                lo = next(lower, None)
            up = next(upper, None)


def _copy_cluster(src_fd: int, src_off: int, dst_fd: int, dst_off: int) -> None:
    done = 0
    while done < CLUSTER_SIZE:
        try:
            n = os.copy_file_range(src_fd, dst_fd, CLUSTER_SIZE - done, src_off + done, dst_off + done)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = 0
        if n <= 0:
            data = os.pread(src_fd, CLUSTER_SIZE - done, src_off + done)
            if not data:
                raise Qcow2Error(f"data cluster at {src_off} truncated")
            n = os.pwrite(dst_fd, data, dst_off + done)
        done += n


def read_seed_info(src: Path) -> dict[str, Any]:
    try:
        info = json.loads((Path(src) / "seed.json").read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"{src}: not a seed directory (seed.json unreadable: {e})") from e
    if info.get("format") != SEED_FORMAT:
        raise BadInput(f"{src}: unknown seed format {info.get('format')!r}")
    for k in ("disk_id", "size", "digest"):
        if k not in info:
            raise BadInput(f"{src}/seed.json: missing {k}")
    return info


# ---------------------------------------------------------------------------------------
# A cycle being received
# ---------------------------------------------------------------------------------------

class CycleWriter:
    """Stages the blocks of one cycle; `commit` turns them into a recovery point.

    `write` and `write_zero` are thread-safe. `received` holds the indexes of the blocks
    durably staged (as of the last checkpoint): after a resume, the blocks the sender
    can skip.
    """

    checkpoint_bytes = CHECKPOINT_BYTES
    roll_forward_bytes = ROLL_FORWARD_BYTES
    writeback_bytes = WRITEBACK_BYTES

    def __init__(self, disk: DiskReplica, cycle_id: str, sdir: Path, base_point: str | None,
                 seq: int, qcow: Qcow2Writer, journal_fd: int) -> None:
        self.disk = disk
        self.cycle_id = cycle_id
        self.dir = sdir
        self.base_point = base_point
        self.seq = seq
        self.qcow = qcow
        self._jfd = journal_fd
        self.received: BlockSet = BlockSet(disk.n_blocks)
        self._lock = threading.Lock()
        self._ckpt_lock = threading.Lock()
        self._pending: list[bytes] = []
        self._pending_idx: list[tuple[int, int]] = []  # (start, count) of pending records
        self._since_ckpt = 0
        self._digests: dict[int, bytearray] = {}
        self._closed = False
        self._inflight = 0
        self._idle = threading.Condition(self._lock)
        # background checkpoints: the receiving threads never wait for an fsync unless
        # the checkpointer fell CHECKPOINT_LAG intervals behind (back-pressure)
        self._ckpt_wanted = threading.Event()
        self._ckpt_thread: threading.Thread | None = None
        self._ckpt_stop = False
        self._ckpt_error: BaseException | None = None
        self._bg_checkpoint = False  # asked of the background thread
        self._bg_writeback: tuple[int, int] | None = None
        self.data_bytes = 0  # bytes of data blocks written by this writer
        self._setup_synced = True  # the staging's own files are durable (see _create)
        self._wb_mark = qcow.next_offset  # staged data before this offset: writeback started

    # -- creation and resume -----------------------------------------------------------
    @classmethod
    def _create(cls, disk: DiskReplica, cycle_id: str, sdir: Path, base_point: str | None,
                seq: int) -> CycleWriter:
        # Nothing is fsynced here: until its first checkpoint a staging holds nothing
        # durable to resume from (a crash may leave it half-written: it is then started
        # over); the first checkpoint makes these files and directories durable.
        tmp = sdir.with_name(sdir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        backing = f"{base_point}.qcow2" if base_point else None
        _write_durable(tmp / "cycle.json", _json_bytes({"cycle_id": cycle_id, "base": base_point, "seq": seq,
                                                         "size": disk.size}), atomic=False, sync=False)
        _write_durable(tmp / "journal", _JHEAD.pack(JOURNAL_MAGIC, seq, disk.size, 0), atomic=False,
                       sync=False)
        q = Qcow2Writer(tmp / "data.qcow2", disk.size, backing)
        q.close()
        os.rename(tmp, sdir)
        w = cls._open(disk, cycle_id, sdir, base_point, seq)
        w._setup_synced = False
        return w

    @classmethod
    def _open(cls, disk: DiskReplica, cycle_id: str, sdir: Path, base_point: str | None,
              seq: int) -> CycleWriter:
        backing = f"{base_point}.qcow2" if base_point else None
        q = Qcow2Writer(sdir / "data.qcow2", disk.size, backing, _existing=True)
        jfd = os.open(sdir / "journal", os.O_RDWR)
        return cls(disk, cycle_id, sdir, base_point, seq, q, jfd)

    @classmethod
    def _resume(cls, disk: DiskReplica, cycle_id: str, sdir: Path, base_point: str | None, seq: int,
                clear: bool = True) -> CycleWriter:
        cyc = json.loads((sdir / "cycle.json").read_text())
        if cyc["cycle_id"] != cycle_id or cyc["base"] != base_point or int(cyc["size"]) != disk.size \
                or int(cyc["seq"]) != seq:
            raise Conflict(f"staged cycle {cycle_id} was based on {cyc['base']}, not {base_point}")
        raw = (sdir / "journal").read_bytes()
        if len(raw) < _JHEAD.size or _JHEAD.unpack(raw[:_JHEAD.size])[:3] != (JOURNAL_MAGIC, seq, disk.size):
            raise IntegrityError(f"{sdir}/journal: bad header")
        w = cls._open(disk, cycle_id, sdir, base_point, seq)
        try:
            if clear:
                (sdir / "commit.json").unlink(missing_ok=True)
                os.pwrite(w.qcow.fd, bytes(4096), 0)  # a finalized-then-failed attempt: no header
            w._replay(raw)
        except BaseException:
            w._close()
            raise
        return w

    def _replay(self, raw: bytes) -> None:
        pos = _JHEAD.size
        records: list[tuple[int, int, int, bytes]] = []
        while pos + _JREC_LEN <= len(raw):
            body = raw[pos:pos + _JREC.size]
            if xxhash.xxh3_64_digest(body) != raw[pos + _JREC.size:pos + _JREC_LEN]:
                break
            kind, a, b, dg = _JREC.unpack(body)
            if kind not in (REC_DATA, REC_ZERO):
                break
            records.append((kind, a, b, dg))
            pos += _JREC_LEN
        q = self.qcow
        size = self.disk.size
        n = self.disk.n_blocks
        end = CLUSTER_SIZE
        file_size = os.fstat(q.fd).st_size
        final: dict[int, tuple[int, int, bytes]] = {}  # data index -> (offset, order, digest)
        zero_runs: list[tuple[int, int, int]] = []
        for order, (kind, a, b, dg) in enumerate(records):
            if kind == REC_DATA:
                if a >= n or b % CLUSTER_SIZE or b < CLUSTER_SIZE or b + CLUSTER_SIZE > file_size:
                    continue
                final[a] = (b, order, dg)
                end = max(end, b + CLUSTER_SIZE)
            else:
                if a + b > n:
                    continue
                zero_runs.append((a, b, order))
        # apply in journal order: zero runs and data records interleave
        events: list[tuple[int, int, int, int, bytes]] = []
        for i, (off, order, dg) in final.items():
            events.append((order, REC_DATA, i, off, dg))
        for a, b, order in zero_runs:
            events.append((order, REC_ZERO, a, b, b""))
        events.sort()
        for _order, kind, a, b, dg in events:
            if kind == REC_DATA:
                length = block_length(size, a)
                data = os.pread(q.fd, length, b)
                if len(data) != length or block_digest(data) != dg:
                    log.warning("disk %s cycle %s: staged block %d does not match its journal; dropped",
                                self.disk.disk_id, self.cycle_id, a)
                    if q.entry(a):  # an earlier zero run set it: the block's state is unknown now
                        q.unmap(a)
                    continue
                q.map_data(a, b)
                self._set_digest(a, dg)
            else:
                q.map_zero(a, b)
                self._set_zero_digests(a, b)
        q.truncate_to(end)
        # rewrite the journal from the surviving state (drops records of corrupt blocks)
        kept: list[bytes] = []
        run: list[int] = []  # [start, count] of the current zero run

        def flush_run() -> None:
            if run:
                kept.append(self._record(REC_ZERO, run[0], run[1], bytes(16)))
                self.received.add_range(run[0], run[1])
                run.clear()

        for i, e in q.iter_entries():
            if e & OFLAG_ZERO:
                if run and run[0] + run[1] == i:
                    run[1] += 1
                else:
                    flush_run()
                    run.extend((i, 1))
            else:
                flush_run()
                self.received.add(i)
                r = self._digests[i // L2_ENTRIES]
                j = (i % L2_ENTRIES) * DIGEST_SIZE
                kept.append(self._record(REC_DATA, i, e & OFFSET_MASK, bytes(r[j:j + DIGEST_SIZE])))
        flush_run()
        q.sync_data()
        jpath = self.dir / "journal"
        _write_durable(jpath, _JHEAD.pack(JOURNAL_MAGIC, self.seq, size, 0) + b"".join(kept))
        os.close(self._jfd)
        self._jfd = os.open(jpath, os.O_RDWR)

    # -- digests of this cycle -------------------------------------------------------------
    def _dregion(self, index: int) -> bytearray:
        ri = index // L2_ENTRIES
        r = self._digests.get(ri)
        if r is None:
            r = self._digests[ri] = bytearray(L2_ENTRIES * DIGEST_SIZE)
        return r

    def _set_digest(self, index: int, dg: bytes) -> None:
        r = self._dregion(index)
        j = (index % L2_ENTRIES) * DIGEST_SIZE
        r[j:j + DIGEST_SIZE] = dg

    def _set_zero_digests(self, start: int, count: int) -> None:
        size = self.disk.size
        end = start + count
        zd = zero_block_digest(BLOCK_SIZE)
        i = start
        while i < end:
            r = self._dregion(i)
            j0 = i % L2_ENTRIES
            m = min(end - i, L2_ENTRIES - j0)
            r[j0 * DIGEST_SIZE:(j0 + m) * DIGEST_SIZE] = zd * m
            i += m
        last = end - 1
        if block_length(size, last) != BLOCK_SIZE:
            self._set_digest(last, zero_block_digest(block_length(size, last)))

    def _apply_changes(self, base: HashTable, delta_limit: int
                       ) -> tuple[HashTable, list[tuple[int, bytes]] | None, int, int]:
        """The base table with this cycle's digests applied; (table, delta entries or None when
        more than `delta_limit` blocks changed, blocks changed, data bytes changed)."""
        size = self.disk.size
        n = self.disk.n_blocks
        new = bytearray(base.to_bytes())
        q = self.qcow
        count = q.mapped()
        delta: list[tuple[int, bytes]] | None = [] if count <= delta_limit else None
        total = 0
        if delta is not None:
            for i, e in q.iter_entries():
                r = self._digests[i // L2_ENTRIES]
                j = (i % L2_ENTRIES) * DIGEST_SIZE
                dg = bytes(r[j:j + DIGEST_SIZE])
                new[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] = dg
                delta.append((i, dg))
                if not e & OFLAG_ZERO:
                    total += block_length(size, i)
            return HashTable(size, new), delta, count, total
        # a big cycle (a seed): region by region, whole regions copied at once
        for ri, l2, mapped in q.region_entries():
            base_i = ri * L2_ENTRIES
            r = self._digests[ri]
            span = min(L2_ENTRIES, n - base_i)
            if mapped == span:
                new[base_i * DIGEST_SIZE:(base_i + span) * DIGEST_SIZE] = r[:span * DIGEST_SIZE]
            for j, (e,) in enumerate(struct.iter_unpack(">Q", l2)):
                if not e:
                    continue
                if mapped != span:
                    new[(base_i + j) * DIGEST_SIZE:(base_i + j + 1) * DIGEST_SIZE] = \
                        r[j * DIGEST_SIZE:(j + 1) * DIGEST_SIZE]
                if not e & OFLAG_ZERO:
                    total += block_length(size, base_i + j)
        return HashTable(size, new), None, count, total

    # -- receiving ---------------------------------------------------------------------
    @staticmethod
    def _record(kind: int, a: int, b: int, dg: bytes) -> bytes:
        body = _JREC.pack(kind, a, b, dg)
        return body + xxhash.xxh3_64_digest(body)

    def _check_open(self) -> None:
        if self._closed:
            raise Conflict(f"cycle {self.cycle_id} is closed (committed, aborted or superseded)")

    def _request_background(self, checkpoint: bool = False, writeback: tuple[int, int] | None = None) -> None:
        """Ask the background thread (started on first use) for a checkpoint and/or to
        start the writeback of a range of the data file: the receiving threads never
        block on the disk for either (starting writeback can block for a while too)."""
        with self._lock:
            if self._closed:
                return
            if self._ckpt_thread is None:
                self._ckpt_thread = threading.Thread(target=self._background, daemon=True,
                                                     name=f"checkpoint-{self.cycle_id}")
                self._ckpt_thread.start()
            if checkpoint:
                self._bg_checkpoint = True
            if writeback is not None:
                old = self._bg_writeback
                self._bg_writeback = writeback if old is None else (min(old[0], writeback[0]),
                                                                     max(old[1], writeback[1]))
        self._ckpt_wanted.set()

    def _request_checkpoint(self) -> None:
        self._request_background(checkpoint=True)

    def _background(self) -> None:
        while True:
            self._ckpt_wanted.wait()
            self._ckpt_wanted.clear()
            if self._ckpt_stop:
                return
            with self._lock:
                wb, self._bg_writeback = self._bg_writeback, None
                ckpt, self._bg_checkpoint = self._bg_checkpoint, False
            if wb is not None:  # _close joins this thread before it closes the descriptor
                _kick_writeback(self.qcow.fd, wb[0], wb[1] - wb[0])
            if not ckpt:
                continue
            try:
                self.checkpoint()
            except BaseException as e:  # noqa: BLE001 - raised to the writers
                if not self._closed:
                    self._ckpt_error = e
                return

    def _raise_checkpoint_error(self) -> None:
        e = self._ckpt_error
        if e is not None:
            raise e

    def write(self, offset: int, data: bytes | bytearray | memoryview, digest: bytes | None = None) -> None:
        """Stage one whole block at `offset` (block aligned); thread-safe; the last write wins.

        `digest`: the block's xxh3-128 when the caller has just checked it against these
        bytes (the receiver does, before applying a block): it is not computed again.
        `data` may be a memoryview (no copy is made)."""
        self._check_open()
        self._raise_checkpoint_error()
        index, rem = divmod(offset, BLOCK_SIZE)
        if rem or not 0 <= index < self.disk.n_blocks:
            raise BadInput(f"block offset {offset} is not block aligned inside the disk")
        length = block_length(self.disk.size, index)
        if len(data) != length:
            raise BadInput(f"block {index} must be {length} bytes, got {len(data)}")
        dg = block_digest(data) if digest is None else digest
        # a zero block hashes to the zero digest: compare the bytes only then (comparing a
        # memoryview goes element by element: compare bytes)
        if dg == zero_block_digest(length) and bytes(data) == _ZERO_BLOCK[:length]:
            self.write_zero(offset, length)
            return
        q = self.qcow
        with self._lock:
            self._check_open()
            self._inflight += 1
        try:
            with _space_errors():
                off = q.reserve()
                q.pwrite_cluster(off, data)
        finally:
            with self._lock:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.notify_all()
        rec = self._record(REC_DATA, index, off, dg)
        kick = 0
        with self._lock:
            self._check_open()
            q.map_data(index, off)
            self._set_digest(index, dg)
            self._pending.append(rec)
            self._pending_idx.append((index, 1))
            self._since_ckpt += CLUSTER_SIZE
            self.data_bytes += length
            since = self._since_ckpt
            if off + CLUSTER_SIZE - self._wb_mark >= self.writeback_bytes:
                kick, self._wb_mark = self._wb_mark, off + CLUSTER_SIZE
        if kick:
            self._request_background(writeback=(kick, off + CLUSTER_SIZE))
        if since >= self.checkpoint_bytes:
            if since >= CHECKPOINT_LAG * self.checkpoint_bytes:
                self.checkpoint()  # the background checkpoints fell behind: wait for one
            else:
                self._request_checkpoint()

    def write_zero(self, offset: int, length: int) -> None:
        """Stage a run of zero blocks (no data is stored); thread-safe."""
        self._check_open()
        start, rem = divmod(offset, BLOCK_SIZE)
        end_off = offset + length
        if rem or length <= 0 or end_off > self.disk.size or (end_off % BLOCK_SIZE and end_off != self.disk.size):
            raise BadInput(f"zero run {offset}+{length} is not a block-aligned run inside the disk")
        count = n_blocks(end_off) - start
        rec = self._record(REC_ZERO, start, count, bytes(16))
        with self._lock:
            self._check_open()
            self.qcow.map_zero(start, count)
            self._set_zero_digests(start, count)
            self._pending.append(rec)
            self._pending_idx.append((start, count))

    def checkpoint(self) -> None:
        """Make every block staged so far durable (data then journal) and add it to `received`."""
        self._raise_checkpoint_error()
        with self._ckpt_lock:
            with self._lock:
                self._check_open()
                recs, self._pending = self._pending, []
                idx, self._pending_idx = self._pending_idx, []
                self._since_ckpt = 0
            if not recs:
                return
            with _space_errors():
                self.qcow.sync_data()
                end = os.lseek(self._jfd, 0, os.SEEK_END)
                body = b"".join(recs)
                mv = memoryview(body)
                pos = end
                while mv:
                    n = os.pwrite(self._jfd, mv, pos)
                    mv = mv[n:]
                    pos += n
                os.fsync(self._jfd)
                if not self._setup_synced:
                    _fsync_paths([self.dir / "cycle.json", self.dir, self.dir.parent])
                    self._setup_synced = True
            for start, count in idx:
                if count == 1:
                    self.received.add(start)
                else:
                    self.received.add_range(start, count)

    def commit(self, expected_digest: bytes, consistency: str, created_at: float,
               meta: dict[str, Any] | None = None) -> RecoveryPoint:
        """Verify the disk digest and make the cycle a durable recovery point atomically."""
        if consistency not in ("crash", "app"):
            raise BadInput(f"consistency must be 'crash' or 'app', got {consistency!r}")
        if not isinstance(expected_digest, (bytes, bytearray)) or len(expected_digest) != DIGEST_SIZE:
            raise BadInput("the expected disk digest is 16 bytes")
        meta = dict(meta or {})
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise BadInput(f"point meta must be JSON: {e}") from e
        if self.data_bytes >= self.roll_forward_bytes:
            self.checkpoint()  # the commit intent needs every staged block journaled
        else:
            self._raise_checkpoint_error()
        with self.disk._locked():
            self._check_open()
            return self.disk._commit_point(self, bytes(expected_digest), consistency, created_at, meta)

    def abort(self) -> None:
        """Drop the staged cycle."""
        with self.disk._locked():
            self._discard()

    # -- internals ---------------------------------------------------------------------
    def _close(self) -> None:
        t = self._ckpt_thread
        if t is not None and t is not threading.current_thread():
            self._ckpt_stop = True
            self._ckpt_wanted.set()
            t.join()
        with self._ckpt_lock:  # no checkpoint is using the descriptors
            with self._lock:
                if self._closed:
                    return
                self._closed = True
                while self._inflight:  # nor any write
                    self._idle.wait()
            self.qcow.close()
            if self._jfd >= 0:
                os.close(self._jfd)
                self._jfd = -1

    def _discard(self) -> None:
        self._close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.disk._active is self:
            self.disk._active = None

    def _detach(self, keep: bool) -> None:
        """Superseded by a new begin_cycle: checkpoint (when resumable) and close."""
        if keep and not self._closed:
            try:
                self.checkpoint()
            except (OSError, StandbyError):
                pass
        self._close()
