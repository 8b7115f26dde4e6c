"""Block and whole-disk digests, shared by the sender and the replica store.

A disk is cut into blocks of BLOCK_SIZE bytes (the last block may be shorter). Each
block's digest is xxh3-128 of its bytes (16 bytes). The disk digest is xxh3-128 of
the concatenation of every block digest in order: it changes when any byte of the
disk changes, and both sides can keep it up to date by replacing only the digests of
the blocks a cycle touched, so proving "replica == source" costs no full read.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import xxhash

BLOCK_SIZE = 64 * 1024
DIGEST_SIZE = 16


def block_digest(data: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


@lru_cache(maxsize=8)
def zero_block_digest(length: int = BLOCK_SIZE) -> bytes:
    return xxhash.xxh3_128_digest(bytes(length))


def n_blocks(size: int, block_size: int = BLOCK_SIZE) -> int:
    return (size + block_size - 1) // block_size


def block_length(size: int, index: int, block_size: int = BLOCK_SIZE) -> int:
    """Length of block `index` of a disk of `size` bytes (the last one may be short)."""
    return min(block_size, size - index * block_size)


class HashTable:
    """Per-block digests of one disk state, in a flat bytearray (16 bytes a block)."""

    def __init__(self, size: int, data: bytes | bytearray | None = None, block_size: int = BLOCK_SIZE) -> None:
        self.size = size
        self.block_size = block_size
        self.n_blocks = n_blocks(size, block_size)
        if data is None:
            self._table = bytearray(self._zero_table())
        else:
            if len(data) != self.n_blocks * DIGEST_SIZE:
                raise ValueError(f"hash table holds {len(data)} bytes, expected {self.n_blocks * DIGEST_SIZE}")
            self._table = bytearray(data)

    def _zero_table(self) -> bytes:
        if self.n_blocks == 0:
            return b""
        full = zero_block_digest(self.block_size) * (self.n_blocks - 1)
        return full + zero_block_digest(block_length(self.size, self.n_blocks - 1, self.block_size))

    def get(self, index: int) -> bytes:
        return bytes(self._table[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE])

    def set(self, index: int, digest: bytes) -> None:
        if len(digest) != DIGEST_SIZE:
            raise ValueError("a block digest is 16 bytes")
        self._table[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE] = digest

    def set_zero(self, index: int) -> None:
        self.set(index, zero_block_digest(block_length(self.size, index, self.block_size)))

    def disk_digest(self) -> bytes:
        return xxhash.xxh3_128_digest(bytes(self._table))

    def to_bytes(self) -> bytes:
        return bytes(self._table)

    def copy(self) -> HashTable:
        return HashTable(self.size, self._table, self.block_size)

    def differing_blocks(self, other: HashTable) -> list[int]:
        """Indexes of blocks whose digests differ (the tables must describe equal sizes)."""
        if other.size != self.size or other.block_size != self.block_size:
            raise ValueError("hash tables of different disk sizes")
        a, b = self._table, other._table
        return [i for i in range(self.n_blocks)
                if a[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] != b[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]]

    def save(self, path: Path) -> None:
        """Write atomically: temp file, fsync, rename."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(self._table)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, size: int, block_size: int = BLOCK_SIZE) -> HashTable:
        return cls(size, path.read_bytes(), block_size)


def hash_file(path: Path | str, size: int | None = None, block_size: int = BLOCK_SIZE) -> HashTable:
    """Digest every block of a raw image (reads it whole; the hash-scan path)."""
    size = os.path.getsize(path) if size is None else size
    table = HashTable(size, block_size=block_size)
    zero = bytes(block_size)
    with open(path, "rb", buffering=0) as f:
        for i in range(table.n_blocks):
            data = f.read(block_size)
            if len(data) < block_length(size, i, block_size):
                data = data + bytes(block_length(size, i, block_size) - len(data))
            if data != zero[:len(data)]:
                table.set(i, block_digest(data))
    return table
