"""The sender: read, hash, compress and ship one replication cycle of one disk.

This module is the data plane's hot path; `run_cycle` can be benchmarked alone.

One cycle
---------
1. Stream 0 connects (mutual TLS), says HELLO, learns the replica's latest point (id and
   disk digest) and any staged, unfinished cycle.
2. Baseline: the replica's per-block digests at its latest point. The sender's state
   file (`SenderState`, saved after every acknowledged point) is used when its digest
   equals the replica's; otherwise the table is fetched (HASH_REQUEST, 16 bytes per
   64 KiB block, 1/4096 of the disk); a replica without points is all zeros.
3. CYCLE_BEGIN on stream 0 (the agent answers with the blocks already staged when a
   seed resumes), then streams 1..n-1 join the cycle.
4. The change source's extents are cut into chunks of `chunk_blocks` blocks and fed to
   a bounded queue; one worker thread per stream takes chunks and, per block: reads it
   (its own descriptor, pread), detects zeros, digests it (xxh3-128), skips it when the
   digest equals the baseline (or when the agent already staged it for a resumed seed),
   coalesces zero blocks into ZERO_RUN frames, compresses the others with its own zstd
   compressor (level 1; sent raw when the block does not shrink, and after a run of
   incompressible blocks compression is tried only now and then), and writes DATA
   frames into its own output buffer, flushed to its TLS connection at 256 KiB through
   the shared bandwidth limiter. The new disk state's digest table is the baseline
   with the examined blocks' digests replaced, so the disk digest needs no full read.
5. Each stream ends with STREAM_END and waits for its ACK (all its frames applied);
   then stream 0 sends CYCLE_END with the disk digest, and the agent commits the point
   only if its replica's digest equals it. The ACK names the new point; the sender
   saves its state (digest table and point id).

Memory bound
------------
Independent of the disk size, the data in flight on the sender is at most
    streams x (queue depth 2 chunks of `chunk_blocks` descriptors (no data)
               + 1 raw block + 1 compressed block + 256 KiB output buffer)
i.e. with the defaults (4 streams, 64 KiB blocks) about 4 x 400 KiB = 1.6 MiB, plus
the kernel's socket buffers; TCP's flow control is the back-pressure: a slow agent
blocks `sendall`, which stops the workers, which stops the reader. The digest tables
(baseline and new) are 16 bytes per 64 KiB block each (2 x 1/4096 of the disk).

Failure: any stream failing (network, agent ERROR) fails the cycle; nothing durable on
the agent is lost (staged blocks of a seed stay staged, points are untouched), and the
next run resumes (seed) or simply repeats the delta.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import xxhash
import zstandard

from standby.domain.bandwidth import Schedule, TokenBucket
from standby.errors import Conflict, IntegrityError, RemoteError, StandbyError
from standby.replication.changes import BlockReader, ChangeSource
from standby.replication.digest import BLOCK_SIZE, DIGEST_SIZE, HashTable, zero_block_digest
from standby.replication.protocol import (
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
    encode_data,
    read_frame,
)
from standby.replication.tls import describe_tls_error

FLUSH_BYTES = 256 * 1024
DEFAULT_STREAMS = 4
DEFAULT_CHUNK_BLOCKS = 16


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
class SenderState:
    """What the sender remembers of a disk between cycles: the digest table of the
    replica's latest acknowledged point, and the id of a seed cycle in progress.

    Files in `state_dir`: `<disk>.json` (point id, digest, size, pending seed) and
    `<disk>.hashes` (the digest table, 16 bytes a block), both written atomically."""

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
            self.table.save(table_path)
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


class Channel:
    """One TLS connection to an agent: framed writes (buffered) and reads."""

    def __init__(self, endpoint: Endpoint, context: ssl.SSLContext, timeout: float,
                 session: ssl.SSLSession | None = None) -> None:
        self.endpoint = endpoint
        try:
            raw = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        except OSError as exc:
            raise RemoteError(f"cannot connect to agent {endpoint}: {exc.strerror or exc}") from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # `session`: resume stream 0's TLS session (no second certificate exchange)
            self.sock = context.wrap_socket(raw, server_hostname=endpoint.host, session=session)
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            raise RemoteError(f"TLS handshake with agent {endpoint} failed: {describe_tls_error(exc)}") from None
        self.sock.settimeout(timeout)
        self.rfile: BinaryIO = self.sock.makefile("rb", buffering=64 * 1024)
        self.out = bytearray()
        self.bytes_sent = 0
        self.closed = False

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

    def flush(self, limiter: RateLimiter | None = None) -> None:
        if not self.out:
            return
        if limiter is not None:
            limiter.consume(len(self.out))
        try:
            self.sock.sendall(self.out)
        except (OSError, ssl.SSLError) as exc:
            # The agent may have sent an ERROR before closing: surface it.
            raise self._peer_error() or self._fail(exc, "connection lost while sending") from None
        self.bytes_sent += len(self.out)
        self.out.clear()

    def _peer_error(self) -> StandbyError | None:
        try:
            self.sock.settimeout(1.0)
            msg = read_frame(self.rfile)
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
            msg = read_frame(self.rfile)
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
        """Close hard, unblocking any thread in sendall/recv."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


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


