"""The README's main job: on this one machine, the "single management server with two
clouds" deployment, with real test guests, driven through the REST API like an operator.

Stages (each timed, each a line of output): readiness of the example fabric, libvirt and
the test guest, two guests writing records, the control plane and two agents, live
readiness, policy and pairing, protection (initial replication), scheduled delta cycles,
replication health; then a test failover with cleanup, a planned failover whose records
lost are counted from the guests' own records (must be 0), commit, reverse replication
(only differing blocks) and failback. `Demo.run` returns the figures; the CLI prints them.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from standby.demo.local import LocalDeployment
from standby.errors import NotReady, StandbyError

PRIMARY_CLOUD = "primary"
SECONDARY_CLOUD = "secondary"
GUESTS = ("demo-web", "demo-db")
POLICY = "demo-30s"
COPY_FREQUENCY = 30  # seconds: the reference's shortest copy frequency
RATE = 10  # records per second each guest writes
REPLICA_PREFIX = "dr-"  # replica VMs' names on the secondary (both sites share one libvirtd here)
DRILL_VM = GUESTS[0]


@dataclass
class Step:
    name: str
    seconds: float = 0.0
    detail: str = ""


@dataclass
class DemoResult:
    workdir: str
    url: str = ""
    steps: list[Step] = field(default_factory=list)
    readiness: dict[str, Any] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "workdir": self.workdir,
            "control_plane": self.url,
            "steps": [{"name": s.name, "seconds": round(s.seconds, 1), "detail": s.detail} for s in self.steps],
            "readiness": self.readiness,
            "items": self.items,
            "status": self.status,
            "figures": self.figures,
        }


class Demo:
    def __init__(self, workdir: Path, *, examples: Path, cycles: int = 2, recovery: bool = False,
                 say: Callable[[str], None] = lambda _m: None) -> None:
        self.recovery = recovery
        self.workdir = workdir.resolve()
        self.examples = examples
        self.cycles = cycles
        self.say = say
        self.result = DemoResult(str(self.workdir))
        self.deployment: LocalDeployment | None = None
        self._conn: Any = None

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Step]:
        s = Step(name)
        self.say(f"… {name}")
        t0 = time.monotonic()
        try:
            yield s
        finally:
            s.seconds = time.monotonic() - t0
            self.result.steps.append(s)
            self.say(f"✓ {name} ({s.seconds:.1f} s){': ' + s.detail if s.detail else ''}")

    # ------------------------------------------------------------------ stages

    def run(self) -> DemoResult:
        from standby.fabric_file import load_fabric
        from standby.readiness.engine import check

        with self.step("readiness of the example deployment") as s:
            for name in ("single-server-two-clouds.yaml", "kvm-two-sites.yaml", "hyperv-vmm.yaml"):
                report = check(load_fabric(self.examples / name))
                self.result.readiness[name] = report.as_dict()
            mine = self.result.readiness["single-server-two-clouds.yaml"]
            s.detail = ("ready" if mine["ready"] else "NOT ready") + f", {len(mine['findings'])} finding(s)"

        with self.step("libvirt and the test guest") as s:
            from standby.testing import guest, libvirtd

            reason = libvirtd.available()
            if reason:
                raise NotReady(f"libvirt cannot run here: {reason}")
            libvirtd.ensure_running()
            self.image = guest.build()
            s.detail = f"guest kernel {self.image.kernel.name}"

        with self.step("boot two guests writing records") as s:
            self._fresh_workdir()
            consoles = [self._boot(vm) for vm in GUESTS]
            for c in consoles:  # booted together: about 10 s under software emulation, not 10 s each
                c.wait_for(lambda c: c.acked() >= 0, 180)
            s.detail = f"{', '.join(GUESTS)} at {RATE} records/s each"

        d = self.deployment = LocalDeployment(self.workdir / "deployment", tick_seconds=1.0)
        with self.step("control plane and two agents") as s:
            d.init()
            d.start_server()
            d.add_agent("host-a", cloud=PRIMARY_CLOUD, domains=["demo-*"])
            d.add_agent("host-b", cloud=SECONDARY_CLOUD, domains=["dr-*"], vm_prefix=REPLICA_PREFIX)
            api = d.client()
            d.wait_for(lambda: {v["name"] for v in api.get("/vms", params={"cloud": PRIMARY_CLOUD})["items"]}
                       >= set(GUESTS), 60, "inventory of the primary cloud", log=d.server)
            self.result.url = d.url
            s.detail = f"{d.url}, agents host-a ({PRIMARY_CLOUD}) and host-b ({SECONDARY_CLOUD})"

        with self.step("policy and cloud pairing") as s:
            api.post("/policies", json={"name": POLICY, "copy_frequency_seconds": COPY_FREQUENCY,
                                        "recovery_point_retention_hours": 1})
            api.post("/pairings", json={"primary_cloud": PRIMARY_CLOUD, "secondary_cloud": SECONDARY_CLOUD,
                                        "policy": POLICY})
            live = api.get("/readiness")
            self.result.readiness["live"] = live
            for f in live["findings"]:
                if f.get("severity") in ("error", "warning"):
                    self.say(f"  {f['severity']}: {f.get('subject', '')}: {f.get('message', '')}")
            s.detail = (f"policy {POLICY} (copy every {COPY_FREQUENCY} s); live fabric "
                        f"{'ready' if live['ready'] else 'NOT ready'}, {len(live['findings'])} finding(s)")

        with self.step("enable protection (initial replication)") as s:
            jobs = [api.post("/items", json={"vm": vm})["job"]["id"] for vm in GUESTS]
            for jid in jobs:
                job = d.wait_job(jid, 600)
                if job["state"] != "succeeded":
                    raise StandbyError(f"protect job {jid} ended {job['state']}: {job.get('error')}")
            items = [d.item(vm) for vm in GUESTS]
            seeded = sum(i["bytes_replicated"] for i in items)
            self.result.figures["initial_replication_bytes"] = seeded
            s.detail = f"both protected, {seeded / 1e6:.1f} MB sent"
        self.result.figures["initial_replication_seconds"] = round(s.seconds, 1)

        with self.step(f"{self.cycles} scheduled delta cycles per VM") as s:
            seen: dict[str, list[str]] = {vm: [] for vm in GUESTS}
            worst: list[float] = []  # the RPO (age of the latest point) sampled every second

            def enough() -> bool:
                for vm in GUESTS:
                    item = d.item(vm)
                    p = item["last_recovery_point_id"]
                    if p and p not in seen[vm]:
                        seen[vm].append(p)
                    if item.get("rpo_seconds") is not None:
                        worst.append(float(item["rpo_seconds"]))
                return all(len(v) >= self.cycles + 1 for v in seen.values())

            d.wait_for(enough, (self.cycles + 2) * COPY_FREQUENCY + 60, "delta cycles", interval=1.0, log=d.server)
            s.detail = f"{sum(len(v) for v in seen.values())} recovery points observed"

        with self.step("replication health") as s:
            self.result.items = api.get_all("/items")
            self.result.status = api.get("/status")
            rpos = [i["rpo_seconds"] for i in self.result.items if i["rpo_seconds"] is not None]
            self.result.figures.update(
                # The worst RPO seen while the cycles ran (one copy interval plus the cycle's time).
                rpo_seconds_max=round(max(worst + rpos), 1) if worst or rpos else None,
                bytes_replicated=sum(i["bytes_replicated"] for i in self.result.items),
                health={i["vm"]: i["health"] for i in self.result.items},
            )
            s.detail = ", ".join(f"{i['vm']} {i['health']}" for i in self.result.items)
        if self.recovery:
            self._recovery(d, api)
        return self.result

    def _op(self, d: LocalDeployment, api: Any, vm: str, action: str, body: dict[str, Any] | None = None,
            timeout: float = 600) -> dict[str, Any]:
        res = api.post(f"/items/{vm}/{action}", json=body or {})
        job = d.wait_job(res["job"]["id"], timeout)
        if job["state"] != "succeeded":
            raise StandbyError(f"{action} of {vm}: job {job['id']} ended {job['state']}: {job.get('error')}")
        return job

    def _recovery(self, d: LocalDeployment, api: Any) -> None:
        vm, replica = DRILL_VM, REPLICA_PREFIX + DRILL_VM
        test_vm = replica + "-test"
        f = self.result.figures

        with self.step(f"test failover of {vm} (isolated network) and cleanup") as s:
            before = d.item(vm)["last_recovery_point_id"]
            self._op(d, api, vm, "test-failover", {"point": "latest", "network": {"mode": "isolated"}})
            start = _start_seq(self._console(test_vm))
            source_running = self._running(vm)
            api.post(f"/items/{vm}/replicate-now")
            d.wait_for(lambda: d.item(vm)["last_recovery_point_id"] != before, 120, "a cycle during the drill")
            self._op(d, api, vm, "test-failover/cleanup", {"notes": "demo drill: test VM booted, records intact"})
            f["test_failover"] = {"test_vm_found_records": start, "source_kept_running": source_running,
                                  "replication_continued": True}
            s.detail = (f"test VM found {start} records and wrote on; source kept running: {source_running}; "
                        "replication continued")

        with self.step(f"planned failover of {vm}") as s:
            job = self._op(d, api, vm, "failover", {"type": "planned"})
            acked = self._console(vm).acked()  # the source is off: its last acknowledged record is final
            start = _start_seq(self._console(replica))
            # A record on disk whose acknowledgement never reached the console is not lost.
            lost = max(0, acked - (start - 1))
            f["planned_failover"] = {"source_last_record": acked, "replica_first_record": start,
                                     "records_lost": lost, "seconds": _job_seconds(job)}
            s.detail = f"source wrote up to record {acked}; the replica went on from {start}: {lost} records lost"
            if lost != 0:
                raise StandbyError(f"planned failover lost {lost} records")

        with self.step(f"commit and reverse replication of {vm}") as s:
            self._op(d, api, vm, "commit")
            job = self._op(d, api, vm, "reverse-replicate")
            moved = _bytes_moved(job)
            f["reverse_replication_bytes"] = moved
            s.detail = f"{moved / 1e6:.2f} MB moved (only the blocks that differ from the old disk)"

        with self.step(f"failback of {vm}") as s:
            replica_console = self._console(replica)
            job = self._op(d, api, vm, "failback")
            acked = replica_console.acked()
            start = _start_seq(self._console(vm))
            lost = max(0, acked - (start - 1))
            f["failback"] = {"replica_last_record": acked, "source_first_record": start, "records_lost": lost,
                             "bytes_moved": _bytes_moved(job),
                             "bytes_restored": int((job.get("result") or {}).get("bytes_restored") or 0),
                             "seconds": _job_seconds(job)}
            d.wait_for(lambda: d.item(vm)["state"] == "protected", 300, "forward replication after failback")
            s.detail = (f"{lost} records lost; {f['failback']['bytes_moved'] / 1e6:.2f} MB sent between the sites, "
                        f"{f['failback']['bytes_restored'] / 1e6:.2f} MB restored locally; protected again")
        f["records_lost_planned_failover"] = f["planned_failover"]["records_lost"]
        self.result.items = api.get_all("/items")

    # ------------------------------------------------------------------ helpers

    def _console(self, domain: str) -> Any:
        """A domain's serial console log (its path from the domain XML)."""
        import xml.etree.ElementTree as ET

        from standby.testing import guest

        src = ET.fromstring(self._libvirt().lookupByName(domain).XMLDesc(0)).find("./devices/serial/source")
        if src is None:
            raise StandbyError(f"{domain} has no serial console")
        return guest.Console(src.get("path", ""))

    def _running(self, domain: str) -> bool:
        import libvirt

        try:
            return bool(self._libvirt().lookupByName(domain).isActive())
        except libvirt.libvirtError:
            return False

    def _libvirt(self) -> Any:
        if self._conn is None:
            import libvirt

            libvirt.registerErrorHandler(lambda _c, _e: None, None)
            self._conn = libvirt.open("qemu:///system")
        return self._conn

    def _remove_domain(self, name: str) -> None:
        import libvirt

        conn = self._libvirt()
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        if dom.isActive():
            dom.destroy()
        flags = getattr(libvirt, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0)
        dom.undefineFlags(flags)

    def _fresh_workdir(self) -> None:
        for vm in (*GUESTS, *(REPLICA_PREFIX + g for g in GUESTS), *(REPLICA_PREFIX + g + "-test" for g in GUESTS)):
            self._remove_domain(vm)
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        (self.workdir / "vms").mkdir(parents=True)

    def _boot(self, vm: str) -> Any:
        from standby.testing import guest

        vms = self.workdir / "vms"
        disk = guest.create_disk(vms / f"{vm}.qcow2", 32)
        log = vms / f"{vm}.console"
        dom = self._libvirt().defineXML(guest.domain_xml(vm, disk, log, self.image,
                                                         guest.cmdline("write", rate=RATE)))
        dom.create()
        return guest.Console(log)

    def close(self, keep: bool = False) -> None:
        if keep:
            return
        if self.deployment is not None:
            self.deployment.close()
        if self._conn is not None:
            for vm in (*GUESTS, *(REPLICA_PREFIX + g for g in GUESTS), *(REPLICA_PREFIX + g + "-test" for g in GUESTS)):
                with contextlib.suppress(Exception):
                    self._remove_domain(vm)
            self._conn.close()
            self._conn = None



_START = re.compile(r"standby-guest: write start=(\d+)")


def _start_seq(console: Any, timeout: float = 180) -> int:
    """The first record a (re)booted guest writes: one past the last whole record it found."""
    found = console.wait_for(lambda c: _START.findall(c.text()), timeout)
    return int(found[-1])


def _job_seconds(job: dict[str, Any]) -> float | None:
    from datetime import datetime

    if not job.get("started_at") or not job.get("ended_at"):
        return None
    t0, t1 = (datetime.fromisoformat(str(job[k])) for k in ("started_at", "ended_at"))
    return round((t1 - t0).total_seconds(), 1)


def _bytes_moved(job: dict[str, Any]) -> int:
    result = job.get("result") or {}
    for key in ("bytes_moved", "bytes_sent"):
        if key in result:
            return int(result[key])
    return 0
