"""Reading a backup job's NBD export with libnbd: a change source for the data plane.

A pull-mode backup (libvirt `backupBegin`) or, for a powered-off VM, `qemu-nbd -r`
serves each disk as an NBD export with up to two metadata contexts:

- `base:allocation`: which ranges read as zeros (flag NBD_STATE_ZERO), so they are
  offered to the sender as holes and never read;
- `qemu:dirty-bitmap:<name>` (`backup-<target>` in a libvirt incremental backup, the
  checkpoint's bitmap name under qemu-nbd -B): which ranges changed since the base
  checkpoint (flag 1).

`NbdChangeSource` turns them into the data plane's `ChangeSource`: the dirty extents
(known changed) for an incremental cycle, or every block (seed or hash-scan candidates)
when there is no usable base. Readers (`open_reader`, one per sender thread) each own a
libnbd handle; the bytes they read are counted (`bytes_read`) so a cycle can report what
it cost the hypervisor.

The pure part (turning block-status runs into block-aligned `Extent`s) has no libnbd
dependency and is unit-tested on its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from standby.errors import RemoteError
from standby.replication.changes import BlockReader, Extent, align_extents
from standby.replication.digest import BLOCK_SIZE, HashTable, block_digest, zero_block_digest
from standby.replication.protocol import CycleKind

NBD_STATE_HOLE = 1
NBD_STATE_ZERO = 2
NBD_DIRTY = 1
ALLOCATION = "base:allocation"
# One block_status request covers at most this much (NBD lengths are 32-bit).
_STATUS_SPAN = 1 << 30


# ---------------------------------------------------------------------------- pure extents


def merge_runs(runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged (start, end) ranges from (start, end) ranges."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(r for r in runs if r[1] > r[0]):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def flagged(runs: Iterable[tuple[int, int, int]], mask: int) -> list[tuple[int, int]]:
    """(start, end) of the block-status runs (offset, length, flags) with `mask` set."""
    return merge_runs((o, o + n) for o, n, f in runs if f & mask)


def hole_spans(zero: list[tuple[int, int]], size: int, block_size: int = BLOCK_SIZE) -> list[tuple[int, int]]:
    """The whole blocks inside the merged zero ranges `zero` (a block at the disk's end
    may be short), as block-aligned (start, end) ranges."""
    out: list[tuple[int, int]] = []
    for zs, ze in zero:
        start = -(-zs // block_size) * block_size
        end = size if ze >= size else ze - ze % block_size
        if end > start:
            out.append((start, end))
    return out


def plan_extents(size: int, changed: Iterable[tuple[int, int]] | None, zero: list[tuple[int, int]],
                 known_changed: bool, block_size: int = BLOCK_SIZE) -> list[Extent]:
    """Block-aligned extents to examine: the `changed` (offset, length) byte ranges
    widened to whole blocks (None: the whole disk), cut where whole blocks read as zeros
    (`zero`: merged (start, end) ranges), those pieces marked as holes."""
    spans = [(0, size)] if changed is None else [(o, o + n) for o, n in align_extents(changed, size, block_size)]
    holes = hole_spans(zero, size, block_size)
    out: list[Extent] = []
    h = 0
    for s, e in spans:
        pos = s
        while h < len(holes) and holes[h][1] <= pos:
            h += 1
        j = h
        while pos < e:
            if j < len(holes) and holes[j][0] < e:
                hs, he = max(holes[j][0], pos), min(holes[j][1], e)
                if hs > pos:
                    out.append(Extent(pos, hs - pos, known_changed, False))
                if he > hs:
                    out.append(Extent(hs, he - hs, known_changed, True))
                pos = max(pos, he)
                if holes[j][1] <= e:
                    j += 1
                else:
                    break
            else:
                out.append(Extent(pos, e - pos, known_changed, False))
                pos = e
        if pos < e:
            out.append(Extent(pos, e - pos, known_changed, False))
    return out


# ---------------------------------------------------------------------------- libnbd


@dataclass(frozen=True)
class NbdExport:
    """Where a disk's point-in-time view is served: a unix socket and an export name,
    with the dirty-bitmap context to ask for (None when there is no base)."""

    socket: str
    name: str
    bitmap_context: str | None = None
    what: str = "disk"  # for messages: "VM web01 disk vda"

    def connect(self, *contexts: str) -> Any:
        import nbd

        h = nbd.NBD()
        try:
            for ctx in contexts:
                h.add_meta_context(ctx)
            h.set_export_name(self.name)
            h.connect_unix(self.socket)
        except nbd.Error as exc:
            close_handle(h, shutdown=False)
            raise RemoteError(f"cannot open the NBD export of {self.what} ({self.socket}, "
                              f"export {self.name}): {exc}") from None
        for ctx in contexts:
            if not h.can_meta_context(ctx):
                close_handle(h)
                raise RemoteError(f"the NBD export of {self.what} does not offer {ctx}")
        return h


def close_handle(h: Any, shutdown: bool = True) -> None:
    """Disconnect and release a libnbd handle (`close()` exists from libnbd 1.16 on;
    older bindings release it when the object is collected)."""
    if shutdown:
        try:
            h.shutdown()
        except Exception:  # noqa: BLE001 - the server may be gone already
            pass
    close = getattr(h, "close", None)
    if callable(close):
        close()


def block_status(h: Any, context: str, size: int) -> list[tuple[int, int, int]]:
    """(offset, length, flags) runs of `context` covering [0, size), adjacent equal
    flags merged."""
    import nbd

    runs: list[tuple[int, int, int]] = []
    off = 0
    while off < size:
        got: list[list[int]] = []

        def cb(meta: str, _offset: int, entries: list[int], _err: Any) -> int:
            if meta == context:
                got.append(list(entries))
            return 0

        try:
            h.block_status(min(_STATUS_SPAN, size - off), off, cb)
        except nbd.Error as exc:
            raise RemoteError(f"NBD block status ({context}) at offset {off} failed: {exc}") from None
        pos = off
        for entries in got[:1]:
            for i in range(0, len(entries) - 1, 2):
                length, flags = entries[i], entries[i + 1]
                length = min(length, size - pos)
                if length <= 0:
                    break
                if runs and runs[-1][2] == flags and runs[-1][0] + runs[-1][1] == pos:
                    runs[-1] = (runs[-1][0], runs[-1][1] + length, flags)
                else:
                    runs.append((pos, length, flags))
                pos += length
        if pos == off:
            raise RemoteError(f"NBD block status ({context}) made no progress at offset {off}")
        off = pos
    return runs


class _Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes = 0
        self.requests = 0

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n
            self.requests += 1


class NbdReader:
    """A `BlockReader` on its own libnbd handle (one per sender thread), connected on
    the first read, so that an export gone meanwhile fails that read (which the sender
    reports) rather than the reader's creation."""

    def __init__(self, export: NbdExport, counter: _Counter) -> None:
        self.export = export
        self.counter = counter
        self.h: Any = None

    def pread(self, offset: int, length: int) -> bytes:
        import nbd

        if self.h is None:
            self.h = self.export.connect()
        try:
            data = self.h.pread(length, offset)
        except nbd.Error as exc:
            raise RemoteError(f"reading {self.export.what} at offset {offset} from its NBD export failed "
                              f"(did the VM stop or the backup job end?): {exc}") from None
        self.counter.add(length)
        return bytes(data)

    def close(self) -> None:
        if self.h is not None:
            close_handle(self.h)
            self.h = None


