"""A minimal qcow2 (version 3) writer and reader for the layers of the replica store.

Only what the store produces is supported, and every file it writes is a valid qcow2
that `qemu-img check` accepts and QEMU can use as a (read-only) backing file:

- version 3, cluster size 64 KiB (= BLOCK_SIZE, so one guest block is one cluster),
  16-bit refcounts (refcount_order 4), no encryption, no compression, no snapshots,
  no extended L2 entries, no external data file, no feature bits set;
- optional backing file (name stored in cluster 0 right after the header and its
  extensions, usually relative to the layer's directory) with a backing format header
  extension ("qcow2");
- an L2 entry is either 0 (unallocated: read from the backing file), the zero flag
  alone (bit 0: the cluster reads as zeros without any data), or a data cluster
  (host offset | COPIED, refcount exactly 1).

File layout written by `Qcow2Writer` (all offsets cluster aligned):

    cluster 0          header + extensions + backing name; written LAST, at finalize
    clusters 1..D-1    data clusters, appended in arrival order (any guest order)
    then               L2 tables (one per 512 MiB region that has entries),
                       the L1 table, the refcount blocks, the refcount table

Until `finalize()` writes cluster 0 the file starts with zeros and is not a qcow2
(magic missing): a half-written layer is never mistaken for a valid one.

`Qcow2Writer.open_existing()` reopens a finished layer to merge more blocks into it
in place, copy-on-write style: new data and fresh metadata are appended past the end
of the file, then the header is rewritten in one write of under 4 KiB. Old metadata
and superseded data clusters are left in place with refcount 0 (garbage a later
compaction reclaims), so a reader (QEMU included) that parsed the old header keeps
reading a consistent old image, and a crash at any byte leaves either the old or the
new image.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from standby.errors import IntegrityError

CLUSTER_BITS = 16
CLUSTER_SIZE = 1 << CLUSTER_BITS
L2_ENTRIES = CLUSTER_SIZE // 8  # 8192 guest clusters (512 MiB) per L2 table
REFCOUNT_ORDER = 4  # 16-bit refcounts
REFCOUNT_ENTRIES = CLUSTER_SIZE * 8 // (1 << REFCOUNT_ORDER)  # 32768 clusters per refcount block

MAGIC = b"QFI\xfb"
HEADER_FMT = ">4sIQIIQIIQQIIQQQQII"
HEADER_LEN = struct.calcsize(HEADER_FMT)  # 104
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_END = 0

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00

ZERO_ENTRY = OFLAG_ZERO.to_bytes(8, "big")
_BE_Q = struct.Struct(">Q")

MAX_CHAIN = 4096
TOUCHED_LIMIT = 1 << 16
MAX_SIZE = 1 << 50  # 1 PiB: far above any disk, bounds what a garbled header can ask for


def _align(n: int) -> int:
    return (n + CLUSTER_SIZE - 1) & ~(CLUSTER_SIZE - 1)


def _fsync_fd(fd: int) -> None:
    os.fsync(fd)


class Qcow2Error(IntegrityError):
    """A file is not a qcow2 layer this module can read."""


@dataclass(frozen=True)
class Header:
    size: int
    backing: str | None
    backing_format: str | None
    l1_size: int
    l1_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int


def _encode_header(size: int, backing: str | None, l1_size: int, l1_offset: int,
                   rt_offset: int, rt_clusters: int) -> bytes:
    exts = b""
    if backing is not None:
        fmt = b"qcow2"
        exts += struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt + bytes(-len(fmt) % 8)
    exts += struct.pack(">II", EXT_END, 0)
    name = backing.encode() if backing is not None else b""
    backing_offset = HEADER_LEN + len(exts) if backing is not None else 0
    if len(name) > 1023:
        raise ValueError("backing file name too long")
    head = struct.pack(HEADER_FMT, MAGIC, 3, backing_offset, len(name), CLUSTER_BITS, size, 0,
                       l1_size, l1_offset, rt_offset, rt_clusters, 0, 0,
                       0, 0, 0, REFCOUNT_ORDER, HEADER_LEN)
    out = head + exts + name
    assert len(out) < 4096
    return out


def read_header(f_or_fd: int, path: str = "?") -> Header:
    buf = os.pread(f_or_fd, 4096, 0)
    if len(buf) < HEADER_LEN or buf[:4] != MAGIC:
        raise Qcow2Error(f"{path}: not a qcow2 file (no magic)")
    (magic, version, backing_offset, backing_size, cluster_bits, size, crypt, l1_size, l1_offset,
     rt_offset, rt_clusters, nb_snap, _snap_off, incompat, _compat, _autoclear, rorder,
     hlen) = struct.unpack(HEADER_FMT, buf[:HEADER_LEN])
    if version != 3:
        raise Qcow2Error(f"{path}: qcow2 version {version}, expected 3")
    if cluster_bits != CLUSTER_BITS or crypt != 0 or incompat != 0 or rorder != REFCOUNT_ORDER:
        raise Qcow2Error(f"{path}: unsupported qcow2 features (cluster_bits={cluster_bits}, "
                         f"crypt={crypt}, incompatible={incompat:#x}, refcount_order={rorder})")
    if nb_snap:
        raise Qcow2Error(f"{path}: internal snapshots are not supported")
    backing_format = None
    pos = hlen
    while pos + 8 <= len(buf):
        etype, elen = struct.unpack(">II", buf[pos:pos + 8])
        if etype == EXT_END:
            break
        if etype == EXT_BACKING_FORMAT:
            backing_format = buf[pos + 8:pos + 8 + elen].decode()
        pos += 8 + elen + (-elen % 8)
    backing = None
    if backing_offset:
        if backing_offset + backing_size > len(buf):
            raise Qcow2Error(f"{path}: backing file name outside the header page")
        backing = buf[backing_offset:backing_offset + backing_size].decode()
    if l1_offset % CLUSTER_SIZE or (l1_size and l1_offset == 0):
        raise Qcow2Error(f"{path}: bad L1 table offset")
    if l1_size * L2_ENTRIES * CLUSTER_SIZE < size:
        raise Qcow2Error(f"{path}: L1 table too small for the virtual size")
    return Header(size, backing, backing_format, l1_size, l1_offset, rt_offset, rt_clusters)


class Qcow2Reader:
    """Reads the L1/L2 maps and data of one layer (no backing resolution here)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            self.header = read_header(self.fd, str(self.path))
            h = self.header
            self.file_size = os.fstat(self.fd).st_size
            if h.size > MAX_SIZE or h.l1_offset + h.l1_size * 8 > self.file_size:
                raise Qcow2Error(f"{self.path}: L1 table or virtual size out of bounds (truncated file?)")
            raw = os.pread(self.fd, h.l1_size * 8, h.l1_offset) if h.l1_size else b""
            if len(raw) != h.l1_size * 8:
                raise Qcow2Error(f"{self.path}: L1 table truncated")
            self.l1 = [(e & OFFSET_MASK) for e in struct.unpack(f">{h.l1_size}Q", raw)]
            self._l2: dict[int, tuple[int, ...]] = {}
        except BaseException:
            os.close(self.fd)
            raise

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def backing(self) -> str | None:
        return self.header.backing

    def backing_path(self) -> Path | None:
        b = self.header.backing
        if b is None:
            return None
        p = Path(b)
        return p if p.is_absolute() else self.path.parent / p

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Qcow2Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def l2_table(self, l1_index: int) -> tuple[int, ...] | None:
        """The raw L2 entries of a region, or None when the region has no L2 table."""
        if l1_index >= len(self.l1):
            return None
        off = self.l1[l1_index]
        if off == 0:
            return None
        t = self._l2.get(l1_index)
        if t is None:
            raw = os.pread(self.fd, CLUSTER_SIZE, off)
            if len(raw) != CLUSTER_SIZE:
                raise Qcow2Error(f"{self.path}: L2 table at {off} truncated")
            t = struct.unpack(f">{L2_ENTRIES}Q", raw)
            for e in t:
                if e & OFLAG_COMPRESSED:
                    raise Qcow2Error(f"{self.path}: compressed clusters are not supported")
            self._l2[l1_index] = t
        return t

    def entry(self, index: int) -> int:
        """Raw L2 entry of guest cluster `index` (0 when unallocated)."""
        t = self.l2_table(index // L2_ENTRIES)
        return 0 if t is None else t[index % L2_ENTRIES]

    def entries(self) -> dict[int, int]:
        """Every non-zero L2 entry: {guest cluster index: raw entry} (small layers)."""
        return dict(self.iter_entries())

    def iter_entries(self) -> Iterator[tuple[int, int]]:
        """(guest cluster index, raw entry) of every non-zero L2 entry, in guest order."""
        for l1i in range(len(self.l1)):
            t = self.l2_table(l1i)
            if t is None:
                continue
            base = l1i * L2_ENTRIES
            for j, e in enumerate(t):
                if e:
                    yield base + j, e
            self._l2.pop(l1i, None)  # streaming: do not keep every table of a big layer

    def read_cluster(self, host_offset: int) -> bytes:
        data = os.pread(self.fd, CLUSTER_SIZE, host_offset)
        if len(data) != CLUSTER_SIZE:
            raise Qcow2Error(f"{self.path}: data cluster at {host_offset} truncated")
        return data


class Qcow2Chain:
    """A layer and its backing files, top first; reads guest blocks through the chain."""

    def __init__(self, top: Path | str) -> None:
        self.layers: list[Qcow2Reader] = []
        path: Path | None = Path(top)
        try:
            while path is not None:
                if len(self.layers) >= MAX_CHAIN:
                    raise Qcow2Error(f"{top}: backing chain longer than {MAX_CHAIN}")
                r = Qcow2Reader(path)
                if self.layers and r.size < self.layers[-1].size:
                    pass  # a smaller backing file reads as zeros past its end (qcow2 rule)
                self.layers.append(r)
                if r.header.backing is not None and r.header.backing_format not in (None, "qcow2"):
                    raise Qcow2Error(f"{path}: backing format {r.header.backing_format} not supported")
                path = r.backing_path()
        except BaseException:
            self.close()
            raise
        self.size = self.layers[0].size

    def close(self) -> None:
        for r in self.layers:
            r.close()

    def __enter__(self) -> Qcow2Chain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def locate(self, index: int) -> tuple[Qcow2Reader, int] | None:
        """(layer, host offset) holding guest cluster `index`, or None when it reads as zeros."""
        for r in self.layers:
            if index * CLUSTER_SIZE >= r.size:
                return None
            e = r.entry(index)
            if e == 0:
                continue
            if e & OFLAG_ZERO:
                return None
            return r, e & OFFSET_MASK
        return None

    def read_block(self, index: int) -> bytes:
        """Guest block `index`, its real length (the last block of the disk may be short)."""
        length = min(CLUSTER_SIZE, self.size - index * CLUSTER_SIZE)
        if length <= 0:
            raise IndexError(index)
        loc = self.locate(index)
        if loc is None:
            return bytes(length)
        r, off = loc
        data = r.read_cluster(off)
        return data[:length]


class Qcow2Writer:
    """Builds one layer: data clusters appended as they come, metadata + header at finalize.

    `write_block` is thread-safe: a cluster is reserved under the lock and written with
    pwrite outside it. A guest block written twice keeps the last data (the first
    cluster becomes unreferenced garbage with refcount 0).
    """

    def __init__(self, path: Path | str, size: int, backing: str | None, *,
                 _existing: bool = False) -> None:
        if size <= 0 or size % 512:
            raise ValueError("virtual size must be a positive multiple of 512")
        self.path = Path(path)
        self.size = size
        self.backing = backing
        self.n_clusters = (size + CLUSTER_SIZE - 1) // CLUSTER_SIZE
        self.l1_size = (self.n_clusters + L2_ENTRIES - 1) // L2_ENTRIES
        self._lock = threading.Lock()
        self._l2: dict[int, bytearray] = {}  # region -> big-endian L2 entries
        self._l2_count: dict[int, int] = {}  # region -> non-zero entries
        self._data_clusters = 0  # live data clusters referenced by the L2 maps
        # guest indexes ever mapped, while few (fast iteration for small deltas)
        self._touched: set[int] | None = set()
        self.garbage_clusters = 0
        flags = os.O_RDWR if _existing else os.O_RDWR | os.O_CREAT | os.O_TRUNC
        self.fd = os.open(self.path, flags, 0o644)
        if _existing:
            self.next_offset = max(CLUSTER_SIZE, _align(os.fstat(self.fd).st_size))
        else:
            self.next_offset = CLUSTER_SIZE  # cluster 0 is the header, written last

    # -- building -----------------------------------------------------------------
    @classmethod
    def open_existing(cls, path: Path | str) -> Qcow2Writer:
        """Reopen a finished layer to merge more blocks into it (append-only, see module doc)."""
        with Qcow2Reader(path) as r:
            h = r.header
            w = cls(path, h.size, h.backing, _existing=True)
            w.next_offset = _align(r.file_size)
            w._touched = None
            live = 0
            for ri, off in enumerate(r.l1):
                if not off:
                    continue
                raw = os.pread(r.fd, CLUSTER_SIZE, off)
                if len(raw) != CLUSTER_SIZE:
                    raise Qcow2Error(f"{path}: L2 table at {off} truncated")
                nonzero = 0
                for (e,) in struct.iter_unpack(">Q", raw):
                    if e:
                        nonzero += 1
                        if e & OFLAG_COMPRESSED:
                            raise Qcow2Error(f"{path}: compressed clusters are not supported")
                        if not e & OFLAG_ZERO:
                            live += 1
                if nonzero:
                    w._l2[ri] = bytearray(raw)
                    w._l2_count[ri] = nonzero
        w._data_clusters = live
        w.garbage_clusters = w.next_offset // CLUSTER_SIZE - 1 - live
        return w

    def _region(self, index: int) -> tuple[bytearray, int]:
        ri, j = divmod(index, L2_ENTRIES)
        t = self._l2.get(ri)
        if t is None:
            t = self._l2[ri] = bytearray(CLUSTER_SIZE)
            self._l2_count[ri] = 0
        return t, ri

    def _set(self, index: int, entry: int) -> int:
        """Set the raw entry of guest cluster `index`; returns the previous entry (lock held)."""
        if not 0 <= index < self.n_clusters:
            raise IndexError(f"guest cluster {index} outside a disk of {self.n_clusters} clusters")
        t, ri = self._region(index)
        pos = (index % L2_ENTRIES) * 8
        old = _BE_Q.unpack_from(t, pos)[0]
        _BE_Q.pack_into(t, pos, entry)
        if old == 0 and entry != 0:
            self._l2_count[ri] += 1
        elif old != 0 and entry == 0:
            self._l2_count[ri] -= 1
        if old and not old & OFLAG_ZERO:
            self._data_clusters -= 1
            self.garbage_clusters += 1
        if entry and not entry & OFLAG_ZERO:
            self._data_clusters += 1
        if entry and self._touched is not None:
            self._touched.add(index)
            if len(self._touched) > TOUCHED_LIMIT:
                self._touched = None
        return old

    def entry(self, index: int) -> int:
        t = self._l2.get(index // L2_ENTRIES)
        return 0 if t is None else _BE_Q.unpack_from(t, (index % L2_ENTRIES) * 8)[0]

    def reserve(self) -> int:
        """Reserve the next data cluster; returns its host offset (thread-safe)."""
        with self._lock:
            off = self.next_offset
            self.next_offset += CLUSTER_SIZE
            return off

    def write_block(self, index: int, data: bytes | memoryview) -> int:
        """Append guest block `index` as a new data cluster; returns its host offset."""
        if len(data) > CLUSTER_SIZE:
            raise ValueError("a block is at most one cluster")
        off = self.reserve()
        self.pwrite_cluster(off, data)
        self.map_data(index, off)
        return off

    def pwrite_cluster(self, off: int, data: bytes | memoryview) -> None:
        if len(data) < CLUSTER_SIZE:
            data = bytes(data) + bytes(CLUSTER_SIZE - len(data))
        _pwrite_all(self.fd, data, off)  # a short write is retried: ENOSPC surfaces as OSError

    def map_data(self, index: int, off: int) -> None:
        with self._lock:
            self._set(index, off | OFLAG_COPIED)

    def map_zero(self, start: int, count: int) -> None:
        """Mark guest clusters [start, start+count) as reading zeros (no data)."""
        if count <= 0:
            return
        if start < 0 or start + count > self.n_clusters:
            raise IndexError("zero run outside the disk")
        with self._lock:
            i = start
            end = start + count
            while i < end:
                t, ri = self._region(i)
                j0 = i % L2_ENTRIES
                n = min(end - i, L2_ENTRIES - j0)
                if n == L2_ENTRIES or n > 64:
                    # fast path: account for what is replaced, then overwrite the slice
                    old = memoryview(t)[j0 * 8:(j0 + n) * 8]
                    nonzero = 0
                    data = 0
                    for (e,) in struct.iter_unpack(">Q", old):
                        if e:
                            nonzero += 1
                            if not e & OFLAG_ZERO:
                                data += 1
                    old.release()
                    t[j0 * 8:(j0 + n) * 8] = ZERO_ENTRY * n
                    if self._touched is not None:
                        if len(self._touched) + n > TOUCHED_LIMIT:
                            self._touched = None
                        else:
                            self._touched.update(range(i, i + n))
                    self._l2_count[ri] += n - nonzero
                    self._data_clusters -= data
                    self.garbage_clusters += data
                else:
                    for k in range(n):
                        self._set(i + k, OFLAG_ZERO)
                i += n

    def unmap(self, index: int) -> None:
        with self._lock:
            self._set(index, 0)

    def mapped(self) -> int:
        return sum(self._l2_count.values())

    def data_clusters(self) -> int:
        return self._data_clusters

    def iter_entries(self) -> Iterator[tuple[int, int]]:
        """(guest index, raw entry) of every mapped cluster, in guest order.

        Not to be mixed with concurrent writes (use it once the writes are done).
        """
        if self._touched is not None:
            for i in sorted(self._touched):
                e = self.entry(i)
                if e:
                    yield i, e
            return
        for ri in sorted(self._l2):
            if not self._l2_count[ri]:
                continue
            base = ri * L2_ENTRIES
            for j, (e,) in enumerate(struct.iter_unpack(">Q", self._l2[ri])):
                if e:
                    yield base + j, e

    def region_entries(self) -> Iterator[tuple[int, bytearray, int]]:
        """(region, raw big-endian L2 table, mapped count) of every region with entries."""
        for ri in sorted(self._l2):
            if self._l2_count[ri]:
                yield ri, self._l2[ri], self._l2_count[ri]

    def truncate_to(self, end: int) -> None:
        """Drop everything at or after `end` (resuming a writer: unjournaled appends)."""
        end = _align(max(end, CLUSTER_SIZE))
        with self._lock:
            os.ftruncate(self.fd, end)
            self.next_offset = end

    def sync_data(self) -> None:
        os.fsync(self.fd)

    # -- finalize -----------------------------------------------------------------
    def finalize(self, header_last: bool = True, sync: bool = True) -> int:
        """Write L2/L1/refcount tables, fsync, then the header, fsync. Returns the file size.

        `header_last=False` writes the header right after the tables and fsyncs once: for
        a new layer that nothing references yet (its owner publishes it only after this
        returns), where a torn layer is never read. A layer that is in use (a merge) keeps
        the header-last order. `sync=False` leaves the final fsync to the caller."""
        with self._lock:
            regions = [ri for ri in sorted(self._l2) if self._l2_count[ri]]
            data_end = self.next_offset
            n_l2 = len(regions)
            l1_clusters = max(1, _align(self.l1_size * 8) // CLUSTER_SIZE)
            # refcount blocks and table must cover the whole file, themselves included
            rb = rt = 1
            while True:
                total = data_end // CLUSTER_SIZE + n_l2 + l1_clusters + rb + rt
                need_rb = (total + REFCOUNT_ENTRIES - 1) // REFCOUNT_ENTRIES
                need_rt = max(1, _align(need_rb * 8) // CLUSTER_SIZE)
                if need_rb <= rb and need_rt <= rt:
                    break
                rb, rt = max(rb, need_rb), max(rt, need_rt)
            pos = data_end
            l2_offsets: dict[int, int] = {}
            for ri in regions:
                l2_offsets[ri] = pos
                pos += CLUSTER_SIZE
            l1_offset = pos
            pos += l1_clusters * CLUSTER_SIZE
            rb_offset = pos
            pos += rb * CLUSTER_SIZE
            rt_offset = pos
            pos += rt * CLUSTER_SIZE
            file_end = pos

            refc = bytearray(rb * CLUSTER_SIZE)

            def ref(off: int, n: int = 1) -> None:
                c = off // CLUSTER_SIZE
                refc[c * 2:(c + n) * 2] = b"\x00\x01" * n

            ref(0)
            for _i, e in self.iter_entries():
                if not e & OFLAG_ZERO:
                    ref(e & OFFSET_MASK)
            ref(data_end, (file_end - data_end) // CLUSTER_SIZE)

            l1 = bytearray(l1_clusters * CLUSTER_SIZE)
            for ri, off in l2_offsets.items():
                _BE_Q.pack_into(l1, ri * 8, off | OFLAG_COPIED)
            rtab = bytearray(rt * CLUSTER_SIZE)
            for k in range(rb):
                _BE_Q.pack_into(rtab, k * 8, rb_offset + k * CLUSTER_SIZE)

            meta = b"".join(bytes(self._l2[ri]) for ri in regions) + bytes(l1) + bytes(refc) + bytes(rtab)
            _pwrite_all(self.fd, meta, data_end)
            if os.fstat(self.fd).st_size > file_end:
                os.ftruncate(self.fd, file_end)
            if header_last:
                os.fsync(self.fd)
            header = _encode_header(self.size, self.backing, self.l1_size, l1_offset, rt_offset, rt)
            # one write inside the first page: atomic against a process kill
            _pwrite_all(self.fd, header + bytes(4096 - len(header)), 0)
            if sync or header_last:
                os.fsync(self.fd)
            self.next_offset = file_end
            return file_end

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Qcow2Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pwrite_all(fd: int, data: bytes, off: int) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, off)
        if n <= 0:  # pragma: no cover
            raise OSError("pwrite wrote nothing")
        mv = mv[n:]
        off += n


def is_valid_layer(path: Path | str) -> bool:
    try:
        with Qcow2Reader(path):
            return True
    except (OSError, Qcow2Error, ValueError, struct.error, UnicodeDecodeError):
        return False
