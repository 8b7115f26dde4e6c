"""The receiver: the agent's TLS server that applies replication cycles to a ReplicaStore.

One thread per connection. A connection first completes the mutual TLS handshake (a
refused peer is logged in one line with its address and the reason), then follows the
protocol's order (`protocol.ReceiverSequence`). The streams of one cycle share one
`CycleWriter` through a `Session` keyed by disk:

- stream 0's CYCLE_BEGIN opens the session (`begin_cycle`; an unfinished staging with
  the same cycle id is resumed and its staged blocks are reported back), streams
  1..n-1 join it;
- DATA: bounds checked, decompressed into at most the block's length, its xxh3-128
  checked, and only then written; ZERO_RUN: bounds checked, staged as zeros;
- STREAM_END: the stream's counts must match what was applied; ACK STREAM;
- CYCLE_END (stream 0, after every stream ended): `commit` with the sender's disk
  digest; ACK POINT with the new point id, or ERROR (the store discards a cycle whose
  digest does not match; the replica stays at its previous point).

Any fault on any stream (a malformed frame, a bad checksum, a lost connection, a full
disk) fails the session: the other streams get an ERROR at their next frame (with the
fault's code: a full disk is OUT_OF_SPACE on every stream), the staged blocks are
checkpointed when the last stream leaves (durable, so a seed resumes from them) and
nothing committed changes.

After sending an ERROR the receiver does not close at once: closing a TCP socket with
unread data sends a reset, and a sender whose TLS write fails on that reset can no longer
read the ERROR (it would report a lost connection instead of the cause). It half-closes
(FIN after the ERROR) and reads and discards what the sender still sends until the
sender closes, or for at most `error_linger` seconds.

The receiver holds per connection at most one frame (<= 1 MiB + 16 bytes) and its
decompressed block.

Dead peers: accepted sockets use TCP keepalive with short probes (`keepalive`: idle,
interval, count), so a stream whose sender vanished without a FIN or a reset (a cut link,
a rebooted primary) fails in well under a minute instead of after `io_timeout`. And a new
stream 0 from the same sender certificate (CYCLE_BEGIN of the same cycle, a seed
resuming, or of another one, a delta retried under a new id) takes over a session whose
streams have been quiet for `takeover_quiet` seconds: the stale streams' sockets are
hung up, they leave the session (its staged blocks are checkpointed, as after any
failure), and the new cycle opens (a seed resumes from the staged blocks). Two live
sessions never write one disk: the takeover waits until every stale stream has left
before the store reopens the cycle. Streams 1..n-1 of a new cycle that find another
cycle's session wait for it to go (up to `join_timeout`) instead of being refused: after
a cut link, the agent may see the new cycle before the old streams' end.

Sockets are hung up from other threads with `tls.hang_up`, never `SSLSocket.shutdown`
(which drops TLS under a thread still reading: it read raw records as frames). A stream
that ends inside a frame is a lost connection (`ConnectionLost`), not a protocol error:
an integrity error always means that bytes were corrupted.

Growing disks: a HELLO announcing a larger size than the replica's is accepted (the
replica grows with the next point, see `DiskReplica.resize`); a smaller one is refused.
HELLO_OK then reports the new size and, as the latest digest, that of the latest point
read at the new size (grown blocks are zeros), which the HASHES tables hash to.

Logs: one line per committed or failed cycle, one per refused connection.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash
import zstandard

from standby.errors import Conflict, IntegrityError, NotFound, StandbyError
from standby.replication.digest import BLOCK_SIZE, HashTable, block_length
from standby.replication.protocol import (
    SUPPORTED_VERSIONS,
    Ack,
    AckKind,
    ConnectionClosed,
    ConnectionLost,
    CycleBegin,
    CycleEnd,
    Data,
    Error,
    ErrorCode,
    Hashes,
    HashRequest,
    Hello,
    HelloOk,
    Message,
    ProtocolError,
    ReceiverSequence,
    StreamEnd,
    ZeroRun,
    error_code_for,
    read_frame,
    resume_frames,
    valid_id,
)
from standby.replication.store import CycleWriter, DiskReplica, ReplicaStore
from standby.replication.tls import describe_tls_error, hang_up, peer_name

log = logging.getLogger("standby.agent")

MAX_DISK_SIZE = 64 << 40  # 64 TiB: a replica's block table is held in memory (16 bytes a 64 KiB block)


class SessionFailed(StandbyError):
    """Another stream of the same cycle failed. `code` is the wire code of that stream's
    fault, so every stream tells the sender the same cause (a full disk stays OUT_OF_SPACE
    whichever stream the sender reads first)."""

    exit_code = 5

    def __init__(self, message: str, code: ErrorCode = ErrorCode.REMOTE) -> None:
        super().__init__(message)
        self.code = code


def _wire_code(exc: BaseException | None) -> ErrorCode:
    """The wire code of the fault that failed a stream; a lost connection is REMOTE."""
    if exc is None:
        return ErrorCode.REMOTE
    if isinstance(exc, SessionFailed):
        return exc.code
    if isinstance(exc, zstandard.ZstdError):
        return ErrorCode.PROTOCOL
    if isinstance(exc, (ConnectionClosed, ConnectionLost)):
        return ErrorCode.REMOTE
    code = error_code_for(exc)
    return ErrorCode.REMOTE if code is ErrorCode.INTERNAL else code


@dataclass
class Session:
    """The shared state of one cycle's streams."""

    disk: DiskReplica
    writer: CycleWriter
    cycle_id: str
    base_point: str | None
    stream_count: int
    identity: str = ""  # sha256 of the sender's certificate
    started: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)  # a frame on any stream
    taken_over: bool = False
    members: dict[int, socket.socket] = field(default_factory=dict)
    ended: dict[int, tuple[int, int]] = field(default_factory=dict)
    failed: str | None = None
    failed_code: ErrorCode = ErrorCode.REMOTE
    finished: bool = False
    bytes_applied: int = 0
    wire_bytes: int = 0
    last_checkpoint: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Receiver:
    """The agent's replication server over a ReplicaStore."""

    def __init__(self, store: ReplicaStore, context: ssl.SSLContext, host: str = "127.0.0.1", port: int = 0,
                 *, handshake_timeout: float = 10.0, io_timeout: float = 120.0,
                 checkpoint_interval: float = 5.0, join_timeout: float = 10.0,
                 error_linger: float = 10.0, keepalive: tuple[int, int, int] | None = (10, 5, 3),
                 takeover_quiet: float = 3.0) -> None:
        self.store = store
        self.context = context
        self.handshake_timeout = handshake_timeout
        self.io_timeout = io_timeout
        self.checkpoint_interval = checkpoint_interval
        self.join_timeout = join_timeout
        self.error_linger = error_linger
        self.keepalive = keepalive
        self.takeover_quiet = takeover_quiet
        self._listener = socket.create_server((host, port), reuse_port=False, backlog=64)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._sessions: dict[str, Session | None] = {}
        self._lock = threading.Condition()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self.stats = {"connections": 0, "refused": 0, "cycles": 0, "failed_cycles": 0, "protocol_errors": 0}

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> Receiver:
        self._accept_thread = threading.Thread(target=self.serve_forever, name="agent-accept", daemon=True)
        self._accept_thread.start()
        return self

    def serve_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                raw, addr = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)
                continue
            if self._stopping.is_set():
                raw.close()
                return
            t = threading.Thread(target=self._handle, args=(raw, addr), name=f"agent-conn-{addr[1]}",
                                 daemon=True)
            with self._lock:
                self._threads.add(t)
                self._conns.add(raw)
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() on Linux
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for c in conns:
            hang_up(c)  # not SSLSocket.shutdown: see tls.hang_up
        for t in threads:
            t.join(timeout)
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one connection ------------------------------------------------------------------
    def _handle(self, raw: socket.socket, addr: tuple[str, int]) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        sock: ssl.SSLSocket | None = None
        try:
            raw.settimeout(self.handshake_timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.keepalive:
                idle, intvl, cnt = self.keepalive
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, intvl)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cnt)
                # unacknowledged data (an ERROR sent into a cut link) gives up as soon
                if hasattr(socket, "TCP_USER_TIMEOUT"):
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, (idle + intvl * cnt) * 1000)
            try:
                sock = self.context.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.stats["refused"] += 1
                log.warning("refused connection from %s: %s", peer, describe_tls_error(exc))
                return
            self.stats["connections"] += 1
            with self._lock:  # wrap_socket detached `raw`: stop() must shut down `sock`
                self._conns.discard(raw)
                self._conns.add(sock)
            sock.settimeout(self.io_timeout)
            cert = sock.getpeercert(binary_form=True) or b""
            conn = _Connection(self, sock, peer, peer_name(sock))
            conn.identity = hashlib.sha256(cert).hexdigest()
            conn.run()
        except Exception:  # noqa: BLE001 - a bug must not kill the agent
            log.exception("connection from %s: internal error", peer)
        finally:
            try:
                (sock or raw).close()
            except OSError:
                pass
            with self._lock:
                self._conns.discard(raw)
                if sock is not None:
                    self._conns.discard(sock)
                self._threads.discard(threading.current_thread())

    # -- sessions ------------------------------------------------------------------------
    def open_session(self, disk: DiskReplica, begin: CycleBegin, sock: socket.socket, *,
                     identity: str = "", size: int | None = None, peer: str = "") -> Session:
        deadline = time.monotonic() + self.join_timeout
        with self._lock:
            while disk.disk_id in self._sessions:
                old = self._sessions[disk.disk_id]
                if old is not None and self._may_take_over(old, begin, identity):
                    self._take_over(old, peer)
                left = deadline - time.monotonic()
                if left <= 0:
                    what = f"cycle {old.cycle_id}" if old else "a cycle"
                    raise Conflict(f"disk {disk.disk_id}: {what} is in progress on another connection")
                self._lock.wait(min(left, 0.5))
            self._sessions[disk.disk_id] = None  # reserved while the store opens the cycle
        try:
            if size is not None and size != disk.size:
                disk.resize(size)  # grows (a smaller size is refused)
            writer = disk.begin_cycle(begin.cycle_id, begin.base_point)
        except BaseException:
            with self._lock:
                del self._sessions[disk.disk_id]
                self._lock.notify_all()
            raise
        session = Session(disk, writer, begin.cycle_id, begin.base_point, begin.stream_count, identity)
        session.members[0] = sock
        with self._lock:
            self._sessions[disk.disk_id] = session
            self._lock.notify_all()
        return session

    def _may_take_over(self, old: Session, begin: CycleBegin, identity: str) -> bool:
        """A new stream 0 may take over `old` (lock held): same sender certificate, and no
        frame on any of its streams for `takeover_quiet` seconds. The cycle may be the same
        (a seed resumed) or another one (a delta retried under a new id after a cut link):
        a sender runs one cycle of a disk at a time, so its new CYCLE_BEGIN says it gave
        the old one up. Another certificate never takes over."""
        return (not old.finished and bool(identity) and old.identity == identity
                and time.monotonic() - old.last_activity >= self.takeover_quiet)

    def _take_over(self, old: Session, peer: str) -> None:
        """Fail the stale session and shut down its streams' sockets (lock held): they leave
        it (the last one checkpoints the staged blocks) and the caller waits for that."""
        if old.taken_over:
            return
        old.taken_over = True
        if old.failed is None:
            old.failed = f"taken over by a new connection from {peer}"
            old.failed_code = ErrorCode.REMOTE
            self.stats["failed_cycles"] += 1
        log.warning("disk %s cycle %s: streams quiet for %.0f s; taken over by a new connection from %s "
                    "(staged blocks kept)", old.disk.disk_id, old.cycle_id, time.monotonic() - old.last_activity,
                    peer)
        for s in list(old.members.values()):
            hang_up(s)  # their threads read on: TLS must stay in place (see tls.hang_up)

    def join_session(self, disk_id: str, begin: CycleBegin, sock: socket.socket) -> Session:
        deadline = time.monotonic() + self.join_timeout
        with self._lock:
            while True:
                s = self._sessions.get(disk_id)
                if s is not None and s.cycle_id == begin.cycle_id and not s.finished:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    if s is not None:
                        raise Conflict(f"disk {disk_id}: cycle {s.cycle_id} is in progress, not {begin.cycle_id}")
                    raise Conflict(f"disk {disk_id}: no cycle {begin.cycle_id} to join (stream 0 opens it)")
                # Another cycle's session may be one this sender just gave up (a cut link
                # whose streams the agent has not yet seen end): its stream 0 waits for it
                # to end or takes it over, then opens this cycle; wait for that too.
                self._lock.wait(min(left, 0.5))
            if s.failed:
                raise SessionFailed(f"cycle {s.cycle_id} already failed: {s.failed}", s.failed_code)
            if s.stream_count != begin.stream_count or s.base_point != begin.base_point:
                raise ProtocolError(f"stream {begin.stream_index} joins cycle {s.cycle_id} with "
                                    f"{begin.stream_count} streams on {begin.base_point}, the cycle has "
                                    f"{s.stream_count} on {s.base_point}")
            if begin.stream_index in s.members or begin.stream_index in s.ended:
                raise ProtocolError(f"stream {begin.stream_index} of cycle {s.cycle_id} joined twice")
            s.members[begin.stream_index] = sock
            return s

    def leave_session(self, session: Session, index: int, error: str | None,
                      code: ErrorCode = ErrorCode.REMOTE) -> None:
        with self._lock:
            session.members.pop(index, None)
            if error is not None and session.failed is None and not session.finished:
                session.failed = error
                session.failed_code = code
                # The other streams learn it at their next frame (ERROR, then linger), or
                # see their sender close. They are not woken by shutting their sockets:
                # that would reset connections the sender is still writing to and lose
                # the ERROR that tells it why the cycle failed.
                self.stats["failed_cycles"] += 1
                latest = session.disk.latest()
                log.warning("disk %s cycle %s failed: %s (replica stays at point %s; staged blocks kept)",
                            session.disk.disk_id, session.cycle_id, error, latest.id if latest else None)
            last = not session.members
            if last and not session.finished:
                try:
                    session.writer.checkpoint()
                except (OSError, StandbyError) as exc:
                    log.warning("disk %s cycle %s: checkpoint after failure failed: %s",
                                session.disk.disk_id, session.cycle_id, exc)
            if last and self._sessions.get(session.disk.disk_id) is session:
                del self._sessions[session.disk.disk_id]
            self._lock.notify_all()

    def finish_session(self, session: Session) -> None:
        with self._lock:
            session.finished = True
            if self._sessions.get(session.disk.disk_id) is session:
                del self._sessions[session.disk.disk_id]
            self._lock.notify_all()


