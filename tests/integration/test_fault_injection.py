"""Fault injection on the replication data plane (issue 3, "Done when"): SIGKILL of the
sender or of the receiver at random moments of a cycle, cut connections, and a full disk
on the secondary. After each fault:

(a) the replica's latest point verifies (`DiskReplica.verify` re-reads its chain) and its
    digest equals the source's digest at the cycle that made it (the test keeps the
    source's digest table of every cycle), so the replica is a whole earlier recovery
    point, never a mix; every retained point still verifies and keeps its digest;
(b) the next cycle completes and is no full copy: it sends exactly the blocks that differ
    between the source and the replica's latest point (far below the image's non-zero
    size), except after an interrupted initial seed, which resumes: it skips exactly the
    blocks the agent had made durable (read from the staging journal, whose format
    store.py documents), so it sends fewer bytes than a fresh seed (compared before
    compression: the sender compresses only while that is faster, so compressed sizes
    depend on the link's speed at the time).

The SIGKILL runs use real processes: the sender is the `standby replicate` CLI; the agent
is a small `python -c` driver around `receiver.Receiver` (so its checkpoint interval can be
short; `standby agent receive` has no option for it) that prints a marker line with its monotonic
clock at each step of a cycle (connection accepted, HELLO, stream begun, first DATA,
CYCLE_END received, point acknowledged, connection closed). A run picks a victim (sender or
agent) and a target phase (handshake, data transfer, commit), waits for the phase's first
marker, sleeps a random fraction of that phase's duration (learnt from the completed
cycles) and sends SIGKILL; the phase where the kill landed is then read from the markers
printed before the kill. The random seed is printed; rerun a failure with
STANDBY_FAULT_SEED=<seed> (it fixes the plan: images, changes, victims, target phases and
delays; the exact byte a kill or a cut hits still depends on timing).
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

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

from standby.errors import NotFound, RemoteError, StandbyError  # noqa: E402
from standby.replication import receiver as receiver_mod  # noqa: E402
from standby.replication import tls  # noqa: E402
from standby.replication.changes import ExtentSource, FullSource, HashScanSource  # noqa: E402
from standby.replication.digest import BLOCK_SIZE, HashTable, hash_file  # noqa: E402
from standby.replication.receiver import Receiver  # noqa: E402
from standby.replication.sender import SenderOptions, probe, run_cycle  # noqa: E402
from standby.replication.store import DiskReplica, ReplicaStore  # noqa: E402

MiB = 1024 * 1024
SEED = int(os.environ.get("STANDBY_FAULT_SEED") or random.SystemRandom().randrange(10**6))
TALLY: Counter[tuple[str, str, str]] = Counter()  # (victim, cycle kind, phase) -> kills
SEEDS: Counter[str] = Counter()  # how the killed initial seeds ended
SCENARIOS_DONE: list[int] = []
CUTS: Counter[str] = Counter()  # cut runs by the phase the agent was in

KILL_SCENARIOS = 9
VICTIMS = ("sender", "agent")
TARGETS = ("handshake", "data", "commit")
SEED_KILLS = (("sender", "data"), ("agent", "data"), ("sender", "handshake"), ("agent", "commit"),
              ("sender", "commit"), ("agent", "data"), ("sender", "data"), ("agent", "handshake"), ("agent", "data"))
KILL_IMAGE_SIZE = 64 * MiB  # half zero blocks (make_image)
KEEP_POINTS = 4
DATA_HEAD = 44  # bytes of a DATA frame before its body (protocol.py)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.Identity]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _announce(what: str) -> None:
    print(f"fault injection: {what}; random seed {SEED} (rerun with STANDBY_FAULT_SEED={SEED})")


# ---------------------------------------------------------------------------- the agent


AGENT_DRIVER = r'''
import os, sys, threading, time
from standby.replication import receiver as R
from standby.replication.store import ReplicaStore
from standby.replication.tls import Identity, server_context

def mark(tag, *extra):
    os.write(1, (" ".join([tag, repr(time.monotonic()), *map(str, extra)]) + "\n").encode())

C = R._Connection
_handle, _hello, _begin, _data, _end, _leave = (R.Receiver._handle, C.on_hello, C.on_cycle_begin, C.on_data,
                                                C.on_cycle_end, R.Receiver.leave_session)

def handle(self, raw, addr):
    mark("accept")
    try:
        return _handle(self, raw, addr)
    finally:
        mark("closed")

def hello(self, msg):
    mark("hello")
    return _hello(self, msg)

def begin(self, msg):
    _begin(self, msg)
    mark("begun", msg.stream_index)

def data(self, msg):
    s = self.session
    if s is not None and not getattr(s, "fi_data", False):
        s.fi_data = True
        mark("data")
    return _data(self, msg)

def end(self, msg):
    mark("commit")
    _end(self, msg)
    mark("point")

def leave(self, session, *args, **kwargs):
    _leave(self, session, *args, **kwargs)
    if not session.members and not session.finished:
        mark("idle", session.bytes_applied)

R.Receiver._handle, C.on_hello, C.on_cycle_begin, C.on_data, C.on_cycle_end, R.Receiver.leave_session = (
    handle, hello, begin, data, end, leave)
root, cert, key, ca, interval = sys.argv[1:6]
rx = R.Receiver(ReplicaStore(root), server_context(Identity(cert, key, ca)), "127.0.0.1", 0,
                checkpoint_interval=float(interval)).start()
mark("port", rx.address[1])
threading.Event().wait()
'''


class AgentProcess:
    """The receiver in its own process; `marks` collects its marker lines (tag, time, args)."""

    def __init__(self, store: Path, ident: tls.Identity, log: Path, checkpoint_interval: float) -> None:
        self.store, self.ident, self.log, self.interval = store, ident, log, checkpoint_interval
        self.cond = threading.Condition()
        self.marks: list[tuple[str, float, list[str]]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.start()

    def start(self) -> None:
        with self.cond:
            self.marks = []
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", AGENT_DRIVER, str(self.store), str(self.ident.cert), str(self.ident.key),
                 str(self.ident.ca), str(self.interval)], stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().decode().split()
        assert first and first[0] == "port", f"agent did not start: {self.log_tail()}"
        self.port = int(first[2])
        self.reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self.reader.start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            parts = raw.decode().split()
            with self.cond:
                if proc is self.proc:
                    self.marks.append((parts[0], float(parts[1]), parts[2:]))
                    self.cond.notify_all()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def since(self, n: int) -> list[tuple[str, float, list[str]]]:
        with self.cond:
            return list(self.marks[n:])

    def count(self) -> int:
        with self.cond:
            return len(self.marks)

    def wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(pred, timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


# ---------------------------------------------------------------------------- store views


_JHEAD = struct.Struct(">8sQQQ")
_JREC = struct.Struct(">B7xQQ16s")


def durable_staged_blocks(disk_dir: Path) -> tuple[int, int]:
    """(data blocks, zero blocks) named by valid journal records of the staged cycle, read
    from the documented staging format without opening the store (which would recover it):
    a 32-byte header, then 48-byte records (40-byte body + xxh3-64 of it); replay stops at
    the first invalid record."""
    data: set[int] = set()
    zero: set[int] = set()
    staging = disk_dir / "staging"
    if not staging.is_dir():
        return 0, 0
    for sdir in staging.iterdir():
        j = sdir / "journal"
        if sdir.name.endswith(".tmp") or not j.exists():
            continue
        raw = j.read_bytes()
        pos = _JHEAD.size
        while pos + _JREC.size + 8 <= len(raw):
            body = raw[pos:pos + _JREC.size]
            if xxhash.xxh3_64_digest(body) != raw[pos + _JREC.size:pos + _JREC.size + 8]:
                break
            kind, a, b, _dg = _JREC.unpack(body)
            if kind == 1:
                data.add(a)
                zero.discard(a)
            elif kind == 2:
                for i in range(a, a + b):
                    zero.add(i)
                    data.discard(i)
            else:
                break
            pos += _JREC.size + 8
    return len(data), len(zero)


def open_disk(store: Path, disk_id: str) -> DiskReplica | None:
    try:
        return ReplicaStore(store).disk(disk_id)
    except NotFound:
        return None


def nonzero_blocks(table: HashTable) -> int:
    return len(table.differing_blocks(HashTable(table.size)))


class Replica:
    """What the test knows of a disk's replica: the source's digest table of every point
    it may hold, and the points retained so far."""

    def __init__(self, store: Path, disk_id: str, size: int) -> None:
        self.store, self.disk_id, self.size = store, disk_id, size
        self.tables: dict[str, HashTable] = {}  # point id -> the source's table at its cycle
        self.retained: list[str] = []
        self.latest_seq = 0

    @property
    def latest_table(self) -> HashTable:
        return self.tables[self.retained[-1]] if self.retained else HashTable(self.size)

    def check(self, may_add: HashTable | None, must_add: bool, ctx: str) -> DiskReplica | None:
        """Assert (a): every retained point verifies and equals the source at its cycle; at
        most one new point, made from `may_add` (the interrupted or completed cycle's source)."""
        disk = open_disk(self.store, self.disk_id)
        pts = disk.points() if disk is not None else []
        new = [p for p in pts if p.seq > self.latest_seq]
        old = [p.id for p in pts if p.seq <= self.latest_seq]
        assert old == self.retained, f"{ctx}: retained points changed: {old} != {self.retained}"
        assert len(new) <= 1, f"{ctx}: more than one new point: {[p.id for p in new]}"
        if must_add:
            assert new, f"{ctx}: the completed cycle left no new point"
        if new:
            assert may_add is not None, f"{ctx}: unexpected new point {new[0].id}"
            assert new[0].digest == may_add.disk_digest().hex(), \
                f"{ctx}: new point {new[0].id} is not the source at its cycle"
            self.tables[new[0].id] = may_add
            self.retained.append(new[0].id)
            self.latest_seq = new[0].seq
        assert disk is not None or not self.retained
        for p in pts:
            assert p.digest == self.tables[p.id].disk_digest().hex(), f"{ctx}: point {p.id} digest changed"
            r = disk.verify(p.id)  # type: ignore[union-attr]
            assert r.ok, f"{ctx}: point {p.id} does not verify: {r.problems} {r.mismatched_blocks[:10]}"
        return disk

    def prune(self, keep: int) -> None:
        disk = open_disk(self.store, self.disk_id)
        assert disk is not None
        while len(self.retained) > keep:
            disk.remove_point(self.retained[0])
            del self.tables[self.retained.pop(0)]

    def compare_latest_with(self, image: Path, tmp: Path) -> None:
        """qemu-img (an independent reader) agrees that the latest point equals the image."""
        disk = open_disk(self.store, self.disk_id)
        assert disk is not None and self.retained
        overlay = tmp / f"check-{self.retained[-1]}.qcow2"
        disk.materialize(self.retained[-1], overlay)
        try:
            res = qemu_compare(image, overlay)
            assert res.returncode == 0, res.stdout + res.stderr
        finally:
            disk.release(overlay)
            overlay.unlink()


class CatchUp:
    """What a completed cycle must have sent, from the state before it ran (assertion (b))."""

    def __init__(self, replica: Replica, image: Path, disk_dir: Path) -> None:
        self.replica = replica
        self.had_point = bool(replica.retained)
        self.now = hash_file(image)
        self.differing = self.now.differing_blocks(replica.latest_table)
        self.durable, _ = durable_staged_blocks(disk_dir)

    def check(self, res: dict[str, Any], extent_blocks: int | None, ctx: str) -> None:
        assert res["digest"] == self.now.disk_digest().hex(), ctx
        self.replica.check(self.now, must_add=True, ctx=ctx)
        sent = res["data_blocks"] + res["zero_blocks"]
        nonzero = nonzero_blocks(self.now)
        if res["kind"] == "seed":
            assert not self.had_point, ctx
            # a resumed seed skips exactly the blocks the agent had made durable
            assert res["resumed_blocks"] == self.durable, \
                f"{ctx}: resumed {res['resumed_blocks']} blocks, {self.durable} were durably staged"
            assert res["data_blocks"] + res["resumed_blocks"] == nonzero, ctx
            # Bytes: at most the remaining blocks' DATA frames (44-byte head + at most the
            # raw block; the sender compresses only while that is faster, so a fresh seed's
            # wire bytes depend on the link) plus a few control frames; a fresh seed sends
            # every non-zero block.
            assert res["wire_bytes"] <= res["data_blocks"] * (BLOCK_SIZE + DATA_HEAD) + 16384, f"{ctx}: {res}"
            if self.durable:
                assert res["resumed"], ctx
                assert res["wire_bytes"] < nonzero * (BLOCK_SIZE + DATA_HEAD), f"{ctx}: {res}"
        else:
            # no full copy: exactly the blocks that differ from the replica's latest point
            assert sent == len(self.differing), \
                f"{ctx}: sent {sent} blocks, {len(self.differing)} differ from the replica's latest point"
            assert res["wire_bytes"] < 0.5 * nonzero * BLOCK_SIZE, ctx
            if extent_blocks is not None:
                assert res["bytes_read"] <= extent_blocks * BLOCK_SIZE, ctx


def write_extents(path: Path, blocks: set[int]) -> Path:
    path.write_text("".join(f"{i * BLOCK_SIZE} {BLOCK_SIZE}\n" for i in sorted(blocks)))
    return path


# ---------------------------------------------------------------------------- SIGKILL runs


PHASES = ("startup", "handshake", "data", "commit", "after-commit")


class KillScenario:
    """One disk, one image: a (maybe killed) seed, then delta and hash-scan cycles killed at
    random moments, each followed by a catch-up cycle."""

    def __init__(self, tmp: Path, pki: dict[str, tls.Identity], rng: random.Random, name: str) -> None:
        self.tmp, self.pki, self.rng, self.name = tmp, pki, rng, name
        self.img = tmp / "src.img"
        make_image(self.img, KILL_IMAGE_SIZE, seed=rng.randrange(1 << 30))
        self.store = tmp / "store"
        self.state = tmp / "sender-state"
        self.disk_id = "vm-d0"
        self.replica = Replica(self.store, self.disk_id, KILL_IMAGE_SIZE)
        self.agent = AgentProcess(self.store, pki["agent"], tmp / "agent.log",
                                  checkpoint_interval=rng.choice([0.02, 0.05]))
        self.env = dict(os.environ, COLUMNS="200", STANDBY_TLS_CERT=str(pki["sender"].cert),
                        STANDBY_TLS_KEY=str(pki["sender"].key), STANDBY_TLS_CA=str(pki["sender"].ca))
        self.ctx = tls.client_context(pki["sender"])
        self.pending: set[int] = set()  # blocks changed since the sender's last acknowledged cycle
        self.extents_file = tmp / "changed.txt"
        # seconds each phase lasted in completed cycles, per cycle kind
        self.est: dict[tuple[str, str], float] = {
            ("seed", "handshake"): 0.02, ("seed", "data"): 0.15, ("seed", "commit"): 0.04,
            ("extents", "handshake"): 0.02, ("extents", "data"): 0.01, ("extents", "commit"): 0.015,
            ("scan", "handshake"): 0.02, ("scan", "data"): 0.04, ("scan", "commit"): 0.015,
        }

    def close(self) -> None:
        self.agent.stop()

    # -- processes --------------------------------------------------------------------
    def start_sender(self, mode: str, streams: int, bwlimit: str | None = None) -> subprocess.Popen[str]:
        args = [sys.executable, "-m", "standby.cli.main", "replicate", str(self.img), "--to", self.agent.endpoint,
                "--disk-id", self.disk_id, "--json", "--state-dir", str(self.state), "--streams", str(streams)]
        if bwlimit:
            args += ["--bwlimit", bwlimit]
        if mode == "seed":
            args.append("--seed")
        elif mode == "scan":
            args.append("--hash-scan")
        elif mode == "extents":
            args += ["--changed-extents", str(write_extents(self.extents_file, self.pending))]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env)

    def learn(self, mode: str, marks: list[tuple[str, float, list[str]]], streams: int) -> None:
        t = {}
        for tag, ts, _ in marks:
            t.setdefault(tag, ts)
        begun = [ts for tag, ts, _ in marks if tag == "begun"]
        if len(begun) < streams or "commit" not in t or "point" not in t or "accept" not in t:
            return
        for phase, dur in (("handshake", begun[-1] - t["accept"]), ("data", t["commit"] - begun[-1]),
                           ("commit", t["point"] - t["commit"])):
            old = self.est[(mode, phase)]
            self.est[(mode, phase)] = max(0.002, 0.5 * old + 0.5 * dur)

    # -- one killed cycle -------------------------------------------------------------
    def kill_run(self, mode: str, victim: str, target: str, streams: int) -> dict[str, Any]:
        agent = self.agent
        n0 = agent.count()
        window = self.est[(mode, target)]
        if target == "commit":
            window *= 0.6  # a commit's length varies: aim at its first part, or most land after it
        bwlimit = None
        lo, hi = 0.0, 1.0  # where in the window the kill lands
        if target == "data" and mode == "seed":
            # An initial seed on loopback is over in a fraction of a second, and how long
            # varies with the machine's load: at 8 MiB/s its 32 MiB of data take 4 s, and a
            # kill in the middle half of that lands in the transfer, after a checkpoint
            # made staged blocks durable (the case that must resume).
            bwlimit = "8MiB/s"
            window, lo, hi = KILL_IMAGE_SIZE / 2 / (8 * MiB), 0.25, 0.75
        if target == "data" and mode != "seed":
            # A delta's few hundred KiB fit in the socket buffers: the sender would be done
            # sending long before the agent has read them. At 1 MiB/s (256 KiB burst) the
            # sender's data transfer lasts about as long as the agent's.
            bwlimit = "1MiB/s"
            window = max(window, (len(self.pending) * BLOCK_SIZE - 256 * 1024) / MiB)
        sender = self.start_sender(mode, streams, bwlimit)

        def trigger() -> float | None:
            ms = agent.since(n0)
            if target == "handshake":
                hits = [ts for tag, ts, _ in ms if tag == "accept"]
                return hits[0] if hits else None
            if target == "data":
                begun = [ts for tag, ts, _ in ms if tag == "begun"]
                return begun[-1] if len(begun) >= streams else None
            hits = [ts for tag, ts, _ in ms if tag == "commit"]
            return hits[0] if hits else None

        t_trig = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            t_trig = trigger()
            if t_trig is not None or sender.poll() is not None:
                break
            agent.wait(lambda: trigger() is not None, 0.02)
        assert time.monotonic() < deadline, f"{mode} cycle never reached {target}"
        kill_t = None
        if t_trig is not None:
            delay = self.rng.uniform(lo * window, hi * window)
            pause = t_trig + delay - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            kill_t = time.monotonic()
            (sender if victim == "sender" else agent.proc).send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        if victim == "agent" and kill_t is not None:
            agent.proc.wait(10)  # type: ignore[union-attr]
            agent.reader.join(10)
        try:
            out, err = sender.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            sender.kill()
            raise AssertionError(f"the sender hung after the {victim} was killed") from None
        if victim == "sender" or kill_t is None:
            # the agent notices the lost streams: every accepted connection closes (and a
            # broken session checkpoints its staged blocks before its last stream closes)
            ok = agent.wait(lambda: Counter(t for t, _, _ in agent.marks[n0:])["accept"] ==
                            Counter(t for t, _, _ in agent.marks[n0:])["closed"], 15)
            assert ok, f"the agent did not close the connections of the killed sender: {agent.log_tail()}"
        else:
            agent.proc.stdout.close()  # type: ignore[union-attr]
        ms = agent.since(n0)
        if kill_t is None:
            phase = "missed"
        else:
            # A killed agent printed its markers before it died. A killed sender may have
            # sent a frame the agent reads after the kill: CYCLE_END received at any time
            # means the sender was waiting for its point (commit), and before the kill
            # counts for the other phases.
            before = Counter(tag for tag, ts, _ in ms if victim == "agent" or ts < kill_t)
            if before["point"]:
                phase = "after-commit"
            elif before["commit"] or any(tag == "commit" for tag, _, _ in ms):
                phase = "commit"
            elif before["begun"] >= streams:
                phase = "data"
            elif before["accept"]:
                phase = "handshake"
            else:
                phase = "startup"
        return {"phase": phase, "rc": sender.returncode, "out": out, "err": err, "marks": ms}

    # -- the cycles ---------------------------------------------------------------------
    def run(self, mode: str, streams: int, ctx: str) -> dict[str, Any]:
        """A cycle that must complete (the catch-up); asserts (b)."""
        before = CatchUp(self.replica, self.img, self.store / "disks" / self.disk_id)
        n0 = self.agent.count()
        sender = self.start_sender(mode, streams)
        out, err = sender.communicate(timeout=120)
        assert sender.returncode == 0, f"{ctx}: catch-up {mode} failed ({sender.returncode}): {err}\n" \
                                       f"{self.agent.log_tail()}"
        res = json.loads(out)
        if mode != "auto":  # (auto: the CLI probes the agent first)
            self.learn(mode, self.agent.since(n0), streams)
        before.check(res, len(self.pending) if mode == "extents" else None, ctx)
        self.pending = set()
        return res

    def mutate(self, count: int) -> None:
        self.pending |= set(change_blocks(self.img, count, seed=self.rng.randrange(1 << 30)))

    def killed_cycle(self, mode: str, victim: str, target: str, ctx: str) -> str:
        streams = self.rng.choice([1, 2, 4])
        source = hash_file(self.img)
        r = self.kill_run(mode, victim, target, streams)
        phase = r["phase"]
        ctx = f"{ctx}: {mode} cycle, {victim} killed aiming at {target}, landed in {phase} ({streams} streams)"
        if phase != "missed":
            TALLY[(victim, mode, phase)] += 1
        disk_dir = self.store / "disks" / self.disk_id
        durable_data, _ = durable_staged_blocks(disk_dir)
        if victim == "sender" and phase == "data":
            # every block the agent applied before the stream broke is durably staged
            idle = [args for tag, _, args in r["marks"] if tag == "idle"]
            assert idle, f"{ctx}: the broken session was not closed: {self.agent.log_tail()}"
            assert durable_data * BLOCK_SIZE == int(idle[-1][0]), f"{ctx}: applied {idle[-1][0]} bytes, " \
                                                                  f"{durable_data} blocks durable"
        if victim == "agent" and phase != "missed":
            assert r["rc"] in (0, 5), f"{ctx}: sender exit {r['rc']}: {r['err']}"
            assert "Traceback" not in r["err"], r["err"]
            self.agent.start()  # restart what was killed
        if r["rc"] == 0:
            self.pending = set()  # the sender saw the point acknowledged
        # the restarted agent opens the disk (and recovers it) on the next HELLO
        probe(self.agent.endpoint, self.ctx, self.disk_id, KILL_IMAGE_SIZE)
        before = self.replica.latest_seq
        self.replica.check(source, must_add=False, ctx=ctx)
        added = self.replica.latest_seq != before
        if phase in ("startup", "handshake", "data"):
            assert not added, f"{ctx}: a point appeared before the commit"
        if phase == "after-commit":
            assert added, f"{ctx}: the acknowledged point is missing"
        if r["rc"] == 0:
            assert added, f"{ctx}: the sender saw a point the replica does not have"
        print(f"  {ctx}; point {'made' if added else 'not made'}; {durable_data} blocks staged")
        return phase

    def catch_up(self, mode: str, ctx: str) -> dict[str, Any]:
        return self.run(mode, self.rng.choice([1, 2, 4]), ctx + ": catch-up")


