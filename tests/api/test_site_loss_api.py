"""What agents tell a control plane after a site loss (issue 10), over real HTTPS: a
break-glass failover the secondary agent ran alone becomes the item's failover (as if the
control plane had run it, a job and an alert, taken once), and the primary agent is told
which of its VMs failed over so it keeps them off (an alert when it had to stop one)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from standby.contract import disk_id_for

from api_helpers import ControlPlane, error_of
from test_items import claim, job_ended, setup, wait_for


def _protected(cp: ControlPlane, tmp: Path) -> tuple[httpx.Client, httpx.Client, httpx.Client, dict[str, Any]]:
    admin, agent_a, agent_b = setup(cp, tmp)
    r = admin.post("/items", json={"vm": "web01"})
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    task = wait_for("the first cycle task", lambda: claim(agent_a, "cycle"))
    disk = disk_id_for("web01", "vda")
    r = agent_a.post(f"/agent/tasks/{task['id']}/result", json={
        "ok": True, "result": {"points": {disk: "0000000001"}, "point_at": datetime.now(UTC).isoformat(),
                               "bytes_sent": 1}})
    assert r.status_code == 200, r.text
    assert wait_for("the protect job", lambda: job_ended(admin, job["id"]))["state"] == "succeeded"
    item = admin.get("/items/web01").json()
    assert item["state"] == "protected", item
    return admin, agent_a, agent_b, item


def _report(item: dict[str, Any], **over: Any) -> dict[str, Any]:
    now = time.time()
    body = {"vm": "web01", "item_id": item["id"], "replica_vm": "dr-web01", "tag": f"failover-{item['id']}",
            "point": {"id": "standby-3", "disks": {disk_id_for("web01", "vda"): "0000000001"},
                      "created_at": now - 40, "consistency": "crash"},
            "overlays": {"vda": "/srv/replicas/overlays/x/vda.qcow2"}, "networks": ["prod-dr"],
            "outcome": "done", "started_at": now - 12, "finished_at": now - 3, "by": "root@kvm-b",
            "steps": [{"name": "materialize the point as an overlay", "seconds": 1.2, "note": "1 overlay(s)"},
                      {"name": "define the replica VM", "seconds": 0.3, "note": "dr-web01 (defined)"},
                      {"name": "start the replica VM", "seconds": 0.5, "note": "started"}]}
    body.update(over)
    return body


def test_a_break_glass_failover_becomes_the_items_failover(cp: ControlPlane, tmp_path: Path) -> None:
    admin, agent_a, agent_b, item = _protected(cp, tmp_path)
    # only the item's secondary agent may report it
    r = agent_a.post("/agent/breakglass", json=_report(item))
    assert r.status_code == 409 and "held by host kvm-b" in error_of(r)["message"], r.text
    r = agent_b.post("/agent/breakglass", json=_report(item, outcome="running"))
    assert r.status_code == 422, r.text
    r = agent_b.post("/agent/breakglass", json=_report(item))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["state"] == "commit_pending" and not out["already"], out
    got = admin.get("/items/web01").json()
    assert got["state"] == "commit_pending"
    job = admin.get(f"/jobs/{out['job_id']}").json()
    assert job["kind"] == "unplanned_failover" and job["state"] == "succeeded", job
    assert job["created_by"] == "break-glass:root@kvm-b"
    assert [s["name"] for s in job["steps"]] == ["materialize the point as an overlay", "define the replica VM",
                                                 "start the replica VM"]
    assert all(s["state"] == "succeeded" for s in job["steps"])
    alerts = [a for a in admin.get("/alerts").json()["items"] if a["kind"] == "break_glass_failover"]
    assert len(alerts) == 1 and "kvm-b" in alerts[0]["message"], alerts
    # taken once: the agent retries until it hears back
    again = agent_b.post("/agent/breakglass", json=_report(item))
    assert again.status_code == 200 and again.json()["already"] and again.json()["job_id"] == out["job_id"]
    # no cycle is handed out any more: the VM runs on the secondary
    assert claim(agent_a, "cycle") is None
    # the primary agent is told to keep web01 off; it reports doing so
    hb = agent_a.post("/agent/heartbeat", json={"version": "t"}).json()
    assert hb["fence"] == ["web01"], hb
    assert agent_b.post("/agent/heartbeat", json={"version": "t"}).json()["fence"] == []
    r = agent_a.post("/agent/fenced", json={"vm": "web01", "was_running": True, "autostart_was": True})
    assert r.status_code == 200, r.text
    fenced = [a for a in admin.get("/alerts").json()["items"] if a["kind"] == "source_fenced"]
    assert len(fenced) == 1 and "was running on its old host" in fenced[0]["message"], fenced
    # committing it works as after any failover
    r = admin.post("/items/web01/commit", json={})
    assert r.status_code in (200, 202), r.text
    assert wait_for("the commit", lambda: admin.get("/items/web01").json()["state"] == "failed_over")


def test_a_break_glass_failover_of_an_item_already_switched_is_a_conflict(cp: ControlPlane,
                                                                           tmp_path: Path) -> None:
    admin, _agent_a, agent_b, item = _protected(cp, tmp_path)
    assert agent_b.post("/agent/breakglass", json=_report(item)).status_code == 200
    other = _report(item, replica_vm="dr-web01-b", tag="failover-other")
    r = agent_b.post("/agent/breakglass", json=other)
    assert r.status_code == 409 and "cannot be taken in" in error_of(r)["message"], r.text
    # a VM that is not failed over cannot be reported fenced
    r = agent_b.post("/agent/fenced", json={"vm": "web01", "was_running": False})
    assert r.status_code == 409


def test_break_glass_is_refused_while_a_control_plane_answers(cp: ControlPlane, tmp_path: Path) -> None:
    from standby.agent import breakglass
    from standby.agent.config import AgentConfig
    from standby.errors import Refused

    from api_helpers import register

    _answer, (crt, key) = register(cp, tmp_path, "agent-b", host="kvm-b", cloud="cloud-b")
    data = tmp_path / "agent-b"
    (data / "ca.crt").write_bytes(cp.ca_cert.read_bytes())
    cfg = AgentConfig(data_dir=data, name="agent-b", server_url=cp.url, site="site-b", server="sm-b",
                      cloud="cloud-b", host="kvm-b", listen="127.0.0.1:7443",
                      standby_urls=["https://127.0.0.1:1"])  # a second one that is down
    assert (crt, key) == (cfg.cert_path, cfg.key_path)
    assert breakglass.answering_control_planes(cfg) == [(cp.url, "active")]
    with pytest.raises(Refused, match=f"the control plane at {cp.url} answers"):
        breakglass.failover(cfg, "web01")
    assert breakglass.load(cfg, "web01") is None  # nothing was started, nothing recorded
