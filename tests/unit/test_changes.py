"""Change sources: extent alignment, extent files, hole detection."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from standby.errors import BadInput, NotFound
from standby.replication.changes import (
    ChangeSource,
    ExtentSource,
    FullSource,
    HashScanSource,
    align_extents,
    read_extents_file,
)
from standby.replication.protocol import CycleKind

B = 65536


def test_align_extents() -> None:
    size = 10 * B + 100
    assert align_extents([(5, 10)], size) == [(0, B)]
    assert align_extents([(B - 1, 2)], size) == [(0, 2 * B)]
    assert align_extents([(3 * B, B), (B, B), (2 * B, 10)], size) == [(B, 3 * B)]
    assert align_extents([(10 * B + 50, 10)], size) == [(10 * B, 100)]
    assert align_extents([(0, 0)], size) == []
    with pytest.raises(BadInput, match="beyond the disk"):
        align_extents([(size, 1)], size)
    with pytest.raises(BadInput, match="negative"):
        align_extents([(-1, 1)], size)


def test_extents_files(tmp_path: Path) -> None:
    j = tmp_path / "e.json"
    j.write_text(json.dumps([[0, 10], {"offset": 65536, "length": 5}]))
    assert read_extents_file(j) == [(0, 10), (65536, 5)]
    t = tmp_path / "e.txt"
    t.write_text("# changed\n0 4096\n0x10000, 0x1000\n\n131072:1\n")
    assert read_extents_file(t) == [(0, 4096), (65536, 4096), (131072, 1)]
    t.write_text("0 1 2\n")
    with pytest.raises(BadInput, match="e.txt:1"):
        read_extents_file(t)
    with pytest.raises(NotFound):
        read_extents_file(tmp_path / "missing")


def test_sources_and_holes(tmp_path: Path) -> None:
    img = tmp_path / "img"
    with open(img, "wb") as f:
        f.truncate(64 * B)
        f.seek(10 * B)
        f.write(b"a" * B * 2)
        f.seek(40 * B + 7)
        f.write(b"b")
    full = FullSource(img)
    assert isinstance(full, ChangeSource)
    assert full.kind is CycleKind.SEED and full.size == 64 * B
    exts = list(full.extents())
    assert sum(e.length for e in exts) == 64 * B
    data = [(e.offset, e.length) for e in exts if not e.hole]
    # the filesystem may report larger data regions, but never miss data
    assert any(o <= 10 * B and o + n >= 12 * B for o, n in data)
    assert any(o <= 40 * B and o + n >= 41 * B for o, n in data)
    assert all(e.known_changed for e in exts)
    assert not any(e.known_changed for e in HashScanSource(img).extents())
    ext = ExtentSource(img, [(10 * B + 1, 1), (40 * B, 10)])
    assert [(e.offset, e.length) for e in ext.extents()] == [(10 * B, B), (40 * B, B)]
    assert ext.total_bytes() == 2 * B
    r = ext.open_reader()
    try:
        assert r.pread(10 * B, 4) == b"aaaa"
        assert r.pread(64 * B - 2, 4) == b"\0\0\0\0"  # past the end reads as zeros
    finally:
        r.close()


def test_file_object_source() -> None:
    buf = io.BytesIO(b"z" * (3 * B))
    src = HashScanSource(buf)
    assert src.size == 3 * B
    r = src.open_reader()
    assert r.pread(B, 3) == b"zzz"
    assert [(e.offset, e.length, e.hole) for e in src.extents()] == [(0, 3 * B, False)]


def test_missing_image(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        FullSource(tmp_path / "nope")