@pytest.mark.slow
@pytest.mark.parametrize("scenario", range(KILL_SCENARIOS))
def test_sigkill_sender_or_agent_at_random_moments(tmp_path: Path, pki: dict[str, tls.Identity],
                                                   scenario: int) -> None:
    _announce(f"SIGKILL scenario {scenario}")
    rng = random.Random(f"{SEED}-kill-{scenario}")
    sc = KillScenario(tmp_path, pki, rng, f"scenario {scenario}")
    try:
        ctx = f"seed {SEED} scenario {scenario}"
        # the initial seed is killed too (mostly in its data transfer, which it must resume)
        sc.killed_cycle("seed", *SEED_KILLS[scenario % len(SEED_KILLS)], f"{ctx} initial")
        res = sc.catch_up("auto", f"{ctx} initial")
        SEEDS[f"seed {'resumed' if res['resumed'] else 'ran whole' if res['kind'] == 'seed' else 'committed'}"] += 1
        plan = [(v, t) for v in VICTIMS for t in TARGETS]  # every victim and phase once
        rng.shuffle(plan)
        for k, (victim, target) in enumerate(plan):
            c = f"{ctx} run {k}"
            sc.mutate(rng.choice([10, 10, 10, 30]))  # 1% (sometimes 3%) of the 1024 blocks
            mode = rng.choice(["extents", "scan"])
            sc.killed_cycle(mode, victim, target, c)
            if rng.random() < 0.3:
                sc.mutate(10)  # the guest keeps writing before the catch-up
            sc.catch_up(mode, c)
            sc.replica.prune(KEEP_POINTS)
            sc.replica.check(None, must_add=False, ctx=f"{c}: after pruning")
        sc.replica.compare_latest_with(sc.img, tmp_path)
    finally:
        sc.close()
    SCENARIOS_DONE.append(scenario)


