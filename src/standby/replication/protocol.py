"""Standby replication wire protocol, version 1 (SBRP/1).

Everything that crosses the wire between a sender (primary host) and an agent's
receiver (secondary host) is defined here. The byte stream runs inside mutual TLS 1.3
(see `tls.py`); the protocol does not repeat what TLS guarantees (confidentiality,
integrity of the stream), but it checks every block end to end with its own checksum
and proves the whole disk state with a digest at the end of a cycle.

Frame
-----
Every frame is a 16-byte header followed by `length` bytes of payload. All integers are
big-endian (network order).

    offset size field
    0      4    magic        b"SBRP"
    4      1    version      1
    5      1    type         FrameType (below)
    6      2    flags        per type; DATA: bit 0 = payload is zstd-compressed
    8      4    length       payload length in bytes
    12     4    hcheck       xxh32 (seed 0) of the header bytes 0..11

A reader checks magic, version, type, the header checksum and the length against the
per-type maximum BEFORE reading the payload: a frame is never larger than MAX_FRAME
(16 + 1 MiB + 64 bytes). Then the payload is decoded strictly: exact length (no
trailing bytes), valid UTF-8, values in range. Anything else is a ProtocolError with a
message naming the fault; nothing in this module raises another exception type for bad
input.

Strings (`str16`) are a u16 byte length then UTF-8. Identifiers (disk, cycle and point
ids) match `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`; the empty string means "none" where
stated.

Frame types and payloads
------------------------
    1  HELLO         u16 version, u8 role, u32 block_size, u64 size, str16 disk_id
                     role 1 = sender. The receiver refuses another version or block
                     size, and a disk whose replica has another size.
    2  HELLO_OK      u16 version, u8 has_latest, str16 latest_point, 16B latest_digest,
                     u64 replica_size (0: no replica yet), str16 resume_cycle,
                     str16 resume_base, u64 resume_blocks, u32 resume_frames
                     The replica's latest point and, when a cycle was left unfinished,
                     its id and base point (a sender resumes a seed under that id);
                     `resume_frames` RESUME frames follow with the staged block bitmap.
                     Version 1 agents send resume_blocks = resume_frames = 0 here and
                     the authoritative staged set with ACK BEGUN, once the store has
                     re-verified the staged blocks on CYCLE_BEGIN.
    3  RESUME        u64 first_block, u32 nbits, ceil(nbits/8) bytes of bitmap
                     bit i (LSB first in each byte) set = block first_block+i staged.
    4  HASH_REQUEST  u64 first_block, u32 count (1..65536)
                     Asks for the replica's block digests at its latest point.
    5  HASHES        u64 first_block, u32 count, count x 16B xxh3-128 digests
    6  CYCLE_BEGIN   str16 cycle_id, str16 base_point (empty: none), u16 stream_index,
                     u16 stream_count (1..64), u8 kind (1 seed, 2 extents, 3 hash scan)
                     Stream 0 opens the cycle (answered by ACK BEGUN plus RESUME
                     frames: the authoritative staged set); streams 1..n-1 join it.
    7  DATA          u64 offset, u32 raw_length, 16B xxh3-128 of the raw block, payload
                     offset is block aligned; raw_length is the block's length; the
                     payload is raw_length raw bytes, or (flag bit 0) a zstd frame that
                     must decompress to exactly raw_length bytes and is smaller than it.
                     The checksum is verified before the block is applied.
    8  ZERO_RUN      u64 offset, u64 length   (blocks that are all zero; never sent
                     as DATA)
    9  STREAM_END    u64 data_blocks, u64 zero_blocks   (what this stream sent)
                     Answered by ACK STREAM once every frame of the stream is applied.
   10  CYCLE_END     16B disk_digest, u64 data_blocks, u64 zero_blocks (cycle totals),
                     u8 consistency (1 crash, 2 app), f64 created_at (Unix time),
                     u32 meta length, meta (a JSON object, at most 64 KiB)
                     Stream 0 only, after every stream got its ACK STREAM. The receiver
                     commits the point only if the replica's digest equals disk_digest.
   11  ACK           u8 kind (1 BEGUN, 2 STREAM, 3 POINT, 4 PROGRESS), u64 value,
                     u32 count, str16 text
                     BEGUN: value = blocks staged, count = RESUME frames following;
                     STREAM: value = blocks applied on this stream; POINT: text = the
                     new point id, value = its sequence number.
   12  ERROR         u16 code (ErrorCode), str16 message (at most 4 KiB)
                     Either side may send it; the connection is closed after it.

Order
-----
A sender connection goes: HELLO -> (HASH_REQUEST)* -> CYCLE_BEGIN -> (DATA | ZERO_RUN)*
-> STREAM_END -> [stream 0: CYCLE_END] -> back to the idle state (HASH_REQUEST or
CYCLE_BEGIN) for another cycle of the same disk, or a close: streams 1..n-1 return to it
after their STREAM_END, stream 0 after its CYCLE_END, so a sender keeps its connections
from cycle to cycle (a stream may take another index in a later cycle). A sender need
not wait for ACK BEGUN before it sends its DATA: the receiver answers every frame in
order. The receiver enforces this with `ReceiverSequence`; any frame out of order is a
ProtocolError, answered by ERROR and a close. The staged blocks of a broken cycle stay
staged (a seed resumes from them), and no recovery point changes.

Versioning: the header carries the version of the frame; HELLO names the version the
sender speaks. Version 1 agents refuse every other version with an ERROR (code
VERSION) naming the versions they speak.
"""

