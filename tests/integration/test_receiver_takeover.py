"""Receiver: a new stream 0 of the same cycle, from the same sender certificate, takes over
a session whose streams went quiet (a sender that vanished without a FIN); the staged
blocks are kept and the seed resumes. Another certificate, or a live session, is refused."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest
import xxhash

sys.path.insert(0, str(Path(__file__).parent))

from replication_helpers import endpoint, make_pki, running_agent, tls_client  # noqa: E402

from standby.errors import Conflict, StandbyError  # noqa: E402
from standby.replication import tls  # noqa: E402
from standby.replication.digest import BLOCK_SIZE, hash_file  # noqa: E402
from standby.replication.protocol import Ack, CycleBegin, Data, Hello, HelloOk, read_frame  # noqa: E402
from standby.replication.changes import FullSource  # noqa: E402
from standby.replication.sender import SenderOptions, run_cycle  # noqa: E402
from standby.replication.store import ReplicaStore  # noqa: E402

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.Identity]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _stale_stream(rx, ident: tls.Identity, img: Path, disk_id: str, cycle: str, blocks: int):  # type: ignore[no-untyped-def]
    """Stream 0 of a seed that sends `blocks` blocks, then goes silent (kept open)."""
    s = tls_client(ident, rx.address[1], ident.ca)
    s.settimeout(10)
    f = s.makefile("rb")
    size = img.stat().st_size
    s.sendall(Hello(disk_id, size, BLOCK_SIZE).encode())
    assert isinstance(read_frame(f), HelloOk)
    s.sendall(CycleBegin(cycle, None, 0, 1).encode())
    assert isinstance(read_frame(f), Ack)
    with img.open("rb") as src:
        for i in range(blocks):
            data = src.read(BLOCK_SIZE)
            s.sendall(Data(i * BLOCK_SIZE, len(data), xxhash.xxh3_128_digest(data), data).encode())
    f.close()
    return s


def test_new_stream_0_takes_over_a_quiet_session_and_resumes(tmp_path: Path,
                                                             pki: dict[str, tls.Identity]) -> None:
    img = tmp_path / "src.img"
    img.write_bytes(os.urandom(8 * MiB))
    with running_agent(tmp_path / "store", pki["agent"], checkpoint_interval=0.05, takeover_quiet=0.5,
                       join_timeout=5.0) as rx:
        stale = _stale_stream(rx, pki["sender"], img, "tk", "cyc-stale", 40)
        time.sleep(0.3)
        t0 = time.monotonic()
        r = run_cycle(FullSource(img), endpoint(rx), tls.client_context(pki["sender"]), "tk",
                      SenderOptions(state_dir=tmp_path / "state"))
        elapsed = time.monotonic() - t0
        # the stale connection was shut down by the agent
        stale.settimeout(5)
        try:
            rest = stale.recv(65536)
        except (OSError, socket.timeout):
            rest = b""
        stale.close()
    assert r.resumed and r.resumed_blocks > 0, r
    assert r.data_blocks + r.resumed_blocks == 8 * MiB // BLOCK_SIZE
    assert r.digest == hash_file(img).disk_digest().hex()
    assert elapsed < 5, elapsed
    assert rest == b"" or rest  # closed or an ERROR: the agent no longer waits on it
    disk = ReplicaStore(tmp_path / "store").disk("tk")
    assert disk.verify(r.point_id).ok


def test_live_session_is_not_taken_over(tmp_path: Path, pki: dict[str, tls.Identity]) -> None:
    img = tmp_path / "src.img"
    img.write_bytes(os.urandom(2 * MiB))
    with running_agent(tmp_path / "store", pki["agent"], takeover_quiet=30.0, join_timeout=1.0) as rx:
        stale = _stale_stream(rx, pki["sender"], img, "lv", "cyc-live", 4)
        try:
            with pytest.raises(StandbyError) as info:
                run_cycle(FullSource(img), endpoint(rx), tls.client_context(pki["sender"]), "lv",
                          SenderOptions(state_dir=tmp_path / "state"))
            assert isinstance(info.value, Conflict) or "in progress" in str(info.value), info.value
        finally:
            stale.close()


def test_another_certificate_does_not_take_over(tmp_path: Path, pki: dict[str, tls.Identity]) -> None:
    img = tmp_path / "src.img"
    img.write_bytes(os.urandom(2 * MiB))
    with running_agent(tmp_path / "store", pki["agent"], takeover_quiet=0.1, join_timeout=1.0) as rx:
        stale = _stale_stream(rx, pki["sender"], img, "oc", "cyc-oc", 4)
        rx._sessions["oc"].identity = "someone-else"  # as if another sender certificate opened it
        time.sleep(0.3)
        try:
            with pytest.raises(StandbyError) as info:
                run_cycle(FullSource(img), endpoint(rx), tls.client_context(pki["sender"]), "oc",
                          SenderOptions(state_dir=tmp_path / "state"))
            assert "in progress" in str(info.value), info.value
        finally:
            stale.close()
