"""A control-plane kill (SIGKILL) at a random step of a planned failover, ten times, on
real guests writing records. Each run must end with exactly one copy of the VM running
and, when the failover completed, no record lost (the replica's first record follows the
source's last acknowledged one); a rolled-back failover leaves the source running.

The random steps come from STANDBY_KILL_SEED (printed, so a failure can be replayed).
"""

from __future__ import annotations

import os
import random
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("libvirt")

from standby.demo.local import LocalDeployment  # noqa: E402
from standby.testing import guest  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),
]

RUNS = 10
RATE = 4
_START = re.compile(r"standby-guest: write start=(\d+)")


def _console(conn: Any, domain: str) -> guest.Console:
    src = ET.fromstring(conn.lookupByName(domain).XMLDesc(0)).find("./devices/serial/source")
    assert src is not None
    return guest.Console(src.get("path", ""))


def _running(conn: Any, domain: str) -> bool:
    try:
        return bool(conn.lookupByName(domain).isActive())
    except Exception:  # noqa: BLE001 - no such domain
        return False


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, libvirt_conn: Any,
               guest_image: guest.GuestImage) -> Iterator[tuple[LocalDeployment, list[str]]]:
    tag = uuid.uuid4().hex[:6]
    root = tmp_path_factory.mktemp("kill")
    vms = [f"sbt-kf{tag}-{i}" for i in range(RUNS)]
    d = LocalDeployment(root / "deploy", tick_seconds=0.5, heartbeat_timeout=15)
    try:
        for name in vms:
            disk = guest.create_disk(root / f"{name}.qcow2", 16)
            dom = libvirt_conn.defineXML(guest.domain_xml(name, disk, root / f"{name}.console", guest_image,
                                                          guest.cmdline("write", rate=RATE)))
            dom.create()
        for name in vms:
            _console(libvirt_conn, name).wait_for(lambda c: c.acked() >= 0, 180)
        d.init()
        d.start_server()
        d.add_agent("host-a", cloud="primary", domains=[f"sbt-kf{tag}-*"])
        d.add_agent("host-b", cloud="secondary", domains=[f"dr-sbt-kf{tag}-*"], vm_prefix="dr-")
        api = d.client()
        d.wait_for(lambda: {v["name"] for v in api.get("/vms", params={"cloud": "primary"})["items"]} >= set(vms),
                   90, "inventory of every guest", log=d.server)
        api.post("/policies", json={"name": "kill", "copy_frequency_seconds": 30})
        api.post("/pairings", json={"primary_cloud": "primary", "secondary_cloud": "secondary", "policy": "kill"})
        jobs = [api.post("/items", json={"vm": vm})["job"]["id"] for vm in vms]
        for j in jobs:
            assert d.wait_job(j, 400)["state"] == "succeeded"
        yield d, vms
    finally:
        d.close()
        import libvirt

        for name in vms:
            for dom_name in (name, f"dr-{name}"):
                try:
                    dom = libvirt_conn.lookupByName(dom_name)
                    if dom.isActive():
                        dom.destroy()
                    dom.undefineFlags(getattr(libvirt, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0))
                except libvirt.libvirtError:
                    pass


def test_control_plane_killed_at_a_random_step_of_planned_failovers(
        deployment: tuple[LocalDeployment, list[str]], libvirt_conn: Any) -> None:
    d, vms = deployment
    seed = int(os.environ.get("STANDBY_KILL_SEED") or random.SystemRandom().randrange(1 << 30))
    print(f"STANDBY_KILL_SEED={seed}")
    rng = random.Random(seed)
    outcomes: list[str] = []
    for run, vm in enumerate(vms):
        api = d.client()
        replica = f"dr-{vm}"
        job = api.post(f"/items/{vm}/failover", json={"type": "planned"})["job"]
        # The workflow's own steps are persisted in the job's payload (one row each, saved as
        # running before the step acts): kill when the chosen one has started.
        n_steps = len(job["payload"]["run"]["steps"])
        target = rng.randrange(n_steps)

        def at_target() -> bool:
            j = api.get(f"/jobs/{job['id']}")
            if j["state"] in ("succeeded", "failed", "errored", "cancelled"):
                return True
            rows = (j.get("payload") or {}).get("run", {}).get("steps", [])
            return any(i >= target and r["status"] != "pending" for i, r in enumerate(rows))

        d.wait_for(at_target, 180, f"run {run}: step {target} of the failover", interval=0.1, log=d.server)
        assert d.stop_server(kill=True) == -9
        d.start_server()
        final = d.wait_job(job["id"], 400)
        src_on, dst_on = _running(libvirt_conn, vm), _running(libvirt_conn, replica)
        assert src_on != dst_on, f"run {run} (seed {seed}, kill at step {target}): source {src_on}, replica {dst_on}"
        if dst_on:
            assert final["state"] == "succeeded", final
            acked = _console(libvirt_conn, vm).acked()
            text = _console(libvirt_conn, replica)
            starts = text.wait_for(lambda c: _START.findall(c.text()), 120)
            lost = max(0, acked - (int(starts[-1]) - 1))  # written but unacknowledged is not lost
            assert lost == 0, f"run {run} (seed {seed}, kill at step {target}): {lost} records lost"
            outcomes.append(f"step {target}: failed over")
        else:
            assert final["state"] in ("failed", "cancelled"), final
            outcomes.append(f"step {target}: rolled back")
        # Checked: power this VM's running copy off so the next runs have the CPU.
        for name in (vm, replica):
            if _running(libvirt_conn, name):
                libvirt_conn.lookupByName(name).destroy()
    print("\n".join(outcomes))
    assert len(outcomes) == RUNS