from __future__ import annotations

import enum
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, ClassVar

import xxhash

from standby.errors import (
    BadInput,
    Conflict,
    IntegrityError,
    NotFound,
    OutOfSpace,
    Refused,
    RemoteError,
    StandbyError,
)

MAGIC = b"SBRP"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
HEADER = struct.Struct(">4sBBHII")
HEADER_SIZE = HEADER.size  # 16
MAX_PAYLOAD = 1024 * 1024 + 64
MAX_FRAME = HEADER_SIZE + MAX_PAYLOAD
MAX_HASHES_PER_FRAME = 65536
MAX_RESUME_BITS = 8 * 1024 * 1024  # one RESUME frame: 1 MiB of bitmap
MAX_STREAMS = 64
MAX_META = 64 * 1024
MAX_ERROR_MESSAGE = 4096
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 1024 * 1024
DIGEST_LEN = 16

FLAG_COMPRESSED = 0x1

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ProtocolError(RemoteError):
    """The peer sent something this protocol does not allow."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection at a frame boundary."""


class ConnectionLost(ProtocolError):
    """The stream ended inside a frame: a cut link or a peer that died mid-write. Not a
    malformed frame and never an integrity error: nothing of the partial frame is used."""


class FrameType(enum.IntEnum):
    HELLO = 1
    HELLO_OK = 2
    RESUME = 3
    HASH_REQUEST = 4
    HASHES = 5
    CYCLE_BEGIN = 6
    DATA = 7
    ZERO_RUN = 8
    STREAM_END = 9
    CYCLE_END = 10
    ACK = 11
    ERROR = 12


class Role(enum.IntEnum):
    SENDER = 1


class CycleKind(enum.IntEnum):
    SEED = 1
    EXTENTS = 2
    HASH_SCAN = 3


class AckKind(enum.IntEnum):
    BEGUN = 1
    STREAM = 2
    POINT = 3
    PROGRESS = 4


class Consistency(enum.IntEnum):
    CRASH = 1
    APP = 2

    @property
    def label(self) -> str:
        return "crash" if self is Consistency.CRASH else "app"

    @classmethod
    def from_label(cls, label: str) -> Consistency:
        try:
            return {"crash": cls.CRASH, "app": cls.APP}[label]
        except KeyError:
            raise BadInput(f"consistency must be 'crash' or 'app', not {label!r}") from None


class ErrorCode(enum.IntEnum):
    PROTOCOL = 1
    VERSION = 2
    BAD_INPUT = 3
    NOT_FOUND = 4
    CONFLICT = 5
    INTEGRITY = 6
    OUT_OF_SPACE = 7
    REFUSED = 8
    REMOTE = 9
    INTERNAL = 70


