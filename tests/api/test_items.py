"""Protection through the API, end to end over HTTPS: two registered agents report their
hosts, an operator sets up networks, a policy and a pairing, protects a VM (202 with a
protect job), the primary agent claims the cycle task and reports a recovery point, the
item becomes protected; its points are listed through the secondary agent; pause and
resume run as jobs; refusals (readiness findings, the lifecycle) are 409s in the
contract's body."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from standby.contract import disk_id_for

from api_helpers import ControlPlane, error_of, register

GIB = 1 << 30


def host_facts(ip: str, free_gib: float) -> dict[str, Any]:
    """What `standby.agent.inventory.host_entry` reports as facts."""
    return {"libvirt_version": "9.0.0", "qemu_version": "7.2.0",
            "cpu": {"vendor": "Intel", "model": "Skylake-Server", "features": ["sse4_2", "avx2"]},
            "reaches_control_plane": True, "storage_free_gib": free_gib, "replication_address": ip,
            "clock_skew_seconds": 0.1}


def vm(name: str, *, encrypted: bool = False) -> dict[str, Any]:
    return {"name": name, "uuid": f"uuid-{name}", "power_state": "running",
            "disks": {"vda": {"path": f"/images/{name}.qcow2", "size": 10 * GIB, "format": "qcow2", "size_gib": 10.0,
                              "kind": "virtual", "encrypted": encrypted, "qcow2_compat": "1.1"}},
            "nics": [{"mac": "52:54:00:00:00:01", "network": "prod"}]}


def report_in(agent: httpx.Client, host: str, ip: str, vms: list[dict[str, Any]], free_gib: float) -> None:
    r = agent.post("/agent/heartbeat", json={"version": "0.1.0", "storage_free_bytes": int(free_gib * GIB),
                                             "storage_total_bytes": int(2 * free_gib * GIB), "facts": {}})
    assert r.status_code == 200, r.text
    r = agent.put("/agent/inventory", json={"hosts": [{
        "name": host, "platform": "kvm", "host_group": f"hg-{host}", "replication_address": ip,
        "storage_free_bytes": int(free_gib * GIB), "facts": host_facts(ip, free_gib), "vms": vms}]})
    assert r.status_code == 200, r.text


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def claim(agent: httpx.Client, kind: str) -> dict[str, Any] | None:
    r = agent.post("/agent/tasks/claim", json={"max": 8})
    assert r.status_code == 200, r.text
    return next((t for t in r.json()["tasks"] if t["kind"] == kind), None)


def job_ended(admin: httpx.Client, job_id: int) -> dict[str, Any] | None:
    job = admin.get(f"/jobs/{job_id}").json()
    return job if job["state"] in ("succeeded", "failed", "errored", "cancelled") else None


def setup(cp: ControlPlane, tmp: Path) -> tuple[httpx.Client, httpx.Client, httpx.Client]:
    key = cp.admin().post("/registration-keys", json={}).json()["key"]
    _a, cert_a = register(cp, tmp, "agent-a", key=key, host="kvm-a", cloud="cloud-a", address="10.0.1.1:7443")
    _b, cert_b = register(cp, tmp, "agent-b", key=key, host="kvm-b", site="site-b", server="sm-b", cloud="cloud-b",
                          address="10.0.2.1:7443")
    agent_a = cp.client(cert=cert_a)
    agent_b = cp.client(cert=cert_b)
    report_in(agent_a, "kvm-a", "10.0.1.1", [vm("web01"), vm("vault01", encrypted=True)], 200)
    report_in(agent_b, "kvm-b", "10.0.2.1", [], 400)

    admin = cp.admin()
    for body in ({"name": "prod", "site": "site-a"}, {"name": "prod-dr", "site": "site-b"}):
        assert admin.post("/networks", json=body).status_code == 201
    assert admin.post("/network-mappings", json={"primary": "prod", "secondary": "prod-dr"}).status_code == 201
    assert admin.post("/policies", json={"name": "gold", "copy_frequency_seconds": 30}).status_code == 201
    r = admin.post("/pairings", json={"primary_cloud": "cloud-a", "secondary_cloud": "cloud-b", "policy": "gold"})
    assert r.status_code == 201 and r.json()["policies"] == ["gold"], r.text
    return admin, agent_a, agent_b


def test_protect_a_vm_replicate_list_points_pause_and_resume(cp: ControlPlane, tmp_path: Path) -> None:
    admin, agent_a, agent_b = setup(cp, tmp_path)
    readiness = admin.get("/readiness").json()
    errors = [f for f in readiness["findings"] if f["severity"] == "error"]
    assert [f["subject"] for f in errors] == ["vm/kvm-a/vault01"], errors

    r = admin.post("/items", json={"vm": "web01"})
    assert r.status_code == 202, r.text
    item, job = r.json()["item"], r.json()["job"]
    assert (item["vm"], item["host"], item["policy"], item["primary_cloud"], item["secondary_cloud"]) == (
        "web01", "kvm-a", "gold", "cloud-a", "cloud-b")
    assert job["kind"] == "protect" and job["target"] == f"item:{item['id']}" and job["created_by"] == "admin"
    assert [s["name"] for s in job["steps"]][0] == "check readiness"

    # The primary agent gets the first cycle once the job has placed the replica.
    task = wait_for("the first cycle task", lambda: claim(agent_a, "cycle"))
    assert task["params"]["vm"] == "web01" and task["params"]["peer"]["name"] == "agent-b"
    disk = disk_id_for("web01", "vda")
    point_at = datetime.now(UTC).isoformat()
    r = agent_a.post(f"/agent/tasks/{task['id']}/result", json={
        "ok": True, "result": {"points": {disk: "p-0001"}, "point_at": point_at, "bytes_sent": 12345}})
    assert r.status_code == 200, r.text

    ended = wait_for("the protect job", lambda: job_ended(admin, job["id"]))
    assert ended["state"] == "succeeded", ended
    viewer = cp.client(cp.new_token("viewer", "viewer"))
    shown = viewer.get("/items/web01").json()
    again = viewer.get(f"/items/{item['id']}").json()
    assert again.pop("rpo_seconds") >= shown.pop("rpo_seconds") >= 0  # the RPO is the point's age now
    # The scheduler's health tick may land between the two reads; the item is the same.
    volatile = ("health", "health_reason", "updated_at")
    assert {k: v for k, v in shown.items() if k not in volatile} == {k: v for k, v in again.items() if k not in volatile}
    assert shown["health_reason"] == "protected"  # a state change resets health to the state's own
    assert (shown["state"], shown["secondary_host"], shown["last_recovery_point_id"], shown["bytes_replicated"]) == (
        "protected", "kvm-b", "p-0001", 12345)
    assert [i["vm"] for i in viewer.get("/items").json()["items"]] == ["web01"]
    status = viewer.get("/status").json()
    assert status["items"]["total"] == 1 and status["items"]["by_state"] == {"protected": 1}

    # Points come from the secondary's agent: the request waits for its answer.
    answer: dict[str, httpx.Response] = {}
    asking = threading.Thread(target=lambda: answer.setdefault("r", viewer.get("/items/web01/points")))
    asking.start()
    listing = wait_for("the list_points task", lambda: claim(agent_b, "list_points"))
    assert listing["params"] == {"disk_ids": [disk]}
    points = {disk: [{"id": "p-0001", "created_at": point_at, "consistency": "crash", "kind": "cycle"}]}
    assert agent_b.post(f"/agent/tasks/{listing['id']}/result", json={"ok": True, "result": {"points": points}}
                        ).status_code == 200
    asking.join(30)
    r = answer["r"]
    assert r.status_code == 200, r.text
    assert r.json() == {"item_id": item["id"], "secondary_host": "kvm-b", "points": points}

    r = admin.post("/items/web01/pause")
    assert r.status_code == 202 and r.json()["job"]["kind"] == "pause"
    assert wait_for("pause", lambda: job_ended(admin, r.json()["job"]["id"]))["state"] == "succeeded"
    assert admin.get("/items/web01").json()["state"] == "paused"
    r2 = admin.post("/items/web01/pause")  # the lifecycle refuses a second pause at once
    assert r2.status_code == 409 and error_of(r2)["exit_code"] == 1
    r = admin.post(f"/items/{item['id']}/resume")
    assert r.status_code == 202
    assert wait_for("resume", lambda: job_ended(admin, r.json()["job"]["id"]))["state"] == "succeeded"
    assert admin.get("/items/web01").json()["state"] == "protected"


def test_protection_refused_by_readiness_carries_the_findings(cp: ControlPlane, tmp_path: Path) -> None:
    admin, _agent_a, _agent_b = setup(cp, tmp_path)
    r = admin.post("/items", json={"vm": "vault01"})
    assert r.status_code == 409, r.text
    err = error_of(r)
    assert err["type"] == "Refused" and "not ready" in err["message"]
    findings = err["details"]["findings"]
    assert any(f["rule"] == "kvm.disk-kinds" and f["severity"] == "error" for f in findings)
    assert set(findings[0]) == {"rule", "severity", "subject", "message", "remedy"}
    assert admin.get("/items").json() == {"items": [], "next": None}

    r = admin.post("/items", json={"vm": "nosuchvm"})
    assert r.status_code == 404 and error_of(r)["type"] == "NotFound"
    for ref in ("web01", "12345", "99999999999999999999", "²"):
        r = admin.get(f"/items/{ref}")
        assert r.status_code == 404, (ref, r.text)
