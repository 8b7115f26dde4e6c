#!/usr/bin/env python
"""Benchmark of the replication data plane against rsync, the loopback TLS stream, the
disk and a WAN link, all measured in ONE run on the same data (issue 3).

    .venv/bin/python bench/replication.py [--json] [--runs N] [--quick]

Figures (medians of N runs, default 5; the slow figures take min(N, 3) runs):

(a) delta cycle: 1% of the 64 KiB blocks of a 1 GiB image changed at random (new
    text-like, random or zero content), replicated over loopback mutual TLS to an agent
    running as a separate process (`standby agent receive`), with the changed extents given (the
    hypervisor change source), applied and committed as a recovery point (the sender
    returns once the agent acknowledged the durable point); against `rsync --inplace
    --no-whole-file` of the same change to a copy of the image (both warm in page cache).
(b) hash-scan resync of the same change (every block read and digested, only differing
    blocks sent) to a second replica of the same image, against the same rsync figure.
(c) initial replication (seed) of a 2 GiB image, half zero blocks (written out: the file
    is not sparse), a quarter text-like, a quarter random, read cold; against the disk's
    cold read rate of that image and a plain TLS 1.3 stream over loopback (one connection,
    the same certificates, to a sink process), both measured in this run.
(d) a WAN: two network namespaces joined by a veth pair, tbf at 100 Mbit/s on each end,
    and the delaying proxy (50 ms each way) in front of the agent; a seed of a 512 MiB
    image of the same mix from a sender in one namespace to the agent in the other;
    against the link rate: a plain TCP stream through the same path (veth + tbf + proxy),
    timed by the sink from the first to the last byte. The WAN figure is the rate of
    bytes the sender put on the wire over the whole cycle (connect to committed point);
    the effective rate (image bytes per second, compression included) is reported too.

The sender of (a) and (b) runs as a long-running sender does: one `AgentLink` per disk,
its TLS streams kept open from cycle to cycle; `delta_oneshot_s` is the same change sent
by a one-shot `run_cycle` (connect, HELLO, state files read, hang up). Compression is the
policy default, "auto" (--compress on|off|auto).

Ratios: delta_vs_rsync = rsync / delta (target >= 20), resync_vs_rsync = rsync / resync
(>= 3), initial_fraction_of_limit = seed rate / min(disk read, loopback TLS) (>= 0.70),
wan_fraction_of_link = WAN wire rate / link rate (>= 0.85). The bench reports; it does not
assert. MB = 10^6 bytes. Everything it creates (temp dir under /var/tmp, processes,
namespaces) is removed at the end, also on Ctrl-C.

--json keys: delta_s, delta_oneshot_s, rsync_s, resync_s (medians, seconds);
delta_vs_rsync, delta_oneshot_vs_rsync, resync_vs_rsync; delta_blocks_changed,
delta_wire_bytes, resync_wire_bytes, rsync_literal_bytes; initial_MBps, initial_s,
disk_read_MBps, loopback_tls_MBps, initial_limit_MBps, initial_fraction_of_limit,
initial_fraction_of_limit_per_run (median of the runs' own ratios),
disk_read_while_writing_MBps and initial_fraction_of_disk_floor (context: the image read
cold while the replica's share is written to the same disk, the seed's I/O floor on a
one-disk machine), initial_wire_bytes; wan_link_MBps, wan_wire_MBps, wan_effective_MBps,
wan_s, wan_fraction_of_link; meets_targets, targets; runs (every run's raw figure);
params; and <phase>_error when a phase could not run (e.g. no root for namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from standby.replication import tls  # noqa: E402
from standby.replication.changes import ExtentSource, FullSource, HashScanSource  # noqa: E402
from standby.replication.digest import BLOCK_SIZE, hash_file  # noqa: E402
from standby.replication.sender import AgentLink, SenderOptions, run_cycle  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
MB = 1e6
TARGETS = {"delta_vs_rsync": 20.0, "resync_vs_rsync": 3.0, "initial_fraction_of_limit": 0.70,
           "wan_fraction_of_link": 0.85}
WAN_RATE_MBIT = 100
WAN_DELAY_MS = 50


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ---------------------------------------------------------------------------- data


def _text_pool(rnd: random.Random, size: int) -> bytes:
    """Pseudo-English: a Zipf-like vocabulary of made-up words, punctuation, numbers and
    line breaks (compresses about 2.5-3x with zstd -1, like logs or source text)."""
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0,
               1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
    vocab = ["".join(rnd.choices(letters, weights, k=rnd.randint(2, 11))) for _ in range(5000)]
    zipf = [1.0 / (k + 1) for k in range(len(vocab))]
    out = []
    n = 0
    while n < size:
        words = rnd.choices(vocab, zipf, k=4096)
        for j in range(0, len(words), 12):
            line = " ".join(words[j:j + 12])
            if rnd.random() < 0.3:
                line += f" {rnd.randint(0, 10**9)}"
            line += ".\n" if rnd.random() < 0.5 else ",\n"
            out.append(line)
            n += len(line)
    return "".join(out).encode()[:size]


class DataMaker:
    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.pool = _text_pool(self.rnd, 8 * MiB)

    def block(self, kind: str) -> bytes:
        if kind == "zero":
            return bytes(BLOCK_SIZE)
        if kind == "text":
            off = self.rnd.randrange(0, len(self.pool) - BLOCK_SIZE)
            return self.pool[off:off + BLOCK_SIZE]
        return self.rnd.randbytes(BLOCK_SIZE)

    def make_image(self, path: Path, size: int) -> dict[str, int]:
        """Half zero blocks, a quarter text-like, a quarter random, in runs of 1..64 blocks
        of one kind (disks have runs); zero blocks are written (the file is not sparse)."""
        n = size // BLOCK_SIZE
        kinds = ["zero"] * (n // 2) + ["text"] * (n // 4)
        kinds += ["random"] * (n - len(kinds))
        runs: list[list[str]] = []
        i = 0
        while i < n:
            k = self.rnd.randint(1, 64)
            runs.append(kinds[i:i + k])
            i += k
        self.rnd.shuffle(runs)
        counts = {"zero": 0, "text": 0, "random": 0}
        with open(path, "wb", buffering=0) as f:
            buf = bytearray()
            for run in runs:
                for kind in run:
                    buf += self.block(kind)
                    counts[kind] += 1
                if len(buf) >= 8 * MiB:
                    f.write(buf)
                    buf.clear()
            f.write(buf)
            os.fsync(f.fileno())
        return counts

    def change(self, path: Path, fraction: float) -> list[int]:
        """Rewrite `fraction` of the blocks, chosen at random: 1/8 become zero, the rest new
        text-like or random data in equal parts."""
        n = path.stat().st_size // BLOCK_SIZE
        blocks = sorted(self.rnd.sample(range(n), max(1, round(n * fraction))))
        fd = os.open(path, os.O_WRONLY)
        try:
            for i in blocks:
                r = self.rnd.random()
                kind = "zero" if r < 0.125 else "text" if r < 0.5625 else "random"
                os.pwrite(fd, self.block(kind), i * BLOCK_SIZE)
        finally:
            os.close(fd)
        return blocks


def drop_cache(path: Path) -> None:
    """Evict a file from the page cache: fsync (no dirty pages left), then DONTNEED."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    buf = bytearray(4 * MiB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def mixed_io_rate(path: Path, write_to: Path, write_bytes: int) -> float:
    """The image read cold while `write_bytes` are written and fsynced to `write_to` on
    the same disk, as a seed onto a replica store on the same disk does: image bytes per
    second until both are done (the floor of a seed on one disk)."""
    drop_cache(path)
    chunk = random.Random(3).randbytes(1 * MiB)
    done = threading.Event()

    def writer() -> None:
        fd = os.open(write_to, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(write_bytes // len(chunk)):
                os.write(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
            done.set()

    t0 = time.perf_counter()
    t = threading.Thread(target=writer)
    t.start()
    buf = bytearray(1 * MiB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    t.join()
    elapsed = time.perf_counter() - t0
    write_to.unlink()
    return path.stat().st_size / elapsed


def cold_read_rate(path: Path) -> float:
    drop_cache(path)
    buf = bytearray(1 * MiB)
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            total += n
    return total / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------- processes


class Procs:
    """Every process the bench starts, stopped at the end (each by its own pid)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, argv: list[str], logfile: Path, **kw: Any) -> subprocess.Popen[Any]:
        out = open(logfile, "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        out.close()
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[Any]) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)


def wait_for_line(logfile: Path, marker: str, proc: subprocess.Popen[Any], timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = logfile.read_text(errors="replace") if logfile.exists() else ""
        for line in text.splitlines():
            if marker in line:
                return line
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before '{marker}': {text[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for '{marker}' in {logfile}")


class Pki:
    def __init__(self, root: Path) -> None:
        tls.init_ca(root / "ca")
        self.agent = tls.issue(root / "ca", "agent", ["127.0.0.1", "localhost", "10.213.0.2"])
        self.sender = tls.issue(root / "ca", "sender", ["127.0.0.1", "10.213.0.1"])

    @staticmethod
    def args(ident: tls.Identity) -> list[str]:
        return ["--cert", str(ident.cert), "--key", str(ident.key), "--ca", str(ident.ca)]


def start_agent(procs: Procs, work: Path, name: str, pki: Pki, prefix: list[str] | None = None) -> tuple[
        subprocess.Popen[Any], int]:
    logfile = work / f"{name}.log"
    argv = (prefix or []) + [sys.executable, "-m", "standby.cli.main", "agent", "receive", "--listen", "127.0.0.1:0",
                             "--store", str(work / name)] + Pki.args(pki.agent)
    p = procs.start(argv, logfile, env=_env())
    line = wait_for_line(logfile, "agent listening on", p)
    port = int(line.split("agent listening on ")[1].split(",")[0].rsplit(":", 1)[1])
    return p, port


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))


# ---------------------------------------------------------------------------- plain streams

_LEN = struct.Struct(">Q")


def sink_main(args: argparse.Namespace) -> None:
    """A stream sink (TCP or TLS): per connection, read an 8-byte length then that many
    bytes into one buffer, answer with the seconds from the first to the last byte."""
    ctx = None
    if args.mode == "tls":
        ctx = tls.server_context(tls.Identity(Path(args.cert), Path(args.key), Path(args.ca)))
    host, port = args.listen.rsplit(":", 1)
    srv = socket.create_server((host, int(port)))
    print(f"sink listening on {srv.getsockname()[0]}:{srv.getsockname()[1]}", flush=True)
    buf = bytearray(4 * MiB)
    mv = memoryview(buf)
    while True:
        raw, _ = srv.accept()
        try:
            conn = ctx.wrap_socket(raw, server_side=True) if ctx else raw
            head = b""
            while len(head) < 8:
                more = conn.recv(8 - len(head))
                if not more:
                    raise ConnectionError("short header")
                head += more
            left = _LEN.unpack(head)[0]
            first = 0.0
            while left:
                n = conn.recv_into(mv[:min(left, len(buf))])
                if not n:
                    raise ConnectionError("closed early")
                if not first:
                    first = time.perf_counter()
                left -= n
            conn.sendall(struct.pack(">d", time.perf_counter() - first))
            conn.close()
        except (OSError, ssl.SSLError) as exc:
            print(f"sink: {exc}", flush=True)
            raw.close()


def stream_client(mode: str, host: str, port: int, nbytes: int, ctx: ssl.SSLContext | None) -> dict[str, float]:
    """Send `nbytes` over one connection; the sink's first-to-last-byte time and ours."""
    chunk = memoryview(random.Random(7).randbytes(1 * MiB))
    t0 = time.perf_counter()
    raw = socket.create_connection((host, port), timeout=60)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = ctx.wrap_socket(raw, server_hostname=host) if ctx else raw
    try:
        conn.sendall(_LEN.pack(nbytes))
        left = nbytes
        while left:
            n = min(left, len(chunk))
            conn.sendall(chunk[:n])
            left -= n
        reply = b""
        while len(reply) < 8:
            more = conn.recv(8 - len(reply))
            if not more:
                raise ConnectionError("sink closed without a reply")
            reply += more
    finally:
        conn.close()
    total = time.perf_counter() - t0
    sink_s = struct.unpack(">d", reply)[0]
    return {"bytes": nbytes, "seconds": total, "sink_seconds": sink_s, "rate": nbytes / sink_s}


def client_main(args: argparse.Namespace) -> None:
    host, port = args.to.rsplit(":", 1)
    print(json.dumps(stream_client(args.mode, host, int(port), args.bytes, None)))


# ---------------------------------------------------------------------------- phases


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.runs = args.runs if args.runs else (2 if args.quick else 5)
        self.slow_runs = min(self.runs, 3)
        scale = 4 if args.quick else 1
        self.delta_size = GiB // scale
        self.seed_size = 2 * GiB // scale
        self.wan_size = 512 * MiB // scale
        self.procs = Procs()
        self.work = Path(tempfile.mkdtemp(prefix="standby-bench-", dir=args.dir))
        self.out: dict[str, Any] = {}
        self.runs_raw: dict[str, list[float]] = {}
        self.data = DataMaker(seed=args.seed)
        self.compress = args.compress
        self.links: list[AgentLink] = []

    def cleanup(self) -> None:
        for link in self.links:
            link.close()
        self.procs.stop_all()
        shutil.rmtree(self.work, ignore_errors=True)

    def opts(self, state: Path, **kw: Any) -> SenderOptions:
        return SenderOptions(state_dir=state, compress=self.compress, **kw)

    # -- (a) and (b) ------------------------------------------------------------------
    def delta_and_resync(self, pki: Pki) -> None:
        w = self.work
        img = w / "delta.img"
        copy = w / "delta-copy.img"
        log(f"making a {self.delta_size // MiB} MiB image")
        self.data.make_image(img, self.delta_size)
        shutil.copyfile(img, copy)
        # rsync's quick check skips a file whose size and mtime (to the second) match. The
        # image is rewritten within the same second as the previous rsync, so `-t` keeps
        # the copy's mtime equal to the source's and every change below sets the source's
        # mtime explicitly to a new, distinct whole second: rsync always sees the change
        # and runs its delta algorithm (--checksum would change what rsync does).
        mtime = 1_600_000_000
        os.utime(img, (mtime, mtime))
        os.utime(copy, (mtime, mtime))
        agent, port = start_agent(self.procs, w, "store-delta", pki)
        ep = f"127.0.0.1:{port}"
        ctx = tls.client_context(pki.sender)
        state = w / "state-delta"
        # The sender runs as a long-running sender does: one AgentLink per disk, its
        # streams kept open from cycle to cycle. `delta_oneshot_s` is the same change
        # through a one-shot `run_cycle` (connect, HELLO, state files read, hang up).
        links = {d: AgentLink(ep, ctx, d, self.opts(state)) for d in ("delta", "resync")}
        self.links = list(links.values())
        log("seeding the delta and the resync replicas")
        for d in ("delta", "resync", "oneshot"):
            run_cycle(FullSource(img), ep, ctx, d, self.opts(state))
        for link in links.values():  # connect (HELLO) before the measured cycles
            link.run_cycle(HashScanSource(img))
        warm(img)
        warm(copy)
        deltas, scans, rsyncs, oneshots = [], [], [], []
        extra: dict[str, list[float]] = {"delta_wire_bytes": [], "resync_wire_bytes": [], "rsync_literal_bytes": []}
        for r in range(self.runs):
            changed = self.data.change(img, 0.01)
            mtime += 10
            os.utime(img, (mtime, mtime))
            extents = [(i * BLOCK_SIZE, BLOCK_SIZE) for i in changed]
            t0 = time.perf_counter()
            res = links["delta"].run_cycle(ExtentSource(img, extents))
            deltas.append(time.perf_counter() - t0)
            extra["delta_wire_bytes"].append(res.wire_bytes)
            t0 = time.perf_counter()
            res2 = links["resync"].run_cycle(HashScanSource(img))
            scans.append(time.perf_counter() - t0)
            extra["resync_wire_bytes"].append(res2.wire_bytes)
            t0 = time.perf_counter()
            res3 = run_cycle(ExtentSource(img, extents), ep, ctx, "oneshot", self.opts(state))
            oneshots.append(time.perf_counter() - t0)
            if not res.digest == res2.digest == res3.digest:
                raise WrongCopy(f"run {r + 1}: the replicas' digests differ: delta {res.digest}, resync "
                                f"{res2.digest}, one-shot {res3.digest}")
            t0 = time.perf_counter()
            p = subprocess.run(["rsync", "--inplace", "--no-whole-file", "-t", "--stats", str(img), str(copy)],
                               capture_output=True, text=True)
            rsyncs.append(time.perf_counter() - t0)
            literal = _rsync_stat(p.stdout, "Literal data")
            extra["rsync_literal_bytes"].append(literal)
            if p.returncode != 0 or literal == 0:
                raise WrongCopy(f"run {r + 1}: rsync did not sync the change (exit {p.returncode}, literal data "
                                f"{literal}): {p.stderr.strip()}")
            log(f"run {r + 1}/{self.runs}: {len(changed)} blocks changed; delta {deltas[-1] * 1e3:.1f} ms "
                f"(one-shot {oneshots[-1] * 1e3:.1f} ms) "
                f"({res.data_blocks} data + {res.zero_blocks} zero), resync {scans[-1] * 1e3:.1f} ms "
                f"({res2.data_blocks} data + {res2.zero_blocks} zero), rsync {rsyncs[-1] * 1e3:.0f} ms "
                f"({literal} literal bytes)")
        # both peers made a true copy, or no figure is reported: rsync's copy equals the
        # image, and so does Standby's replica (its digest, which the agent checked on commit)
        if _file_digest(img) != _file_digest(copy):
            raise WrongCopy("the rsync copy differs from the image")
        source = hash_file(img).disk_digest().hex()
        if res.digest != source:
            raise WrongCopy(f"the replica's latest point has digest {res.digest}, the image {source}")
        for link in links.values():
            link.close()
        self.procs.stop(agent)
        self.runs_raw.update(delta_s=deltas, resync_s=scans, rsync_s=rsyncs, delta_oneshot_s=oneshots)
        o = self.out
        o["delta_blocks_changed"] = len(changed)
        o["delta_s"] = median(deltas)
        o["delta_oneshot_s"] = median(oneshots)
        o["delta_oneshot_vs_rsync"] = median(rsyncs) / median(oneshots)
        o["resync_s"] = median(scans)
        o["rsync_s"] = median(rsyncs)
        o["delta_vs_rsync"] = o["rsync_s"] / o["delta_s"]
        o["resync_vs_rsync"] = o["rsync_s"] / o["resync_s"]
        o["delta_wire_bytes"] = int(median(extra["delta_wire_bytes"]))
        o["resync_wire_bytes"] = int(median(extra["resync_wire_bytes"]))
        o["rsync_literal_bytes"] = int(median(extra["rsync_literal_bytes"]))

    # -- (c) ------------------------------------------------------------------------------
    def initial(self, pki: Pki) -> None:
        w = self.work
        img = w / "seed.img"
        log(f"making a {self.seed_size // MiB} MiB image")
        counts = self.data.make_image(img, self.seed_size)
        want = hash_file(img).disk_digest().hex()
        agent, port = start_agent(self.procs, w, "store-seed", pki)
        ep = f"127.0.0.1:{port}"
        ctx = tls.client_context(pki.sender)
        sink_log = w / "sink-tls.log"
        sink = self.procs.start([sys.executable, __file__, "_sink", "--mode", "tls", "--listen", "127.0.0.1:0",
                                 *Pki.args(pki.agent)], sink_log, env=_env())
        sport = int(wait_for_line(sink_log, "sink listening on", sink).rsplit(":", 1)[1])
        disk, tlsr, seeds, wire, mixed = [], [], [], [], []
        for r in range(self.slow_runs):
            disk.append(cold_read_rate(img))
            mixed.append(mixed_io_rate(img, w / "mixed.bin", (counts["text"] + counts["random"]) * BLOCK_SIZE))
            tlsr.append(stream_client("tls", "127.0.0.1", sport, self.seed_size // 2, ctx)["rate"])
            drop_cache(img)
            t0 = time.perf_counter()
            res = run_cycle(FullSource(img), ep, ctx, f"seed{r}", self.opts(w / "state-seed"))
            seeds.append(self.seed_size / (time.perf_counter() - t0))
            if res.digest != want:
                raise WrongCopy(f"seed run {r + 1}: the replica has digest {res.digest}, the image {want}")
            wire.append(res.wire_bytes)
            log(f"run {r + 1}/{self.slow_runs}: disk read {disk[-1] / MB:.0f} MB/s (with the replica's writes "
                f"{mixed[-1] / MB:.0f} MB/s), loopback TLS "
                f"{tlsr[-1] / MB:.0f} MB/s, seed {seeds[-1] / MB:.0f} MB/s ({res.data_blocks} data + "
                f"{res.zero_blocks} zero blocks, {res.wire_bytes / MB:.0f} MB on the wire)")
        self.procs.stop(sink)
        self.procs.stop(agent)
        self.runs_raw.update(disk_read_MBps=[x / MB for x in disk], loopback_tls_MBps=[x / MB for x in tlsr],
                             initial_MBps=[x / MB for x in seeds], disk_read_while_writing_MBps=[x / MB for x in mixed])
        o = self.out
        o["initial_image_blocks"] = counts
        o["disk_read_MBps"] = median(disk) / MB
        o["loopback_tls_MBps"] = median(tlsr) / MB
        o["initial_MBps"] = median(seeds) / MB
        o["initial_s"] = self.seed_size / median(seeds)
        o["initial_wire_bytes"] = int(median(wire))
        o["initial_limit_MBps"] = min(o["disk_read_MBps"], o["loopback_tls_MBps"])
        o["initial_fraction_of_limit"] = o["initial_MBps"] / o["initial_limit_MBps"]
        # context: source and replica share this machine's one disk; reading the image
        # while writing the replica's data is the seed's I/O floor here
        o["disk_read_while_writing_MBps"] = median(mixed) / MB
        o["initial_fraction_of_disk_floor"] = o["initial_MBps"] / o["disk_read_while_writing_MBps"]
        o["initial_fraction_of_limit_per_run"] = median(
            [s / min(d, t) for s, d, t in zip(seeds, disk, tlsr)])

    # -- (d) ------------------------------------------------------------------------------
    def wan(self, pki: Pki) -> None:
        from standby.testing import netns

        why = netns.available()
        if why:
            self.out["wan_error"] = why
            log(f"WAN skipped: {why}")
            return
        w = self.work
        img = w / "wan.img"
        log(f"making a {self.wan_size // MiB} MiB image")
        self.data.make_image(img, self.wan_size)
        want = hash_file(img).disk_digest().hex()
        with netns.TwoSites(rate_mbit=WAN_RATE_MBIT, prefix="sbb") as sites:
            b = sites.command("b", [])
            agent, aport = start_agent(self.procs, w, "store-wan", pki, prefix=b)
            sink_log = w / "sink-tcp.log"
            sink = self.procs.start(b + [sys.executable, __file__, "_sink", "--mode", "tcp", "--listen",
                                         "127.0.0.1:0"], sink_log, env=_env())
            sport = int(wait_for_line(sink_log, "sink listening on", sink).rsplit(":", 1)[1])
            proxies = []
            for listen, target in ((9001, aport), (9002, sport)):
                proxies.append(self.procs.start(
                    b + [sys.executable, "-m", "standby.testing.wanproxy", "--listen", f"{sites.addr_b}:{listen}",
                         "--target", f"127.0.0.1:{target}", "--delay-ms", str(WAN_DELAY_MS)],
                    w / f"proxy-{listen}.log", env=_env()))
                _wait_listening(sites, listen, proxies[-1])
            a = sites.command("a", [])
            links, wires, effs, secs = [], [], [], []
            link_bytes = int(WAN_RATE_MBIT * 1e6 / 8 * (2 if self.quick else 5))
            for r in range(self.slow_runs):
                p = subprocess.run(a + [sys.executable, __file__, "_client", "--mode", "tcp", "--to",
                                        f"{sites.addr_b}:9002", "--bytes", str(link_bytes)],
                                   capture_output=True, text=True, env=_env(), timeout=300)
                if p.returncode:
                    raise RuntimeError(f"link stream failed: {p.stderr[-2000:]}")
                links.append(json.loads(p.stdout)["rate"])
                p = subprocess.run(a + [sys.executable, "-m", "standby.cli.main", "replicate", str(img), "--to",
                                        f"{sites.addr_b}:9001", "--disk-id", f"wan{r}", "--seed", "--json",
                                        "--state-dir", str(w / "state-wan"), *_compress_flag(self.compress),
                                        *Pki.args(pki.sender)],
                                   capture_output=True, text=True, env=_env(), timeout=1800)
                if p.returncode:
                    raise RuntimeError(f"WAN replication failed: {p.stderr[-2000:]}")
                res = json.loads(p.stdout)
                if res.get("digest") != want:
                    raise WrongCopy(f"WAN run {r + 1}: the replica has digest {res.get('digest')}, the image {want}")
                secs.append(res["seconds"])
                wires.append(res["wire_bytes"] / res["seconds"])
                effs.append(self.wan_size / res["seconds"])
                log(f"run {r + 1}/{self.slow_runs}: link {links[-1] / MB:.2f} MB/s, WAN seed {res['seconds']:.1f} s, "
                    f"{wires[-1] / MB:.2f} MB/s on the wire ({wires[-1] / links[-1]:.0%} of the link), "
                    f"{effs[-1] / MB:.2f} MB/s of image")
            for p in proxies + [sink, agent]:
                self.procs.stop(p)
        self.runs_raw.update(wan_link_MBps=[x / MB for x in links], wan_wire_MBps=[x / MB for x in wires],
                             wan_effective_MBps=[x / MB for x in effs], wan_s=secs)
        o = self.out
        o["wan_link_MBps"] = median(links) / MB
        o["wan_wire_MBps"] = median(wires) / MB
        o["wan_effective_MBps"] = median(effs) / MB
        o["wan_s"] = median(secs)
        o["wan_fraction_of_link"] = o["wan_wire_MBps"] / o["wan_link_MBps"]

    def run(self) -> dict[str, Any]:
        pki = Pki(self.work / "pki")
        phases = [("delta", self.delta_and_resync), ("initial", self.initial), ("wan", self.wan)]
        only = set(self.args.only.split(",")) if self.args.only else None
        for name, fn in phases:
            if only and name not in only:
                continue
            t0 = time.perf_counter()
            try:
                fn(pki)
            except Exception as exc:  # noqa: BLE001 - the bench reports, it does not stop
                self.out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
                log(f"{name} failed: {exc}")
            log(f"{name} phase took {time.perf_counter() - t0:.0f} s")
        o = self.out
        o["meets_targets"] = {k: (o[k] >= v if k in o else None) for k, v in TARGETS.items()}
        o["targets"] = TARGETS
        o["runs"] = self.runs_raw
        o["params"] = {"runs": self.runs, "slow_runs": self.slow_runs, "quick": self.quick,
                       "delta_image_bytes": self.delta_size, "seed_image_bytes": self.seed_size,
                       "wan_image_bytes": self.wan_size, "block_size": BLOCK_SIZE, "compress": self.compress,
                       "wan_rate_mbit": WAN_RATE_MBIT, "wan_delay_ms_each_way": WAN_DELAY_MS,
                       "cpus": os.cpu_count(), "workdir_fs": _fs_type(self.work)}
        return o


def _compress_flag(compress: str) -> list[str]:
    return {"on": [], "off": ["--no-compress"]}.get(compress, ["--compress", compress])


def _wait_listening(sites: Any, port: int, proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = sites.run("b", ["ss", "-Hltn", f"sport = :{port}"]).stdout
        if out.strip():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"proxy on port {port} exited")
        time.sleep(0.05)
    raise RuntimeError(f"proxy on port {port} did not listen")


def _rsync_stat(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split(":", 1)[1].split()[0].replace(",", ""))
    return -1


def _file_digest(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    buf = bytearray(4 * MiB)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(mv[:n])
    return h.hexdigest()


def _fs_type(path: Path) -> str:
    best, fs = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fs = parts[1], parts[2]
    return fs


def _fmt(o: dict[str, Any]) -> str:
    def g(k: str, fmt: str = "{:.3f}") -> str:
        return fmt.format(o[k]) if k in o else "n/a"

    def verdict(k: str) -> str:
        m = o["meets_targets"].get(k)
        return "n/a" if m is None else ("MEETS" if m else "MISSES")

    rows = [
        ("(a) delta cycle, 1% of the blocks, extents given", f"{g('delta_s', '{:.4f}')} s", ""),
        ("    the same, one-shot sender (no kept link)", f"{g('delta_oneshot_s', '{:.4f}')} s", ""),
        ("    rsync --inplace --no-whole-file", f"{g('rsync_s')} s", ""),
        ("    delta_vs_rsync (>= 20x)", f"{g('delta_vs_rsync', '{:.1f}')}x", verdict("delta_vs_rsync")),
        ("(b) hash-scan resync of the same change", f"{g('resync_s', '{:.4f}')} s", ""),
        ("    resync_vs_rsync (>= 3x)", f"{g('resync_vs_rsync', '{:.1f}')}x", verdict("resync_vs_rsync")),
        ("(c) initial replication (seed)", f"{g('initial_MBps', '{:.0f}')} MB/s", ""),
        ("    disk read, cold", f"{g('disk_read_MBps', '{:.0f}')} MB/s", ""),
        ("    loopback TLS 1.3, one stream", f"{g('loopback_tls_MBps', '{:.0f}')} MB/s", ""),
        ("    disk read while writing the replica's data", f"{g('disk_read_while_writing_MBps', '{:.0f}')} MB/s",
         ""),
        ("    initial_fraction_of_limit (>= 0.70)", g("initial_fraction_of_limit", "{:.2f}"),
         verdict("initial_fraction_of_limit")),
        ("(d) WAN seed, wire rate", f"{g('wan_wire_MBps', '{:.2f}')} MB/s", ""),
        ("    WAN seed, image bytes per second", f"{g('wan_effective_MBps', '{:.2f}')} MB/s", ""),
        ("    link (TCP through tbf + proxy)", f"{g('wan_link_MBps', '{:.2f}')} MB/s", ""),
        ("    wan_fraction_of_link (>= 0.85)", g("wan_fraction_of_link", "{:.2f}"), verdict("wan_fraction_of_link")),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [f"{a:<{w}}  {b:>14}  {c}" for a, b, c in rows]
    for k, v in o.items():
        if k.endswith("_error"):
            lines.append(f"{k}: {v}")
    p = o["params"]
    lines.append(f"medians of {p['runs']} runs ({p['slow_runs']} for (c) and (d)); MB = 10^6 bytes; "
                 f"work dir on {p['workdir_fs']}")
    return "\n".join(lines)


class WrongCopy(RuntimeError):
    """A peer's copy is not the source: its speed means nothing."""


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_sink", "_client"):
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        ap.add_argument("--mode", choices=["tcp", "tls"], default="tcp")
        ap.add_argument("--listen", default="127.0.0.1:0")
        ap.add_argument("--to")
        ap.add_argument("--bytes", type=int, default=0)
        ap.add_argument("--cert")
        ap.add_argument("--key")
        ap.add_argument("--ca")
        a = ap.parse_args()
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        (sink_main if a.cmd == "_sink" else client_main)(a)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--runs", type=int, default=0, help="runs per figure (default 5; slow figures min(N, 3))")
    ap.add_argument("--quick", action="store_true", help="images a quarter of the size, 2 runs")
    ap.add_argument("--only", default="", help="comma-separated phases: delta,initial,wan")
    ap.add_argument("--dir", default="/var/tmp", help="where the temp dir goes (a real disk, not tmpfs)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--compress", default="auto", help="sender compression: on, off or auto")
    args = ap.parse_args()
    bench = Bench(args)

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        out = bench.run()
    except WrongCopy as exc:
        print(f"bench/replication.py: no figures: {exc}", file=sys.stderr)
        sys.exit(1)
    finally:
        bench.cleanup()
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True))
    else:
        print(_fmt(out))


if __name__ == "__main__":
    main()
