"""Agents own their cycles (issue 11), the control plane's side over real HTTPS: an agent
that says so gets no cycle tasks; its desired state lists what it replicates (long-polled:
a change answers at once); its reports make the recovery points, once each."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from standby.contract import disk_id_for

from api_helpers import ControlPlane
from test_items import claim, job_ended, setup, wait_for

DISK = disk_id_for("web01", "vda")


def _owns_cycles(agent: httpx.Client) -> None:
    r = agent.post("/agent/heartbeat", json={"version": "0.1.0", "facts": {"owns_cycles": True}})
    assert r.status_code == 200, r.text


def _report(item_id: int, *, ok: bool = True, started: float | None = None, **kw: Any) -> dict[str, Any]:
    t = started or time.time()
    body: dict[str, Any] = {"cycle_id": uuid.uuid4().hex, "item_id": item_id, "vm": "web01", "ok": ok,
                            "started_at": t, "finished_at": t + 2, "consistency": "crash"}
    if ok:
        body["result"] = {"points": {DISK: "0000000007"}, "point_at": datetime.fromtimestamp(t, UTC).isoformat(),
                          "bytes_sent": 4096, "domain_xml": "<domain><name>web01</name></domain>"}
    body.update(kw)
    return body


def test_desired_state_and_reports(cp: ControlPlane, tmp_path: Path) -> None:
    admin, agent_a, agent_b = setup(cp, tmp_path)
    _owns_cycles(agent_a)
    r = admin.post("/items", json={"vm": "web01"})
    assert r.status_code == 202, r.text
    item_id, job_id = r.json()["item"]["id"], r.json()["job"]["id"]

    def desired(agent: httpx.Client, **params: Any) -> dict[str, Any]:
        r = agent.get("/agent/desired", params=params)
        assert r.status_code == 200, r.text
        return r.json()

    # the primary's agent is told to replicate web01 to agent-b; no cycle task is made
    d = wait_for("web01 in agent-a's desired state", lambda: (lambda x: x if x["vms"] else None)(desired(agent_a)))
    (vm,) = d["vms"]
    assert vm["item_id"] == item_id and vm["copy_frequency_seconds"] == 30
    assert vm["cycle"]["vm"] == "web01" and vm["cycle"]["peer"] == {"name": "agent-b", "address": "10.0.2.1:7443"}
    assert vm["cycle"]["recovery"]["network_map"] == {"prod": "prod-dr"}
    assert desired(agent_a)["version"] == d["version"]  # stable while nothing changes
    assert desired(agent_b)["vms"] == []
    time.sleep(1.5)  # a few scheduler ticks
    assert claim(agent_a, "cycle") is None

    # a long-poll answers as soon as something it is made of changes
    got: dict[str, Any] = {}

    def poll() -> None:
        t0 = time.monotonic()
        got["state"] = desired(agent_a, have=d["version"], wait=20)
        got["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.5)
    assert admin.patch("/policies/gold", json={"copy_frequency_seconds": 300}).status_code == 200
    t.join(25)
    assert got["state"]["version"] != d["version"] and got["state"]["vms"][0]["copy_frequency_seconds"] == 300
    assert got["seconds"] < 5, got["seconds"]
    # ... and waits its time when nothing does
    t0 = time.monotonic()
    same = desired(agent_a, have=got["state"]["version"], wait=1)
    assert same["version"] == got["state"]["version"] and time.monotonic() - t0 >= 0.9
    # ... or, for an agent that asks so, ends with an empty 204
    r = agent_a.get("/agent/desired", params={"have": same["version"], "wait": 0.5, "if_changed": "true"})
    assert r.status_code == 204 and r.content == b""
    r = agent_a.get("/agent/desired", params={"have": "older", "wait": 0.5, "if_changed": "true"})
    assert r.status_code == 200 and r.json()["version"] == same["version"]

    # the first report makes the first point: protected, the protect job done
    first = _report(item_id)
    r = agent_a.post("/agent/reports", json={"desired_version": same["version"], "active": [item_id],
                                             "running": [], "cycles": [first]})
    assert r.status_code == 200 and r.json()["applied"] == 1, r.text
    assert wait_for("the protect job", lambda: job_ended(admin, job_id))["state"] == "succeeded"
    item = admin.get("/items/web01").json()
    assert item["state"] == "protected" and item["last_recovery_point_id"] == "0000000007"
    assert item["bytes_replicated"] == 4096 and item["next_cycle_at"] is None  # the agent times the next one
    # sent again (a batch retried after a lost answer): applied once
    r = agent_a.post("/agent/reports", json={"cycles": [first]})
    assert r.json() == {"applied": 0, "ignored": 1, "desired_version": None}
    assert admin.get("/items/web01").json()["bytes_replicated"] == 4096
    # the secondary's agent now holds the replica: it prunes it by the policy
    (rep,) = desired(agent_b)["replicas"]
    assert rep["item_id"] == item_id and rep["disk_ids"] == [DISK] and rep["retention_hours"] == 0

    # what the store cannot hold is a 422 naming it, not a 500 (schemathesis found the id)
    for field, value in (("item_id", 616974076342734815232), ("started_at", 1.7976931348623157e308)):
        r = agent_a.post("/agent/reports", json={"cycles": [{**_report(item_id), field: value}]})
        assert r.status_code == 422 and field in r.text, r.text
    r = agent_a.post("/agent/reports", json={"running": [2**70]})
    assert r.status_code == 422 and "running" in r.text, r.text

    # a cycle that found the replica diverged: a resync, which the desired state asks for
    bad = _report(item_id, ok=False, error="disk digest mismatch", error_type="IntegrityError")
    assert agent_a.post("/agent/reports", json={"cycles": [bad]}).json()["applied"] == 1
    item = admin.get("/items/web01").json()
    assert item["state"] == "resynchronizing", item
    assert desired(agent_a)["vms"][0]["cycle"]["force_hash_scan"] is True
    scan = _report(item_id, scanned=True)
    assert agent_a.post("/agent/reports", json={"cycles": [scan]}).json()["applied"] == 1
    assert admin.get("/items/web01").json()["state"] == "protected"
    assert desired(agent_a)["vms"][0]["cycle"]["force_hash_scan"] is False

    # the pair's bandwidth schedule reaches its sending agent (a 422 names a schedule it cannot read)
    (pairing,) = admin.get("/pairings").json()["items"]
    bad = admin.patch(f"/pairings/{pairing['id']}", json={"bandwidth": "08:00-18:00=fast"})
    assert bad.status_code == 422 and "bandwidth" in bad.text, bad.text
    before = desired(agent_a)
    r = admin.patch(f"/pairings/{pairing['id']}", json={"bandwidth": "00:00-24:00=10MiB/s"})
    assert r.status_code == 200 and r.json()["bandwidth"] == "00:00-24:00=10MiB/s", r.text
    after = desired(agent_a)
    assert after["bandwidth"] == "00:00-24:00=10MiB/s" and after["version"] != before["version"]
    assert desired(agent_b)["bandwidth"] is None  # it sends nothing
    assert admin.patch(f"/pairings/{pairing['id']}", json={"bandwidth": ""}).json()["bandwidth"] is None
    assert desired(agent_a)["bandwidth"] is None

    # a report that arrives after a newer one (a spool sent late) counts, but the latest point stays
    latest = admin.get("/items/web01").json()
    late = _report(item_id, started=time.time() - 3600)
    late["result"]["points"] = {DISK: "0000000003"}
    assert agent_a.post("/agent/reports", json={"cycles": [late]}).json()["applied"] == 1
    item = admin.get("/items/web01").json()
    assert item["last_recovery_point_id"] == latest["last_recovery_point_id"] != "0000000003"
    assert item["last_recovery_point_at"] == latest["last_recovery_point_at"]
    assert item["bytes_replicated"] == latest["bytes_replicated"] + 4096