_CODE_TO_ERROR: dict[ErrorCode, type[StandbyError]] = {
    ErrorCode.PROTOCOL: ProtocolError,
    ErrorCode.VERSION: ProtocolError,
    ErrorCode.BAD_INPUT: BadInput,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.CONFLICT: Conflict,
    ErrorCode.INTEGRITY: IntegrityError,
    ErrorCode.OUT_OF_SPACE: OutOfSpace,
    ErrorCode.REFUSED: Refused,
    ErrorCode.REMOTE: RemoteError,
    ErrorCode.INTERNAL: RemoteError,
}


def error_code_for(exc: BaseException) -> ErrorCode:
    """The wire code for an exception raised while serving a frame."""
    for cls, code in ((ProtocolError, ErrorCode.PROTOCOL), (IntegrityError, ErrorCode.INTEGRITY),
                      (OutOfSpace, ErrorCode.OUT_OF_SPACE), (Conflict, ErrorCode.CONFLICT),
                      (NotFound, ErrorCode.NOT_FOUND), (BadInput, ErrorCode.BAD_INPUT),
                      (Refused, ErrorCode.REFUSED), (RemoteError, ErrorCode.REMOTE)):
        if isinstance(exc, cls):
            return code
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:  # ENOSPC
        return ErrorCode.OUT_OF_SPACE
    return ErrorCode.INTERNAL


# ---------------------------------------------------------------------------- codecs


class _Reader:
    """Strict cursor over one payload; every fault is a ProtocolError naming the frame."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: bytes, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise ProtocolError(f"{self.what}: payload truncated ({len(self.buf)} bytes, needs more than {self.pos})")
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        s = struct.Struct(">" + fmt)
        return s.unpack(self.take(s.size))

    def u8(self) -> int:
        return int(self.unpack("B")[0])

    def u16(self) -> int:
        return int(self.unpack("H")[0])

    def u32(self) -> int:
        return int(self.unpack("I")[0])

    def u64(self) -> int:
        return int(self.unpack("Q")[0])

    def f64(self) -> float:
        return float(self.unpack("d")[0])

    def str16(self, name: str, limit: int = 1024) -> str:
        n = self.u16()
        if n > limit:
            raise ProtocolError(f"{self.what}: {name} is {n} bytes long (limit {limit})")
        raw = self.take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.what}: {name} is not valid UTF-8") from None

    def ident(self, name: str, allow_empty: bool = False) -> str:
        value = self.str16(name, 128)
        if value == "" and allow_empty:
            return value
        if not _ID_RE.fullmatch(value):
            raise ProtocolError(f"{self.what}: {name} {value!r} is not a valid identifier")
        return value

    def rest(self) -> bytes:
        out = self.buf[self.pos:]
        self.pos = len(self.buf)
        return out

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolError(f"{self.what}: {len(self.buf) - self.pos} unexpected trailing bytes")


def _str16(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError("string too long for str16")
    return struct.pack(">H", len(raw)) + raw


def valid_id(value: str) -> bool:
    return bool(_ID_RE.fullmatch(value))


def check_id(value: str, name: str) -> str:
    if not valid_id(value):
        raise BadInput(f"{name} {value!r} is not a valid identifier "
                       "(letters, digits, '.', '_', '-'; at most 128; starts with a letter or digit)")
    return value


class Message:
    TYPE: ClassVar[FrameType]
    MAX: ClassVar[int] = 1024

    def payload(self) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def flags(self) -> int:
        return 0

    @classmethod
    def decode(cls, payload: bytes, flags: int) -> Message:  # pragma: no cover - overridden
        raise NotImplementedError

    def encode(self) -> bytes:
        return encode_frame(self.TYPE, self.payload(), self.flags())


def _no_flags(what: str, flags: int) -> None:
    if flags:
        raise ProtocolError(f"{what}: unknown flags 0x{flags:04x}")


@dataclass(frozen=True)
class Hello(Message):
    TYPE = FrameType.HELLO
    disk_id: str
    size: int
    block_size: int
    role: Role = Role.SENDER
    version: int = VERSION

    def payload(self) -> bytes:
        return struct.pack(">HBIQ", self.version, self.role, self.block_size, self.size) + _str16(self.disk_id)

    @classmethod
    def decode(cls, payload: bytes, flags: int) -> Hello:
        _no_flags("HELLO", flags)
        r = _Reader(payload, "HELLO")
        version, role, block_size, size = r.unpack("HBIQ")
        disk_id = r.ident("disk id")
        r.end()
        if role not in Role._value2member_map_:
            raise ProtocolError(f"HELLO: unknown role {role}")
        if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or block_size & (block_size - 1):
            raise ProtocolError(f"HELLO: block size {block_size} is not a power of two in 4 KiB..1 MiB")
        if size == 0 or size > 1 << 56:
            raise ProtocolError(f"HELLO: disk size {size} out of range")
        return cls(disk_id, size, block_size, Role(role), version)


@dataclass(frozen=True)
class HelloOk(Message):
    TYPE = FrameType.HELLO_OK
    latest_point: str | None
    latest_digest: bytes | None
    replica_size: int = 0
    resume_cycle: str | None = None
    resume_base: str | None = None
    resume_blocks: int = 0
    resume_frames: int = 0
    version: int = VERSION

    def payload(self) -> bytes:
        return (struct.pack(">HB", self.version, 1 if self.latest_point else 0)
                + _str16(self.latest_point or "") + (self.latest_digest or bytes(DIGEST_LEN))
                + struct.pack(">Q", self.replica_size)
                + _str16(self.resume_cycle or "") + _str16(self.resume_base or "")
                + struct.pack(">QI", self.resume_blocks, self.resume_frames))

    @classmethod
    def decode(cls, payload: bytes, flags: int) -> HelloOk:
        _no_flags("HELLO_OK", flags)
        r = _Reader(payload, "HELLO_OK")
        version, has_latest = r.unpack("HB")
        latest = r.ident("latest point", allow_empty=not has_latest)
        digest = r.take(DIGEST_LEN)
        replica_size = r.u64()
        resume_cycle = r.ident("resume cycle", allow_empty=True)
        resume_base = r.ident("resume base", allow_empty=True)
        resume_blocks, resume_frames = r.unpack("QI")
        r.end()
        if has_latest not in (0, 1) or (not has_latest and latest):
            raise ProtocolError("HELLO_OK: inconsistent latest point fields")
        return cls(latest or None, digest if has_latest else None, replica_size, resume_cycle or None,
                   resume_base or None, resume_blocks, resume_frames, version)


@dataclass(frozen=True)
class Resume(Message):
    TYPE = FrameType.RESUME
    MAX = 12 + MAX_RESUME_BITS // 8
    first_block: int
    nbits: int
    bitmap: bytes

    def payload(self) -> bytes:
        return struct.pack(">QI", self.first_block, self.nbits) + self.bitmap

    @classmethod
    def decode(cls, payload: bytes, flags: int) -> Resume:
        _no_flags("RESUME", flags)
        r = _Reader(payload, "RESUME")
        first, nbits = r.unpack("QI")
        if nbits == 0 or nbits > MAX_RESUME_BITS:
            raise ProtocolError(f"RESUME: {nbits} bits out of range")
        bitmap = r.take((nbits + 7) // 8)
        r.end()
        return cls(first, nbits, bitmap)

    def blocks(self) -> list[int]:
        out = []
        for byte_index, byte in enumerate(self.bitmap):
            if byte:
                base = self.first_block + byte_index * 8
                for bit in range(8):
                    if byte >> bit & 1 and byte_index * 8 + bit < self.nbits:
                        out.append(base + bit)
        return out


def resume_frames(blocks: set[int] | frozenset[int], n_blocks: int) -> list[Resume]:
    """Encode a set of staged block indexes as RESUME frames (only non-empty chunks)."""
    if not blocks:
        return []
    frames = []
    ordered = sorted(blocks)
    chunk_first = -1
    bitmap = bytearray()
    for index in ordered:
        if index < 0 or index >= n_blocks:
            continue
        if chunk_first < 0 or index >= chunk_first + MAX_RESUME_BITS:
            if chunk_first >= 0:
                frames.append(_resume_chunk(chunk_first, bitmap, n_blocks))
            chunk_first = index - index % 8
            bitmap = bytearray(MAX_RESUME_BITS // 8)
        rel = index - chunk_first
        bitmap[rel >> 3] |= 1 << (rel & 7)
    if chunk_first >= 0:
        frames.append(_resume_chunk(chunk_first, bitmap, n_blocks))
    return frames


def _resume_chunk(first: int, bitmap: bytearray, n_blocks: int) -> Resume:
    used = len(bitmap.rstrip(b"\0"))
    nbits = min(used * 8, n_blocks - first)
    return Resume(first, nbits, bytes(bitmap[:(nbits + 7) // 8]))


@dataclass(frozen=True)
class HashRequest(Message):
    TYPE = FrameType.HASH_REQUEST
    first_block: int
    count: int

    def payload(self) -> bytes:
        return struct.pack(">QI", self.first_block, self.count)

    @classmethod
    def decode(cls, payload: bytes, flags: int) -> HashRequest:
        _no_flags("HASH_REQUEST", flags)
        r = _Reader(payload, "HASH_REQUEST")
        first, count = r.unpack("QI")
        r.end()
        if not 1 <= count <= MAX_HASHES_PER_FRAME:
            raise ProtocolError(f"HASH_REQUEST: count {count} out of range 1..{MAX_HASHES_PER_FRAME}")
        return cls(first, count)


@dataclass(frozen=True)
class Hashes(Message):
    TYPE = FrameType.HASHES
    MAX = 12 + MAX_HASHES_PER_FRAME * DIGEST_LEN
    first_block: int
    digests: bytes

    def payload(self) -> bytes:
        return struct.pack(">QI", self.first_block, len(self.digests) // DIGEST_LEN) + self.digests

    @classmethod
    def decode(cls, payload: bytes, flags: int) -> Hashes:
        _no_flags("HASHES", flags)
        r = _Reader(payload, "HASHES")
        first, count = r.unpack("QI")
        if not 1 <= count <= MAX_HASHES_PER_FRAME:
            raise ProtocolError(f"HASHES: count {count} out of range")
        digests = r.take(count * DIGEST_LEN)
        r.end()
        return cls(first, digests)


@dataclass(frozen=True)
class CycleBegin(Message):
    TYPE = FrameType.CYCLE_BEGIN
    cycle_id: str
    base_point: str | None
    stream_index: int = 0
    stream_count: int = 1
    kind: CycleKind = CycleKind.EXTENTS

    def payload(self) -> bytes:
        return (_str16(self.cycle_id) + _str16(self.base_point or "")
                + struct.pack(">HHB", self.stream_index, self.stream_count, self.kind))

    @classmethod
    def decode(cls, payload: bytes, flags: int) -> CycleBegin:
        _no_flags("CYCLE_BEGIN", flags)
        r = _Reader(payload, "CYCLE_BEGIN")
        cycle = r.ident("cycle id")
        base = r.ident("base point", allow_empty=True)
        index, count, kind = r.unpack("HHB")
        r.end()
        if not 1 <= count <= MAX_STREAMS or index >= count:
            raise ProtocolError(f"CYCLE_BEGIN: stream {index} of {count} out of range (at most {MAX_STREAMS})")
        if kind not in CycleKind._value2member_map_:
            raise ProtocolError(f"CYCLE_BEGIN: unknown cycle kind {kind}")
        return cls(cycle, base or None, index, count, CycleKind(kind))


_DATA_HEAD = struct.Struct(">QI16s")


@dataclass(frozen=True)
class Data(Message):
    """One block. `payload_bytes` is what travels: raw, or zstd when `compressed`."""

    TYPE = FrameType.DATA
    MAX = _DATA_HEAD.size + MAX_BLOCK_SIZE
    offset: int
    raw_length: int
    checksum: bytes
    body: bytes | memoryview  # decoded frames give a memoryview of the payload
    compressed: bool = False

    def payload(self) -> bytes:
        return _DATA_HEAD.pack(self.offset, self.raw_length, self.checksum) + self.body

    def flags(self) -> int:
        return FLAG_COMPRESSED if self.compressed else 0

    @classmethod
    def decode(cls, payload: bytes, flags: int) -> Data:
        if flags & ~FLAG_COMPRESSED:
            raise ProtocolError(f"DATA: unknown flags 0x{flags:04x}")
        if len(payload) < _DATA_HEAD.size:
            raise ProtocolError(f"DATA: payload truncated ({len(payload)} bytes)")
        offset, raw_length, checksum = _DATA_HEAD.unpack_from(payload)
        body = memoryview(payload)[_DATA_HEAD.size:]  # no copy of the block
        compressed = bool(flags & FLAG_COMPRESSED)
        if raw_length == 0 or raw_length > MAX_BLOCK_SIZE:
            raise ProtocolError(f"DATA: raw length {raw_length} out of range")
        if compressed and not 0 < len(body) < raw_length:
            raise ProtocolError(f"DATA: compressed body of {len(body)} bytes for a {raw_length}-byte block")
        if not compressed and len(body) != raw_length:
            raise ProtocolError(f"DATA: body of {len(body)} bytes, raw length says {raw_length}")
        return cls(offset, raw_length, checksum, body, compressed)


def encode_data(offset: int, raw_length: int, checksum: bytes, body: bytes, compressed: bool) -> bytes:
    """The hot path's encoder: one bytes object, header and payload, no dataclass."""
    return data_header(offset, raw_length, checksum, len(body), compressed) + body