@dataclass
class ScanFigures:
    block_status_seconds: float = 0.0
    dirty_bytes: int = 0  # bytes the dirty bitmap marks (before block alignment)
    zero_bytes: int = 0  # bytes base:allocation reports as reading zeros


@dataclass
class NbdChangeSource:
    """A `ChangeSource` over an NBD export.

    `changed` None means every block is examined: a seed (known changed) or a hash scan
    (candidates), by `kind`; otherwise the changed byte ranges (kind EXTENTS)."""

    export: NbdExport
    size: int
    kind: CycleKind
    changed: list[tuple[int, int]] | None
    zero: list[tuple[int, int]]
    block_size: int = BLOCK_SIZE
    figures: ScanFigures = field(default_factory=ScanFigures)
    _counter: _Counter = field(default_factory=_Counter)

    @classmethod
    def open(cls, export: NbdExport, kind: CycleKind, incremental: bool,
             block_size: int = BLOCK_SIZE) -> NbdChangeSource:
        """Query the export's block status: its allocation, and its dirty bitmap when
        `incremental` (then kind must be EXTENTS)."""
        contexts = [ALLOCATION] + ([export.bitmap_context] if incremental and export.bitmap_context else [])
        if incremental and not export.bitmap_context:
            raise RemoteError(f"the NBD export of {export.what} has no dirty bitmap to read changes from")
        t0 = time.perf_counter()
        h = export.connect(*contexts)
        try:
            size = h.get_size()
            alloc = block_status(h, ALLOCATION, size)
            dirty = block_status(h, export.bitmap_context, size) if incremental and export.bitmap_context else None
        finally:
            close_handle(h)
        zero = flagged(alloc, NBD_STATE_ZERO)
        changed = None
        figures = ScanFigures(zero_bytes=sum(e - s for s, e in zero))
        if dirty is not None:
            changed = [(s, e - s) for s, e in flagged(dirty, NBD_DIRTY)]
            figures.dirty_bytes = sum(n for _, n in changed)
        figures.block_status_seconds = time.perf_counter() - t0
        return cls(export, size, kind, changed, zero, block_size, figures)

    def with_kind(self, kind: CycleKind) -> NbdChangeSource:
        """The same point-in-time view driving another kind of cycle: SEED or HASH_SCAN
        examine every block (the dirty extents are dropped), EXTENTS needs them."""
        if kind is CycleKind.EXTENTS and self.changed is None:
            raise RemoteError(f"{self.export.what} has no changed extents (no base checkpoint)")
        changed = self.changed if kind is CycleKind.EXTENTS else None
        return NbdChangeSource(self.export, self.size, kind, changed, self.zero, self.block_size, self.figures,
                               self._counter)

    def extents(self) -> Iterator[Extent]:
        known = self.kind is not CycleKind.HASH_SCAN
        yield from plan_extents(self.size, self.changed, self.zero, known, self.block_size)

    def open_reader(self) -> BlockReader:
        return NbdReader(self.export, self._counter)

    def total_bytes(self) -> int:
        return sum(e.length for e in self.extents())

    def bytes_to_read(self) -> int:
        return sum(e.length for e in self.extents() if not e.hole)

    @property
    def bytes_read(self) -> int:
        """Bytes read from the export so far, by every reader of this view."""
        return self._counter.bytes

    @property
    def read_requests(self) -> int:
        return self._counter.requests


def export_table(export: NbdExport, size: int | None = None, block_size: int = BLOCK_SIZE) -> HashTable:
    """The digest table of a whole export (each block read): what the view holds, to
    compare with a replica's point digest (tests, verification)."""
    h = export.connect(ALLOCATION)
    try:
        size = size or h.get_size()
        table = HashTable(size, block_size=block_size)
        zero = hole_spans(flagged(block_status(h, ALLOCATION, size), NBD_STATE_ZERO), size, block_size)
        zi = 0
        for i in range(table.n_blocks):
            off = i * block_size
            n = min(block_size, size - off)
            while zi < len(zero) and zero[zi][1] <= off:
                zi += 1
            if zi < len(zero) and zero[zi][0] <= off and off + n <= zero[zi][1]:
                table.set(i, zero_block_digest(n))
                continue
            data = bytes(h.pread(n, off))
            table.set(i, block_digest(data))
        return table
    finally:
        close_handle(h)
