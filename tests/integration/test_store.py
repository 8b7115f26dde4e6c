"""The replica store on real files, checked with qemu-img: points, resume, crashes, pruning."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from store_helpers import (  # noqa: E402
    N,
    SIZE,
    Model,
    assert_check,
    assert_same,
    qemu_img,
    random_changes,
    run_cycle,
    stage,
)

from standby.domain.retention import RetentionPolicy  # noqa: E402
from standby.errors import BadInput, Conflict, IntegrityError, NotFound  # noqa: E402
from standby.replication import store as store_mod  # noqa: E402
from standby.replication.digest import BLOCK_SIZE, block_length  # noqa: E402
from standby.replication.store import ReplicaStore  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")

WORKER = Path(__file__).parent / "store_crash_worker.py"


def make_points(tmp_path: Path, count: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """A disk with `count` points; returns (store, disk, {point id: raw snapshot path})."""
    rng = random.Random(seed)
    store = ReplicaStore(tmp_path / "root")
    disk = store.create_disk("vm", SIZE)
    model = Model()
    snaps = {}
    for c in range(count):
        changes = random_changes(rng, k=40 if c == 0 else None)
        p = run_cycle(disk, model, changes, f"c{c}", "app" if c % 4 == 1 else "crash", 1000.0 + c * 600)
        snaps[p.id] = model.write_raw(tmp_path / f"raw-{p.id}")
    return store, disk, snaps, model


def assert_points_match(disk, snaps) -> None:  # type: ignore[no-untyped-def]
    for p in disk.points():
        assert_check(p.layer)
        assert_same(p.layer, snaps[p.id])
        v = disk.verify(p.id)
        assert v.ok, v


# -- basics -------------------------------------------------------------------------------

def test_disks_create_open_and_errors(tmp_path: Path) -> None:
    store = ReplicaStore(tmp_path)
    d = store.create_disk("vm-1", SIZE)
    assert store.create_disk("vm-1", SIZE) is d
    with pytest.raises(Conflict):
        store.create_disk("vm-1", SIZE + 512)
    with pytest.raises(BadInput):
        store.create_disk("../x", SIZE)
    with pytest.raises(BadInput):
        store.create_disk("y", 1000)
    with pytest.raises(NotFound):
        store.disk("nope")
    assert store.disks() == ["vm-1"]
    assert ReplicaStore(tmp_path).disk("vm-1").size == SIZE
    assert d.latest() is None and d.points() == []
    assert d.block_hashes().disk_digest() == Model().digest()


def test_seed_and_deltas_every_point_equals_its_image(tmp_path: Path) -> None:
    store, disk, snaps, model = make_points(tmp_path, 6)
    pts = disk.points()
    assert [p.id for p in pts] == sorted(snaps) and [p.seq for p in pts] == [1, 2, 3, 4, 5, 6]
    assert pts[1].consistency == "app" and pts[0].consistency == "crash"
    assert pts[0].blocks_changed == 40 and pts[0].meta == {"cycle": "c0"}
    assert_points_match(disk, snaps)
    info = qemu_img("info", "--backing-chain", "--output=json", str(pts[-1].layer))
    chain = json.loads(info.stdout)
    assert [Path(c["filename"]).name for c in chain] == [p.layer.name for p in reversed(pts)]
    assert disk.block_hashes().to_bytes() == model.table().to_bytes()
    # a fresh process view: hash table from the hash files
    d2 = ReplicaStore(tmp_path / "root").disk("vm")
    assert d2.block_hashes().to_bytes() == model.table().to_bytes()
    assert [p.id for p in d2.points()] == [p.id for p in pts]


def test_hash_table_rebuilt_when_hash_files_are_lost_or_corrupt(tmp_path: Path) -> None:
    _store, disk, _snaps, model = make_points(tmp_path, 4)
    hashes = tmp_path / "root/disks/vm/hashes"
    for f in hashes.iterdir():
        f.write_bytes(b"garbage")
    assert ReplicaStore(tmp_path / "root").disk("vm").block_hashes().to_bytes() == model.table().to_bytes()
    shutil.rmtree(hashes)
    hashes.mkdir()
    assert ReplicaStore(tmp_path / "root").disk("vm").block_hashes().to_bytes() == model.table().to_bytes()


def test_full_hash_snapshots_rotate(tmp_path: Path) -> None:
    store = ReplicaStore(tmp_path)
    disk = store.create_disk("vm", SIZE)
    model = Model()
    rng = random.Random(4)
    for c in range(12):
        run_cycle(disk, model, random_changes(rng, k=10), f"c{c}")
    files = sorted(f.name for f in (tmp_path / "disks/vm/hashes").iterdir())
    fulls = [f for f in files if f.endswith(".full")]
    assert len(fulls) == 1 and fulls[0] != "0000000001.full"
    assert len(files) < 12
    assert ReplicaStore(tmp_path).disk("vm").block_hashes().to_bytes() == model.table().to_bytes()


def test_begin_cycle_refuses_a_stale_base(tmp_path: Path) -> None:
    _store, disk, _snaps, _m = make_points(tmp_path, 2)
    with pytest.raises(Conflict):
        disk.begin_cycle("x", None)
    with pytest.raises(Conflict):
        disk.begin_cycle("x", disk.points()[0].id)
    with pytest.raises(Conflict):
        disk.begin_cycle("c1", disk.latest().id)  # already committed
    with pytest.raises(BadInput):
        disk.begin_cycle("bad/name", disk.latest().id)


def test_write_validation(tmp_path: Path) -> None:
    disk = ReplicaStore(tmp_path).create_disk("vm", SIZE)
    w = disk.begin_cycle("c", None)
    with pytest.raises(BadInput):
        w.write(1, b"x" * BLOCK_SIZE)
    with pytest.raises(BadInput):
        w.write(0, b"x" * 10)
    with pytest.raises(BadInput):
        w.write((N - 1) * BLOCK_SIZE, b"x" * BLOCK_SIZE)  # last block is short
    with pytest.raises(BadInput):
        w.write(N * BLOCK_SIZE, b"x" * BLOCK_SIZE)
    with pytest.raises(BadInput):
        w.write_zero(0, BLOCK_SIZE + 1)
    with pytest.raises(BadInput):
        w.write_zero(0, SIZE + BLOCK_SIZE)
    w.write_zero((N - 1) * BLOCK_SIZE, block_length(SIZE, N - 1))
    with pytest.raises(BadInput):
        w.commit(b"short", "crash", 0.0, {})
    with pytest.raises(BadInput):
        w.commit(bytes(16), "weird", 0.0, {})
    w.abort()
    assert not (tmp_path / "disks/vm/staging/c").exists()


def test_zero_data_is_stored_as_zero_clusters(tmp_path: Path) -> None:
    disk = ReplicaStore(tmp_path).create_disk("vm", SIZE)
    model = Model()
    p = run_cycle(disk, model, {i: bytes(block_length(SIZE, i)) for i in range(N)}, "c")
    assert p.bytes_changed == 0 and p.blocks_changed == N
    assert p.layer.stat().st_size < 8 * BLOCK_SIZE
    assert disk.verify(p.id).ok


def test_threaded_writes_out_of_order(tmp_path: Path) -> None:
    disk = ReplicaStore(tmp_path).create_disk("vm", SIZE)
    model = Model()
    rng = random.Random(9)
    changes = {i: rng.randbytes(block_length(SIZE, i)) for i in range(N)}
    w = disk.begin_cycle("c", None)
    w.checkpoint_bytes = 5 * BLOCK_SIZE  # checkpoints race with writes
    order = list(changes)
    rng.shuffle(order)
    errors: list[BaseException] = []

    def worker(part: list[int]) -> None:
        try:
            for i in part:
                w.write(i * BLOCK_SIZE, rng.randbytes(block_length(SIZE, i)))  # superseded below
                w.write(i * BLOCK_SIZE, changes[i])
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(order[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    model.apply(changes)
    p = w.commit(model.digest(), "crash", 1.0, {})
    assert_check(p.layer)
    assert_same(p.layer, model.write_raw(tmp_path / "raw"))


# -- resume -------------------------------------------------------------------------------

def test_interrupted_seed_resumes_where_it_stopped(tmp_path: Path) -> None:
    rng = random.Random(2)
    changes = {i: rng.randbytes(block_length(SIZE, i)) for i in range(N) if i % 5}
    changes.update({i: None for i in range(0, N, 10)})
    items = list(changes.items())
    store = ReplicaStore(tmp_path)
    disk = store.create_disk("vm", SIZE)
    w = disk.begin_cycle("seed", None)
    stage(w, dict(items[:30]))
    w.checkpoint()
    stage(w, dict(items[30:40]))  # never checkpointed: lost with the "crash"
    durable = {i for i, _ in items[:30]}
    assert set(w.received) == durable
    # the receiver process dies: a new process opens the store
    disk2 = ReplicaStore(tmp_path).disk("vm")
    w2 = disk2.begin_cycle("seed", None)
    assert set(w2.received) == durable
    stage(w2, {i: d for i, d in changes.items() if i not in w2.received})
    model = Model()
    model.apply(changes)
    p = w2.commit(model.digest(), "crash", 5.0, {})
    assert_same(p.layer, model.write_raw(tmp_path / "raw"))
    assert disk2.verify(p.id).ok
    assert not any((tmp_path / "disks/vm/staging").iterdir())


def test_resume_in_the_same_process_supersedes_the_old_writer(tmp_path: Path) -> None:
    disk = ReplicaStore(tmp_path).create_disk("vm", SIZE)
    w = disk.begin_cycle("seed", None)
    w.write(0, b"a" * BLOCK_SIZE)
    w2 = disk.begin_cycle("seed", None)  # reconnect: the old writer is checkpointed and closed
    assert set(w2.received) == {0}
    with pytest.raises(Conflict):
        w.write(BLOCK_SIZE, b"b" * BLOCK_SIZE)
    w3 = disk.begin_cycle("other", None)  # another cycle discards the staged one
    assert len(w3.received) == 0
    assert [p.name for p in (tmp_path / "disks/vm/staging").iterdir()] == ["other"]


def test_resume_drops_staged_blocks_that_do_not_match(tmp_path: Path) -> None:
    disk = ReplicaStore(tmp_path).create_disk("vm", SIZE)
    w = disk.begin_cycle("seed", None)
    for i in range(10):
        w.write(i * BLOCK_SIZE, bytes([i + 1]) * BLOCK_SIZE)
    w.checkpoint()
    data = tmp_path / "disks/vm/staging/seed/data.qcow2"
    with open(data, "r+b") as f:  # corrupt the cluster of one block (clusters are in write order)
        f.seek(4 * BLOCK_SIZE + 100)
        f.write(b"\xff\xfe")
    w2 = ReplicaStore(tmp_path).disk("vm").begin_cycle("seed", None)
    assert set(w2.received) == set(range(10)) - {3}


# -- integrity and crashes ----------------------------------------------------------------

def test_digest_mismatch_discards_the_cycle_and_keeps_the_point(tmp_path: Path) -> None:
    _store, disk, snaps, model = make_points(tmp_path, 2)
    before = disk.latest()
    w = disk.begin_cycle("bad", before.id)
    stage(w, {3: b"z" * BLOCK_SIZE})
    with pytest.raises(IntegrityError):
        w.commit(model.digest(), "crash", 9.0, {})  # the source says nothing changed
    assert disk.latest() == before
    assert not (tmp_path / "root/disks/vm/staging/bad").exists()
    assert_points_match(ReplicaStore(tmp_path / "root").disk("vm"), snaps)
    run_cycle(disk, model, {3: b"y" * BLOCK_SIZE}, "good")
    assert disk.verify(disk.latest().id).ok


def _finish_cycle_after_crash(tmp_path: Path, root: Path, base_model: Model,
                              changes: dict[int, bytes | None], cycle_id: str) -> None:
    disk = ReplicaStore(root).disk("vm")
    latest = disk.latest()
    w = disk.begin_cycle(cycle_id, latest.id)
    stage(w, {i: d for i, d in changes.items() if i not in w.received})
    m = Model()
    m.raw[:] = base_model.raw
    m.apply(changes)
    p = w.commit(m.digest(), "crash", 99.0, {})
    assert_same(p.layer, m.write_raw(tmp_path / "raw-final"))
    assert disk.verify(p.id).ok


def test_garbled_or_truncated_staging_at_many_positions(tmp_path: Path) -> None:
    _store, disk, _snaps, model = make_points(tmp_path, 2)
    root = tmp_path / "root"
    rng = random.Random(21)
    changes = random_changes(rng, k=25)
    w = disk.begin_cycle("next", disk.latest().id)
    stage(w, changes)
    w.checkpoint()
    w._close()
    pristine = tmp_path / "pristine"
    shutil.copytree(root, pristine)
    sdir = "disks/vm/staging/next"
    files = {name: (pristine / sdir / name).read_bytes() for name in ("journal", "data.qcow2", "cycle.json")}
    cases = []
    for name, data in files.items():
        for pos in sorted(rng.sample(range(len(data)), 8)) + [0, len(data) // 2, len(data) - 1]:
            cases.append((name, "truncate", pos))
            cases.append((name, "garble", pos))
    for name, how, pos in cases:
        shutil.rmtree(root)
        shutil.copytree(pristine, root)
        target = root / sdir / name
        data = bytearray(files[name])
        if how == "truncate":
            target.write_bytes(data[:pos])
        else:
            data[pos] ^= 0x5A
            target.write_bytes(data)
        reopened = ReplicaStore(root).disk("vm")
        assert reopened.latest().id == disk.latest().id
        assert reopened.verify(reopened.latest().id).ok, (name, how, pos)
        _finish_cycle_after_crash(tmp_path, root, model, changes, "next")


def test_half_written_layers_and_temp_files_are_cleaned_on_open(tmp_path: Path) -> None:
    _store, disk, snaps, _model = make_points(tmp_path, 3)
    root = tmp_path / "root/disks/vm"
    layer = disk.latest().layer.read_bytes()
    for k, cut in enumerate([0, 100, 4096, BLOCK_SIZE + 5, len(layer) - 1, len(layer)]):
        (root / f"layers/{9000 + k:010d}.qcow2").write_bytes(layer[:cut])
    (root / "layers/0000000004.qcow2").write_bytes(bytes(3 * BLOCK_SIZE))  # data only, no header yet
    (root / "points/0000000004.json.tmp").write_text("{")
    (root / "hashes/0000000004.delta").write_bytes(b"partial")
    (root / "staging/x.tmp").mkdir()
    d2 = ReplicaStore(tmp_path / "root").disk("vm")
    assert sorted(p.name for p in (root / "layers").iterdir()) == sorted(p.layer.name for p in d2.points())
    assert not (root / "points/0000000004.json.tmp").exists()
    assert not (root / "hashes/0000000004.delta").exists()
    assert not (root / "staging/x.tmp").exists()
    assert_points_match(d2, snaps)


@pytest.mark.parametrize("big", [True, False], ids=["intent", "small"])
@pytest.mark.parametrize("fail_at", ["link", "point-record", "hash-file"])
def test_crash_inside_commit_rolls_forward_on_open(tmp_path: Path, monkeypatch, fail_at: str, big: bool) -> None:
    """A cycle with at least `roll_forward_bytes` of data writes a commit intent: a crash
    inside its commit is rolled forward on open. A smaller one is not (the sender sends it
    again): the previous point stays, and the same cycle can be sent and committed again."""
    _store, disk, snaps, model = make_points(tmp_path, 2)
    changes = random_changes(random.Random(5), k=12)
    w = disk.begin_cycle("next", disk.latest().id)
    if big:
        w.roll_forward_bytes = 0
    stage(w, changes)
    model.apply(changes)

    class Crash(Exception):
        pass

    real_link, real_write = os.link, store_mod._write_durable

    def link(*a, **k):  # type: ignore[no-untyped-def]
        raise Crash()

    def write_durable(path, data, **k):  # type: ignore[no-untyped-def]
        if (fail_at == "point-record" and path.parent.name == "points") or \
                (fail_at == "hash-file" and path.parent.name == "hashes"):
            raise Crash()
        return real_write(path, data, **k)

    if fail_at == "link":
        monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(store_mod, "_write_durable", write_durable)
    with pytest.raises(Crash):
        w.commit(model.digest(), "app", 7.0, {"k": 1})
    monkeypatch.setattr(os, "link", real_link)
    monkeypatch.setattr(store_mod, "_write_durable", real_write)
    d2 = ReplicaStore(tmp_path / "root").disk("vm")
    if not big:  # no intent: the replica stays at its previous point, the cycle is sent again
        assert d2.latest().seq == 2
        assert_points_match(d2, snaps)
        assert not any((tmp_path / "root/disks/vm/layers").glob("0000000003*"))
        w = d2.begin_cycle("next", d2.latest().id)
        stage(w, changes)
        w.commit(model.digest(), "app", 7.0, {"k": 1})
    p = d2.latest()  # with an intent: rolled forward on open
    assert p.seq == 3 and p.consistency == "app" and p.meta == {"k": 1} and p.created_at == 7.0
    assert_same(p.layer, model.write_raw(tmp_path / "raw"))
    assert d2.verify(p.id).ok
    assert not any((tmp_path / "root/disks/vm/staging").iterdir())


def _sigkill_runs(tmp_path: Path, runs: int, seed: int) -> None:
    """`runs` worker processes, each SIGKILLed: one in three at a random moment, the others
    by the worker itself at a chosen durable step inside a commit or a prune (see
    store_crash_worker.py). After each: nothing acknowledged is lost, at most the cycle in
    flight is added, every point verifies, and the next run goes on from there."""
    sys.path.insert(0, str(WORKER.parent))
    from store_crash_worker import model_after

    rng = random.Random(seed)
    root = tmp_path / "root"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                        os.environ.get("PYTHONPATH", "")]))
    committed = 0
    landed: Counter[str] = Counter()
    for run in range(runs):
        target = ("time", "commit", "prune")[run % 3]
        args = [sys.executable, str(WORKER), str(root), str(seed), str(committed + 1), "0"]
        if target != "time":
            args += [target, str(rng.randint(1, 12))]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the store is open (however slow the interpreter start)
        if target == "time":
            time.sleep(rng.uniform(0.05, 0.3))  # then cycles of ~10-30 ms
            proc.send_signal(signal.SIGKILL)
        try:
            out, err = proc.communicate(timeout=120)  # a targeted worker kills itself
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"run {run}: the worker did not die in its {target}") from None
        assert proc.returncode == -signal.SIGKILL, err
        assert first == "ready\n", err
        markers = out.splitlines()
        phase = markers[-1].split()[0] if markers else "ready"
        if target != "time":
            assert phase == "dying" and markers[-1].split()[1] == target, markers[-3:]
            phase = f"inside {target}"
        landed[phase] += 1
        reported = [int(line.split()[1]) for line in markers if line.startswith("committed")]
        disk = ReplicaStore(root).disk("vm")
        latest = disk.latest()
        if latest is None:
            assert not reported
            continue
        c = int(latest.meta["c"])
        assert c >= (reported[-1] if reported else committed)  # nothing acknowledged is lost
        assert c <= (reported[-1] if reported else committed) + 1  # at most the one in flight
        m = model_after(seed, c)
        assert bytes.fromhex(latest.digest) == m.digest()
        assert disk.block_hashes().disk_digest() == m.digest()
        for p in disk.points():
            assert disk.verify(p.id).ok, (run, p)
        assert_check(latest.layer)
        assert_same(latest.layer, m.write_raw(tmp_path / "raw"))
        disk.prune(RetentionPolicy(0), time.time())  # the chain stays bounded whatever the kills did
        assert [p.id for p in disk.points()] == [latest.id] and disk.verify(latest.id).ok
        committed = c
        del disk
    assert committed > runs  # progress across kills: never a full restart
    # the kills the test exists for happened: inside commits and inside prunes
    assert landed["inside commit"] >= runs // 3 and landed["inside prune"] >= runs // 3 - 1, landed


def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    _sigkill_runs(tmp_path, 20, seed=1)


@pytest.mark.slow
def test_sigkill_at_random_moments_many(tmp_path: Path) -> None:
    _sigkill_runs(tmp_path, 60, seed=2)


# -- pruning ------------------------------------------------------------------------------

def test_prune_merges_and_every_retained_point_keeps_its_content(tmp_path: Path) -> None:
    _store, disk, snaps, _model = make_points(tmp_path, 9)
    ids = [p.id for p in disk.points()]
    # points every 10 minutes from t=1000: keep 1 per hour plus app points (1, 5) within 2 hours
    now = 1000.0 + 8 * 600 + 60
    removed = disk.prune(RetentionPolicy(retention_hours=2), now)
    kept = [p.id for p in disk.points()]
    assert removed and set(removed) | set(kept) == set(ids)
    assert ids[-1] in kept
    assert_points_match(disk, snaps)
    for p in disk.points():
        info = json.loads(qemu_img("info", "--backing-chain", "--output=json", str(p.layer)).stdout)
        assert len(info) == kept.index(p.id) + 1  # chain length bounded by the retained points
    assert sorted(f.name for f in (tmp_path / "root/disks/vm/layers").iterdir()) == \
        sorted(p.layer.name for p in disk.points())
    # the oldest, then everything but the latest
    disk.remove_point(kept[0])
    assert_points_match(disk, snaps)
    disk.prune(RetentionPolicy(0), now)
    assert [p.id for p in disk.points()] == [ids[-1]]
    assert_points_match(ReplicaStore(tmp_path / "root").disk("vm"), snaps)
    with pytest.raises(Conflict):
        disk.remove_point(ids[-1])


def test_merge_compacts_when_garbage_dominates(tmp_path: Path) -> None:
    disk = ReplicaStore(tmp_path).create_disk("vm", SIZE)
    model = Model()
    rng = random.Random(3)
    hot = list(range(20))
    snaps = {}
    for c in range(8):  # the same blocks rewritten each cycle: merged in place they become garbage
        p = run_cycle(disk, model, {i: rng.randbytes(BLOCK_SIZE) for i in hot}, f"c{c}")
        snaps[p.id] = model.write_raw(tmp_path / f"raw-{p.id}")
        if c:
            disk.prune(RetentionPolicy(0), 0.0)
            size = disk.latest().layer.stat().st_size
            assert size < 2.2 * 20 * BLOCK_SIZE + 10 * BLOCK_SIZE, size  # bounded, not growing per cycle
    assert_points_match(disk, snaps)


def test_interrupted_merge_is_finished_on_open(tmp_path: Path, monkeypatch) -> None:
    _store, disk, snaps, _model = make_points(tmp_path, 4)
    real_replace = os.replace

    def replace(src, dst, *a, **k):  # type: ignore[no-untyped-def]
        if str(src).endswith(".qcow2") and "layers" in str(src):
            raise RuntimeError("killed")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(RuntimeError):
        disk.remove_point(disk.points()[1].id)
    monkeypatch.setattr(os, "replace", real_replace)
    d2 = ReplicaStore(tmp_path / "root").disk("vm")
    assert len(d2.points()) == 3
    assert_points_match(d2, snaps)
    assert len(list((tmp_path / "root/disks/vm/layers").iterdir())) == 3


# -- materialize --------------------------------------------------------------------------

def test_materialized_overlay_is_writable_pins_its_point_and_survives_merges(tmp_path: Path) -> None:
    _store, disk, snaps, _model = make_points(tmp_path, 5)
    pts = disk.points()
    target = pts[2]
    ov = disk.materialize(target.id, tmp_path / "vm-test.qcow2")
    assert_check(ov)
    assert_same(ov, snaps[target.id])
    with pytest.raises(Conflict):
        disk.materialize(target.id, ov)
    # prune everything the policy allows: the pinned point stays, points below it merge
    disk.prune(RetentionPolicy(0), 1e9)
    assert [p.id for p in disk.points()] == [target.id, pts[-1].id]
    assert_same(ov, snaps[target.id])
    # the VM writes to its overlay: no point changes
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 1M", str(ov)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert_points_match(disk, snaps)
    with pytest.raises(Conflict):
        disk.remove_point(target.id)
    disk.release(ov)
    with pytest.raises(NotFound):
        disk.release(ov)
    disk.prune(RetentionPolicy(0), 1e9)
    assert [p.id for p in disk.points()] == [pts[-1].id]
    assert_points_match(disk, snaps)


def test_running_reader_of_a_pinned_chain_is_not_disturbed_by_merges(tmp_path: Path) -> None:
    """A QEMU keeps its files open: model it by a reader that parsed the chain before the merge."""
    from standby.replication.qcow2 import Qcow2Chain

    _store, disk, snaps, _model = make_points(tmp_path, 5)
    pts = disk.points()
    ov = disk.materialize(pts[3].id, tmp_path / "ov.qcow2")
    chain = Qcow2Chain(pts[3].layer)
    disk.prune(RetentionPolicy(0), 1e9)
    expected = snaps[pts[3].id].read_bytes()
    got = b"".join(chain.read_block(i) for i in range(N))
    chain.close()
    assert got == expected
    disk.release(ov)


# -- seeds --------------------------------------------------------------------------------

def test_export_import_seed_round_trip_then_deltas(tmp_path: Path) -> None:
    _store, disk, snaps, model = make_points(tmp_path, 3)
    src_point = disk.points()[1]
    seed = disk.export_seed(src_point.id, tmp_path / "seed")
    info = json.loads((seed / "seed.json").read_text())
    assert info["digest"] == src_point.digest and info["size"] == SIZE
    assert_check(seed / "seed.qcow2")
    assert_same(seed / "seed.qcow2", snaps[src_point.id])
    other = ReplicaStore(tmp_path / "other")
    p = other.import_seed(seed)
    d2 = other.disk("vm")
    assert p.seq == 1 and p.digest == src_point.digest and p.created_at == src_point.created_at
    assert_same(p.layer, snaps[src_point.id])
    assert d2.verify(p.id).ok
    with pytest.raises(Conflict):
        d2.import_seed(seed)
    # catch up with a delta from the source state of that point
    m = Model()
    m.raw[:] = snaps[src_point.id].read_bytes()
    run_cycle(d2, m, random_changes(random.Random(8)), "delta-1")
    assert d2.verify(d2.latest().id).ok
    assert_same(d2.latest().layer, m.write_raw(tmp_path / "raw-after"))


def test_import_refuses_a_tampered_seed(tmp_path: Path) -> None:
    _store, disk, _snaps, _model = make_points(tmp_path, 2)
    seed = disk.export_seed(disk.latest().id, tmp_path / "seed")
    info = json.loads((seed / "seed.json").read_text())
    info["digest"] = "00" * 16
    (seed / "seed.json").write_text(json.dumps(info))
    other = ReplicaStore(tmp_path / "other")
    with pytest.raises(IntegrityError):
        other.import_seed(seed)
    assert other.disk("vm").latest() is None


def test_verify_detects_a_corrupted_layer(tmp_path: Path) -> None:
    _store, disk, _snaps, _model = make_points(tmp_path, 2)
    p = disk.points()[0]
    with Qcow2Reader_(p.layer) as r:
        guest, entry = next((g, e) for g, e in r.entries().items() if not e & 1)  # a data cluster
        off = entry & 0x00FFFFFFFFFFFE00
    with open(p.layer, "r+b") as f:
        f.seek(off + 7)
        f.write(b"\x00\x01\x02")
    v = disk.verify(p.id)
    assert not v.ok and v.actual_digest != v.expected_digest
    # the latest point reads that cluster through the chain unless its own layer rewrote it
    with Qcow2Reader_(disk.latest().layer) as r:
        rewritten = guest in r.entries()
    v2 = disk.verify(disk.latest().id)
    assert v2.ok == rewritten, (v2, rewritten)


def Qcow2Reader_(path: Path):  # type: ignore[no-untyped-def]
    from standby.replication.qcow2 import Qcow2Reader
    return Qcow2Reader(path)


# -- performance --------------------------------------------------------------------------

def _bytes_read_by_this_process() -> int:
    """What this process read through read(2) and friends (page cache hits included)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_one_percent_delta_on_1gib_commits_without_reading_the_disk(tmp_path: Path, capsys,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """163 random 64 KiB blocks of a 1 GiB disk: no full read, no qemu-img on the commit path.
    (How long it takes is bench/replication.py's business; here the commit is timed only
    to print it.)"""
    from standby.replication.digest import block_digest

    size = 1 << 30
    n = size // BLOCK_SIZE
    disk = ReplicaStore(tmp_path).create_disk("big", size)
    w = disk.begin_cycle("seed", None)
    w.write_zero(0, size)
    p = w.commit(disk.block_hashes().disk_digest(), "crash", 0.0, {})
    rng = random.Random(1)
    times = []
    for c in range(5):
        table = disk.block_hashes()
        blocks = [(i, rng.randbytes(BLOCK_SIZE)) for i in rng.sample(range(n), n // 100)]
        for i, b in blocks:
            table.set(i, block_digest(b))
        w = disk.begin_cycle(f"d{c}", p.id)
        for i, b in blocks:
            w.write(i * BLOCK_SIZE, b)
        with monkeypatch.context() as m:  # no process (qemu-img) on the commit path
            m.setattr(subprocess, "Popen", _no_process)
            read_before = _bytes_read_by_this_process()
            t0 = time.perf_counter()
            p = w.commit(table.disk_digest(), "crash", float(c), {})
            times.append(time.perf_counter() - t0)
            read = _bytes_read_by_this_process() - read_before
        assert read < 16 * 1024 * 1024, f"commit {c} read {read} bytes of a 1 GiB disk"
    median = sorted(times)[len(times) // 2]
    with capsys.disabled():
        print(f"\n1% delta of 1 GiB ({n // 100} blocks): commit median {median * 1000:.1f} ms")
    assert disk.verify(p.id).ok


def _no_process(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"a process was started on the commit path: {args[:1]}")


# -- full disk ----------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_raises_out_of_space_and_keeps_the_point(tmp_path: Path, small_fs: Path) -> None:
    from standby.errors import OutOfSpace

    store = ReplicaStore(small_fs / "root")
    disk = store.create_disk("vm", SIZE)
    model = Model()
    rng = random.Random(12)
    first = run_cycle(disk, model, {i: rng.randbytes(BLOCK_SIZE) for i in range(5)}, "c0")
    # leave various amounts of free space so ENOSPC strikes while staging or inside the commit
    filler = small_fs / "filler"
    outs = 0
    for free_kib in [20, 70, 140, 200, 260, 330, 400, 520, 700]:
        filler.unlink(missing_ok=True)
        st = os.statvfs(small_fs)
        avail = st.f_bavail * st.f_frsize
        with open(filler, "wb") as f:
            f.write(b"\1" * max(0, avail - free_kib * 1024))
        changes = {i: rng.randbytes(BLOCK_SIZE) for i in rng.sample(range(12), 6)}
        latest = disk.latest()
        expect = Model()
        expect.raw[:] = model.raw
        expect.apply(changes)
        try:
            w = disk.begin_cycle(f"c-{free_kib}", latest.id)
            stage(w, changes)
            p = w.commit(expect.digest(), "crash", 1.0, {})
        except OutOfSpace:
            outs += 1
            filler.unlink()
            if disk._active is not None:  # the receiver process dies: its files close
                disk._active._close()
            d2 = ReplicaStore(small_fs / "root").disk("vm")  # and it restarts
            now_latest = d2.latest()
            if now_latest.id != latest.id:  # the commit intent was durable: rolled forward
                assert bytes.fromhex(now_latest.digest) == expect.digest()
                model = expect
            assert d2.verify(now_latest.id).ok
            disk = d2
        else:
            model = expect
            assert p.seq == latest.seq + 1
            filler.unlink()
            assert disk.verify(p.id).ok
        try:
            disk.prune(RetentionPolicy(0), 2.0)
        except OutOfSpace:  # pragma: no cover - depends on the filesystem's accounting
            filler.unlink(missing_ok=True)
            disk = ReplicaStore(small_fs / "root").disk("vm")  # finishes the merge on open
        assert len(disk.points()) == 1
    filler.unlink(missing_ok=True)
    assert outs >= 3
    # with space back, the next cycle completes on top of whatever point is latest
    run_cycle(disk, model, {1: b"q" * BLOCK_SIZE}, "after")
    assert disk.verify(disk.latest().id).ok
    assert disk.latest().seq > first.seq


# -- meta seal and the format-1 migration --------------------------------------------------

def _as_format_1(root: Path) -> None:
    """Rewrite a store as format 1 wrote it: no meta_digest in the records, format 1."""
    for disk_dir in (root / "disks").iterdir():
        for rec in (disk_dir / "points").glob("*.json"):
            d = json.loads(rec.read_text())
            d.pop("meta_digest")
            d["format"] = 1
            rec.write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")
        info = json.loads((disk_dir / "disk.json").read_text())
        info["format"] = "standby-replica/1"
        (disk_dir / "disk.json").write_text(json.dumps(info))


def test_a_format_1_store_is_migrated_on_open_and_keeps_working(tmp_path: Path) -> None:
    from standby.replication.store import FORMAT, meta_digest

    _store, disk, snaps, model = make_points(tmp_path, 4)
    ids = [p.id for p in disk.points()]
    del disk, _store
    _as_format_1(tmp_path / "root")
    # interrupted migration: one record already sealed, disk.json still format 1
    first = tmp_path / "root/disks/vm/points" / f"{ids[0]}.json"
    d = json.loads(first.read_text())
    d["meta_digest"], d["format"] = meta_digest(d["meta"]), 2
    first.write_text(json.dumps(d))
    disk = ReplicaStore(tmp_path / "root").disk("vm")
    assert json.loads((tmp_path / "root/disks/vm/disk.json").read_text())["format"] == FORMAT
    for pid in ids:
        rec = json.loads((tmp_path / "root/disks/vm/points" / f"{pid}.json").read_text())
        assert rec["format"] == 2 and rec["meta_digest"] == meta_digest(rec["meta"])
    assert [p.id for p in disk.points()] == ids
    assert_points_match(disk, snaps)
    # and the next cycle goes on on top of the migrated points
    p = run_cycle(disk, model, random_changes(random.Random(99)), "after-migration")
    assert p.base == ids[-1] and disk.verify(p.id).ok


def test_verify_refuses_a_point_whose_meta_was_changed(tmp_path: Path) -> None:
    _store, disk, _snaps, _model = make_points(tmp_path, 2)
    p = disk.latest()
    rec = tmp_path / "root/disks/vm/points" / f"{p.id}.json"
    d = json.loads(rec.read_text())
    d["meta"]["vm_point"] = {"format": "standby-vm-point/1", "vm": "someone-else"}
    rec.write_text(json.dumps(d))
    v = ReplicaStore(tmp_path / "root").disk("vm").verify(p.id)
    assert not v.ok and any("does not match its seal" in x for x in v.problems), v
    assert v.actual_digest == v.expected_digest  # the data is fine: the meta is what changed