def data_header(offset: int, raw_length: int, checksum: bytes, body_length: int, compressed: bool) -> bytes:
    """The 44 bytes of a DATA frame before its body (a sender appends the body itself)."""
    return _frame_head(FrameType.DATA, FLAG_COMPRESSED if compressed else 0,
                       _DATA_HEAD.size + body_length) + _DATA_HEAD.pack(offset, raw_length, checksum)


@dataclass(frozen=True)
class ZeroRun(Message):
    TYPE = FrameType.ZERO_RUN
    offset: int
    length: int

    def payload(self) -> bytes:
        return struct.pack(">QQ", self.offset, self.length)

    @classmethod
    def decode(cls, payload: bytes, flags: int) -> ZeroRun:
        _no_flags("ZERO_RUN", flags)
        r = _Reader(payload, "ZERO_RUN")
        offset, length = r.unpack("QQ")
        r.end()
        if length == 0:
            raise ProtocolError("ZERO_RUN: empty run")
        return cls(offset, length)


@dataclass(frozen=True)
class StreamEnd(Message):
    TYPE = FrameType.STREAM_END
    data_blocks: int
    zero_blocks: int

    def payload(self) -> bytes:
        return struct.pack(">QQ", self.data_blocks, self.zero_blocks)

    @classmethod
    def decode(cls, payload: bytes, flags: int) -> StreamEnd:
        _no_flags("STREAM_END", flags)
        r = _Reader(payload, "STREAM_END")
        data_blocks, zero_blocks = r.unpack("QQ")
        r.end()
        return cls(data_blocks, zero_blocks)


