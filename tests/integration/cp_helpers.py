"""A small two-site deployment in a store, built with the repository functions the API and
the agents' endpoints use: servers and clouds as registration makes them, agents, hosts
and VMs as an agent's inventory reports them (`standby.agent.inventory` facts), a policy,
a pairing, networks and a mapping."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from standby.store import Store
from standby.store.repo import agents, inventory, items, policies
from standby.store.repo.inventory import HostReport, VmReport

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
GIB = 1 << 30


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def host_facts(*, ip: str, free_gib: float, libvirt: str = "9.0.0", qemu: str = "7.2.0",
               features: tuple[str, ...] = ("sse4_2", "avx2"), skew: float = 0.2) -> dict[str, Any]:
    """What `standby.agent.inventory.host_entry` reports as facts."""
    return {
        "libvirt_version": libvirt,
        "qemu_version": qemu,
        "cpu": {"vendor": "Intel", "model": "Skylake-Server", "features": list(features)},
        "reaches_control_plane": True,
        "storage_free_gib": free_gib,
        "replication_address": ip,
        "clock_skew_seconds": skew,
    }


def vm_report(name: str, *, disks: dict[str, dict[str, Any]] | None = None, network: str | None = "prod",
              uuid: str | None = None) -> VmReport:
    if disks is None:
        disks = {"vda": {"path": f"/var/lib/libvirt/images/{name}.qcow2", "size": 10 * GIB, "format": "qcow2",
                         "size_gib": 10.0, "kind": "virtual", "encrypted": False, "qcow2_compat": "1.1"}}
    nics = [{"mac": "52:54:00:00:00:01", "network": network}] if network is not None else []
    return VmReport(name=name, uuid=uuid or f"uuid-{name}", power_state="running", disks=disks, nics=nics)


@dataclass
class Deployment:
    policy: str = "gold"
    pairing_id: int = 0
    agent_ids: dict[str, int] | None = None  # host -> agent id


def host_report(name: str, *, ip: str, free_gib: float, vms: list[VmReport] | None = None,
                group: str | None = None, **facts: Any) -> HostReport:
    return HostReport(name=name, platform="kvm", host_group=group, replication_address=ip,
                      storage_free_bytes=int(free_gib * GIB), facts=host_facts(ip=ip, free_gib=free_gib, **facts),
                      vms=vms or [])


def build(
    store: Store,
    *,
    now: datetime = T0,
    primary_hosts: list[HostReport] | None = None,
    secondary_hosts: list[HostReport] | None = None,
    policy: dict[str, Any] | None = None,
    map_networks: bool = True,
) -> Deployment:
    """site-a/sm-a/cloud-a (primary: kvm-a with VMs web01, db01) paired with
    site-b/sm-b/cloud-b (secondary: kvm-b1 and kvm-b2), policy gold associated, networks
    prod -> prod-dr mapped. Each host has an active agent named agent-<host> whose
    heartbeat is `now`."""
    if primary_hosts is None:
        primary_hosts = [host_report("kvm-a", ip="10.0.1.1", free_gib=200, group="hg-a",
                                     vms=[vm_report("web01"), vm_report("db01")])]
    if secondary_hosts is None:
        secondary_hosts = [host_report("kvm-b1", ip="10.0.2.1", free_gib=100, group="hg-b"),
                           host_report("kvm-b2", ip="10.0.2.2", free_gib=400, group="hg-b")]
    dep = Deployment(agent_ids={})
    with store.transaction() as s:
        for site, server, cloud in (("site-a", "sm-a", "cloud-a"), ("site-b", "sm-b", "cloud-b")):
            inventory.ensure_server(s, server, site=site, platform="kvm", version="0.1.0")
            inventory.ensure_cloud(s, cloud, server=server, capabilities=["kvm"])
        inventory.ensure_network(s, "prod", site="site-a")
        inventory.ensure_network(s, "prod-dr", site="site-b")
        if map_networks:
            policies.map_network(s, "prod", "prod-dr")
        for cloud, reports in (("cloud-a", primary_hosts), ("cloud-b", secondary_hosts)):
            for r in reports:
                a = agents.register_agent(s, name=f"agent-{r.name}", host_name=r.name,
                                          address=f"{r.replication_address}:7443", version="0.1.0",
                                          cert_fingerprint=f"fp-{r.name}",
                                          facts={"cloud": cloud}, now=now)
                dep.agent_ids[r.name] = a.id  # type: ignore[index]
            inventory.sync_cloud(s, cloud, reports, now=now)
        policies.create_policy(s, dep.policy, **(policy or {}), now=now)
        pairing = policies.pair_clouds(s, "cloud-a", "cloud-b")
        policies.associate(s, dep.policy, pairing.id, now=now)
        dep.pairing_id = pairing.id
    return dep


@dataclass
class Fabric:
    item_ids: list[int]
    primary_agent: int
    secondary_agent: int


def items_fabric(
    store: Store,
    *,
    n: int = 1,
    state: str = "protected",
    freq: int = 300,
    retention: int = 0,
    app_hours: int = 0,
    keep_all: int = 0,
    secondary_agent: bool = True,
    point_at: datetime | None = None,
) -> Fabric:
    """One primary cloud gold (host h1, VMs vm0000...) paired with gold-dr (host h9), policy p,
    agents agent-h1 (and agent-h9), and `n` items in `state` (the scheduler's and the
    scale tests' fabric)."""
    with store.transaction() as s:
        inventory.ensure_server(s, "vmm-a", site="site-a")
        inventory.ensure_server(s, "vmm-b", site="site-b")
        inventory.ensure_cloud(s, "gold", server="vmm-a", capabilities=["kvm"])
        inventory.ensure_cloud(s, "gold-dr", server="vmm-b", capabilities=["kvm"])
        vms = [VmReport(name=f"vm{i:04d}", uuid=f"u-{i}", power_state="running") for i in range(n)]
        inventory.sync_cloud(s, "gold", [HostReport(name="h1", vms=vms)], now=T0)
        inventory.sync_cloud(s, "gold-dr", [HostReport(name="h9")], now=T0)
        pairing = policies.pair_clouds(s, "gold", "gold-dr")
        policy = policies.create_policy(
            s, "p", copy_frequency_seconds=freq, recovery_point_retention_hours=retention,
            app_consistent_interval_hours=app_hours, keep_all_points_minutes=keep_all,
        )
        policies.associate(s, "p", pairing.id)
        a1 = agents.register_agent(
            s, name="agent-h1", host_name="h1", address="10.0.0.1:7443", cert_fingerprint="a1" * 32,
            facts={"site": "site-a", "server": "vmm-a", "cloud": "gold", "host_group": None}, now=T0,
        )
        a9_id = 0
        if secondary_agent:
            a9_id = agents.register_agent(
                s, name="agent-h9", host_name="h9", address="10.0.0.9:7443", cert_fingerprint="a9" * 32,
                facts={"site": "site-b", "server": "vmm-b", "cloud": "gold-dr", "host_group": None}, now=T0,
            ).id
        h9 = inventory.get_host(s, "h9")
        ids = []
        for i in range(n):
            item = items.create(
                s, vm_id=inventory.get_vm(s, "h1", f"vm{i:04d}").id, pairing_id=pairing.id, policy_id=policy.id,
                state=state, secondary_host_id=h9.id, next_cycle_at=T0, now=T0,
            )
            if point_at is not None:
                item.last_recovery_point_at = point_at
                item.last_recovery_point_id = "p-0"
            ids.append(item.id)
        return Fabric(ids, a1.id, a9_id)
