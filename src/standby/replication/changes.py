"""Change sources: which blocks of a disk a replication cycle has to look at.

Every source implements one small interface, `ChangeSource`:

- `kind`: the cycle kind it drives (seed, extents, hash scan);
- `size`: the disk size in bytes;
- `extents()`: block-aligned, ascending, non-overlapping `Extent`s to examine; each says
  whether the source *knows* its blocks changed (`known_changed`) or offers them as
  candidates to compare (`known_changed=False`), and whether it is a hole the image
  reads as zeros without reading it (`hole`);
- `open_reader()`: a `BlockReader` (one per sender thread) to read blocks with.

The sender examines each block of each extent: it reads it (holes are not read),
detects an all-zero block, digests it (xxh3-128), and compares the digest with the
baseline: the replica's per-block digests at its latest point. A block equal to the
baseline is skipped, a zero block becomes part of a ZERO_RUN (never DATA), any other
block is sent. So:

- `ExtentSource`: the hypervisor's list of changed extents (QEMU dirty bitmaps through
  libvirt); only those blocks are read. Byte extents are widened to whole blocks.
- `HashScanSource`: every block is a candidate; only those whose digest differs from the
  replica's digest table (fetched from the agent in the handshake, or the sender's own
  copy when it provably matches) are sent. First replication onto a pre-seeded
  replica, resynchronisation after lost change tracking, failback.
- `FullSource`: the initial seed: every block, known changed; against an empty replica
  (all zeros) the zero blocks cost nothing and the others are all sent.

Sparse images: file sources find holes with SEEK_DATA/SEEK_HOLE and mark them, so a
half-empty sparse image is read only where it holds data.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from standby.errors import BadInput, NotFound
from standby.replication.digest import BLOCK_SIZE
from standby.replication.protocol import CycleKind


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    known_changed: bool = True
    hole: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length


@runtime_checkable
class BlockReader(Protocol):
    """Reads blocks. A reader may also offer `prefetch(offset, length)`: a hint that the
    range will be read soon (file readers start the kernel's read-ahead with it), and
    `readinto(offset, buf)`: fill a buffer (a run of blocks in one read, no new object)."""

    def pread(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


@runtime_checkable
class ChangeSource(Protocol):
    kind: CycleKind
    size: int
    block_size: int

    def extents(self) -> Iterator[Extent]: ...

    def open_reader(self) -> BlockReader: ...

    def total_bytes(self) -> int: ...


# ---------------------------------------------------------------------------- readers


class FileReader:
    """pread on its own descriptor: threads never share a file position."""

    def __init__(self, path: Path | str, size: int) -> None:
        self.path = str(path)
        self.size = size
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise NotFound(f"image {path} not found") from None
        except OSError as exc:
            raise BadInput(f"cannot open image {path}: {exc.strerror}") from None

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            # A short read inside the disk: the image shrank under us, or it is a
            # sparse file shorter than the declared size; both read as zeros past EOF.
            data += bytes(length - len(data))
        return data

    def readinto(self, offset: int, buf: memoryview) -> int:
        """Fill `buf` from `offset` (one preadv, a short read retried; past the end of
        the file reads as zeros, like pread); returns len(buf)."""
        want = len(buf)
        got = 0
        while got < want:
            n = os.preadv(self.fd, [buf[got:]], offset + got)
            if n <= 0:
                buf[got:] = bytes(want - got)
                break
            got += n
        return want

    def prefetch(self, offset: int, length: int) -> None:
        """Ask the kernel to start reading [offset, offset+length) into the page cache."""
        if self.fd >= 0 and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FileObjectReader:
    """A reader over any seekable binary file-like object (shared, so serialised)."""

    def __init__(self, fileobj: BinaryIO, lock: threading.Lock) -> None:
        self.fileobj = fileobj
        self.lock = lock

    def pread(self, offset: int, length: int) -> bytes:
        with self.lock:
            self.fileobj.seek(offset)
            data = self.fileobj.read(length)
        if len(data) < length:
            data += bytes(length - len(data))
        return bytes(data)

    def close(self) -> None:
        pass


class _Image:
    """An image given as a path (preferred: pread, hole detection) or a file object."""

    def __init__(self, image: Path | str | BinaryIO, size: int | None) -> None:
        self.path: Path | None = None
        self.fileobj: BinaryIO | None = None
        self._lock = threading.Lock()
        if isinstance(image, (str, Path)):
            self.path = Path(image)
            if not self.path.exists():
                raise NotFound(f"image {image} not found")
            if self.path.is_dir():
                raise BadInput(f"image {image} is a directory")
            self.size = size if size is not None else _file_size(self.path)
        else:
            self.fileobj = image
            if size is None:
                pos = image.seek(0, os.SEEK_END)
                size = pos
            self.size = size
        if self.size <= 0:
            raise BadInput(f"image {image} is empty")

    def reader(self) -> BlockReader:
        if self.path is not None:
            return FileReader(self.path, self.size)
        assert self.fileobj is not None
        return FileObjectReader(self.fileobj, self._lock)

    def data_regions(self, start: int, end: int, fd: int | None = None) -> list[tuple[int, int, bool]]:
        """Split [start, end) into (offset, length, is_hole) with SEEK_DATA/SEEK_HOLE
        (on `fd` when given: one descriptor for a whole list of extents)."""
        if self.path is None or not hasattr(os, "SEEK_DATA"):
            return [(start, end - start, False)]
        own = fd is None
        if fd is None:
            fd = os.open(self.path, os.O_RDONLY)
        try:
            file_end = os.fstat(fd).st_size
            out: list[tuple[int, int, bool]] = []
            pos = start
            while pos < end:
                if pos >= file_end:
                    out.append((pos, end - pos, True))
                    break
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # no data after pos
                        out.append((pos, end - pos, True))
                        break
                    return [(start, end - start, False)]
                if data > pos:
                    out.append((pos, min(data, end) - pos, True))
                    pos = min(data, end)
                    continue
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
                stop = min(hole, end)
                out.append((pos, stop - pos, False))
                pos = stop
            return out
        finally:
            if own:
                os.close(fd)


def _file_size(path: Path) -> int:
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def _split_holes(image: _Image, offset: int, length: int, known: bool, block_size: int,
                 fd: int | None = None) -> Iterator[Extent]:
    """Cut a block-aligned extent at hole boundaries, keeping only whole-block holes."""
    regions = image.data_regions(offset, offset + length, fd)
    if len(regions) == 1 and not regions[0][2]:
        yield Extent(offset, length, known)
        return
    # Mark a block as a hole only if it lies entirely inside a hole region.
    pending_start = offset
    pending_hole: bool | None = None
    block = offset
    end = offset + length
    regions_iter = iter(regions)
    region = next(regions_iter)
    while block < end:
        block_end = min(block + block_size, end)
        while region[0] + region[1] <= block:
            region = next(regions_iter)
        is_hole = region[2] and region[0] + region[1] >= block_end
        if pending_hole is None:
            pending_hole = is_hole
        elif is_hole != pending_hole:
            yield Extent(pending_start, block - pending_start, known, pending_hole)
            pending_start, pending_hole = block, is_hole
        block = block_end
    if pending_hole is not None:
        yield Extent(pending_start, end - pending_start, known, pending_hole)


def align_extents(extents: Iterable[tuple[int, int]], size: int, block_size: int = BLOCK_SIZE) -> list[tuple[int, int]]:
    """Widen byte extents to whole blocks, clip to the disk, sort and merge (pure)."""
    spans: list[tuple[int, int]] = []
    for offset, length in extents:
        if offset < 0 or length < 0:
            raise BadInput(f"changed extent ({offset}, {length}) has a negative offset or length")
        if length == 0:
            continue
        if offset >= size:
            raise BadInput(f"changed extent at offset {offset} lies beyond the disk's end ({size} bytes)")
        start = offset - offset % block_size
        end = min(size, -(-(offset + length) // block_size) * block_size)
        spans.append((start, end))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return [(s, e - s) for s, e in merged]


def read_extents_file(path: Path | str) -> list[tuple[int, int]]:
    """Changed extents from a file: a JSON list of [offset, length] pairs (or of objects
    with "offset"/"start" and "length"), or text lines "OFFSET LENGTH" (decimal or 0x
    hex, separated by spaces, a comma or a colon); '#' starts a comment."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise NotFound(f"changed-extents file {p} not found") from None
    stripped = text.lstrip()
    out: list[tuple[int, int]] = []
    if stripped.startswith("["):
        import json

        try:
            items = json.loads(text)
        except ValueError as exc:
            raise BadInput(f"{p}: not valid JSON: {exc}") from None
        for n, item in enumerate(items):
            try:
                if isinstance(item, dict):
                    out.append((int(item.get("offset", item.get("start"))), int(item["length"])))
                else:
                    off, ln = item
                    out.append((int(off), int(ln)))
            except (TypeError, ValueError, KeyError):
                raise BadInput(f"{p}: item {n} is not an [offset, length] pair") from None
        return out
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").replace(":", " ").split()
        if len(parts) != 2:
            raise BadInput(f"{p}:{lineno}: expected 'OFFSET LENGTH', got {line!r}")
        try:
            out.append((int(parts[0], 0), int(parts[1], 0)))
        except ValueError:
            raise BadInput(f"{p}:{lineno}: offset and length must be integers, got {line!r}") from None
    return out


# ---------------------------------------------------------------------------- sources


class _ImageSource:
    kind: CycleKind

    def __init__(self, image: Path | str | BinaryIO, size: int | None = None, block_size: int = BLOCK_SIZE) -> None:
        self.image = _Image(image, size)
        self.size = self.image.size
        self.block_size = block_size

    def open_reader(self) -> BlockReader:
        return self.image.reader()

    def total_bytes(self) -> int:
        return self.size


class FullSource(_ImageSource):
    """The initial seed: every block of the image, known changed."""

    kind = CycleKind.SEED

    def extents(self) -> Iterator[Extent]:
        yield from _split_holes(self.image, 0, self.size, True, self.block_size)


class HashScanSource(_ImageSource):
    """Every block is a candidate; the sender sends those whose digest differs from the
    replica's (its digest table is the cycle's baseline)."""

    kind = CycleKind.HASH_SCAN

    def extents(self) -> Iterator[Extent]:
        yield from _split_holes(self.image, 0, self.size, False, self.block_size)


class ExtentSource(_ImageSource):
    """Changed extents from the hypervisor over the image they describe."""

    kind = CycleKind.EXTENTS

    def __init__(self, image: Path | str | BinaryIO, extents: Iterable[tuple[int, int]], size: int | None = None,
                 block_size: int = BLOCK_SIZE) -> None:
        super().__init__(image, size, block_size)
        self._extents = align_extents(extents, self.size, block_size)

    def extents(self) -> Iterator[Extent]:
        fd = None
        if self.image.path is not None and len(self._extents) > 1:
            try:
                fd = os.open(self.image.path, os.O_RDONLY)
            except OSError:
                fd = None
        try:
            for offset, length in self._extents:
                yield from _split_holes(self.image, offset, length, True, self.block_size, fd)
        finally:
            if fd is not None:
                os.close(fd)

    def total_bytes(self) -> int:
        return sum(length for _, length in self._extents)
