"""Offline seeds made on the primary from a source image.

`export_image_seed` turns a raw image into a seed directory in the replica store's seed
format (see `store.py`: seed.json, seed.qcow2, seed.hashes) by staging it as the first
point of a scratch store beside the destination and exporting that point; the scratch
store is removed afterwards. The sender's state for the disk records the seed's digest
table, so once the seed is imported at the secondary (`ReplicaStore.import_seed`), the
first catch-up cycle (changed extents or a hash scan) starts from a known baseline.

`adopt_source` makes a local image (any change source over it) a point of a replica in
place: the old disk of a failed-over VM becomes the base of its reverse replication.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from standby.errors import BadInput, Conflict, NotFound
from standby.replication.changes import ChangeSource, FullSource
from standby.replication.digest import BLOCK_SIZE, HashTable, block_digest
from standby.replication.protocol import check_id
from standby.replication.sender import SenderState
from standby.replication.store import ReplicaStore


def export_image_seed(image: Path | str, dest: Path | str, disk_id: str, state_dir: Path | None = None,
                      consistency: str = "crash") -> dict[str, Any]:
    check_id(disk_id, "disk id")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise Conflict(f"seed destination {dest} exists and is not empty")
    source = FullSource(image)
    size = source.size
    if size % 512:
        raise BadInput(f"image {image} is {size} bytes, not a multiple of 512")
    t0 = time.perf_counter()
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
        digest = table.disk_digest()
        point = writer.commit(digest, consistency, time.time(), {"seed_of": str(image)})
        disk.export_seed(point.id, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if state_dir is not None:
        SenderState(disk_id, size, point.id, digest.hex(), None, table).save(Path(state_dir))

    return {"disk_id": disk_id, "point": point.id, "digest": digest.hex(), "size": size, "data_bytes": data_bytes,
            "dest": str(dest), "seconds": round(time.perf_counter() - t0, 3)}


def adopt_source(store: ReplicaStore, disk_id: str, source: ChangeSource, *, consistency: str = "crash",
                 meta: dict[str, Any] | None = None, created_at: float | None = None,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Make the content of `source` (every block: a whole image) the latest point of replica
    `disk_id`, created when missing (grown when the image is larger). Only the blocks that
    differ from the current latest point are staged, so the new point's layer is the
    difference; when nothing differs the latest point is kept (no new point: adopting the
    same image again is a no-op). The replica is then the base a hash-scan cycle compares
    against: only blocks that differ from this image cross the network.

    Returns {point, digest, bytes (data bytes staged), blocks_changed, reused, size}."""
    from standby.replication.digest import zero_block_digest

    check_id(disk_id, "disk id")
    size = source.size
    if size <= 0 or size % 512:
        raise BadInput(f"the image is {size} bytes, not a positive multiple of 512")
    try:
        disk = store.disk(disk_id)
    except NotFound:
        disk = store.create_disk(disk_id, size)
    if disk.size > size:
        raise Conflict(f"replica {disk_id} is {disk.size} bytes, larger than the image ({size}): a replica "
                       "never shrinks")
    if disk.size < size:
        disk.resize(size)
    base = disk.block_hashes(size)
    latest = disk.latest()
    # One cycle id per base point: a retry after a crash resumes the staging (its blocks
    # re-checked), and a later adoption on a newer point is a new cycle.
    writer = disk.begin_cycle(f"adopt-on-{latest.id if latest else 'none'}", latest.id if latest else None)
    table = HashTable(size)
    staged = changed = 0
    zero = bytes(BLOCK_SIZE)
    reader = source.open_reader()
    try:
        for ext in source.extents():
            for offset in range(ext.offset, ext.end, BLOCK_SIZE):
                index = offset // BLOCK_SIZE
                length = min(BLOCK_SIZE, size - offset)
                data = None if ext.hole else reader.pread(offset, length)
                if data is not None and data == zero[:length]:
                    data = None  # read as zeros: staged as a zero run, no data
                dg = zero_block_digest(length) if data is None else block_digest(data)
                table.set(index, dg)
                if progress is not None:
                    progress(length)
                if dg == base.get(index):
                    continue
                changed += 1
                if index in writer.received:
                    continue  # staged by an earlier attempt
                if data is None:
                    writer.write_zero(offset, length)
                else:
                    writer.write(offset, data, dg)
                    staged += length
    except BaseException:
        writer.checkpoint()
        raise
    finally:
        reader.close()
    digest = table.disk_digest()
    if latest is not None and changed == 0 and digest.hex() == latest.digest:
        writer.abort()
        return {"point": latest.id, "digest": latest.digest, "bytes": 0, "blocks_changed": 0, "reused": True,
                "size": size}
    point = writer.commit(digest, consistency, time.time() if created_at is None else created_at,
                          {"cycle_kind": "adopt", **(meta or {})})
    return {"point": point.id, "digest": point.digest, "bytes": staged, "blocks_changed": changed,
            "reused": False, "size": size}