def send_blocks(chan: Channel, work: queue.Queue[tuple[int, int, bool] | None], reader: BlockReader,
                size: int, baseline: HashTable, table: HashTable, staged: frozenset[int],
                stats: StreamStats, *, compress: bool = True, limiter: RateLimiter | None = None,
                progress: Callable[[int], None] | None = None, cancel: threading.Event | None = None,
                block_size: int = BLOCK_SIZE) -> None:
    """The hot loop of one stream: take chunks (first block, count, is_hole) off `work`
    until None, and queue/flush DATA and ZERO_RUN frames on `chan`."""
    comp = _Compressor(compress)
    zero_full = bytes(block_size)
    zero_digest_full = zero_block_digest(block_size)
    digest = xxhash.xxh3_128_digest
    run_start = -1  # byte offset of the pending zero run
    run_len = 0

    def flush_run() -> None:
        nonlocal run_start, run_len
        if run_len:
            chan.queue(ZeroRun(run_start, run_len).encode())
            run_start, run_len = -1, 0

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
        first, count, hole = item
        examined = 0
        for i in range(first, first + count):
            offset = i * block_size
            length = block_size if offset + block_size <= size else size - offset
            examined += length
            if hole:
                is_zero = True
                d = zero_digest_full if length == block_size else zero_block_digest(length)
                data = b""
            else:
                data = reader.pread(offset, length)
                stats.bytes_read += length
                if length == block_size:
                    is_zero = data == zero_full
                    d = zero_digest_full if is_zero else digest(data)
                else:
                    is_zero = data == zero_full[:length]
                    d = zero_block_digest(length) if is_zero else digest(data)
            if d == baseline.get(i):
                stats.skipped_blocks += 1
                flush_run()
                continue
            table.set(i, d)
            if i in staged:
                stats.resumed_blocks += 1
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
            flush_run()
            body = comp.compress(data)
            stats.data_blocks += 1
            stats.raw_bytes += length
            if body is None:
                chan.queue(encode_data(offset, length, d, data, False))
                stats.payload_bytes += length
            else:
                stats.compressed_blocks += 1
                chan.queue(encode_data(offset, length, d, body, True))
                stats.payload_bytes += len(body)
            if len(chan.out) >= FLUSH_BYTES:
                chan.flush(limiter)
        stats.bytes_examined += examined
        if progress is not None:
            progress(examined)
    flush_run()
    chan.flush(limiter)


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
    compress: bool = True
    chunk_blocks: int = DEFAULT_CHUNK_BLOCKS
    schedule: Schedule | None = None
    timeout: float = 60.0
    state_dir: Path | None = None
    consistency: Consistency = Consistency.CRASH
    created_at: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    limiter: RateLimiter | None = None


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
    """Replicate one cycle of `source` to the agent at `endpoint` as disk `disk_id`.

    A resumed seed whose staged blocks no longer match the source (the image changed
    between the attempts) fails the agent's digest check; the agent then discards the
    staging and the seed is run once more from the start."""
    resumed = [False]
    try:
        return _run_cycle(source, endpoint, context, disk_id, options, progress, resumed, fresh=False)
    except IntegrityError:
        if not resumed[0]:
            raise
        return _run_cycle(source, endpoint, context, disk_id, options, progress, resumed, fresh=True)


