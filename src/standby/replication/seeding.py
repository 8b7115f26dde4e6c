"""Offline seeds made on the primary from a source image.

`export_image_seed` turns a raw image into a seed directory in the replica store's seed
format (see `store.py`: seed.json, seed.qcow2, seed.hashes) by staging it as the first
point of a scratch store beside the destination and exporting that point; the scratch
store is removed afterwards. The sender's state for the disk records the seed's digest
table, so once the seed is imported at the secondary (`ReplicaStore.import_seed`), the
first catch-up cycle (changed extents or a hash scan) starts from a known baseline.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from standby.errors import BadInput, Conflict
from standby.replication.changes import FullSource
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
