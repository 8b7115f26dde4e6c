"""`standby demo --site-loss`: the day the primary site is lost, control plane included, on
this machine, with real test guests (docs/site-loss.md).

Stages of `SiteLossDrill` (each timed; the figures go to `figures`):

1. `setup`: three guests writing hash-chained records; two sites (network namespaces,
   `demo/sites.py`): site a with the active control plane on its PostgreSQL and the
   primary agent, site b with the standby control plane (a streaming replica) and the
   secondary agent; a policy, a pairing, a recovery plan of every VM; protection and
   delta cycles.
2. `lose_site_a`: every process of site a SIGKILLed, its links cut, its guests powered off;
   `standby server promote` on site b; the recovery plan fails every VM over (unplanned).
   Each VM's point passes the guest's verifier; records lost (acknowledged by the guest,
   missing from the point) per VM; RTO from the declaration to every VM running.
3. `site_a_returns`: site a's database rebuilt as a standby, its agent back; an old VM its
   host starts again (autostart) is shut down by the agent (fencing); commit, reverse
   replication (only the blocks that differ), failback of every VM with no record lost.
4. `break_glass`: the same disaster with no control plane at all: each VM started from
   host-b's replica store by `standby agent failover`, verified the same way, then taken in
   by the control plane when it answers again.

Every check that fails raises `DrillFailed` naming the VM and the figure.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from standby.demo.sites import TwoSiteDeployment
from standby.errors import StandbyError

RATE = 10  # records per second per guest
COPY_SECONDS = 30  # the policy's copy frequency
RPO_ALERT = 60  # the policy's RPO threshold: no VM may lose more than its writes in it
DISK_MIB = 32
_START = re.compile(r"standby-guest: write start=(\d+)")


class DrillFailed(StandbyError):
    """A site-loss drill found data lost beyond the RPO, a VM that did not start, or a VM
    running on both sites."""


@dataclass
class SiteLossDrill:
    workdir: Path
    conn: Any  # a libvirt connection
    image: Any  # standby.testing.guest.GuestImage
    names: tuple[str, ...] = ("web", "db", "app")
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    say: Callable[[str], None] = lambda _m: None
    figures: dict[str, Any] = field(default_factory=dict)
    stages: list[tuple[str, float, str]] = field(default_factory=list)  # (name, seconds, detail)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.vm_dir = self.workdir / "vms"
        self.d = TwoSiteDeployment(self.workdir / "deploy", tick_seconds=0.5, heartbeat_seconds=2,
                                   heartbeat_timeout=15)

    # ------------------------------------------------------------------ naming and looking

    def vm(self, short: str) -> str:
        return f"sbt-sl{self.tag}-{short}"

    def replica(self, short: str) -> str:
        return f"dr-{self.vm(short)}"

    def api(self, site: str | None = None) -> Any:
        return self.d.client(site or self.d.active())

    def _xml(self, domain: str) -> ET.Element:
        return ET.fromstring(self.conn.lookupByName(domain).XMLDesc(0))

    def console(self, domain: str) -> Any:
        from standby.testing import guest

        src = self._xml(domain).find("./devices/serial/source")
        if src is None:
            raise DrillFailed(f"{domain} has no serial console")
        return guest.Console(src.get("path", ""))

    def running(self, domain: str) -> bool:
        try:
            return bool(self.conn.lookupByName(domain).isActive())
        except Exception:  # noqa: BLE001 - libvirtError: no such domain
            return False

    def destroy(self, domain: str) -> None:
        dom = self.conn.lookupByName(domain)
        if dom.isActive():
            dom.destroy()

    def item(self, short: str) -> dict[str, Any]:
        return self.api().get(f"/items/{self.vm(short)}")

    def job(self, job_id: int, timeout: float = 400) -> dict[str, Any]:
        api = self.api()

        def ended() -> dict[str, Any] | None:
            j = api.get(f"/jobs/{job_id}")
            return j if j["state"] in ("succeeded", "failed", "errored", "cancelled") else None

        return self.d.wait_for(ended, timeout, f"job {job_id}")

    def op(self, short: str, action: str, body: dict[str, Any] | None = None, timeout: float = 400) -> dict[str, Any]:
        res = self.api().post(f"/items/{self.vm(short)}/{action}", json=body or {})
        job = self.job(res["job"]["id"], timeout)
        if job["state"] != "succeeded":
            raise DrillFailed(f"{action} of {self.vm(short)} ended {job['state']}: {job.get('error')}")
        return job

    def wait_points(self, short: str, n: int, timeout: float = 150) -> None:
        seen: list[str] = []

        def enough() -> bool:
            p = self.item(short).get("last_recovery_point_id")
            if p and p not in seen:
                seen.append(p)
            return len(seen) >= n

        self.d.wait_for(enough, timeout, f"{n} new recovery points of {short}", interval=0.5)

    def verify_point(self, short: str, point: str) -> Any:
        """The guest's verifier over a point of host-b's replica store (what a failover starts)."""
        from standby.replication.store import ReplicaStore
        from standby.testing import guest

        disk = ReplicaStore(self.d.agent("host-b").data_dir / "replicas").disk(f"{self.vm(short)}-vda")
        overlay = self.vm_dir / f"check-{short}-{uuid.uuid4().hex[:6]}.qcow2"
        disk.materialize(point, overlay)
        try:
            return guest.verify_image(overlay)
        finally:
            disk.release(overlay)
            overlay.unlink(missing_ok=True)

    def start_seq(self, domain: str, timeout: float = 300) -> int:
        """The first record a (re)booted guest writes: one past the last one it found."""
        console = self.console(domain)

        def found() -> int | None:
            m = _START.findall(console.text())
            return int(m[-1]) if m else None

        console.wait_for(lambda c: found() is not None, timeout)
        n = found()
        assert n is not None
        return n

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[list[str]]:
        self.say(f"… {name}")
        t0 = time.monotonic()
        detail: list[str] = []
        yield detail
        seconds = time.monotonic() - t0
        self.stages.append((name, seconds, "; ".join(detail)))
        self.say(f"✓ {name} ({seconds:.1f} s){': ' + '; '.join(detail) if detail else ''}")

    # ------------------------------------------------------------------ 1. setup

    def setup(self) -> None:
        from standby.testing import guest

        with self.stage(f"{len(self.names)} guests writing {RATE} records/s") as detail:
            self.vm_dir.mkdir(parents=True, exist_ok=True)
            for short in self.names:
                name = self.vm(short)
                disk = guest.create_disk(self.vm_dir / f"{name}.qcow2", DISK_MIB)
                dom = self.conn.defineXML(guest.domain_xml(name, disk, self.vm_dir / f"{name}.console", self.image,
                                                           guest.cmdline("write", rate=RATE)))
                dom.create()
            for short in self.names:
                self.console(self.vm(short)).wait_for(lambda c: c.acked() >= 0, 180)
            detail.append(", ".join(self.vm(s) for s in self.names))
        with self.stage("two sites: cp-a active, cp-b its streaming standby") as detail:
            self.d.start()
            self.d.add_agent("a", "host-a", cloud="primary", domains=[f"sbt-sl{self.tag}-*"])
            self.d.add_agent("b", "host-b", cloud="secondary", domains=[f"dr-sbt-sl{self.tag}-*"], vm_prefix="dr-")
            api = self.api("a")
            self.d.wait_for(lambda: {v["name"] for v in api.get("/vms", params={"cloud": "primary"})["items"]}
                            >= {self.vm(n) for n in self.names}, 90, "inventory of every guest")
            detail.append(f"{self.d.sites['a'].url} (site a), {self.d.sites['b'].url} (site b)")
        with self.stage("protection, a recovery plan, delta cycles") as detail:
            api.post("/policies", json={"name": "dr", "copy_frequency_seconds": COPY_SECONDS,
                                        "recovery_point_retention_hours": 2, "keep_all_points_minutes": 30,
                                        "rpo_alert_seconds": RPO_ALERT})
            api.post("/pairings", json={"primary_cloud": "primary", "secondary_cloud": "secondary", "policy": "dr"})
            api.post("/plans", json={"name": "everything",
                                     "groups": [{"name": "all", "vms": [self.vm(n) for n in self.names]}]})
            for j in [api.post("/items", json={"vm": self.vm(n)})["job"]["id"] for n in self.names]:
                if self.job(j, 300)["state"] != "succeeded":
                    raise DrillFailed(f"protection job {j} did not succeed")
            for short in self.names:
                self.wait_points(short, 2)
            detail.append(f"policy copy every {COPY_SECONDS} s, RPO alert {RPO_ALERT} s")

    # ------------------------------------------------------------------ 2. the disaster

    def _power_off_site_a(self) -> dict[str, int]:
        acked = {}
        self.d.lose_site("a")
        for short in self.names:
            self.destroy(self.vm(short))
            acked[short] = self.console(self.vm(short)).acked()  # the guest is off: final
        return acked

    def _check_replicas(self, points: dict[str, str], acked: dict[str, int]) -> dict[str, int]:
        """Each point passes the verifier, loses no more than one RPO of writes, and the
        replica writes on from its last record."""
        lost = {}
        for short in self.names:
            verdict = self.verify_point(short, points[short])
            if not verdict.ok:
                raise DrillFailed(f"{self.vm(short)}: the point does not verify: {verdict.line()}")
            lost[short] = max(0, acked[short] - verdict.last)
            if lost[short] > RATE * RPO_ALERT:
                raise DrillFailed(f"{self.vm(short)}: {lost[short]} records lost, more than one RPO "
                                  f"({RPO_ALERT} s) of writes ({RATE * RPO_ALERT})")
            start = self.start_seq(self.replica(short))
            if start != verdict.last + 1:
                raise DrillFailed(f"{self.replica(short)} started at record {start}, the point ends at {verdict.last}")
        return lost

    def lose_site_a(self) -> dict[str, Any]:
        api_b = self.d.client("b")
        self.d.wait_for(lambda: all(api_b.get(f"/items/{self.vm(n)}").get("last_recovery_point_id")
                                    for n in self.names), 60, "the items on the standby control plane")
        with self.stage("site a lost: processes SIGKILLed, links cut, guests off") as detail:
            acked = self._power_off_site_a()
            detail.append(f"guests acknowledged records up to {acked}")
        t_declare = time.time()
        with self.stage("declare the disaster: standby server promote on site b") as detail:
            out = self.d.promote("b")
            cp = out["control_plane"]
            if cp.get("role") != "active":
                raise DrillFailed(f"cp-b is {cp.get('role')} after the promotion")
            detail.append(f"cp-b active at epoch {cp.get('epoch')} in {out['active_seconds']} s")
        with self.stage("recovery plan: unplanned failover of every VM") as detail:
            res = self.api("b").post("/plans/everything/failover", json={"type": "unplanned", "point": "latest"})
            job = self.job(res["job"]["id"], 400)
            if job["state"] != "succeeded":
                raise DrillFailed(f"the recovery plan ended {job['state']}: {job.get('error')}")
            rto = time.time() - t_declare
            points = {s: self.item(s)["details"]["failover"]["point"]["disks"][f"{self.vm(s)}-vda"] for s in self.names}
            lost = self._check_replicas(points, acked)
            detail.append(f"RTO {rto:.1f} s (the plan says {job['result'].get('rto_seconds')} s from "
                          f"{job['result'].get('rto_from')}); records lost {lost}")
        out = {"rto_seconds": round(rto, 1), "plan_rto_seconds": job["result"].get("rto_seconds"),
               "rto_from": job["result"].get("rto_from"), "records_lost": lost, "records_per_rpo": RATE * RPO_ALERT,
               "promote_seconds": out["active_seconds"], "epoch": cp.get("epoch")}
        self.figures["site_loss"] = out
        return out

    # ------------------------------------------------------------------ 3. the return

    def site_a_returns(self, autostarted: str = "web") -> dict[str, Any]:
        old = self.vm(autostarted)
        with self.stage("site a returns: its database a standby of b's, its agent back") as detail:
            self.d.restore_site("a", agents=False)
            self.conn.lookupByName(old).create()  # its host starts it at boot (autostart)
            self.d.start_agent("host-a")
            self.d.wait_for(lambda: not self.running(old), 90, "host-a to fence the old VM")
            for short in self.names:
                if self.running(self.vm(short)) and self.running(self.replica(short)):
                    raise DrillFailed(f"{self.vm(short)} runs on both sites")
            fenced = self.d.wait_for(lambda: [a for a in self.api("b").get("/alerts")["items"]
                                              if a["kind"] == "source_fenced" and old in a["subject"]], 30,
                                     "the fencing alert")
            detail.append(f"{old}, started by its host, was shut down by host-a: {fenced[0]['message'][:80]}…")
        moved: dict[str, int] = {}
        blocks: dict[str, str] = {}
        with self.stage("commit and reverse replication (only the differing blocks)") as detail:
            for short in self.names:
                if self.item(short)["state"] == "commit_pending":
                    self.op(short, "commit")
                job = self.op(short, "reverse-replicate", timeout=400)
                moved[short] = int((job.get("result") or {}).get("bytes_moved", 0))
                blocks[short] = next((str(s.get("note")) for s in (job.get("result") or {}).get("steps", [])
                                      if "differed" in str(s.get("note") or "")), "")
            detail.append(", ".join(f"{s} {moved[s] / 1e6:.2f} MB" for s in self.names))
        lost: dict[str, int] = {}
        with self.stage("failback of every VM to site a") as detail:
            consoles = {short: self.console(self.replica(short)) for short in self.names}
            jobs = {short: self.api().post(f"/items/{self.vm(short)}/failback", json={})["job"]["id"]
                    for short in self.names}
            for short, j in jobs.items():
                job = self.job(j, 500)
                if job["state"] != "succeeded":
                    raise DrillFailed(f"failback of {self.vm(short)} ended {job['state']}: {job.get('error')}")
                acked = consoles[short].acked()  # the replica is off: final
                lost[short] = max(0, acked - (self.start_seq(self.vm(short)) - 1))
                if lost[short]:
                    raise DrillFailed(f"failback of {self.vm(short)} lost {lost[short]} records")
            for short in self.names:
                self.d.wait_for(lambda s=short: self.item(s)["state"] == "protected", 300, f"{short} protected again")
            detail.append(f"records lost {lost}; protected again")
        out = {"reverse_bytes": moved, "reverse_blocks": blocks, "failback_records_lost": lost, "fenced": old}
        self.figures["return"] = out
        return out

    # ------------------------------------------------------------------ 4. break glass

    def break_glass(self) -> dict[str, Any]:
        for short in self.names:
            self.wait_points(short, 2)
        if self.d.active() != "b":
            raise DrillFailed("cp-b should be the active control plane")
        with self.stage("site a lost again, and no control plane at all") as detail:
            acked = self._power_off_site_a()
            self.d.sites["b"].cp.stop(kill=True)  # type: ignore[union-attr]
            detail.append("cp-a and cp-b down")
        host_b = self.d.agent("host-b")
        recs: dict[str, dict[str, Any]] = {}
        with self.stage("break glass: standby agent failover on host-b") as detail:
            t0 = time.time()
            for short in self.names:
                p = self.d.cli("b", "agent", "failover", self.vm(short), "--data-dir", str(host_b.data_dir), "--json")
                recs[short] = json.loads(p.stdout)
                if recs[short]["outcome"] != "done" or not self.running(self.replica(short)):
                    raise DrillFailed(f"break-glass failover of {self.vm(short)}: {recs[short]}")
            rto = time.time() - t0
            lost = self._check_replicas({s: recs[s]["point"]["disks"][f"{self.vm(s)}-vda"] for s in self.names},
                                        acked)
            again = json.loads(self.d.cli("b", "agent", "failover", self.vm(self.names[0]), "--data-dir",
                                          str(host_b.data_dir), "--json").stdout)
            if again["started_at"] != recs[self.names[0]]["started_at"]:
                raise DrillFailed("a second break-glass run started the VM again")
            detail.append(f"{len(self.names)} VMs in {rto:.1f} s; records lost {lost}")
        with self.stage("a control plane answers again: the break-glass failovers are taken in") as detail:
            self.d._start_cp("b")
            for short in self.names:
                self.d.wait_for(lambda s=short: self.item(s)["state"] == "commit_pending", 60, f"{short} reconciled")
            jobs = [self.item(s)["details"]["failover"]["job"] for s in self.names]
            detail.append(f"items commit pending; jobs {jobs}")
        out = {"rto_seconds": round(rto, 1), "records_lost": lost, "records": recs, "jobs": jobs}
        self.figures["break_glass"] = out
        return out

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        self.d.close()
        for short in self.names:
            for name in (self.vm(short), self.replica(short)):
                with contextlib.suppress(Exception):
                    dom = self.conn.lookupByName(name)
                    if dom.isActive():
                        dom.destroy()
                    import libvirt

                    dom.undefineFlags(getattr(libvirt, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0))
