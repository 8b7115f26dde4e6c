"""The wire protocol: round trips, strict parsing, frame order."""

from __future__ import annotations

import io
import struct

import pytest
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from standby.replication import protocol as p
from standby.replication.protocol import (
    Ack,
    AckKind,
    Consistency,
    CycleBegin,
    CycleEnd,
    CycleKind,
    Data,
    Error,
    ErrorCode,
    Hashes,
    HashRequest,
    Hello,
    HelloOk,
    ProtocolError,
    ReceiverSequence,
    Resume,
    StreamEnd,
    ZeroRun,
)

BLOCK = b"x" * 1000 + bytes(64536)

SAMPLES = [
    Hello("vm1-disk0", 1 << 30, 65536),
    HelloOk(None, None),
    HelloOk("0000000003", b"\x01" * 16, 1 << 30, "seed-1", None, 12, 1),
    Resume(64, 17, b"\xff\x00\x01"),
    HashRequest(0, 65536),
    Hashes(5, b"\x02" * 32),
    CycleBegin("c1", None, 0, 4, CycleKind.SEED),
    CycleBegin("c1", "0000000001", 3, 4, CycleKind.HASH_SCAN),
    Data(65536, 65536, xxhash.xxh3_128_digest(BLOCK), BLOCK, False),
    Data(0, 65536, xxhash.xxh3_128_digest(BLOCK), zstandard.ZstdCompressor().compress(BLOCK), True),
    ZeroRun(0, 1 << 20),
    StreamEnd(10, 3),
    CycleEnd(b"\x03" * 16, 10, 3, Consistency.APP, 1_700_000_000.5, {"vm": "web1", "n": [1, 2]}),
    Ack(AckKind.POINT, 7, 0, "0000000007"),
    Error(ErrorCode.CONFLICT, "disk x: busy"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: p.Message) -> None:
    raw = msg.encode()
    assert len(raw) <= p.MAX_FRAME
    assert p.decode_all(raw) == [msg]


def test_encode_data_matches_dataclass() -> None:
    d = Data(65536, 65536, b"\x09" * 16, BLOCK, False)
    assert p.encode_data(65536, 65536, b"\x09" * 16, BLOCK, False) == d.encode()


def test_many_frames_in_one_stream() -> None:
    raw = b"".join(m.encode() for m in SAMPLES)
    assert p.decode_all(raw) == SAMPLES


def _header(ftype: int = 1, flags: int = 0, length: int = 0, magic: bytes = b"SBRP", version: int = 1,
            good_check: bool = True) -> bytes:
    first = struct.pack(">4sBBHI", magic, version, ftype, flags, length)
    check = xxhash.xxh32_intdigest(first) if good_check else 0
    return first + struct.pack(">I", check)


@pytest.mark.parametrize("head, message", [
    (_header(magic=b"HTTP"), "bad frame magic"),
    (_header(good_check=False), "header checksum"),
    (_header(version=2), "unsupported protocol version 2"),
    (_header(ftype=99), "unknown frame type 99"),
    (_header(ftype=p.FrameType.HELLO, length=1 << 31), "oversized HELLO frame"),
    (_header(ftype=p.FrameType.DATA, length=p.MAX_FRAME), "oversized DATA frame"),
])
def test_bad_headers(head: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        p.read_frame(io.BytesIO(head + bytes(64)))


def test_truncated() -> None:
    raw = SAMPLES[0].encode()
    with pytest.raises(p.ConnectionLost, match="connection lost mid-frame: after 5 of 16 header bytes"):
        p.read_frame(io.BytesIO(raw[:5]))
    with pytest.raises(p.ConnectionLost, match=r"after \d+ of \d+ payload bytes of a HELLO frame"):
        p.read_frame(io.BytesIO(raw[:-1]))
    # a DATA frame cut inside its body is a lost connection, never a checksum question
    data = p.Data(0, 4096, bytes(16), bytes(4096)).encode()
    with pytest.raises(p.ConnectionLost, match="of a DATA frame"):
        p.read_frame(io.BytesIO(data[:-100]))
    with pytest.raises(p.ConnectionClosed):
        p.read_frame(io.BytesIO(b""))


def test_trailing_bytes_and_bad_values() -> None:
    def frame(t: p.FrameType, payload: bytes, flags: int = 0) -> io.BytesIO:
        return io.BytesIO(p._frame_head(t, flags, len(payload)) + payload)

    good = Hello("d", 1 << 20, 65536).payload()
    with pytest.raises(ProtocolError, match="trailing"):
        p.read_frame(frame(p.FrameType.HELLO, good + b"\0"))
    with pytest.raises(ProtocolError, match="not a valid identifier"):
        p.read_frame(frame(p.FrameType.HELLO, Hello("../etc", 1 << 20, 65536).payload()))
    with pytest.raises(ProtocolError, match="block size 1000"):
        p.read_frame(frame(p.FrameType.HELLO, Hello("d", 1 << 20, 1000).payload()))
    with pytest.raises(ProtocolError, match="unknown flags"):
        p.read_frame(frame(p.FrameType.HELLO, good, flags=4))
    with pytest.raises(ProtocolError, match="not valid UTF-8"):
        p.read_frame(frame(p.FrameType.ERROR, struct.pack(">HH", 1, 2) + b"\xff\xfe"))
    with pytest.raises(ProtocolError, match="stream 4 of 4"):
        p.read_frame(frame(p.FrameType.CYCLE_BEGIN, CycleBegin("c", None, 4, 4).payload()))
    with pytest.raises(ProtocolError, match="body of 10 bytes"):
        p.read_frame(frame(p.FrameType.DATA, Data(0, 65536, bytes(16), bytes(10)).payload()))
    with pytest.raises(ProtocolError, match="compressed body"):
        p.read_frame(frame(p.FrameType.DATA, Data(0, 100, bytes(16), bytes(100), True).payload(), flags=1))
    with pytest.raises(ProtocolError, match="not valid JSON"):
        bad = CycleEnd(bytes(16), 0, 0, Consistency.CRASH, 1.0).payload()[:-6] + struct.pack(">I", 3) + b"{{{"
        p.read_frame(frame(p.FrameType.CYCLE_END, bad))
    with pytest.raises(ProtocolError, match="created_at"):
        p.read_frame(frame(p.FrameType.CYCLE_END, CycleEnd(bytes(16), 0, 0, Consistency.CRASH,
                                                            float("nan")).payload()))
    with pytest.raises(ProtocolError, match="empty run"):
        p.read_frame(frame(p.FrameType.ZERO_RUN, ZeroRun(0, 0).payload()))


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_arbitrary_bytes_only_raise_protocol_errors(data: bytes) -> None:
    try:
        p.decode_all(data)
    except ProtocolError:
        pass


@given(st.sampled_from(SAMPLES), st.integers(0, 2000), st.integers(0, 255))
@settings(max_examples=300)
def test_corrupted_frames_only_raise_protocol_errors(msg: p.Message, pos: int, value: int) -> None:
    raw = bytearray(msg.encode())
    raw[pos % len(raw)] = value
    try:
        p.decode_all(bytes(raw))
    except ProtocolError:
        pass


@given(st.sets(st.integers(0, 100_000), max_size=300))
def test_resume_frames_round_trip(blocks: set[int]) -> None:
    frames = p.resume_frames(blocks, 100_001)
    back: set[int] = set()
    for f in frames:
        assert p.decode_all(f.encode()) == [f]
        back.update(f.blocks())
    assert back == blocks


def test_resume_frames_split_large_sets() -> None:
    blocks = {0, p.MAX_RESUME_BITS + 5, 3 * p.MAX_RESUME_BITS}
    frames = p.resume_frames(blocks, 4 * p.MAX_RESUME_BITS)
    assert len(frames) == 3
    assert {b for f in frames for b in f.blocks()} == blocks


def test_sequence() -> None:
    seq = ReceiverSequence()
    with pytest.raises(ProtocolError, match="unexpected DATA frame in state await-hello; expected HELLO"):
        seq.accept(SAMPLES[8])
    seq.accept(SAMPLES[0])
    seq.accept(HashRequest(0, 1))
    with pytest.raises(ProtocolError, match="unexpected CYCLE_END"):
        seq.accept(SAMPLES[12])
    seq.accept(CycleBegin("c", None, 0, 2))
    seq.accept(SAMPLES[8])
    seq.accept(ZeroRun(0, 65536))
    with pytest.raises(ProtocolError, match="unexpected HELLO"):
        seq.accept(SAMPLES[0])
    seq.accept(StreamEnd(1, 1))
    seq.accept(SAMPLES[12])
    assert seq.state == ReceiverSequence.READY
    # a joining stream may not send CYCLE_END; after its STREAM_END it is idle again and
    # may join the next cycle on the same connection
    seq2 = ReceiverSequence()
    seq2.accept(SAMPLES[0])
    seq2.accept(CycleBegin("c", None, 1, 2))
    seq2.accept(StreamEnd(0, 0))
    with pytest.raises(ProtocolError, match="unexpected CYCLE_END frame in state ready"):
        seq2.accept(SAMPLES[12])
    assert seq2.state == ReceiverSequence.READY
    seq2.accept(CycleBegin("d", None, 1, 2))
    assert seq2.state == ReceiverSequence.IN_CYCLE


def test_error_maps_to_exceptions() -> None:
    from standby.errors import Conflict, IntegrityError, OutOfSpace

    assert isinstance(Error(ErrorCode.CONFLICT, "x").to_exception(), Conflict)
    assert isinstance(Error(ErrorCode.INTEGRITY, "x").to_exception(), IntegrityError)
    assert isinstance(Error(999, "x").to_exception(), p.RemoteError)
    assert Error.from_exception(OSError(28, "No space left on device")).code == ErrorCode.OUT_OF_SPACE
    assert Error.from_exception(OutOfSpace("full")).code == ErrorCode.OUT_OF_SPACE
    long = Error(1, "é" * 5000)
    assert p.decode_all(long.encode())[0].message.startswith("é")