def staged_cycle(disk: DiskReplica) -> tuple[str, str | None] | None:
    """The unfinished cycle staged for a disk (id, base point), from the store's
    documented staging layout (`staging/<cycle_id>/cycle.json`); None if there is none."""
    try:
        for d in sorted(disk.staging_dir.iterdir()):
            info = d / "cycle.json"
            if d.is_dir() and not d.name.endswith(".tmp") and info.exists():
                cyc = json.loads(info.read_text())
                if valid_id(str(cyc.get("cycle_id", ""))):
                    base = cyc.get("base")
                    return str(cyc["cycle_id"]), (str(base) if base else None)
    except (OSError, ValueError, KeyError):
        return None
    return None


class _Connection:
    def __init__(self, server: Receiver, sock: ssl.SSLSocket, peer: str, name: str) -> None:
        self.identity = ""
        self.server = server
        self.sock = sock
        self.peer = peer
        self.name = name
        self.rfile = sock.makefile("rb", buffering=256 * 1024)
        self.seq = ReceiverSequence()
        self.hello: Hello | None = None
        self.disk: DiskReplica | None = None
        self.table: HashTable | None = None
        self.session: Session | None = None
        self.stream_index = 0
        self.data_blocks = 0
        self.zero_blocks = 0
        self.dctx = zstandard.ZstdDecompressor()
        self.error_sent = False

    def send(self, msg: Message) -> None:
        self.sock.sendall(msg.encode())

    def run(self) -> None:
        error: str | None = None
        code = ErrorCode.REMOTE
        try:
            while True:
                try:
                    msg = read_frame(self.rfile)
                except ConnectionClosed:
                    s = self.session
                    if s is not None and s.failed is not None:
                        self._send_error(SessionFailed(f"cycle {s.cycle_id} failed on another stream: {s.failed}",
                                                       s.failed_code))
                    elif s is not None:
                        error = f"stream {self.stream_index} from {self.peer} closed before the cycle ended"
                    return
                except ConnectionLost as exc:
                    # a cut link: no ERROR to send (nobody reads it), not a protocol fault
                    if self.session is not None:
                        error = f"stream {self.stream_index} from {self.peer}: {exc.message}"
                    return
                if self.session is not None:
                    self.session.last_activity = time.monotonic()
                self.seq.accept(msg)
                if isinstance(msg, Error):
                    error = f"the sender reported: {msg.message}"
                    return
                self.dispatch(msg)
        except (StandbyError, OSError, ssl.SSLError, zstandard.ZstdError) as exc:
            error = self._describe(exc)
            code = _wire_code(exc)
            if isinstance(exc, ProtocolError):
                self.server.stats["protocol_errors"] += 1
                log.warning("connection from %s (%s): %s", self.peer, self.name, exc.message)
            if not isinstance(exc, (OSError, ssl.SSLError)) or isinstance(exc, StandbyError):
                self._send_error(exc)
        finally:
            if self.session is not None:
                self.server.leave_session(self.session, self.stream_index, error, code)
                self.session = None
            try:
                self.rfile.close()
            except OSError:
                pass
            if self.error_sent:
                self._linger()

    def _linger(self) -> None:
        """After an ERROR: half-close, then discard what the sender still sends until it
        closes (or `error_linger` seconds pass), so the ERROR reaches it (see the module doc)."""
        deadline = time.monotonic() + self.server.error_linger
        try:
            self.sock.shutdown(socket.SHUT_WR)  # also drops the TLS layer: raw reads below
            while not self.server._stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.sock.settimeout(min(left, 0.5))
                try:
                    if not self.sock.recv(256 * 1024):
                        break
                except (socket.timeout, TimeoutError):
                    continue
        except (OSError, ValueError):
            pass

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, StandbyError):
            return exc.message
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return f"stream {self.stream_index} from {self.peer} timed out"
        if isinstance(exc, ssl.SSLError):
            return f"stream {self.stream_index} from {self.peer}: {describe_tls_error(exc)}"
        if isinstance(exc, OSError) and exc.errno == 28:
            return f"out of space on the replica store: {exc.strerror}"
        return f"stream {self.stream_index} from {self.peer}: {getattr(exc, 'strerror', None) or exc}"

    def _send_error(self, exc: BaseException) -> None:
        try:
            if isinstance(exc, zstandard.ZstdError):
                err = Error(ErrorCode.PROTOCOL, f"DATA: zstd payload does not decompress: {exc}")
            elif isinstance(exc, SessionFailed):
                err = Error(exc.code, exc.message)
            else:
                err = Error.from_exception(exc)
            self.send(err)
            self.error_sent = True
        except (OSError, ssl.SSLError, ValueError):
            pass

    # -- frames ----------------------------------------------------------------------------
    def dispatch(self, msg: Message) -> None:
        s = self.session
        if s is not None and s.failed is not None and not isinstance(msg, CycleEnd):
            raise SessionFailed(f"cycle {s.cycle_id} failed on another stream: {s.failed}", s.failed_code)
        if isinstance(msg, Data):
            self.on_data(msg)
        elif isinstance(msg, ZeroRun):
            self.on_zero(msg)
        elif isinstance(msg, Hello):
            self.on_hello(msg)
        elif isinstance(msg, HashRequest):
            self.on_hash_request(msg)
        elif isinstance(msg, CycleBegin):
            self.on_cycle_begin(msg)
        elif isinstance(msg, StreamEnd):
            self.on_stream_end(msg)
        elif isinstance(msg, CycleEnd):
            self.on_cycle_end(msg)
        else:  # the sequence rules let nothing else through
            raise ProtocolError(f"unexpected {msg.TYPE.name} frame")

    def on_hello(self, msg: Hello) -> None:
        if msg.version not in SUPPORTED_VERSIONS:
            self.send(Error(ErrorCode.VERSION, f"protocol version {msg.version} is not supported; this agent "
                                               f"speaks {', '.join(map(str, SUPPORTED_VERSIONS))}"))
            raise ProtocolError(f"sender speaks protocol version {msg.version}")
        if msg.block_size != BLOCK_SIZE:
            raise ProtocolError(f"HELLO: block size {msg.block_size}; this agent's replicas use {BLOCK_SIZE}")
        if msg.size <= 0 or msg.size % 512:
            raise ProtocolError(f"HELLO: disk size {msg.size} is not a positive multiple of 512 bytes")
        if msg.size > MAX_DISK_SIZE:
            raise ProtocolError(f"HELLO: disk size {msg.size} is above this agent's limit of {MAX_DISK_SIZE} bytes")
        self.hello = msg
        try:
            self.disk = self.server.store.disk(msg.disk_id)
        except NotFound:
            self.disk = None
        latest = resume = None
        if self.disk is not None:
            self.disk.latest()  # rescans: committed_size is current
            if msg.size < self.disk.committed_size:
                raise Conflict(f"the replica of disk {msg.disk_id} is {self.disk.committed_size} bytes, the "
                               f"sender says {msg.size}: shrinking a protected disk is not supported")
            # a larger size grows the replica with the next point (at CYCLE_BEGIN)
            latest = self.disk.latest()
            resume = staged_cycle(self.disk)
        digest = bytes.fromhex(latest.digest) if latest else None
        if latest is not None and self.disk is not None and msg.size > self.disk.committed_size:
            # growing: the latest point read at the new size (zeros beyond its end), which is
            # what the block table sent on HASH_REQUEST hashes to
            digest = self.disk.grown_digest(msg.size)
        self.send(HelloOk(latest.id if latest else None, digest,
                          msg.size if self.disk else 0,
                          resume[0] if resume else None, resume[1] if resume else None, 0, 0))

    def on_hash_request(self, msg: HashRequest) -> None:
        assert self.hello is not None
        if self.table is None:
            self.table = self.disk.block_hashes(self.hello.size) if self.disk is not None \
                else HashTable(self.hello.size)
        n = self.table.n_blocks
        if msg.first_block >= n or msg.first_block + msg.count > n:
            raise ProtocolError(f"HASH_REQUEST: blocks {msg.first_block}..{msg.first_block + msg.count - 1} "
                                f"outside the disk's {n} blocks")
        raw = self.table.to_bytes()
        self.send(Hashes(msg.first_block, raw[msg.first_block * 16:(msg.first_block + msg.count) * 16]))

    def on_cycle_begin(self, msg: CycleBegin) -> None:
        assert self.hello is not None
        self.stream_index = msg.stream_index
        self.data_blocks = self.zero_blocks = 0
        if msg.stream_index == 0:
            if self.disk is None:
                self.disk = self.server.store.create_disk(self.hello.disk_id, self.hello.size)
            session = self.server.open_session(self.disk, msg, self.sock, identity=self.identity,
                                               size=self.hello.size, peer=self.peer)
            self.session = session
            received = set(session.writer.received)
            frames = resume_frames(received, self.disk.n_blocks)
            self.send(Ack(AckKind.BEGUN, len(received), len(frames)))
            for f in frames:
                self.send(f)
        else:
            self.session = self.server.join_session(self.hello.disk_id, msg, self.sock)
            self.disk = self.session.disk
            self.send(Ack(AckKind.BEGUN, 0, 0))

    def _block_index(self, offset: int, what: str) -> int:
        assert self.disk is not None
        index, rem = divmod(offset, BLOCK_SIZE)
        if rem or offset >= self.disk.size:
            raise ProtocolError(f"{what}: offset {offset} is not a block boundary inside the disk "
                                f"({self.disk.size} bytes)")
        return index

    def on_data(self, msg: Data) -> None:
        s = self.session
        assert s is not None and self.disk is not None
        index = self._block_index(msg.offset, "DATA")
        expected = block_length(self.disk.size, index)
        if msg.raw_length != expected:
            raise ProtocolError(f"DATA: block {index} is {expected} bytes, the frame says {msg.raw_length}")
        if msg.compressed:
            size = zstandard.frame_content_size(msg.body)
            if size != expected:
                raise ProtocolError(f"DATA: block {index}: compressed frame declares {size} bytes, "
                                    f"expected {expected}")
            raw = self.dctx.decompress(msg.body, max_output_size=expected)
            if len(raw) != expected:
                raise ProtocolError(f"DATA: block {index} decompressed to {len(raw)} bytes, expected {expected}")
        else:
            raw = msg.body
        if xxhash.xxh3_128_digest(raw) != msg.checksum:
            raise IntegrityError(f"DATA: block {index} (offset {msg.offset}) does not match its checksum; "
                                 "not applied")
        s.writer.write(msg.offset, raw, msg.checksum)  # checked just above: not hashed again
        self.data_blocks += 1
        s.bytes_applied += expected
        s.wire_bytes += len(msg.body) + 44
        self._maybe_checkpoint(s)

    def on_zero(self, msg: ZeroRun) -> None:
        s = self.session
        assert s is not None and self.disk is not None
        index = self._block_index(msg.offset, "ZERO_RUN")
        end = msg.offset + msg.length
        if end > self.disk.size or (end % BLOCK_SIZE and end != self.disk.size):
            raise ProtocolError(f"ZERO_RUN: run {msg.offset}+{msg.length} does not end on a block boundary "
                                f"inside the disk ({self.disk.size} bytes)")
        s.writer.write_zero(msg.offset, msg.length)
        self.zero_blocks += (end - index * BLOCK_SIZE + BLOCK_SIZE - 1) // BLOCK_SIZE
        s.wire_bytes += 32

    def _maybe_checkpoint(self, s: Session) -> None:
        now = time.monotonic()
        if now - s.last_checkpoint >= self.server.checkpoint_interval:
            s.last_checkpoint = now
            s.writer.checkpoint()

    def on_stream_end(self, msg: StreamEnd) -> None:
        s = self.session
        assert s is not None
        if (msg.data_blocks, msg.zero_blocks) != (self.data_blocks, self.zero_blocks):
            raise ProtocolError(f"STREAM_END: the sender counts {msg.data_blocks} data and {msg.zero_blocks} "
                                f"zero blocks on stream {self.stream_index}, {self.data_blocks} and "
                                f"{self.zero_blocks} arrived")
        with s.lock:
            s.ended[self.stream_index] = (self.data_blocks, self.zero_blocks)
        self.send(Ack(AckKind.STREAM, self.data_blocks + self.zero_blocks))
        if self.stream_index != 0:
            # this stream's part is done: it leaves the session without failing it
            self.server.leave_session(s, self.stream_index, None)
            self.session = None

    def on_cycle_end(self, msg: CycleEnd) -> None:
        s = self.session
        assert s is not None and self.disk is not None
        if s.failed is not None:
            raise SessionFailed(f"cycle {s.cycle_id} failed on another stream: {s.failed}", s.failed_code)
        with s.lock:
            ended = dict(s.ended)
        if len(ended) != s.stream_count:
            missing = sorted(set(range(s.stream_count)) - set(ended))
            raise ProtocolError(f"CYCLE_END before every stream ended (missing: {missing})")
        data = sum(d for d, _ in ended.values())
        zero = sum(z for _, z in ended.values())
        if (data, zero) != (msg.data_blocks, msg.zero_blocks):
            raise ProtocolError(f"CYCLE_END counts {msg.data_blocks} data and {msg.zero_blocks} zero blocks, "
                                f"the streams delivered {data} and {zero}")
        t0 = time.monotonic()
        try:
            point = s.writer.commit(msg.digest, msg.consistency.label, msg.created_at, msg.meta)
        except IntegrityError as exc:
            # the store discarded the cycle; the replica stays at its previous point
            self.server.finish_session(s)
            self.session = None
            self.server.stats["failed_cycles"] += 1
            log.warning("disk %s cycle %s refused: %s", self.disk.disk_id, s.cycle_id, exc.message)
            raise
        self.server.finish_session(s)
        self.session = None
        self.server.stats["cycles"] += 1
        self.table = None
        elapsed = time.monotonic() - s.started
        log.info("disk %s point %s committed: cycle %s from %s (%s), %d data + %d zero blocks over %d "
                 "stream(s), %.1f MiB applied, %.1f MiB on the wire, %.2f s (commit %.2f s), %s-consistent",
                 self.disk.disk_id, point.id, s.cycle_id, self.peer, self.name, data, zero, s.stream_count,
                 s.bytes_applied / 2**20, s.wire_bytes / 2**20, elapsed, time.monotonic() - t0,
                 point.consistency)
        self.send(Ack(AckKind.POINT, point.seq, 0, point.id))


def serve(store_root: Path, context: ssl.SSLContext, host: str, port: int, **kwargs: Any) -> Receiver:
    """Open the store and start a receiver in the background."""
    return Receiver(ReplicaStore(store_root), context, host, port, **kwargs).start()
