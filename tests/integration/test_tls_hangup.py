"""Hanging up a TLS connection from another thread keeps TLS in place (issue 16).

`ssl.SSLSocket.shutdown` drops the TLS layer before it shuts the socket. Called from
another thread (the receiver's `stop` and take-over, the sender's abort of the other
streams), it made the thread still reading that connection read raw TLS records as
frame bytes: a DATA body filled with ciphertext, reported as "does not match its
checksum" (the CI failure of test_cut_delta_leaves_the_previous_point). On the sender it
let a thread still writing send plaintext disk data in the clear. Both are reproduced
here with an injected delay at the right moment, not by hoping for a race."""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

import pytest
import xxhash

sys.path.insert(0, str(Path(__file__).parent))

from replication_helpers import make_pki, running_agent, tls_client  # noqa: E402

from standby.replication import receiver as receiver_mod  # noqa: E402
from standby.replication import tls  # noqa: E402
from standby.replication.digest import BLOCK_SIZE  # noqa: E402
from standby.replication.protocol import Ack, CycleBegin, Data, Hello, HelloOk, read_frame  # noqa: E402
from standby.replication.sender import Channel, Endpoint  # noqa: E402

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.Identity]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _block(i: int) -> bytes:
    return (i.to_bytes(4, "big") * (BLOCK_SIZE // 4))


def _hold_first_data(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """The injected delay: the first DATA frame a receiver gets holds its stream's thread
    (inside the frame's handling) until `release` is set; `entered` says it got there."""
    entered, release = threading.Event(), threading.Event()
    real_on_data = receiver_mod._Connection.on_data

    def held_on_data(self: receiver_mod._Connection, msg: Data) -> None:
        if not entered.is_set():
            entered.set()
            assert release.wait(30)
        real_on_data(self, msg)

    monkeypatch.setattr(receiver_mod._Connection, "on_data", held_on_data)
    return entered, release


def _open_stream(port: int, ident: tls.Identity, disk: str, cycle: str,
                 blocks: int) -> tuple[ssl.SSLSocket, threading.Thread]:
    """Stream 0 of a seed of `blocks` blocks: HELLO and CYCLE_BEGIN answered, then a thread
    sending every DATA frame (it stops when the agent hangs up)."""
    s = tls_client(ident, port, ident.ca)
    f = s.makefile("rb")
    s.sendall(Hello(disk, blocks * BLOCK_SIZE, BLOCK_SIZE).encode())
    assert isinstance(read_frame(f), HelloOk)
    s.sendall(CycleBegin(cycle, None, 0, 1).encode())
    assert isinstance(read_frame(f), Ack)

    def send_all() -> None:
        try:
            for i in range(blocks):
                data = _block(i)
                s.sendall(Data(i * BLOCK_SIZE, BLOCK_SIZE, xxhash.xxh3_128_digest(data), data).encode())
        except OSError:
            pass  # the agent hung up: expected

    writer = threading.Thread(target=send_all, daemon=True)
    writer.start()
    return s, writer


def test_receiver_stop_mid_frame_is_a_lost_connection_not_corruption(
        tmp_path: Path, pki: dict[str, tls.Identity], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The stream's thread is held inside its first DATA frame while 4 MiB more of
    frames wait in the kernel; the receiver is stopped (its sockets hung up from another
    thread) and then the thread goes on. It must read only what TLS decrypts, then the
    end of the stream: a lost connection, never a checksum or framing error."""
    entered, release = _hold_first_data(monkeypatch)
    hung_up = threading.Event()
    real_shutdown = socket.socket.shutdown

    def shutdown_seen(sock: socket.socket, how: int) -> None:
        real_shutdown(sock, how)
        if isinstance(sock, ssl.SSLSocket) and how == socket.SHUT_RDWR:
            hung_up.set()

    monkeypatch.setattr(socket.socket, "shutdown", shutdown_seen)
    caplog.set_level(logging.INFO, logger="standby")
    with running_agent(tmp_path / "store", pki["agent"], error_linger=0.5) as rx:
        s, writer = _open_stream(rx.address[1], pki["sender"], "hd", "cyc-hangup", 64)
        assert entered.wait(30)
        time.sleep(0.2)  # let the client's frames reach the agent's socket buffer
        stopper = threading.Thread(target=rx.stop, daemon=True)
        stopper.start()
        assert hung_up.wait(30)
        release.set()
        stopper.join(30)
        writer.join(30)
        s.close()
    text = caplog.text
    assert "does not match its checksum" not in text, text
    assert "bad frame magic" not in text and "header checksum" not in text, text
    assert rx.stats["protocol_errors"] == 0, text
    assert "connection lost mid-frame" in text or "closed before the cycle ended" in text, text


def test_receiver_take_over_keeps_the_stale_stream_on_tls(
        tmp_path: Path, pki: dict[str, tls.Identity], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The same through the take-over path: a new stream 0 from the same certificate
    takes over a session whose stream is held inside a DATA frame (quiet), with frames
    still queued behind it."""
    entered, release = _hold_first_data(monkeypatch)
    caplog.set_level(logging.INFO, logger="standby")
    blocks = 64
    size = blocks * BLOCK_SIZE
    with running_agent(tmp_path / "store", pki["agent"], takeover_quiet=0.2, join_timeout=20.0,
                       error_linger=0.5) as rx:
        s, writer = _open_stream(rx.address[1], pki["sender"], "tk", "cyc-stale", blocks)
        assert entered.wait(30)
        time.sleep(0.4)  # quiet for longer than takeover_quiet
        new = tls_client(pki["sender"], rx.address[1], pki["sender"].ca)
        nf = new.makefile("rb")
        new.sendall(Hello("tk", size, BLOCK_SIZE).encode())
        assert isinstance(read_frame(nf), HelloOk)
        new.sendall(CycleBegin("cyc-stale", None, 0, 1).encode())
        # the take-over hangs the stale stream up; it goes on once released
        deadline = time.monotonic() + 30
        while "taken over" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        release.set()
        begun = read_frame(nf)
        assert isinstance(begun, Ack), begun
        writer.join(30)
        s.close()
        new.close()
    text = caplog.text
    assert "taken over by a new connection" in text, text
    assert "does not match its checksum" not in text, text
    assert "bad frame magic" not in text and "header checksum" not in text, text
    assert rx.stats["protocol_errors"] == 0, text


def test_sender_abort_never_sends_plaintext(pki: dict[str, tls.Identity],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream's worker keeps writing while another thread aborts its channel. The
    socket's own shutdown is delayed (the window in which the old code had already
    dropped TLS): whatever the worker writes meanwhile must still be encrypted."""
    marker = b"PLAINTEXT-DISK-DATA!" * 50
    captured = bytearray()
    server = socket.create_server(("127.0.0.1", 0))
    sctx = tls.server_context(pki["agent"])

    def serve() -> None:
        raw, _ = server.accept()
        conn = sctx.wrap_socket(raw, server_side=True)
        conn.settimeout(10)
        # read the TLS records raw from here on: what crossed the wire
        try:
            while True:
                chunk = socket.socket.recv(conn, 65536)
                if not chunk:
                    break
                captured.extend(chunk)
        except OSError:
            pass
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    chan = Channel(Endpoint("127.0.0.1", server.getsockname()[1]), tls.client_context(pki["sender"]), 10.0)
    real_shutdown = socket.socket.shutdown

    def slow_shutdown(sock: socket.socket, how: int) -> None:
        time.sleep(0.3)  # the injected delay: a thread switch at the worst moment
        real_shutdown(sock, how)

    monkeypatch.setattr(socket.socket, "shutdown", slow_shutdown)
    stop = threading.Event()
    sent = [0]

    def worker() -> None:
        try:
            while not stop.is_set():
                chan.sock.sendall(marker)
                sent[0] += 1
                time.sleep(0.01)
        except (OSError, ValueError):
            pass

    w = threading.Thread(target=worker, daemon=True)
    w.start()
    time.sleep(0.1)
    chan.abort()
    stop.set()
    w.join(10)
    monkeypatch.undo()
    chan.close()
    t.join(10)
    server.close()
    assert sent[0] > 0
    assert b"PLAINTEXT-DISK-DATA!" not in bytes(captured)
