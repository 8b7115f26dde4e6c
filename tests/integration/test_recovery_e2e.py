"""Recovery end to end on real test guests: a real control plane, two real agents (host-a
primary, host-b secondary with replica VMs named `dr-<vm>`), guests writing hash-chained
records at 10 per second. Every scenario ends with the guest's verifier.

One deployment for the module (booting guests is the expensive part); the tests run in
file order and each leaves its VM in a known state:

- web: test failover + cleanup, planned failover (0 records lost), commit, reverse
  replication (only differing blocks), failback (0 lost), forward again;
- db: unplanned failover to the latest point after its source was destroyed;
- app: unplanned failover to an older point;
- p1, p2 and web: a three-group recovery plan (pre script, manual action confirmed through
  the API, failing post script), run as a test failover.
"""

from __future__ import annotations

import json
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("libvirt")

from standby.demo.local import LocalDeployment  # noqa: E402
from standby.testing import guest  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
]

RATE = 10
NAMES = ("web", "db", "app", "p1", "p2")
DISK_MIB = 32
_START = re.compile(r"standby-guest: write start=(\d+)")


class Site:
    def __init__(self, d: LocalDeployment, conn: Any, tag: str, vm_dir: Path) -> None:
        self.d, self.conn, self.tag, self.vm_dir = d, conn, tag, vm_dir

    @property
    def api(self) -> Any:
        return self.d.client()

    def vm(self, short: str) -> str:
        return f"sbt-rc{self.tag}-{short}"

    def replica(self, short: str) -> str:
        return f"dr-{self.vm(short)}"

    def console(self, domain: str) -> guest.Console:
        """The console log of a domain, wherever the driver put it."""
        dom = self.conn.lookupByName(domain)
        root = ET.fromstring(dom.XMLDesc(0))
        src = root.find("./devices/serial/source")
        assert src is not None, f"{domain} has no serial console"
        return guest.Console(src.get("path", ""))

    def disk(self, domain: str) -> Path:
        root = ET.fromstring(self.conn.lookupByName(domain).XMLDesc(0))
        src = root.find("./devices/disk/source")
        assert src is not None
        return Path(src.get("file", ""))

    def running(self, domain: str) -> bool:
        try:
            return bool(self.conn.lookupByName(domain).isActive())
        except Exception:  # noqa: BLE001 - libvirtError: no such domain
            return False

    def exists(self, domain: str) -> bool:
        try:
            self.conn.lookupByName(domain)
            return True
        except Exception:  # noqa: BLE001
            return False

    def destroy(self, domain: str) -> None:
        dom = self.conn.lookupByName(domain)
        if dom.isActive():
            dom.destroy()

    def item(self, short: str) -> dict[str, Any]:
        return self.api.get(f"/items/{self.vm(short)}")

    def op(self, short: str, action: str, body: dict[str, Any] | None = None, timeout: float = 300) -> dict[str, Any]:
        res = self.api.post(f"/items/{self.vm(short)}/{action}", json=body or {})
        job = self.d.wait_job(res["job"]["id"], timeout)
        assert job["state"] == "succeeded", json.dumps(job, indent=1, default=str)[-3000:]
        return job

    def wait_points(self, short: str, n: int, timeout: float = 120) -> None:
        seen: list[str] = []

        def enough() -> bool:
            p = self.item(short).get("last_recovery_point_id")
            if p and p not in seen:
                seen.append(p)
            return len(seen) >= n

        self.d.wait_for(enough, timeout, f"{n} new recovery points of {short}", interval=0.3, log=self.d.server)


