"""The agent's recovery tasks (agent/recovery.py) on a real libvirtd with the real test
guest, through `tasks.execute` as the agent runs them:

- a failover by tasks: a cycle task replicates a powered-off source VM (records written
  offline) to a real receiver and returns the domain's XML; `materialize` pins the point
  as an overlay, `define_vm` defines the replica from that XML (the guest's cmdline set to
  verify mode), `start_vm` boots it and the guest's verifier reports every record on the
  console, as `guest.verify_image` does on the overlay; then stop, undefine and release
  leave no domain, no overlay and no pin. Every task is run twice (re-delivered) and the
  second run changes nothing;
- an isolated network: created twice, a test VM attached to it by `isolated_network`,
  deleting it refused while the VM is defined, stop_vm forced after its timeout (the
  guest has no ACPI handler), then removed;
- reverse replication and failback onto an old disk: `adopt_disk` of the old image, then
  a forced hash-scan cycle from the replica VM on a changed copy (disk_ids naming the
  original VM's replica disk) sends only the changed blocks; `restore_disk` writes the
  replica's latest point back into the old qcow2 image and into a raw image, which
  `qemu-img compare` then finds identical to the changed copy; an image a running VM
  uses is refused by both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from replication_helpers import endpoint, make_pki, running_agent  # noqa: E402

from standby.agent.config import replica_vm_name  # noqa: E402
from standby.agent.tasks import Outcome, TaskEnv, TaskProgress, execute  # noqa: E402
from standby.drivers.base import NicInfo, VmState  # noqa: E402
from standby.drivers.libvirt import domains  # noqa: E402
from standby.drivers.libvirt.driver import LibvirtDriver  # noqa: E402
from standby.contract import disk_id_for  # noqa: E402
from standby.replication import tls  # noqa: E402
from standby.replication.store import ReplicaStore  # noqa: E402
from standby.testing import guest  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

libvirt = pytest.importorskip("libvirt")

MiB = 1 << 20
KiB = 1 << 10
RECORDS = 12
PREFIX = "sbt-dr-"
SRC_MAC = "52:54:00:a9:00:01"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.Identity]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _remove_domain(conn: Any, name: str) -> None:
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    if dom.isActive():
        dom.destroy()
    for cp in dom.listAllCheckpoints():
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    dom.undefine()


@pytest.fixture
def source(libvirt_conn: Any, guest_image: guest.GuestImage, vm_name: Any, vm_dir: Path) -> Iterator[dict[str, Any]]:
    """A powered-off domain of the test guest (write mode, one NIC attached to nothing) on
    a 32 MiB qcow2 disk holding RECORDS records and 6 MiB of other data."""
    name = vm_name("agt")
    raw = vm_dir / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(32 * MiB)
        guest.write_records(f, 0, RECORDS)
        f.seek(8 * MiB)
        f.write(os.urandom(6 * MiB))
    disk = vm_dir / f"{name}-vda.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(disk)], check=True)
    raw.unlink()
    nic = f"<interface type='ethernet'><mac address='{SRC_MAC}'/><model type='virtio'/></interface>"
    libvirt_conn.defineXML(guest.domain_xml(name, disk, vm_dir / f"{name}.log", guest_image,
                                            guest.cmdline("write", rate=20), extra_devices=nic))
    yield {"name": name, "disk": disk, "disk_id": disk_id_for(name, "vda")}
    _remove_domain(libvirt_conn, name)


def _env(store: Path, state: Path, driver: LibvirtDriver, ident: tls.Identity, prefix: str) -> TaskEnv:
    ctx = tls.client_context(ident)
    return TaskEnv(ReplicaStore(store), state, lambda: driver, lambda: ctx, owns=lambda vm: vm.startswith(prefix))


def run(env: TaskEnv, kind: str, **params: Any) -> dict[str, Any]:
    out = execute(env, {"id": 1, "kind": kind, "params": params}, TaskProgress())
    assert out.ok, out
    return out.result


def fails(env: TaskEnv, kind: str, **params: Any) -> Outcome:
    out = execute(env, {"id": 1, "kind": kind, "params": params})
    assert not out.ok, out
    return out


def _with_cmdline(xml: str, cmd: str) -> str:
    root = ET.fromstring(xml)
    el = root.find("./os/cmdline")
    assert el is not None
    el.text = cmd
    return ET.tostring(root, encoding="unicode")


def _same(a: Path, b: Path) -> None:
    r = subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _wait_state(drv: LibvirtDriver, name: str, state: VmState, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while drv.vm(name).state is not state:
        assert time.monotonic() < deadline, f"{name} is {drv.vm(name).state}, not {state}"
        time.sleep(0.2)


def test_failover_by_tasks_boots_the_point_and_cleans_up(libvirtd: str, libvirt_conn: Any, source: dict[str, Any],
                                                        pki: dict[str, tls.Identity], tmp_path: Path) -> None:
    name, disk_id = source["name"], source["disk_id"]
    replica = replica_vm_name(PREFIX, name)
    with running_agent(tmp_path / "replicas", pki["agent"]) as rx, \
            LibvirtDriver(libvirtd, tmp_path / "a" / "tracking") as drv_a, \
            LibvirtDriver(libvirtd, tmp_path / "b" / "tracking") as drv_b:
        primary = _env(tmp_path / "a-replicas", tmp_path / "a", drv_a, pki["sender"], "sbt-agt-")
        secondary = _env(tmp_path / "replicas", tmp_path / "b", drv_b, pki["agent"], PREFIX)
        try:
            cyc = run(primary, "cycle", vm=name, peer={"name": "b", "address": endpoint(rx)})
            point = cyc["points"][disk_id]
            xml = cyc["domain_xml"]
            root = ET.fromstring(xml)
            assert root.findtext("name") == name and root.get("id") is None  # the inactive definition
            assert root.find("./devices/interface/mac").get("address") == SRC_MAC  # type: ignore[union-attr]

            params = {"vm": name, "disk_ids": {"vda": disk_id}, "point": {disk_id: point}, "purpose": "failover",
                      "tag": "job-1"}
            mat = run(secondary, "materialize", **params)
            assert run(secondary, "materialize", **params) == mat  # re-delivered: the same overlays
            overlay = Path(mat["overlays"]["vda"])
            store_disk = secondary.store.disk(disk_id)
            assert store_disk.pinned() == {str(overlay): point}

            template = _with_cmdline(xml, guest.cmdline("verify"))
            define = {"name": replica, "template_xml": template, "disks": mat["overlays"], "networks": [None]}
            made = run(secondary, "define_vm", **define)
            assert made["name"] == replica and not made["existed"] and made["power_state"] == "shut-off"
            again = run(secondary, "define_vm", **define)
            assert again["existed"] and again["uuid"] == made["uuid"]
            other = fails(secondary, "define_vm", **{**define, "disks": {"vda": str(source["disk"])}})
            assert other.error_type == "Conflict"  # that name with other disks: not touched
            info = drv_b.vm(replica)
            assert [(d.target, d.path) for d in info.disks] == [("vda", str(overlay))]
            assert info.nics == [NicInfo(SRC_MAC, None)]
            assert info.uuid != drv_a.vm(name).uuid

            assert run(secondary, "start_vm", name=replica) == {"power_state": "running", "was_running": False}
            console = guest.Console(overlay.parent / f"{replica}.console.log")
            verdict: guest.Verdict = console.wait_for(
                lambda c: c.verdict(), 120, alive=lambda: drv_b.vm(replica).state is VmState.RUNNING)
            assert verdict.ok and verdict.last == RECORDS - 1 and verdict.records == RECORDS, verdict
            _wait_state(drv_b, replica, VmState.SHUT_OFF, 30)  # the verifier powers the guest off
            assert guest.verify_image(overlay) == verdict

            # cleanup, each step twice
            stop = run(secondary, "stop_vm", name=replica, timeout_seconds=5)
            assert stop == {"power_state": "shut-off", "forced": False, "was_running": False}
            busy = fails(secondary, "release", tag="job-1")
            assert busy.error_type == "Conflict" and replica in (busy.error or "")  # its VM still uses it
            assert overlay.is_file()
            assert run(secondary, "undefine_vm", name=replica) == {"power_state": "absent", "removed": True}
            assert run(secondary, "undefine_vm", name=replica) == {"power_state": "absent", "removed": False}
            assert run(secondary, "stop_vm", name=replica)["power_state"] == "absent"
            assert fails(secondary, "start_vm", name=replica).error_type == "NotFound"
            rel = run(secondary, "release", tag="job-1")
            assert rel == {"released": [str(overlay)], "points": {disk_id: point}}
            assert run(secondary, "release", tag="job-1") == {"released": [], "points": {}}
            assert replica not in [d.name() for d in libvirt_conn.listAllDomains()]
            assert not overlay.parent.exists() and store_disk.pinned() == {}
            assert not list((tmp_path / "replicas" / "overlays").iterdir())
            # and the source was never touched by the secondary's tasks
            assert fails(secondary, "stop_vm", name=name).error_type == "Refused"
            assert drv_a.vm(name).state is VmState.SHUT_OFF
        finally:
            _remove_domain(libvirt_conn, replica)


def test_isolated_network_for_a_test_vm(libvirtd: str, libvirt_conn: Any, source: dict[str, Any],
                                        pki: dict[str, tls.Identity], tmp_path: Path) -> None:
    name = source["name"]
    test_vm = replica_vm_name(PREFIX, name, test=True)
    net = f"sbt-net-{os.urandom(3).hex()}"
    overlay = tmp_path / "test-vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(source["disk"]),
                    str(overlay)], check=True)
    with LibvirtDriver(libvirtd, tmp_path / "b" / "tracking") as drv:
        env = _env(tmp_path / "replicas", tmp_path / "b", drv, pki["agent"], PREFIX)
        template = drv.domain_xml(name)
        try:
            made = run(env, "create_network", name=net)
            assert run(env, "create_network", name=net) == made and made["name"] == net
            attach = {net, domains.bridge_name_for(net)}
            run(env, "define_vm", name=test_vm, template_xml=template, disks={"vda": str(overlay)},
                networks=[None], isolated_network=net)
            info = drv.vm(test_vm)
            assert [n.mac for n in info.nics] == [SRC_MAC] and info.nics[0].network in attach, info.nics
            assert run(env, "start_vm", name=test_vm)["power_state"] == "running"
            assert run(env, "start_vm", name=test_vm) == {"power_state": "running", "was_running": True}
            busy = fails(env, "delete_network", name=net)
            assert busy.error_type == "Conflict" and test_vm in (busy.error or "")
            t0 = time.monotonic()
            stop = run(env, "stop_vm", name=test_vm, timeout_seconds=2)
            assert stop == {"power_state": "shut-off", "forced": True, "was_running": True}  # no ACPI handler
            assert time.monotonic() - t0 < 30
            assert run(env, "stop_vm", name=test_vm)["was_running"] is False
            assert run(env, "undefine_vm", name=test_vm)["removed"] is True
            assert run(env, "delete_network", name=net) == {"name": net, "removed": True}
            assert run(env, "delete_network", name=net) == {"name": net, "removed": False}
            assert net not in [n.name() for n in libvirt_conn.listAllNetworks()]
            assert not Path("/sys/class/net", domains.bridge_name_for(net)).exists()
            # an operator's network of that kind of name is never removed by Standby
            theirs = libvirt_conn.networkDefineXML(domains.isolated_network_xml(net, "sbtop" + net[-6:]))
            refused = fails(env, "delete_network", name=net)
            assert refused.error_type == "Refused" and "not made by Standby" in (refused.error or "")
            assert net in [n.name() for n in libvirt_conn.listAllNetworks()]
            theirs.undefine()
        finally:
            _remove_domain(libvirt_conn, test_vm)
            try:
                domains.remove_network(libvirt_conn, net)
            except Exception:  # noqa: BLE001 - removed by the test
                pass


def test_adopt_then_hash_scan_sends_only_the_differences_and_restore_writes_back(
        libvirtd: str, libvirt_conn: Any, guest_image: guest.GuestImage, source: dict[str, Any],
        pki: dict[str, tls.Identity], tmp_path: Path, vm_dir: Path) -> None:
    """Failback onto the old primary: its old disk adopted as the replica, a hash scan from
    the failed-over VM's (changed) disk, the result written back into the old image."""
    name, disk_id = source["name"], source["disk_id"]
    old = tmp_path / "old-vda.qcow2"  # the old primary's disk, as it was left
    shutil.copyfile(source["disk"], old)
    changed = vm_dir / "dr-vda.qcow2"  # the failed-over VM's disk: the same plus what it wrote since
    shutil.copyfile(source["disk"], changed)
    for off, pattern in ((3 * MiB, 0x5A), (20 * MiB + 64 * KiB, 0x6B)):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {off} 64k", str(changed)],
                       check=True, capture_output=True)
    replica = replica_vm_name(PREFIX, name)
    libvirt_conn.defineXML(guest.domain_xml(replica, changed, vm_dir / "dr.log", guest_image,
                                            guest.cmdline("write")))
    try:
        with running_agent(tmp_path / "old-replicas", pki["agent"]) as rx, \
                LibvirtDriver(libvirtd, tmp_path / "b" / "tracking") as drv_b, \
                LibvirtDriver(libvirtd, tmp_path / "a" / "tracking") as drv_a:
            old_site = _env(tmp_path / "old-replicas", tmp_path / "a", drv_a, pki["agent"], "sbt-agt-")
            new_site = _env(tmp_path / "b-replicas", tmp_path / "b", drv_b, pki["sender"], PREFIX)

            adopted = run(old_site, "adopt_disk", disk_id=disk_id, image=str(old))
            assert not adopted["reused"] and adopted["format"] == "qcow2" and adopted["size"] == 32 * MiB
            assert 6 * MiB <= adopted["bytes"] <= 7 * MiB  # the data, not the zeros: a local read, no network
            again = run(old_site, "adopt_disk", disk_id=disk_id, image=str(old))
            assert again["reused"] and again["point_id"] == adopted["point_id"] and again["bytes"] == 0
            listed = run(old_site, "list_points", disk_ids=[disk_id])["points"][disk_id]
            assert [p["kind"] for p in listed] == ["adopt"]

            cyc = run(new_site, "cycle", vm=replica, peer={"name": "a", "address": endpoint(rx)},
                      disk_ids={"vda": disk_id}, force_hash_scan=True)
            d = cyc["disks"][0]
            assert d["disk_id"] == disk_id and d["kind"] == "hash_scan", d
            assert d["result"]["data_blocks"] == 2 and d["result"]["base_point"] == adopted["point_id"], d
            assert cyc["bytes_sent"] < 1 * MiB, cyc["bytes_sent"]  # of a 32 MiB disk with 6 MiB of data
            assert ET.fromstring(cyc["domain_xml"]).findtext("name") == replica
            latest = cyc["points"][disk_id]
            ov = old_site.store.disk(disk_id).materialize(latest, tmp_path / "check.qcow2")
            try:
                _same(ov, changed)
            finally:
                old_site.store.disk(disk_id).release(ov)
                ov.unlink()

            # failback: the replica's latest point written into the old disk in place
            before = os.stat(old).st_ino
            restored = run(old_site, "restore_disk", disk_id=disk_id, image=str(old))
            assert restored["point_id"] == latest and restored["format"] == "qcow2"
            assert 6 * MiB <= restored["bytes"] <= 7 * MiB
            _same(old, changed)
            assert os.stat(old).st_ino == before  # the same file: the VM's definition still fits
            assert run(old_site, "restore_disk", disk_id=disk_id, image=str(old))["point_id"] == latest
            _same(old, changed)
            # a raw image full of other data: every byte replaced, zeros included
            raw = tmp_path / "old.raw"
            with open(raw, "wb") as f:
                f.write(os.urandom(32 * MiB))
            assert run(old_site, "restore_disk", disk_id=disk_id, image=str(raw),
                       point=adopted["point_id"])["format"] == "raw"
            _same(raw, source["disk"])
            assert old_site.store.disk(disk_id).pinned() == {}  # the restore's overlay is released
            small = tmp_path / "small.raw"
            small.write_bytes(bytes(MiB))
            assert fails(old_site, "restore_disk", disk_id=disk_id, image=str(small)).error_type == "Conflict"

            # an image a running VM uses is neither read nor written
            libvirt_conn.lookupByName(replica).create()
            in_use = fails(new_site, "adopt_disk", disk_id=disk_id, image=str(changed))
            assert in_use.error_type == "Conflict" and "in use" in (in_use.error or ""), in_use
            running = fails(old_site, "restore_disk", disk_id=disk_id, image=str(changed))
            assert running.error_type == "Conflict" and replica in (running.error or ""), running
            libvirt_conn.lookupByName(replica).destroy()
    finally:
        _remove_domain(libvirt_conn, replica)
