"""Frame fuzzing against a real receiver over mutual TLS: malformed, truncated, oversized,
unknown and reordered frames. The agent never crashes, answers with a clear ERROR or
closes, and the replica stays exactly at its point."""

from __future__ import annotations

import logging
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

from replication_helpers import endpoint, make_image, make_pki, running_agent, tls_client  # noqa: E402

from standby.replication import protocol as p  # noqa: E402
from standby.replication import tls  # noqa: E402
from standby.replication.changes import FullSource  # noqa: E402
from standby.replication.digest import BLOCK_SIZE  # noqa: E402
from standby.replication.receiver import Receiver  # noqa: E402
from standby.replication.sender import run_cycle  # noqa: E402
from standby.replication.store import ReplicaStore  # noqa: E402

SIZE = 1024 * 1024 + 4096  # 17 blocks, the last one short
DISK = "fz"


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Receiver, dict[str, tls.Identity], str, str]]:
    root = tmp_path_factory.mktemp("fuzz")
    pki = make_pki(root / "pki")
    img = root / "img"
    make_image(img, SIZE)
    with open(img, "r+b") as f:  # a short last block, with data in it
        f.truncate(SIZE)
        f.seek(SIZE - 100)
        f.write(b"tail" * 25)
    handler = _Errors()
    logging.getLogger("standby").addHandler(handler)
    try:
        with running_agent(root / "store", pki["agent"], join_timeout=0.2, io_timeout=10) as rx:
            r = run_cycle(FullSource(img), endpoint(rx), tls.client_context(pki["sender"]), DISK)
            rx.fuzz_errors = handler  # type: ignore[attr-defined]
            yield rx, pki, r.point_id, r.digest
    finally:
        logging.getLogger("standby").removeHandler(handler)


def _block(seed: int, length: int) -> bytes:
    return (bytes([seed % 251 + 1]) * 1000 + bytes(BLOCK_SIZE))[:length]


def _frames(point: str) -> st.SearchStrategy[bytes]:
    ids = st.sampled_from(["c1", "c2", "seed-x", "0000000001"])
    bases = st.sampled_from([point, None, "0000000099"])
    offsets = st.one_of(st.integers(0, 17).map(lambda i: i * BLOCK_SIZE), st.integers(0, 2**64 - 1))

    def data(offset: int, seed: int, good: bool, compressed: bool) -> bytes:
        index = min(offset // BLOCK_SIZE, 16)
        length = min(BLOCK_SIZE, SIZE - index * BLOCK_SIZE)
        raw = _block(seed, length)
        check = xxhash.xxh3_128_digest(raw) if good else bytes(16)
        body = zstandard.ZstdCompressor().compress(raw) if compressed else raw
        return p.encode_data(offset, length, check, body, compressed)

    valid = st.one_of(
        st.builds(lambda n, s: p.Hello(n, s, BLOCK_SIZE).encode(), st.sampled_from([DISK, "fz-other"]),
                  st.sampled_from([SIZE, SIZE * 2])),
        st.builds(lambda f, c: p.HashRequest(f, c).encode(), st.integers(0, 20), st.integers(1, 20)),
        st.builds(lambda c, b, i, n, k: p.CycleBegin(c, b, min(i, n - 1), n, k).encode(), ids, bases,
                  st.integers(0, 3), st.integers(1, 4), st.sampled_from(list(p.CycleKind))),
        st.builds(data, offsets, st.integers(0, 1000), st.booleans(), st.booleans()),
        st.builds(lambda o, n: p.ZeroRun(o, n).encode(), offsets, st.integers(1, 2 * SIZE)),
        st.builds(lambda d, z: p.StreamEnd(d, z).encode(), st.integers(0, 5), st.integers(0, 5)),
        st.builds(lambda dg, d, z: p.CycleEnd(dg, d, z, p.Consistency.CRASH, 1.0).encode(),
                  st.binary(min_size=16, max_size=16), st.integers(0, 5), st.integers(0, 5)),
        st.builds(lambda k: p.Ack(k).encode(), st.sampled_from(list(p.AckKind))),
    )
    bad_header = st.builds(
        lambda t, f, n, v: struct.pack(">4sBBHI", b"SBRP", v, t, f, n)
        + struct.pack(">I", xxhash.xxh32_intdigest(struct.pack(">4sBBHI", b"SBRP", v, t, f, n))),
        st.integers(0, 255), st.integers(0, 0xFFFF), st.sampled_from([0, 17, p.MAX_FRAME, 2**32 - 1]),
        st.sampled_from([1, 1, 2, 0]))
    junk = st.binary(min_size=1, max_size=64)
    return st.one_of(valid, valid, valid, bad_header, junk)


def _happy_path(point: str) -> list[bytes]:
    raw = _block(7, BLOCK_SIZE)
    return [p.Hello(DISK, SIZE, BLOCK_SIZE).encode(), p.CycleBegin("c9", point, 0, 1).encode(),
            p.encode_data(BLOCK_SIZE, BLOCK_SIZE, xxhash.xxh3_128_digest(raw), raw, False),
            p.ZeroRun(0, BLOCK_SIZE).encode(), p.StreamEnd(1, 1).encode(),
            p.CycleEnd(bytes(16), 1, 1, p.Consistency.CRASH, 1.0).encode()]


@st.composite
def _streams(draw: st.DrawFn, point: str) -> bytes:
    mode = draw(st.sampled_from(["random", "reordered", "prefix-then-random"]))
    if mode == "reordered":
        parts = draw(st.permutations(_happy_path(point)))
    elif mode == "prefix-then-random":
        parts = _happy_path(point)[:draw(st.integers(1, 4))] + draw(st.lists(_frames(point), max_size=6))
    else:
        parts = draw(st.lists(_frames(point), min_size=1, max_size=8))
    out = bytearray(b"".join(parts))
    if draw(st.booleans()) and out:  # flip a byte
        i = draw(st.integers(0, len(out) - 1))
        out[i] ^= draw(st.integers(1, 255))
    if draw(st.booleans()) and len(out) > 1:  # truncate
        out = out[:draw(st.integers(1, len(out) - 1))]
    return bytes(out)


def _exchange(rx: Receiver, ident: tls.Identity, payload: bytes) -> bytes:
    s = tls_client(ident, rx.address[1], ident.ca)
    try:
        try:
            s.sendall(payload)
            # half-close TCP under TLS: the agent sees the end of the stream, we can still read
            socket.socket.shutdown(s, socket.SHUT_WR)
        except OSError:
            pass  # the agent may already have answered and closed
        chunks = []
        s.settimeout(15)
        while True:
            try:
                data = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                break
            except OSError as exc:
                if "EOF" in str(exc) or "reset" in str(exc).lower():
                    break
                raise
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)
    finally:
        s.close()


