"""PUT /agent/inventory with digests (issue 11): a VM unchanged since the agent sent it in
full is listed by name and digest only, and rewrites no row beyond `synced_at`; a digest
the control plane does not know is answered with `resend`; a VM left out is gone as
before; an older agent's full report without digests gets the answer it always got. The
agent's side (agent/inventory.py `Digests`, runtime `report_inventory`) converges with a
control plane that lost the digests in one round."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event, select, update

from standby.agent.config import AgentConfig
from standby.agent.inventory import digest
from standby.agent.runtime import AgentRuntime
from standby.store.models import Host, Vm

from api_helpers import ControlPlane, register
from test_agents import INVENTORY


def _own(host: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in host.items() if k != "vms"}


def _with_digests(inventory: dict[str, Any]) -> dict[str, Any]:
    """A full report as the agent sends it the first time: every entry with its digest."""
    body = copy.deepcopy(inventory)
    for h in body["hosts"]:
        h["digest"] = digest(_own(h))
        h["vms"] = [{**v, "digest": digest(v)} for v in h["vms"]]
    return body


def _rows(cp: ControlPlane) -> dict[str, tuple[Any, ...]]:
    with cp.store.transaction() as s:
        return {vm.name: (vm.id, vm.inventory_digest, vm.power_state, vm.missing_since, vm.synced_at)
                for vm in s.scalars(select(Vm))}


@pytest.fixture
def updates(cp_any: ControlPlane) -> Iterator[list[str]]:
    """The UPDATE statements of the vms and hosts tables the control plane runs."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(("UPDATE VMS", "UPDATE HOSTS")):
            seen.append(" ".join(statement.split()))

    engine = cp_any.store.engine
    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