def _run_cycle(source: ChangeSource, endpoint: Endpoint | str, context: ssl.SSLContext, disk_id: str,
               options: SenderOptions | None, progress: Callable[[int], None] | None, resumed: list[bool],
               fresh: bool) -> CycleResult:
    opts = options or SenderOptions()
    check_id(disk_id, "disk id")
    if isinstance(endpoint, str):
        endpoint = Endpoint.parse(endpoint)
    if not 1 <= opts.streams <= 64:
        from standby.errors import BadInput

        raise BadInput(f"streams must be 1..64, not {opts.streams}")
    size = source.size
    limiter = opts.limiter or RateLimiter(opts.schedule)
    started = time.perf_counter()
    state = SenderState.load(opts.state_dir, disk_id, size)
    channels: list[Channel] = []
    try:
        chan0 = Channel(endpoint, context, opts.timeout)
        channels.append(chan0)
        chan0.send(Hello(disk_id, size, source.block_size))
        hello = chan0.recv(HelloOk)
        assert isinstance(hello, HelloOk)
        n_blocks = HashTable(size).n_blocks
        hello_staged = _read_resume(chan0, hello.resume_frames, n_blocks)
        if hello.replica_size and hello.replica_size != size:
            raise Conflict(f"the replica of disk {disk_id} is {hello.replica_size} bytes, the source "
                           f"{size}: resizing a protected disk is not supported")
        latest, latest_digest = hello.latest_point, hello.latest_digest
        kind = source.kind
        if kind is CycleKind.SEED and latest is not None:
            raise Conflict(f"disk {disk_id} already has recovery point {latest} on the agent; "
                           "a seed is for an empty replica: use --hash-scan or --changed-extents")
        if kind is CycleKind.EXTENTS and latest is None:
            raise Conflict(f"disk {disk_id} has no recovery point on the agent yet: seed it first "
                           "(--seed, or an offline seed), changed extents need a base")

        # Baseline: the replica's digests at its latest point.
        if latest is None:
            baseline, baseline_from = HashTable(size), "empty replica"
        elif state.table is not None and latest_digest is not None and state.table.disk_digest() == latest_digest:
            baseline, baseline_from = state.table, "sender state"
        else:
            baseline, baseline_from = _fetch_table(chan0, size, latest_digest), "fetched from agent"

        # Cycle id: resume an unfinished seed, else a fresh one.
        cycle_id = None
        if kind is CycleKind.SEED and not fresh:
            if hello.resume_cycle and hello.resume_base is None:
                cycle_id = hello.resume_cycle
            elif state.pending_seed:
                cycle_id = state.pending_seed
        if cycle_id is None:
            cycle_id = _new_cycle_id(kind)
        if kind is CycleKind.SEED and state.pending_seed != cycle_id:
            state.pending_seed = cycle_id
            state.save(opts.state_dir)

        chan0.send(CycleBegin(cycle_id, latest, 0, opts.streams, kind))
        ack = chan0.recv(Ack)
        assert isinstance(ack, Ack)
        if ack.kind is not AckKind.BEGUN:
            raise RemoteError(f"agent {endpoint} answered CYCLE_BEGIN with ACK {ack.kind.name}")
        staged = _read_resume(chan0, ack.count, n_blocks)
        if kind is not CycleKind.SEED:
            staged = set()  # only a seed resumes: a delta's staged blocks may be stale
        resumed[0] = bool(staged)
        del hello_staged

        # Streams 1..n-1 join the cycle, connecting in parallel and resuming stream 0's
        # TLS session.
        tls_session = chan0.sock.session if chan0.sock.session is not None else None
        joined: list[Channel | None] = [None] * opts.streams
        join_errors: list[BaseException] = []

        def join(index: int) -> None:
            try:
                chan = Channel(endpoint, context, opts.timeout, tls_session)
                joined[index] = chan
                chan.send(Hello(disk_id, size, source.block_size))
                h = chan.recv(HelloOk)
                assert isinstance(h, HelloOk)
                _read_resume(chan, h.resume_frames, n_blocks)
                chan.send(CycleBegin(cycle_id, latest, index, opts.streams, kind))
                a = chan.recv(Ack)
                assert isinstance(a, Ack)
                _read_resume(chan, a.count, n_blocks)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                join_errors.append(exc)

        joiners = [threading.Thread(target=join, args=(i,), daemon=True) for i in range(1, opts.streams)]
        for t in joiners:
            t.start()
        for t in joiners:
            t.join()
        channels.extend(c for c in joined[1:] if c is not None)
        if join_errors:
            raise _first_meaningful(join_errors)

        table = baseline.copy()
        stats = [StreamStats() for _ in channels]
        errors: list[BaseException] = []
        cancel = threading.Event()
        work: queue.Queue[tuple[int, int, bool] | None] = queue.Queue(maxsize=2 * len(channels))
        frozen_staged = frozenset(staged)
        block_size = source.block_size

        def worker(idx: int) -> None:
            chan = channels[idx]
            reader = source.open_reader()
            try:
                send_blocks(chan, work, reader, size, baseline, table, frozen_staged, stats[idx],
                            compress=opts.compress, limiter=limiter, progress=progress, cancel=cancel,
                            block_size=block_size)
                if cancel.is_set():
                    return
                st = stats[idx]
                chan.send(StreamEnd(st.data_blocks, st.zero_blocks))
                a = chan.recv(Ack)
                assert isinstance(a, Ack)
                if a.kind is not AckKind.STREAM or a.value != st.data_blocks + st.zero_blocks:
                    raise RemoteError(f"agent {endpoint} acknowledged {a.value} blocks on stream {idx}, "
                                      f"{st.data_blocks + st.zero_blocks} were sent")
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
                cancel.set()
                for c in channels:
                    c.abort()
                while True:  # unblock the feeder
                    try:
                        work.get_nowait()
                    except queue.Empty:
                        break
            finally:
                reader.close()

        threads = [threading.Thread(target=worker, args=(i,), name=f"sender-{disk_id}-{i}", daemon=True)
                   for i in range(len(channels))]
        for t in threads:
            t.start()
        chunk = max(1, opts.chunk_blocks)
        try:
            for ext in source.extents():
                first = ext.offset // block_size
                last = (ext.end + block_size - 1) // block_size
                i = first
                while i < last:
                    n = min(chunk, last - i)
                    while not cancel.is_set():
                        try:
                            work.put((i, n, ext.hole), timeout=0.2)
                            break
                        except queue.Full:
                            continue
                    if cancel.is_set():
                        break
                    i += n
                if cancel.is_set():
                    break
        finally:
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
        state.point_id, state.digest, state.table, state.pending_seed = ack.text, disk_digest.hex(), table, None
        state.save(opts.state_dir)
        elapsed = time.perf_counter() - started
        return CycleResult(
            disk_id=disk_id, kind=kind.name.lower(), point_id=ack.text, point_seq=ack.value, base_point=latest,
            cycle_id=cycle_id, resumed=bool(staged), digest=disk_digest.hex(), size=size, streams=len(channels),
            bytes_examined=total.bytes_examined, bytes_read=total.bytes_read,
            wire_bytes=sum(c.bytes_sent for c in channels), payload_bytes=total.payload_bytes,
            data_blocks=total.data_blocks, zero_blocks=total.zero_blocks, skipped_blocks=total.skipped_blocks,
            resumed_blocks=total.resumed_blocks, baseline_from=baseline_from, seconds=elapsed,
            throttled_seconds=limiter.waited)
    finally:
        for c in channels:
            c.close()


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

    def queue(self, frame: bytes) -> None:
        self.out += frame

    def flush(self, limiter: RateLimiter | None = None) -> None:
        self.bytes_sent += len(self.out)
        self.out.clear()


def bench_hot_loop(source: ChangeSource, threads: int = 2, compress: bool = True,
                   chunk_blocks: int = DEFAULT_CHUNK_BLOCKS) -> dict[str, float]:
    """Run the read-zero-hash-compress-frame loop over `source` against an empty replica
    with `threads` workers and no network; return the figures (bytes/s of the disk)."""
    baseline = HashTable(source.size, block_size=source.block_size)
    table = baseline.copy()
    work: queue.Queue[tuple[int, int, bool] | None] = queue.Queue(maxsize=2 * threads)
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
    bs = source.block_size
    for ext in source.extents():
        first, last = ext.offset // bs, (ext.end + bs - 1) // bs
        for i in range(first, last, chunk_blocks):
            work.put((i, min(chunk_blocks, last - i), ext.hole))
    for _ in ts:
        work.put(None)
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "disk_bytes_per_s": source.size / elapsed,
            "bytes_read": sum(s.bytes_read for s in stats), "data_blocks": sum(s.data_blocks for s in stats),
            "frame_bytes": sum(c.bytes_sent for c in chans)}
