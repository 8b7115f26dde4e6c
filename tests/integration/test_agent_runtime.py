"""`standby agent run` as a process.

Without a control plane: the receiver serves replication all the same (a seed from
`standby replicate` lands), the outage is logged once, SIGTERM stops it cleanly.

Against a real control plane (`standby server run`, two registered agents as processes
through `standby.demo.local.LocalDeployment`, a real test guest owned by the primary
agent's domain filter): heartbeats and inventory reach the control plane, cycle tasks run
and land recovery points in the secondary agent's replica store that the guest's verifier
(running VM) and `qemu-img compare` (VM off) find equal to the source, a task claimed before
an agent restart is run again by the restarted agent, and a control-plane restart costs
the agent one "unreachable" and one "reachable again" log line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from replication_helpers import make_image  # noqa: E402

from standby.agent.config import AgentConfig  # noqa: E402
from standby.demo.local import free_port, standby_command  # noqa: E402
from standby.replication import tls  # noqa: E402
from standby.replication.store import ReplicaStore  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MiB = 1 << 20


def _wait(pred: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen[Any] | None = None,
          log: Path | None = None, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"gave up waiting for {what}: exited {proc.returncode}\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
        time.sleep(interval)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_agent_run_without_a_control_plane_receives_and_stops_cleanly(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    tls.init_ca(ca)
    data = tmp_path / "agent-b"
    ident = tls.issue(ca, "agent-b", ["127.0.0.1"], out_dir=tmp_path / "issued")
    sender = tls.issue(ca, "sender", ["127.0.0.1"])
    data.mkdir()
    shutil.copy(ident.cert, data / "agent.crt")
    shutil.copy(ident.key, data / "agent.key")
    shutil.copy(ident.ca, data / "ca.crt")
    listen = f"127.0.0.1:{free_port()}"
    # nothing listens on the control plane's port; libvirt's built-in test driver needs no daemon
    AgentConfig(data_dir=data, name="agent-b", server_url=f"https://127.0.0.1:{free_port()}", site="s",
                server="m", cloud="secondary", host="host-b", listen=listen, libvirt_uri="test:///default",
                heartbeat_seconds=1).save()
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(standby_command("agent", "run", "--data-dir", str(data)), stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        _wait(lambda: "running: replication on" in _text(log), 30, "the agent to start", proc, log)
        img = tmp_path / "disk.img"
        make_image(img, 8 * MiB)
        env = dict(os.environ, STANDBY_TLS_CERT=str(sender.cert), STANDBY_TLS_KEY=str(sender.key),
                   STANDBY_TLS_CA=str(sender.ca), STANDBY_SENDER_STATE=str(tmp_path / "sender"))
        r = subprocess.run(standby_command("replicate", str(img), "--to", listen, "--disk-id", "d0", "--seed",
                                           "--json"), capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        points = ReplicaStore(data / "replicas").disk("d0").points()
        assert len(points) == 1
        # the heartbeat, inventory and task loops retried (backoff 1, 2, 4 s) and said so once
        _wait(lambda: _text(log).count("unreachable") >= 1, 10, "the outage to be logged", proc, log)
        time.sleep(4)
        assert _text(log).count("control plane unreachable") == 1, _text(log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, _text(log)
        assert "agent agent-b stopped" in _text(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------
# Against a real control plane


@pytest.fixture
def deployment(tmp_path: Path, libvirtd: str) -> Iterator[Any]:
    from standby.demo.local import LocalDeployment

    d = LocalDeployment(tmp_path / "dep", tick_seconds=1, heartbeat_timeout=10, libvirt_uri=libvirtd)
    try:
        yield d
    finally:
        d.close()


def _cycle_task(store: Any, agent_id: int, vm: str, peer: dict[str, Any], *, claim: bool = False) -> int:
    """A cycle task as the scheduler queues it (protection through POST /items is the
    control-plane e2e test's business; here the agent's side is under test)."""
    from standby.store.repo import tasks

    with store.transaction() as s:
        task = tasks.enqueue(s, agent_id=agent_id, kind="cycle", deadline_seconds=600,
                             params={"item_id": None, "vm": vm, "peer": peer, "consistency": "auto",
                                     "compress": True, "force_hash_scan": False, "timeout_seconds": 60})
        if claim:  # as if an agent had claimed it and died before finishing
            assert [t.id for t in tasks.claim(s, agent_id, max=1)] == [task.id]
        return int(task.id)


def _finished(store: Any, task_id: int) -> Any:
    from standby.store.repo import tasks

    with store.read() as s:
        t = tasks.get(s, task_id)
        if t.state in ("queued", "claimed"):
            return None
        return {"state": t.state, "result": t.result, "error": t.error, "error_type": t.error_type,
                "attempt": t.attempt, "bytes_done": t.bytes_done}


def _open_cycles(store: Any, agent_id: int) -> list[int]:
    from standby.store.repo import tasks

    with store.read() as s:
        return [t.id for t in tasks.list_tasks(s, kind="cycle") if t.agent_id == agent_id
                and t.state in ("queued", "claimed")]


def _materialized(replicas: Path, disk_id: str, point: str, dest: Path) -> Any:
    disk = ReplicaStore(replicas).disk(disk_id)
    return disk, disk.materialize(point, dest)


def test_two_agents_with_a_control_plane_replicate_a_guest(
        deployment: Any, libvirt_conn: Any, guest_image: Any, vm_name: Any, vm_dir: Path, tmp_path: Path) -> None:
    import libvirt

    from standby.contract import disk_id_for
    from standby.store.db import open_store, sqlite_url
    from standby.testing import guest

    d = deployment
    name = vm_name("rt")
    seeded = vm_name("rt")  # a powered-off VM, protected by offline seed
    seeded_disk = guest.create_disk(vm_dir / f"{seeded}-vda.qcow2", 16)
    for off, pattern in ((0, 0x11), (5 * MiB, 0x22)):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {off} 512k", str(seeded_disk)],
                       check=True, capture_output=True)
    dom2 = libvirt_conn.defineXML(guest.domain_xml(seeded, seeded_disk, vm_dir / f"{seeded}.log", guest_image,
                                                   guest.cmdline("write")))
    disk = guest.create_disk(vm_dir / f"{name}-vda.qcow2", 32)
    console = guest.Console(vm_dir / f"{name}.log")
    dom = libvirt_conn.defineXML(guest.domain_xml(name, disk, vm_dir / f"{name}.log", guest_image,
                                                  guest.cmdline("write", rate=10)))
    store = None
    try:
        dom.create()
        d.init()
        d.start_server()
        a = d.add_agent("host-a", cloud="primary", domains=[name, seeded])  # waits for a heartbeat
        b = d.add_agent("host-b", cloud="secondary", domains=["sbt-none-*"])
        api = d.client()
        # registration counts as a first sign of life: wait for what the agent itself reports
        agent_a = d.wait_for(lambda: (lambda ag: ag if "reported" in ag["facts"] else None)(
            api.get("/agents/host-a")), 30, "host-a's first heartbeat", log=a.process)
        assert agent_a["heartbeat_ok"] and agent_a["last_heartbeat_at"] and agent_a["address"] == a.listen
        reported = agent_a["facts"]["reported"]
        assert reported["listen"] == a.listen and reported["domains"] == [name, seeded]
        assert 0 < agent_a["facts"]["storage_free_bytes"] <= agent_a["facts"]["storage_total_bytes"]

        # inventory: the VM in the primary cloud only, as the driver sees it
        def listed() -> Any:
            vms = [v for v in api.get("/vms", params={"cloud": "primary"})["items"] if v["name"] == name]
            return vms[0] if vms else None

        vm = d.wait_for(listed, 60, "the VM in the primary cloud's inventory", log=a.process)
        assert vm["host"] == "host-a" and vm["uuid"] == dom.UUIDString() and vm["power_state"] == "running"
        assert vm["disks"]["vda"]["path"] == str(disk) and vm["disks"]["vda"]["size"] == 32 * MiB
        assert vm["disks"]["vda"]["format"] == "qcow2" and vm["disks"]["vda"]["qcow2_compat"] == "1.1"
        assert not [v for v in api.get("/vms", params={"cloud": "secondary"})["items"] if v["name"] == name]
        hosts = d.wait_for(lambda: (lambda hs: hs if "host-b" in hs else None)(
            {h["name"]: h for h in api.get("/hosts")["items"]}), 60, "host-b's inventory", log=b.process)
        assert hosts["host-a"]["replication_address"] == "127.0.0.1"
        assert hosts["host-a"]["facts"]["libvirt_version"] and hosts["host-b"]["storage_free_bytes"] > 0

        # registration as an operator runs it: the key stays out of every file the agent writes
        reg_key = api.post("/registration-keys", json={"description": "host-c", "valid_days": 1})["key"]
        key_file = tmp_path / "reg.key"
        key_file.write_text(reg_key)
        c_dir = tmp_path / "agent-c"
        args = ["agent", "register", "--data-dir", str(c_dir), "--server", d.url, "--ca", str(d.ca),
                "--name", "host-c", "--site", "local", "--server-name", "mgr", "--cloud", "secondary",
                "--host", "host-c", "--listen", f"127.0.0.1:{free_port()}", "--domains", "dr-*"]
        out = d.run_cli(*args, "--key-file", str(key_file))
        assert "registered" in out.stdout and reg_key not in out.stdout + out.stderr
        assert oct(os.stat(c_dir / "agent.key").st_mode & 0o777) == "0o600"
        for f in c_dir.iterdir():
            assert reg_key not in f.read_text(errors="replace"), f
        cfg = AgentConfig.load(c_dir)
        assert (cfg.name, cfg.cloud, cfg.domains, cfg.agent_id) == ("host-c", "secondary", ["dr-*"],
                                                                     api.get("/agents/host-c")["id"])
        assert api.get("/agents/host-c")["cert_fingerprint"] == tls.fingerprint((c_dir / "agent.crt").read_bytes())
        bad = d.run_cli(*args, "--key", "sbk_not-a-key-at-all", check=False)
        assert bad.returncode != 0 and "sbk_not-a-key-at-all" not in bad.stdout + bad.stderr, bad.stderr

        store = open_store(sqlite_url(d.server_dir), migrate=False)
        peer = {"name": "host-b", "address": b.listen}
        disk_id = disk_id_for(name, "vda")
        replicas = b.data_dir / "replicas"

        # protection through the API: the scheduler hands cycles to host-a, points land on host-b;
        # the point holds every record the guest acknowledged before protection was asked for
        console.wait_for(lambda c: c.acked() >= 5, 90, alive=dom.isActive)
        acked = console.acked()
        # The test reads the points it is told of: keep them (retention alone keeps the latest only).
        d.run_cli("policy", "create", "fast", "--copy-frequency", "continuous", "--keep-all-points-minutes", "60")
        d.run_cli("pair", "primary", "secondary", "--policy", "fast")
        out = json.loads(d.run_cli("protect", name, "--json", "--no-wait").stdout)
        job = d.wait_job(out["job"]["id"], 300)
        assert job["state"] == "succeeded", job
        item = d.wait_for(lambda: (lambda i: i if i.get("last_recovery_point_id") else None)(d.item(name)), 60,
                          "the first recovery point", log=d.server)
        assert item["state"] == "protected"
        point = item["last_recovery_point_id"]
        replica, overlay = _materialized(replicas, disk_id, point, tmp_path / "p1.qcow2")
        try:
            verdict = guest.verify_image(overlay)
        finally:
            replica.release(overlay)
        assert verdict.ok and verdict.last >= acked, verdict.line()
        # the point carries what host-b needs to start the VM without the control plane
        from standby.replication import catalog

        vp = catalog.choose(ReplicaStore(replicas), name, "latest", now=time.time())
        assert vp.manifest is not None and vp.manifest.startable, vp
        assert vp.manifest.vm == name and vp.manifest.disks == {"vda": disk_id}
        assert f"<name>{name}</name>" in (vp.manifest.domain_xml or "")
        assert vp.manifest.item_id == item["id"] and vp.manifest.policy["name"] == "fast"
        api.post(f"/items/{name}/pause")  # the scheduler stops; the tasks below are this test's
        d.wait_for(lambda: d.item(name)["state"] == "paused", 30, "pause", log=d.server)
        d.wait_for(lambda: not _open_cycles(store, agent_a["id"]), 60, "the last scheduled cycle to end")

        # a cycle task of the running guest, queued as the scheduler does
        acked = console.acked()
        task_id = _cycle_task(store, agent_a["id"], name, peer)
        done = d.wait_for(lambda: _finished(store, task_id), 120, "a cycle task", log=a.process)
        assert done["state"] == "succeeded", done
        res = done["result"]
        assert res["completed"] and res["disks"][0]["kind"] == "extents" and res["bytes_sent"] > 0, res
        replica, overlay = _materialized(replicas, disk_id, res["points"][disk_id], tmp_path / "p2.qcow2")
        try:
            verdict = guest.verify_image(overlay)
        finally:
            replica.release(overlay)
        assert verdict.ok and verdict.last >= acked, verdict.line()

        # a task claimed by an agent that then died is run again by the restarted agent
        assert d.stop_agent("host-a") == 0
        task2 = _cycle_task(store, agent_a["id"], name, peer, claim=True)
        d.start_agent("host-a")
        done = d.wait_for(lambda: _finished(store, task2), 120, "the re-delivered cycle task", log=a.process)
        assert done["state"] == "succeeded" and done["attempt"] == 1, done
        assert done["result"]["disks"][0]["kind"] == "extents", done["result"]

        # the VM off: the next point is the source image exactly
        dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
        _wait(lambda: not dom.isActive(), 30, "the VM to stop")
        task3 = _cycle_task(store, agent_a["id"], name, peer)
        done = d.wait_for(lambda: _finished(store, task3), 120, "the cycle of the stopped VM", log=a.process)
        assert done["state"] == "succeeded", done
        replica, overlay = _materialized(replicas, disk_id, done["result"]["points"][disk_id], tmp_path / "p4.qcow2")
        try:
            r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(overlay), str(disk)],
                               capture_output=True, text=True)
        finally:
            replica.release(overlay)
        assert r.returncode == 0, r.stdout + r.stderr

        # losing the control plane: one line when it goes, one when it is back; work resumes
        d.stop_server()
        _wait(lambda: "control plane unreachable" in _text(a.process.log), 30, "the agent to notice the outage")
        d.start_server()
        _wait(lambda: "reachable again" in _text(a.process.log), 60, "the agent to reconnect")
        assert _text(a.process.log).count("control plane unreachable") == 1
        task4 = _cycle_task(store, agent_a["id"], name, peer)
        done = d.wait_for(lambda: _finished(store, task4), 120, "a cycle after the outage", log=a.process)
        assert done["state"] == "succeeded" and done["result"]["disks"][0]["result"]["data_blocks"] == 0, done

        # offline initial replication through the protection job: seed_export on host-a,
        # seed_import on host-b, then a catch-up cycle that sends only the change since
        carried = tmp_path / "carried"
        d.run_cli("policy", "create", "seeded", "--copy-frequency", "5m", "--keep-all-points-minutes", "60",
                  "--initial", "offline",
                  "--export-path", str(carried), "--import-path", str(carried))
        pairing = api.get("/pairings")["items"][0]
        api.post(f"/pairings/{pairing['id']}/policies", json={"policy": "seeded"})
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x33 {9 * MiB} 64k", str(seeded_disk)],
                       check=True, capture_output=True)
        out = json.loads(d.run_cli("protect", seeded, "--policy", "seeded", "--json", "--no-wait").stdout)
        job = d.wait_job(out["job"]["id"], 300)
        assert job["state"] == "succeeded", (job.get("error"), [(st["name"], st["state"], st.get("message"))
                                                                for st in job.get("steps", [])])
        seeded_id = disk_id_for(seeded, "vda")
        assert (carried / seeded_id / "seed.json").is_file()
        item = d.wait_for(lambda: (lambda i: i if i.get("last_recovery_point_id") else None)(d.item(seeded)), 120,
                          "the seeded VM's first point", log=d.server)
        with store.read() as s:
            from standby.store.repo import tasks as tasks_repo

            kinds = {t.kind: t for t in tasks_repo.list_tasks(s, item_id=item["id"])}
            assert kinds["seed_export"].state == kinds["seed_import"].state == "succeeded"
        # the agent's own first cycle after the import (its report made the point): a delta
        seeded_points = ReplicaStore(replicas).disk(seeded_id).points()
        assert "imported_seed" in seeded_points[0].meta, seeded_points[0].meta
        assert seeded_points[1].meta["cycle_kind"] == "extents", seeded_points[1].meta  # no scan, no copy
        replica, overlay = _materialized(replicas, seeded_id, item["last_recovery_point_id"], tmp_path / "s1.qcow2")
        try:
            r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(overlay),
                                str(seeded_disk)], capture_output=True, text=True)
        finally:
            replica.release(overlay)
        assert r.returncode == 0, r.stdout + r.stderr

        # the points as the secondary's agent lists them (a list_points task), then disabling
        # protection with the replica deleted (a delete_replica task)
        listed = api.get(f"/items/{seeded}/points")
        ids = [p["id"] for p in listed["points"][seeded_id]]
        assert listed["secondary_host"] == "host-b" and item["last_recovery_point_id"] in ids
        assert listed["points"][seeded_id][0]["kind"] == "seed" and listed["points"][seeded_id][0]["pinned"] is False
        out = api.delete(f"/items/{seeded}", params={"delete_replica": "true"})
        job = d.wait_job(out["job"]["id"], 120)
        assert job["state"] == "succeeded", job
        assert seeded_id not in ReplicaStore(replicas).disks() and disk_id in ReplicaStore(replicas).disks()
    finally:
        if store is not None:
            store.close()
        for dm in (dom, dom2):
            try:
                if dm.isActive():
                    dm.destroy()
                for cp in dm.listAllCheckpoints():
                    cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
                dm.undefine()
            except libvirt.libvirtError:
                pass