@pytest.mark.slow
def test_sigkill_summary() -> None:
    """At least 50 kills, landing in every phase (counted over the scenarios above)."""
    if len(SCENARIOS_DONE) != KILL_SCENARIOS:
        pytest.fail(f"{len(SCENARIOS_DONE)} of {KILL_SCENARIOS} SIGKILL scenarios completed: the coverage "
                    "below cannot be claimed (a scenario failed, or was not selected)")
    by_phase = Counter()
    for (victim, mode, phase), n in sorted(TALLY.items()):
        by_phase[phase] += n
        print(f"  {victim:6} {mode:8} {phase:12} {n}")
    total = sum(by_phase.values())
    print(f"fault injection: {total} SIGKILL runs by phase: {dict(by_phase)}; "
          f"by victim: {dict(Counter(v for (v, _, _), n in TALLY.items() for _ in range(n)))}")
    print(f"fault injection: killed initial seeds: {dict(SEEDS)}")
    assert total >= 50
    assert SEEDS["seed resumed"] >= 2, SEEDS
    for phase in ("handshake", "data", "commit"):
        assert by_phase[phase] >= 8, by_phase


# ---------------------------------------------------------------------------- cut connections


def _wait_idle(rx: Receiver, timeout: float = 15.0) -> None:
    """Until the receiver has no connection and no session left (a broken session
    checkpoints its staged blocks when its last stream leaves)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with rx._lock:
            if not rx._conns and not rx._sessions:
                return
        time.sleep(0.01)
    raise AssertionError("the receiver kept connections or a session after the cut")


@pytest.mark.slow
@pytest.mark.parametrize("scenario", range(3))
def test_cut_connections_mid_cycle(tmp_path: Path, pki: dict[str, tls.Identity], scenario: int,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy on the path cuts every stream of a cycle (both directions at once): after a
    byte budget drawn at random (handshake or data), or a random moment after the agent
    received CYCLE_END (the commit runs, its ACK is lost)."""
    _announce(f"cut scenario {scenario}")
    rng = random.Random(f"{SEED}-cut-{scenario}")
    size = 32 * MiB
    img = tmp_path / "src.img"
    make_image(img, size, seed=rng.randrange(1 << 30))
    store, state, disk_id = tmp_path / "store", tmp_path / "state", "cut-d0"
    replica = Replica(store, disk_id, size)
    ctx_tls = tls.client_context(pki["sender"])
    cut_in_commit: dict[str, tuple[CuttingProxy, float]] = {}
    seen: Counter[str] = Counter()  # what the agent got of the current cycle
    conn = receiver_mod._Connection
    on_cycle_begin, on_data, on_cycle_end = conn.on_cycle_begin, conn.on_data, conn.on_cycle_end

    def seeing_on_cycle_begin(self: Any, msg: Any) -> None:
        on_cycle_begin(self, msg)
        seen["begun"] += 1

    def seeing_on_data(self: Any, msg: Any) -> None:
        seen["data"] += 1
        on_data(self, msg)

    def cutting_on_cycle_end(self: Any, msg: Any) -> None:
        seen["commit"] += 1
        cut = cut_in_commit.pop("cut", None)
        if cut is not None:
            threading.Timer(cut[1], cut[0].cut_all).start()
        on_cycle_end(self, msg)

    monkeypatch.setattr(conn, "on_cycle_begin", seeing_on_cycle_begin)
    monkeypatch.setattr(conn, "on_data", seeing_on_data)
    monkeypatch.setattr(conn, "on_cycle_end", cutting_on_cycle_end)
    fresh_wire = nonzero_blocks(hash_file(img)) * (BLOCK_SIZE + DATA_HEAD)  # uncompressed
    pending: set[int] = set()
    where_counts: Counter[str] = Counter()
    with running_agent(store, pki["agent"], checkpoint_interval=0.03) as rx:
        runs = [("seed", rng.choice(["handshake", "data", "data"]))]
        plan = [w for w in ("handshake", "data", "commit") for _ in range(3)]
        rng.shuffle(plan)
        runs += [(rng.choice(["extents", "scan"]), w) for w in plan]
        for k, (mode, where) in enumerate(runs):
            c = f"seed {SEED} cut scenario {scenario} run {k}: {mode} cycle cut in {where}"
            if mode != "seed":
                pending |= set(change_blocks(img, rng.choice([10, 20]), seed=rng.randrange(1 << 30)))
            source = hash_file(img)
            n_changed = len(source.differing_blocks(replica.latest_table))
            streams = rng.choice([1, 2, 4])
            if where == "handshake":
                budget = rng.randint(100, 2500 * streams)
            elif where == "data":
                budget = rng.randint(12000 * streams, max(12000 * streams + 1, int(
                    0.4 * fresh_wire if mode == "seed" else 0.8 * n_changed * BLOCK_SIZE)))
            else:
                budget = 1 << 50
            proxy = CuttingProxy(("127.0.0.1", rx.address[1]), budget)
            if where == "commit":
                cut_in_commit["cut"] = (proxy, rng.uniform(0, 0.006))
            seen.clear()
            source_obj: Any = {"seed": FullSource, "scan": HashScanSource}.get(mode)
            src = source_obj(img) if source_obj else ExtentSource(img, [(i * BLOCK_SIZE, BLOCK_SIZE)
                                                                        for i in sorted(pending)])
            outcome = "completed"
            try:
                run_cycle(src, f"127.0.0.1:{proxy.address[1]}", ctx_tls, disk_id,
                          SenderOptions(state_dir=state, streams=streams, timeout=20))
                pending = set()
            except StandbyError as exc:
                outcome = "cut"
                assert isinstance(exc, RemoteError), f"{c}: {type(exc).__name__}: {exc.message}"
                assert "internal error" not in exc.message, exc.message
            finally:
                cut_in_commit.clear()
                proxy.close()
            _wait_idle(rx)
            landed = ("commit" if seen["commit"] else "data" if seen["data"] or seen["begun"] >= streams
                      else "handshake")
            where_counts[f"{where}->{landed}:{outcome}"] += 1
            CUTS[f"{landed}:{outcome}"] += 1
            before = replica.latest_seq
            replica.check(source, must_add=False, ctx=c)
            added = replica.latest_seq != before
            if landed != "commit" and outcome == "cut":
                assert not added, f"{c}: a point appeared from a cut cycle"
            if outcome == "completed":
                assert added, c
            # the next cycle, straight to the agent
            if rng.random() < 0.3 and mode != "seed":
                pending |= set(change_blocks(img, 10, seed=rng.randrange(1 << 30)))
            catch = CatchUp(replica, img, store / "disks" / disk_id)
            if mode == "seed" and added:
                mode = "scan"
            src = {"seed": FullSource, "scan": HashScanSource}.get(mode, lambda p: ExtentSource(
                p, [(i * BLOCK_SIZE, BLOCK_SIZE) for i in sorted(pending)]))(img)
            res = run_cycle(src, endpoint(rx), ctx_tls, disk_id, SenderOptions(state_dir=state,
                                                                               streams=rng.choice([1, 2, 4])))
            catch.check(res.as_dict(), len(pending) if mode == "extents" else None, f"{c}: catch-up")
            pending = set()
            replica.prune(KEEP_POINTS)
    print(f"cut scenario {scenario}: {dict(where_counts)}")
    assert sum(n for k, n in where_counts.items() if k.endswith(":cut")) >= 7, where_counts
    print(f"fault injection: cut connections so far, by where the agent was: {dict(CUTS)}")
    replica.compare_latest_with(img, tmp_path)


