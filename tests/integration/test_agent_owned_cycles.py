"""Agents own their cycles (issue 11), end to end: a control plane, two agents as processes
(`LocalDeployment`), real guests under libvirt. The primary agent reaches the control plane
through a proxy the test can cut; replication goes host to host and never through it.

- Two powered-off VMs seeded at once under the pair's 10 MiB/s window share it: together,
  from their cycle reports, they stay under 11 MiB/s (the limit + 10%).
- A running guest under continuous replication: the RPO the secondary holds (now minus the
  time its newest whole point was taken), sampled every second, stays under 15 s; the
  agent cut off the control plane for two minutes keeps making points (the RPO stays under
  15 s on the secondary all along), says so in its log, the control plane raises its
  heartbeat and RPO alerts, then catches up when the link returns: every point the
  secondary holds was reported once, the item's latest point is the secondary's, the alerts
  clear, and the point holds every record the guest acknowledged.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from replication_helpers import CuttingProxy  # noqa: E402

from standby.agent.config import AgentConfig  # noqa: E402
from standby.demo.local import AgentHandle, LocalDeployment  # noqa: E402
from standby.contract import disk_id_for  # noqa: E402
from standby.replication.store import ReplicaStore  # noqa: E402
from standby.testing import guest  # noqa: E402
from standby.testing.rpo import RpoSampler  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MiB = 1 << 20
LIMIT = 10 * MiB
CUT_SECONDS = 120.0
RPO_BOUND = 15.0


@dataclass
class Site:
    d: LocalDeployment
    a: AgentHandle
    b: AgentHandle
    proxy: CuttingProxy
    conn: Any
    image: guest.GuestImage
    vm_dir: Path
    prefix: str
    pairing: int

    def vm(self, tag: str) -> str:
        return f"{self.prefix}{tag}"

    def points(self, vm: str) -> list[Any]:
        try:
            return ReplicaStore(self.b.data_dir / "replicas").disk(disk_id_for(vm, "vda")).points()
        except Exception:  # noqa: BLE001 - no replica yet
            return []

    def details(self, vm: str) -> dict[str, Any]:
        from standby.store.db import open_store, sqlite_url
        from standby.store.repo import items

        store = open_store(sqlite_url(self.d.server_dir), migrate=False)
        try:
            with store.read() as s:
                item = items.get(s, self.d.item(vm)["id"])
                return dict(item.details or {})
        finally:
            store.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, libvirtd: str, libvirt_conn: Any,
         guest_image: guest.GuestImage) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("owned")
    vm_dir = root / "vm"
    vm_dir.mkdir()
    prefix = f"sbt-oc{uuid.uuid4().hex[:4]}-"
    d = LocalDeployment(root / "dep", tick_seconds=1, heartbeat_timeout=10, libvirt_uri=libvirtd)
    proxy: CuttingProxy | None = None
    try:
        d.init()
        d.start_server()
        proxy = CuttingProxy(("127.0.0.1", d.port), budget=1 << 62)
        a = d.add_agent("host-a", cloud="primary", domains=[f"{prefix}*"], start=False)
        cfg = AgentConfig.load(a.data_dir)
        cfg.server_url = f"https://127.0.0.1:{proxy.address[1]}"  # its way to the control plane: the proxy
        cfg.save()
        d.start_agent("host-a")
        b = d.add_agent("host-b", cloud="secondary", domains=["sbt-none-*"])
        d.run_cli("policy", "create", "continuous", "--copy-frequency", "continuous",
                  "--keep-all-points-minutes", "60", "--rpo-alert-seconds", "30")
        d.run_cli("policy", "create", "quarterly", "--copy-frequency", "15m")
        pairing = json.loads(d.run_cli("pair", "primary", "secondary", "--policy", "continuous", "--json").stdout)
        d.client().post(f"/pairings/{pairing['id']}/policies", json={"policy": "quarterly"})
        yield Site(d, a, b, proxy, libvirt_conn, guest_image, vm_dir, prefix, int(pairing["id"]))
    finally:
        d.close()
        if proxy is not None:
            proxy.close()
        import libvirt

        for dom in libvirt_conn.listAllDomains():
            if dom.name().startswith(prefix):
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)


def _random_disk(path: Path, size: int) -> Path:
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))  # incompressible: the wire carries what the disk holds
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return path


def _listed(site: Site, vm: str) -> Callable[[], bool]:
    def pred() -> bool:
        return any(v["name"] == vm for v in site.d.client().get("/vms", params={"cloud": "primary"})["items"])
    return pred


def _protect(site: Site, vm: str, policy: str) -> int:
    return int(json.loads(site.d.run_cli("protect", vm, "--policy", policy, "--json", "--no-wait").stdout)["job"]["id"])


def test_two_vms_share_the_pairs_bandwidth_window(site: Site) -> None:
    d = site.d
    vms = [site.vm("bw1"), site.vm("bw2")]
    for vm in vms:
        disk = _random_disk(site.vm_dir / f"{vm}-vda.qcow2", 40 * MiB)
        site.conn.defineXML(guest.domain_xml(vm, disk, site.vm_dir / f"{vm}.log", site.image,
                                             guest.cmdline("write")))  # defined, never started
    for vm in vms:
        d.wait_for(_listed(site, vm), 90, f"{vm} in the inventory", log=site.a.process)
    out = json.loads(d.run_cli("pair-bandwidth", str(site.pairing), "00:00-24:00=10MiB/s", "--json").stdout)
    assert out["bandwidth"] == "00:00-24:00=10MiB/s"
    jobs = [_protect(site, vm, "quarterly") for vm in vms]
    for job in jobs:
        assert d.wait_job(job, 180)["state"] == "succeeded"
    reports = [site.details(vm)["last_report"] for vm in vms]  # each VM's seed (the next is 15 min away)
    assert all(r["ok"] and r["bytes_sent"] >= 40 * MiB for r in reports), reports
    first, last = min(r["started_at"] for r in reports), max(r["finished_at"] for r in reports)
    total = sum(r["bytes_sent"] for r in reports)
    rate = total / (last - first)
    # both ran at once, so they shared the window rather than taking turns
    assert reports[0]["started_at"] < reports[1]["finished_at"] and reports[1]["started_at"] < reports[0]["finished_at"]
    assert rate <= LIMIT * 1.10, f"{rate / MiB:.2f} MiB/s together, over the 10 MiB/s window"
    print(f"\ntwo seeds under a 10 MiB/s window: {total / MiB:.1f} MiB in {last - first:.1f} s = "
          f"{rate / MiB:.2f} MiB/s together")
    d.run_cli("pair-bandwidth", str(site.pairing), "unlimited")


def _sample(site: Site, vm: str, seconds: float, also: Callable[[], None] | None = None) -> list[float]:
    """The secondary's RPO of `vm`, every second for `seconds` (running `also` meanwhile)."""
    with RpoSampler(site.b.data_dir / "replicas", vm) as sampler:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if also is not None:
                also()
            time.sleep(1.0)
    return sampler.samples