@dataclass(frozen=True)
class CycleEnd(Message):
    TYPE = FrameType.CYCLE_END
    MAX = 64 + MAX_META
    digest: bytes
    data_blocks: int
    zero_blocks: int
    consistency: Consistency
    created_at: float
    meta: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> bytes:
        meta = json.dumps(self.meta, separators=(",", ":"), sort_keys=True).encode()
        if len(meta) > MAX_META:
            raise BadInput(f"point metadata is {len(meta)} bytes as JSON (limit {MAX_META})")
        return (self.digest + struct.pack(">QQBdI", self.data_blocks, self.zero_blocks, self.consistency,
                                          self.created_at, len(meta)) + meta)

    @classmethod
    def decode(cls, payload: bytes, flags: int) -> CycleEnd:
        _no_flags("CYCLE_END", flags)
        r = _Reader(payload, "CYCLE_END")
        digest = r.take(DIGEST_LEN)
        data_blocks, zero_blocks, consistency, created_at, meta_len = r.unpack("QQBdI")
        if meta_len > MAX_META:
            raise ProtocolError(f"CYCLE_END: metadata of {meta_len} bytes (limit {MAX_META})")
        raw_meta = r.take(meta_len)
        r.end()
        if consistency not in Consistency._value2member_map_:
            raise ProtocolError(f"CYCLE_END: unknown consistency {consistency}")
        if not math.isfinite(created_at) or created_at < 0:
            raise ProtocolError("CYCLE_END: created_at is not a valid time")
        try:
            meta = json.loads(raw_meta) if raw_meta else {}
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError("CYCLE_END: metadata is not valid JSON") from None
        if not isinstance(meta, dict):
            raise ProtocolError("CYCLE_END: metadata is not a JSON object")
        return cls(digest, data_blocks, zero_blocks, Consistency(consistency), created_at, meta)


