"""The agent API over real HTTPS with real certificates: registration with a CSR, then
heartbeat, inventory and tasks with the client certificate the control plane issued;
refusals for a token-only client, a certificate of a foreign CA, a certificate of the
right CA that no agent holds, a revoked agent and a replaced certificate."""

from __future__ import annotations

from pathlib import Path
import httpx
import pytest

from standby.replication import tls
from standby.store.models import AgentTask
from standby.store.repo import tasks as tasks_repo

from api_helpers import ControlPlane, error_of, register, registration_key


INVENTORY = {
    "hosts": [
        {
            "name": "kvm-a",
            "platform": "kvm",
            "host_group": "hg-a",
            "replication_address": "127.0.0.1",
            "storage_free_bytes": 50 * 2**30,
            "facts": {"libvirt_version": "9.0.0"},
            "vms": [
                {"name": "web01", "uuid": "11111111-1111-1111-1111-111111111111", "power_state": "running",
                 "disks": {"vda": {"path": "/var/lib/libvirt/images/web01.qcow2", "size": 2**30, "format": "qcow2"}},
                 "nics": [{"mac": "52:54:00:00:00:01", "network": "default"}], "has_guest_agent": True},
                {"name": "db01", "uuid": "22222222-2222-2222-2222-222222222222", "power_state": "shut off",
                 "disks": {}, "nics": []},
            ],
        }
    ]
}


def test_register_heartbeat_inventory_and_tasks_with_the_issued_certificate(cp_any: ControlPlane,
                                                                             tmp_path: Path) -> None:
    cp = cp_any
    answer, cert = register(cp, tmp_path, "agent-a", host="kvm-a")
    assert answer["name"] == "agent-a" and answer["heartbeat_seconds"] == cp.settings.heartbeat_seconds
    assert answer["ca_pem"] == cp.ca_cert.read_text()
    issued = tls.load_cert(answer["cert_pem"])
    assert "CN=agent-a" in issued.subject.rfc4514_string()

    agent = cp.client(cert=cert)
    r = agent.post("/agent/heartbeat", json={"version": "0.1.0", "storage_free_bytes": 10, "storage_total_bytes": 100,
                                             "facts": {"tasks_running": []}, "from_a_newer_agent": 1})
    assert r.status_code == 200, r.text
    assert r.json()["heartbeat_seconds"] == cp.settings.heartbeat_seconds

    r = agent.put("/agent/inventory", json=INVENTORY)
    assert r.status_code == 200, r.text
    assert r.json()["hosts_added"] == ["kvm-a"]
    assert sorted(r.json()["vms_added"]) == ["kvm-a/db01", "kvm-a/web01"]

    viewer = cp.client(cp.new_token("viewer", "viewer"))
    vms = viewer.get("/vms", params={"cloud": "cloud-a"}).json()["items"]
    assert sorted((v["host"], v["name"]) for v in vms) == [("kvm-a", "db01"), ("kvm-a", "web01")]
    # a page at a time, in id order: `next` is the next page's `after`
    first = viewer.get("/vms", params={"cloud": "cloud-a", "limit": 1}).json()
    assert len(first["items"]) == 1 and first["next"] == str(first["items"][0]["id"])
    second = viewer.get("/vms", params={"cloud": "cloud-a", "limit": 1, "after": first["next"]}).json()
    assert len(second["items"]) == 1 and second["next"] is None
    assert [v["id"] for v in first["items"] + second["items"]] == sorted(v["id"] for v in vms)
    agents = viewer.get("/agents").json()["items"]
    assert [(a["name"], a["state"], a["heartbeat_ok"]) for a in agents] == [("agent-a", "active", True)]
    assert agents[0]["cert_fingerprint"] == tls.fingerprint(answer["cert_pem"])
    assert [c["name"] for c in viewer.get("/clouds").json()["items"]] == ["cloud-a"]

    # Work for the agent, queued the way the scheduler queues it.
    with cp.store.transaction() as s:
        task = tasks_repo.enqueue(s, agent_id=answer["agent_id"], kind="list_points", params={"disk_ids": ["d1"]},
                                  deadline_seconds=600)
        task_id = task.id
    r = agent.post("/agent/tasks/claim", json={"max": 4})
    assert r.status_code == 200, r.text
    tasks = r.json()["tasks"]
    assert [(t["id"], t["kind"], t["params"], t["attempt"]) for t in tasks] == [
        (task_id, "list_points", {"disk_ids": ["d1"]}, 1)]
    # A restarted agent gets its unfinished task again.
    assert [t["id"] for t in agent.post("/agent/tasks/claim", json={}).json()["tasks"]] == [task_id]

    r = agent.post(f"/agent/tasks/{task_id}/progress", json={"progress": 50, "message": "listing", "bytes_done": 7})
    assert r.status_code == 200 and r.json() == {"cancel_requested": False}

    result = {"points": {"d1": [{"id": "p1", "created_at": "2026-01-01T00:00:00Z", "consistency": "crash",
                                 "kind": "cycle"}]}}
    r = agent.post(f"/agent/tasks/{task_id}/result", json={"ok": True, "result": result})
    assert r.status_code == 200 and r.json() == {}
    # Idempotent: a second result is ignored.
    r = agent.post(f"/agent/tasks/{task_id}/result", json={"ok": False, "error": "late duplicate"})
    assert r.status_code == 200
    with cp.store.read() as s:
        row = s.get(AgentTask, task_id)
        assert row is not None
        assert (row.state, row.result, row.error, row.bytes_done) == ("succeeded", result, None, 7)
    # Finished: progress reports tell the agent to stop.
    assert agent.post(f"/agent/tasks/{task_id}/progress", json={"progress": 60}).json() == {"cancel_requested": True}


