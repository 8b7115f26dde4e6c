"""Growing a protected disk in the replica store: the next point has the new size, older
points keep theirs (checked with qemu-img compare), and a crash during the resizing cycle
leaves the replica at its old size until the cycle is committed."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from standby.errors import Conflict
from standby.replication.digest import BLOCK_SIZE, hash_file
from standby.replication.store import ReplicaStore

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")

MiB = 1024 * 1024
OLD, NEW = 4 * MiB, 6 * MiB + 3 * BLOCK_SIZE


def _compare(raw: Path, overlay: Path) -> None:
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(overlay)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _virtual_size(path: Path) -> int:
    import json
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return int(json.loads(out)["virtual-size"])


def _send(disk, raw: Path, cycle: str, blocks: list[int], *, commit: bool = True):  # type: ignore[no-untyped-def]
    """Stage `blocks` of `raw` (all of them for a seed) and commit against its digest."""
    latest = disk.latest()
    w = disk.begin_cycle(cycle, latest.id if latest else None)
    with raw.open("rb") as f:
        for i in blocks:
            if i in w.received:
                continue
            f.seek(i * BLOCK_SIZE)
            data = f.read(BLOCK_SIZE)
            if data.count(0) == len(data):
                w.write_zero(i * BLOCK_SIZE, len(data))
            else:
                w.write(i * BLOCK_SIZE, data)
    if not commit:
        w.checkpoint()
        return w
    return w.commit(hash_file(raw).disk_digest(), "crash", 1.0, {})


def _grow(src: Path, dst: Path, size: int, rng: random.Random) -> list[int]:
    shutil.copy(src, dst)
    with dst.open("r+b") as f:
        f.truncate(size)
        f.seek(OLD + BLOCK_SIZE)
        f.write(rng.randbytes(3 * BLOCK_SIZE))  # data in the grown area
        f.seek(5 * BLOCK_SIZE)
        f.write(rng.randbytes(BLOCK_SIZE))  # and a change in the old area
    return list(range((size + BLOCK_SIZE - 1) // BLOCK_SIZE))  # a hash scan would send what differs


def _setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    rng = random.Random(7)
    old = tmp_path / "old.raw"
    old.write_bytes(rng.randbytes(OLD // 2) + bytes(OLD // 2))
    disk = ReplicaStore(tmp_path / "root").create_disk("vm-d0", OLD)
    p1 = _send(disk, old, "c1", list(range(OLD // BLOCK_SIZE)))
    new = tmp_path / "new.raw"
    blocks = _grow(old, new, NEW, rng)
    return disk, p1, old, new, blocks


def test_grown_disk_new_point_has_the_new_size_old_point_keeps_its_own(tmp_path: Path) -> None:
    disk, p1, old, new, blocks = _setup(tmp_path)
    with pytest.raises(Conflict, match=f"{OLD} bytes.*{OLD - MiB}"):
        disk.resize(OLD - MiB)
    disk.resize(NEW)
    table = disk.block_hashes()
    assert table.n_blocks == len(blocks) and table.size == NEW
    # the grown table is the old content plus zeros
    old_plus_zeros = tmp_path / "zeros.raw"
    shutil.copy(old, old_plus_zeros)
    os.truncate(old_plus_zeros, NEW)
    assert table.disk_digest() == hash_file(old_plus_zeros).disk_digest()
    changed = [i for i in blocks if table.get(i) != hash_file(new).get(i)]
    assert 5 in changed and len(changed) == 4
    p2 = _send(disk, new, "c2", changed)
    assert disk.size == NEW and disk.point_size(p2) == NEW and disk.point_size(p1) == OLD
    assert _virtual_size(p2.layer) == NEW and _virtual_size(p1.layer) == OLD
    _compare(new, p2.layer)  # backed by the smaller layer: its tail reads as zeros
    _compare(old, p1.layer)
    for p, raw, size in ((p1, old, OLD), (p2, new, NEW)):
        ov = disk.materialize(p.id, tmp_path / f"ov-{p.id}.qcow2")
        assert _virtual_size(ov) == size
        _compare(raw, ov)
        disk.release(ov)
        assert disk.verify(p.id).ok
    # reopened: the size comes from the latest point; a further delta works
    disk2 = ReplicaStore(tmp_path / "root").disk("vm-d0")
    assert disk2.size == NEW and disk2.block_hashes().disk_digest() == hash_file(new).disk_digest()
    with new.open("r+b") as f:
        f.seek(NEW - BLOCK_SIZE)
        f.write(b"\1" * BLOCK_SIZE)
    p3 = _send(disk2, new, "c3", [NEW // BLOCK_SIZE - 1])
    _compare(new, p3.layer)
    # pruning merges the old-size layer into the grown one
    disk2.remove_point(p1.id)
    disk2.remove_point(p2.id)
    _compare(new, p3.layer)
    assert disk2.verify(p3.id).ok


def test_crash_during_the_resizing_cycle_keeps_the_old_size(tmp_path: Path) -> None:
    disk, p1, old, new, blocks = _setup(tmp_path)
    disk.resize(NEW)
    _send(disk, new, "c2", blocks[:len(blocks) // 2], commit=False)  # staged, then "crash"
    del disk
    disk = ReplicaStore(tmp_path / "root").disk("vm-d0")
    assert disk.size == OLD and [p.id for p in disk.points()] == [p1.id]
    assert disk.block_hashes().disk_digest() == hash_file(old).disk_digest()
    _compare(old, disk.latest().layer)
    # the sender comes back with the grown disk: the staged blocks are resumed
    disk.resize(NEW)
    w = disk.begin_cycle("c2", p1.id)
    assert len(w.received) > 0
    p2 = _send(disk, new, "c2", blocks)
    assert disk.point_size(p2) == NEW
    _compare(new, p2.layer)
    reopened = ReplicaStore(tmp_path / "root").disk("vm-d0")
    assert reopened.size == NEW and reopened.verify(p2.id).ok


def test_crash_inside_the_resizing_commit_rolls_forward(tmp_path: Path, monkeypatch) -> None:
    disk, p1, old, new, blocks = _setup(tmp_path)
    disk.resize(NEW)
    w = _send(disk, new, "c2", blocks, commit=False)
    w.roll_forward_bytes = 0  # a commit intent is written

    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise OSError("crash")
    monkeypatch.setattr(os, "link", boom)  # crash once the intent is durable
    with pytest.raises(OSError):
        w.commit(hash_file(new).disk_digest(), "crash", 2.0, {})
    monkeypatch.undo()
    reopened = ReplicaStore(tmp_path / "root").disk("vm-d0")
    pts = reopened.points()
    assert [p.id for p in pts] == [p1.id, "0000000002"] and reopened.size == NEW
    _compare(new, pts[-1].layer)
    _compare(old, pts[0].layer)


def test_grown_digest_matches_the_grown_table(tmp_path: Path) -> None:
    disk, _p1, _old, _new, _blocks = _setup(tmp_path)
    for size in (OLD, OLD + 512, OLD + BLOCK_SIZE, NEW, 64 * MiB):
        assert disk.grown_digest(size) == disk.block_hashes(size).disk_digest()