# ---------------------------------------------------------------------------- full disk


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs for the agent's store (mounting needs root)."""
    if os.geteuid() != 0:
        pytest.skip("the full-disk test mounts a small tmpfs: needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(fs: Path, leave_bytes: int) -> Path:
    filler = fs / "filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(fs)
    with open(filler, "wb") as f:
        f.write(b"\1" * max(0, st.f_bavail * st.f_frsize - leave_bytes))
    return filler


@pytest.mark.slow
def test_full_disk_on_the_secondary(tmp_path: Path, pki: dict[str, tls.Identity], small_fs: Path) -> None:
    """The agent (`standby agent receive`) keeps its store on a 20 MiB tmpfs. A cycle that does not
    fit fails with OutOfSpace, sent to the sender as an ERROR: `standby replicate` exits 7
    with the message; the replica stays at its previous whole point; once space is freed
    (filler deleted, or the filesystem remounted bigger) the next cycle completes without a
    full copy."""
    _announce("full disk")
    rng = random.Random(f"{SEED}-full")
    size = 16 * MiB
    img = tmp_path / "src.img"
    make_image(img, size, seed=rng.randrange(1 << 30))
    store, disk_id = small_fs / "store", "full-d0"
    replica = Replica(store, disk_id, size)
    ident = pki["agent"]
    env = dict(os.environ, COLUMNS="200", STANDBY_TLS_CERT=str(pki["sender"].cert),
               STANDBY_TLS_KEY=str(pki["sender"].key), STANDBY_TLS_CA=str(pki["sender"].ca),
               STANDBY_SENDER_STATE=str(tmp_path / "state"))
    log = tmp_path / "agent.log"
    with open(log, "wb") as logf:
        agent = subprocess.Popen([sys.executable, "-m", "standby.cli.main", "agent", "receive", "--listen", "127.0.0.1:0",
                                  "--store", str(store), "--cert", str(ident.cert), "--key", str(ident.key),
                                  "--ca", str(ident.ca)], stderr=logf, env=env)
    try:
        deadline = time.monotonic() + 30
        port = None
        while port is None and time.monotonic() < deadline:
            text = log.read_text()
            if "agent listening on 127.0.0.1:" in text:
                port = int(text.split("agent listening on 127.0.0.1:")[1].split(",")[0])
            else:
                assert agent.poll() is None, text
                time.sleep(0.05)
        assert port is not None, log.read_text()
        to = f"127.0.0.1:{port}"
        ctx_tls = tls.client_context(pki["sender"])

        def replicate(mode: str, pending: set[int]) -> subprocess.CompletedProcess[str]:
            args = ["replicate", str(img), "--to", to, "--disk-id", disk_id, "--json",
                    "--streams", str(rng.choice([1, 2, 4]))]
            if mode == "extents":
                args += ["--changed-extents", str(write_extents(tmp_path / "changed.txt", pending))]
            elif mode == "scan":
                args.append("--hash-scan")
            return subprocess.run([sys.executable, "-m", "standby.cli.main", *args], capture_output=True,
                                  text=True, env=env, timeout=120)

        def assert_out_of_space(r: subprocess.CompletedProcess[str], c: str) -> None:
            assert r.returncode == 7, f"{c}: exit {r.returncode}: {r.stderr}\n{log.read_text()[-2000:]}"
            assert "out of space" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr, r.stderr

        # 1. the initial seed does not fit; space is freed; it resumes
        filler = _fill(small_fs, 3 * MiB)
        c = f"seed {SEED} full disk: initial seed"
        r = replicate("auto", set())
        assert_out_of_space(r, c)
        probe(to, ctx_tls, disk_id, size)
        replica.check(None, must_add=False, ctx=c)
        filler.unlink()
        catch = CatchUp(replica, img, store / "disks" / disk_id)
        r = replicate("auto", set())
        assert r.returncode == 0, r.stderr
        catch.check(json.loads(r.stdout), None, c + ": after freeing space")
        print(f"{c}: {catch.durable} blocks were durable when the disk filled up")

        # 2. deltas that do not fit: on a nearly full disk, or leaving room for the data but
        #    not for the commit's metadata
        failures = 0
        struck: Counter[str] = Counter()
        cases = [(40, 16 * 1024), (40, 1024 * 1024), (8, 8 * BLOCK_SIZE + 64 * 1024),
                 (8, 8 * BLOCK_SIZE + 160 * 1024), (20, 300 * 1024), (8, 8 * BLOCK_SIZE)]
        rng.shuffle(cases)
        remount_case = rng.randrange(len(cases))
        pending: set[int] = set()
        for k, (blocks, leave) in enumerate(cases):
            mode = rng.choice(["extents", "scan"])
            c = f"seed {SEED} full disk case {k}: {mode} of {blocks} blocks with {leave // 1024} KiB free"
            pending |= set(change_blocks(img, blocks, seed=rng.randrange(1 << 30), zero_some=False))
            source = hash_file(img)
            filler = _fill(small_fs, leave)
            r = replicate(mode, pending)
            before = replica.latest_seq
            if r.returncode == 0:
                pending = set()
                struck["fitted"] += 1
            else:
                assert_out_of_space(r, c)
                failures += 1
                # every block of the cycle durably staged: the disk filled up in the commit
                durable, _ = durable_staged_blocks(store / "disks" / disk_id)
                n_data = len(source.differing_blocks(replica.latest_table))
                struck["in commit" if durable == n_data else "while staging"] += 1
            probe(to, ctx_tls, disk_id, size)
            replica.check(source, must_add=r.returncode == 0, ctx=c)
            if r.returncode != 0:
                assert replica.latest_seq == before, f"{c}: a point appeared from the failed cycle"
            # free the space: delete the filler, or (once) remount the filesystem bigger
            if k == remount_case:
                res = subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], capture_output=True,
                                     text=True)
                assert res.returncode == 0, res.stderr
            else:
                filler.unlink()
            if r.returncode != 0:
                catch = CatchUp(replica, img, store / "disks" / disk_id)
                r2 = replicate(mode, pending)
                assert r2.returncode == 0, f"{c}: after freeing space: {r2.stderr}"
                catch.check(json.loads(r2.stdout), len(pending) if mode == "extents" else None,
                            c + ": after freeing space")
                pending = set()
            filler.unlink(missing_ok=True)
            replica.prune(KEEP_POINTS)
        print(f"fault injection: full disk: deltas {dict(struck)}")
        assert failures >= 4, f"only {failures} cycles ran out of space"
        replica.compare_latest_with(img, tmp_path)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