@dataclass(frozen=True)
class Ack(Message):
    TYPE = FrameType.ACK
    kind: AckKind
    value: int = 0
    count: int = 0
    text: str = ""

    def payload(self) -> bytes:
        return struct.pack(">BQI", self.kind, self.value, self.count) + _str16(self.text)

    @classmethod
    def decode(cls, payload: bytes, flags: int) -> Ack:
        _no_flags("ACK", flags)
        r = _Reader(payload, "ACK")
        kind, value, count = r.unpack("BQI")
        text = r.str16("text", 1024)
        r.end()
        if kind not in AckKind._value2member_map_:
            raise ProtocolError(f"ACK: unknown kind {kind}")
        return cls(AckKind(kind), value, count, text)


@dataclass(frozen=True)
class Error(Message):
    TYPE = FrameType.ERROR
    MAX = 4 + MAX_ERROR_MESSAGE
    code: int
    message: str

    def payload(self) -> bytes:
        raw = self.message.encode("utf-8")[:MAX_ERROR_MESSAGE].decode("utf-8", "ignore")
        return struct.pack(">H", self.code) + _str16(raw)

    @classmethod
    def decode(cls, payload: bytes, flags: int) -> Error:
        _no_flags("ERROR", flags)
        r = _Reader(payload, "ERROR")
        code = r.u16()
        message = r.str16("message", MAX_ERROR_MESSAGE)
        r.end()
        return cls(code, message)

    def to_exception(self, peer: str = "agent") -> StandbyError:
        try:
            code = ErrorCode(self.code)
        except ValueError:
            code = ErrorCode.REMOTE
        cls = _CODE_TO_ERROR[code]
        return cls(f"{peer}: {self.message}")

    @classmethod
    def from_exception(cls, exc: BaseException) -> Error:
        code = error_code_for(exc)
        if isinstance(exc, StandbyError):
            message = exc.message
        elif code is ErrorCode.OUT_OF_SPACE:
            message = f"out of space on the replica store: {exc}"
        else:
            message = f"internal error: {type(exc).__name__}: {exc}"
        return cls(code, message)


MESSAGES: dict[FrameType, type[Message]] = {
    cls.TYPE: cls
    for cls in (Hello, HelloOk, Resume, HashRequest, Hashes, CycleBegin, Data, ZeroRun, StreamEnd, CycleEnd,
                Ack, Error)
}
MAX_PAYLOAD_BY_TYPE: dict[FrameType, int] = {t: min(cls.MAX, MAX_PAYLOAD) for t, cls in MESSAGES.items()}


# ---------------------------------------------------------------------------- frames


def _frame_head(ftype: int, flags: int, length: int) -> bytes:
    first = struct.pack(">4sBBHI", MAGIC, VERSION, ftype, flags, length)
    return first + struct.pack(">I", xxhash.xxh32_intdigest(first))


def encode_frame(ftype: FrameType, payload: bytes, flags: int = 0) -> bytes:
    if len(payload) > MAX_PAYLOAD_BY_TYPE[ftype]:
        raise ValueError(f"{ftype.name} payload of {len(payload)} bytes exceeds its limit")
    return _frame_head(ftype, flags, len(payload)) + payload


