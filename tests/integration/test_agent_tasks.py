"""The agent's tasks (agent/tasks.py) on a real libvirt domain of the test guest, powered
off (its disk is edited with qemu-io between cycles, so the source is known exactly): cycle
tasks to a real receiver (seed, changed extents, a forced hash scan), what they report,
and offline seeding (seed_export on the primary, seed_import on the secondary, then an
incremental catch-up). Every point is compared with the source image by `qemu-img
compare`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from replication_helpers import endpoint, make_pki, running_agent  # noqa: E402

from standby.agent.tasks import TaskEnv, TaskProgress, execute  # noqa: E402
from standby.drivers.libvirt.driver import LibvirtDriver  # noqa: E402
from standby.contract import disk_id_for  # noqa: E402
from standby.replication import tls  # noqa: E402
from standby.replication.store import ReplicaStore  # noqa: E402
from standby.testing import guest  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MiB = 1 << 20
KiB = 1 << 10


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tls.Identity]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def qemu_io(disk: Path, cmd: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(disk)], check=True, capture_output=True)


@pytest.fixture
def offline_vm(libvirt_conn: Any, guest_image: guest.GuestImage, vm_name: Any, vm_dir: Path
               ) -> Iterator[tuple[str, Path]]:
    """A defined, powered-off domain of the test guest with data on its disk."""
    import libvirt

    name = vm_name("agt")
    disk = guest.create_disk(vm_dir / f"{name}-vda.qcow2", 16)
    for off, pattern in ((0, 0x11), (3 * MiB, 0x22), (9 * MiB + 64 * KiB, 0x33)):
        qemu_io(disk, f"write -P {pattern:#x} {off} 256k")
    dom = libvirt_conn.defineXML(guest.domain_xml(name, disk, vm_dir / f"{name}.log", guest_image,
                                                  guest.cmdline("write")))
    yield name, disk
    try:
        for cp in dom.listAllCheckpoints():
            cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        dom.undefine()
    except libvirt.libvirtError:
        pass


def same_as_source(store: Path, disk_id: str, point: str, source: Path, tmp: Path) -> None:
    disk = ReplicaStore(store).disk(disk_id)
    overlay = disk.materialize(point, tmp / f"cmp-{point}.qcow2")
    try:
        r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(overlay), str(source)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        disk.release(overlay)
        overlay.unlink()


def _env(store: Path, state: Path, driver: LibvirtDriver | None, ident: tls.Identity) -> TaskEnv:
    def no_driver() -> Any:
        raise AssertionError("the secondary's tasks do not use the hypervisor")

    ctx = tls.client_context(ident)
    return TaskEnv(ReplicaStore(store), state, (lambda: driver) if driver else no_driver, lambda: ctx,
                   owns=lambda vm: vm.startswith("sbt-agt-"))


def test_cycle_tasks_seed_extents_and_forced_hash_scan(libvirtd: str, offline_vm: tuple[str, Path],
                                                      pki: dict[str, tls.Identity], tmp_path: Path) -> None:
    name, disk = offline_vm
    disk_id = disk_id_for(name, "vda")
    with running_agent(tmp_path / "replicas", pki["agent"]) as rx, \
            LibvirtDriver(libvirtd, tmp_path / "state" / "tracking") as drv:
        env = _env(tmp_path / "primary-replicas", tmp_path / "state", drv, pki["sender"])
        secondary = _env(tmp_path / "replicas", tmp_path / "unused", None, pki["agent"])
        peer = {"name": "agent-b", "address": endpoint(rx)}

        def cycle(task_id: int, **params: Any) -> dict[str, Any]:
            progress = TaskProgress()
            out = execute(env, {"id": task_id, "kind": "cycle",
                                "params": {"item_id": 1, "vm": name, "peer": peer, "consistency": "auto",
                                           "compress": True, "timeout_seconds": 30, **params}}, progress)
            assert out.ok, out
            res = out.result
            assert res["completed"] and res["vm"] == name and res["consistency"] == "crash"
            assert res["point_at"].endswith("Z")
            assert progress.bytes_done == sum(d["result"]["bytes_examined"] for d in res["disks"])
            return res

        seed = cycle(1)
        d = seed["disks"][0]
        assert d["kind"] == "seed" and set(seed["points"]) == {disk_id}
        assert seed["bytes_sent"] == d["result"]["wire_bytes"] > 0
        same_as_source(tmp_path / "replicas", disk_id, seed["points"][disk_id], disk, tmp_path)

        qemu_io(disk, f"write -P 0x44 {5 * MiB} 64k")
        inc = cycle(2)
        d = inc["disks"][0]
        assert d["kind"] == "extents" and d["result"]["data_blocks"] == 1, d
        same_as_source(tmp_path / "replicas", disk_id, inc["points"][disk_id], disk, tmp_path)

        # the chain is intact, yet the operator asks for a hash scan: every block is compared
        forced = cycle(3, force_hash_scan=True)
        d = forced["disks"][0]
        assert d["kind"] == "hash_scan" and "asked for" in (d["resync_reason"] or ""), d
        assert d["result"]["bytes_examined"] == 16 * MiB and d["result"]["data_blocks"] == 0
        qemu_io(disk, f"write -P 0x55 {12 * MiB} 64k")
        forced = cycle(4, force_hash_scan=True)
        d = forced["disks"][0]
        assert d["kind"] == "hash_scan" and d["result"]["data_blocks"] == 1, d
        same_as_source(tmp_path / "replicas", disk_id, forced["points"][disk_id], disk, tmp_path)
        after = cycle(5)  # and the chain goes on from the forced cycle's checkpoint
        assert after["disks"][0]["kind"] == "extents" and after["disks"][0]["result"]["data_blocks"] == 0

        listed = execute(secondary, {"id": 6, "kind": "list_points", "params": {"disk_ids": [disk_id]}})
        assert listed.ok
        assert [p["kind"] for p in listed.result["points"][disk_id]] == [
            "seed", "extents", "hash_scan", "hash_scan", "extents"]

        # a VM that is gone: reported as NotFound, the agent carries on
        gone = execute(env, {"id": 7, "kind": "cycle", "params": {"vm": "sbt-agt-gone", "peer": peer}})
        assert not gone.ok and gone.error_type == "NotFound", gone


def test_offline_seed_then_incremental_catch_up(libvirtd: str, offline_vm: tuple[str, Path],
                                                pki: dict[str, tls.Identity], tmp_path: Path) -> None:
    name, disk = offline_vm
    disk_id = disk_id_for(name, "vda")
    seeds = tmp_path / "carried"
    with LibvirtDriver(libvirtd, tmp_path / "state" / "tracking") as drv:
        env = _env(tmp_path / "primary-replicas", tmp_path / "state", drv, pki["sender"])
        out = execute(env, {"id": 1, "kind": "seed_export", "params": {"vm": name, "disk_ids": [disk_id],
                                                                       "path": str(seeds)}})
        assert out.ok, out
        assert out.result["bytes"] == 3 * 256 * KiB  # the data written, no zeros
        assert (seeds / disk_id / "seed.json").is_file()
        again = execute(env, {"id": 1, "kind": "seed_export", "params": {"vm": name, "path": str(seeds)}})
        assert not again.ok and again.error_type == "Conflict"  # never overwrites a carried seed

        secondary = _env(tmp_path / "replicas", tmp_path / "unused", None, pki["agent"])
        imp = execute(secondary, {"id": 2, "kind": "seed_import", "params": {"vm": name, "disk_ids": [disk_id],
                                                                             "path": str(seeds)}})
        assert imp.ok, imp
        point = imp.result["disks"][disk_id]["point"]
        same_as_source(tmp_path / "replicas", disk_id, point, disk, tmp_path)

        qemu_io(disk, f"write -P 0x66 {7 * MiB} 64k")
        with running_agent(tmp_path / "replicas", pki["agent"]) as rx:
            cyc = execute(env, {"id": 3, "kind": "cycle",
                                "params": {"vm": name, "peer": {"name": "b", "address": endpoint(rx)}}})
        assert cyc.ok, cyc
        d = cyc.result["disks"][0]
        # the seed's checkpoint is the base: only the change since is read and sent
        assert d["kind"] == "extents" and d["result"]["data_blocks"] == 1 and d["nbd_bytes_read"] == 64 * KiB, d
        assert d["result"]["base_point"] == point
        same_as_source(tmp_path / "replicas", disk_id, cyc.result["points"][disk_id], disk, tmp_path)


HOLD = """
import sys, time
from standby.drivers.libvirt.driver import LibvirtDriver
driver = LibvirtDriver(sys.argv[1], sys.argv[2])
cycle = driver.begin_cycle(sys.argv[3], None)  # kept referenced: a collected one would end the job
session = cycle.__enter__()
print("holding", session.checkpoint, flush=True)
time.sleep(600)
"""


def test_a_backup_job_left_by_a_killed_agent_is_aborted_at_the_next_start(
        libvirtd: str, libvirt_conn: Any, guest_image: guest.GuestImage, vm_name: Any, vm_dir: Path,
        pki: dict[str, tls.Identity], tmp_path: Path) -> None:
    """An agent killed mid-cycle leaves libvirt's pull-mode backup job running; without the
    sweep every later cycle of that VM fails on the domain's job lock."""
    import libvirt

    from standby.agent.config import AgentConfig
    from standby.agent.runtime import AgentRuntime

    name = vm_name("agt")
    disk = guest.create_disk(vm_dir / f"{name}-vda.qcow2", 16)
    dom = libvirt_conn.defineXML(guest.domain_xml(name, disk, vm_dir / f"{name}.log", guest_image,
                                                  guest.cmdline("write", rate=5)))
    try:
        dom.create()
        cfg = AgentConfig(data_dir=tmp_path / "a", name="agent-a", server_url="https://127.0.0.1:1", site="s",
                          server="m", cloud="c", host="h", listen="127.0.0.1:7443", libvirt_uri=libvirtd,
                          domains=["sbt-agt-*"])
        holder = subprocess.Popen([sys.executable, "-c", HOLD, libvirtd, str(cfg.tracking_dir), name],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().startswith("holding")
        holder.kill()  # as SIGKILL of the agent mid-cycle: nothing ends the job
        holder.wait()
        holder.stdout.close()
        assert dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE

        rt = AgentRuntime(cfg)  # not started: its libvirt side only
        drv = rt.driver()  # first use: the sweep
        try:
            assert dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
            with running_agent(tmp_path / "replicas", pki["agent"]) as rx:
                env = _env(tmp_path / "unused", cfg.state_dir, drv, pki["sender"])
                out = execute(env, {"id": 1, "kind": "cycle",
                                    "params": {"vm": name, "peer": {"name": "b", "address": endpoint(rx)}}})
            assert out.ok, out
            assert out.result["disks"][0]["kind"] == "seed"
        finally:
            drv.close()
    finally:
        try:
            if dom.isActive():
                dom.destroy()
            for cp in dom.listAllCheckpoints():
                cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
            dom.undefine()
        except libvirt.libvirtError:
            pass
