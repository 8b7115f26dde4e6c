"""Readiness of the live fabric: the store's inventory (as agents report it) checked by the
same rules as a fabric file, on SQLite and PostgreSQL."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cp_helpers import GIB, T0, at, build, host_report, vm_report  # noqa: E402

from standby.errors import NotFound  # noqa: E402
from standby.orchestration.livefabric import build_live_fabric, live_readiness  # noqa: E402
from standby.readiness.engine import Severity  # noqa: E402
from standby.store import Store  # noqa: E402
from standby.store.repo import agents, inventory  # noqa: E402


def _errors(report) -> set[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return {(f.rule, f.subject) for f in report.findings if f.severity is Severity.ERROR}


def _vm(store: Store, host: str, name: str):  # type: ignore[no-untyped-def]
    with store.read() as s:
        return inventory.get_vm(s, host, name)


def test_a_healthy_deployment_is_ready_and_its_facts_come_from_the_inventory(store: Store) -> None:
    build(store)
    with store.read() as s:
        lf = build_live_fabric(s, now=at(5))
        report = live_readiness(s, now=at(5))
    fab = lf.fabric
    assert fab.pairings[0].primary == "cloud-a" and fab.pairings[0].secondary == "cloud-b"
    assert fab.hosts_of_cloud("cloud-b") == ["kvm-b1", "kvm-b2"]
    assert fab.clouds["cloud-a"].host_groups == ["hg-a"]
    a = fab.hosts["kvm-a"]
    assert a.libvirt_version == "9.0.0" and a.cpu is not None and a.cpu.vendor == "Intel"
    assert a.replication_address == "10.0.1.1" and a.storage_free_gib == 200.0
    assert a.reaches_control_plane and sorted(a.reaches_hosts) == ["kvm-b1", "kvm-b2"]
    assert set(a.vms) == {"web01", "db01"}
    disk = a.vms["web01"].disks["vda"]
    assert disk.format == "qcow2" and disk.size_gib == 10.0 and disk.qcow2_compat == "1.1"
    assert a.vms["web01"].nics[0].network == "prod"
    assert fab.network_mappings[0].secondary == "prod-dr"

    assert report.ready, report.findings
    assert "kvm" in report.profiles
    # The reachability assumption is stated, not hidden.
    assert any(f.rule == "live.replication-reachability" and f.severity is Severity.INFO for f in report.findings)


def test_findings_follow_the_reported_facts(store: Store) -> None:
    build(store, primary_hosts=[
        host_report("kvm-a", ip="10.0.1.1", free_gib=200, libvirt="6.0.0", skew=12.0,
                    vms=[vm_report("web01", network="lab"),
                         vm_report("db01", disks={"vda": {"path": "/x.vhdx", "size": GIB, "format": "vhdx",
                                                          "size_gib": 1.0}})]),
    ])
    with store.read() as s:
        report = live_readiness(s, now=at(1))
    errors = _errors(report)
    assert ("kvm.host-versions", "host/kvm-a") in errors
    assert ("kvm.clock-skew", "host/kvm-a") in errors
    assert ("kvm.disk-format", "vm/kvm-a/db01") in errors
    assert not report.ready
    # A NIC on a network the control plane does not define: said so (and so it is unmapped).
    undefined = [f for f in report.findings if f.rule == "live.inventory" and f.subject == "vm/kvm-a/web01"]
    assert undefined and "'lab'" in undefined[0].message and undefined[0].severity is Severity.WARNING


def test_a_silent_agent_makes_its_host_unreachable(store: Store) -> None:
    build(store, now=T0)
    with store.transaction() as s:
        for host in ("kvm-a", "kvm-b1"):
            agents.heartbeat(s, f"agent-{host}", now=at(100))
    with store.read() as s:
        report = live_readiness(s, heartbeat_timeout=timedelta(seconds=30), now=at(110))
    errors = _errors(report)
    # kvm-b2's agent last spoke at T0: it no longer counts as reaching the control plane.
    assert ("kvm.control-plane-reachable", "host/kvm-b2") in errors
    assert ("kvm.control-plane-reachable", "host/kvm-a") not in errors
    # ... and is not assumed reachable for replication: kvm-a reaches only kvm-b1 (a warning).
    reach = [f for f in report.findings if f.rule == "kvm.replication-reachable"]
    assert [(f.subject, f.severity) for f in reach] == [("host/kvm-a", Severity.WARNING)]
    assert "kvm-b2" in reach[0].message
    with store.transaction() as s:
        agents.revoke_agent(s, "agent-kvm-b1")
    with store.read() as s:
        report = live_readiness(s, heartbeat_timeout=timedelta(seconds=30), now=at(110))
    assert ("kvm.replication-reachable", "host/kvm-a") in _errors(report)


def test_one_vm_sees_only_what_bears_on_it(store: Store) -> None:
    build(store, primary_hosts=[
        host_report("kvm-a", ip="10.0.1.1", free_gib=200,
                    vms=[vm_report("web01"),
                         vm_report("db01", disks={"vda": {"path": "/x", "size": GIB, "format": "qcow2",
                                                          "size_gib": 1.0, "kind": "shared"}})]),
        host_report("kvm-a2", ip="10.0.1.2", free_gib=200, libvirt="6.0.0", group="hg-a"),
    ])
    with store.read() as s:
        full = live_readiness(s, now=at(1))
        web = live_readiness(s, vm=inventory.get_vm(s, "kvm-a", "web01"), now=at(1))
        db = live_readiness(s, vm=inventory.get_vm(s, "kvm-a", "db01").id, now=at(1))
    assert {("kvm.disk-kinds", "vm/kvm-a/db01"), ("kvm.host-versions", "host/kvm-a2")} <= _errors(full)
    assert web.ready, web.findings
    assert _errors(db) == {("kvm.disk-kinds", "vm/kvm-a/db01")}
    # A problem of the secondary side bears on every VM of the primary cloud.
    with store.transaction() as s:
        inventory.sync_cloud(s, "cloud-b", [host_report("kvm-b1", ip="10.0.2.1", free_gib=1, group="hg-b", qemu="5.0")],
                             now=at(2))
    with store.read() as s:
        web = live_readiness(s, vm=inventory.get_vm(s, "kvm-a", "web01"), now=at(2))
    assert _errors(web) == {("kvm.host-versions", "host/kvm-b1"), ("kvm.secondary-storage", "cloud/cloud-b")}
    with store.read() as s, pytest.raises(NotFound):
        live_readiness(s, vm=999_999)


def test_unreadable_facts_become_findings_not_crashes(store: Store) -> None:
    build(store)
    with store.transaction() as s:
        host = inventory.get_host(s, "kvm-a")
        host.facts = {**host.facts, "libvirt_version": "nine", "gpu": "yes"}
        vm = inventory.get_vm(s, "kvm-a", "web01")
        vm.disks = {"vda": {"format": "iso", "size": GIB}, "vdb": {"format": "qcow2", "size": 0}}
        s.flush()
    with store.read() as s:
        report = live_readiness(s, now=at(1))
    by_subject = {(f.rule, f.subject, f.severity) for f in report.findings}
    assert ("live.inventory", "host/kvm-a", Severity.ERROR) in by_subject  # libvirt "nine"
    assert ("live.inventory", "host/kvm-a", Severity.INFO) in by_subject  # gpu: not used
    msgs = [f.message for f in report.findings if f.subject == "vm/kvm-a/web01" and f.rule == "live.inventory"]
    assert any("'iso'" in m for m in msgs) and any("'vdb'" in m for m in msgs)
    # The versions are then unknown, which the kvm rule reports as such.
    assert ("kvm.host-versions", "host/kvm-a") in _errors(report)
