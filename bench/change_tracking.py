#!/usr/bin/env python
"""Benchmark of change tracking (issue 4): what a replication cycle of a VM reads from
QEMU when 1% of its disk changed, against a full-disk hash scan of the same disk.

    .venv/bin/python bench/change_tracking.py [--json] [--runs N] [--size-mib M]

Setup: a 1 GiB qcow2 disk (default), half of it written with random data in 4 MiB runs,
under a libvirt domain started paused (no guest OS needed: QEMU's monitor writes into
the disk), replicated with `replicate_vm` (LibvirtDriver: checkpoint + pull-mode backup
over NBD read with libnbd; the data plane's sender) to an agent on loopback mutual TLS.

Each run: 1% of the disk's 64 KiB blocks rewritten at random through the QEMU monitor,
then an incremental cycle (the dirty bitmap's extents); then another 1% change and a
cycle forced to a hash scan of the whole disk (the replica's point is forgotten, so the
changed extents cannot be trusted). Reported (medians over the runs): bytes read from
the NBD export and cycle time (begin_cycle to the committed point and complete_cycle)
for both, the fraction of the disk read, and the ratio of the cycle times. The first
(seed) cycle is reported too. Needs root and libvirt (it starts libvirtd if needed);
everything it creates is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from standby.drivers.libvirt.driver import LibvirtDriver  # noqa: E402
from standby.agent.replicate import VmCycleResult, replicate_vm  # noqa: E402
from standby.replication import tls  # noqa: E402
from standby.replication.digest import BLOCK_SIZE  # noqa: E402
from standby.replication.receiver import Receiver  # noqa: E402
from standby.replication.store import ReplicaStore  # noqa: E402
from standby.testing import guest, libvirtd  # noqa: E402

MiB = 1 << 20


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_image(path: Path, size: int, rnd: random.Random) -> int:
    """A qcow2 image with half of its 4 MiB runs written with random data."""
    raw = path.with_suffix(".raw")
    written = 0
    with open(raw, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 4 * MiB):
            if rnd.random() < 0.5:
                f.seek(off)
                f.write(rnd.randbytes(min(4 * MiB, size - off)))
                written += min(4 * MiB, size - off)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return written


def change(dom: Any, size: int, fraction: float, rnd: random.Random) -> int:
    import libvirt_qemu

    n = size // BLOCK_SIZE
    blocks = rnd.sample(range(n), max(1, int(n * fraction)))
    for b in blocks:
        libvirt_qemu.qemuMonitorCommand(
            dom, f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend '
                 f'"write -P {rnd.randrange(1, 255)} {b * BLOCK_SIZE} {BLOCK_SIZE}"',
            libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    return len(blocks)


def timed_cycle(drv: LibvirtDriver, vm: str, ep: str, ctx: Any, state: Path) -> tuple[VmCycleResult, float]:
    t0 = time.perf_counter()
    res = replicate_vm(drv, vm, ep, ctx, state)
    return res, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object of named figures")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--fraction", type=float, default=0.01)
    a = ap.parse_args(argv)
    size = a.size_mib * MiB
    rnd = random.Random(4)
    libvirtd.ensure_running()
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    tmp = Path(tempfile.mkdtemp(prefix="standby-bench-ct-", dir="/var/tmp"))
    conn = libvirt.open(libvirtd.URI)
    dom = None
    rx = None
    try:
        tls.init_ca(tmp / "ca")
        agent_id = tls.issue(tmp / "ca", "agent", ["127.0.0.1"])
        sender_id = tls.issue(tmp / "ca", "sender", ["127.0.0.1"])
        rx = Receiver(ReplicaStore(tmp / "store"), tls.server_context(agent_id), "127.0.0.1", 0)
        rx.start()
        ep = f"127.0.0.1:{rx.address[1]}"
        ctx = tls.client_context(sender_id)
        disk = tmp / "vda.qcow2"
        log(f"making a {a.size_mib} MiB image (half random data)")
        data_bytes = make_image(disk, size, rnd)
        name = f"standby-bench-ct-{os.getpid()}"
        dom = conn.defineXML(guest.domain_xml(name, disk, tmp / "console.log", guest.build(), guest.cmdline("verify")))
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        drv = LibvirtDriver(libvirtd.URI, tmp / "tracking", conn=conn)
        state = tmp / "repl"
        seed, seed_s = timed_cycle(drv, name, ep, ctx, state)
        log(f"seed: {seed_s:.2f} s, read {seed.disks[0].nbd_bytes_read} bytes")
        inc_s: list[float] = []
        inc_read: list[int] = []
        scan_s: list[float] = []
        scan_read: list[int] = []
        changed = 0
        for run in range(a.runs):
            changed = change(dom, size, a.fraction, rnd)
            res, secs = timed_cycle(drv, name, ep, ctx, state)
            d = res.disks[0]
            assert d.kind == "extents", d.as_dict()
            inc_s.append(secs)
            inc_read.append(d.nbd_bytes_read or 0)
            change(dom, size, a.fraction, rnd)
            st_file = next(state.glob("vm-*.json"))
            st = json.loads(st_file.read_text())
            st["points"] = {}
            st_file.write_text(json.dumps(st))
            res, secs = timed_cycle(drv, name, ep, ctx, state)
            d = res.disks[0]
            assert d.kind == "hash_scan", d.as_dict()
            scan_s.append(secs)
            scan_read.append(d.nbd_bytes_read or 0)
            log(f"run {run + 1}: incremental {inc_s[-1]:.3f} s / {inc_read[-1]} bytes; "
                f"hash scan {scan_s[-1]:.3f} s / {scan_read[-1]} bytes")
        med = statistics.median
        figures = {
            "disk_bytes": size, "data_bytes": data_bytes, "changed_blocks_per_cycle": changed,
            "changed_fraction": a.fraction, "runs": a.runs,
            "incremental_nbd_bytes_read": int(med(inc_read)),
            "incremental_fraction_of_disk_read": round(med(inc_read) / size, 5),
            "incremental_cycle_s": round(med(inc_s), 4),
            "hash_scan_nbd_bytes_read": int(med(scan_read)),
            "hash_scan_cycle_s": round(med(scan_s), 4),
            "hash_scan_vs_incremental_time": round(med(scan_s) / med(inc_s), 1),
            "seed_cycle_s": round(seed_s, 3),
        }
        if a.json:
            print(json.dumps(figures))
        else:
            for k, v in figures.items():
                print(f"{k:36} {v}")
        return 0
    finally:
        if dom is not None:
            try:
                if dom.isActive():
                    dom.destroy()
                for cp in dom.listAllCheckpoints():
                    cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
                dom.undefine()
            except libvirt.libvirtError:
                pass
        if rx is not None:
            rx.stop()
        conn.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
