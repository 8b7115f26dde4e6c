"""The control plane end to end, on SQLite and on PostgreSQL: a real `standby server`, two
real `standby agent run` processes (host-a in cloud "primary", host-b in "secondary"), real
test guests writing records, driven through the REST API and the CLI as an operator would.

One scenario per backend (booting guests is the expensive part): register, pair, protect,
several cycles, pause and resume, an RPO breach by cutting the replication link, a
heartbeat loss, a control-plane kill and restart with a protect job in flight, and disable
protection with and without deleting the replica. Alerts are checked in the API and at a
real webhook receiver.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("libvirt")

from standby.demo.local import LocalDeployment  # noqa: E402
from standby.contract import disk_id_for  # noqa: E402
from standby.testing import guest  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

WEBHOOK_SECRET = "hook-secret-for-tests"
RPO_ALERT = 20  # seconds: the policy's RPO alert threshold (continuous copy)


class Hooks:
    """A real HTTP receiver for webhook deliveries; checks each signature."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.bad_signatures = 0
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                want = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
                if not hmac.compare_digest(want, self.headers.get("X-Standby-Signature", "")):
                    hooks.bad_signatures += 1
                hooks.events.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/standby"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def got(self, event: str, kind: str) -> bool:
        return any(e["event"] == event and e["alert"]["kind"] == kind for e in self.events)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    h = Hooks()
    yield h
    h.close()


def _boot_guest(conn: Any, image: guest.GuestImage, name: str, vm_dir: Path) -> guest.Console:
    disk = guest.create_disk(vm_dir / f"{name}.qcow2", 32)
    log = vm_dir / f"{name}.console"
    dom = conn.defineXML(guest.domain_xml(name, disk, log, image, guest.cmdline("write", rate=10)))
    dom.create()
    console = guest.Console(log)
    console.wait_for(lambda c: c.acked() >= 0, 120, alive=lambda: bool(dom.isActive()))
    return console


def _points_seen(d: LocalDeployment, vm: str, want: int, timeout: float) -> list[str]:
    """Distinct recovery points the item reports, polled until `want` were seen."""
    seen: list[str] = []

    def enough() -> bool:
        p = d.item(vm).get("last_recovery_point_id")
        if p and p not in seen:
            seen.append(p)
        return len(seen) >= want

    d.wait_for(enough, timeout, f"{want} recovery points of {vm}", interval=0.3, log=d.server)
    return seen


def _open_alert(d: LocalDeployment, kind: str, subject: str) -> dict[str, Any] | None:
    for a in d.client().get("/alerts", params={"open": "true", "kind": kind})["items"]:
        if a["subject"] == subject:
            return a  # type: ignore[no-any-return]
    return None


def _iptables(action: str, port: int) -> None:
    subprocess.run(["iptables", action, "INPUT", "-p", "tcp", "-i", "lo", "--dport", str(port),
                    "-j", "REJECT", "--reject-with", "tcp-reset"], check=True, capture_output=True)


