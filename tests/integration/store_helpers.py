"""Helpers shared by the replica store tests and the crash worker subprocess."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

from standby.replication.digest import BLOCK_SIZE, HashTable, block_digest, block_length, n_blocks
from standby.replication.store import DiskReplica, RecoveryPoint

SIZE = 4 * 1024 * 1024 + 1536  # 65 blocks, the last one 1536 bytes
N = n_blocks(SIZE)


class Model:
    """The expected guest image, kept in memory."""

    def __init__(self, size: int = SIZE) -> None:
        self.size = size
        self.raw = bytearray(size)

    def apply(self, changes: dict[int, bytes | None]) -> None:
        for i, d in changes.items():
            ln = block_length(self.size, i)
            self.raw[i * BLOCK_SIZE:i * BLOCK_SIZE + ln] = bytes(ln) if d is None else d

    def table(self) -> HashTable:
        t = HashTable(self.size)
        for i in range(n_blocks(self.size)):
            t.set(i, block_digest(bytes(self.raw[i * BLOCK_SIZE:i * BLOCK_SIZE + block_length(self.size, i)])))
        return t

    def digest(self) -> bytes:
        return self.table().disk_digest()

    def write_raw(self, path: Path) -> Path:
        path.write_bytes(self.raw)
        return path


def random_changes(rng: random.Random, size: int = SIZE, k: int | None = None,
                   zero_share: float = 0.2) -> dict[int, bytes | None]:
    n = n_blocks(size)
    k = rng.randint(1, max(1, n // 3)) if k is None else k
    out: dict[int, bytes | None] = {}
    for i in rng.sample(range(n), k):
        out[i] = None if rng.random() < zero_share else rng.randbytes(block_length(size, i))
    return out


def stage(w, changes: dict[int, bytes | None], size: int = SIZE) -> None:  # type: ignore[no-untyped-def]
    for i, d in changes.items():
        if d is None:
            w.write_zero(i * BLOCK_SIZE, block_length(size, i))
        else:
            w.write(i * BLOCK_SIZE, d)


def run_cycle(disk: DiskReplica, model: Model, changes: dict[int, bytes | None], cycle_id: str,
              consistency: str = "crash", created_at: float = 0.0) -> RecoveryPoint:
    latest = disk.latest()
    w = disk.begin_cycle(cycle_id, latest.id if latest else None)
    stage(w, changes, model.size)
    model.apply(changes)
    return w.commit(model.digest(), consistency, created_at, {"cycle": cycle_id})


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def assert_check(path: Path) -> None:
    r = qemu_img("check", str(path))
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr


def assert_same(image: Path, raw: Path) -> None:
    r = qemu_img("compare", "-F", "raw", str(image), str(raw))
    assert r.returncode == 0, r.stdout + r.stderr