def test_an_agent_sees_only_its_own_tasks(cp: ControlPlane, tmp_path: Path) -> None:
    key = registration_key(cp)
    a, cert_a = register(cp, tmp_path, "agent-a", key=key)
    _b, cert_b = register(cp, tmp_path, "agent-b", key=key)
    with cp.store.transaction() as s:
        task_id = tasks_repo.enqueue(s, agent_id=a["agent_id"], kind="prune", params={}, deadline_seconds=60).id
    b = cp.client(cert=cert_b)
    assert b.post("/agent/tasks/claim", json={"max": 10}).json() == {"tasks": []}
    r = b.post(f"/agent/tasks/{task_id}/result", json={"ok": True, "result": {}})
    assert r.status_code == 404 and error_of(r)["type"] == "NotFound"
    assert [t["id"] for t in cp.client(cert=cert_a).post("/agent/tasks/claim", json={}).json()["tasks"]] == [task_id]


def test_agent_routes_refuse_a_client_without_a_certificate(cp: ControlPlane, tmp_path: Path) -> None:
    register(cp, tmp_path, "agent-a")
    for client in (cp.client(), cp.admin()):  # an operator's token is no agent identity
        for method, path in (("POST", "/agent/heartbeat"), ("PUT", "/agent/inventory"),
                             ("POST", "/agent/tasks/claim"), ("POST", "/agent/tasks/1/progress"),
                             ("POST", "/agent/tasks/1/result")):
            r = client.request(method, path, json={})
            assert r.status_code == 401, (method, path, r.text)
            assert error_of(r)["type"] == "Unauthorized"


def test_a_certificate_of_a_foreign_ca_is_refused_in_the_handshake(cp: ControlPlane, tmp_path: Path) -> None:
    register(cp, tmp_path, "agent-a")
    foreign = tmp_path / "foreign-ca"
    tls.init_ca(foreign, name="Someone else's CA")
    ident = tls.issue(foreign, "agent-a", sans=["agent-a"])  # same name, wrong issuer
    # The handshake fails (TLS 1.3: the server aborts once it has checked the certificate)...
    with pytest.raises(httpx.TransportError):
        cp.client(cert=(ident.cert, ident.key)).post("/agent/heartbeat", json={})
    # ... where the same request without that certificate reaches the app (and gets its 401).
    assert cp.client().post("/agent/heartbeat", json={}).status_code == 401


def test_a_certificate_of_this_ca_that_no_agent_holds_is_401(cp: ControlPlane) -> None:
    ident = tls.issue(cp.settings.ca_dir, "stray", sans=["stray"], out_dir=cp.settings.data_dir / "stray")
    r = cp.client(cert=(ident.cert, ident.key)).post("/agent/heartbeat", json={})
    assert r.status_code == 401 and "no active agent" in error_of(r)["message"]


def test_a_revoked_agent_and_a_replaced_certificate_are_refused(cp: ControlPlane, tmp_path: Path) -> None:
    key = registration_key(cp)
    _answer, old_cert = register(cp, tmp_path, "agent-a", key=key)
    old = cp.client(cert=old_cert)
    assert old.post("/agent/heartbeat", json={}).status_code == 200

    # Registering the name again (a reinstalled agent) replaces the certificate.
    _answer, new_cert = register(cp, tmp_path / "reinstalled", "agent-a", key=key)
    assert old.post("/agent/heartbeat", json={}).status_code == 401
    new = cp.client(cert=new_cert)
    assert new.post("/agent/heartbeat", json={}).status_code == 200

    r = cp.admin().delete("/agents/agent-a")
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    r = new.post("/agent/heartbeat", json={})
    assert r.status_code == 401 and error_of(r)["type"] == "Unauthorized"
    assert new.get("/agent/desired").status_code == 401  # the read route too, right after a check passed


def test_registration_refusals(cp: ControlPlane) -> None:
    _key_pem, csr_pem = tls.make_key_and_csr("agent-x")
    body = {"name": "agent-x", "host": "kvm-x", "site": "site-a", "server": "sm-a", "cloud": "cloud-a",
            "address": "10.0.0.9:7443", "csr_pem": csr_pem.decode()}
    anonymous = cp.client()
    r = anonymous.post("/agents/register", json={**body, "key": "sbk_wrongwrongwrongwrong"})
    assert r.status_code == 403
    err = error_of(r)
    assert err["type"] == "RegistrationRefused" and err["exit_code"] == 1
    assert "wrongwrongwrong" not in err["message"]

    admin = cp.admin()
    created = admin.post("/registration-keys", json={}).json()
    assert admin.delete(f"/registration-keys/{created['id']}").json()["revoked_at"] is not None
    r = anonymous.post("/agents/register", json={**body, "key": created["key"]})
    assert r.status_code == 403 and "revoked" in error_of(r)["message"]

    good = registration_key(cp)
    r = anonymous.post("/agents/register", json={**body, "key": good, "csr_pem": "not a csr"})
    assert r.status_code == 400 and error_of(r)["type"] == "BadInput"
    r = anonymous.post("/agents/register", json={**body, "key": good, "address": "no-port"})
    assert r.status_code == 422 and error_of(r)["details"]["errors"][0]["field"] == "address"
    assert admin.get("/agents").json() == {"items": []}