def test_control_plane_end_to_end(store_backend: str, empty_store_url: str, libvirt_conn: Any,
                                  guest_image: guest.GuestImage, vm_dir: Path, tmp_path: Path,
                                  hooks: Hooks) -> None:
    tag = uuid.uuid4().hex[:6]
    vm1, vm2 = f"sbt-cp{tag}-web", f"sbt-cp{tag}-db"
    d = LocalDeployment(tmp_path / "deploy", db_url=empty_store_url if store_backend == "postgresql" else None,
                        tick_seconds=0.5, heartbeat_timeout=9)
    domains = [vm1, vm2]
    try:
        for vm in domains:
            _boot_guest(libvirt_conn, guest_image, vm, vm_dir)
        d.init()
        d.start_server()
        d.add_agent("host-a", cloud="primary", domains=[f"sbt-cp{tag}-*"])
        b = d.add_agent("host-b", cloud="secondary", domains=[f"sbt-dr{tag}-*"])
        api = d.client()
        d.wait_for(lambda: {v["name"] for v in api.get("/vms", params={"cloud": "primary"})["items"]} >= {vm1, vm2},
                   60, "the agents' inventory to list both VMs", log=d.server)

        # Policy, pairing, webhook: as an operator, through the CLI.
        d.run_cli("policy", "create", "fast", "--copy-frequency", "continuous", "--rpo-alert-seconds", str(RPO_ALERT))
        d.run_cli("pair", "primary", "secondary", "--policy", "fast")
        secret = tmp_path / "hook.secret"
        secret.write_text(WEBHOOK_SECRET)
        d.run_cli("webhooks", "add", "ops", hooks.url, "--secret-file", str(secret))

        # Protect vm1 and follow it to protected; then several cycles.
        out = json.loads(d.run_cli("protect", vm1, "--json").stdout)
        job = d.wait_job(out["job"]["id"] if isinstance(out.get("job"), dict) else out["job_id"], 300)
        assert job["state"] == "succeeded", job
        assert d.item(vm1)["state"] == "protected"
        _points_seen(d, vm1, 3, 120)
        status = json.loads(d.run_cli("status", "--json").stdout)
        assert status["status"]["items"]["total"] >= 1 and status["items"][0]["vm"] == vm1

        # Pause: no new point; resume: points again.
        api.post(f"/items/{vm1}/pause")
        d.wait_for(lambda: d.item(vm1)["state"] == "paused", 30, "pause")
        time.sleep(2)  # a cycle running when pausing may still land
        frozen = d.item(vm1)["last_recovery_point_id"]
        time.sleep(5)
        assert d.item(vm1)["last_recovery_point_id"] == frozen
        assert d.item(vm1)["health"] == "warning"
        api.post(f"/items/{vm1}/resume")
        d.wait_for(lambda: d.item(vm1)["last_recovery_point_id"] != frozen, 60, "a point after resume")

        # RPO breach: cut the replication link to host-b, then mend it.
        port = int(b.listen.rsplit(":", 1)[1])
        _iptables("-I", port)
        try:
            d.wait_for(lambda: _open_alert(d, "rpo_breach", f"item:{vm1}"), RPO_ALERT + 60, "an RPO breach alert",
                       log=d.server)
            assert d.item(vm1)["health"] in ("warning", "critical")
        finally:
            _iptables("-D", port)
        d.wait_for(lambda: _open_alert(d, "rpo_breach", f"item:{vm1}") is None, 90, "the RPO alert to clear",
                   log=d.server)
        d.wait_for(lambda: hooks.got("raised", "rpo_breach") and hooks.got("cleared", "rpo_breach"), 30,
                   "the webhook to get the RPO alert raised and cleared")

        # Heartbeat loss: kill host-b's agent; the alert opens; restart it; it clears.
        d.stop_agent("host-b", kill=True)
        d.wait_for(lambda: _open_alert(d, "heartbeat_lost", "agent:host-b"), 40, "a heartbeat-lost alert",
                   log=d.server)
        d.start_agent("host-b")
        d.wait_for(lambda: _open_alert(d, "heartbeat_lost", "agent:host-b") is None, 30,
                   "the heartbeat alert to clear", log=d.server)
        d.wait_for(lambda: hooks.got("raised", "heartbeat_lost"), 30, "the webhook to get the heartbeat alert")

        # Control-plane kill and restart with a protect job in flight.
        res = api.post("/items", json={"vm": vm2})
        job_id = res["job"]["id"]

        def in_flight() -> bool:
            j = api.get(f"/jobs/{job_id}")
            return j["state"] == "running" and any(s["state"] == "running" for s in j["steps"][1:])

        d.wait_for(in_flight, 60, "the protect job to be running")
        assert d.stop_server(kill=True) == -9
        d.start_server()
        job = d.wait_job(job_id, 300)
        assert job["state"] == "succeeded", job
        assert d.item(vm2)["state"] == "protected"
        _points_seen(d, vm2, 2, 120)

        # Disable protection: vm1 deleting its replica, vm2 keeping it.
        replicas = b.data_dir / "replicas" / "disks"
        assert (replicas / disk_id_for(vm1, "vda")).exists()
        r1 = api.delete(f"/items/{vm1}", params={"delete_replica": "true"})
        r2 = api.delete(f"/items/{vm2}", params={"delete_replica": "false"})
        for r in (r1, r2):
            assert d.wait_job(r["job"]["id"], 120)["state"] == "succeeded"
        assert d.item(vm1)["state"] == "disabled" and d.item(vm2)["state"] == "disabled"
        assert not (replicas / disk_id_for(vm1, "vda")).exists()
        assert (replicas / disk_id_for(vm2, "vda")).exists()
        assert hooks.bad_signatures == 0
    finally:
        d.close()
        for vm in domains:
            try:
                import libvirt

                dom = libvirt_conn.lookupByName(vm)
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)  # 0 refuses with checkpoints
            except Exception:  # noqa: BLE001 - best-effort cleanup of this test's VMs
                pass
