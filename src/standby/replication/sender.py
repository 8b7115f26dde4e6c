"""The sender: read, hash, compress and ship one replication cycle of one disk.

This module is the data plane's hot path; `run_cycle` can be benchmarked alone
(`bench_hot_loop` measures the read-zero-hash-compress loop without a network).

One cycle
---------
1. Stream 0 connects (mutual TLS), says HELLO, learns the replica's latest point (id and
   disk digest) and any staged, unfinished cycle.
2. Baseline: the replica's per-block digests at its latest point. The sender's state
   (`SenderState`: the digest table of the last acknowledged point) is used when its
   digest equals the replica's; otherwise the table is fetched (HASH_REQUEST, 16 bytes
   per 64 KiB block, 1/4096 of the disk); a replica without points is all zeros.
3. CYCLE_BEGIN on stream 0, and streams 1..n-1 join the cycle (connecting in parallel
   and resuming stream 0's TLS session). A seed waits for stream 0's ACK BEGUN (it names
   the blocks already staged when a seed resumes); other cycles do not wait: their DATA
   follows CYCLE_BEGIN at once and the ACK BEGUN is read before the ACK STREAM.
4. The change source's extents are cut into work items of at most `chunk_blocks` blocks
   (runs of blocks: a sparse delta's scattered blocks share items) fed to a bounded
   queue; the feeder asks the kernel to read each item ahead (`prefetch`) PREFETCH_ITEMS
   items before it queues it. One worker thread per stream takes items and, per run of
   blocks: reads it (its own descriptor, one preadv into a reused 2 MiB buffer, or pread
   per block for readers without `readinto`); per block: detects zeros (a memcmp in
   place), digests it (xxh3-128), skips it when the digest
   equals the baseline (or when the agent already staged it for a resumed seed),
   coalesces zero blocks into ZERO_RUN frames, compresses the others with its own zstd
   compressor (level 1) per the compression setting (below), and appends DATA frames to
   its own output buffer, flushed to its TLS connection at 256 KiB through the shared
   bandwidth limiter. The new disk state's digest table is the baseline with the
   examined blocks' digests replaced, so the disk digest needs no full read.
5. Each stream ends with STREAM_END and waits for its ACK (all its frames applied);
   then stream 0 sends CYCLE_END with the disk digest, and the agent commits the point
   only if its replica's digest equals it. The ACK names the new point; the sender
   saves its state (digest table and point id).

Compression (`SenderOptions.compress`: "on", "off" or "auto"; True/False mean on/off)
--------------------------------------------------------------------------------------
"on" compresses every block (a block that does not shrink by 1/32 is sent raw, and
after a run of such blocks compression is tried only now and then); "off" never.
"auto" (the default) compresses only while the link is the bottleneck, like
`zstd --adapt`: each stream measures, per window of 4 MiB of data blocks, its rate (raw
bytes per second) and the share of time it spent blocked sending (TCP back-pressure or
the bandwidth limiter). It starts uncompressed; when it is blocked for more than 30% of
a window it tries one window compressed, keeps compressing if that was faster, and
re-measures the other mode after 2, 4, ... 64 windows. A link faster than the
compressor (loopback, LAN) is never back-pressured enough to be worth it, so the data
goes raw; a WAN or a bandwidth limit gets compressed data.

Persistent links
----------------
`AgentLink` keeps a disk's streams open between cycles (a long-running sender
replicates the same disk every few minutes): no TCP or TLS handshake, no HELLO and no
state file read per cycle; the agent returns every stream to the idle state after its
ACK STREAM (stream 0 after ACK POINT). A link that was idle for more than `link_idle`
seconds or whose connection the agent closed is reconnected; a cycle that fails on a
reused link is retried once over fresh connections (a delta is idempotent). `run_cycle`
is a one-shot link.

Memory bound
------------
Independent of the disk size, the data in flight on the sender is at most
    streams x (queue depth 2 work items of at most `chunk_blocks` runs (no data)
               + a READ_BLOCKS read buffer (2 MiB) + 1 compressed block
               + 256 KiB output buffer)
i.e. with the defaults (4 streams, 64 KiB blocks) about 4 x 2.4 MiB = 10 MiB, plus
the kernel's socket buffers and the page cache the read-ahead fills (the feeder asks
for at most PREFETCH_ITEMS + 2 x streams items of `chunk_blocks` blocks = 32 MiB ahead
of the workers); TCP's flow control is the back-pressure: a slow agent blocks `sendall`,
which stops the workers, which stops the reader. The digest tables (baseline and new)
are 16 bytes per 64 KiB block each (2 x 1/4096 of the disk). An idle link holds no data.

Failure: any stream failing (network, agent ERROR) fails the cycle; nothing durable on
the agent is lost (staged blocks of a seed stay staged, points are untouched), and the
next run resumes (seed) or simply repeats the delta.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import xxhash
import zstandard

from standby.domain.bandwidth import Schedule, TokenBucket
from standby.errors import BadInput, Conflict, IntegrityError, RemoteError, StandbyError
from standby.replication.changes import BlockReader, ChangeSource
from standby.replication.digest import BLOCK_SIZE, DIGEST_SIZE, HashTable, zero_block_digest
from standby.replication.protocol import (
    HEADER_SIZE,
    MAX_HASHES_PER_FRAME,
    Ack,
    AckKind,
    Consistency,
    CycleBegin,
    CycleEnd,
    CycleKind,
    Error,
    Hashes,
    HashRequest,
    Hello,
    HelloOk,
    Message,
    ProtocolError,
    Resume,
    StreamEnd,
    ZeroRun,
    check_id,
    data_header,
    parse_header,
    read_frame,
)
from standby.replication.tls import describe_tls_error, hang_up

FLUSH_BYTES = 256 * 1024
DEFAULT_STREAMS = 4
DEFAULT_CHUNK_BLOCKS = 32
READ_BLOCKS = 32  # blocks read at once by readers that offer readinto (2 MiB)
PREFETCH_ITEMS = 8  # work items asked of the kernel's read-ahead before they are queued
COMPRESS_MODES = ("on", "off", "auto")
LINK_IDLE = 60.0  # seconds; agents drop idle connections after 120 s


def compress_mode(value: bool | str) -> str:
    """The compression setting as "on", "off" or "auto" (True/False mean on/off)."""
    if value is True:
        return "on"
    if value is False:
        return "off"
    if isinstance(value, str) and value.lower() in COMPRESS_MODES:
        return value.lower()
    raise BadInput(f"compression must be one of {', '.join(COMPRESS_MODES)}, not {value!r}")


# ---------------------------------------------------------------------------- limiter


class RateLimiter:
    """A token bucket shared by a cycle's streams, its rate following a schedule.

    `clock` and `sleep` are injectable (tests); `now_local` gives the local wall-clock
    time the schedule is evaluated at (re-read at most once a second)."""

    def __init__(self, schedule: Schedule | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 now_local: Callable[[], datetime] = datetime.now) -> None:
        self.schedule = schedule
        self.clock, self.sleep, self.now_local = clock, sleep, now_local
        self._lock = threading.Lock()
        now = clock()
        self.bucket = TokenBucket(schedule.rate_at(now_local()) if schedule else None, now)
        self._checked = now
        self.waited = 0.0

    @property
    def active(self) -> bool:
        return self.schedule is not None

    def set_schedule(self, schedule: Schedule | None) -> None:
        """Follow another schedule from now on (an agent's desired state changed it)."""
        with self._lock:
            self.schedule = schedule
            now = self.clock()
            self.bucket.set_rate(schedule.rate_at(self.now_local()) if schedule else None, now)
            self._checked = now

    def consume(self, n: int) -> None:
        if self.schedule is None:
            return
        with self._lock:
            now = self.clock()
            if now - self._checked >= 1.0:
                self._checked = now
                rate = self.schedule.rate_at(self.now_local())
                if rate != self.bucket.rate:
                    self.bucket.set_rate(rate, now)
            wait = self.bucket.take(n, now)
        if wait > 0:
            self.waited += wait
            self.sleep(wait)


# ---------------------------------------------------------------------------- state


@dataclass
@dataclass
class SenderState:
    """What the sender remembers of a disk between cycles: the digest table of the
    replica's latest acknowledged point, and the id of a seed cycle in progress.

    Files in `state_dir`: `<disk>.json` (point id, digest, size, pending seed) and
    `<disk>.hashes` (the digest table, 16 bytes a block), each replaced atomically
    (temp file + rename). They are a cache, not a record: a table is used only when it
    hashes to the digest in the json and that digest equals the replica's latest point's
    digest, so they are not fsynced (a file lost in a crash costs one table fetch)."""

    disk_id: str
    size: int
    point_id: str | None = None
    digest: str | None = None
    pending_seed: str | None = None
    table: HashTable | None = None

    @staticmethod
    def paths(state_dir: Path, disk_id: str) -> tuple[Path, Path]:
        return state_dir / f"{disk_id}.json", state_dir / f"{disk_id}.hashes"

    @classmethod
    def load(cls, state_dir: Path | None, disk_id: str, size: int) -> SenderState:
        state = cls(disk_id, size)
        if state_dir is None:
            return state
        meta_path, table_path = cls.paths(state_dir, disk_id)
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("size") != size:
                return state
            state.point_id = meta.get("point_id")
            state.digest = meta.get("digest")
            state.pending_seed = meta.get("pending_seed")
            if state.digest and table_path.exists():
                table = HashTable.load(table_path, size)
                if table.disk_digest().hex() == state.digest:
                    state.table = table
        except (OSError, ValueError, TypeError):
            return cls(disk_id, size)
        return state

    def save(self, state_dir: Path | None) -> None:
        if state_dir is None:
            return
        state_dir.mkdir(parents=True, exist_ok=True)
        meta_path, table_path = self.paths(state_dir, self.disk_id)
        if self.table is not None:
            tmp = table_path.with_name(table_path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(self.table._table)
            os.replace(tmp, table_path)
        tmp = meta_path.with_name(meta_path.name + ".tmp")
        tmp.write_text(json.dumps({"disk_id": self.disk_id, "size": self.size, "point_id": self.point_id,
                                   "digest": self.digest, "pending_seed": self.pending_seed,
                                   "saved_at": time.time()}, indent=1))
        os.replace(tmp, meta_path)


# ---------------------------------------------------------------------------- connection


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, allow_any_port: bool = False) -> Endpoint:
        from standby.errors import BadInput

        host, sep, port = text.rpartition(":")
        low = 0 if allow_any_port else 1
        if not sep or not host or not port.isdigit() or not low <= int(port) < 65536:
            raise BadInput(f"address {text!r} is not HOST:PORT")
        return cls(host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class _SocketReader:
    """The read side of a Channel: a byte buffer over the TLS socket, so that frames the
    agent sends while we send (an ERROR, an early ACK) can be picked up without blocking
    (`poll`), and still be read in order by `read_frame`."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    def read(self, n: int) -> bytes:
        while len(self.buf) < n and not self.eof:
            chunk = self.sock.recv(max(64 * 1024, n - len(self.buf)))
            if not chunk:
                self.eof = True
                break
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def poll(self, timeout: float | None) -> None:
        """Take in what has arrived, without waiting; `timeout` is restored afterwards."""
        if self.eof:
            return
        try:
            self.sock.setblocking(False)
            while True:
                try:
                    chunk = self.sock.recv(64 * 1024)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    break
                if not chunk:
                    self.eof = True
                    break
                self.buf += chunk
        finally:
            self.sock.settimeout(timeout)

    def frame_ready(self) -> bool:
        """True when a whole frame (or the end of the stream) is buffered."""
        if len(self.buf) < HEADER_SIZE:
            return self.eof
        try:
            _t, _f, length = parse_header(bytes(self.buf[:HEADER_SIZE]))
        except ProtocolError:
            return True  # read_frame reports it
        return len(self.buf) >= HEADER_SIZE + length

    def close(self) -> None:
        self.buf.clear()


class Channel:
    """One TLS connection to an agent: framed writes (buffered) and reads.

    The agent may fail a cycle while we send (another stream's fault, a full disk): it
    then sends an ERROR at once and discards what follows. `flush` looks for incoming
    frames before each write (a non-blocking read, `check_incoming`), so the sender stops
    within one flush of the ERROR and reports the agent's cause, not a lost connection.
    Frames that arrive early and are not errors (a stream's ACK BEGUN) are kept for `recv`.
    """

    def __init__(self, endpoint: Endpoint, context: ssl.SSLContext, timeout: float,
                 session: ssl.SSLSession | None = None) -> None:
        self.endpoint = endpoint
        try:
            raw = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        except OSError as exc:
            raise RemoteError(f"cannot connect to agent {endpoint}: {exc.strerror or exc}") from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # `session`: resume an earlier TLS session (no second certificate exchange)
            self.sock = context.wrap_socket(raw, server_hostname=endpoint.host, session=session)
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            raise RemoteError(f"TLS handshake with agent {endpoint} failed: {describe_tls_error(exc)}") from None
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.rfile = _SocketReader(self.sock)
        self.early: deque[Message] = deque()  # frames read by check_incoming, not yet by recv
        self.out = bytearray()
        self.bytes_sent = 0
        self.blocked = 0.0  # seconds spent in the limiter and in sendall
        self.closed = False
        self.hello: HelloOk | None = None  # the agent's answer to this connection's HELLO

    def _fail(self, exc: BaseException, doing: str) -> StandbyError:
        if isinstance(exc, StandbyError):
            return exc
        if isinstance(exc, ssl.SSLError):
            return RemoteError(f"agent {self.endpoint} {doing}: {describe_tls_error(exc)}")
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return RemoteError(f"agent {self.endpoint} {doing}: timed out")
        return RemoteError(f"agent {self.endpoint} {doing}: {getattr(exc, 'strerror', None) or exc}")

    def queue(self, frame: bytes) -> None:
        self.out += frame

    def queue_data(self, offset: int, raw_length: int, checksum: bytes, body: bytes, compressed: bool) -> None:
        """Append a DATA frame without building it first (one copy of the body)."""
        self.out += data_header(offset, raw_length, checksum, len(body), compressed)
        self.out += body

    def check_incoming(self) -> None:
        """Raise the agent's ERROR if one arrived; keep other early frames for `recv`."""
        try:
            self.rfile.poll(self.timeout)
        except (OSError, ssl.SSLError, ValueError):
            return  # the next write or read reports the broken connection
        while self.rfile.frame_ready() and self.rfile.buf:
            try:
                msg = read_frame(self.rfile)  # type: ignore[arg-type]
            except (ProtocolError, OSError, ssl.SSLError):
                return  # left to recv, which reports it
            if isinstance(msg, Error):
                raise msg.to_exception(f"agent {self.endpoint}")
            self.early.append(msg)

    def flush(self, limiter: RateLimiter | None = None) -> None:
        if not self.out:
            return
        self.check_incoming()
        t0 = time.perf_counter()
        if limiter is not None:
            limiter.consume(len(self.out))
        try:
            self.sock.sendall(self.out)
        except (OSError, ssl.SSLError) as exc:
            # The agent may have sent an ERROR before closing: surface it.
            raise self._peer_error() or self._fail(exc, "connection lost while sending") from None
        self.blocked += time.perf_counter() - t0
        self.bytes_sent += len(self.out)
        self.out.clear()

    def _peer_error(self) -> StandbyError | None:
        try:
            if self.early and isinstance(self.early[-1], Error):
                msg = self.early.pop()
            else:
                self.sock.settimeout(1.0)
                msg = read_frame(self.rfile)  # type: ignore[arg-type]
        except Exception:
            return None
        if isinstance(msg, Error):
            return msg.to_exception(f"agent {self.endpoint}")
        return None

    def send(self, msg: Message, limiter: RateLimiter | None = None) -> None:
        self.queue(msg.encode())
        self.flush(limiter)

    def recv(self, *expected: type[Message]) -> Message:
        try:
            msg = self.early.popleft() if self.early else read_frame(self.rfile)  # type: ignore[arg-type]
        except ProtocolError as exc:
            raise RemoteError(f"agent {self.endpoint}: {exc.message}") from None
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise self._fail(exc, "connection lost while waiting for a reply") from None
        if isinstance(msg, Error):
            raise msg.to_exception(f"agent {self.endpoint}")
        if expected and not isinstance(msg, expected):
            raise RemoteError(f"agent {self.endpoint} answered {msg.TYPE.name}, expected "
                              f"{' or '.join(t.TYPE.name for t in expected)}")
        return msg

    def reusable(self) -> bool:
        """True when the idle connection still looks usable: open, nothing unread (an
        agent that closed it, or sent anything unasked, makes it readable)."""
        if self.closed or self.out or self.early or self.rfile.buf:
            return False
        try:
            if self.sock.pending():
                return False
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.rfile.close()
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self) -> None:
        """Close hard, unblocking any thread in sendall/recv (another stream's worker:
        TLS stays in place, so nothing of what it still sends goes out in the clear)."""
        hang_up(self.sock)


# ---------------------------------------------------------------------------- hot loop


@dataclass
class StreamStats:
    bytes_read: int = 0
    bytes_examined: int = 0
    data_blocks: int = 0
    zero_blocks: int = 0
    skipped_blocks: int = 0
    resumed_blocks: int = 0
    raw_bytes: int = 0
    payload_bytes: int = 0
    compressed_blocks: int = 0


class _Compressor:
    """zstd level 1 per thread; backs off on incompressible data (tries 1 in `skip`)."""

    MIN_GAIN = 1 / 32

    def __init__(self, enabled: bool, level: int = 1) -> None:
        self.enabled = enabled
        self.cctx = zstandard.ZstdCompressor(level=level, write_checksum=False) if enabled else None
        self.misses = 0
        self.skip = 0

    def compress(self, data: bytes) -> bytes | None:
        if self.cctx is None:
            return None
        if self.skip:
            self.skip -= 1
            return None
        out = self.cctx.compress(data)
        if len(out) <= len(data) - len(data) * self.MIN_GAIN:
            self.misses = 0
            return out
        self.misses += 1
        if self.misses >= 4:
            self.skip = min(64, 1 << min(self.misses - 3, 6))
        return None


class AdaptiveCompression:
    """The "auto" policy of one stream (see the module doc): compress while that is
    faster, which it is only while the link is the bottleneck, and never on a link
    faster than the compressor. Kept by an `AgentLink` across cycles, so a slow link is
    known from the start of the next cycle."""

    WINDOW = 4 * 1024 * 1024  # raw bytes of data blocks per measurement
    BUSY = 0.3  # share of a window blocked in sending that makes compression worth a try
    GAIN = 1.05  # a probed mode must be this much faster to be kept
    FAST = 0.5  # a link carrying raw data faster than this share of the compressor's speed
    MAX_HOLD = 64

    def __init__(self, streams: int = 1) -> None:
        self.streams = streams  # the link's streams: rate x streams is the link's rate
        self.on = False
        self.rate: dict[bool, float] = {}
        self.cspeed: float | None = None  # raw bytes/s one compressor takes (measured)
        self.hold = 1  # windows to stay in the current mode before probing the other
        self.count = 0
        self.probing = False
        self.windows = 0
        self._t0 = 0.0
        self._b0 = 0.0
        self._raw = 0
        self._craw = 0
        self._ctime = 0.0

    def start(self, chan: Any) -> None:
        """Open a window (at the start of a cycle: idle time between cycles is no rate)."""
        self._t0 = time.perf_counter()
        self._b0 = chan.blocked
        self._raw = self._craw = 0
        self._ctime = 0.0

    def compressed(self, raw: int, seconds: float) -> None:
        """`raw` bytes went through the compressor in `seconds`."""
        self._craw += raw
        self._ctime += seconds

    def account(self, chan: Any, raw: int) -> None:
        self._raw += raw
        if self._raw < self.WINDOW:
            return
        now = time.perf_counter()
        wall = max(now - self._t0, 1e-9)
        cspeed = self._craw / self._ctime if self._craw >= self.WINDOW // 2 and self._ctime > 0 else None
        self.decide(self._raw / wall, (chan.blocked - self._b0) / wall, cspeed)
        self._t0, self._b0, self._raw = now, chan.blocked, 0
        self._craw, self._ctime = 0, 0.0

    def _link_too_fast(self) -> bool:
        raw_rate = self.rate.get(False)
        return bool(self.cspeed and raw_rate and raw_rate * self.streams > self.cspeed * self.FAST)

    def decide(self, rate: float, busy: float, cspeed: float | None = None) -> None:
        """One window's rate (raw bytes/s), blocked share and, when it compressed, the
        compressor's speed, measured in mode `on`."""
        self.windows += 1
        mode = self.on
        self.rate[mode] = rate  # the latest window: links and loads change
        if cspeed:
            self.cspeed = cspeed
        if self.probing:
            self.probing = False
            self.count = 0
            other = self.rate.get(not mode)
            if (other is not None and rate < other * self.GAIN) or (mode and self._link_too_fast()):
                self.on = not mode  # the probe lost: back to the other mode, probe less often
                self.hold = min(self.hold * 2, self.MAX_HOLD)
            else:
                self.hold = 2
            return
        self.count += 1
        if not mode and (busy < self.BUSY or self._link_too_fast()):
            # the link keeps up with raw data, or carries it faster than compressing
            # could feed it: compressing cannot help
            self.count = 0
            return
        if self.count >= self.hold:
            self.on = not mode
            self.probing = True
            self.count = 0


WorkItem = tuple[tuple[int, int, bool], ...]  # runs of (first block, count, is_hole)


def send_blocks(chan: Channel, work: queue.Queue[WorkItem | None], reader: BlockReader,
                size: int, baseline: HashTable, table: HashTable, staged: frozenset[int],
                stats: StreamStats, *, compress: bool | str = "auto", limiter: RateLimiter | None = None,
                progress: Callable[[int], None] | None = None, cancel: threading.Event | None = None,
                block_size: int = BLOCK_SIZE, adapt: AdaptiveCompression | None = None) -> None:
    """The hot loop of one stream: take work items (runs of blocks) off `work` until
    None, and queue/flush DATA and ZERO_RUN frames on `chan`."""
    mode = compress_mode(compress)
    comp = _Compressor(mode != "off")
    if mode == "auto":
        adapt = adapt or AdaptiveCompression()
        adapt.start(chan)
    else:
        adapt = None
    zero_full = bytes(block_size)
    zero_digest_full = zero_block_digest(block_size)
    digest = xxhash.xxh3_128_digest
    base = baseline._table
    new = table._table
    pread = reader.pread
    readinto = getattr(reader, "readinto", None)
    # readers that can: one read per run of blocks into this buffer (no per-block bytes
    # object; zero blocks are recognised in place with startswith, a memcmp)
    buf = bytearray(max(1, min(READ_BLOCKS, -(-size // block_size))) * block_size) if readinto else bytearray()
    mv = memoryview(buf)
    run_start = -1  # byte offset of the pending zero run
    run_len = 0

    def flush_run() -> None:
        nonlocal run_start, run_len
        if run_len:
            chan.queue(ZeroRun(run_start, run_len).encode())
            run_start, run_len = -1, 0

    def blocks(first: int, count: int, hole: bool) -> Iterator[tuple[int, int, int, Any, bool, bytes]]:
        """(index, offset, length, data, is_zero, digest) of each block of a run."""
        if hole:
            for i in range(first, first + count):
                offset = i * block_size
                length = block_size if offset + block_size <= size else size - offset
                yield i, offset, length, b"", True, zero_digest_full if length == block_size else \
                    zero_block_digest(length)
            return
        if readinto is None:
            for i in range(first, first + count):
                offset = i * block_size
                length = block_size if offset + block_size <= size else size - offset
                data = pread(offset, length)
                if length == block_size:
                    is_zero = data == zero_full
                    yield i, offset, length, data, is_zero, zero_digest_full if is_zero else digest(data)
                else:
                    is_zero = data == zero_full[:length]
                    yield i, offset, length, data, is_zero, zero_block_digest(length) if is_zero else digest(data)
            return
        cap = len(buf) // block_size
        i = first
        end = first + count
        while i < end:
            n = min(cap, end - i)
            start = i * block_size
            nbytes = min(n * block_size, size - start)
            readinto(start, mv[:nbytes])
            a = 0
            for k in range(i, i + n):
                length = block_size if a + block_size <= nbytes else nbytes - a
                if length == block_size:
                    if buf.startswith(zero_full, a):
                        yield k, start + a, length, b"", True, zero_digest_full
                    else:
                        data = mv[a:a + length]
                        yield k, start + a, length, data, False, digest(data)
                else:
                    data = mv[a:a + length]
                    if buf.startswith(zero_full[:length], a):
                        yield k, start + a, length, b"", True, zero_block_digest(length)
                    else:
                        yield k, start + a, length, data, False, digest(data)
                a += block_size
            i += n

    while True:
        try:
            item = work.get(timeout=0.25)
        except queue.Empty:
            if cancel is not None and cancel.is_set():
                break
            continue
        if item is None:
            break
        if cancel is not None and cancel.is_set():
            break
        examined = read = skipped = 0
        for first, count, hole in item:
            for i, offset, length, data, is_zero, d in blocks(first, count, hole):
                examined += length
                if not hole:
                    read += length
                j = i * DIGEST_SIZE
                if base[j:j + DIGEST_SIZE] == d:
                    skipped += 1
                    if run_len:
                        flush_run()
                    continue
                new[j:j + DIGEST_SIZE] = d
                if i in staged:
                    stats.resumed_blocks += 1
                    if run_len:
                        flush_run()
                    continue
                if is_zero:
                    stats.zero_blocks += 1
                    if run_len and run_start + run_len == offset:
                        run_len += length
                    else:
                        flush_run()
                        run_start, run_len = offset, length
                    continue
                if run_len:
                    flush_run()
                if adapt is None:
                    body = comp.compress(data)
                elif adapt.on:
                    t0 = time.perf_counter()
                    body = comp.compress(data)
                    adapt.compressed(length, time.perf_counter() - t0)
                else:
                    body = None
                stats.data_blocks += 1
                stats.raw_bytes += length
                if body is None:
                    chan.queue_data(offset, length, d, data, False)
                    stats.payload_bytes += length
                else:
                    stats.compressed_blocks += 1
                    chan.queue_data(offset, length, d, body, True)
                    stats.payload_bytes += len(body)
                if len(chan.out) >= FLUSH_BYTES:
                    chan.flush(limiter)
                if adapt is not None:
                    adapt.account(chan, length)
        stats.bytes_examined += examined
        stats.bytes_read += read
        stats.skipped_blocks += skipped
        if progress is not None:
            progress(examined)
    flush_run()
    chan.flush(limiter)


def work_items(source: ChangeSource, chunk_blocks: int) -> Iterator[WorkItem]:
    """Cut the source's extents into work items of at most `chunk_blocks` blocks: a long
    extent makes several items, scattered small extents share one."""
    bs = source.block_size
    chunk = max(1, chunk_blocks)
    runs: list[tuple[int, int, bool]] = []
    blocks = 0
    for ext in source.extents():
        i = ext.offset // bs
        last = (ext.end + bs - 1) // bs
        while i < last:
            n = min(chunk - blocks, last - i)
            runs.append((i, n, ext.hole))
            blocks += n
            i += n
            if blocks >= chunk:
                yield tuple(runs)
                runs, blocks = [], 0
    if runs:
        yield tuple(runs)


class _Prefetcher:
    """Asks the kernel to read a work item's data ahead of the workers (page cache)."""

    def __init__(self, source: ChangeSource) -> None:
        self.reader: BlockReader | None = None
        self.fn: Callable[[int, int], None] | None = None
        try:
            reader = source.open_reader()
        except (OSError, StandbyError):
            return
        fn = getattr(reader, "prefetch", None)
        if callable(fn):
            self.reader, self.fn = reader, fn
        else:
            reader.close()

    def __call__(self, item: WorkItem, block_size: int) -> None:
        if self.fn is None:
            return
        for first, count, hole in item:
            if not hole:
                self.fn(first * block_size, count * block_size)

    def ahead(self, items: Iterator[WorkItem], block_size: int) -> Iterator[WorkItem]:
        """`items`, each asked for PREFETCH_ITEMS items before it is yielded (the queue
        holds 2 x streams more), so the disk always has reads queued."""
        pending: deque[WorkItem] = deque()
        for item in items:
            self(item, block_size)
            pending.append(item)
            if len(pending) > PREFETCH_ITEMS:
                yield pending.popleft()
        yield from pending

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


# ---------------------------------------------------------------------------- the cycle


@dataclass
class CycleResult:
    disk_id: str
    kind: str
    point_id: str
    point_seq: int
    base_point: str | None
    cycle_id: str
    resumed: bool
    digest: str
    size: int
    streams: int
    bytes_examined: int
    bytes_read: int
    wire_bytes: int
    payload_bytes: int
    data_blocks: int
    zero_blocks: int
    skipped_blocks: int
    resumed_blocks: int
    baseline_from: str
    seconds: float
    throttled_seconds: float = 0.0
    compressed_blocks: int = 0
    reused_link: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Bytes of the disk examined per second."""
        return self.bytes_examined / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d["throughput_bytes_per_s"] = round(self.throughput, 1)
        d.update(self.extra)
        return d


@dataclass
class SenderOptions:
    streams: int = DEFAULT_STREAMS
    compress: bool | str = "auto"  # "on", "off", "auto" (True/False: on/off); see the module doc
    chunk_blocks: int = DEFAULT_CHUNK_BLOCKS
    schedule: Schedule | None = None
    timeout: float = 60.0
    state_dir: Path | None = None
    consistency: Consistency = Consistency.CRASH
    created_at: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    limiter: RateLimiter | None = None
    link_idle: float = LINK_IDLE


def _fetch_table(chan: Channel, size: int, expected_digest: bytes | None) -> HashTable:
    table = HashTable(size)
    n = table.n_blocks
    first = 0
    raw = bytearray()
    while first < n:
        count = min(MAX_HASHES_PER_FRAME, n - first)
        chan.send(HashRequest(first, count))
        msg = chan.recv(Hashes)
        assert isinstance(msg, Hashes)
        if msg.first_block != first or len(msg.digests) != count * DIGEST_SIZE:
            raise RemoteError(f"agent {chan.endpoint} answered hashes for the wrong blocks")
        raw += msg.digests
        first += count
    fetched = HashTable(size, bytes(raw))
    if expected_digest is not None and fetched.disk_digest() != expected_digest:
        raise IntegrityError(f"the replica's digest table does not hash to its point digest "
                             f"{expected_digest.hex()}: the agent's metadata is inconsistent")
    return fetched


def _read_resume(chan: Channel, count: int, n_blocks: int) -> set[int]:
    staged: set[int] = set()
    for _ in range(count):
        msg = chan.recv(Resume)
        assert isinstance(msg, Resume)
        staged.update(b for b in msg.blocks() if b < n_blocks)
    return staged


def _new_cycle_id(kind: CycleKind) -> str:
    prefix = {CycleKind.SEED: "seed", CycleKind.EXTENTS: "delta", CycleKind.HASH_SCAN: "scan"}[kind]
    return f"{prefix}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"


def probe(endpoint: Endpoint | str, context: ssl.SSLContext, disk_id: str, size: int,
          block_size: int = BLOCK_SIZE, timeout: float = 30.0) -> HelloOk:
    """Ask the agent about a disk's replica (latest point, staged cycle) and hang up."""
    check_id(disk_id, "disk id")
    if isinstance(endpoint, str):
        endpoint = Endpoint.parse(endpoint)
    chan = Channel(endpoint, context, timeout)
    try:
        chan.send(Hello(disk_id, size, block_size))
        hello = chan.recv(HelloOk)
        assert isinstance(hello, HelloOk)
        _read_resume(chan, hello.resume_frames, HashTable(size, block_size=block_size).n_blocks)
        return hello
    finally:
        chan.close()


def run_cycle(source: ChangeSource, endpoint: Endpoint | str, context: ssl.SSLContext, disk_id: str,
              options: SenderOptions | None = None,
              progress: Callable[[int], None] | None = None) -> CycleResult:
    """Replicate one cycle of `source` to the agent at `endpoint` as disk `disk_id` (a
    one-shot `AgentLink`: connects, replicates, hangs up).

    A resumed seed whose staged blocks no longer match the source (the image changed
    between the attempts) fails the agent's digest check; the agent then discards the
    staging and the seed is run once more from the start."""
    with AgentLink(endpoint, context, disk_id, options) as link:
        return link.run_cycle(source, progress)


class AgentLink:
    """A disk's replication streams to one agent, kept open between cycles.

    Not thread-safe: one cycle at a time. `close()` (or the context manager) hangs up."""

    def __init__(self, endpoint: Endpoint | str, context: ssl.SSLContext, disk_id: str,
                 options: SenderOptions | None = None) -> None:
        self.opts = options or SenderOptions()
        check_id(disk_id, "disk id")
        if not 1 <= self.opts.streams <= 64:
            raise BadInput(f"streams must be 1..64, not {self.opts.streams}")
        compress_mode(self.opts.compress)
        self.endpoint = Endpoint.parse(endpoint) if isinstance(endpoint, str) else endpoint
        self.context = context
        self.disk_id = disk_id
        self.channels: list[Channel] = []  # by stream index; empty while disconnected
        self.size: int | None = None
        self.latest: str | None = None  # the replica's latest point, as this link knows it
        self.latest_digest: bytes | None = None
        self.resume_cycle: str | None = None
        self.resume_base: str | None = None
        self.state: SenderState | None = None
        self.adapt = [AdaptiveCompression(self.opts.streams) for _ in range(self.opts.streams)]
        self.tls_session: ssl.SSLSession | None = None
        self.idle_since = 0.0
        self.cycles = 0  # committed over this link
        self._saving: threading.Thread | None = None  # the last point's state being saved

    def __enter__(self) -> AgentLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for c in self.channels:
            c.close()
        self.channels = []
        self._saved()

    def _saved(self) -> None:
        """Wait for the state of the last point to be on file."""
        t, self._saving = self._saving, None
        if t is not None:
            t.join()

    def _reusable(self) -> bool:
        return (len(self.channels) == self.opts.streams and time.monotonic() - self.idle_since <= self.opts.link_idle
                and all(c.reusable() for c in self.channels))

    def run_cycle(self, source: ChangeSource, progress: Callable[[int], None] | None = None) -> CycleResult:
        """Replicate one cycle of `source` (see the module doc)."""
        resumed = [False]
        try:
            return self._attempt(source, progress, resumed, fresh=False)
        except IntegrityError:
            if not resumed[0]:
                raise
            return self._attempt(source, progress, resumed, fresh=True)

    def _attempt(self, source: ChangeSource, progress: Callable[[int], None] | None, resumed: list[bool],
                 fresh: bool) -> CycleResult:
        reused = self._reusable()
        if not reused:
            self.close()
        try:
            return self._cycle(source, progress, resumed, fresh, reused)
        except BaseException as exc:
            self.close()
            if not (reused and isinstance(exc, (RemoteError, Conflict)) and source.kind is not CycleKind.SEED):
                raise
        # A reused connection failed (the agent restarted or dropped it, or the replica
        # moved): once more over fresh connections; a delta or a scan is idempotent.
        try:
            return self._cycle(source, progress, resumed, fresh, False)
        except BaseException:
            self.close()
            raise

    def _connect(self, index: int, size: int, block_size: int) -> Channel:
        chan = Channel(self.endpoint, self.context, self.opts.timeout, self.tls_session)
        try:
            chan.send(Hello(self.disk_id, size, block_size))
            hello = chan.recv(HelloOk)
            assert isinstance(hello, HelloOk)
            _read_resume(chan, hello.resume_frames, HashTable(size, block_size=block_size).n_blocks)
            if hello.replica_size and hello.replica_size != size:
                raise Conflict(f"the replica of disk {self.disk_id} is {hello.replica_size} bytes, the source "
                               f"{size}: resizing a protected disk is not supported")
            chan.hello = hello
            if index == 0:
                self.tls_session = chan.sock.session
        except BaseException:
            chan.close()
            raise
        return chan

    def _cycle(self, source: ChangeSource, progress: Callable[[int], None] | None, resumed: list[bool],
               fresh: bool, reused: bool) -> CycleResult:
        opts = self.opts
        disk_id, endpoint = self.disk_id, self.endpoint
        size, block_size = source.size, source.block_size
        nstreams = opts.streams
        limiter = opts.limiter or RateLimiter(opts.schedule)
        started = time.perf_counter()
        self._saved()
        if self.state is None or self.state.size != size:
            self.state = SenderState.load(opts.state_dir, disk_id, size)
        state = self.state
        n_blocks = HashTable(size, block_size=block_size).n_blocks
        kind = source.kind
        if reused and self.size != size:
            raise Conflict(f"the replica of disk {disk_id} is {self.size} bytes, the source "
                           f"{size}: resizing a protected disk is not supported")
        channels: list[Channel | None] = list(self.channels) if reused else [None] * nstreams
        if not reused:
            self.close()
            chan0 = self._connect(0, size, block_size)
            channels[0] = chan0
            self.channels = [chan0]
            hello = chan0.hello
            assert hello is not None
            if self.cycles and kind is CycleKind.EXTENTS and hello.latest_point != self.latest:
                raise Conflict(f"the replica of disk {disk_id} is at point {hello.latest_point}, not at "
                               f"{self.latest} which these changed extents follow: resynchronize "
                               "with a hash scan")
            self.size = size
            self.latest, self.latest_digest = hello.latest_point, hello.latest_digest
            self.resume_cycle, self.resume_base = hello.resume_cycle, hello.resume_base
        chan0 = channels[0]
        assert chan0 is not None
        sent_before = [c.bytes_sent if c is not None else 0 for c in channels]
        latest, latest_digest = self.latest, self.latest_digest
        if kind is CycleKind.SEED and latest is not None:
            raise Conflict(f"disk {disk_id} already has recovery point {latest} on the agent; "
                           "a seed is for an empty replica: use --hash-scan or --changed-extents")
        if kind is CycleKind.EXTENTS and latest is None:
            raise Conflict(f"disk {disk_id} has no recovery point on the agent yet: seed it first "
                           "(--seed, or an offline seed), changed extents need a base")

        # Baseline: the replica's digests at its latest point.
        if latest is None:
            baseline, baseline_from = HashTable(size, block_size=block_size), "empty replica"
        elif state.table is not None and latest_digest is not None and state.table.disk_digest() == latest_digest:
            baseline, baseline_from = state.table, "sender state"
        else:
            baseline, baseline_from = _fetch_table(chan0, size, latest_digest), "fetched from agent"

        # Cycle id: resume an unfinished seed, else a fresh one.
        cycle_id = None
        if kind is CycleKind.SEED and not fresh:
            if self.resume_cycle and self.resume_base is None:
                cycle_id = self.resume_cycle
            elif state.pending_seed:
                cycle_id = state.pending_seed
        if cycle_id is None:
            cycle_id = _new_cycle_id(kind)
        if kind is CycleKind.SEED and state.pending_seed != cycle_id:
            state.pending_seed = cycle_id
            state.save(opts.state_dir)

        # Stream 0 opens the cycle. Only a seed waits for the answer (the staged blocks it
        # may skip); other cycles send their data at once and read ACK BEGUN later.
        chan0.send(CycleBegin(cycle_id, latest, 0, nstreams, kind))
        begun_pending = [True] * nstreams
        staged: set[int] = set()
        if kind is CycleKind.SEED:
            staged = self._read_begun(chan0, n_blocks)
            begun_pending[0] = False
        resumed[0] = bool(staged)
        frozen_staged = frozenset(staged)

        table = baseline.copy()
        stats = [StreamStats() for _ in range(nstreams)]
        errors: list[BaseException] = []
        cancel = threading.Event()
        work: queue.Queue[WorkItem | None] = queue.Queue(maxsize=2 * nstreams)
        lock = threading.Lock()

        def worker(idx: int) -> None:
            reader = None
            try:
                chan = channels[idx]
                if chan is None:
                    # streams 1..n-1 connect in parallel, resuming stream 0's TLS session
                    chan = self._connect(idx, size, block_size)
                    with lock:
                        channels[idx] = chan
                    if cancel.is_set():
                        chan.abort()
                        return
                if idx:
                    chan.send(CycleBegin(cycle_id, latest, idx, nstreams, kind))
                reader = source.open_reader()
                send_blocks(chan, work, reader, size, baseline, table, frozen_staged, stats[idx],
                            compress=opts.compress, limiter=limiter, progress=progress, cancel=cancel,
                            block_size=block_size, adapt=self.adapt[idx])
                if cancel.is_set():
                    return
                st = stats[idx]
                chan.send(StreamEnd(st.data_blocks, st.zero_blocks))
                if begun_pending[idx]:
                    self._read_begun(chan, n_blocks)
                a = chan.recv(Ack)
                assert isinstance(a, Ack)
                if a.kind is not AckKind.STREAM or a.value != st.data_blocks + st.zero_blocks:
                    raise RemoteError(f"agent {endpoint} acknowledged {a.value} blocks on stream {idx}, "
                                      f"{st.data_blocks + st.zero_blocks} were sent")
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
                cancel.set()
                with lock:
                    live = [c for c in channels if c is not None]
                for c in live:
                    c.abort()
                while True:  # unblock the feeder
                    try:
                        work.get_nowait()
                    except queue.Empty:
                        break
            finally:
                if reader is not None:
                    reader.close()

        threads = [threading.Thread(target=worker, args=(i,), name=f"sender-{disk_id}-{i}", daemon=True)
                   for i in range(nstreams)]
        for t in threads:
            t.start()
        prefetch = _Prefetcher(source)
        try:
            for item in prefetch.ahead(work_items(source, opts.chunk_blocks), block_size):
                while not cancel.is_set():
                    try:
                        work.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if cancel.is_set():
                    break
        finally:
            prefetch.close()
            for _ in threads:
                while True:
                    try:
                        work.put(None, timeout=0.2)
                        break
                    except queue.Full:
                        if cancel.is_set() or not any(t.is_alive() for t in threads):
                            break
            for t in threads:
                t.join()
            self.channels = [c for c in channels if c is not None]
        if errors:
            raise _first_meaningful(errors)

        total = StreamStats()
        for st in stats:
            for k in total.__dict__:
                setattr(total, k, getattr(total, k) + getattr(st, k))
        disk_digest = table.disk_digest()
        created_at = opts.created_at if opts.created_at is not None else time.time()
        meta = dict(opts.meta)
        meta.setdefault("cycle_kind", kind.name.lower())
        chan0.send(CycleEnd(disk_digest, total.data_blocks, total.zero_blocks, opts.consistency, created_at, meta))
        ack = chan0.recv(Ack)
        assert isinstance(ack, Ack)
        if ack.kind is not AckKind.POINT or not ack.text:
            raise RemoteError(f"agent {endpoint} answered CYCLE_END with ACK {ack.kind.name}")
        self.latest, self.latest_digest = ack.text, disk_digest
        self.resume_cycle = self.resume_base = None
        self.cycles += 1
        self.idle_since = time.monotonic()
        state.point_id, state.digest, state.table, state.pending_seed = ack.text, disk_digest.hex(), table, None
        # the state file is a cache the next process uses: written off the cycle's path,
        # waited for by the next cycle and by close() (run_cycle returns after it)
        def save() -> None:
            try:
                state.save(opts.state_dir)
            except OSError:
                pass  # a cache: the next cycle fetches the table from the agent instead

        self._saving = threading.Thread(target=save, daemon=True, name=f"sender-state-{disk_id}")
        self._saving.start()
        elapsed = time.perf_counter() - started
        chans = [c for c in channels if c is not None]
        return CycleResult(
            disk_id=disk_id, kind=kind.name.lower(), point_id=ack.text, point_seq=ack.value, base_point=latest,
            cycle_id=cycle_id, resumed=bool(staged), digest=disk_digest.hex(), size=size, streams=len(chans),
            bytes_examined=total.bytes_examined, bytes_read=total.bytes_read,
            wire_bytes=sum(c.bytes_sent - b for c, b in zip(chans, sent_before)),
            payload_bytes=total.payload_bytes, data_blocks=total.data_blocks, zero_blocks=total.zero_blocks,
            skipped_blocks=total.skipped_blocks, resumed_blocks=total.resumed_blocks, baseline_from=baseline_from,
            seconds=elapsed, throttled_seconds=limiter.waited, compressed_blocks=total.compressed_blocks,
            reused_link=reused)

    def _read_begun(self, chan: Channel, n_blocks: int) -> set[int]:
        ack = chan.recv(Ack)
        assert isinstance(ack, Ack)
        if ack.kind is not AckKind.BEGUN:
            raise RemoteError(f"agent {self.endpoint} answered CYCLE_BEGIN with ACK {ack.kind.name}")
        return _read_resume(chan, ack.count, n_blocks)


def _first_meaningful(errors: list[BaseException]) -> BaseException:
    """The root cause among the streams' errors: an agent's ERROR beats a lost link."""
    for exc in errors:
        if isinstance(exc, StandbyError) and not isinstance(exc, RemoteError):
            return exc
    for exc in errors:
        if isinstance(exc, RemoteError) and "connection lost" not in exc.message:
            return exc
    exc = errors[0]
    if isinstance(exc, StandbyError):
        return exc
    if isinstance(exc, OSError):
        return RemoteError(f"replication stream failed: {exc.strerror or exc}")
    return exc


# ---------------------------------------------------------------------------- benchmark


class _NullChannel:
    """A Channel that discards what it is given (the hot loop measured without TLS)."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.bytes_sent = 0
        self.blocked = 0.0

    def queue(self, frame: bytes) -> None:
        self.out += frame

    def queue_data(self, offset: int, raw_length: int, checksum: bytes, body: bytes, compressed: bool) -> None:
        self.out += data_header(offset, raw_length, checksum, len(body), compressed)
        self.out += body

    def flush(self, limiter: RateLimiter | None = None) -> None:
        self.bytes_sent += len(self.out)
        self.out.clear()


def bench_hot_loop(source: ChangeSource, threads: int = 2, compress: bool | str = True,
                   chunk_blocks: int = DEFAULT_CHUNK_BLOCKS) -> dict[str, float]:
    """Run the read-zero-hash-compress-frame loop over `source` against an empty replica
    with `threads` workers and no network; return the figures (bytes/s of the disk)."""
    baseline = HashTable(source.size, block_size=source.block_size)
    table = baseline.copy()
    work: queue.Queue[WorkItem | None] = queue.Queue(maxsize=2 * threads)
    stats = [StreamStats() for _ in range(threads)]
    chans = [_NullChannel() for _ in range(threads)]

    def worker(i: int) -> None:
        reader = source.open_reader()
        try:
            send_blocks(chans[i], work, reader, source.size, baseline, table, frozenset(), stats[i],  # type: ignore[arg-type]
                        compress=compress, block_size=source.block_size)
        finally:
            reader.close()

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    prefetch = _Prefetcher(source)
    for item in prefetch.ahead(work_items(source, chunk_blocks), source.block_size):
        work.put(item)
    prefetch.close()
    for _ in ts:
        work.put(None)
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "disk_bytes_per_s": source.size / elapsed,
            "bytes_read": sum(s.bytes_read for s in stats), "data_blocks": sum(s.data_blocks for s in stats),
            "frame_bytes": sum(c.bytes_sent for c in chans)}