@pytest.mark.slow
def test_sender_stops_soon_after_the_agent_fails_the_cycle(tmp_path: Path, pki: dict[str, tls.Identity],
                                                          small_fs: Path) -> None:
    from standby.domain.bandwidth import Schedule
    from standby.errors import OutOfSpace

    img = tmp_path / "src.img"
    img.write_bytes(os.urandom(48 * MiB))  # about 3 s at 16 MiB/s; the store has room for 1 MiB
    _fill(small_fs, 1 * MiB)
    with running_agent(small_fs / "store", pki["agent"]) as rx:
        proxy = CuttingProxy(("127.0.0.1", rx.address[1]), budget=1 << 40)  # counts, never cuts
        try:
            with pytest.raises(StandbyError) as info:
                run_cycle(FullSource(img), f"127.0.0.1:{proxy.address[1]}", tls.client_context(pki["sender"]),
                          "big", SenderOptions(streams=1, schedule=Schedule.parse("00:00-24:00=16MiB/s")))
        finally:
            proxy.close()
    assert isinstance(info.value, OutOfSpace), info.value
    # it stopped mid-image, not after sending all 48 MiB into the agent's linger
    assert proxy.forwarded < 16 * MiB, f"the sender sent {proxy.forwarded} bytes after the agent ran out of space"
