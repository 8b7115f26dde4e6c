#!/usr/bin/env python
"""RPO on real guests (issue 11): what a failover on the secondary would lose, measured.

    .venv/bin/python bench/rpo.py [--json] [--minutes M] [--rates 1,5] [--peer-minutes P]

One control plane and two agents as processes on this machine (`LocalDeployment`, loopback
mutual TLS host to host, the agents timing their own cycles), and for each write rate R
(MiB/s, default 1 and 5) a real test guest (`mode=stream`: 1 MiB O_DIRECT writes at R MiB/s
round its first 256 MiB) protected under a policy whose copy frequency the bench sets to
continuous, then to 30 s. For each, after a warm-up, the RPO on the secondary (now minus
the time its newest whole point was taken, `standby.testing.rpo`) is sampled every second
for M minutes (default 5): p50, p99 and max.

The peer, measured in the same run on the same guest: a loop of `rsync --inplace
--no-whole-file --ignore-times` of the guest's disk to a copy (what a cron job would do), its RPO at each
sample being now minus the start of the last pass that finished (for P minutes, default
2). Ratio: rsync_p99 / continuous_p99 per rate. The guest's achieved write rate is
reported too (an emulated guest may not reach R).

Targets (issue 11): continuous p99 <= 5 s at 5 MiB/s, 30 s policy p99 <= 35 s. The bench
reports; it does not assert. Everything it creates (a temp dir under /var/tmp, processes,
domains) is removed at the end, also on Ctrl-C. Needs root (libvirtd).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from standby.demo.local import LocalDeployment  # noqa: E402
from standby.testing import guest  # noqa: E402
from standby.testing import libvirtd as libvirtd_mod  # noqa: E402
from standby.testing.rpo import RpoSampler, percentile  # noqa: E402

DISK_MIB = 256
WARMUP_S = 20.0
MODES = {"continuous": 0, "30s": 30}


def _summary(samples: list[float]) -> dict[str, float]:
    finite = [s for s in samples if s != float("inf")]
    if not finite:
        return {"samples": len(samples), "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    ordered = sorted(samples)
    return {"samples": len(samples), "p50": round(ordered[len(ordered) // 2], 2),
            "p99": round(percentile(samples, 99), 2), "max": round(max(samples), 2)}


def _rsync_peer(disk: Path, dest: Path, seconds: float) -> dict[str, Any]:
    """RPO of an rsync loop of `disk` over `seconds`: sampled every second."""
    last_done: list[float] = []
    stop = threading.Event()
    passes: list[float] = []

    def loop() -> None:
        while not stop.is_set():
            t0 = time.time()
            # --ignore-times: rsync's quick check compares mtimes to the second, and the guest
            # writes within the second the last pass ended: without it most passes copy nothing
            subprocess.run(["rsync", "--inplace", "--no-whole-file", "--ignore-times", str(disk), str(dest)],
                           check=True, capture_output=True)
            last_done.append(t0)
            passes.append(time.time() - t0)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    samples: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(1.0)
        samples.append(time.time() - last_done[-1] if last_done else float("inf"))
    stop.set()
    t.join(600)
    out = _summary(samples)
    out["passes"] = len(passes)
    out["pass_median_s"] = round(sorted(passes)[len(passes) // 2], 2) if passes else None
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    if libvirtd_mod.available() is not None:
        raise SystemExit(f"bench/rpo.py: {libvirtd_mod.available()}")
    started = libvirtd_mod.ensure_running()
    image = guest.build()
    import libvirt

    conn = libvirt.open(libvirtd_mod.URI)
    work = Path(tempfile.mkdtemp(prefix="standby-rpo-", dir="/var/tmp"))
    prefix = f"sbb-rpo{uuid.uuid4().hex[:4]}-"
    d = LocalDeployment(work / "dep", tick_seconds=1, heartbeat_timeout=30, libvirt_uri=libvirtd_mod.URI)
    results: dict[str, Any] = {"params": {"minutes": args.minutes, "rates_MiBps": args.rates,
                                          "peer_minutes": args.peer_minutes, "disk_MiB": DISK_MIB}}
    try:
        d.init()
        d.start_server()
        d.add_agent("host-a", cloud="primary", domains=[f"{prefix}*"])
        b = d.add_agent("host-b", cloud="secondary", domains=["sbb-none-*"])
        api = d.client()
        d.run_cli("policy", "create", "bench", "--copy-frequency", "continuous")
        d.run_cli("pair", "primary", "secondary", "--policy", "bench")
        for rate in args.rates:
            vm = f"{prefix}{rate}"
            disk = guest.create_disk(work / f"{vm}.qcow2", DISK_MIB)
            console = guest.Console(work / f"{vm}.log")
            dom = conn.defineXML(guest.domain_xml(vm, disk, work / f"{vm}.log", image,
                                                  guest.cmdline("stream", rate=rate, area_mib=DISK_MIB)))
            dom.create()
            console.wait_for(lambda c: c.streamed() >= 8, 180, alive=dom.isActive)
            d.wait_for(lambda: any(v["name"] == vm for v in api.get("/vms", params={"cloud": "primary"})["items"]),
                       120, f"{vm} in the inventory")
            api.patch("/policies/bench", json={"copy_frequency_seconds": 0})
            job = api.post("/items", json={"vm": vm, "policy": "bench"})["job"]["id"]
            if d.wait_job(job, 900)["state"] != "succeeded":
                raise SystemExit(f"protecting {vm} failed: {api.get(f'/jobs/{job}')}")
            per: dict[str, Any] = {}
            for mode, freq in MODES.items():
                api.patch("/policies/bench", json={"copy_frequency_seconds": freq})
                time.sleep(WARMUP_S)
                mib0, t0 = console.streamed(), time.monotonic()
                with RpoSampler(b.data_dir / "replicas", vm) as sampler:
                    time.sleep(args.minutes * 60)
                per[mode] = _summary(sampler.samples)
                per[mode]["guest_MiBps"] = round((console.streamed() - mib0) / (time.monotonic() - t0), 2)
                print(f"{rate} MiB/s, {mode}: RPO p50 {per[mode]['p50']} s, p99 {per[mode]['p99']} s, "
                      f"max {per[mode]['max']} s over {per[mode]['samples']} samples "
                      f"(guest wrote {per[mode]['guest_MiBps']} MiB/s)", file=sys.stderr)
            api.post(f"/items/{vm}/pause")
            mib0, t0 = console.streamed(), time.monotonic()
            per["rsync"] = _rsync_peer(disk, work / f"{vm}.rsync", args.peer_minutes * 60)
            per["rsync"]["guest_MiBps"] = round((console.streamed() - mib0) / (time.monotonic() - t0), 2)
            print(f"{rate} MiB/s, rsync loop: RPO p50 {per['rsync']['p50']} s, p99 {per['rsync']['p99']} s "
                  f"(a pass: {per['rsync']['pass_median_s']} s)", file=sys.stderr)
            c99 = per["continuous"]["p99"]
            per["rsync_vs_continuous_p99"] = round(per["rsync"]["p99"] / c99, 1) if c99 else None
            results[f"{rate}MiBps"] = per
            dom.destroy()
    finally:
        d.close()
        for dom in conn.listAllDomains():
            if dom.name().startswith(prefix):
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        conn.close()
        shutil.rmtree(work, ignore_errors=True)
        if started:
            libvirtd_mod.stop()
    five = results.get("5MiBps") or {}
    results["targets"] = {"continuous_p99_at_5MiBps_le_5s": (five.get("continuous") or {}).get("p99", 1e9) <= 5,
                          "30s_p99_le_35s": all((results[k].get("30s") or {}).get("p99", 1e9) <= 35
                                                for k in results if k.endswith("MiBps"))}
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--minutes", type=float, default=5.0, help="sampling time per mode and rate (default 5)")
    p.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")], default=[1, 5],
                   help="guest write rates, MiB/s (default 1,5)")
    p.add_argument("--peer-minutes", type=float, default=2.0, help="the rsync loop's sampling time (default 2)")
    args = p.parse_args()
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for key, per in res.items():
            if not key.endswith("MiBps"):
                continue
            for mode in (*MODES, "rsync"):
                m = per[mode]
                print(f"{key:>7} {mode:>10}: RPO p50 {m['p50']:>6} s  p99 {m['p99']:>6} s  max {m['max']:>6} s  "
                      f"({m['samples']} samples, guest {m['guest_MiBps']} MiB/s)")
            print(f"{key:>7} rsync p99 / continuous p99 = {per['rsync_vs_continuous_p99']}")
        print(f"targets: {res['targets']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