def _put(agent: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = agent.put("/agent/inventory", json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_digest_only_reports(cp_any: ControlPlane, tmp_path: Path, updates: list[str]) -> None:
    cp = cp_any
    _, cert = register(cp, tmp_path, "agent-a", host="kvm-a")
    agent = cp.client(cert=cert)
    full = _with_digests(INVENTORY)
    host = full["hosts"][0]
    web, db = host["vms"]

    ans = _put(agent, full)
    assert ans["digests_known"] is True and ans["resend"] == [] and ans["hosts_resend"] == []
    assert sorted(ans["vms_added"]) == ["kvm-a/db01", "kvm-a/web01"]
    first = _rows(cp)
    assert first["web01"][1] == web["digest"] and first["db01"][1] == db["digest"]
    with cp.store.transaction() as s:
        assert s.scalars(select(Host.inventory_digest).where(Host.name == "kvm-a")).one() == host["digest"]

    # Nothing changed: the host without its own fields, the VMs by digest only.
    brief = {"hosts": [{"name": "kvm-a", "digest": host["digest"], "vms": [],
                        "vm_digests": {"web01": web["digest"], "db01": db["digest"]}}]}
    updates.clear()
    ans = _put(agent, brief)
    assert ans["vms_unchanged"] == 2 and ans["resend"] == [] and ans["hosts_resend"] == []
    assert ans["vms_updated"] == [] and ans["vms_removed"] == [] and ans["vms_missing"] == []
    second = _rows(cp)
    assert {n: r[:4] for n, r in second.items()} == {n: r[:4] for n, r in first.items()}  # present, as they were
    assert all(r[4] >= first[n][4] for n, r in second.items())
    vm_updates = [u for u in updates if u.upper().startswith("UPDATE VMS")]
    assert len(vm_updates) == 1 and vm_updates[0].upper().startswith("UPDATE VMS SET SYNCED_AT"), updates
    assert not any("FACTS" in u.upper() for u in updates), updates  # the host's own fields untouched
    with cp.store.transaction() as s:
        h = s.scalars(select(Host).where(Host.name == "kvm-a")).one()
        assert h.facts == {"libvirt_version": "9.0.0"} and h.host_group == "hg-a"

    # web01 changed on the agent's side but came without its entry; db01 left out: gone.
    ans = _put(agent, {"hosts": [{"name": "kvm-a", "digest": "0" * 24, "vms": [],
                                  "vm_digests": {"web01": "f" * 24}}]})
    assert ans["resend"] == ["kvm-a/web01"] and ans["hosts_resend"] == ["kvm-a"]
    assert ans["vms_removed"] == ["kvm-a/db01"] and ans["vms_unchanged"] == 0
    third = _rows(cp)
    assert list(third) == ["web01"] and third["web01"][:4] == first["web01"][:4]  # kept as it was until it comes

    # ... which the agent then sends in full (and the host's fields)
    changed = {**web, "power_state": "shut off"}
    changed["digest"] = digest({k: v for k, v in changed.items() if k != "digest"})
    ans = _put(agent, {"hosts": [{**_own(host), "vms": [changed], "vm_digests": {}}]})
    assert ans["resend"] == [] and ans["hosts_resend"] == [] and ans["vms_updated"] == ["kvm-a/web01"]
    assert _rows(cp)["web01"][1:3] == (changed["digest"], "shut off")


def test_an_older_agents_full_report_gets_the_old_answer(cp_any: ControlPlane, tmp_path: Path) -> None:
    cp = cp_any
    _, cert = register(cp, tmp_path, "agent-a", host="kvm-a")
    agent = cp.client(cert=cert)
    _put(agent, _with_digests(INVENTORY))
    ans = _put(agent, INVENTORY)  # no digests: stored as none
    assert set(ans) == {"hosts_added", "hosts_updated", "hosts_removed", "vms_added", "vms_updated",
                        "vms_removed", "vms_missing", "vms_replaced"}
    assert sorted(ans["vms_updated"]) == ["kvm-a/db01", "kvm-a/web01"]
    assert {r[1] for r in _rows(cp).values()} == {None}
    # a digest-only report after it is not taken as unchanged: the store has no digest
    web = _with_digests(INVENTORY)["hosts"][0]["vms"][0]
    ans = _put(agent, {"hosts": [{**_own(INVENTORY["hosts"][0]), "vms": [], "vm_digests": {"web01": web["digest"]}}]})
    assert ans["resend"] == ["kvm-a/web01"] and ans["vms_removed"] == ["kvm-a/db01"]
    assert "web01" in _rows(cp)


class _Via:
    """The agent runtime's control plane, as the test's HTTPS client."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.bodies: list[dict[str, Any]] = []

    def call(self, method: str, path: str, body: dict[str, Any]) -> Any:
        self.bodies.append(copy.deepcopy(body))
        r = self.client.request(method, path, json=body)
        assert r.status_code == 200, r.text
        return r.json()


def test_the_agent_converges_with_a_control_plane_that_lost_the_digests(cp: ControlPlane, tmp_path: Path) -> None:
    _, cert = register(cp, tmp_path, "agent-a", host="kvm-a")
    cfg = AgentConfig(data_dir=tmp_path / "a", name="agent-a", server_url=cp.url, site="site-a", server="sm-a",
                      cloud="cloud-a", host="kvm-a", listen="127.0.0.1:7443")
    via = _Via(cp.client(cert=cert))
    rt = AgentRuntime(cfg, control_plane=via)  # type: ignore[arg-type]  # not started: no loops
    rt.report_inventory(INVENTORY)
    assert len(via.bodies[0]["hosts"][0]["vms"]) == 2  # the first report is a full one
    rt.report_inventory(INVENTORY)
    sent = via.bodies[1]["hosts"][0]
    assert sent["vms"] == [] and set(sent["vm_digests"]) == {"web01", "db01"} and "facts" not in sent
    # a control plane restored from a backup taken before the agent's reports
    with cp.store.transaction() as s:
        s.execute(update(Vm).values(inventory_digest=None))
        s.execute(update(Host).values(inventory_digest=None))
    res = rt.report_inventory(INVENTORY)
    assert len(via.bodies) == 4  # asked again, and sent at once
    assert sorted(res["resend"]) == ["kvm-a/db01", "kvm-a/web01"] and res["hosts_resend"] == ["kvm-a"]
    again = via.bodies[3]["hosts"][0]
    assert sorted(v["name"] for v in again["vms"]) == ["db01", "web01"] and "facts" in again
    rt.report_inventory(INVENTORY)
    assert via.bodies[4]["hosts"][0]["vms"] == []  # converged: digests only again