def parse_header(head: bytes) -> tuple[FrameType, int, int]:
    """Check a 16-byte header; return (type, flags, payload length)."""
    if len(head) != HEADER_SIZE:
        raise ProtocolError(f"truncated frame header ({len(head)} of {HEADER_SIZE} bytes)")
    magic, version, ftype, flags, length, hcheck = HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r} (not a Standby replication stream?)")
    if xxhash.xxh32_intdigest(head[:12]) != hcheck:
        raise ProtocolError("frame header checksum mismatch")
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(f"unsupported protocol version {version} (this side speaks "
                            f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    try:
        ftype = FrameType(ftype)
    except ValueError:
        raise ProtocolError(f"unknown frame type {ftype}") from None
    limit = MAX_PAYLOAD_BY_TYPE[ftype]
    if length > limit:
        raise ProtocolError(f"oversized {ftype.name} frame: {length} bytes (limit {limit})")
    return ftype, flags, length


def decode_frame(ftype: FrameType, flags: int, payload: bytes) -> Message:
    try:
        return MESSAGES[ftype].decode(payload, flags)
    except ProtocolError:
        raise
    except (struct.error, ValueError, OverflowError) as exc:  # defensive: nothing should reach here
        raise ProtocolError(f"{ftype.name}: malformed payload ({exc})") from None


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if data is None:
        raise ProtocolError("non-blocking stream returned no data")
    if len(data) == n:
        return bytes(data)
    chunks = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        chunks.append(more)
        got += len(more)
    return b"".join(chunks)


def read_frame(stream: BinaryIO) -> Message:
    """Read and decode one frame from a binary stream (a socket's makefile('rb')).

    Raises ConnectionClosed at a clean end of stream, ConnectionLost when it ends inside a
    frame, ProtocolError for everything else that is wrong with the bytes; OSError
    (timeouts, resets) passes through."""
    head = _read_exact(stream, HEADER_SIZE)
    if not head:
        raise ConnectionClosed("connection closed by the peer")
    if len(head) < HEADER_SIZE:
        raise ConnectionLost(f"connection lost mid-frame: after {len(head)} of {HEADER_SIZE} header bytes")
    ftype, flags, length = parse_header(head)
    payload = _read_exact(stream, length) if length else b""
    if len(payload) < length:
        raise ConnectionLost(f"connection lost mid-frame: after {len(payload)} of {length} payload bytes "
                             f"of a {ftype.name} frame")
    return decode_frame(ftype, flags, payload)


def decode_all(data: bytes) -> list[Message]:
    """Decode a whole byte string of frames (tests, tools)."""
    import io

    stream = io.BytesIO(data)
    out = []
    while True:
        try:
            out.append(read_frame(stream))
        except ConnectionClosed:
            return out


# ---------------------------------------------------------------------------- order


class ReceiverSequence:
    """Which frame a receiver accepts next on one connection; a pure state machine."""

    IDLE_BEFORE_HELLO = "await-hello"
    READY = "ready"
    IN_CYCLE = "in-cycle"
    STREAM_ENDED = "stream-ended"
    CLOSED = "closed"

    _ALLOWED = {
        IDLE_BEFORE_HELLO: {FrameType.HELLO},
        READY: {FrameType.HASH_REQUEST, FrameType.CYCLE_BEGIN},
        IN_CYCLE: {FrameType.DATA, FrameType.ZERO_RUN, FrameType.STREAM_END},
        STREAM_ENDED: {FrameType.CYCLE_END},
        CLOSED: set(),
    }

    def __init__(self) -> None:
        self.state = self.IDLE_BEFORE_HELLO
        self.stream_index = 0

    def accept(self, msg: Message) -> None:
        """Advance on `msg` or raise ProtocolError naming what was expected."""
        ftype = msg.TYPE
        if ftype is FrameType.ERROR:
            self.state = self.CLOSED
            return
        allowed = self._ALLOWED[self.state]
        if ftype not in allowed:
            expected = " or ".join(sorted(t.name for t in allowed)) or "nothing more (close)"
            raise ProtocolError(f"unexpected {ftype.name} frame in state {self.state}; expected {expected}")
        if ftype is FrameType.HELLO:
            self.state = self.READY
        elif ftype is FrameType.CYCLE_BEGIN:
            assert isinstance(msg, CycleBegin)
            self.stream_index = msg.stream_index
            self.state = self.IN_CYCLE
        elif ftype is FrameType.STREAM_END:
            # stream 0 ends the cycle with CYCLE_END; the others are done with this cycle
            self.state = self.STREAM_ENDED if self.stream_index == 0 else self.READY
        elif ftype is FrameType.CYCLE_END:
            self.state = self.READY