def _start_seq(console: guest.Console, timeout: float = 300) -> int:
    """The first record a (re)booted guest writes: one past the last record it found."""
    def found() -> int | None:
        m = _START.findall(console.text())
        return int(m[-1]) if m else None

    return console.wait_for(lambda c: found() is not None, timeout) and found()  # type: ignore[return-value]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, libvirt_conn: Any,
         guest_image: guest.GuestImage) -> Iterator[Site]:
    tag = uuid.uuid4().hex[:6]
    root = tmp_path_factory.mktemp("recovery")
    vm_dir = root / "vms"
    vm_dir.mkdir()
    d = LocalDeployment(root / "deploy", tick_seconds=0.5, heartbeat_timeout=15)
    s = Site(d, libvirt_conn, tag, vm_dir)
    try:
        for short in NAMES:
            name = s.vm(short)
            disk = guest.create_disk(vm_dir / f"{name}.qcow2", DISK_MIB)
            log = vm_dir / f"{name}.console"
            dom = libvirt_conn.defineXML(guest.domain_xml(name, disk, log, guest_image,
                                                          guest.cmdline("write", rate=RATE)))
            dom.create()
        for short in NAMES:
            s.console(s.vm(short)).wait_for(lambda c: c.acked() >= 0, 120)
        d.init()
        d.start_server()
        d.add_agent("host-a", cloud="primary", domains=[f"sbt-rc{tag}-*"])
        d.add_agent("host-b", cloud="secondary", domains=[f"dr-sbt-rc{tag}-*"], vm_prefix="dr-")
        d.wait_for(lambda: {v["name"] for v in s.api.get("/vms", params={"cloud": "primary"})["items"]}
                   >= {s.vm(n) for n in NAMES}, 90, "inventory of every guest", log=d.server)
        # The last 30 minutes' points stay selectable (hourly retention alone keeps one per hour).
        s.api.post("/policies", json={"name": "rc", "copy_frequency_seconds": 30,
                                      "recovery_point_retention_hours": 2, "keep_all_points_minutes": 30})
        s.api.post("/pairings", json={"primary_cloud": "primary", "secondary_cloud": "secondary", "policy": "rc"})
        jobs = [s.api.post("/items", json={"vm": s.vm(n)})["job"]["id"] for n in NAMES]
        for j in jobs:
            assert d.wait_job(j, 300)["state"] == "succeeded"
        yield s
    finally:
        d.close()
        for short in NAMES:
            for dom_name in (s.vm(short), s.replica(short), s.replica(short) + "-test"):
                try:
                    dom = libvirt_conn.lookupByName(dom_name)
                    if dom.isActive():
                        dom.destroy()
                    dom.undefineFlags(getattr(__import__("libvirt"), "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0))
                except Exception:  # noqa: BLE001 - best-effort cleanup
                    pass


def test_test_failover_leaves_source_and_replication_undisturbed(site: Site) -> None:
    web, test_vm = site.vm("web"), site.replica("web") + "-test"
    before = site.item("web")["last_recovery_point_id"]
    acked_before = site.console(web).acked()
    site.op("web", "test-failover", {"point": "latest", "network": {"mode": "isolated"}})
    assert site.running(test_vm) and site.running(web)
    assert site.item("web")["state"] == "test_failover_in_progress"
    start = _start_seq(site.console(test_vm))
    assert 0 < start <= site.console(web).acked() + 1
    # Replication goes on during the drill.
    site.api.post(f"/items/{web}/replicate-now")
    site.d.wait_for(lambda: site.item("web")["last_recovery_point_id"] != before, 90, "a cycle during the test")
    assert site.console(web).acked() > acked_before  # the source kept writing
    # The guest's verifier on the test VM's disk, then cleanup.
    overlay = site.disk(test_vm)
    site.destroy(test_vm)
    verdict = guest.verify_image(overlay)
    assert verdict.ok and verdict.last >= start - 1, verdict.line()
    job = site.op("web", "test-failover/cleanup", {"notes": "quarterly drill: booted, records intact"})
    assert not site.exists(test_vm) and not overlay.exists()
    assert site.item("web")["state"] == "protected"
    assert "quarterly drill" in json.dumps(job)


def test_planned_failover_loses_no_record(site: Site) -> None:
    web, replica = site.vm("web"), site.replica("web")
    job = site.op("web", "failover", {"type": "planned"})
    assert not site.running(web) and site.running(replica)
    acked = site.console(web).acked()  # the source is off: this is final
    start = _start_seq(site.console(replica))
    # Every acknowledged record is on the replica (a record written just before the
    # shutdown may be there without its acknowledgement on the console: not a loss).
    assert start - 1 >= acked, f"records lost: {acked - (start - 1)} (job {job['id']})"
    assert site.item("web")["state"] in ("commit_pending", "failed_over")


def test_commit_then_reverse_replication_sends_only_differing_blocks(site: Site) -> None:
    site.op("web", "commit")
    assert site.item("web")["state"] == "failed_over"
    job = site.op("web", "reverse-replicate", timeout=400)
    assert site.item("web")["state"] == "reverse_replicating"
    moved = _bytes_moved(job)
    assert 0 < moved < DISK_MIB * 2**20 // 2, f"reverse replication moved {moved} bytes"


def test_failback_loses_no_record_and_replication_goes_forward_again(site: Site) -> None:
    web, replica = site.vm("web"), site.replica("web")
    replica_console = site.console(replica)  # its log file outlives the domain
    job = site.op("web", "failback", timeout=500)
    assert site.running(web) and not site.exists(replica)
    acked = replica_console.acked()  # the replica is off: this is final
    start = _start_seq(site.console(web))
    assert start - 1 >= acked, f"records lost in failback: {acked - (start - 1)}"
    site.d.wait_for(lambda: site.item("web")["state"] == "protected", 300, "forward replication")
    site.wait_points("web", 2)
    # The verifier over the whole history of the disk: source, replica, source again.
    site.destroy(web)
    verdict = guest.verify_image(site.disk(web))
    assert verdict.ok, verdict.line()
    site.conn.lookupByName(web).create()  # back in service for the plan test
    moved = _bytes_moved(job)
    print(f"failback moved {moved} bytes; job result: {json.dumps(job.get('result'), default=str)[:2000]}")
    assert moved < DISK_MIB * 2**20 // 2, f"failback moved {moved} bytes"


def test_unplanned_failover_to_latest_after_the_source_is_lost(site: Site) -> None:
    db, replica = site.vm("db"), site.replica("db")
    site.wait_points("db", 2)
    site.destroy(db)  # the primary site is gone
    acked = site.console(db).acked()
    site.op("db", "failover", {"type": "unplanned", "point": "latest", "shutdown_source": False})
    assert site.running(replica) and not site.running(db)
    start = _start_seq(site.console(replica))
    lost = acked - (start - 1)
    assert 0 <= lost <= RATE * 40, f"lost {lost} records (one copy interval is {RATE * 30})"
    overlay = site.disk(replica)
    site.destroy(replica)
    verdict = guest.verify_image(overlay)
    assert verdict.ok, verdict.line()


def test_unplanned_failover_to_an_older_point(site: Site) -> None:
    app, replica = site.vm("app"), site.replica("app")
    site.wait_points("app", 3, timeout=150)
    points = site.api.get(f"/items/{app}/points")["points"]
    disk_points = next(iter(points.values()))
    assert len(disk_points) >= 2, points
    older = sorted(disk_points, key=lambda p: p["created_at"])[0]["id"]
    site.op("app", "failover", {"type": "unplanned", "point": older, "shutdown_source": True})
    assert site.running(replica) and not site.running(app)
    start = _start_seq(site.console(replica))
    assert start - 1 < site.console(app).acked()  # an older point: a prefix of what the source wrote
    overlay = site.disk(replica)
    site.destroy(replica)
    verdict = guest.verify_image(overlay)
    assert verdict.ok, verdict.line()


def test_three_group_plan_with_scripts_and_a_manual_action(site: Site, tmp_path: Path) -> None:
    marker = tmp_path / "pre-ran"
    pre = tmp_path / "pre.sh"
    pre.write_text(f"#!/bin/sh\necho \"$STANDBY_GROUP $STANDBY_VMS\" > {marker}\n")
    post = tmp_path / "post.sh"
    post.write_text("#!/bin/sh\necho 'smoke test failed' >&2\nexit 3\n")
    for f in (pre, post):
        f.chmod(0o755)
    plan = {"name": f"erp-{site.tag}", "groups": [
        {"name": "db", "vms": [site.vm("p1")], "pre": [{"path": str(pre)}]},
        {"name": "app", "vms": [site.vm("p2")],
         "manual_actions": [{"text": "check the app tier by hand", "failover_types": ["test"]}]},
        {"name": "web", "vms": [site.vm("web")], "post": [{"path": str(post), "timeout_seconds": 30}]},
    ]}
    site.api.post("/plans", json=plan)
    dry = site.api.post(f"/plans/{plan['name']}/failover", json={"type": "test", "dry_run": True})
    assert "check the app tier by hand" in dry["text"]
    job_id = site.api.post(f"/plans/{plan['name']}/failover", json={"type": "test"})["job"]["id"]

    def waiting_step() -> int | None:
        # A plan job keeps its plan steps' statuses in its payload (numbered from 1).
        statuses = (site.api.get(f"/jobs/{job_id}").get("payload") or {}).get("statuses", [])
        return next((i + 1 for i, st in enumerate(statuses) if st == "waiting"), None)

    pos = site.d.wait_for(waiting_step, 300, "the plan to wait on its manual action", log=site.d.server)
    assert site.running(site.replica("p1") + "-test")
    assert marker.exists(), json.dumps(site.api.get(f"/jobs/{job_id}"), indent=1, default=str)[-3000:]
    assert marker.read_text().split() == ["db", site.vm("p1")]
    site.api.post(f"/jobs/{job_id}/confirm", json={"step": pos})
    job = site.d.wait_job(job_id, 300)
    assert job["state"] == "failed", job  # the failing post script is reported
    statuses = job["payload"]["statuses"]
    assert statuses.count("failed") == 1 and statuses[-1] == "failed", statuses  # the web group's post script
    for short in ("p1", "p2", "web"):
        test_vm = site.replica(short) + "-test"
        assert site.running(test_vm), f"{test_vm} did not start"
        overlay = site.disk(test_vm)
        site.destroy(test_vm)
        assert guest.verify_image(overlay).ok
        site.op(short, "test-failover/cleanup", {"notes": "plan drill"})
        assert site.item(short)["state"] == "protected"


def _bytes_moved(job: dict[str, Any]) -> int:
    """Bytes the job's cycles sent, as its result reports them."""
    result = job.get("result") or {}
    for key in ("bytes_moved", "bytes_sent"):
        if key in result:
            return int(result[key])
    raise AssertionError(f"job {job['id']} reports no bytes moved: {result}")

