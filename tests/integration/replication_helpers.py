"""Helpers for the replication tests: a PKI, an agent, source images, a cutting proxy."""

from __future__ import annotations

import datetime as dt
import random
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from standby.replication import tls
from standby.replication.digest import BLOCK_SIZE
from standby.replication.receiver import Receiver
from standby.replication.store import ReplicaStore


def make_pki(root: Path) -> dict[str, tls.Identity]:
    tls.init_ca(root / "ca")
    tls.init_ca(root / "other-ca")
    now = dt.datetime.now(dt.timezone.utc)
    ids = {
        "agent": tls.issue(root / "ca", "agent", ["127.0.0.1", "localhost"]),
        "sender": tls.issue(root / "ca", "sender", ["127.0.0.1"]),
        "expired": tls.issue(root / "ca", "expired", ["127.0.0.1"], not_before=now - dt.timedelta(days=30),
                             not_after=now - dt.timedelta(days=1)),
        "foreign-ca": tls.issue(root / "other-ca", "foreign", ["127.0.0.1"]),
    }
    # a foreign certificate presented by a peer that trusts our CA
    f = ids["foreign-ca"]
    ids["foreign"] = tls.Identity(f.cert, f.key, ids["agent"].ca)
    return ids


@contextmanager
def running_agent(store_root: Path, ident: tls.Identity, **kwargs: object) -> Iterator[Receiver]:
    rx = Receiver(ReplicaStore(store_root), tls.server_context(ident), "127.0.0.1", 0, **kwargs)  # type: ignore[arg-type]
    rx.start()
    try:
        yield rx
    finally:
        rx.stop()


def endpoint(rx: Receiver) -> str:
    return f"127.0.0.1:{rx.address[1]}"


def make_image(path: Path, size: int, seed: int = 1) -> None:
    """Half zero blocks, half blocks of half random half zero bytes (compressible 2:1)."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for i in range(size // BLOCK_SIZE):
            if i % 2:
                f.write(bytes(BLOCK_SIZE))
            else:
                f.write(rnd.randbytes(BLOCK_SIZE // 2) + bytes(BLOCK_SIZE // 2))


def change_blocks(path: Path, count: int, seed: int = 2, zero_some: bool = True) -> list[int]:
    size = path.stat().st_size
    rnd = random.Random(seed)
    blocks = sorted(rnd.sample(range(size // BLOCK_SIZE), count))
    with open(path, "r+b") as f:
        for n, i in enumerate(blocks):
            f.seek(i * BLOCK_SIZE)
            if zero_some and n % 7 == 3:
                f.write(bytes(BLOCK_SIZE))
            else:
                f.write(rnd.randbytes(BLOCK_SIZE))
    return blocks


def qemu_compare(raw_image: Path, qcow2: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw_image), str(qcow2)],
                          capture_output=True, text=True)


class CuttingProxy:
    """A TCP proxy that forwards every connection to `upstream` and cuts all of them
    (both directions, at once) after `budget` bytes went from clients to the server."""

    def __init__(self, upstream: tuple[str, int], budget: int) -> None:
        self.upstream = upstream
        self.budget = budget
        self.forwarded = 0
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._socks += [client, server]
            for a, b, counted in ((client, server, True), (server, client, False)):
                t = threading.Thread(target=self._pump, args=(a, b, counted), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            if counted:
                with self._lock:
                    self.forwarded += len(data)
                    over = self.forwarded >= self.budget
                if over:
                    self.cut_all()
                    return
            try:
                dst.sendall(data)
            except OSError:
                return

    def cut_all(self) -> None:
        self.cut.set()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self.listener.close()
        self.cut_all()
        for t in self._threads:
            t.join(5)
        for s in self._socks:
            s.close()


def tls_client(ident: tls.Identity | None, port: int, ca: Path) -> ssl.SSLSocket:
    """A connected TLS client socket (with `ident`'s certificate, or none)."""
    if ident is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(ca))
    else:
        ctx = tls.client_context(ident)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise
