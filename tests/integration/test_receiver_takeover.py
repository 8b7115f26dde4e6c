"""Receiver: a new stream 0 of the same cycle, from the same sender certificate, takes over
a session whose streams went quiet (a sender that vanished without a FIN); the staged
blocks are kept and the seed resumes. Another certificate, or a live session, is refused."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import xxhash

sys.path.insert(0, str(Path(__file__).parent))

from replication_helpers import endpoint, make_pki, running_agent, tls_client  # noqa: E402

from standby.errors import Conflict, StandbyError  # noqa: E402
from standby.replication import tls  # noqa: E402
from standby.replication.digest import BLOCK_SIZE, hash_file  # noqa: E402
from standby.replication.changes import ExtentSource, FullSource  # noqa: E402
from standby.replication.protocol import Ack, CycleBegin, CycleKind, Data, Hello, HelloOk, read_frame  # noqa: E402
from standby.replication.receiver import Receiver  # noqa: E402
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
        # the agent hung the stale connection up: it ends (an ERROR at most, then the end
        # of the stream), where an agent still holding it would leave this read waiting
        stale.settimeout(10)
        ended = False
        try:
            while stale.recv(65536):
                pass
            ended = True
        except socket.timeout:
            ended = False
        except OSError:
            ended = True  # reset: ended too
        stale.close()
    assert r.resumed and r.resumed_blocks > 0, r
    assert r.data_blocks + r.resumed_blocks == 8 * MiB // BLOCK_SIZE
    assert r.digest == hash_file(img).disk_digest().hex()
    assert elapsed < 5, elapsed
    assert ended, "the agent kept the taken-over connection open"
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
    other = tls.issue(pki["sender"].ca.parent, "other-sender", ["127.0.0.1"])  # same CA, another host
    with running_agent(tmp_path / "store", pki["agent"], takeover_quiet=0.1, join_timeout=1.0) as rx:
        stale = _stale_stream(rx, other, img, "oc", "cyc-oc", 4)
        time.sleep(0.3)
        try:
            with pytest.raises(StandbyError) as info:
                run_cycle(FullSource(img), endpoint(rx), tls.client_context(pki["sender"]), "oc",
                          SenderOptions(state_dir=tmp_path / "state"))
            assert "in progress" in str(info.value), info.value
        finally:
            stale.close()


def _stale_delta(rx, ident: tls.Identity, img: Path, disk_id: str, base: str, cycle: str):  # type: ignore[no-untyped-def]
    """Stream 0 of a delta on `base` that sends one block, then goes silent (kept open):
    a cycle whose link was cut without the agent seeing the end of its streams."""
    s = tls_client(ident, rx.address[1], ident.ca)
    s.settimeout(10)
    f = s.makefile("rb")
    s.sendall(Hello(disk_id, img.stat().st_size, BLOCK_SIZE).encode())
    assert isinstance(read_frame(f), HelloOk)
    s.sendall(CycleBegin(cycle, base, 0, 1, CycleKind.EXTENTS).encode())
    data = img.read_bytes()[:BLOCK_SIZE]
    s.sendall(Data(0, len(data), xxhash.xxh3_128_digest(data), data).encode())
    f.close()
    return s


def test_a_retried_delta_under_a_new_id_takes_over_its_own_quiet_cycle(
        tmp_path: Path, pki: dict[str, tls.Identity]) -> None:
    """A sender retrying a cut delta uses a new cycle id; the agent has not seen the old
    streams end (no FIN came). The same certificate takes the quiet session over instead
    of waiting for TCP keepalive (the retry was refused with "is in progress")."""
    img = tmp_path / "src.img"
    img.write_bytes(os.urandom(4 * MiB))
    ctx = tls.client_context(pki["sender"])
    state = tmp_path / "state"
    with running_agent(tmp_path / "store", pki["agent"], takeover_quiet=0.3, join_timeout=10.0) as rx:
        first = run_cycle(FullSource(img), endpoint(rx), ctx, "rd", SenderOptions(state_dir=state))
        stale = _stale_delta(rx, pki["sender"], img, "rd", first.point_id, "delta-cut-1")
        try:
            changed = [(3 * BLOCK_SIZE, BLOCK_SIZE), (9 * BLOCK_SIZE, BLOCK_SIZE)]
            with img.open("r+b") as f:
                for off, n in changed:
                    f.seek(off)
                    f.write(os.urandom(n))
            r = run_cycle(ExtentSource(img, changed), endpoint(rx), ctx, "rd",
                          SenderOptions(state_dir=state, streams=2))
        finally:
            stale.close()
    assert r.base_point == first.point_id and r.data_blocks == 2
    assert r.digest == hash_file(img).disk_digest().hex()
    assert ReplicaStore(tmp_path / "store").disk("rd").verify(r.point_id).ok


def test_a_joining_stream_waits_for_the_previous_cycle_to_end(
        tmp_path: Path, pki: dict[str, tls.Identity], monkeypatch: pytest.MonkeyPatch) -> None:
    """Stream 1 of a new cycle reaches the agent while the previous cycle's stream is
    still open (the agent has not read its end yet). It waits for that session to end
    and for its own stream 0 to open the cycle; it used to be refused at once."""
    img = tmp_path / "src.img"
    img.write_bytes(os.urandom(4 * MiB))
    other = tls.issue(pki["sender"].ca.parent, "previous-sender", ["127.0.0.1"])
    joining = threading.Event()
    real_join = Receiver.join_session

    def join_seen(self: Receiver, disk_id: str, begin: CycleBegin, sock: socket.socket):  # type: ignore[no-untyped-def]
        if begin.kind is CycleKind.EXTENTS:  # the delta's stream 1 (not the seed's)
            joining.set()
        return real_join(self, disk_id, begin, sock)

    monkeypatch.setattr(Receiver, "join_session", join_seen)
    result: list[object] = []
    ctx = tls.client_context(pki["sender"])
    state = tmp_path / "state"
    with running_agent(tmp_path / "store", pki["agent"], takeover_quiet=60.0, join_timeout=20.0) as rx:
        first = run_cycle(FullSource(img), endpoint(rx), ctx, "jn", SenderOptions(state_dir=state))
        # another certificate: never taken over, it must end by itself
        previous = _stale_delta(rx, other, img, "jn", first.point_id, "delta-previous")
        changed = [(5 * BLOCK_SIZE, BLOCK_SIZE), (40 * BLOCK_SIZE, BLOCK_SIZE)]
        with img.open("r+b") as f:
            for off, n in changed:
                f.seek(off)
                f.write(os.urandom(n))

        def replicate() -> None:
            try:
                # a delta: its streams 1..n-1 join without waiting for stream 0's ACK BEGUN
                result.append(run_cycle(ExtentSource(img, changed), endpoint(rx), ctx, "jn",
                                        SenderOptions(state_dir=state, streams=2)))
            except Exception as exc:  # noqa: BLE001 - asserted below
                result.append(exc)

        t = threading.Thread(target=replicate, daemon=True)
        t.start()
        assert joining.wait(20)  # stream 1 is at the agent while the previous cycle is open
        previous.close()  # now the previous cycle's stream ends
        t.join(60)
    assert len(result) == 1 and not isinstance(result[0], Exception), result
    r = result[0]
    assert r.digest == hash_file(img).disk_digest().hex()  # type: ignore[attr-defined]
