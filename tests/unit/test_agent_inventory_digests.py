"""The agent's inventory digests (agent/inventory.py `digest`, `Digests`; runtime
`report_inventory`): stable digests, reports with only the changed entries in full, the
resend round, and full reports to a control plane that does not say it stores digests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from standby.agent.config import AgentConfig
from standby.agent.inventory import Digests, digest, vm_entry
from standby.agent.runtime import AgentRuntime
from standby.drivers.base import DiskInfo, NicInfo, VmInfo, VmState


def _info(size: int = 2**30, state: VmState = VmState.RUNNING) -> VmInfo:
    return VmInfo(name="web01", uuid="11111111-1111-1111-1111-111111111111", state=state,
                  disks=[DiskInfo(target="vda", path="/img/web01.qcow2", size=size, format="qcow2")],
                  nics=[NicInfo(mac="52:54:00:00:00:01", network="default")])


def _full(*vms: dict[str, Any], free: int = 100) -> dict[str, Any]:
    return {"hosts": [{"name": "kvm-a", "platform": "kvm", "host_group": None, "replication_address": None,
                       "storage_free_bytes": free, "facts": {"cpu": "x"}, "vms": list(vms)}]}


def _vm(name: str, power: str = "running") -> dict[str, Any]:
    return {"name": name, "uuid": f"uuid-{name}", "power_state": power, "disks": {}, "nics": []}


def test_digest_is_stable_and_follows_the_entry() -> None:
    a = vm_entry(_info(), None)
    assert digest(a) == digest(vm_entry(_info(), None)) == digest(dict(reversed(list(a.items()))))
    assert len(digest(a)) == 24 and int(digest(a), 16) >= 0
    assert digest(vm_entry(_info(size=2**31), None)) != digest(a)  # a disk grew
    assert digest(vm_entry(_info(state=VmState.SHUT_OFF), None)) != digest(a)  # powered off


def _ack(**extra: Any) -> dict[str, Any]:
    return {"digests_known": True, "resend": [], "hosts_resend": [], **extra}


def test_only_the_changed_entries_go_in_full() -> None:
    d = Digests()
    full = _full(_vm("web01"), _vm("db01"))
    first = d.report(full)
    host = first["hosts"][0]
    assert [v["name"] for v in host["vms"]] == ["web01", "db01"] and host["vm_digests"] == {}
    assert host["facts"] == {"cpu": "x"} and host["digest"] == digest({k: v for k, v in full["hosts"][0].items()
                                                                       if k != "vms"})
    assert all(v["digest"] == digest(_vm(v["name"])) for v in host["vms"])
    d.acknowledge(first, _ack())

    same = d.report(full)["hosts"][0]
    assert same == {"name": "kvm-a", "digest": host["digest"], "vms": [],
                    "vm_digests": {"web01": digest(_vm("web01")), "db01": digest(_vm("db01"))}}

    changed = d.report(_full(_vm("web01", "shut off"), _vm("db01"), free=50))["hosts"][0]
    assert [v["name"] for v in changed["vms"]] == ["web01"] and list(changed["vm_digests"]) == ["db01"]
    assert changed["storage_free_bytes"] == 50  # the host's own fields changed: sent again

    # what the control plane asks for again is no longer acknowledged
    d.acknowledge(copy.deepcopy(d.report(full)), _ack(resend=["kvm-a/db01"], hosts_resend=["kvm-a"]))
    again = d.report(full)["hosts"][0]
    assert [v["name"] for v in again["vms"]] == ["db01"] and list(again["vm_digests"]) == ["web01"]
    assert "facts" in again


def test_an_answer_without_digests_known_keeps_reports_full() -> None:
    d = Digests()
    full = _full(_vm("web01"))
    for answer in ({"vms_updated": ["kvm-a/web01"]}, None, {"digests_known": False}):
        sent = d.report(full)
        assert [v["name"] for v in sent["hosts"][0]["vms"]] == ["web01"] and "facts" in sent["hosts"][0]
        d.acknowledge(sent, answer)
        assert d.hosts == {} and d.vms == {}


class _Cp:
    """A control plane that knows the digests it stored, and loses them on demand."""

    def __init__(self) -> None:
        self.known: dict[str, str] = {}
        self.bodies: list[dict[str, Any]] = []

    def call(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert (method, path) == ("PUT", "/agent/inventory")
        self.bodies.append(body)
        h = body["hosts"][0]
        for v in h["vms"]:
            self.known[v["name"]] = v["digest"]
        resend = [f"kvm-a/{n}" for n, dg in h["vm_digests"].items() if self.known.get(n) != dg]
        return {"vms_updated": [], "vms_removed": [], "digests_known": True, "vms_unchanged": 0,
                "resend": resend, "hosts_resend": []}


def test_what_the_control_plane_asks_for_again_is_sent_at_once(tmp_path: Path) -> None:
    cfg = AgentConfig(data_dir=tmp_path / "a", name="agent-a", server_url="https://127.0.0.1:8443", site="s",
                      server="m", cloud="c", host="kvm-a", listen="127.0.0.1:7443")
    cp = _Cp()
    rt = AgentRuntime(cfg, control_plane=cp)  # type: ignore[arg-type]  # not started
    full = _full(_vm("web01"), _vm("db01"))
    rt.report_inventory(full)
    rt.report_inventory(full)
    assert len(cp.bodies) == 2 and cp.bodies[1]["hosts"][0]["vms"] == []
    cp.known.pop("db01")  # restored from a backup without it
    res = rt.report_inventory(full)
    assert res["resend"] == ["kvm-a/db01"] and len(cp.bodies) == 4
    assert [v["name"] for v in cp.bodies[3]["hosts"][0]["vms"]] == ["db01"]
    assert list(cp.bodies[3]["hosts"][0]["vm_digests"]) == ["web01"]
    assert rt.stats["inventories"] == 4
