"""The agent's configuration file (agent/config.py) and the inventory's pure parts
(agent/inventory.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from standby.agent.config import AgentConfig
from standby.agent.inventory import host_entry, replication_ip, storage, vm_entry
from standby.domain.fabric import CpuInfo, Disk, Host, Nic, Vm
from standby.drivers.base import DiskInfo, NicInfo, VmInfo, VmState
from standby.errors import BadInput, NotFound


def _cfg(tmp_path: Path, **kw: Any) -> AgentConfig:
    base: dict[str, Any] = dict(data_dir=tmp_path / "a", name="agent-a", server_url="https://127.0.0.1:8443/",
                                site="site1", server="mgr", cloud="primary", host="kvm-a", listen="127.0.0.1:7443")
    base.update(kw)
    return AgentConfig(**base)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, host_group="hg1", domains=["demo-*", "web?"], agent_id=7, heartbeat_seconds=2.5)
    path = cfg.save()
    assert path == tmp_path / "a" / "agent.json"
    raw = json.loads(path.read_text())
    assert raw["format"] == "standby-agent/1" and "data_dir" not in raw
    back = AgentConfig.load(tmp_path / "a")
    assert back == cfg
    assert back.server_url == "https://127.0.0.1:8443"  # trailing slash dropped
    assert (back.listen_host, back.listen_port) == ("127.0.0.1", 7443)
    assert back.key_path.name == "agent.key" and back.replicas_dir == tmp_path / "a" / "replicas"
    assert back.tracking_dir.parent == back.state_dir


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="register this agent first"):
        AgentConfig.load(tmp_path / "nothing")
    d = tmp_path / "bad"
    d.mkdir()
    (d / "agent.json").write_text("{not json")
    with pytest.raises(BadInput, match="cannot read"):
        AgentConfig.load(d)
    (d / "agent.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(BadInput, match="format"):
        AgentConfig.load(d)
    (d / "agent.json").write_text(json.dumps({"format": "standby-agent/1", "name": "x"}))
    with pytest.raises(BadInput, match="missing server_url"):
        AgentConfig.load(d)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("name", "bad name", "agent name"),
    ("cloud", "", "cloud"),
    ("server_url", "http://cp:8443", "https"),
    ("listen", "127.0.0.1", "HOST:PORT"),
    ("listen", "127.0.0.1:0", "HOST:PORT"),  # peers dial it: no "any port"
    ("domains", ["ok-*", ""], "glob"),
    ("heartbeat_seconds", 0, "heartbeat"),
])
def test_invalid_values_are_refused(tmp_path: Path, field: str, value: Any, match: str) -> None:
    with pytest.raises(BadInput, match=match):
        _cfg(tmp_path, **{field: value})


def test_domain_filter(tmp_path: Path) -> None:
    assert _cfg(tmp_path).owns("anything")  # no filter: every domain
    cfg = _cfg(tmp_path, domains=["demo-*", "db[0-9]"])
    assert cfg.owns("demo-web") and cfg.owns("db1")
    assert not cfg.owns("dr-demo-web") and not cfg.owns("db10") and not cfg.owns("DEMO-web")


def test_replication_ip() -> None:
    assert replication_ip("10.0.0.5") == "10.0.0.5"
    assert replication_ip("::1") == "::1"
    assert replication_ip("0.0.0.0") is None  # a wildcard is not an address peers can use
    assert replication_ip("host.example") is None


def test_storage_of_a_path_not_made_yet(tmp_path: Path) -> None:
    free, total = storage(tmp_path / "not" / "yet")
    assert 0 < free <= total


def _vm(name: str) -> VmInfo:
    return VmInfo(name, f"uuid-{name}", VmState.RUNNING,
                  [DiskInfo("vda", f"/vms/{name}.qcow2", "qcow2", 64 << 20)],
                  [NicInfo("52:54:00:00:00:01", "lan")])


def test_inventory_reports_only_owned_vms_with_fabric_facts(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, domains=["demo-*"], host_group="hg1")
    fabric_vm = Vm(disks={"vda": Disk(format="qcow2", size_gib=0.063, qcow2_compat="1.1")},
                   nics=[Nic(network="lan", address_families=["ipv4", "ipv6"])])
    host = Host(libvirt_version="9.0.0", qemu_version="7.2.0", cpu=CpuInfo(vendor="Intel", model="x"),
                storage_free_gib=1.0, vms={"demo-web": fabric_vm, "other": Vm()})
    entry = host_entry(cfg, host, [_vm("demo-web"), _vm("other")], free=5 << 30, clock_skew_seconds=0.25)
    assert entry["name"] == "kvm-a" and entry["platform"] == "kvm" and entry["host_group"] == "hg1"
    assert entry["replication_address"] == "127.0.0.1" and entry["storage_free_bytes"] == 5 << 30
    assert [v["name"] for v in entry["vms"]] == ["demo-web"]
    vm = entry["vms"][0]
    assert vm["uuid"] == "uuid-demo-web" and vm["power_state"] == "running"
    assert vm["disks"]["vda"] == {"path": "/vms/demo-web.qcow2", "size": 64 << 20, "format": "qcow2",
                                  "size_gib": 0.063, "kind": "virtual", "encrypted": False, "qcow2_compat": "1.1"}
    assert vm["nics"] == [{"mac": "52:54:00:00:00:01", "network": "lan", "address_families": ["ipv4", "ipv6"]}]
    # facts are fabric Host fields: the control plane can rebuild the readiness fabric from them
    facts = entry["facts"]
    rebuilt = Host.model_validate(facts)
    assert rebuilt.libvirt_version == "9.0.0" and rebuilt.replication_address == "127.0.0.1"
    assert rebuilt.storage_free_gib == 5.0 and rebuilt.clock_skew_seconds == 0.25
    assert json.loads(json.dumps(entry)) == entry  # JSON-ready as it is


def test_vm_entry_without_discovery_facts() -> None:
    vm = vm_entry(_vm("x"), None)
    assert vm["disks"]["vda"] == {"path": "/vms/x.qcow2", "size": 64 << 20, "format": "qcow2"}
    assert vm["nics"] == [{"mac": "52:54:00:00:00:01", "network": "lan"}]