def _check_replica(rx: Receiver, point: str, digest: str) -> None:
    latest = rx.store.disk(DISK).latest()
    assert latest is not None and (latest.id, latest.digest) == (point, digest)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_frames_never_touch_the_replica(agent: tuple[Receiver, dict[str, tls.Identity], str, str],
                                              data: st.DataObject) -> None:
    rx, pki, point, digest = agent
    payload = data.draw(_streams(point))
    reply = _exchange(rx, pki["sender"], payload)
    # the agent speaks only well-formed frames, and never reports an internal error
    frames = p.decode_all(reply)
    for f in frames:
        if isinstance(f, p.Error):
            assert f.code != p.ErrorCode.INTERNAL, f.message
            assert f.message
    assert not rx.fuzz_errors.records, [r.getMessage() for r in rx.fuzz_errors.records]  # type: ignore[attr-defined]
    _check_replica(rx, point, digest)


def test_specific_faults_get_clear_errors(agent: tuple[Receiver, dict[str, tls.Identity], str, str]) -> None:
    rx, pki, point, digest = agent
    hello = p.Hello(DISK, SIZE, BLOCK_SIZE).encode()
    begin = p.CycleBegin("cx", point, 0, 1).encode()
    raw = _block(3, BLOCK_SIZE)
    cases = [
        (b"GET / HTTP/1.1\r\n\r\n", p.ErrorCode.PROTOCOL, "bad frame magic"),
        (p.encode_data(0, BLOCK_SIZE, bytes(16), raw, False), p.ErrorCode.PROTOCOL, "unexpected DATA"),
        (hello + begin + p.encode_data(0, BLOCK_SIZE, bytes(16), raw, False), p.ErrorCode.INTEGRITY,
         "does not match its checksum; not applied"),
        (hello + begin + p.encode_data(5, BLOCK_SIZE, xxhash.xxh3_128_digest(raw), raw, False),
         p.ErrorCode.PROTOCOL, "not a block boundary"),
        (hello + begin + p.ZeroRun(0, SIZE + 1).encode(), p.ErrorCode.PROTOCOL, "ZERO_RUN"),
        (hello + begin + p.StreamEnd(3, 0).encode(), p.ErrorCode.PROTOCOL, "STREAM_END"),
        (hello + begin + p.StreamEnd(0, 0).encode() + p.CycleEnd(bytes(16), 0, 0, p.Consistency.CRASH,
                                                                  1.0).encode(),
         p.ErrorCode.INTEGRITY, "the replica stays at point"),
        (hello + p.CycleBegin("cy", "0000000042", 0, 1).encode(), p.ErrorCode.CONFLICT, "is based on point"),
        (p.Hello(DISK, SIZE - 4096, BLOCK_SIZE).encode(), p.ErrorCode.CONFLICT, "shrinking"),  # growing is allowed
        (hello + p.HashRequest(16, 5).encode(), p.ErrorCode.PROTOCOL, "outside the disk"),
        (p._frame_head(p.FrameType.DATA, 0, 2**31), p.ErrorCode.PROTOCOL, "oversized DATA frame"),
        (p._frame_head(99, 0, 0), p.ErrorCode.PROTOCOL, "unknown frame type 99"),
        (hello + p.CycleBegin("cz", point, 1, 2).encode(), p.ErrorCode.CONFLICT, "no cycle cz to join"),
    ]
    for payload, code, text in cases:
        frames = p.decode_all(_exchange(rx, pki["sender"], payload))
        errors = [f for f in frames if isinstance(f, p.Error)]
        assert errors, (text, frames)
        assert errors[-1].code == code and text in errors[-1].message, (text, errors[-1])
        _check_replica(rx, point, digest)
    assert ReplicaStore(rx.store.root).disk(DISK).verify(point).ok