def _open_alerts(site: Site) -> set[tuple[str, str]]:
    return {(a["kind"], a["subject"]) for a in site.d.client().get("/alerts", params={"open": "true"})["items"]}


def test_continuous_rpo_and_two_minutes_cut_off_the_control_plane(site: Site) -> None:
    d, api = site.d, site.d.client()
    vm = site.vm("rpo")
    disk = guest.create_disk(site.vm_dir / f"{vm}-vda.qcow2", 32)
    console = guest.Console(site.vm_dir / f"{vm}.log")
    dom = site.conn.defineXML(guest.domain_xml(vm, disk, site.vm_dir / f"{vm}.log", site.image,
                                               guest.cmdline("write", rate=20)))
    dom.create()
    console.wait_for(lambda c: c.acked() >= 5, 120, alive=dom.isActive)
    d.wait_for(_listed(site, vm), 90, f"{vm} in the inventory", log=site.a.process)
    assert d.wait_job(_protect(site, vm, "continuous"), 300)["state"] == "succeeded"

    # continuous replication with the control plane there
    steady = _sample(site, vm, 45)
    assert max(steady) < RPO_BOUND, steady
    item_id = d.item(vm)["id"]

    # two minutes without the control plane: points keep coming, the control plane notices
    log_before = len(site.a.process.log.read_text(errors="replace"))
    n_before = len(site.points(vm))
    seen: set[tuple[str, str]] = set()
    site.proxy.cut_all()
    cut = _sample(site, vm, CUT_SECONDS, also=lambda: seen.update(_open_alerts(site)))
    n_cut = len(site.points(vm))
    acked = console.acked()
    site.proxy.cut.clear()
    assert max(cut) < RPO_BOUND, cut
    assert n_cut - n_before >= CUT_SECONDS / RPO_BOUND, (n_before, n_cut)
    assert ("heartbeat_lost", "agent:host-a") in seen, seen
    rpo_alert = [k for k in seen if k[1] == f"item:{vm}" and "rpo" in k[0]]
    assert rpo_alert, seen
    log = site.a.process.log.read_text(errors="replace")[log_before:]
    assert "cut off from the control plane: replicating under the last desired state" in log, log[-3000:]

    # the link back: the control plane catches up and clears its alerts
    def caught_up() -> bool:
        item = d.item(vm)
        newest = max(site.points(vm), key=lambda p: p.created_at)
        return item["last_recovery_point_id"] is not None and int(item["last_recovery_point_id"]) >= newest.seq
    d.wait_for(caught_up, 60, "the control plane to hear of the points made while cut off", log=d.server)
    d.wait_for(lambda: not ({("heartbeat_lost", "agent:host-a"), *rpo_alert} & _open_alerts(site)), 60,
               "the alerts to clear", log=d.server)
    assert d.item(vm)["rpo_seconds"] < RPO_BOUND

    # no gap: paused, the agent stops; every point the secondary holds was reported once
    api.post(f"/items/{vm}/pause")
    d.wait_for(lambda: site.details(vm).get("points_made") == len(site.points(vm)), 60,
               "the reports to match the secondary's points", log=site.a.process)
    time.sleep(3)
    assert site.details(vm).get("points_made") == len(site.points(vm))
    assert d.item(vm)["id"] == item_id

    # the newest point holds every record the guest acknowledged before the link came back
    replica = ReplicaStore(site.b.data_dir / "replicas").disk(disk_id_for(vm, "vda"))
    newest = max(replica.points(), key=lambda p: p.created_at)
    overlay = replica.materialize(newest.id, site.vm_dir / "newest.qcow2")
    try:
        verdict = guest.verify_image(overlay)
    finally:
        replica.release(overlay)
    assert verdict.ok and verdict.last >= acked, verdict.line()
    print(f"\ncontinuous RPO on the secondary: median {statistics.median(steady):.1f} s, max {max(steady):.1f} s; "
          f"cut off {CUT_SECONDS:.0f} s: median {statistics.median(cut):.1f} s, max {max(cut):.1f} s, "
          f"{n_cut - n_before} points made meanwhile")
