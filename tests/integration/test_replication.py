"""End to end over loopback mutual TLS with the real replica store: seed, extent and
hash-scan cycles, several streams, a bandwidth limit, a cut connection and a resumed
seed, offline seeds, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from replication_helpers import (  # noqa: E402
    CuttingProxy,
    change_blocks,
    endpoint,
    make_image,
    make_pki,
    qemu_compare,
    running_agent,
)

from standby.domain.bandwidth import Schedule  # noqa: E402
from standby.errors import Conflict, RemoteError  # noqa: E402
from standby.replication import tls  # noqa: E402
from standby.replication.changes import ExtentSource, FullSource, HashScanSource  # noqa: E402
from standby.replication.digest import BLOCK_SIZE, hash_file  # noqa: E402
from standby.replication.protocol import Consistency  # noqa: E402
from standby.replication.seeding import export_image_seed  # noqa: E402
from standby.replication.sender import SenderOptions, run_cycle  # noqa: E402
from standby.replication.store import ReplicaStore  # noqa: E402

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.Identity]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _digest(path: Path) -> str:
    return hash_file(path).disk_digest().hex()


def _assert_point_equals(store: Path, disk_id: str, point_id: str, image: Path, tmp: Path) -> None:
    disk = ReplicaStore(store).disk(disk_id)
    overlay = tmp / f"check-{point_id}.qcow2"
    disk.materialize(point_id, overlay)
    try:
        res = qemu_compare(image, overlay)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        disk.release(overlay)
        overlay.unlink()


def test_seed_then_extent_then_hash_scan(tmp_path: Path, pki: dict[str, tls.Identity]) -> None:
    img = tmp_path / "src.img"
    make_image(img, 64 * MiB)
    ctx = tls.client_context(pki["sender"])
    state = tmp_path / "state"
    with running_agent(tmp_path / "store", pki["agent"]) as rx:
        ep = endpoint(rx)
        seed = run_cycle(FullSource(img), ep, ctx, "vm1-d0", SenderOptions(state_dir=state, compress="on"))
        assert seed.digest == _digest(img)
        assert seed.point_id == "0000000001" and seed.kind == "seed"
        assert seed.data_blocks == 512 and seed.zero_blocks == 0  # zero blocks of an empty replica cost nothing
        assert seed.wire_bytes < 20 * MiB  # 32 MiB of data compresses about 2:1
        shutil.copy(img, tmp_path / "at-seed.img")

        changed = change_blocks(img, 100)
        delta = run_cycle(ExtentSource(img, [(i * BLOCK_SIZE, BLOCK_SIZE) for i in changed]), ep, ctx, "vm1-d0",
                          SenderOptions(state_dir=state, consistency=Consistency.APP, meta={"vm": "vm1"}))
        assert delta.digest == _digest(img)
        assert delta.baseline_from == "sender state"
        assert delta.bytes_read == 100 * BLOCK_SIZE
        assert delta.data_blocks + delta.zero_blocks + delta.skipped_blocks == 100
        assert delta.zero_blocks > 0  # blocks that became zero travel as ZERO_RUN
        assert delta.wire_bytes < 100 * BLOCK_SIZE * 1.1

        again = change_blocks(img, 30, seed=3)
        # a new sender without state (lost tracking): the agent's digest table is fetched
        scan = run_cycle(HashScanSource(img), ep, ctx, "vm1-d0", SenderOptions(state_dir=tmp_path / "fresh"))
        assert scan.digest == _digest(img)
        assert scan.baseline_from == "fetched from agent"
        assert scan.data_blocks + scan.zero_blocks <= 30
        assert scan.data_blocks + scan.zero_blocks >= len(again) - 10  # some may be rewritten zero over zero
        assert scan.wire_bytes < 30 * BLOCK_SIZE * 1.1 + 512 * 1024

    disk = ReplicaStore(tmp_path / "store").disk("vm1-d0")
    points = disk.points()
    assert [p.id for p in points] == ["0000000001", "0000000002", "0000000003"]
    assert points[1].consistency == "app" and points[1].meta["vm"] == "vm1"
    assert points[-1].digest == _digest(img)
    assert disk.verify(points[-1].id).ok
    _assert_point_equals(tmp_path / "store", "vm1-d0", points[-1].id, img, tmp_path)
    _assert_point_equals(tmp_path / "store", "vm1-d0", points[0].id, tmp_path / "at-seed.img", tmp_path)


@pytest.mark.parametrize("streams", [1, 3, 8])
def test_streams(tmp_path: Path, pki: dict[str, tls.Identity], streams: int) -> None:
    img = tmp_path / "src.img"
    make_image(img, 16 * MiB + 12345 * 512)  # a short last block
    with running_agent(tmp_path / "store", pki["agent"]) as rx:
        r = run_cycle(FullSource(img), endpoint(rx), tls.client_context(pki["sender"]), "d",
                      SenderOptions(streams=streams, chunk_blocks=4))
        assert r.streams == streams
        assert r.digest == _digest(img)
        change_blocks(img, 20)
        r2 = run_cycle(HashScanSource(img), endpoint(rx), tls.client_context(pki["sender"]), "d",
                       SenderOptions(streams=streams))
        assert r2.digest == _digest(img)
    _assert_point_equals(tmp_path / "store", "d", r2.point_id, img, tmp_path)


def test_uncompressible_data_and_no_compression(tmp_path: Path, pki: dict[str, tls.Identity]) -> None:
    img = tmp_path / "src.img"
    img.write_bytes(os.urandom(8 * MiB))
    with running_agent(tmp_path / "store", pki["agent"]) as rx:
        r = run_cycle(FullSource(img), endpoint(rx), tls.client_context(pki["sender"]), "rand",
                      SenderOptions(compress=True))
        assert r.digest == _digest(img)
        assert r.payload_bytes == 8 * MiB  # blocks that do not shrink are sent raw
        img2 = tmp_path / "src2.img"
        make_image(img2, 8 * MiB)
        r2 = run_cycle(FullSource(img2), endpoint(rx), tls.client_context(pki["sender"]), "plain",
                       SenderOptions(compress=False))
        assert r2.digest == _digest(img2)
        assert r2.payload_bytes == 4 * MiB


def test_bandwidth_limit(tmp_path: Path, pki: dict[str, tls.Identity]) -> None:
    img = tmp_path / "src.img"
    img.write_bytes(os.urandom(12 * MiB))
    with running_agent(tmp_path / "store", pki["agent"]) as rx:
        t0 = time.monotonic()
        r = run_cycle(FullSource(img), endpoint(rx), tls.client_context(pki["sender"]), "bw",
                      SenderOptions(schedule=Schedule.parse("00:00-24:00=8MiB/s")))
        elapsed = time.monotonic() - t0
    # 12 MiB at 8 MiB/s with a 2 MiB burst: about 1.25 s (unlimited: well under 0.3 s)
    assert 0.9 < elapsed < 6, elapsed
    assert r.throttled_seconds > 0.5


def test_cut_connection_resumes_the_seed(tmp_path: Path, pki: dict[str, tls.Identity]) -> None:
    img = tmp_path / "src.img"
    img.write_bytes(os.urandom(24 * MiB))
    ctx = tls.client_context(pki["sender"])
    with running_agent(tmp_path / "store", pki["agent"], checkpoint_interval=0.05) as rx:
        proxy = CuttingProxy(("127.0.0.1", rx.address[1]), budget=14 * MiB)
        try:
            with pytest.raises(RemoteError):
                run_cycle(FullSource(img), f"127.0.0.1:{proxy.address[1]}", ctx, "seedme",
                          SenderOptions(state_dir=tmp_path / "state1", streams=4))
        finally:
            proxy.close()
        disk = ReplicaStore(tmp_path / "store").disk("seedme")
        assert disk.latest() is None  # no point from a broken cycle
        # resume from another sender state: the agent itself reports the staged cycle
        r = run_cycle(FullSource(img), endpoint(rx), ctx, "seedme", SenderOptions(state_dir=tmp_path / "state2"))
    assert r.resumed and r.resumed_blocks > 0
    assert r.wire_bytes < 24 * MiB - r.resumed_blocks * BLOCK_SIZE + MiB
    assert r.data_blocks + r.resumed_blocks == 24 * MiB // BLOCK_SIZE
    assert r.digest == _digest(img)
    assert ReplicaStore(tmp_path / "store").disk("seedme").verify(r.point_id).ok


def test_cut_delta_leaves_the_previous_point(tmp_path: Path, pki: dict[str, tls.Identity]) -> None:
    img = tmp_path / "src.img"
    make_image(img, 32 * MiB)
    ctx = tls.client_context(pki["sender"])
    state = tmp_path / "state"
    with running_agent(tmp_path / "store", pki["agent"]) as rx:
        first = run_cycle(FullSource(img), endpoint(rx), ctx, "d", SenderOptions(state_dir=state))
        changed = change_blocks(img, 200, zero_some=False)
        extents = [(i * BLOCK_SIZE, BLOCK_SIZE) for i in changed]
        proxy = CuttingProxy(("127.0.0.1", rx.address[1]), budget=4 * MiB)
        try:
            with pytest.raises(RemoteError):
                run_cycle(ExtentSource(img, extents), f"127.0.0.1:{proxy.address[1]}", ctx, "d",
                          SenderOptions(state_dir=state))
        finally:
            proxy.close()
        disk = ReplicaStore(tmp_path / "store").disk("d")
        assert disk.latest().id == first.point_id
        assert disk.latest().digest == first.digest
        again = run_cycle(ExtentSource(img, extents), endpoint(rx), ctx, "d", SenderOptions(state_dir=state))
        assert again.digest == _digest(img)
        assert again.bytes_read == 200 * BLOCK_SIZE  # a delta, not a full copy


def test_seed_refused_over_existing_points_and_delta_needs_a_base(tmp_path: Path,
                                                                   pki: dict[str, tls.Identity]) -> None:
    img = tmp_path / "src.img"
    make_image(img, 4 * MiB)
    ctx = tls.client_context(pki["sender"])
    with running_agent(tmp_path / "store", pki["agent"]) as rx:
        with pytest.raises(Conflict, match="seed it first"):
            run_cycle(ExtentSource(img, [(0, 1)]), endpoint(rx), ctx, "d")
        run_cycle(FullSource(img), endpoint(rx), ctx, "d")
        with pytest.raises(Conflict, match="already has recovery point"):
            run_cycle(FullSource(img), endpoint(rx), ctx, "d")
        smaller = tmp_path / "smaller.img"
        make_image(smaller, 2 * MiB)
        with pytest.raises(Conflict, match="shrinking"):
            run_cycle(HashScanSource(smaller), endpoint(rx), ctx, "d")
        # growing is allowed: a hash scan of the grown disk sends what differs from zeros
        with img.open("r+b") as f:
            f.truncate(8 * MiB)
            f.seek(6 * MiB)
            f.write(os.urandom(BLOCK_SIZE))
        r = run_cycle(HashScanSource(img), endpoint(rx), ctx, "d")
        assert r.digest == _digest(img) and r.data_blocks == 1
        disk = ReplicaStore(tmp_path / "store").disk("d")
        assert disk.size == 8 * MiB and disk.verify(r.point_id).ok
        assert [disk.point_size(p) for p in disk.points()] == [4 * MiB, 8 * MiB]


def test_offline_seed_then_catch_up(tmp_path: Path, pki: dict[str, tls.Identity]) -> None:
    img = tmp_path / "src.img"
    make_image(img, 32 * MiB)
    state = tmp_path / "state"
    info = export_image_seed(img, tmp_path / "seed", "vm7-d0", state)
    assert info["data_bytes"] == 16 * MiB and info["digest"] == _digest(img)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # scratch store removed
    point = ReplicaStore(tmp_path / "store").import_seed(tmp_path / "seed")
    assert point.digest == info["digest"]
    changed = change_blocks(img, 50)
    with running_agent(tmp_path / "store", pki["agent"]) as rx:
        r = run_cycle(ExtentSource(img, [(i * BLOCK_SIZE, BLOCK_SIZE) for i in changed]), endpoint(rx),
                      tls.client_context(pki["sender"]), "vm7-d0", SenderOptions(state_dir=state))
    assert r.baseline_from == "sender state"
    assert r.base_point == point.id
    assert r.digest == _digest(img)


def _cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "standby.cli.main", *args], capture_output=True, text=True,
                         env=env, timeout=120)
    if check:
        assert res.returncode == 0, f"{args}: rc {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


@pytest.mark.slow  # about 10 s: a dozen CLI processes
def test_cli(tmp_path: Path) -> None:
    env = dict(os.environ, COLUMNS="200", STANDBY_SENDER_STATE=str(tmp_path / "state"))
    _cli("ca", "init", str(tmp_path / "ca"), env=env)
    _cli("ca", "issue", str(tmp_path / "ca"), "agent", "--san", "127.0.0.1", env=env)
    _cli("ca", "issue", str(tmp_path / "ca"), "sender", "--san", "127.0.0.1", env=env)
    ca = str(tmp_path / "ca" / "ca.crt")
    agent = subprocess.Popen([sys.executable, "-m", "standby.cli.main", "agent", "receive", "--listen", "127.0.0.1:0",
                              "--store", str(tmp_path / "store"), "--cert", str(tmp_path / "ca" / "agent.crt"),
                              "--key", str(tmp_path / "ca" / "agent.key"), "--ca", ca],
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert agent.stderr is not None
        line = agent.stderr.readline()
        assert "agent listening on 127.0.0.1:" in line, line
        port = line.split("127.0.0.1:")[1].split(",")[0]
        env.update(STANDBY_TLS_CERT=str(tmp_path / "ca" / "sender.crt"),
                   STANDBY_TLS_KEY=str(tmp_path / "ca" / "sender.key"), STANDBY_TLS_CA=ca)
        img = tmp_path / "disk.img"
        make_image(img, 8 * MiB)
        to = f"127.0.0.1:{port}"
        out = _cli("replicate", str(img), "--to", to, "--disk-id", "web1-d0", "--json", env=env)
        seed = json.loads(out.stdout)
        assert seed["kind"] == "seed" and seed["digest"] == _digest(img)
        changed = change_blocks(img, 10)
        ext = tmp_path / "changed.txt"
        ext.write_text("".join(f"{i * BLOCK_SIZE} {BLOCK_SIZE}\n" for i in changed))
        out = _cli("replicate", str(img), "--to", to, "--disk-id", "web1-d0", "--changed-extents", str(ext),
                   "--streams", "2", "--bwlimit", "100MiB/s", env=env)
        assert "point" in out.stdout and "0000000002" in out.stdout and "sent on wire" in out.stdout
        change_blocks(img, 5, seed=9)
        out = _cli("replicate", str(img), "--to", to, "--disk-id", "web1-d0", "--hash-scan", "--json",
                   "--schedule", "08:00-18:00=50MiB/s, otherwise unlimited", env=env)
        assert json.loads(out.stdout)["digest"] == _digest(img)
        bad = _cli("replicate", str(img), "--to", to, "--disk-id", "web1-d0", "--seed", env=env, check=False)
        assert bad.returncode == 4 and "already has recovery point" in bad.stderr
        assert "Traceback" not in bad.stderr
        bad = _cli("replicate", str(img), "--to", to, "--disk-id", "x", "--bwlimit", "fast", env=env, check=False)
        assert bad.returncode == 2 and "cannot read rate" in bad.stderr
        bad = _cli("replicate", str(img), "--to", "127.0.0.1:1", "--disk-id", "x", env=env, check=False)
        assert bad.returncode == 5 and "cannot connect" in bad.stderr
    finally:
        agent.terminate()
        _, err = agent.communicate(timeout=20)
    assert agent.returncode == 0, err
    assert err.count("committed") == 3  # one line per cycle

    out = _cli("points", "list", "--store", str(tmp_path / "store"), "--disk-id", "web1-d0", "--json", env=env)
    pts = json.loads(out.stdout)
    assert [p["id"] for p in pts] == ["0000000001", "0000000002", "0000000003"]
    assert pts[-1]["digest"] == _digest(img)
    out = _cli("points", "list", "--store", str(tmp_path / "store"), "--disk-id", "web1-d0", env=env)
    assert "0000000003" in out.stdout and "crash" in out.stdout
    out = _cli("points", "verify", "--store", str(tmp_path / "store"), "--disk-id", "web1-d0", "--all", env=env)
    assert out.stdout.count("OK") == 3
    bad = _cli("points", "list", "--store", str(tmp_path / "store"), "--disk-id", "nope", env=env, check=False)
    assert bad.returncode == 3

    # offline seed: export on the primary, import on the secondary
    _cli("seed", "export", str(img), str(tmp_path / "seed"), "--disk-id", "web2-d0", env=env)
    out = _cli("seed", "import", str(tmp_path / "seed"), "--store", str(tmp_path / "store2"), "--json", env=env)
    assert json.loads(out.stdout)["digest"] == _digest(img)


def test_resumed_seed_of_a_changed_image_starts_over(tmp_path: Path, pki: dict[str, tls.Identity]) -> None:
    img = tmp_path / "src.img"
    img.write_bytes(os.urandom(16 * MiB))
    ctx = tls.client_context(pki["sender"])
    with running_agent(tmp_path / "store", pki["agent"], checkpoint_interval=0.05) as rx:
        proxy = CuttingProxy(("127.0.0.1", rx.address[1]), budget=10 * MiB)
        try:
            with pytest.raises(RemoteError):
                run_cycle(FullSource(img), f"127.0.0.1:{proxy.address[1]}", ctx, "s", SenderOptions(streams=1))
        finally:
            proxy.close()
        with open(img, "r+b") as f:  # the staged first blocks are now stale
            f.write(os.urandom(4 * BLOCK_SIZE))
        r = run_cycle(FullSource(img), endpoint(rx), ctx, "s", SenderOptions(streams=2))
        assert rx.stats["failed_cycles"] == 2  # the cut, then the stale resume refused by its digest
    assert not r.resumed  # the agent refused the stale resume by digest; the seed ran again whole
    assert r.digest == _digest(img)
    assert ReplicaStore(tmp_path / "store").disk("s").verify(r.point_id).ok


def test_cli_replicate_timeout_option(tmp_path: Path) -> None:
    """`--timeout SECONDS` sets the sender's I/O timeout: an agent that accepts the TCP
    connection and then says nothing is given up on after that long (default 60 s)."""
    import socket

    env = dict(os.environ, COLUMNS="200", STANDBY_SENDER_STATE=str(tmp_path / "state"))
    helptext = _cli("replicate", "--help", env=env).stdout
    assert "--timeout" in helptext and "SECONDS" in helptext
    _cli("ca", "init", str(tmp_path / "ca"), env=env)
    _cli("ca", "issue", str(tmp_path / "ca"), "sender", "--san", "127.0.0.1", env=env)
    env.update(STANDBY_TLS_CERT=str(tmp_path / "ca" / "sender.crt"),
               STANDBY_TLS_KEY=str(tmp_path / "ca" / "sender.key"), STANDBY_TLS_CA=str(tmp_path / "ca" / "ca.crt"))
    img = tmp_path / "disk.img"
    make_image(img, 1 * MiB)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # never accepts: no TLS answer
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        bad = _cli("replicate", str(img), "--to", f"127.0.0.1:{port}", "--disk-id", "x", "--seed",
                   "--timeout", "2", env=env, check=False)
        elapsed = time.monotonic() - t0
    assert bad.returncode == 5, bad.stderr
    assert "Traceback" not in bad.stderr
    assert elapsed < 15, elapsed
