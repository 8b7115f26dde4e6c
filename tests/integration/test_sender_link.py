"""The sender's persistent link (streams kept open between cycles, reconnects when the
agent went away) and its adaptive compression, over loopback mutual TLS with the real
receiver and replica store."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from replication_helpers import change_blocks, endpoint, make_image, make_pki, running_agent  # noqa: E402

from standby.domain.bandwidth import Schedule  # noqa: E402
from standby.errors import Conflict  # noqa: E402
from standby.replication import tls  # noqa: E402
from standby.replication.changes import ExtentSource, FullSource, HashScanSource  # noqa: E402
from standby.replication.digest import BLOCK_SIZE, hash_file  # noqa: E402
from standby.replication.sender import AdaptiveCompression, AgentLink, SenderOptions, run_cycle  # noqa: E402
from standby.replication.store import ReplicaStore  # noqa: E402

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.Identity]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _digest(path: Path) -> str:
    return hash_file(path).disk_digest().hex()


def test_link_keeps_its_streams_between_cycles(tmp_path: Path, pki: dict[str, tls.Identity]) -> None:
    img = tmp_path / "src.img"
    make_image(img, 16 * MiB)
    ctx = tls.client_context(pki["sender"])
    with running_agent(tmp_path / "store", pki["agent"]) as rx:
        with AgentLink(endpoint(rx), ctx, "d", SenderOptions(streams=3, state_dir=tmp_path / "state")) as link:
            seed = link.run_cycle(FullSource(img))
            assert seed.digest == _digest(img) and not seed.reused_link
            connections = rx.stats["connections"]
            assert connections == 3
            for n in range(3):
                changed = change_blocks(img, 20, seed=10 + n)
                r = link.run_cycle(ExtentSource(img, [(i * BLOCK_SIZE, BLOCK_SIZE) for i in changed]))
                assert r.reused_link and r.streams == 3
                assert r.digest == _digest(img)
                assert r.baseline_from == "sender state"
                assert 0 < r.wire_bytes < 21 * BLOCK_SIZE
            change_blocks(img, 5, seed=20)
            scan = link.run_cycle(HashScanSource(img))
            assert scan.reused_link and scan.digest == _digest(img)
            assert rx.stats["connections"] == connections  # no new connection after the first cycle
    disk = ReplicaStore(tmp_path / "store").disk("d")
    assert len(disk.points()) == 5
    assert disk.verify(disk.latest().id).ok


def test_link_reconnects_after_the_agent_restarted(tmp_path: Path, pki: dict[str, tls.Identity]) -> None:
    img = tmp_path / "src.img"
    make_image(img, 8 * MiB)
    ctx = tls.client_context(pki["sender"])
    with running_agent(tmp_path / "store", pki["agent"]) as rx:
        link = AgentLink(endpoint(rx), ctx, "d", SenderOptions(streams=2, state_dir=tmp_path / "state"))
        link.run_cycle(FullSource(img))
        port = rx.address[1]
    try:
        # a new agent process on the same port: the link's connections are dead
        from standby.replication.receiver import Receiver

        rx2 = Receiver(ReplicaStore(tmp_path / "store"), tls.server_context(pki["agent"]), "127.0.0.1", port).start()
        try:
            changed = change_blocks(img, 10, seed=3)
            r = link.run_cycle(ExtentSource(img, [(i * BLOCK_SIZE, BLOCK_SIZE) for i in changed]))
            assert r.digest == _digest(img) and not r.reused_link
            r2 = link.run_cycle(HashScanSource(img))
            assert r2.reused_link and r2.data_blocks == 0
        finally:
            rx2.stop()
    finally:
        link.close()


def test_link_refuses_extents_when_the_replica_moved_meanwhile(tmp_path: Path,
                                                              pki: dict[str, tls.Identity]) -> None:
    img = tmp_path / "src.img"
    make_image(img, 8 * MiB)
    ctx = tls.client_context(pki["sender"])
    with running_agent(tmp_path / "store", pki["agent"]) as rx:
        link = AgentLink(endpoint(rx), ctx, "d", SenderOptions(streams=1, state_dir=tmp_path / "state"))
        try:
            link.run_cycle(FullSource(img))
            link.close()
            change_blocks(img, 4, seed=5)
            run_cycle(HashScanSource(img), endpoint(rx), ctx, "d")  # another sender moved the replica
            changed = change_blocks(img, 4, seed=6)
            with pytest.raises(Conflict, match="hash scan"):
                link.run_cycle(ExtentSource(img, [(i * BLOCK_SIZE, BLOCK_SIZE) for i in changed]))
            assert link.run_cycle(HashScanSource(img)).digest == _digest(img)
        finally:
            link.close()


def test_adaptive_compression_policy() -> None:
    a = AdaptiveCompression()
    for _ in range(5):  # the link keeps up: never compressed
        a.decide(500e6, 0.05)
    assert not a.on
    a.decide(10e6, 0.9)  # back-pressured: try compressing
    assert a.on and a.probing
    a.decide(25e6, 0.9)  # compressed data goes faster: keep it
    assert a.on and not a.probing
    a.decide(25e6, 0.9)
    a.decide(25e6, 0.9)  # after `hold` windows, re-measure raw
    assert not a.on and a.probing
    a.decide(10e6, 0.9)  # raw is still slower: back to compressing, probe less often
    assert a.on and a.hold == 4
    b = AdaptiveCompression()
    b.decide(100e6, 0.5)
    b.decide(60e6, 0.2)  # compressing made it slower (CPU-bound): back to raw
    assert not b.on and b.hold == 2
    # a link faster than the compressor (4 streams of 120 MB/s raw; zstd takes 300 MB/s):
    # even when a probe looks faster (noise), raw data it is, and no more probes
    c = AdaptiveCompression(streams=4)
    c.decide(120e6, 0.6)
    assert c.on and c.probing
    c.decide(130e6, 0.6, cspeed=300e6)
    assert not c.on
    for _ in range(10):
        c.decide(120e6, 0.9)
        assert not c.on
    # the same compressor on a slow link: compressed
    d = AdaptiveCompression(streams=4)
    d.decide(3e6, 0.95)
    d.decide(8e6, 0.9, cspeed=300e6)
    assert d.on and not d.probing


def test_auto_compression_over_a_limited_link(tmp_path: Path, pki: dict[str, tls.Identity],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AdaptiveCompression, "WINDOW", 256 * 1024)
    img = tmp_path / "src.img"
    make_image(img, 24 * MiB)  # 12 MiB of blocks that compress about 2:1
    ctx = tls.client_context(pki["sender"])
    with running_agent(tmp_path / "store", pki["agent"]) as rx:
        fast = run_cycle(FullSource(img), endpoint(rx), ctx, "fast", SenderOptions(streams=1))
        assert fast.digest == _digest(img)
        slow = run_cycle(FullSource(img), endpoint(rx), ctx, "slow",
                         SenderOptions(streams=1, schedule=Schedule.parse("00:00-24:00=6MiB/s")))
        assert slow.digest == _digest(img)
        assert slow.compressed_blocks > slow.data_blocks // 2  # the limited link got compressed data
        # and it carried less than the raw blocks (whatever the fast run did under load)
        assert slow.wire_bytes < 0.8 * slow.data_blocks * BLOCK_SIZE, slow
